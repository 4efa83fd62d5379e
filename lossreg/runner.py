"""The run: plan the cases, send each to a supervised worker (`workers.Pool` running
`cases`), turn what comes back into rows, write them as the run goes, time the later
rounds in fresh workers, and consolidate. ``check`` and ``bench`` (`api`) are thin
layers on `execute`.

Every case, its checks and its timing run in a worker process; this process plans,
writes and never runs an implementation, so a segfault, an abort, an out-of-memory
kill or a hang costs one case: its row says what happened and the run goes on.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from . import cases, measure, planning, stopping
from .planning import HarnessError, Plan, Task, make_plan
from .registry import Registry, default_registry
from .results import ResultWriter, check_writable, to_table
from .rows import base_row, run_context, skipped_rows
from .timing import timing_columns
from .workers import Pool, WorkerStartError

DEFAULT_ROUNDS = 5  # timing rounds per case in `bench` (see `run_rounds`)
INTERPRETER_BENCH_SKIP = ("Triton on CPU runs under the interpreter: checked by `lossreg check` "
                          "at the quick sizes, never timed")

class _Quiet:
    """No progress display (the Python API's default)."""

    def __init__(self, total: int):
        self.total = total

    def case_started(self, *args) -> None:
        """(nothing to show: likewise `case_done` and `close`)"""

    case_done = close = case_started


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during a run: says which case was running and where the rows
    are. ``signum`` is the signal (SIGINT or SIGTERM)."""

    def __init__(self, case: str, done: int, total: int, rows: int, location,
                 signum: int = signal.SIGINT):
        self.case, self.done, self.total, self.rows, self.location, self.signum = (
            case, done, total, rows, location, signum)
        super().__init__(f"interrupted during {case} (case {done + 1} of {total}); "
                         f"{rows} rows of the finished cases are in {location}")


def resolve_device(device: str) -> str:
    """The device check: validated here, for the CLI, `gpu_check` and the Python API."""
    return measure.resolve_device(device)


def resolve_timeout(case_timeout: float | None) -> float | None:
    """None: each case's default limit (`planning.case_timeout`); 0: no limit."""
    if case_timeout is None:
        return None
    if isinstance(case_timeout, bool) or not isinstance(case_timeout, (int, float)) \
            or not case_timeout >= 0:
        raise HarnessError(f"case_timeout (--case-timeout) must be a number of seconds >= 0 "
                           f"(0: no limit), got {case_timeout!r}")
    return float(case_timeout)


def resolve_rounds(rounds) -> int:
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise HarnessError(f"rounds must be a whole number of at least 1, got {rounds!r}")
    return rounds


def case_limit(task: Task, device: str, case_timeout: float | None) -> float | None:
    """Seconds a case may take: ``case_timeout`` when given (0: none), else the cost
    model's (`planning.case_timeout`)."""
    if case_timeout is not None:
        return case_timeout or None
    return planning.case_timeout(task, device)


def case_name(task: Task) -> str:
    return f"{task.spec.name} {task.impl.name} {task.dtype} {task.spec.x_name}={task.n}"


@dataclass
class TimedCase:
    """A case whose throughput rows are refined by later timing rounds."""
    task: Task
    job: dict  # what a later round sends the worker (seed, params, options)
    rows: dict[str, dict]  # mode -> its row (the same dict as in RunState.rows)
    samples: dict[str, list[float]]
    models: dict[str, tuple]  # mode -> (bytes, flops) from the loss's models
    model_bytes: dict[str, float | None]
    repeats: dict[str, int]  # samples per round, fixed by the first
    seconds: float = 0.0  # timing wall time over all rounds (case_seconds)
    rounds: int = 1


@dataclass
class RunState:
    context: dict
    device: str
    writer: ResultWriter | None
    pool: Pool
    case_timeout: float | None = None
    rounds: int = 1
    peak_gbps: float | None = None
    rows: list[dict] = field(default_factory=list)
    timed: list[TimedCase] = field(default_factory=list)

    def emit(self, rows: list[dict]) -> None:
        self.rows.extend(rows)
        if self.writer is not None:
            self.writer.write(rows)


def _case_rows(state: RunState, task: Task, job: dict) -> list[dict]:
    """Run one case in a worker; its rows, with an error row for a check the worker
    did not finish (it died, or ran out of time)."""
    got: list[dict] = []
    timed: list[dict] = []
    step: list = [None, time.monotonic()]

    def on_message(msg):
        if msg[0] == "step":
            step[:] = [msg[1:], time.monotonic()]
        elif msg[0] == "rows":
            got.extend(msg[1])
        elif msg[0] == "timed":
            timed.append(msg[1])

    limit = case_limit(task, state.device, state.case_timeout)
    _, failure = state.pool.run(job, limit, on_message)
    if failure is not None:
        check, mode, params = step[0] or ("correctness", "forward", None)
        row = base_row({}, task, dict(task.spec.options))
        row.update(check=check, mode=mode, status="error", _seconds=time.monotonic() - step[1],
                   message=f"the worker running this case was {failure}" if "killed" in failure
                   else f"the case {failure}" if failure.startswith("exceeded")
                   else f"the worker {failure}" if failure.startswith("exited") else failure)
        if params is not None:
            row["params"] = params
        got.append(row)
    # case_seconds: every row of one check of the case carries the check's total
    totals: dict[str, float] = {}
    for r in got:
        if not r.get("_own"):
            totals[r["check"]] = totals.get(r["check"], 0.0) + r.get("_seconds", 0.0)
    for r in got:
        r["case_seconds"] = r.get("_seconds", 0.0) if r.get("_own") else totals[r["check"]]
        r.pop("_own", None)
        r.pop("_seconds", None)
    for t in timed:
        got += _throughput_rows(state, task, t)
    for r in got:  # in place: a TimedCase holds its rows for the later rounds
        r.update(state.context)
    return got


def _throughput_rows(state: RunState, task: Task, t: dict) -> list[dict]:
    measured = t["measured"]
    by_mode = {}
    for mode, m in measured.items():
        row = base_row({}, task, t["options"])
        row.update(check="throughput", mode=mode, status="ok", peak_bytes=m["peak_bytes"],
                   peak_gbps=state.peak_gbps, case_seconds=t["seconds"], rounds=1,
                   message="gradient computed in the forward" if (
                       task.impl.grad_in_forward and mode == "backward") else None)
        by_mode[mode] = row
    tc = TimedCase(task, {k: t[k] for k in ("seed", "params", "options")}, by_mode,
                   {mode: list(m["samples"]) for mode, m in measured.items()},
                   {mode: (m["bytes"], m["flops"]) for mode, m in measured.items()},
                   {mode: m["model_bytes"] for mode, m in measured.items()},
                   {mode: len(m["samples"]) for mode, m in measured.items()},
                   seconds=t["seconds"])
    state.timed.append(tc)
    _set_timing(state)
    return list(by_mode.values())


def _set_timing(state: RunState) -> None:
    """Fill the throughput rows' time columns from all their samples; references first,
    so that each row's speedup uses its reference's median of this run."""
    ref: dict[tuple, float] = {}
    for tc in sorted(state.timed, key=lambda c: c.task.impl.kind != "reference"):
        for mode, row in tc.rows.items():
            key = (row["loss"], row["dtype"], row["n"], mode)
            cols = timing_columns(tc.samples[mode], tc.models[mode], ref.get(key),
                                  state.peak_gbps, tc.model_bytes[mode])
            if tc.task.impl.kind == "reference":
                ref[key] = cols["time_ms"]
                cols["speedup"] = 1.0 if cols["time_ms"] > 0 else None
            row.update(cols, rounds=tc.rounds, case_seconds=tc.seconds)


def run_rounds(state: RunState, report: Callable[[str, str], None]) -> None:
    """Timing rounds 2..R: every case timed in the first pass is timed again, one round
    through all of them at a time (alternating direction), each round in a fresh worker
    process, and its rows are recomputed from the samples of all rounds. A round that
    fails ends that case's rounds; its rows keep the rounds done, counted in ``rounds``.
    Why: docs/measurement.md."""
    cases_ = state.timed
    for r in range(2, state.rounds + 1):
        state.pool.fresh()
        order = cases_ if r % 2 else cases_[::-1]
        for tc in order:
            name = f"timing round {r}/{state.rounds}: {case_name(tc.task)}"
            if tc.rounds != r - 1:  # an earlier round of this case failed: no more
                report(name, "skipped")
                continue
            report(name, None)
            t = tc.task
            job = {"kind": "round", "loss": t.spec.name, "impl": t.impl.name, "dtype": t.dtype,
                   "n": t.n, "preset": t.preset, **tc.job, "repeats": tc.repeats,
                   # a fresh worker pays lazy start-up (JIT, autotuning) on a first call
                   "warmup": {mode: 1 for mode in tc.repeats}}
            result, failure = state.pool.run(job, case_limit(t, state.device,
                                                             state.case_timeout))
            if failure is not None:
                note = f"timing round {r} failed, rows keep rounds 1-{r - 1}: {failure}"
                for row in tc.rows.values():
                    row["message"] = "; ".join(filter(None, [row["message"], note]))
                report(name, "error")
                continue
            for mode, xs in result["samples"].items():
                tc.samples[mode].extend(xs)
            tc.seconds += result["seconds"]
            tc.rounds = r
            report(name, "ok")
    _set_timing(state)


def execute(
    names: Sequence[str] | None = None, *, device: str = "auto",
    dtypes: Sequence[str] | None = None, impls: Sequence[str] | None = None,
    sizes: str = "quick", throughput: bool = False, out: str | Path | None = None,
    registry: Registry | None = None, progress: Callable | None = None,
    case_timeout: float | None = None, rounds: int | None = None, budget=None,
    run_id: str | None = None, select: Callable[[list[Task]], list[Task]] | None = None,
    row_extra: dict | None = None, consolidate: bool = True,
    check_bytes_max: int | None = None, on_plan: Callable[[Plan], None] | None = None,
    plan: Plan | None = None,
):
    """Shared engine of `check` and `bench`. Returns (DataFrame, ResultWriter | None).

    Arguments are validated before anything is written. ``case_timeout``: seconds per
    case (0: no limit; None: `planning.case_timeout`, from the cost model). ``budget``
    (seconds or "10m"): plan with `planning.plan_budget` instead of every size of
    ``sizes``. ``rounds``: timing rounds per case (default: the budget plan's, else 1).
    ``select(tasks)`` picks the planned tasks this process runs; ``row_extra`` is merged
    into every row; with ``consolidate=False`` the part files stay as they are (another
    process consolidates). ``progress(total)`` makes the display (``case_started``,
    ``case_done``, ``close``; e.g. `progress.Progress`); ``total`` counts every
    round. ``plan``: run this plan (e.g. `gpu_check.gpu_plan`) instead of making one;
    ``on_plan(plan)`` hears the plan before anything runs. Ctrl-C or SIGTERM
    raises `Interrupted` once the finished cases are saved."""
    import pandas as pd

    device = resolve_device(device)
    case_timeout = resolve_timeout(case_timeout)
    if rounds is not None:
        rounds = resolve_rounds(rounds)
    registry = registry or default_registry()
    command = "bench" if throughput else "check"
    if plan is not None:
        rounds = rounds or plan.rounds or 1
    elif budget is not None:
        plan = planning.plan_budget(registry, names, device, dtypes, impls, budget, rounds,
                                    command=command)
        rounds = plan.rounds
    else:
        plan = make_plan(registry, names, device, dtypes, impls, sizes, command=command)
        rounds = plan.rounds = rounds or 1
    tasks = list(select(plan.tasks)) if select is not None else plan.tasks
    if out is not None:
        check_writable(out)
    dev_type = measure.device_type(device)
    specs = {t.spec.name: t.spec for t in tasks}
    limits = {} if check_bytes_max is None else {"check_bytes_max": check_bytes_max}
    pool = Pool(cases.init, (specs, device, limits), cases.handle)
    checks = ("correctness", "gradient") + (("throughput",) if throughput else ())

    def checks_of(task: Task) -> tuple:
        return checks if task.checks is None else tuple(c for c in task.checks if c in checks)

    skip_all = [t for t in tasks if "throughput" in checks_of(t) and t.impl.uses_triton
                and dev_type == "cpu"]
    timed_total = sum("throughput" in checks_of(t) for t in tasks if t not in skip_all)
    total = len(tasks) + timed_total * (rounds - 1)
    counter = {"done": 0, "current": "planning"}
    writer = None
    if on_plan is not None:
        on_plan(plan)
    shown = (progress or _Quiet)(total)

    def report(name: str, status: str | None) -> None:
        if status is None:
            counter["current"] = name
            shown.case_started(name)
            return
        counter["done"] += 1
        shown.case_done(name, status)

    previous = stopping.on_sigterm()
    state = None
    try:
        info = pool.start() if tasks else {"device_name": measure.device_name(device)
                                            if dev_type == "cpu" else None}
        context = {**run_context(dev_type, info["device_name"], run_id), **(row_extra or {})}
        writer = ResultWriter(out, context["run_id"]) if out is not None else None
        state = RunState(context, device, writer, pool, case_timeout, rounds)
        if throughput and tasks:
            state.peak_gbps, failure = pool.run({"kind": "bandwidth"}, 600)
        for task, reason in plan.skipped:
            state.emit(skipped_rows(context, task, reason, checks_of(task)))
        gradchecked: set[str] = set()
        edges: set[tuple] = set()
        for task in tasks:
            spec, impl = task.spec, task.impl
            report(case_name(task), None)
            if task in skip_all:
                # the interpreter at benchmark sizes takes minutes per case and times
                # nothing; `lossreg check` covers these kernels at the quick sizes
                rows = skipped_rows(context, task, INTERPRETER_BENCH_SKIP, checks_of(task))
            else:
                mine = checks_of(task)
                job = {"kind": "case", "loss": spec.name, "impl": impl.name,
                       "dtype": task.dtype, "n": task.n, "preset": task.preset,
                       "checks": "correctness" in mine or "gradient" in mine,
                       "gradcheck": impl.kind == "reference" and spec.name not in gradchecked,
                       "edges": (spec.name, impl.name, task.dtype) not in edges,
                       "all_options": not throughput or task.n == min(spec.sizes[task.preset]),
                       "throughput": "throughput" in mine, "rounds": rounds}
                if job["checks"]:
                    if impl.kind == "reference":
                        gradchecked.add(spec.name)
                    edges.add((spec.name, impl.name, task.dtype))
                rows = _case_rows(state, task, job)
            state.emit(rows)
            bad = {r["status"] for r in rows} & {"error", "fail"}
            report(case_name(task), "error" if "error" in bad else "fail" if bad else "ok")
        if state.timed and rounds > 1:
            run_rounds(state, report)
        if writer is not None and consolidate:  # the consolidated run holds all rounds
            writer.finish(state.rows)
    except WorkerStartError as exc:
        if writer is not None and consolidate:
            writer.finish()
        raise HarnessError(str(exc)) from None
    except KeyboardInterrupt as exc:
        location = writer.finish() if writer is not None and consolidate else (
            writer.location if writer is not None else None)
        raise Interrupted(counter["current"], counter["done"], total,
                          len(state.rows) if state else 0,
                          location or "memory (no --out given)",
                          getattr(exc, "signum", signal.SIGINT)) from exc
    finally:
        pool.close()
        shown.close()
        stopping.restore_sigterm(previous)
    rows = state.rows
    df = to_table(rows).to_pandas() if rows else pd.DataFrame(columns=list(
        to_table([]).schema.names))
    return df, writer
