"""The example third-party plugin under examples/ works as its README says: installed
(a .dist-info built from its own pyproject.toml, its source on sys.path: what
``pip install -e`` leaves), found through its entry point, and `lossreg check` of its
loss passes, the Triton implementation under the interpreter included."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import lossreg
from lossreg.registry import Registry

from conftest import make_dist

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "lossreg-example-plugin"


@pytest.fixture
def example(plugin_path, monkeypatch):
    project = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]
    make_dist(plugin_path, project["name"], {}, project["entry-points"]["lossreg"],
              version=project["version"])
    monkeypatch.syspath_prepend(str(EXAMPLE))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(EXAMPLE), os.environ["PYTHONPATH"]]))
    yield project
    for mod in [m for m in sys.modules if m.startswith("lossreg_example")]:
        del sys.modules[mod]


def test_the_entry_point_is_found_and_triton_waits(example):
    reg = Registry().load_entry_points()
    info = reg.plugins["example_losses"]
    assert (info.status, info.dist, info.builtin) == ("loaded", "lossreg-example-plugin", False)
    assert info.losses == ["pseudo_huber"] and not info.warnings
    spec = reg.get("pseudo_huber")
    assert set(spec.implementations) == {"reference", "compile", "torch", "triton"}
    assert spec.implementations["triton"].uses_triton
    # the kernel module (and so the template instance) loads on the first call only
    assert "lossreg_example.kernels" not in sys.modules


def test_check_passes_with_triton_under_the_interpreter(example):
    # float64 here, float32 through the command below: each dtype path of the template
    df = lossreg.check(["pseudo_huber"], device="cpu", dtypes=["float64"])
    assert set(df.status) <= {"ok", "skipped"}, df[~df.status.isin(["ok", "skipped"])]
    ok = df[df.status == "ok"]
    for impl in ("torch", "triton"):
        rows = ok[ok.impl == impl]
        assert {"correctness", "gradient"} <= set(rows.check), impl
        # every option set and the edge cases were checked
        assert rows.params.str.contains('"delta": 0.25').any()
        assert rows.params.str.contains("huge_residuals").any() or (
            df.message.fillna("").str.contains("huge_residuals").any())


def test_lossreg_check_command_passes(example):
    proc = subprocess.run([sys.executable, "-m", "lossreg.cli", "check", "pseudo_huber",
                           "--device", "cpu", "--dtype", "float32", "--impl", "triton"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert re.search(r"(\d+) rows: \1 ok, 0 fail, 0 error", proc.stdout), proc.stdout
    assert "pseudo_huber triton float32" in proc.stderr
