"""The process group distributed losses run over, and the collectives they call, each
counting the bytes it carries (``comm_bytes``).

A distributed loss never reaches for ``torch.distributed``'s default group itself: it
asks `active_group` (its ``group=`` argument, else the group set by `using`). Outside
`using` there is none, and the loss runs as an ordinary single-process loss on whole
tensors -- also inside a sharded benchmark run, where every rank runs its own cases.

Bytes counted per call are the payload of the collective: the tensor for an
all-reduce, the gathered result for an all-gather (what a rank ends up holding). A
group of one moves nothing and counts nothing.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
import torch.distributed as dist

_STATE: dict[str, Any] = {"group": None, "bytes": 0, "calls": 0}


@contextlib.contextmanager
def using(group):
    """Distributed losses called in this block run over ``group`` (a process group,
    or ``dist.group.WORLD``); None: single process."""
    previous = _STATE["group"]
    _STATE["group"] = group
    try:
        yield group
    finally:
        _STATE["group"] = previous


def active_group(group=None):
    """``group`` if given, else the one set by `using`, else None (single process)."""
    return group if group is not None else _STATE["group"]


def rank_and_size(group=None) -> tuple[int, int]:
    """(this rank, world size) in the active group; (0, 1) without one."""
    g = active_group(group)
    if g is None:
        return 0, 1
    return dist.get_rank(g), dist.get_world_size(g)


def reset_comm() -> None:
    _STATE["bytes"] = 0
    _STATE["calls"] = 0


def comm_bytes() -> int:
    """Bytes carried by this process's collectives since `reset_comm`."""
    return int(_STATE["bytes"])


def comm_calls() -> int:
    return int(_STATE["calls"])


def _count(nbytes: int) -> None:
    _STATE["bytes"] += int(nbytes)
    _STATE["calls"] += 1


_OPS = {"sum": "SUM", "max": "MAX", "min": "MIN"}


def all_reduce_(t: torch.Tensor, op: str = "sum", group=None) -> torch.Tensor:
    """In-place all-reduce of ``t`` over the active group (nothing without one)."""
    if op not in _OPS:
        raise ValueError(f"all_reduce_: op must be one of {tuple(_OPS)}, got {op!r}")
    g = active_group(group)
    if g is None or dist.get_world_size(g) == 1:
        return t
    _count(t.numel() * t.element_size())
    dist.all_reduce(t, op=getattr(dist.ReduceOp, _OPS[op]), group=g)
    return t


def all_gather(t: torch.Tensor, group=None) -> list[torch.Tensor]:
    """Every rank's ``t`` (all of the same shape), in rank order."""
    g = active_group(group)
    if g is None or dist.get_world_size(g) == 1:
        return [t]
    world = dist.get_world_size(g)
    out = [torch.empty_like(t) for _ in range(world)]
    _count(t.numel() * t.element_size() * world)
    dist.all_gather(out, t.contiguous(), group=g)
    return out


def gather_sizes(n: int, device, group=None) -> list[int]:
    """Every rank's ``n`` (an int), in rank order."""
    parts = all_gather(torch.tensor([n], dtype=torch.int64, device=device), group)
    return [int(p.item()) for p in parts]


# ---------------------------------------------------------------- sharding
#: How a rank's tensor relates to the single-process one: ``replicate`` (every rank
#: holds all of it), ``partial`` (the sum over ranks is it), ``split:D`` (rank r holds
#: ``torch.tensor_split(t, world, dim=D)[r]``: uneven where the size does not divide).
LAYOUTS = ("replicate", "partial")


def check_layout(layout: str) -> str:
    ok = layout in LAYOUTS or (layout.startswith("split:") and layout[6:].lstrip("-").isdigit())
    if not ok:
        raise ValueError(f"sharding layout {layout!r}: expected replicate, partial or split:DIM")
    return layout


def take(t: torch.Tensor, layout: str, rank: int, world: int) -> torch.Tensor:
    """Rank ``rank``'s part of the whole tensor ``t`` (``partial``: all of it, to be
    compared with the sum over ranks)."""
    if layout.startswith("split:"):
        return torch.tensor_split(t, world, dim=int(layout[6:]))[rank]
    return t


@dataclass
class Sharding:
    """How a distributed loss's inputs, output and gradients are laid over the ranks
    (attached to its `LossSpec` as ``spec.sharding``; the core knows no loss).

    ``inputs``: input name -> layout (``replicate`` or ``split:D``); inputs not named
    are replicated. ``output`` and ``grads`` (input name -> layout): a layout, or a
    callable ``options -> layout`` where it depends on the options. ``extra``:
    ``(whole inputs, rank, world, options) -> dict`` of further per-rank arguments
    (e.g. the first vocabulary id this rank holds). ``uneven``: shards may differ in
    size (sizes that do not divide by the world size are checked as they come)."""

    inputs: Mapping[str, str] = field(default_factory=dict)
    output: str | Callable[[Mapping[str, Any]], str] = "replicate"
    grads: Mapping[str, str | Callable[[Mapping[str, Any]], str]] = field(default_factory=dict)
    extra: Callable[..., dict] | None = None
    uneven: bool = True

    def __post_init__(self) -> None:
        for name, layout in self.inputs.items():
            if check_layout(layout) == "partial":
                raise ValueError(f"sharding of input {name!r}: inputs are replicate or split:D")

    def layout(self, what: str, options: Mapping[str, Any]) -> str:
        """The layout of ``output`` or of input ``what``'s gradient under ``options``."""
        spec = self.output if what == "output" else self.grads.get(
            what, self.inputs.get(what, "replicate"))
        return check_layout(spec(options) if callable(spec) else spec)

    def shard(self, inputs: Mapping[str, Any], rank: int, world: int,
              options: Mapping[str, Any]) -> dict[str, Any]:
        """Rank ``rank``'s inputs, cut from the whole ones."""
        out = {k: take(v, self.inputs.get(k, "replicate"), rank, world)
               if torch.is_tensor(v) else v for k, v in inputs.items()}
        if self.extra is not None:
            out.update(self.extra(inputs, rank, world, options))
        return out
