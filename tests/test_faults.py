"""Fault isolation and crash safety: every case runs in a supervised worker process,
so a segfault, an abort, an exit, an out-of-memory kill, a hang, a Ctrl-C, a SIGTERM
or a SIGKILL never costs the rows already measured."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from click.testing import CliRunner

import lossreg
from lossreg import cases, workers
from lossreg.cli import main
from lossreg.planning import HarnessError
from lossreg.registry import Registry
from lossreg.runner import Interrupted, execute
from lossreg.spec import Impl, LossSpec

from conftest import make_dist

FAULT_PLUGINS = Path(__file__).parent / "fault_plugins"
sys.path.insert(0, str(FAULT_PLUGINS))  # faulty_impls.jobs, for the supervisor tests
from faulty_impls import FAULTS, jobs  # noqa: E402


# ------------------------------------------------------------- the supervisor itself
@pytest.fixture(scope="module")
def pool():
    p = workers.Pool(jobs.init, ("t",), jobs.handle)
    yield p
    p.close()


def test_a_worker_runs_job_after_job_and_passes_messages_on(pool):
    heard = []
    first, failure = pool.run({"do": "echo", "value": 1, "messages": 3}, 60, heard.append)
    assert failure is None and first["value"] == 1 and heard == [("progress", i) for i in
                                                                range(3)]
    second, _ = pool.run({"do": "echo", "value": 2}, 60)
    assert second["pid"] == first["pid"] != os.getpid() and second["jobs"] == 2
    assert pool.started == 1


@pytest.mark.parametrize("job, said", [
    ({"do": "segfault"}, "killed by SIGSEGV"),
    ({"do": "abort"}, "killed by SIGABRT"),
    ({"do": "kill"}, "killed by SIGKILL (the kernel's out-of-memory killer sends it)"),
    ({"do": "exit", "status": 0}, "exited with status 0"),
    ({"do": "exit", "status": 3}, "exited with status 3"),
    ({"do": "sleep", "seconds": 3600}, "exceeded 1.5 s"),
])
def test_a_worker_that_dies_or_hangs_is_named_and_replaced(pool, job, said):
    before, _ = pool.run({"do": "echo"}, 60)
    result, failure = pool.run(job, 1.5)
    assert result is None and failure == said
    with pytest.raises(ProcessLookupError):
        os.kill(before["pid"], 0)  # gone, and reaped
    after, failure = pool.run({"do": "echo"}, 60)
    assert failure is None and after["pid"] != before["pid"] and after["jobs"] == 1


def test_a_job_that_raises_leaves_the_worker_serving(pool):
    before, _ = pool.run({"do": "echo"}, 60)
    result, failure = pool.run({"do": "raise"}, 60)
    assert result is None and failure == "ValueError: bad job"
    after, _ = pool.run({"do": "echo"}, 60)
    assert after["pid"] == before["pid"]


def test_fresh_gives_a_new_process_and_close_ends_it():
    p = workers.Pool(jobs.init, ("x",), jobs.handle)
    try:
        a, _ = p.run({"do": "echo"})
        p.fresh()
        b, _ = p.run({"do": "echo"})
        assert a["pid"] != b["pid"] and p.started == 2
    finally:
        p.close()
    with pytest.raises(ProcessLookupError):
        os.kill(b["pid"], 0)


def test_a_worker_that_cannot_start_says_why():
    p = workers.Pool(jobs.failing_init, ("y",), jobs.handle)
    with pytest.raises(workers.WorkerStartError, match="RuntimeError: cannot start y"):
        p.run({"do": "echo"})


def test_ctrl_c_while_waiting_kills_the_worker(pool):
    pid = pool.run({"do": "echo"}, 60)[0]["pid"]

    def interrupt(message):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pool.run({"do": "sleep", "seconds": 3600}, None, interrupt)
    pool.close()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_worker_command_line():
    r = subprocess.run([sys.executable, "-m", "lossreg.workers"], capture_output=True, text=True)
    assert r.returncode == 2 and "usage" in r.stderr


# ------------------------------------------------------------- a bench of every fault
@pytest.fixture
def faulty_site(plugin_path):
    shutil.copytree(FAULT_PLUGINS / "faulty_impls", plugin_path / "faulty_impls")
    make_dist(plugin_path, "faulty-impls", {}, {"faulty_impls": "faulty_impls"})
    return plugin_path


def test_bench_of_every_fault_next_to_mse_finishes_and_names_each(faulty_site, tmp_path,
                                                                  monkeypatch):
    monkeypatch.setenv("LOSSREG_LOAD_PLUGINS", "linear_regression,faulty_impls")
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["bench", "mse", "faulty_sq", "--device", "cpu", "--sizes",
                                  "quick", "--rounds", "1", "--case-timeout", "8", "--out",
                                  str(out), "--no-plots"])
    assert r.exit_code == 1, r.output
    (final,) = out.glob("run-*.parquet")  # consolidated, whatever happened
    df = lossreg.load_results(final, strict=True)
    assert len(df) and not [p for p in out.iterdir() if p.is_dir()]
    mse = df[df.loss == "mse"]
    assert set(mse.status) <= {"ok", "skipped"}, mse[mse.status != "ok"].message.tolist()
    assert set(mse[mse.impl.isin(["reference", "torch"])].status) == {"ok"}
    sq = df[df.loss == "faulty_sq"]
    assert set(sq[sq.impl.isin(["reference", "good"])].status) == {"ok"}
    for name, (_, reason) in FAULTS.items():
        rows = sq[sq.impl == name]
        bad = rows[rows.status.isin(["error", "fail"])]
        assert len(bad) >= 1 and bad.message.str.contains(reason, regex=False).any(), (
            name, rows[["check", "status", "message"]].to_string())
    hung = sq[(sq.impl == "hangs") & (sq.status == "error")]
    assert hung.message.str.contains("exceeded 8 s").all()


# ------------------------------------------------------------- in-process registries
def _ref(input, target, reduction="mean"):
    t = (input - target) ** 2
    return t if reduction == "none" else (t.mean() if reduction == "mean" else t.sum())


def _registry(make_inputs=None, **impls) -> Registry:
    spec = LossSpec(name="sq", family="t", formula="x^2", reference=_ref,
                    make_inputs=make_inputs or (lambda c: {"input": c.randn(c.n),
                                                           "target": c.randn(c.n)}),
                    sizes={"quick": [64, 130], "default": [256], "large": [4096]})
    reg = Registry()
    reg.losses["sq"] = spec
    for name, fn in impls.items():
        spec.implementations[name] = Impl(name, fn, plugin="test")
    return reg


def test_make_inputs_failure_is_contained():
    def make_inputs(c):
        if c.n == 130:
            raise RuntimeError("generator broke at n=130")
        return {"input": c.randn(c.n), "target": c.randn(c.n)}

    df, _ = execute(["sq"], device="cpu", registry=_registry(make_inputs, good=_ref))
    bad = df[df.n == 130]
    assert set(bad.status) == {"error"} and bad.message.str.contains("n=130").all()
    assert set(df[df.n == 64].status) == {"ok"}


def test_oom_recovery_frees_the_allocator_only_after_an_out_of_memory(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty"))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: calls.append("peak"))
    cases.recover_memory(ValueError("bad shape"))
    assert calls == []
    cases.recover_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory"))
    cases.recover_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert calls == ["empty", "peak"] * 2


@pytest.mark.parametrize("value", [-1, "soon", True])
def test_case_timeout_must_be_seconds(value):
    with pytest.raises(HarnessError, match="case_timeout"):
        execute(["sq"], device="cpu", registry=_registry(), case_timeout=value)


def test_cli_case_timeout_negative_is_bad_input_and_zero_is_no_limit(tmp_path):
    r = CliRunner().invoke(main, ["check", "mse", "--case-timeout", "-1", "--out",
                                  str(tmp_path / "x")])
    assert r.exit_code == 2 and "--case-timeout" in r.output and not (tmp_path / "x").exists()
    df, _ = execute(["sq"], device="cpu", registry=_registry(good=_ref), case_timeout=0)
    assert set(df.status) == {"ok"}


def test_ctrl_c_keeps_the_finished_cases_and_says_where(tmp_path):
    seen = []

    class progress:  # the display the runner drives; Ctrl-C lands after the second case
        def __init__(self, total):
            self.done = 0

        def case_started(self, name):
            seen.append(name)

        def case_done(self, name, status):
            self.done += 1
            if self.done == 2:
                raise KeyboardInterrupt

        def close(self):
            pass

    with pytest.raises(Interrupted) as info:
        execute(["sq"], device="cpu", registry=_registry(good=_ref, other=_ref), out=tmp_path,
                throughput=True, progress=progress)
    exc = info.value
    assert exc.done == 2 and exc.case == seen[-1] and exc.total == 6
    assert exc.signum == signal.SIGINT
    assert str(tmp_path) in str(exc) and f"{exc.rows} rows" in str(exc)
    df = lossreg.load_results(Path(exc.location))
    assert len(df) == exc.rows
    assert sorted(_complete_cases(df)) == [("reference", 64), ("reference", 130)]
    assert set(df[df.check == "throughput"]["mode"]) == {"forward", "backward", "full"}


def test_results_that_cannot_be_written_end_the_run_with_one_line(tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")  # (permissions would not stop root)
    r = CliRunner().invoke(main, ["bench", "mse", "--device", "cpu", "--sizes", "quick",
                                  "--out", str(blocker / "out")])
    assert r.exit_code == 2 and "not a folder" in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1

    from lossreg.results import ResultsWriteError, ResultWriter

    real = ResultWriter.write

    def full_disk(self, rows):
        if self.parts >= 1:
            raise ResultsWriteError(28, f"cannot write results to {self.part_dir}: disk full")
        real(self, rows)

    monkeypatch.setattr(ResultWriter, "write", full_disk)
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["check", "mse", "--device", "cpu", "--impl", "reference",
                                  "--out", str(out)])
    assert r.exit_code == 2 and r.output.strip().splitlines()[-1].endswith("disk full")
    assert len(lossreg.load_results(out)) >= 1  # the rows already written are kept


# ------------------------------------------------------------- signals to a real bench
SLOW_PLUGIN = '''
import time
from lossreg import Impl, LossSpec, hookimpl

def reference(input, target, reduction="mean"):
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be mean, sum or none, got {reduction!r}")
    t = (input - target) ** 2
    return t if reduction == "none" else (t.mean() if reduction == "mean" else t.sum())

def napping(input, target, reduction="mean"):
    time.sleep(0.05)
    return reference(input, target, reduction)

@hookimpl
def register_losses(register):
    register(LossSpec(name="slow_sq", family="third_party", formula="x^2",
                      reference=reference,
                      make_inputs=lambda c: {"input": c.randn(c.n), "target": c.randn(c.n)},
                      sizes={"quick": [64], "default": [64, 65, 66, 67, 68, 69, 70, 71],
                             "large": [64]}))

@hookimpl
def register_implementations(register):
    register("slow_sq", Impl(name="napping", fn=napping))
'''


@pytest.fixture
def slow_site(plugin_path):
    make_dist(plugin_path, "slow-losses", {"slow_losses": SLOW_PLUGIN},
              {"slow_losses": "slow_losses"})
    return plugin_path


def _start_bench(site: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "LOSSREG_LOAD_PLUGINS": "slow_losses",
           "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    # SIGINT at its default in the child, whatever this test process inherited
    return subprocess.Popen(
        [sys.executable, "-m", "lossreg.cli", "bench", "slow_sq", "--device", "cpu",
         "--impl", "napping", "--impl", "reference", "--out", str(out), "--no-plots",
         "--sizes", "default", "--rounds", "1"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for_parts(out: Path, k: int, proc: subprocess.Popen, limit_s: float = 300) -> int:
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        parts = list(out.glob("*/part-*.parquet"))
        if len(parts) >= k:
            return len(parts)
        if proc.poll() is not None:
            pytest.fail(f"bench ended before {k} cases: {proc.communicate()}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"no {k} finished cases within {limit_s} s")


def _complete_cases(df) -> set:
    """(impl, n) of the cases whose rows are all there: both checks and three modes."""
    done = set()
    for key, g in df.groupby(["impl", "n"]):
        have = set(zip(g.check, g["mode"]))
        if {("correctness", "forward"), ("gradient", "backward"), ("throughput", "forward"),
                ("throughput", "backward"), ("throughput", "full")} <= have:
            done.add(key)
    return done


def test_sigkill_mid_run_loses_nothing_finished(slow_site, tmp_path):
    out = tmp_path / "results"
    proc = _start_bench(slow_site, out)
    seen = _wait_for_parts(out, 3, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not list(out.glob("run-*.parquet"))  # killed before consolidating
    df = lossreg.load_results(out, strict=True)
    assert len(_complete_cases(df)) >= seen
    timed = df[df.n >= 64]  # (the reference's gradcheck row is at n = 8)
    assert len(_complete_cases(df)) == timed.groupby(["impl", "n"]).ngroups
    assert len(pd.read_parquet(out)) == len(df)


@pytest.mark.parametrize("signum, code, word", [(signal.SIGINT, 130, "interrupted"),
                                                (signal.SIGTERM, 143, "terminated")])
def test_sigint_and_sigterm_stop_cleanly_with_a_line_saying_where(slow_site, tmp_path, signum,
                                                                  code, word):
    out = tmp_path / "results"
    proc = _start_bench(slow_site, out)
    seen = _wait_for_parts(out, 2, proc)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"lossreg: {word} during slow_sq"), err
    final = next(out.glob("run-*.parquet"))
    assert str(final) in line
    df = lossreg.load_results(final, strict=True)
    assert f"{len(df)} rows" in line
    assert len(_complete_cases(df)) >= seen
    assert not [p for p in out.iterdir() if p.is_dir()]  # parts consolidated
