"""lossreg.progress: one bar on a terminal, a line per case (and a heartbeat) elsewhere."""

from __future__ import annotations

import io
import re

import pytest

from lossreg.progress import Progress, format_duration


class FakeClock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_format_duration():
    assert format_duration(0) == "0s"
    assert format_duration(44.6) == "45s"
    assert format_duration(187) == "3m07s"
    assert format_duration(3720) == "1h02m"
    assert format_duration(None) == "?"
    assert format_duration(float("nan")) == "?"


def test_pipe_one_line_per_case_with_status_elapsed_and_eta():
    out, clock = io.StringIO(), FakeClock()
    p = Progress(4, stream=out, label="bench", clock=clock, ticker=False)
    clock.t += 10
    p.case_done("mse reference float32 n=4096", "ok")
    clock.t += 20
    p.case_done("mse torch float32 n=4096", "fail")
    p.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("bench: [1/4] ok")
    assert "mse reference float32 n=4096" in lines[0]
    assert "elapsed 10s" in lines[0] and "ETA 30s" in lines[0]  # 10 s a case, 3 left
    assert lines[1].startswith("bench: [2/4] fail")
    assert "elapsed 30s" in lines[1] and "ETA 30s" in lines[1]  # 15 s a case, 2 left


def test_pipe_heartbeat_names_the_running_case_only_after_the_interval():
    out, clock = io.StringIO(), FakeClock()
    p = Progress(3, stream=out, clock=clock, heartbeat=30, ticker=False)
    p.case_started("cross_entropy reference float32 tokens=2048")
    clock.t += 29
    assert not p.tick()
    clock.t += 2
    assert p.tick()
    clock.t += 10
    assert not p.tick()  # the last line is 10 s old
    clock.t += 25
    assert p.tick()
    p.close()
    assert not p.tick()  # closed: silent
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert "running cross_entropy reference float32 tokens=2048 for 31s" in lines[0]
    assert "for 1m06s" in lines[1]
    assert "[0/3]" in lines[1] and "ETA ?" in lines[1]


def test_pipe_heartbeat_counts_from_the_last_case_line():
    out, clock = io.StringIO(), FakeClock()
    p = Progress(2, stream=out, clock=clock, heartbeat=30, ticker=False)
    clock.t += 25
    p.case_done("a", "ok")
    clock.t += 20  # 45 s since start, 20 s since the last line
    assert not p.tick()
    clock.t += 11
    assert p.tick()
    assert out.getvalue().splitlines()[-1].startswith("[1/2] working")


def test_pipe_ticker_thread_starts_and_stops():
    out = io.StringIO()
    p = Progress(1, stream=out)
    assert p._thread is not None and p._thread.is_alive()
    p.close()
    assert not p._thread.is_alive()
    p.close()  # twice is fine


def test_tty_one_bar_that_never_restarts():
    out, clock = FakeTTY(), FakeClock()
    p = Progress(6, stream=out, label="bench", clock=clock)
    assert p.tty and p._thread is None
    for k in range(6):
        clock.t += 5
        p.case_started(f"case {k}")
        p.case_done(f"case {k}", "ok")
    p.close()
    text = out.getvalue()
    counts = [int(m) for m in re.findall(r"\b(\d+)/6\b", text)]
    assert counts, text
    assert counts == sorted(counts), f"the counter went back: {counts}"
    assert counts[-1] == 6 and "100%" in text
    assert "elapsed" in text and "ETA" in text
    assert "00:30" in text  # 6 cases x 5 s on the injected clock
    assert text.count("\n") <= 1  # one bar redrawn in place, not a line per case


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="total"):
        Progress(-1, stream=io.StringIO(), ticker=False)
    with pytest.raises(ValueError, match="heartbeat"):
        Progress(1, stream=io.StringIO(), heartbeat=0, ticker=False)
    p = Progress(1, stream=io.StringIO(), ticker=False)
    p.close()
    with pytest.raises(RuntimeError, match="after close"):
        p.case_done("x", "ok")
