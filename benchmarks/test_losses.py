"""Forward, backward and fwd+bwd time of each loss x implementation x dtype x size of
the registry, timed by pytest-benchmark. The cases, options and Parquet export are in
conftest.py; inputs and the timed closures are the harness's (`lossreg bench`)."""

from __future__ import annotations

import itertools
import time

import pytest
import torch

from lossreg import measure, timing
from lossreg.spec import DTYPES, Case

#: Rounds per benchmark: what fills --benchmark-max-time, within
#: [--benchmark-min-rounds, MAX_ROUNDS] (calls of a few microseconds would otherwise
#: take a million rounds at the default max time of one second).
MAX_ROUNDS = 10_000


def _warm_up(run, device: str, calls: int) -> float:
    """Run `calls` untimed rounds; the last one's seconds estimate a round."""
    elapsed = 0.0
    for i in range(calls):
        fn = run(i)
        measure.synchronize(device)
        t0 = time.perf_counter()
        fn()
        measure.synchronize(device)
        elapsed = time.perf_counter() - t0
    return elapsed


def test_throughput(benchmark, lossreg_case, lossreg_session, pytestconfig):
    case, session = lossreg_case, lossreg_session
    task, device = case.task, session.device
    spec, impl = task.spec, task.impl
    benchmark.group = f"{spec.name} {task.dtype} {spec.x_name}={task.n} {case.mode}"
    benchmark.extra_info.update(
        loss=spec.name, impl=impl.name, dtype=task.dtype, n=task.n, mode=case.mode,
        device=device, x_name=spec.x_name, impl_kind=impl.kind, backend=impl.backend,
        sizes=task.preset,
    )
    if case.skip:
        session.record_skip(case, case.skip)
        pytest.skip(case.skip)
    try:
        options = dict(spec.options)
        inputs, runs = timing.throughput_runs(spec, impl, Case(
            task.n, DTYPES[task.dtype], device, seed=100,
            params=spec.case_params(task.preset, options)), options)
        run = runs.get(case.mode)
        if run is None:
            reason = "no inputs take gradients: forward only"
            session.record_skip(case, reason)
            pytest.skip(reason)

        warmup = 3 if impl.backend in ("compile", "triton") else 2  # as the harness
        per_round = _warm_up(run, device, warmup)
        min_rounds = int(pytestconfig.getoption("benchmark_min_rounds"))
        max_time = float(pytestconfig.getoption("benchmark_max_time"))
        rounds = max(min_rounds, min(MAX_ROUNDS, int(max_time / max(per_round, 1e-7))))
        counter = itertools.count(warmup)

        def setup():  # untimed: round i's inputs (and forward), then the device is idle
            fn = run(next(counter))
            measure.synchronize(device)
            return (fn,), {}

        if measure.device_type(device) == "cuda":
            def timed(fn):
                fn()
                torch.cuda.synchronize(device)
        else:
            def timed(fn):
                fn()

        benchmark.pedantic(timed, setup=setup, rounds=rounds, warmup_rounds=0)
        if benchmark.stats is None:  # --benchmark-disable: one call, nothing measured
            return
        peak = measure.peak_bytes(device, run(0)) if session.out is not None else None
        session.record(case, list(benchmark.stats.stats.data), inputs, peak)
    except Exception as exc:  # recorded as an error row, and the test fails
        session.record_error(case, exc)
        raise
