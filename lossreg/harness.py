"""The check/bench harness: correctness, gradient and throughput for each
loss x implementation x dtype x size, one long-format row per (check, mode).

Every case runs inside its own try/except: a failure is a row with status ``error``
and the run goes on.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import gc
import json
import math
import pickle
import platform
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from . import measure
from .registry import Registry, default_registry
from .results import ResultWriter
from .planning import HarnessError, Plan, Task, default_dtypes, make_plan, runnable  # noqa: F401
from .spec import DTYPES, Case, Impl, LossSpec, UnsupportedOption

SEEDS = (0, 1, 2)
#: Checks run only where the inputs in float64 stay under this (the reference and its
#: gradients hold several such copies); larger sizes are timed, and checked smaller.
CHECK_BYTES_MAX = 4 << 30
#: ... and where the float64 reference's modelled fwd+bwd flops stay under this.
CHECK_FLOPS_MAX = {"cpu": 1e11, "cuda": 1e14}
DEFAULT_ROUNDS = 5  # timing rounds per case in `bench` (see `run_rounds`)
#: samples per timed mode over all rounds, wherever they fit in the case's time budget:
#: same-commit pairs flagged rows of 5-10 samples (1-2 per round) far more often than
#: the others (7 of 11 flagged rows in three pairs, 28-35 of each pair's 204 rows)
MIN_SAMPLES = 15
ROTATION_BYTES = {"cpu": 64 << 20, "cuda": 256 << 20}
INTERPRETER_SKIP = "Triton on CPU runs under the interpreter: correctness only, no timing"
INTERPRETER_BENCH_SKIP = ("Triton on CPU runs under the interpreter: checked by `lossreg check` "
                          "at the quick sizes, never timed")


class CaseTimeout(Exception):
    """A case ran past ``case_timeout`` (the CLI's ``--case-timeout``)."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a run: says which case was running and where the rows are."""

    def __init__(self, case: str, done: int, total: int, rows: int, location):
        self.case, self.done, self.total, self.rows, self.location = (
            case, done, total, rows, location)
        super().__init__(f"interrupted during {case} (case {done + 1} of {total}); "
                         f"{rows} rows of the finished cases are in {location}")


@contextlib.contextmanager
def deadline(at: float | None, seconds: float | None):
    """Raise `CaseTimeout` in this block once ``time.monotonic()`` passes ``at``.

    SIGALRM interrupts Python code and sleeps; a single native call (one huge
    matmul, a hung CUDA kernel) is interrupted only when it returns to Python.
    Off the main thread, or without SIGALRM, there is no limit."""
    global _ARMED
    if at is None or threading.current_thread() is not threading.main_thread() \
            or not hasattr(signal, "setitimer"):
        yield
        return
    left = at - time.monotonic()
    if left <= 0:
        raise CaseTimeout(f"timed out: the case used its {seconds:g} s limit (--case-timeout) "
                          "before this step started")
    if _ARMED:  # an enclosing block of the same case holds the alarm
        yield
        return

    def on_alarm(signum, frame):
        raise CaseTimeout(f"timed out after {seconds:g} s (--case-timeout)")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, left)
    _ARMED = True
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        _ARMED = False


_ARMED = False


def recover_memory(exc: BaseException) -> None:
    """After an out-of-memory error, free what the failed case held so the next
    case starts from a clean allocator (CUDA: cached blocks and peak statistics)."""
    oom = isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc))
    if not oom:
        return
    exc.__traceback__ = None  # frames of the failed case hold its tensors
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


# ---------------------------------------------------------------- run context
def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True,
                             text=True, timeout=5, cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def run_context(device: str) -> dict[str, Any]:
    now = _dt.datetime.now(_dt.timezone.utc)
    return {
        "run_id": now.strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6],
        "timestamp": now,
        "lossreg_version": _version("lossreg"),
        "git_commit": _git_commit(),
        "hostname": socket.gethostname(),
        "device_type": measure.device_type(device),
        "device_name": measure.device_name(device),
        "torch_version": torch.__version__,
        "triton_version": _version("triton"),
        "python_version": platform.python_version(),
    }


# ---------------------------------------------------------------- numerics
def _to64(inputs: dict[str, Any]) -> dict[str, Any]:
    return {k: v.detach().double() if torch.is_tensor(v) and v.is_floating_point() else v
            for k, v in inputs.items()}


@dataclass
class Verdict:
    ok: bool
    max_abs: float | None
    rel: float | None
    message: str = ""


def compare(out: Any, ref: torch.Tensor, rtol: float, atol: float, what: str = "output") -> Verdict:
    """Pass when ||out-ref||/||ref|| <= rtol, or when max|out-ref| <= atol.

    ``atol`` is an absolute floor near the dtype's rounding noise (float32 1e-7), not
    the relative tolerance reused as an absolute one: a gradient of 1e-5 per element
    must be right to 1e-5 relative, not merely within 1e-5 of the truth. NaN/inf must
    sit exactly where the reference has them (a NaN the reference lacks never passes)."""
    if not torch.is_tensor(out):
        return Verdict(False, None, None, f"{what}: returned {type(out).__name__}, not a tensor")
    if out.shape != ref.shape:
        return Verdict(False, None, None,
                       f"{what}: shape {tuple(out.shape)}, expected {tuple(ref.shape)}")
    o = out.detach().to(device=ref.device, dtype=torch.float64)
    r = ref.detach()
    nonfinite_o, nonfinite_r = ~torch.isfinite(o), ~torch.isfinite(r)
    if not torch.equal(nonfinite_o, nonfinite_r) or not torch.equal(
        torch.where(nonfinite_o, o, 0).nan_to_num(0.0, 1.0, -1.0),
        torch.where(nonfinite_r, r, 0).nan_to_num(0.0, 1.0, -1.0),
    ):
        bad = int((nonfinite_o != nonfinite_r).sum())
        return Verdict(False, math.inf, math.inf,
                       f"{what}: NaN/inf differ from the reference at {bad} positions")
    fo, fr = o[~nonfinite_o], r[~nonfinite_r]
    if fo.numel() == 0:
        return Verdict(True, 0.0, 0.0)
    diff = (fo - fr).abs()
    max_abs = float(diff.max())
    err, denom = float(diff.norm()), float(fr.norm())
    rel = err / denom if denom > 0 else (0.0 if err == 0 else math.inf)
    ok = rel <= rtol or max_abs <= atol
    msg = "" if ok else (f"{what}: rel_err {rel:.3g} > rtol {rtol:g} and max_abs "
                         f"{max_abs:.3g} > atol {atol:g}")
    return Verdict(ok, max_abs, rel, msg)


def _worst(verdicts: list[tuple[str, Verdict]]) -> tuple[str, float | None, float | None, str]:
    status = "ok" if all(v.ok for _, v in verdicts) else "fail"
    maxes = [v.max_abs for _, v in verdicts if v.max_abs is not None]
    rels = [v.rel for _, v in verdicts if v.rel is not None]
    msgs = [f"[{label}] {v.message}" for label, v in verdicts if not v.ok]
    return status, max(maxes) if maxes else None, max(rels) if rels else None, "; ".join(msgs)


def cotangent(out: torch.Tensor, seed: int) -> torch.Tensor:
    """Seed 0 backpropagates ones (the usual training path); others a random cotangent."""
    if seed == 0:
        return torch.ones_like(out)
    g = torch.Generator(device=out.device).manual_seed(1000 + seed)
    return torch.rand(out.shape, generator=g, device=out.device, dtype=out.dtype) + 0.5


def check_forward(spec: LossSpec, impl: Impl, inputs: dict, options: dict, tol) -> Verdict:
    with torch.no_grad():
        out = impl.fn(**inputs, **options)
    ref = spec.reference(**_to64(inputs), **options)
    return compare(out, ref, *tol)


def check_gradient(spec: LossSpec, impl: Impl, inputs: dict, options: dict, tol,
                   seed: int) -> Verdict:
    names = spec.grad_names(inputs)
    if not names:
        return Verdict(True, None, None, "no inputs take gradients")
    leaves = {k: (v.detach().clone().requires_grad_(True) if k in names else v)
              for k, v in inputs.items()}
    leaves64 = {k: (v.detach().double().requires_grad_(True) if k in names else v)
                for k, v in _to64(inputs).items()}
    out = impl.fn(**leaves, **options)
    ref = spec.reference(**leaves64, **options)
    verdicts = [("output", compare(out, ref, *tol))]
    if not verdicts[0][1].ok:
        return verdicts[0][1]
    cot = cotangent(out, seed)
    grads = torch.autograd.grad(out, [leaves[k] for k in names], cot, allow_unused=True)
    grads64 = torch.autograd.grad(ref, [leaves64[k] for k in names], cot.double(),
                                  allow_unused=True)
    for k, g, g64 in zip(names, grads, grads64):
        g64 = torch.zeros_like(leaves64[k]) if g64 is None else g64
        if g is None:
            g = torch.zeros_like(leaves[k])
        verdicts.append((f"grad {k}", compare(g, g64, *tol, what=f"grad of {k}")))
    _, max_abs, rel, msg = _worst(verdicts)
    return Verdict(all(v.ok for _, v in verdicts), max_abs, rel, msg)


def gradcheck_reference(spec: LossSpec, device: str) -> Verdict:
    n = min(8, min(spec.sizes["quick"]))
    inputs = _to64(spec.make_inputs(Case(n=n, dtype=torch.float64, device=device, seed=7,
                                         params=spec.case_params("quick", spec.options))))
    names = spec.grad_names(inputs)
    if not names:
        return Verdict(True, None, None, "no inputs take gradients")
    opts = dict(spec.options)
    # scale the output to O(1) so finite differences of large losses (perplexity)
    # are judged by gradcheck's tolerances relative to the loss, not absolutely
    with torch.no_grad():
        magnitude = spec.reference(**inputs, **opts).abs().max().clamp_min(1.0)

    def f(*ts):
        return spec.reference(**{**inputs, **dict(zip(names, ts))}, **opts) / magnitude

    ok = torch.autograd.gradcheck(
        f, tuple(inputs[k].detach().requires_grad_(True) for k in names), raise_exception=True
    )
    return Verdict(bool(ok), None, None, f"torch.autograd.gradcheck at {spec.x_name}={n}")


# ---------------------------------------------------------------- throughput
def _n_input_sets(inputs: dict, device: str) -> int:
    size = sum(t.numel() * t.element_size() for t in inputs.values() if torch.is_tensor(t))
    target = ROTATION_BYTES[measure.device_type(device)]
    return int(min(8, max(2, math.ceil(target / max(size, 1)))))


def throughput_runs(spec: LossSpec, impl: Impl, case: Case, options: dict):
    """``(first inputs, {mode: run})`` for timing one case: several input sets to rotate
    between (so caches don't flatter small sizes), and ``run(i)`` that does call i's
    untimed set-up (the forward pass, before timing a backward) and returns the callable
    to time. backward and full exist only where some input takes a gradient. The
    pytest-benchmark suite builds its cases with this too."""
    device = case.device
    first = spec.make_inputs(case)
    sets = [first] + [
        spec.make_inputs(Case(case.n, case.dtype, device, seed=case.seed + 1 + i,
                              params=case.params))
        for i in range(_n_input_sets(first, device) - 1)
    ]
    names = spec.grad_names(first)
    leaves = [{k: (v.detach().requires_grad_(True) if k in names else v) for k, v in s.items()}
              for s in sets]

    def call(i):
        return impl.fn(**leaves[i % len(leaves)], **options)

    def grads(out, i):
        return torch.autograd.grad(out, [leaves[i % len(leaves)][k] for k in names],
                                   torch.ones_like(out))

    def fwd(i):
        return lambda: call(i)

    def bwd(i):
        out = call(i)
        return lambda: grads(out, i)

    def full(i):
        return lambda: grads(call(i), i)

    return first, ({"forward": fwd, "backward": bwd, "full": full} if names
                   else {"forward": fwd})


def measure_throughput(spec: LossSpec, impl: Impl, case: Case, options: dict,
                       rounds: int = 1) -> dict[str, dict]:
    """The first timing round of a case: forward / backward / full samples and peak memory.

    The time budget per mode is split over ``rounds``; `retime` runs the later rounds
    with the same number of repeats, so each round weighs the same in the median."""
    device = case.device
    first, runs = throughput_runs(spec, impl, case, options)
    budget = (0.3 if measure.device_type(device) == "cpu" else 0.15) / rounds
    warmup = 3 if impl.backend in ("compile", "triton") else 2
    results: dict[str, dict] = {}
    for mode, run in runs.items():
        with _timing_allocator(device):
            t = measure.time_calls(device, run, budget_s=budget, warmup=warmup,
                                   min_repeats=max(1, math.ceil(5 / rounds)),
                                   cheap_min=(math.ceil(MIN_SAMPLES / rounds),
                                              budget * rounds))
        results[mode] = {
            # run(0) does backward's forward before peak_bytes starts: only the timed call counts
            "samples": t.samples, "peak_bytes": measure.peak_bytes(device, run(0)),
            "bytes": spec.model("bytes", first, mode), "flops": spec.model("flops", first, mode),
        }
    return results


def retime(spec: LossSpec, impl: Impl, case: Case, options: dict,
           repeats: dict[str, int], warmup: dict[str, int]) -> dict[str, list[float]]:
    """A later timing round of a case: fresh inputs, ``warmup[mode]`` untimed calls,
    then ``repeats[mode]`` samples per mode."""
    _, runs = throughput_runs(spec, impl, case, options)
    samples = {}
    for mode, n in repeats.items():
        with _timing_allocator(case.device):
            samples[mode] = measure.time_calls(case.device, runs[mode], warmup=warmup[mode],
                                               repeats=n).samples
    return samples


def _timing_allocator(device: str):
    """`measure.heap_only` on a CPU, nothing on a GPU."""
    return measure.heap_only() if measure.device_type(device) == "cpu" else \
        contextlib.nullcontext()


# ---------------------------------------------------------------- running
ProgressFn = Callable[[int, int, str], None]  # (cases done, cases in all, current case)


@dataclass
class RunState:
    context: dict
    device: str
    writer: ResultWriter | None
    peak_gbps: float | None = None
    ref_times: dict = field(default_factory=dict)  # (loss, dtype, n, mode) -> ms
    rows: list[dict] = field(default_factory=list)
    case_timeout: float | None = None
    case_deadline: float | None = None  # monotonic time the current case must end by
    rounds: int = 1  # timing rounds per throughput case (see `run_rounds`)
    timed: list["TimedCase"] = field(default_factory=list)

    def start_case(self) -> None:
        self.case_deadline = (time.monotonic() + self.case_timeout
                              if self.case_timeout else None)

    def limit(self):
        return deadline(self.case_deadline, self.case_timeout)


@dataclass
class TimedCase:
    """A case whose throughput rows are refined by later timing rounds."""
    task: Task
    case: Case
    options: dict
    rows: dict[str, dict]  # mode -> its row (the same dict as in RunState.rows)
    samples: dict[str, list[float]]
    models: dict[str, tuple]  # mode -> (bytes, flops) from the spec's models
    repeats: dict[str, int]  # samples per round, fixed by the first
    warmup: dict[str, int]
    rounds: int = 1


def base_row(context: dict, task: Task, params: dict) -> dict:
    """A result row's identifying columns: the run's context, the loss, implementation,
    dtype, size and the params it ran with (the pytest-benchmark suite builds its rows
    with this too)."""
    spec, impl = task.spec, task.impl
    params = {**spec.input_params.get(task.preset, {}), **params}
    return {
        **context,
        "loss": spec.name, "family": spec.family, "impl": impl.name, "impl_kind": impl.kind,
        "backend": impl.backend, "plugin": impl.plugin or spec.plugin, "dtype": task.dtype,
        "x_name": spec.x_name, "n": task.n, "params": json.dumps(params, sort_keys=True,
                                                                  default=str),
    }


def error_message(exc: BaseException) -> str:
    tb = traceback.extract_tb(exc.__traceback__)
    where = f" (at {Path(tb[-1].filename).name}:{tb[-1].lineno})" if tb else ""
    return f"{type(exc).__name__}: {exc}"[:2000] + where


def _guard(state: RunState, row: dict, fn: Callable[[], dict]) -> dict:
    try:
        with state.limit():
            row.update(fn())
    except UnsupportedOption as exc:
        row.update(status="skipped", message=str(exc))
    except Exception as exc:  # noqa: BLE001 - one failing case is one error row
        row.update(status="error", message=error_message(exc))
        recover_memory(exc)
    return row


def _verdict_row(v: Verdict, tol) -> dict:
    return {"status": "ok" if v.ok else "fail", "message": v.message or None,
            "max_abs_err": v.max_abs, "rel_err": v.rel, "rtol": tol[0], "atol": tol[1]}


def _option_sets(spec: LossSpec) -> list[dict]:
    sets = [dict(spec.options)]
    for extra in spec.check_options:
        merged = {**spec.options, **extra}
        if merged not in sets:
            sets.append(merged)
    return sets


def throughput_only_size(spec: LossSpec, task: Task, dtype: torch.dtype,
                         device: str = "cpu") -> bool:
    """Inputs too large for the float64 reference (several copies of them in float64),
    or, where the spec models flops, too much float64 work for the device. Input
    bytes and flops are extrapolated from n = 1 and n = 2 (some inputs do not grow
    with n)."""
    def probe(n):
        inputs = spec.make_inputs(Case(n, dtype, "cpu", seed=0,
                                       params=spec.case_params(task.preset, spec.options)))
        nbytes = sum(t.numel() * 8 for t in inputs.values() if torch.is_tensor(t))
        return nbytes, spec.model("flops", inputs, "full") or 0.0

    (b1, f1), (b2, f2) = probe(1), probe(2)
    too_big = b1 + (b2 - b1) * (task.n - 1) > CHECK_BYTES_MAX
    too_slow = f1 + (f2 - f1) * (task.n - 1) > CHECK_FLOPS_MAX[measure.device_type(device)]
    return too_big or too_slow


def run_checks(state: RunState, task: Task, all_options: bool) -> list[dict]:
    spec, impl, device = task.spec, task.impl, state.device
    dt = DTYPES[task.dtype]
    tol = spec.tolerance(task.dtype)
    rows = []
    for options in (_option_sets(spec) if all_options else [dict(spec.options)]):
        if throughput_only_size(spec, task, dt, device):
            for check, mode in (("correctness", "forward"), ("gradient", "backward")):
                row = base_row(state.context, task, options)
                row.update(check=check, mode=mode, status="skipped",
                           message="float64 reference too large or slow at this size "
                                   f"(over {CHECK_BYTES_MAX >> 30} GiB of inputs or "
                                   f"{CHECK_FLOPS_MAX[measure.device_type(device)]:.0e} "
                                   "flops): checked at the smaller sizes")
                rows.append(row)
            break
        params = spec.case_params(task.preset, options)
        inputs = [spec.make_inputs(Case(task.n, dt, device, seed=s, params=params))
                  for s in SEEDS]

        def forward():
            return _fold([(f"seed {s}", check_forward(spec, impl, inp, options, tol))
                          for s, inp in zip(SEEDS, inputs)], tol)

        def gradient():
            return _fold([(f"seed {s}", check_gradient(spec, impl, inp, options, tol, s))
                          for s, inp in zip(SEEDS, inputs)], tol)

        for check, mode, fn in (("correctness", "forward", forward),
                                ("gradient", "backward", gradient)):
            row = base_row(state.context, task, options)
            row.update(check=check, mode=mode)
            rows.append(_guard(state, row, fn))
    return rows


def _fold(verdicts: list[tuple[str, Verdict]], tol) -> dict:
    status, max_abs, rel, msg = _worst(verdicts)
    return {"status": status, "message": msg or None, "max_abs_err": max_abs, "rel_err": rel,
            "rtol": tol[0], "atol": tol[1]}


def run_edge_cases(state: RunState, spec: LossSpec, impl: Impl, dtype: str) -> list[dict]:
    rows = []
    dt = DTYPES[dtype]
    tol = spec.tolerance(dtype)
    for name, make in spec.edge_cases.items():
        params = {**spec.options, "edge_case": name}
        task = Task(spec, impl, dtype, 0)
        row = base_row(state.context, task, params)
        row.update(check="correctness", mode="forward")

        def run(make=make, row=row):
            inputs = make(Case(1, dt, state.device, seed=11,
                               params=spec.case_params("quick", spec.options)))
            row["n"] = next(v.numel() for v in inputs.values() if torch.is_tensor(v))
            verdicts = [("forward", check_forward(spec, impl, inputs, dict(spec.options), tol)),
                        ("gradient", check_gradient(spec, impl, inputs, dict(spec.options),
                                                    tol, 1))]
            return _fold(verdicts, tol)

        rows.append(_guard(state, row, run))
    return rows


def run_throughput(state: RunState, task: Task) -> list[dict]:
    spec, impl = task.spec, task.impl
    options = dict(spec.options)
    rows = []
    modes = ("forward", "backward", "full")
    if impl.uses_triton and measure.device_type(state.device) == "cpu":
        for mode in modes:
            row = base_row(state.context, task, options)
            row.update(check="throughput", mode=mode, status="skipped", message=INTERPRETER_SKIP)
            rows.append(row)
        return rows
    try:
        case = Case(task.n, DTYPES[task.dtype], state.device, seed=100,
                    params=spec.case_params(task.preset, options))
        with state.limit():
            measured = measure_throughput(spec, impl, case, options, rounds=state.rounds)
    except Exception as exc:  # noqa: BLE001
        row = base_row(state.context, task, options)
        row.update(check="throughput", mode="full", status="error", message=error_message(exc))
        recover_memory(exc)
        return [row]
    by_mode = {}
    for mode, m in measured.items():
        row = base_row(state.context, task, options)
        row.update(
            check="throughput", mode=mode, status="ok",
            message="gradient computed in the forward" if (impl.grad_in_forward
                                                            and mode == "backward") else None,
            peak_bytes=m["peak_bytes"], peak_gbps=state.peak_gbps,
        )
        _set_timing(state, row, m["samples"], 1, (m["bytes"], m["flops"]))
        rows.append(row)
        by_mode[mode] = row
    if state.rounds > 1:
        samples = {mode: list(m["samples"]) for mode, m in measured.items()}
        state.timed.append(TimedCase(
            task, case, options, by_mode, samples,
            models={mode: (m["bytes"], m["flops"]) for mode, m in measured.items()},
            repeats={mode: len(v) for mode, v in samples.items()},
            # a call of over a second dwarfs a cold start: no warm-up call in later rounds
            warmup={mode: 0 if min(v) > 1e3 else 1 for mode, v in samples.items()}))
    return rows


def timing_columns(samples: list[float], model: tuple, reference_ms: float | None = None,
                   peak_gbps: float | None = None) -> dict:
    """A throughput row's time columns from its samples (ms), and what derives from them:
    GB/s and TFLOP/s from the spec's (bytes, flops) models, speedup over the reference's
    median, and the fraction of the device's copy bandwidth."""
    t = measure.Timing.of(samples)
    ms = t.median_ms
    nbytes, flops = model
    gbps = nbytes / (ms * 1e-3) / 1e9 if nbytes and ms > 0 else None
    return dict(
        time_ms=ms, time_ms_p20=t.p20_ms, time_ms_p80=t.p80_ms, repeats=t.repeats, gbps=gbps,
        tflops=flops / (ms * 1e-3) / 1e12 if flops and ms > 0 else None,
        speedup=reference_ms / ms if reference_ms and ms > 0 else None,
        bw_fraction=gbps / peak_gbps if gbps and peak_gbps else None,
    )


def _set_timing(state: RunState, row: dict, samples: list[float], rounds: int,
                model: tuple) -> None:
    """Fill a throughput row's time columns (`timing_columns`), the speedup against the
    reference's row of this run (references are set first)."""
    key = (row["loss"], row["dtype"], row["n"], row["mode"])
    if row["impl_kind"] == "reference":
        state.ref_times[key] = measure.Timing.of(samples).median_ms
    row.update(timing_columns(samples, model, state.ref_times.get(key), state.peak_gbps),
               rounds=rounds)


def run_rounds(state: RunState, progress: ProgressFn | None = None,
               fresh_processes: bool = False) -> None:
    """Timing rounds 2..R: every case measured in the first pass is timed again, one round
    through all of them at a time (alternating direction), and its rows are recomputed
    from the samples of all rounds.

    Why: on a shared machine the speed drifts over seconds to minutes. Timed in one
    block, a case takes whatever state the machine was in at that moment, and two runs
    of one commit disagree by more than either run's p20-p80 band. Spread over the run,
    each case's median sees the same mix of states as every other case's, and its band
    shows the drift. With ``fresh_processes`` each round runs in a new Python process
    (`round_worker`), so what one process's memory layout does to a case is one round
    of five, not the whole row. A round that fails or times out ends that case's
    rounds; the rows keep the rounds done, counted in ``rounds``."""
    cases = state.timed
    total = len(cases) * (state.rounds - 1)
    done = 0
    for r in range(2, state.rounds + 1):
        order = [tc for tc in (cases if r % 2 else cases[::-1])
                 if tc.rounds == r - 1]  # an earlier round of a case failed: no more
        skipped = sum(1 for tc in cases if tc.rounds < r - 1)
        done += skipped
        timed = _round_in_fresh_process if fresh_processes else _round_here
        for tc, more, error in timed(state, order, r, progress, done, total):
            done += 1
            if error is not None:
                note = f"timing round {r} failed, rows keep rounds 1-{r - 1}: {error}"
                for row in tc.rows.values():
                    row["message"] = "; ".join(filter(None, [row["message"], note]))
                continue
            for mode, xs in more.items():
                tc.samples[mode].extend(xs)
            tc.rounds = r
    # references first, so every row's speedup uses its reference's final median
    for tc in sorted(cases, key=lambda c: c.task.impl.kind != "reference"):
        for mode, row in tc.rows.items():
            _set_timing(state, row, tc.samples[mode], tc.rounds, tc.models[mode])
    if progress and total:
        progress(total, total, "timing rounds done")


def _case_name(tc: TimedCase) -> str:
    t = tc.task
    return f"{t.spec.name} {t.impl.name} {t.dtype} {t.spec.x_name}={t.n}"


def _round_here(state: RunState, order: list[TimedCase], r: int,
                progress: ProgressFn | None, done: int, total: int):
    """One round in this process: yields (case, samples, None) or (case, None, error)."""
    for k, tc in enumerate(order):
        if progress:
            progress(done + k, total, f"timing round {r}/{state.rounds}: {_case_name(tc)}")
        state.start_case()
        try:
            with state.limit():
                more = retime(tc.task.spec, tc.task.impl, tc.case, tc.options, tc.repeats,
                              tc.warmup)
        except Exception as exc:  # noqa: BLE001
            recover_memory(exc)
            yield tc, None, error_message(exc)
            continue
        yield tc, more, None


#: how `_round_in_fresh_process` starts a worker (a test points it elsewhere)
WORKER_COMMAND = (sys.executable, "-m", "lossreg.round_worker")


def _round_in_fresh_process(state: RunState, order: list[TimedCase], r: int,
                            progress: ProgressFn | None, done: int, total: int):
    """One round in a new `round_worker` process, yielding like `_round_here`. The
    worker finds each loss through the entry points; a case it cannot time, or every
    case it never reached (it crashed, was killed), fails this round only."""
    import os
    import tempfile

    from .round_worker import PREFIX

    if not order:
        return
    if progress:
        progress(done, total, f"timing round {r}/{state.rounds} in a fresh process: "
                 f"{_case_name(order[0])}")
    payload = {"device": state.device, "case_timeout": state.case_timeout, "cases": [
        {"loss": tc.task.spec.name, "impl": tc.task.impl.name, "dtype": tc.task.dtype,
         "n": tc.case.n, "seed": tc.case.seed, "params": tc.case.params,
         "options": tc.options, "repeats": tc.repeats,
         # a fresh process pays every lazy start-up (JIT, autotuning, library handles)
         # on its first call: never time that one
         "warmup": {mode: max(1, w) for mode, w in tc.warmup.items()}}
        for tc in order]}
    if measure.device_type(state.device) == "cuda":
        torch.cuda.empty_cache()  # the worker needs the memory this process keeps cached
    fd, path = tempfile.mkstemp(prefix="lossreg-round-", suffix=".pickle")
    reported = 0
    proc = None
    try:
        with os.fdopen(fd, "wb") as f:
            pickle.dump(payload, f)
        proc = subprocess.Popen([*WORKER_COMMAND, path], stdout=subprocess.PIPE, text=True)
        for line in proc.stdout:
            try:
                result = json.loads(line[len(PREFIX):]) if line.startswith(PREFIX) else None
                tc = order[result["i"]] if result is not None and (
                    "samples" in result or "error" in result) else None
            except (ValueError, KeyError, IndexError, TypeError):
                tc = None
            if tc is None:
                sys.stderr.write(line)  # the worker's own prints, passed on
                continue
            reported = result["i"] + 1
            if progress and reported < len(order):
                progress(done + reported, total, f"timing round {r}/{state.rounds} in a "
                         f"fresh process: {_case_name(order[reported])}")
            yield (tc, None, result["error"]) if "error" in result else \
                (tc, result["samples"], None)
        code = proc.wait()
        for tc in order[reported:]:
            yield tc, None, f"the round's worker process exited with code {code} before " \
                            "reaching this case"
    finally:
        if proc is not None and proc.poll() is None:  # Ctrl-C, or the caller stopped
            proc.kill()
            proc.wait()
        os.unlink(path)


def _skipped_rows(state: RunState, task: Task, reason: str, checks: Iterable[str]) -> list[dict]:
    rows = []
    for check in checks:
        row = base_row(state.context, task, dict(task.spec.options))
        row.update(check=check, mode="forward" if check == "correctness" else
                   ("backward" if check == "gradient" else "full"),
                   status="skipped", message=reason)
        rows.append(row)
    return rows


def execute(
    names: Sequence[str] | None = None, *, device: str = "auto",
    dtypes: Sequence[str] | None = None, impls: Sequence[str] | None = None,
    sizes: str = "quick", throughput: bool = False, out: str | Path | None = None,
    registry: Registry | None = None, progress: ProgressFn | None = None,
    case_timeout: float | None = None, rounds: int = 1, fresh_processes: bool | None = None,
):
    """Shared engine of `check` and `bench`. Returns (DataFrame, ResultWriter | None).

    ``rounds`` (with ``throughput``) splits each case's timing into that many rounds
    spread over the run (`run_rounds`); the throughput rows are written after the first
    and rewritten, with all rounds' samples, when the run is consolidated. Rounds 2..R
    run in fresh processes (``fresh_processes``) by default when ``registry`` is not
    given: a new process finds the same losses through the entry points, but not the
    losses of a registry built in this one.

    ``case_timeout`` (seconds) bounds each loss x impl x dtype x size case: past it
    the step running becomes an ``error`` row, the case's remaining steps too, and
    the run goes on. Ctrl-C raises `Interrupted` once the finished cases are saved."""
    import pandas as pd

    from .results import to_table

    if fresh_processes is None:
        fresh_processes = registry is None
    registry = registry or default_registry()
    device = measure.resolve_device(device)
    plan = make_plan(registry, names, device, dtypes, impls, sizes)
    context = run_context(device)
    writer = ResultWriter(out, context["run_id"]) if out is not None else None
    if case_timeout is not None and not case_timeout > 0:
        raise HarnessError(f"case_timeout must be a positive number of seconds, "
                           f"got {case_timeout!r}")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise HarnessError(f"rounds must be a whole number of at least 1, got {rounds!r}")
    state = RunState(context, device, writer, case_timeout=case_timeout, rounds=rounds)
    if throughput:
        if measure.device_type(device) == "cpu":
            measure.steady_cpu_allocator()
        state.peak_gbps = measure.copy_bandwidth_gbps(device)
    checks = ("correctness", "gradient") + (("throughput",) if throughput else ())

    def emit(rows: list[dict]) -> None:
        state.rows.extend(rows)
        if writer is not None:
            writer.write(rows)

    gradchecked: set[str] = set()
    edge_done: set[tuple] = set()
    current, i = "planning", 0
    try:
        for task, reason in plan.skipped:
            emit(_skipped_rows(state, task, reason, checks))
        for i, task in enumerate(plan.tasks):
            spec, impl = task.spec, task.impl
            current = f"{spec.name} {impl.name} {task.dtype} {spec.x_name}={task.n}"
            if progress:
                progress(i, len(plan.tasks), current)
            state.start_case()
            rows: list[dict] = []
            try:
                with state.limit():
                    if impl.kind == "reference" and spec.name not in gradchecked:
                        gradchecked.add(spec.name)
                        row = base_row(state.context, Task(spec, impl, "float64", 0), dict(spec.options))
                        row.update(check="gradient", mode="backward")
                        row = _guard(state, row, lambda: _verdict_row(
                            gradcheck_reference(spec, device), (None, None)))
                        row["rtol"] = row["atol"] = None
                        row["n"] = min(8, min(spec.sizes["quick"]))
                        rows.append(row)
                    if throughput and impl.uses_triton and \
                            measure.device_type(device) == "cpu":
                        # the interpreter at benchmark sizes takes minutes per case and times
                        # nothing; `lossreg check` covers these kernels at the quick sizes
                        emit(_skipped_rows(state, task, INTERPRETER_BENCH_SKIP, checks))
                        continue
                    if (spec.name, impl.name, task.dtype) not in edge_done:
                        edge_done.add((spec.name, impl.name, task.dtype))
                        rows += run_edge_cases(state, spec, impl, task.dtype)
                    rows += run_checks(state, task, all_options=not throughput or task.n == min(
                        spec.sizes[sizes]))
                    if throughput:
                        rows += run_throughput(state, task)
            except Exception as exc:  # noqa: BLE001 - outside any check: make_inputs, sizing
                row = base_row(state.context, task, dict(spec.options))
                row.update(check="correctness", mode="forward", status="error",
                           message=error_message(exc))
                rows.append(row)
                recover_memory(exc)
            emit(rows)
        if progress and plan.tasks:
            progress(len(plan.tasks), len(plan.tasks), "done")
        if state.timed:
            run_rounds(state, progress, fresh_processes)
        if writer is not None:  # the consolidated run carries the rows of all rounds
            writer.finish(state.rows)
    except KeyboardInterrupt as exc:
        location = writer.finish() if writer is not None else None
        raise Interrupted(current, i, len(plan.tasks), len(state.rows),
                          location or "memory (no --out given)") from exc
    finally:
        if writer is not None:
            writer.finish()
    df = to_table(state.rows).to_pandas() if state.rows else pd.DataFrame(columns=list(
        to_table([]).schema.names))
    return df, writer


def check(names: Sequence[str] | None = None, **kwargs):
    """Correctness and gradient rows (no timing) as a DataFrame."""
    kwargs.setdefault("sizes", "quick")
    df, _ = execute(names, throughput=False, **kwargs)
    return df


def bench(names: Sequence[str] | None = None, *, out: str | Path = "results", plots: bool = True,
          **kwargs):
    """Correctness, gradient and throughput rows, written under `out` as the run goes."""
    kwargs.setdefault("sizes", "default")
    kwargs.setdefault("rounds", DEFAULT_ROUNDS)
    df, writer = execute(names, throughput=True, out=out, **kwargs)
    if plots and len(df):
        from .plots import plot_run

        plot_run(df, Path(out) / "plots" / f"_{writer.run_id}")
    return df
