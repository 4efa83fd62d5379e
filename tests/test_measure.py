"""The measuring instruments themselves: CPU peak memory, timing, copy bandwidth."""

import pytest
import torch

from lossreg import measure


def test_cpu_peak_reports_known_allocation():
    n = 3_000_000

    def alloc():
        a = torch.ones(n, dtype=torch.float64)  # 24 MB, kept
        b = torch.ones(n // 2, dtype=torch.float32)  # 6 MB, freed before return
        del b
        return a

    peak = measure.cpu_peak_bytes(alloc)
    assert peak >= 8 * n + 4 * (n // 2)
    assert peak < 2 * (8 * n + 4 * (n // 2))


def test_cpu_peak_near_zero_without_allocation():
    x = torch.randn(1_000_000)
    assert measure.cpu_peak_bytes(lambda: x.mul_(1.0001)) < 64 * 1024


def test_cpu_peak_frees_do_not_go_negative():
    x = [torch.randn(1_000_000)]
    assert measure.cpu_peak_bytes(lambda: x.pop()) == 0


def test_time_calls_rotates_and_orders_quantiles():
    seen = []
    t = measure.time_calls("cpu", lambda i: (lambda: seen.append(i)), budget_s=0.01,
                           min_repeats=7, max_repeats=7, warmup=1)
    assert t.repeats == 7 and t.p20_ms <= t.median_ms <= t.p80_ms
    assert set(seen) >= {0, 1, 2, 3}


def test_time_calls_measures_sleep():
    import time

    t = measure.time_calls("cpu", lambda i: (lambda: time.sleep(0.004)), budget_s=0.01,
                           min_repeats=3, max_repeats=3, warmup=0)
    assert 3.5 < t.median_ms < 50


def test_copy_bandwidth_is_plausible():
    gbps = measure.copy_bandwidth_gbps("cpu", nbytes=1 << 24)
    assert 0.1 < gbps < 10_000


def test_resolve_device():
    assert measure.resolve_device("cpu") == "cpu"
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert measure.resolve_device("auto") == expected


def test_ctrl_c_inside_the_profiler_waits_until_it_has_stopped():
    """A KeyboardInterrupt raised inside torch's profiler crashed or hung `bench`: the
    measurement holds Ctrl-C and the case timeout's SIGALRM until the profiler is out."""
    import os
    import signal

    seen = []

    def fn():
        os.kill(os.getpid(), signal.SIGINT)
        seen.append("after the signal")  # nothing was raised in here
        return torch.ones(1000) * 2

    # Python's own Ctrl-C handler, whatever this process inherited
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            measure.cpu_peak_bytes(fn)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)
    assert seen == ["after the signal"]
    # the profiler is usable again
    assert measure.cpu_peak_bytes(lambda: torch.ones(1 << 16)) >= 4 * (1 << 16)


def test_a_held_alarm_reaches_its_own_handler_afterwards():
    import signal

    class Late(Exception):
        pass

    def on_alarm(signum, frame):
        raise Late

    previous = signal.signal(signal.SIGALRM, on_alarm)
    try:
        with pytest.raises(Late):
            with measure._signals_held(signal.SIGINT, signal.SIGALRM):
                signal.raise_signal(signal.SIGALRM)
                inside = True
        assert inside
        assert signal.getsignal(signal.SIGALRM) is on_alarm
    finally:
        signal.signal(signal.SIGALRM, previous)
