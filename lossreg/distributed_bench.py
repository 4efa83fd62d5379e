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

import datetime as _dt
import time
from typing import Sequence

import torch
import torch.distributed as dist

from . import collectives, measure, ranks, sharding
from .distributed import placement, plan, specs_of
from .planning import HarnessError, Task, case_timeout
from .registry import Registry
from .rows import base_row, error_message, run_context
from .spec import DTYPES, Case

SEED = 5
#: seconds of timed steps per case, and the bounds on their number
BUDGET_S = {"cpu": 0.5, "cuda": 0.2}
MIN_STEPS, MAX_STEPS = 5, 50


def _inputs(task: Task, rank: int, world: int, device: str) -> tuple[dict, dict]:
    spec = task.spec
    options = dict(spec.options)
    whole = spec.make_inputs(Case(task.n, DTYPES[task.dtype], "cpu", seed=SEED,
                                  params=spec.case_params(task.preset, options)))
    mine = spec.sharding.shard(whole, rank, world, options) if world > 1 else whole
    mine = {k: (v.to(device).clone() if torch.is_tensor(v) else v) for k, v in mine.items()}
    names = spec.grad_names(mine)
    return {k: (v.requires_grad_(True) if k in names else v) for k, v in mine.items()}, options


def _agree(value: float, group, device: str) -> float:
    """The largest of every rank's ``value`` (a checker's collective, not counted)."""
    if group is None:
        return value
    t = torch.tensor([value], dtype=torch.float64,
                     device=device if device.startswith("cuda") else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return float(t.item())


def measure_step(task: Task, rank: int, world: int, group, device: str) -> dict:
    """One rank's figures for one case: time of a step (median, p20, p80 over the
    agreed number of steps), peak memory above the baseline during a step, and the
    bytes its collectives carried in a step."""
    leaves, options = _inputs(task, rank, world, device)
    names = [k for k, v in leaves.items() if torch.is_tensor(v) and v.requires_grad]

    def step():
        out = task.impl.fn(**leaves, **options)
        return torch.autograd.grad(out, [leaves[k] for k in names], torch.ones_like(out)) \
            if names else out

    group = group if world > 1 else None
    with collectives.using(group):
        step()  # warm-up: first-call costs stay out of the figures
        measure.synchronize(device)
        collectives.reset_comm()
        t0 = time.perf_counter()
        step()
        measure.synchronize(device)
        first_ms = _agree((time.perf_counter() - t0) * 1e3, group, device)
        comm = collectives.comm_bytes()
        budget = BUDGET_S[measure.device_type(device)] * 1e3
        steps = int(min(MAX_STEPS, max(MIN_STEPS, budget / max(first_ms, 1e-3))))
        samples = []
        for _ in range(steps):
            if group is not None:
                dist.barrier(group)
            measure.synchronize(device)
            t0 = time.perf_counter()
            step()
            measure.synchronize(device)
            samples.append((time.perf_counter() - t0) * 1e3)
        if group is not None:
            dist.barrier(group)
        peak = measure.peak_bytes(device, step)
    t = measure.Timing.of(samples)
    return {"time_ms": t.median_ms, "time_ms_p20": t.p20_ms, "time_ms_p80": t.p80_ms,
            "repeats": t.repeats, "peak_bytes": int(peak), "comm_bytes": int(comm)}


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
    if sizes not in ("quick", "default", "large"):
        raise HarnessError(f"unknown sizes {sizes!r}: expected quick, default or large")
    if case_timeout_s is not None and (isinstance(case_timeout_s, bool) or not isinstance(
            case_timeout_s, (int, float)) or not case_timeout_s > 0):
        raise HarnessError(f"case timeout must be a positive number of seconds, got "
                           f"{case_timeout_s!r}")
    worlds = list(dict.fromkeys(world_sizes or []))
    info = sharding.current()
    if info is not None:
        if worlds not in ([], [info.world_size]):
            raise HarnessError(f"world sizes {worlds} but torchrun started "
                               f"{info.world_size} ranks: under torchrun the job's ranks "
                               "are the one world size; give that or none")
        _, device = placement(None, device)
    elif not worlds:
        raise HarnessError("give the world sizes to measure, e.g. --world-size 1 "
                           "--world-size 2")
    else:
        for w in worlds:
            placement(w, device)
    specs = specs_of(list(names), registry)
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"
    context = run_context(device.split(":")[0], name, run_id)
    context["timestamp"] = _dt.datetime.now(_dt.timezone.utc)
    if info is not None:
        tasks = plan(specs, device, dtypes, impls, sizes, "bench", _whole(info.world_size, impls))
        rows = ranks.in_job(bench_rank, tasks, context, info.rank, device)
        _speedups(rows)
        return rows
    rows, plans = [], [plan(specs, device, dtypes, impls, sizes, "bench", _whole(w, impls))
                       for w in worlds]
    shown = progress(sum(map(len, plans))) if progress else None
    try:
        for world, tasks in zip(worlds, plans):
            limit = sum(case_timeout_s or case_timeout(t, device) for t in tasks)
            try:
                rows += ranks.spawned_rows(bench_rank, tasks, context, world, device, limit,
                                           check="throughput", mode="full", shown=shown)
            except ranks.RanksInterrupted as stop:  # one run of every world size so far
                stop.rows = rows + stop.rows
                stop.done += sum(map(len, plans[:worlds.index(world)]))
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
