"""The pytest-benchmark suite in benchmarks/ (not collected by the default run: testpaths
= tests), run for real at a tiny selection in subprocesses: its JSON, machine info,
Parquet export, skips, and the README's --benchmark-autosave / --benchmark-compare."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lossreg
from lossreg import measure
from lossreg.results import SCHEMA

ROOT = Path(__file__).resolve().parents[1]
LOSSES = ("mse", "mae")


def run_suite(*args: str) -> subprocess.CompletedProcess:
    # an xdist worker's variables would make pytest-benchmark disable itself
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    cmd = [sys.executable, "-m", "pytest", "benchmarks", "-p", "no:cacheprovider",
           "-p", "no:xdist", "-q", "-rs", "--lossreg-device", "cpu", "--lossreg-sizes", "quick",
           "--benchmark-min-rounds=2", "--benchmark-max-time=0.01",
           *[a for loss in LOSSES for a in ("--lossreg-loss", loss)], *args]
    proc = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def test_benchmark_suite(tmp_path):
    """One test (xdist would run a module fixture once per worker): the suite at mse and
    mae, quick sizes, then the README's --benchmark-compare against its autosave."""
    pytest.importorskip("pytest_benchmark")
    storage = tmp_path / "storage"
    first = run_suite("--lossreg-out", str(tmp_path / "out"),
                      "--benchmark-json", str(tmp_path / "b.json"),
                      "--benchmark-autosave", f"--benchmark-storage={storage}")
    data = json.loads((tmp_path / "b.json").read_text())
    check_json(data)
    check_parquet(lossreg.load_results(tmp_path / "out", strict=True), data)

    # Triton on a CPU: skipped with the harness's reason, never an error
    summary = [line for line in first.stdout.splitlines() if " passed" in line][-1]
    assert "skipped" in summary and "error" not in summary and "failed" not in summary
    assert "SKIPPED" in first.stdout and "Triton on CPU" in first.stdout

    saved = list(storage.rglob("0001_*.json"))
    assert len(saved) == 1
    second = run_suite("--lossreg-mode", "forward", "--lossreg-impl", "torch",
                       f"--benchmark-storage={storage}", "--benchmark-compare")
    out = second.stdout + second.stderr
    assert "Comparing against benchmarks from" in out
    assert "(NOW)" in out and "(0001" in out
    assert "machine_info is different" not in out


def check_json(data: dict) -> None:
    benches = data["benchmarks"]
    assert {b["extra_info"]["loss"] for b in benches} == set(LOSSES)
    for b in benches:
        assert {"loss", "impl", "dtype", "n", "mode", "device"} <= set(b["extra_info"])
        assert b["extra_info"]["device"] == "cpu"
        assert b["stats"]["rounds"] >= 2
    assert {"reference", "torch"} <= {b["extra_info"]["impl"] for b in benches}
    assert {b["extra_info"]["mode"] for b in benches} == {"forward", "backward", "full"}
    info = data["machine_info"]
    assert info["device_name"] == measure.device_name("cpu")
    assert info["torch_version"] == torch.__version__
    assert "triton_version" in info and "cuda_version" in info
    assert data["commit_info"]["lossreg_version"] == lossreg.__version__


def check_parquet(df, data: dict) -> None:
    assert list(df.columns) == SCHEMA.names
    assert set(df.check) == {"throughput"}
    assert set(df.loss) == set(LOSSES)
    assert (df.device_type == "cpu").all() and (df.torch_version == torch.__version__).all()
    assert df.run_id.nunique() == 1
    assert not set(df.status) & {"error", "fail"}, df[df.status != "ok"].message.tolist()

    ok = df[df.status == "ok"]
    for loss in LOSSES:
        for impl in ("reference", "torch"):
            for mode in ("forward", "backward", "full"):
                rows = ok[(ok.loss == loss) & (ok.impl == impl) & (ok["mode"] == mode)]
                assert sorted(rows.n) == sorted(lossreg.get(loss).sizes["quick"]), (loss, impl,
                                                                                     mode)
    assert (ok.time_ms > 0).all()
    assert ((ok.time_ms_p20 <= ok.time_ms) & (ok.time_ms <= ok.time_ms_p80)).all()
    assert (ok.repeats >= 2).all() and (ok.gbps > 0).all() and (ok.peak_bytes >= 0).all()
    assert (ok[ok.impl_kind == "reference"].speedup == 1.0).all()
    assert ok.speedup.notna().all()

    # the same medians as the pytest-benchmark JSON
    medians = {(b["extra_info"]["loss"], b["extra_info"]["impl"], b["extra_info"]["n"],
                b["extra_info"]["mode"]): b["stats"]["median"] * 1e3 for b in data["benchmarks"]}
    assert len(medians) == len(ok)
    for r in ok.itertuples():
        assert r.time_ms == pytest.approx(medians[(r.loss, r.impl, r.n, r.mode)], rel=1e-9)

    triton = df[df.backend == "triton"]
    assert len(triton) == len(LOSSES) * 3 * 2  # x modes x quick sizes
    assert set(triton.status) == {"skipped"}
    assert triton.message.str.contains("Triton").all()
