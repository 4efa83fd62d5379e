"""Distributed losses measured as their users care: per-rank time of a step, per-rank
peak memory and bytes communicated per step, at one or several world sizes, each
against the single-device loss on the whole problem (`lossreg bench NAME
--world-size 1 --world-size 2 --world-size 4`).

A step is forward + backward (gradients of every input that takes one, cotangent of
ones). At world size 1 every implementation runs with no process group on the whole
problem -- the single-device loss -- and the ``reference`` runs beside it; at world
size W each rank holds its part (``spec.sharding``) and the implementation runs over
the group. Each world size runs in its own spawned gloo ranks (`lossreg.ranks`), or,
under torchrun, over the job's ranks. Every rank times the same number of steps,
agreed from the slowest rank's first step, with a barrier before each, so a row's
time is that rank's step while all ranks step together.
"""

from __future__ import annotations

import time
from typing import Sequence

import torch
import torch.distributed as dist

from . import collectives, measure, ranks, sharding
from .distributed import context_for, placement, plan, specs_of
from .planning import HarnessError, Task, case_timeout
from .registry import Registry
from .rows import base_row, error_message
from .spec import DTYPES, Case
from .timing import timing_columns

SEED = 5
#: seconds of timed steps per case, and the bounds on their number
BUDGET_S = {"cpu": 0.5, "cuda": 0.2}
MIN_STEPS, MAX_STEPS = 5, 50


def _inputs(task: Task, rank: int, world: int, device: str):
    """This rank's part of the case's inputs on ``device``, the leaves that take a
    gradient marked, with the loss's options and the names of those leaves."""
    spec = task.spec
    options = dict(spec.options)
    whole = spec.make_inputs(Case(task.n, DTYPES[task.dtype], "cpu", seed=SEED,
                                  params=spec.case_params(task.preset, options)))
    mine = spec.sharding.shard(whole, rank, world, options) if world > 1 else whole
    mine = {k: (v.to(device).clone() if torch.is_tensor(v) else v) for k, v in mine.items()}
    names = spec.grad_names(mine)
    leaves = {k: (v.requires_grad_(True) if k in names else v) for k, v in mine.items()}
    return leaves, options, names


def _agree(value: float, group, device: str) -> float:
    """The largest of every rank's ``value`` (a checker's collective, not counted)."""
    if group is None:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return float(t.item())


def _ms(step, device: str) -> float:
    """Milliseconds of one synchronized call of ``step``."""
    measure.synchronize(device)
    t0 = time.perf_counter()
    step()
    measure.synchronize(device)
    return (time.perf_counter() - t0) * 1e3


def measure_step(task: Task, rank: int, world: int, group, device: str) -> dict:
    """One rank's figures for one case: time of a step (median, p20, p80 over the
    agreed number of steps), peak memory above the baseline during a step, and the
    bytes its collectives carried in a step."""
    leaves, options, names = _inputs(task, rank, world, device)

    def step():
        out = task.impl.fn(**leaves, **options)
        return torch.autograd.grad(out, [leaves[k] for k in names], torch.ones_like(out)) \
            if names else out

    group = group if world > 1 else None
    with collectives.using(group):
        step()  # warm-up: first-call costs stay out of the figures
        collectives.reset_comm()
        first_ms = _agree(_ms(step, device), group, device)
        comm = collectives.comm_bytes()
        budget = BUDGET_S[measure.device_type(device)] * 1e3
        samples = []
        for _ in range(int(min(MAX_STEPS, max(MIN_STEPS, budget / max(first_ms, 1e-3))))):
            if group is not None:
                dist.barrier(group)
            samples.append(_ms(step, device))
        if group is not None:
            dist.barrier(group)
        peak = measure.peak_bytes(device, step)
    # time columns as every throughput row derives them; no bytes or flops model here
    return {**timing_columns(samples, (None, None), model_bytes=None),
            "peak_bytes": int(peak), "comm_bytes": int(comm)}


def bench_rank(tasks: list[Task], context: dict, rank: int, world: int, group, device: str,
               send) -> None:
    """`lossreg.ranks` work: one throughput row per case on this rank."""
    for i, task in enumerate(tasks):
        row = base_row(context, task, dict(task.spec.options))
        row.update(check="throughput", mode="full", world_size=world, rank=rank, rounds=1)
        t0 = time.perf_counter()
        try:
            row.update(measure_step(task, rank, world, group, device), status="ok")
        except Exception as exc:  # noqa: BLE001 - one failing case is one error row
            row.update(status="error", message=error_message(exc))
        row["case_seconds"] = time.perf_counter() - t0
        send(i, [row])


def _whole(world: int, impls) -> tuple[str, ...]:
    """The whole-tensor implementations a world size runs: at world size 1 only, the
    reference (the single-device baseline, always) and ``compile`` when asked for."""
    if world != 1:
        return ()
    return ("reference", "compile") if impls and "compile" in impls else ("reference",)


def _speedups(rows: list[dict]) -> None:
    """speedup: the single-device reference's step time (same loss, dtype, size) over
    this row's, where the run has it."""
    ref = {(r["loss"], r["dtype"], r["n"]): r["time_ms"] for r in rows
           if r["impl"] == "reference" and r["world_size"] == 1 and r.get("status") == "ok"}
    for r in rows:
        base = ref.get((r["loss"], r["dtype"], r["n"]))
        if base and r.get("status") == "ok" and r.get("time_ms"):
            r["speedup"] = base / r["time_ms"]


def bench_distributed(names: Sequence[str], world_sizes: Sequence[int] | None = None,
                      device: str = "cpu", dtypes: Sequence[str] | None = None,
                      impls: Sequence[str] | None = None, sizes: str = "quick",
                      case_timeout_s: float | None = None, registry: Registry | None = None,
                      run_id: str | None = None, progress=None) -> list[dict]:
    """Throughput rows (results schema, check ``throughput``, mode ``full``) of these
    distributed losses at each world size. Outside torchrun each world size spawns its
    gloo ranks here (device cpu); under torchrun the job's ranks run it (``world_sizes``
    None or the job's), rank 0 returns every row and the others their own.
    ``case_timeout_s``: seconds per case (default `planning.case_timeout`); a world
    size's ranks are stopped after the sum over its cases. ``progress(total)``: a
    display, as for `lossreg.distributed.check_distributed`."""
    if case_timeout_s is not None and (isinstance(case_timeout_s, bool) or not isinstance(
            case_timeout_s, (int, float)) or not case_timeout_s > 0):
        raise HarnessError(f"case timeout must be a positive number of seconds, got "
                           f"{case_timeout_s!r}")
    worlds = list(dict.fromkeys(world_sizes or []))
    if sharding.current() is None and not worlds:
        raise HarnessError("give the world sizes to measure, e.g. --world-size 1 "
                           "--world-size 2")
    if sharding.current() is not None and len(worlds) > 1:
        raise HarnessError(f"world sizes {worlds} under torchrun: the job's ranks are the "
                           "one world size; give that or none")
    # every world size checked; the answer (torchrun's rank, this rank's device) is one
    info, device = [placement(w, device) for w in worlds or [None]][0]
    specs = specs_of(list(names), registry)
    context = context_for(device, run_id)
    if info is not None:
        tasks = plan(specs, device, dtypes, impls, sizes, "bench",
                     _whole(info.world_size, impls))
        rows = ranks.in_job(bench_rank, tasks, context, info.rank, device)
        _speedups(rows)
        return rows
    rows, plans = [], [plan(specs, device, dtypes, impls, sizes, "bench", _whole(w, impls))
                       for w in worlds]
    shown = progress(sum(map(len, plans))) if progress else None
    try:
        for k, (world, tasks) in enumerate(zip(worlds, plans)):
            limit = sum(case_timeout_s or case_timeout(t, device) for t in tasks)
            try:
                rows += ranks.spawned_rows(bench_rank, tasks, context, world, device, limit,
                                           check="throughput", mode="full", shown=shown)
            except ranks.RanksInterrupted as stop:  # one run of every world size so far
                stop.rows = rows + stop.rows
                stop.done += sum(map(len, plans[:k]))
                stop.total = sum(map(len, plans))
                _speedups(stop.rows)
                raise
    finally:
        if shown is not None:
            shown.close()
    _speedups(rows)
    return rows


def summarize(df) -> str:
    """Per loss, size, implementation and world size: the slowest rank's step, the
    largest per-rank peak against the same implementation's and the reference's at
    world size 1, and the bytes a rank communicates per step (per token: ``n``)."""
    head = ("loss", "impl", "dtype", "n", "world", "ms/step", "peak MiB", "vs ws1",
            "vs ref", "comm B/step", "B/token")
    lines = [head]
    ok = df[(df["status"] == "ok") & (df["check"] == "throughput")]
    for (loss, dtype, n), g in ok.groupby(["loss", "dtype", "n"], sort=False):
        single = g[g["world_size"] == 1].groupby("impl")["peak_bytes"].max()
        ref = single.get("reference")
        for (impl, world), h in g.groupby(["impl", "world_size"], sort=False):
            peak, own, comm = h["peak_bytes"].max(), single.get(impl), h["comm_bytes"].max()
            lines.append((loss, impl, dtype, str(n), str(world), f"{h['time_ms'].max():.3g}",
                          f"{peak / 2**20:.2f}",
                          f"{peak / own:.3f}x" if own else "-",
                          f"{peak / ref:.3f}x" if ref else "-",
                          str(int(comm)), f"{comm / n:.1f}"))
    widths = [max(len(r[i]) for r in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in lines)
