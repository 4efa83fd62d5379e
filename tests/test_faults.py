"""Fault isolation and crash safety: one bad implementation, one hang, one
out-of-memory, one Ctrl-C or one SIGKILL never costs the rows already measured."""

from __future__ import annotations

import json
import os
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
from lossreg import harness
from lossreg.cli import main
from lossreg.harness import Interrupted, execute
from lossreg.registry import Registry
from lossreg.spec import Impl, LossSpec

from conftest import make_dist


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


def _statuses(df) -> dict[str, set]:
    return df.groupby("impl")["status"].agg(set).to_dict()


def test_cpu_allocation_failure_is_an_error_row_and_the_run_goes_on():
    def greedy(input, target, reduction="mean"):
        torch.empty(1 << 62, dtype=torch.uint8)  # far beyond any machine's memory
        return _ref(input, target, reduction)

    df, _ = execute(["sq"], device="cpu", registry=_registry(greedy=greedy, good=_ref))
    st = _statuses(df)
    assert st["greedy"] == {"error"} and st["good"] == {"ok"}
    assert df[df.impl == "greedy"].message.str.contains("allocate").all()


def test_cuda_oom_resets_the_allocator_before_the_next_case(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats",
                        lambda *a: calls.append("reset_peak"))

    def oom(input, target, reduction="mean"):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")

    # device stays cpu: only the recovery path believes in a GPU
    df, _ = execute(["sq"], device="cpu", registry=_registry(oom=oom, good=_ref))
    st = _statuses(df)
    assert st["oom"] == {"error"} and st["good"] == {"ok"}
    assert df[df.impl == "oom"].message.str.contains("out of memory").all()
    n_error_rows = int((df.impl == "oom").sum())
    assert calls.count("empty_cache") == n_error_rows == calls.count("reset_peak")


def test_other_errors_do_not_touch_the_allocator(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append(1))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: None)
    harness.recover_memory(ValueError("bad shape"))
    assert calls == []
    harness.recover_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory"))
    assert calls == [1]


@pytest.mark.parametrize("how", ["sleep", "busy"])
def test_a_hanging_case_times_out_and_the_run_goes_on(how):
    def hangs(input, target, reduction="mean"):
        if how == "sleep":
            time.sleep(3600)
        while True:  # a Python-level spin, as a runaway loop in a plugin would be
            pass

    reg = _registry(hangs=hangs, good=_ref)
    df, _ = execute(["sq"], device="cpu", registry=reg, case_timeout=0.5)
    st = _statuses(df)
    assert st["hangs"] == {"error"} and st["good"] == {"ok"} and st["reference"] == {"ok"}
    msgs = df[df.impl == "hangs"].message
    assert msgs.str.contains("timed out").all() and msgs.str.contains("case-timeout").all()
    # one case x two sizes: the first step of each times out, the rest are not started
    assert df[(df.impl == "hangs")].n.nunique() >= 2


def test_timeout_also_bounds_throughput(tmp_path):
    def slow_backward(input, target, reduction="mean"):
        class Slow(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x):
                return x.clone()

            @staticmethod
            def backward(ctx, g):
                time.sleep(3600)
                return g
        return _ref(Slow.apply(input), target, reduction)

    reg = _registry(slow=slow_backward)
    df, _ = execute(["sq"], device="cpu", registry=reg, sizes="quick", throughput=True,
                    out=tmp_path, case_timeout=3)
    slow = df[df.impl == "slow"]
    # the forward never calls the backward: only gradients and timings hang
    assert set(slow[slow.check == "correctness"].status) == {"ok"}
    assert set(slow[slow.check != "correctness"].status) == {"error"}
    assert set(df[df.impl == "reference"].status) == {"ok"}
    # the alarm is disarmed after the run
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_make_inputs_failure_is_contained():
    def make_inputs(c):
        if c.n == 130:
            raise RuntimeError("generator broke at n=130")
        return {"input": c.randn(c.n), "target": c.randn(c.n)}

    df, _ = execute(["sq"], device="cpu", registry=_registry(make_inputs, good=_ref))
    bad = df[df.n == 130]
    ok = df[df.n == 64]
    assert set(bad.status) == {"error"} and bad.message.str.contains("n=130").all()
    assert set(ok.status) == {"ok"}


@pytest.mark.parametrize("value", [0, -1])
def test_case_timeout_must_be_positive(value):
    with pytest.raises(harness.HarnessError, match="case_timeout"):
        execute(["sq"], device="cpu", registry=_registry(), case_timeout=value)
    r = CliRunner().invoke(main, ["check", "mse", "--case-timeout", str(value)])
    assert r.exit_code == 2 and "--case-timeout must be a positive" in r.output


def test_ctrl_c_keeps_the_finished_cases_and_says_where(tmp_path):
    seen = []

    def progress(done, total, msg):
        seen.append(msg)
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(Interrupted) as info:
        execute(["sq"], device="cpu", registry=_registry(good=_ref, other=_ref), out=tmp_path,
                throughput=True, progress=progress)
    exc = info.value
    assert exc.done == 2 and exc.case == seen[-1] and exc.total == 6
    assert str(tmp_path) in str(exc) and f"{exc.rows} rows" in str(exc)
    df = lossreg.load_results(Path(exc.location))
    assert len(df) == exc.rows
    # two finished cases (reference at both sizes), each with every check and mode
    assert sorted(_complete_cases(df)) == [("reference", 64), ("reference", 130)]
    assert set(df.impl) == {"reference"}
    assert set(df[df.check == "throughput"]["mode"]) == {"forward", "backward", "full"}


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


def _start_bench(site: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "LOSSREG_LOAD_PLUGINS": "slow_losses",
           "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    # SIGINT at its default in the child, whatever this test process inherited or some
    # library set (an ignored SIGINT is inherited across exec, and Python then installs
    # no KeyboardInterrupt handler)
    return subprocess.Popen(
        [sys.executable, "-m", "lossreg.cli", "bench", "slow_sq", "--device", "cpu",
         "--impl", "napping", "--impl", "reference", "--out", str(out), "--no-plots"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for_parts(out: Path, k: int, proc: subprocess.Popen, limit_s: float = 120) -> int:
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


@pytest.fixture
def slow_site(plugin_path):
    make_dist(plugin_path, "slow-losses", {"slow_losses": SLOW_PLUGIN},
              {"slow_losses": "slow_losses"})
    return plugin_path


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
    # every row belongs to a complete case: the case in progress left nothing half-written
    timed = df[df.n >= 64]  # (the reference's gradcheck row is at n = 8)
    assert len(_complete_cases(df)) == timed.groupby(["impl", "n"]).ngroups
    assert len(pd.read_parquet(out)) == len(df)
    # and the killed run does not block the next one in the same folder
    assert subprocess.run([sys.executable, "-c", "import lossreg; print(len("
                           f"lossreg.load_results({str(out)!r})))"], capture_output=True,
                          text=True, check=True).stdout.strip() == str(len(df))


def test_sigint_stops_cleanly_with_a_line_saying_where(slow_site, tmp_path):
    out = tmp_path / "results"
    proc = _start_bench(slow_site, out)
    seen = _wait_for_parts(out, 2, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("lossreg: interrupted during slow_sq"), err
    final = next(out.glob("run-*.parquet"))
    assert str(final) in line
    df = lossreg.load_results(final, strict=True)
    assert f"{len(df)} rows" in line
    assert len(_complete_cases(df)) >= seen
    assert not [p for p in out.iterdir() if p.is_dir()]  # parts consolidated


UNSAFE_PLUGIN = '''
import torch
from lossreg import Impl, LossSpec, hookimpl

def ref(input, target, reduction="mean"):
    return ((input - target) ** 2).mean()

def mk(c):
    return {"input": c.randn(c.n), "target": c.randn(c.n)}

@hookimpl
def register_losses(register):
    register(LossSpec(name=@NAME@, family=@FAMILY@, formula="x", reference=ref,
                      make_inputs=mk))

@hookimpl
def register_implementations(register):
    register(@IMPL_LOSS@, Impl(name=@IMPL@, fn=ref))
'''


@pytest.mark.parametrize("name, family, impl_loss, impl, bad", [
    ("../../escape", "x", "mse", "ok_impl", "'../../escape'"),
    ("okloss", "../../../tmp", "mse", "ok_impl", "'../../../tmp'"),
    ("okloss", "x", "mse", "a/b", "'a/b'"),
    ("okloss", "x", "mse", "..", "'..'"),
    ("okloss", "x", "no_such_loss", "fine", "unknown loss 'no_such_loss'"),
])
def test_unsafe_or_unknown_names_are_contained(plugin_path, tmp_path, name, family, impl_loss,
                                               impl, bad):
    src = UNSAFE_PLUGIN.replace("@NAME@", repr(name)).replace("@FAMILY@", repr(family)) \
        .replace("@IMPL_LOSS@", repr(impl_loss)).replace("@IMPL@", repr(impl))
    make_dist(plugin_path, "bad-unsafe-losses", {"bad_unsafe": src},
              {"bad_unsafe": "bad_unsafe"})
    runner = CliRunner()
    r = runner.invoke(main, ["plugins", "--json"])
    assert r.exit_code == 0
    info = {p["name"]: p for p in json.loads(r.stdout)}["bad_unsafe"]
    reported = json.dumps(info)
    assert bad.replace("'", "") in reported.replace("\\'", "").replace("'", "")
    before = {p for p in tmp_path.rglob("*")}
    out = tmp_path / "work" / "out"
    r = runner.invoke(main, ["bench", "mse", "--device", "cpu", "--sizes", "quick",
                             "--impl", "reference", "--out", str(out), "--no-plots"])
    assert r.exit_code == 0, r.output
    written = {p for p in tmp_path.rglob("*")} - before
    assert written and all(p == out.parent or out in (p, *p.parents) for p in written), written
    assert set(lossreg.load_results(out).loss) == {"mse"}
