"""What keeps two `lossreg bench` runs of one commit in agreement: timing rounds (every
case timed again in later rounds spread over the run, its rows computed from the
samples of all rounds) and, on a CPU, one fixed malloc path."""

from __future__ import annotations

import platform
import time

import pandas as pd
import pytest
from click.testing import CliRunner

from lossreg import measure
from lossreg.cli import main
from lossreg.harness import HarnessError, Interrupted, execute
from lossreg.registry import Registry
from lossreg.spec import Impl, LossSpec


def _ref(input, target, reduction="mean"):
    t = (input - target) ** 2
    return t if reduction == "none" else (t.mean() if reduction == "mean" else t.sum())


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


class Phase:
    """Tells an implementation whether the first pass or a later round is running: the
    progress callback hears 'timing round' once the later rounds begin."""

    def __init__(self):
        self.later = False
        self.raise_in_round = None

    def __call__(self, done, total, msg):
        if msg.startswith("timing round"):
            self.later = True
            if self.raise_in_round and msg.startswith(f"timing round {self.raise_in_round}/"):
                raise KeyboardInterrupt


def test_time_calls_with_fixed_repeats_makes_exactly_those_calls():
    calls = []
    t = measure.time_calls("cpu", lambda i: (lambda: calls.append(i)), warmup=2, repeats=7)
    assert t.repeats == len(t.samples) == 7
    assert calls == list(range(2)) + list(range(1, 8))  # warm-up, then no calibration call
    with pytest.raises(ValueError, match="repeats must be at least 1"):
        measure.time_calls("cpu", lambda i: (lambda: None), repeats=0)


def test_rows_come_from_all_rounds(tmp_path):
    """Slow in the first pass, fast in the later rounds: the kept median is the later
    rounds' (2 of 3 rounds, equal sample counts) and the p20-p80 band spans both speeds."""
    phase = Phase()

    def drifting(input, target, reduction="mean"):
        time.sleep(0.0005 if phase.later else 0.004)
        return _ref(input, target, reduction)

    df, writer = execute(["sq"], device="cpu", registry=_registry(drifting=drifting),
                         throughput=True, out=tmp_path, rounds=3, progress=phase)
    t = _throughput(df).loc["drifting"]
    assert set(t["rounds"]) == {3}
    fwd = t.loc["forward"]
    # a one-block timing would have said ~4 ms
    assert fwd.time_ms_p20 < fwd.time_ms < 2 < 3.5 < fwd.time_ms_p80, fwd
    assert (t["repeats"] % 3 == 0).all()  # every round repeats the first round's count
    # the consolidated file carries the recomputed rows, nothing else changed
    on_disk = pd.read_parquet(writer.location)
    assert len(on_disk) == len(df)
    pd.testing.assert_frame_equal(
        _throughput(on_disk)[["time_ms", "time_ms_p80", "repeats", "rounds", "speedup"]],
        _throughput(df)[["time_ms", "time_ms_p80", "repeats", "rounds", "speedup"]])
    assert not (tmp_path / writer.run_id).exists()  # the parts are gone once consolidated


def test_speedup_uses_the_references_final_median(tmp_path):
    phase = Phase()

    def ref_drifting(input, target, reduction="mean"):
        time.sleep(0.0005 if phase.later else 0.004)
        return _ref(input, target, reduction)

    reg = _registry(same=_ref)
    reg.losses["sq"].reference = ref_drifting
    df, _ = execute(["sq"], device="cpu", registry=reg, throughput=True, rounds=3,
                    progress=phase)
    t = _throughput(df)
    for mode in ("forward", "full"):
        ref_ms = t.loc[("reference", mode), "time_ms"]
        same = t.loc[("same", mode)]
        assert same.speedup == pytest.approx(ref_ms / same.time_ms)


def test_a_failing_later_round_keeps_the_earlier_rounds(tmp_path):
    phase = Phase()

    def flaky(input, target, reduction="mean"):
        if phase.later:
            raise RuntimeError("device lost")
        return _ref(input, target, reduction)

    df, _ = execute(["sq"], device="cpu", registry=_registry(flaky=flaky, good=_ref),
                    throughput=True, out=tmp_path, rounds=4, progress=phase)
    t = _throughput(df)
    assert set(t.loc["flaky"]["rounds"]) == {1}
    assert t.loc["flaky"]["message"].str.contains("timing round 2 failed.*device lost").all()
    assert set(t.loc["good"]["rounds"]) == {4}  # the other cases went on
    assert t.loc["good"]["message"].isna().all()


def test_ctrl_c_in_a_later_round_keeps_every_row_of_the_first_pass(tmp_path):
    phase = Phase()
    phase.raise_in_round = 3
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


def test_bench_on_cpu_fixes_the_allocator_and_check_leaves_it(monkeypatch):
    calls = []
    monkeypatch.setattr(measure, "steady_cpu_allocator", lambda: calls.append(1) or True)
    execute(["sq"], device="cpu", registry=_registry(), throughput=False)
    assert calls == []
    execute(["sq"], device="cpu", registry=_registry(), throughput=True, rounds=1)
    assert calls == [1]


def test_only_the_timed_calls_run_heap_only(monkeypatch):
    """Each mode of each round is timed inside measure.heap_only; nothing else is."""
    import contextlib

    inside = []
    calls = []

    @contextlib.contextmanager
    def recording():
        inside.append(True)
        try:
            yield
        finally:
            inside.pop()

    def impl(input, target, reduction="mean"):
        calls.append(bool(inside))
        return _ref(input, target, reduction)

    monkeypatch.setattr(measure, "heap_only", recording)
    df, _ = execute(["sq"], device="cpu", registry=_registry(probe=impl), throughput=True,
                    rounds=2)
    timed = _throughput(df).loc["probe"]
    assert len(timed) == 3 and set(timed["rounds"]) == {2}
    assert any(calls) and not all(calls)  # checks ran outside, timing inside
    assert calls.count(True) >= 2 * 3 * 2  # 3 modes x 2 rounds x (warm-up + samples)
    assert not inside  # every heap_only block was left


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
