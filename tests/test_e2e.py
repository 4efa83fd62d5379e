"""A third-party plugin installed with pip, end to end through the console script."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest

from conftest import CUBIC_PLUGIN

LOSSREG = str(Path(sys.executable).with_name("lossreg"))


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    src = tmp_path_factory.mktemp("src")
    (src / "cubic_losses.py").write_text(textwrap.dedent(CUBIC_PLUGIN))
    (src / "pyproject.toml").write_text(textwrap.dedent("""
        [build-system]
        requires = ["setuptools>=64"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "cubic-losses"
        version = "0.3"
        [tool.setuptools]
        py-modules = ["cubic_losses"]
        [project.entry-points.lossreg]
        cubic_losses = "cubic_losses"
    """))
    site = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                    "--no-build-isolation", "--disable-pip-version-check", "--target",
                    str(site), str(src)], check=True, capture_output=True)
    env = {**os.environ, "PYTHONPATH": str(site), "LOSSREG_STRICT_PLUGINS": "1"}
    return env


def lossreg(env, *args):
    return subprocess.run([LOSSREG, *args], env=env, capture_output=True, text=True,
                          timeout=600)


def test_pip_installed_plugin_lists_checks_and_benches(installed, tmp_path):
    r = lossreg(installed, "list", "--json")
    assert r.returncode == 0, r.stderr
    assert "cubic" in {d["name"] for d in json.loads(r.stdout)}
    plugins = {p["name"]: p for p in json.loads(lossreg(installed, "plugins", "--json").stdout)}
    assert plugins["cubic_losses"]["version"] == "0.3"

    r = lossreg(installed, "check", "cubic", "--device", "cpu")
    assert r.returncode == 0, r.stdout + r.stderr

    out = tmp_path / "res"
    r = lossreg(installed, "bench", "cubic", "mse", "--device", "cpu", "--sizes", "quick",
                "--rounds", "2", "--out", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    df = pd.read_parquet(out)
    assert {"cubic", "mse"} <= set(df.loss)
    assert "cubic_team_mse" in set(df[df.loss == "mse"].impl)
    assert set(df[(df.loss == "cubic") & (df.check == "throughput")].status) == {"ok"}
    assert len(list((out / "plots").glob("_*/*.png"))) == 4
