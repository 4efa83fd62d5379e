"""Distributed checks: every rank's forward and gradient shards of a distributed loss
against the float64 single-process reference on the whole (gathered) tensors.

`check_distributed` spawns ``world_size`` gloo ranks on this machine (fresh
interpreters, rendezvous on a TCP store that this process holds on a free port), or,
started under ``torchrun``, runs as the rank it is (NCCL on GPUs) and gathers the
rows on rank 0. Each rank builds the same whole inputs from the seed, cuts its part
(``spec.sharding``, a `lossreg.collectives.Sharding`), runs the implementation over
the group, and compares its output and every gradient with the reference's part:
its slice (``split``), all of it (``replicate``) or, for ``partial`` values, the sum
over ranks. Rows carry ``world_size``, ``rank`` and ``comm_bytes`` (bytes carried
by the implementation's collectives in that check: forward for ``correctness``,
forward + backward for ``gradient``). A rank that dies, raises outside a check or
hangs past ``timeout`` leaves ``error`` rows for the cases it did not finish.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.distributed as dist

from . import collectives, ranks, sharding
from .planning import HarnessError, Task, default_dtypes
from .registry import Registry, default_registry
from .rows import base_row, error_message, run_context
from .spec import DTYPES, Case, LossSpec
from .verify import Verdict, compare_tensors, cotangent, fold, to64

SEEDS = (0, 1)
#: implementations that compute on whole tensors only (never over a group)
SINGLE_PROCESS_IMPLS = ("reference", "compile")


def specs_of(specs_or_names, registry: Registry | None) -> list[LossSpec]:
    if isinstance(specs_or_names, (str, LossSpec)):
        specs_or_names = [specs_or_names]
    out = []
    for s in specs_or_names:
        spec = s if isinstance(s, LossSpec) else (registry or default_registry()).get(s)
        if getattr(spec, "sharding", None) is None:
            raise HarnessError(f"{spec.name} is not a distributed loss (its spec has no "
                               "sharding); distributed runs need one, e.g. the "
                               "'distributed' family")
        out.append(spec)
    return out


def plan(specs: list[LossSpec], device: str, dtypes, impls, sizes: str,
         command: str = "check", single_process: Sequence[str] = ()) -> list[Task]:
    """The cases of a distributed run, in the same order on every rank. Implementations
    that only compute on whole tensors run where named in ``single_process``, whatever
    ``impls`` says (a benchmark's single-device baseline)."""
    if sizes not in ("quick", "default", "large"):
        raise HarnessError(f"unknown sizes {sizes!r}: expected quick, default or large")
    dtypes = list(dtypes) if dtypes else default_dtypes(device, command)
    for d in dtypes:
        if d not in DTYPES:
            raise HarnessError(f"unknown dtype {d!r}: expected one of {', '.join(DTYPES)}")
    known = {i for s in specs for i in s.implementations}
    for name in impls or ():
        if name not in known:
            raise HarnessError(f"unknown implementation {name!r}: the selected losses have "
                               f"{', '.join(sorted(known))}")
    tasks = []
    for spec in specs:
        for impl in spec.implementations.values():
            whole_only = impl.name in SINGLE_PROCESS_IMPLS
            if (impl.name not in single_process) if whole_only else \
                    (impls and impl.name not in impls):
                continue
            for dtype in dtypes:
                if impl.supports(device.split(":")[0], dtype):
                    continue
                for n in spec.sizes[sizes]:
                    tasks.append(Task(spec, impl, dtype, n, sizes))
    return tasks


# ---------------------------------------------------------------- one rank
def _part(ref: torch.Tensor, layout: str, rank: int, world: int) -> torch.Tensor:
    return collectives.take(ref, layout, rank, world)


def _mine(value: torch.Tensor, layout: str, group) -> torch.Tensor:
    """What to compare with the reference's part: a partial value summed over ranks
    (a checker's collective, not counted in comm_bytes)."""
    v = value.detach().to(torch.float64)
    if layout == "partial" and dist.get_world_size(group) > 1:
        dist.all_reduce(v, group=group)
    return v


def _verify(task: Task, inputs: dict, options: dict, seed: int, rank: int, world: int,
            group, device: str) -> tuple[Verdict, Verdict, int, int]:
    """(forward verdict, gradient verdict, forward comm bytes, fwd+bwd comm bytes)."""
    spec, impl, shard = task.spec, task.impl, task.spec.sharding
    tol = spec.tolerance(task.dtype)
    names = spec.grad_names(inputs)
    leaves64 = {k: (v.requires_grad_(True) if k in names else v)
                for k, v in to64(inputs).items()}
    ref = spec.reference(**leaves64, **options)
    out_layout = shard.layout("output", options)
    cot = cotangent(ref, seed)
    grads64 = torch.autograd.grad(ref, [leaves64[k] for k in names], cot, allow_unused=True)
    mine = {k: (v.to(device).detach().requires_grad_(k in names) if torch.is_tensor(v) else v)
            for k, v in shard.shard(inputs, rank, world, options).items()}
    with collectives.using(group):
        collectives.reset_comm()
        with torch.no_grad():
            out_nograd = impl.fn(**mine, **options)
        fwd_bytes = collectives.comm_bytes()
        collectives.reset_comm()
        out = impl.fn(**mine, **options)
        my_cot = _part(cot, out_layout, rank, world)
        grads = torch.autograd.grad(out, [mine[k] for k in names],
                                    my_cot.to(device=out.device, dtype=out.dtype),
                                    allow_unused=True) if names else []
        full_bytes = collectives.comm_bytes()
    forward = compare_tensors(_mine(out_nograd, out_layout, group),
                              _part(ref.detach(), out_layout, rank, world), *tol)
    verdicts = [("output", compare_tensors(_mine(out, out_layout, group),
                                           _part(ref.detach(), out_layout, rank, world), *tol))]
    for k, g, g64 in zip(names, grads, grads64):
        layout = shard.layout(k, options)
        g = torch.zeros_like(mine[k]) if g is None else g
        g64 = torch.zeros_like(leaves64[k]) if g64 is None else g64
        verdicts.append((f"grad {k}", compare_tensors(
            _mine(g, layout, group), _part(g64, layout, rank, world), *tol,
            what=f"grad of {k} ({layout})")))
    fold_ = fold(verdicts, tol)
    gradient = Verdict(fold_["status"] == "ok", fold_["max_abs_err"], fold_["rel_err"],
                       fold_["message"] or "")
    return forward, gradient, fwd_bytes, full_bytes


def rank_rows(task: Task, context: dict, rank: int, world: int, group, device: str,
              edges: bool) -> list[dict]:
    """The rows of one case on this rank: per option set a correctness and a gradient
    row (seeds folded), and (``edges``) one row per edge case of the spec."""
    spec = task.spec
    dt = DTYPES[task.dtype]
    tol = spec.tolerance(task.dtype)
    extra = {"world_size": world, "rank": rank}
    rows = []
    jobs = [(opts, None) for opts in spec.option_sets()]
    if edges:
        jobs += [(dict(spec.options), name) for name in spec.edge_cases]
    for options, edge in jobs:
        params = spec.case_params(task.preset, options)
        try:
            if edge is None:
                cases = [spec.make_inputs(Case(task.n, dt, "cpu", seed=s, params=params))
                         for s in SEEDS]
            else:
                cases = [spec.edge_cases[edge](Case(1, dt, "cpu", seed=11, params=params))]
            results = [_verify(task, inp, options, s, rank, world, group, device)
                       for s, inp in zip(SEEDS, cases)]
        except Exception as exc:  # noqa: BLE001 - one failing case is one error row
            row = base_row(context, task, options if edge is None
                           else {**options, "edge_case": edge})
            row.update(check="correctness", mode="forward", status="error",
                       message=error_message(exc), **extra)
            rows.append(row)
            continue
        if edge is not None:
            row = base_row(context, task, {**options, "edge_case": edge})
            row.update(check="correctness", mode="forward", comm_bytes=results[0][3],
                       n=next(v.shape[0] for v in cases[0].values() if torch.is_tensor(v)),
                       **fold([("forward", results[0][0]), ("gradient", results[0][1])], tol),
                       **extra)
            rows.append(row)
            continue
        for check, mode, idx, nbytes in (("correctness", "forward", 0, results[0][2]),
                                         ("gradient", "backward", 1, results[0][3])):
            row = base_row(context, task, options)
            row.update(check=check, mode=mode, comm_bytes=nbytes, **extra,
                       **fold([(f"seed {s}", r[idx]) for s, r in zip(SEEDS, results)], tol))
            rows.append(row)
    return rows


def run_rank(tasks: list[Task], context: dict, rank: int, world: int, group, device: str,
             send) -> None:
    """Every case on this rank, in the same order on all ranks; ``send(i, rows)``."""
    seen: set[tuple] = set()
    for i, task in enumerate(tasks):
        key = (task.spec.name, task.impl.name, task.dtype)
        rows = rank_rows(task, context, rank, world, group, device, key not in seen)
        seen.add(key)
        send(i, rows)


def placement(world_size, device: str):
    """``(torchrun's RankInfo or None, this rank's device)`` of a distributed run, after
    checking ``world_size`` (the job's under torchrun, else a whole number >= 1 of gloo
    ranks to spawn here, which needs device cpu)."""
    info = sharding.current()
    if info is not None:
        if world_size not in (None, info.world_size):
            raise HarnessError(f"--world-size {world_size} but torchrun started "
                               f"{info.world_size} ranks: give the same number or none")
        return info, sharding.device_for(info, device)
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise HarnessError(f"world_size must be a whole number of at least 1, got "
                           f"{world_size!r}")
    if not device.startswith("cpu"):
        raise HarnessError(f"distributed runs outside torchrun spawn gloo ranks on the CPU "
                           f"(device cpu), got {device!r}; for GPUs start them with torchrun")
    return None, device


def context_for(device: str, run_id: str | None) -> dict:
    """The columns every row of a distributed run shares (this rank's device)."""
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"
    return run_context(device.split(":")[0], name, run_id)


def check_distributed(specs_or_names: Sequence[Any] | str | LossSpec, world_size: int | None,
                      device: str = "cpu", dtypes: Sequence[str] | None = None,
                      impls: Sequence[str] | None = None, timeout: float = 300.0,
                      sizes: str = "quick", registry: Registry | None = None,
                      run_id: str | None = None, progress=None) -> list[dict]:
    """Rows (dicts of the results schema) of the distributed checks of these losses.

    Outside torchrun: spawns ``world_size`` gloo ranks on this machine (``device``
    must be cpu) and returns every rank's rows. Under torchrun (``WORLD_SIZE`` in the
    environment): this process is one rank of the job (NCCL on ``cuda``, one device
    per ``LOCAL_RANK``), ``world_size`` must be None or the job's; rank 0 returns
    every rank's rows, the others their own. Implementations named ``reference`` or
    ``compile`` compute on whole tensors and are not run over ranks. ``progress(total)``
    makes a display told of each case all spawned ranks finished (`progress.Progress`)."""
    if not isinstance(timeout, (int, float)) or not timeout > 0:
        raise HarnessError(f"timeout must be a positive number of seconds, got {timeout!r}")
    info, device = placement(world_size, device)
    specs = specs_of(specs_or_names, registry)
    tasks = plan(specs, device, dtypes, impls, sizes)
    context = context_for(device, run_id)
    if info is not None:
        return ranks.in_job(run_rank, tasks, context, info.rank, device)
    shown = progress(len(tasks)) if progress else None
    try:
        return ranks.spawned_rows(run_rank, tasks, context, world_size, device,
                                  float(timeout), shown=shown)
    finally:
        if shown is not None:
            shown.close()
