"""What a worker process runs: one case (edge cases, correctness and gradient checks
against the float64 reference, the first timing round) or a later timing round of one.

`init` and `handle` are what `workers.Pool` runs in the worker. Each check's row is
sent to the parent as soon as it is done, after a message naming the check about to
run: a worker that dies or runs out of time loses only the check in progress, and
the parent knows which one that was. Rows carry no run context (the parent adds it)
and a ``_seconds`` entry, the wall time of the check (the parent's ``case_seconds``).
"""

from __future__ import annotations

import gc
import os
import time
from typing import Any, Callable

import torch

from . import measure, timing
from .planning import Task
from .rows import base_row, error_message
from .spec import DTYPES, Case, LossSpec, UnsupportedOption
from .verify import (check_forward, check_gradient, fold, gradcheck_reference,
                     gradcheck_size, verdict_row)

SEEDS = (0, 1, 2)
#: Checks run only where the inputs in float64 stay under this (the reference and its
#: gradients hold several such copies); larger sizes are timed, and checked smaller.
CHECK_BYTES_MAX = 4 << 30
#: ... and where the float64 reference's modelled fwd+bwd flops stay under this.
CHECK_FLOPS_MAX = {"cpu": 1e11, "cuda": 1e14}


def init(specs: dict[str, LossSpec], device: str, limits: dict | None = None):
    """A worker's set-up: the losses it may run, its device (CUDA is initialised here,
    in the worker), the CPU allocator path timings use."""
    if measure.device_type(device) == "cpu":
        measure.steady_cpu_allocator()
    state = {"specs": specs, "device": device, "limits": dict(limits or {})}
    return state, {"pid": os.getpid(), "device_name": measure.device_name(device)}


def handle(state: dict, job: dict, send: Callable[[Any], None]):
    kind = job["kind"]
    if kind == "bandwidth":
        return measure.copy_bandwidth_gbps(state["device"])
    spec = state["specs"][job["loss"]]
    task = Task(spec, spec.implementations[job["impl"]], job["dtype"], job["n"], job["preset"])
    if kind == "round":
        case = Case(task.n, DTYPES[task.dtype], state["device"], seed=job["seed"],
                    params=job["params"])
        t0 = time.monotonic()
        samples = timing.later_round(spec, task.impl, case, job["options"], job["repeats"],
                                     job["warmup"])
        return {"samples": samples, "seconds": time.monotonic() - t0}
    run_case(state, task, job, send)
    return None


def recover_memory(exc: BaseException) -> None:
    """After an out-of-memory error, free what the failed check held so the next one
    starts from a clean allocator (CUDA: cached blocks and peak statistics)."""
    oom = isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc))
    if not oom:
        return
    exc.__traceback__ = None  # frames of the failed check hold its tensors
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _guarded(send, row: dict, fn: Callable[[], dict]) -> dict:
    """Run one check: announce it, fill its row (ok/fail, skipped for an option the
    implementation cannot express, error for an exception), send the row."""
    send(("step", row["check"], row["mode"], row["params"]))
    t0 = time.monotonic()
    try:
        row.update(fn())
    except UnsupportedOption as exc:
        row.update(status="skipped", message=str(exc))
    except Exception as exc:  # noqa: BLE001 - one failing check is one error row
        row.update(status="error", message=error_message(exc))
        recover_memory(exc)
    row["_seconds"] = time.monotonic() - t0
    send(("rows", [row]))
    return row


def throughput_only_size(spec: LossSpec, task: Task, dtype: torch.dtype,
                         device: str = "cpu", limits: dict | None = None) -> bool:
    """Inputs too large for the float64 reference (several copies of them in float64),
    or, where the spec models flops, too much float64 work for the device. Input
    bytes and flops are extrapolated from n = 1 and n = 2 (some inputs do not grow
    with n)."""
    limits = limits or {}

    def probe(n):
        inputs = spec.make_inputs(Case(n, dtype, "cpu", seed=0,
                                       params=spec.case_params(task.preset, spec.options)))
        nbytes = sum(t.numel() * 8 for t in inputs.values() if torch.is_tensor(t))
        return nbytes, spec.model("flops", inputs, "full") or 0.0

    (b1, f1), (b2, f2) = probe(1), probe(2)
    too_big = b1 + (b2 - b1) * (task.n - 1) > limits.get("check_bytes_max", CHECK_BYTES_MAX)
    too_slow = f1 + (f2 - f1) * (task.n - 1) > CHECK_FLOPS_MAX[measure.device_type(device)]
    return too_big or too_slow


def run_case(state: dict, task: Task, job: dict, send) -> None:
    if job.get("checks", True):
        run_all_checks(state, task, job, send)
    if job.get("throughput"):
        run_first_round(state, task, job["rounds"], send)


def run_all_checks(state: dict, task: Task, job: dict, send) -> None:
    """The reference's gradcheck (once per loss), the edge cases (once per loss x
    implementation x dtype), correctness and gradient at each option set."""
    spec, impl, device = task.spec, task.impl, state["device"]
    if job.get("gradcheck"):
        row = base_row({}, Task(spec, impl, "float64", gradcheck_size(spec)),
                       dict(spec.options))
        row.update(check="gradient", mode="backward", _own=True)
        _guarded(send, row, lambda: {**verdict_row(gradcheck_reference(spec, device),
                                                   (None, None))})
    if job.get("edges"):
        run_edge_cases(state, task, send)
    run_checks(state, task, job["all_options"], send)


def run_edge_cases(state: dict, task: Task, send) -> None:
    spec, impl, device = task.spec, task.impl, state["device"]
    dt = DTYPES[task.dtype]
    tol = spec.tolerance(task.dtype)
    for name, make in spec.edge_cases.items():
        row = base_row({}, Task(spec, impl, task.dtype, 0), {**spec.options, "edge_case": name})
        row.update(check="correctness", mode="forward", _own=True)

        def run(make=make, row=row):
            inputs = make(Case(1, dt, device, seed=11,
                               params=spec.case_params("quick", spec.options)))
            row["n"] = next(v.numel() for v in inputs.values() if torch.is_tensor(v))
            opts = dict(spec.options)
            return fold([("forward", check_forward(spec, impl, inputs, opts, tol)),
                         ("gradient", check_gradient(spec, impl, inputs, opts, tol, 1))], tol)

        _guarded(send, row, run)


def run_checks(state: dict, task: Task, all_options: bool, send) -> None:
    spec, impl, device = task.spec, task.impl, state["device"]
    dt = DTYPES[task.dtype]
    tol = spec.tolerance(task.dtype)
    for options in (spec.option_sets() if all_options else [dict(spec.options)]):
        if throughput_only_size(spec, task, dt, device, state["limits"]):
            limit = state["limits"].get("check_bytes_max", CHECK_BYTES_MAX)
            rows = []
            for check, mode in (("correctness", "forward"), ("gradient", "backward")):
                row = base_row({}, task, options)
                row.update(check=check, mode=mode, status="skipped",
                           message="float64 reference too large or slow at this size "
                                   f"(over {limit / 2**30:g} GiB of inputs or "
                                   f"{CHECK_FLOPS_MAX[measure.device_type(device)]:.0e} "
                                   "flops): checked at the smaller sizes")
                rows.append(row)
            send(("rows", rows))
            return
        params = spec.case_params(task.preset, options)
        inputs = [spec.make_inputs(Case(task.n, dt, device, seed=s, params=params))
                  for s in SEEDS]

        def forward(options=options, inputs=inputs):
            return fold([(f"seed {s}", check_forward(spec, impl, inp, options, tol))
                         for s, inp in zip(SEEDS, inputs)], tol)

        def gradient(options=options, inputs=inputs):
            return fold([(f"seed {s}", check_gradient(spec, impl, inp, options, tol, s))
                         for s, inp in zip(SEEDS, inputs)], tol)

        for check, mode, fn in (("correctness", "forward", forward),
                                ("gradient", "backward", gradient)):
            row = base_row({}, task, options)
            row.update(check=check, mode=mode)
            _guarded(send, row, fn)


def run_first_round(state: dict, task: Task, rounds: int, send) -> None:
    """The first timing round; sends ``("timed", {mode: measurement}, seconds)`` or an
    error row."""
    spec, impl = task.spec, task.impl
    options = dict(spec.options)
    send(("step", "throughput", "full", None))
    t0 = time.monotonic()
    try:
        case = Case(task.n, DTYPES[task.dtype], state["device"], seed=100,
                    params=spec.case_params(task.preset, options))
        measured = timing.first_round(spec, impl, case, options, rounds=rounds)
    except Exception as exc:  # noqa: BLE001
        # inputs the implementation cannot express are skipped, as in the checks
        unsupported = isinstance(exc, UnsupportedOption)
        row = base_row({}, task, options)
        row.update(check="throughput", mode="full",
                   status="skipped" if unsupported else "error",
                   message=str(exc) if unsupported else error_message(exc),
                   _seconds=time.monotonic() - t0)
        recover_memory(exc)
        send(("rows", [row]))
        return
    send(("timed", {"measured": measured, "seed": 100, "params": case.params,
                    "options": options, "seconds": time.monotonic() - t0}))
