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


# ------------------------------------------------- later rounds in fresh processes
def _recording_worker(monkeypatch, log, exit_code=None):
    """Point the harness at a worker that appends its pid to ``log`` first; with
    ``exit_code`` it then exits without timing anything."""
    import sys

    from lossreg import harness

    body = (f"import os, sys, runpy; open({str(log)!r}, 'a').write(f'{{os.getpid()}}\\n'); "
            + (f"sys.exit({exit_code})" if exit_code is not None else
               "sys.argv = ['round_worker'] + sys.argv[1:]; "
               "runpy.run_module('lossreg.round_worker', run_name='__main__')"))
    monkeypatch.setattr(harness, "WORKER_COMMAND", (sys.executable, "-c", body))


def _no_payload_left(monkeypatch, tmp_path):
    import tempfile

    where = tmp_path / "tmp"
    where.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(where))
    return where


def test_later_rounds_of_the_default_registry_run_in_fresh_processes(tmp_path, monkeypatch):
    import os

    from lossreg import harness

    def not_here(*a, **k):
        raise AssertionError("a later round ran in the bench process")

    monkeypatch.setattr(harness, "_round_here", not_here)
    log = tmp_path / "pids"
    _recording_worker(monkeypatch, log)
    temp = _no_payload_left(monkeypatch, tmp_path)
    df, writer = execute(["mse"], device="cpu", sizes="quick", throughput=True,
                         out=tmp_path / "out", rounds=3)
    pids = log.read_text().split()
    assert len(pids) == 2 and len(set(pids)) == 2 and str(os.getpid()) not in pids
    t = df[(df.check == "throughput") & (df.status == "ok")]
    assert len(t) >= 6 and set(t["rounds"]) == {3}, t[["impl", "n", "mode", "rounds"]]
    assert t["message"].isna().all()
    assert (t["repeats"] % 3 == 0).all()  # each worker repeated the first pass's count
    ref = t[t.impl == "reference"].set_index(["n", "mode"])["time_ms"]
    torch_rows = t[t.impl == "torch"].set_index(["n", "mode"])
    assert torch_rows["speedup"].to_numpy() == pytest.approx(
        (ref.loc[torch_rows.index] / torch_rows["time_ms"]).to_numpy())
    on_disk = pd.read_parquet(writer.location)
    assert set(on_disk[on_disk.check == "throughput"]["rounds"].dropna()) == {3}
    assert not list(temp.iterdir())  # the payload files are removed


def test_a_worker_that_dies_fails_its_round_and_the_run_goes_on(tmp_path, monkeypatch):
    log = tmp_path / "pids"
    _recording_worker(monkeypatch, log, exit_code=3)
    temp = _no_payload_left(monkeypatch, tmp_path)
    df, _ = execute(["mse"], device="cpu", sizes="quick", impls=["torch"], throughput=True,
                    rounds=3)
    assert len(log.read_text().split()) == 1  # no round 3 for cases whose round 2 failed
    t = df[(df.check == "throughput") & (df.status == "ok")]
    assert len(t) >= 3 and set(t["rounds"]) == {1}
    assert t["message"].str.fullmatch(
        "timing round 2 failed, rows keep rounds 1-1: the round's worker process exited "
        "with code 3 before reaching this case").all(), t["message"].tolist()
    assert t["time_ms"].gt(0).all()
    assert not list(temp.iterdir())


def test_ctrl_c_during_a_worker_round_stops_the_worker(tmp_path, monkeypatch):
    import os

    log = tmp_path / "pids"
    _recording_worker(monkeypatch, log)
    temp = _no_payload_left(monkeypatch, tmp_path)
    heard = []

    def progress(done, total, msg):
        heard.append(msg)
        # the worker has reported one case and is timing the next
        if sum("in a fresh process" in m for m in heard) == 2:
            raise KeyboardInterrupt

    with pytest.raises(Interrupted) as info:
        execute(["mse"], device="cpu", sizes="quick", throughput=True, out=tmp_path / "out",
                rounds=3, progress=progress)
    (pid,) = log.read_text().split()
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid), 0)  # killed and reaped, not left running
    t = pd.read_parquet(info.value.location)
    t = t[(t.check == "throughput") & (t.status == "ok")]
    assert len(t) >= 6 and set(t["rounds"]) == {1}
    assert not list(temp.iterdir())


def test_worker_times_what_it_can_and_names_what_it_cannot():
    import json

    from lossreg import round_worker

    case = {"n": 1000, "dtype": "float32", "seed": 100, "params": {}, "options": {},
            "repeats": {"forward": 4, "full": 2}, "warmup": {"forward": 1, "full": 0}}
    lines = []
    round_worker.run({"device": "cpu", "cases": [
        {**case, "loss": "mse", "impl": "torch"},
        {**case, "loss": "no_such_loss", "impl": "torch"},
        {**case, "loss": "mse", "impl": "no_such_impl"},
    ]}, emit=lines.append)
    assert all(line.startswith(round_worker.PREFIX) for line in lines)
    got = [json.loads(line[len(round_worker.PREFIX):]) for line in lines]
    assert [g["i"] for g in got] == [0, 1, 2]
    assert {m: len(v) for m, v in got[0]["samples"].items()} == {"forward": 4, "full": 2}
    assert all(x > 0 for v in got[0]["samples"].values() for x in v)
    assert "no_such_loss" in got[1]["error"]
    assert "no implementation 'no_such_impl'" in got[2]["error"]


def test_worker_command_line(tmp_path):
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "lossreg.round_worker"], capture_output=True,
                         text=True)
    assert res.returncode == 2 and "usage" in res.stderr


def test_a_fresh_process_always_gets_a_warm_up_call(tmp_path, monkeypatch):
    """Later rounds skip the warm-up of calls over a second in-process; a fresh process
    would time its cold start (JIT, autotuning), so its payload asks for one."""
    import pickle
    import sys

    import torch

    from lossreg import harness
    from lossreg.registry import default_registry
    from lossreg.spec import Case

    dest = tmp_path / "payload.pickle"
    monkeypatch.setattr(harness, "WORKER_COMMAND", (
        sys.executable, "-c", f"import shutil, sys; shutil.copy(sys.argv[1], {str(dest)!r})"))
    spec = default_registry().get("mse")
    task = harness.Task(spec, spec.implementations["torch"], "float32", 1000)
    case = Case(1000, torch.float32, "cpu", seed=100, params=spec.case_params("quick", {}))
    row = {**harness.base_row({}, task, {}), "mode": "full", "message": None}
    tc = harness.TimedCase(task, case, dict(spec.options), rows={"full": row},
                           samples={"full": [2000.0]}, models={"full": (None, None)},
                           repeats={"full": 1}, warmup={"full": 0})
    state = harness.RunState({}, "cpu", None, rounds=2)
    state.timed = [tc]
    harness.run_rounds(state, fresh_processes=True)
    payload = pickle.loads(dest.read_bytes())
    (sent,) = payload["cases"]
    assert sent["warmup"] == {"full": 1} and sent["repeats"] == {"full": 1}
    assert (sent["loss"], sent["impl"], sent["n"], sent["seed"]) == ("mse", "torch", 1000, 100)
    # the stand-in worker printed nothing: the round failed, round 1 stands
    assert tc.rounds == 1 and "exited with code 0 before reaching this case" in row["message"]
    assert row["time_ms"] == 2000.0 and row["rounds"] == 1


def test_a_garbled_worker_line_is_passed_on_not_fatal(tmp_path, monkeypatch, capfd):
    import sys

    from lossreg import harness
    from lossreg.round_worker import PREFIX

    lines = ["not json", '{"i": 99}', '{"i": 0}']  # bad JSON, no such case, no result
    monkeypatch.setattr(harness, "WORKER_COMMAND", (
        sys.executable, "-c", "; ".join(f"print({PREFIX + x!r})" for x in lines)))
    df, _ = execute(["mse"], device="cpu", sizes="quick", impls=["torch"], throughput=True,
                    rounds=2)
    t = df[(df.check == "throughput") & (df.status == "ok")]
    assert len(t) >= 3 and set(t["rounds"]) == {1}
    assert t["message"].str.contains("exited with code 0 before reaching this case").all()
    err = capfd.readouterr().err
    assert all(x in err for x in lines)
