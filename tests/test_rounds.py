"""What keeps two `lossreg bench` runs of one commit in agreement: timing rounds (every
case timed again in later rounds spread over the run, each round in a fresh worker
process, its rows computed from the samples of all rounds) and, on a CPU, one fixed
malloc path."""

from __future__ import annotations

import os
import platform
import signal
import time

import pandas as pd
import pytest
from click.testing import CliRunner

from lossreg import measure
from lossreg.cli import main
from lossreg.planning import HarnessError
from lossreg.registry import Registry
from lossreg.runner import Interrupted, execute
from lossreg.spec import Impl, LossSpec

PHASE = "LOSSREG_TEST_PHASE_FILE"  # exists once the later rounds began
PIDS = "LOSSREG_TEST_PID_FILE"  # the implementations append their process id here


def _ref(input, target, reduction="mean"):
    t = (input - target) ** 2
    return t if reduction == "none" else (t.mean() if reduction == "mean" else t.sum())


def _later() -> bool:
    return os.path.exists(os.environ[PHASE])


def _drifting(input, target, reduction="mean"):
    time.sleep(0.001 if _later() else 0.02)
    return _ref(input, target, reduction)


def _flaky(input, target, reduction="mean"):
    if _later():
        raise RuntimeError("device lost")
    return _ref(input, target, reduction)


def _crashes_later(input, target, reduction="mean"):
    if _later():
        os.kill(os.getpid(), signal.SIGSEGV)
    return _ref(input, target, reduction)


def _logs_pid(input, target, reduction="mean"):
    with open(os.environ[PIDS], "a") as f:
        f.write(f"{os.getpid()}\n")
    return _ref(input, target, reduction)


def _registry(**impls) -> Registry:
    spec = LossSpec(name="sq", family="t", formula="x^2", reference=_ref,
                    make_inputs=lambda c: {"input": c.randn(c.n), "target": c.randn(c.n)},
                    sizes={"quick": [67], "default": [67], "large": [67]})
    reg = Registry()
    reg.losses["sq"] = spec
    for name, fn in impls.items():
        spec.implementations[name] = Impl(name, fn, plugin="test")
    return reg


def _throughput(df: pd.DataFrame) -> pd.DataFrame:
    return df[(df.check == "throughput") & (df.status == "ok")].set_index(["impl", "mode"])


@pytest.fixture
def phase(tmp_path, monkeypatch):
    """A progress display that marks (with a file the workers see) when the later
    timing rounds begin, and can raise Ctrl-C at the start of round ``interrupt_at``."""
    marker = tmp_path / "later"
    monkeypatch.setenv(PHASE, str(marker))

    class Phase:
        interrupt_at = None
        total = None

        def __call__(self, total):
            Phase.total = total
            return self

        def case_started(self, name):
            if name.startswith("timing round"):
                marker.touch()
                if self.interrupt_at and name.startswith(f"timing round {self.interrupt_at}/"):
                    raise KeyboardInterrupt

        def case_done(self, name, status):
            pass

        def close(self):
            pass

    return Phase()


def test_time_calls_with_fixed_repeats_makes_exactly_those_calls():
    calls = []
    t = measure.time_calls("cpu", lambda i: (lambda: calls.append(i)), warmup=2, repeats=7)
    assert t.repeats == len(t.samples) == 7
    assert calls == list(range(2)) + list(range(1, 8))  # warm-up, then no calibration call
    with pytest.raises(ValueError, match="repeats must be at least 1"):
        measure.time_calls("cpu", lambda i: (lambda: None), repeats=0)


@pytest.mark.parametrize("call_ms, expected", [(10, 3), (45, 2), (120, 1)])
def test_short_calls_get_more_samples_where_they_fit(call_ms, expected):
    """cheap_min=(3, 0.1 s): three repeats for a 10 ms call, as many as fit for a 45 ms
    one, and the plain floor of one for a call longer than the 0.1 s."""
    t = measure.time_calls("cpu", lambda i: (lambda: time.sleep(call_ms / 1e3)),
                           budget_s=0.001, min_repeats=1, warmup=0, cheap_min=(3, 0.1))
    assert t.repeats == expected
    plain = measure.time_calls("cpu", lambda i: (lambda: time.sleep(0.01)), budget_s=0.001,
                               min_repeats=1, warmup=0)
    assert plain.repeats == 1


def test_rows_come_from_all_rounds_each_in_a_fresh_worker(tmp_path, phase, monkeypatch):
    """Slow in the first pass, fast in the later rounds: the kept median is the later
    rounds' (2 of 3 rounds, equal sample counts) and the p20-p80 band spans both speeds.
    Every round ran in its own worker process, none in this one."""
    pids = tmp_path / "pids"
    monkeypatch.setenv(PIDS, str(pids))
    df, writer = execute(["sq"], device="cpu", registry=_registry(drifting=_drifting,
                                                                  logger=_logs_pid),
                         throughput=True, out=tmp_path / "out", rounds=3, progress=phase)
    assert phase.total == 3 * 3  # three cases, three rounds: one counter for the whole run
    t = _throughput(df).loc["drifting"]
    assert set(t["rounds"]) == {3}
    fwd = t.loc["forward"]
    # a one-block timing would have said ~20 ms (a busy machine stretches the 1 ms sleep)
    assert fwd.time_ms_p20 <= fwd.time_ms < 10 < 18 < fwd.time_ms_p80, fwd
    assert (t["repeats"] % 3 == 0).all()  # every round repeats the first round's count
    seen = set(pids.read_text().split())
    assert len(seen) == 3 and str(os.getpid()) not in seen  # first pass + two rounds
    # the consolidated file carries the recomputed rows, nothing else changed
    on_disk = pd.read_parquet(writer.location)
    assert len(on_disk) == len(df)
    cols = ["time_ms", "time_ms_p80", "repeats", "rounds", "speedup", "case_seconds"]
    pd.testing.assert_frame_equal(_throughput(on_disk)[cols], _throughput(df)[cols])
    assert (_throughput(df)["case_seconds"] > 0).all()
    assert not (tmp_path / "out" / writer.run_id).exists()  # parts gone once consolidated
    # speedups use the reference's final median
    ref = _throughput(df).loc["reference"]
    assert t["speedup"].to_numpy() == pytest.approx(
        (ref.loc[t.index, "time_ms"] / t["time_ms"]).to_numpy())


def test_a_failing_or_crashing_later_round_keeps_the_earlier_rounds(phase):
    df, _ = execute(["sq"], device="cpu", throughput=True, rounds=3, progress=phase,
                    registry=_registry(flaky=_flaky, crashes=_crashes_later, good=_ref))
    t = _throughput(df)
    assert set(t.loc["flaky"]["rounds"]) == {1} and set(t.loc["crashes"]["rounds"]) == {1}
    assert t.loc["flaky"]["message"].str.contains("timing round 2 failed.*device lost").all()
    assert t.loc["crashes"]["message"].str.contains(
        "timing round 2 failed, rows keep rounds 1-1: killed by SIGSEGV").all()
    assert set(t.loc["good"]["rounds"]) == {3}  # the other cases went on
    assert t.loc["good"]["message"].isna().all()


def test_ctrl_c_in_a_later_round_keeps_every_row_of_the_first_pass(tmp_path, phase):
    phase.interrupt_at = 3
    with pytest.raises(Interrupted) as info:
        execute(["sq"], device="cpu", registry=_registry(good=_ref), throughput=True,
                out=tmp_path, rounds=4, progress=phase)
    df = pd.read_parquet(info.value.location)
    t = _throughput(df)
    assert len(t) == 6 and set(t["rounds"]) == {1}  # reference and good, three modes each
    assert t["time_ms"].gt(0).all()


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "3"])
def test_rounds_must_be_a_positive_whole_number(bad):
    with pytest.raises(HarnessError, match="rounds must be a whole number"):
        execute(["sq"], device="cpu", registry=_registry(), throughput=True, rounds=bad)


def test_cli_rejects_zero_rounds(tmp_path):
    res = CliRunner().invoke(main, ["bench", "mse", "--device", "cpu", "--rounds", "0",
                                    "--out", str(tmp_path)])
    assert res.exit_code == 2 and "--rounds" in res.output
    assert not list(tmp_path.iterdir())  # nothing ran, nothing written


def test_malloc_threshold_is_accepted_on_glibc():
    # mallopt returns 0 for a parameter or value it refuses: this fails if ours is one
    assert measure.steady_cpu_allocator() is (platform.system() == "Linux"
                                              and platform.libc_ver()[0] == "glibc")


def test_heap_only_restores_mmap_and_trims(monkeypatch):
    seen = []

    class FakeLibc:
        def mallopt(self, param, value):
            seen.append(("mallopt", param, value))
            return 1

        def malloc_trim(self, pad):
            seen.append(("trim", pad))
            return 1

    monkeypatch.setattr(measure, "_glibc", lambda: FakeLibc())
    with measure.heap_only():
        assert seen == [("mallopt", -4, 0)]
    assert seen[1:] == [("mallopt", -4, 65536), ("trim", 0)]
