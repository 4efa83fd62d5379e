"""The pandas queries in docs/results.md run as written against the committed
results and answer something (no empty answers)."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "docs" / "results.md"

#: the variable each query of the README leaves its answer in
ANSWERS = ("fastest", "speedup_by_dtype", "memory_saved", "failed", "devices")


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.DOTALL)


def test_the_readme_queries_run_against_the_committed_results(monkeypatch):
    monkeypatch.chdir(ROOT)
    blocks = _blocks()
    assert len(blocks) >= len(ANSWERS)
    ns: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), ns)  # noqa: S102 - our own README
    for name in ANSWERS:
        assert name in ns, f"docs/results.md defines no {name!r}"
        answer = ns[name]
        assert isinstance(answer, (pd.DataFrame, pd.Series)), name
        if name != "failed":  # a clean run has no failed checks
            assert len(answer) > 0, f"{name} is empty"
    # the answers are about the data: the fastest implementation per loss covers every
    # built-in loss of the committed CPU run, and is never slower than the reference
    cpu = ns["fastest"].xs("cpu", level="device_type")
    assert len(cpu) >= 43
    assert (cpu["speedup"].dropna() >= 1.0 - 1e-9).all()
    assert set(ns["devices"].columns) >= {"cpu", "cuda"}
    assert (ns["memory_saved"]["fraction"] < 1).all()


def test_the_cpu_folder_reads_with_plain_pandas():
    df = pd.read_parquet(ROOT / "results" / "cpu")
    assert df["loss"].nunique() >= 43
    assert set(df["status"]) <= {"ok", "fail", "error", "skipped"}


@pytest.mark.parametrize("path", ["results/report.md", "README.md"])
def test_the_committed_image_links_resolve(path):
    report = ROOT / path
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report.read_text())
    assert links and all((report.parent / p).is_file() for p in links)
