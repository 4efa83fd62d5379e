"""`lossreg report`: the Markdown summary of a results set."""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from lossreg.cli import main
from lossreg.runner import execute
from lossreg.registry import Registry
from lossreg.report import fastest_table, render
from lossreg.spec import Impl, LossSpec


def _ref(input, target, reduction="mean"):
    t = (input - target) ** 2
    return t if reduction == "none" else (t.mean() if reduction == "mean" else t.sum())


def _builtin(input, target, reduction="mean"):
    return torch.nn.functional.mse_loss(input, target, reduction=reduction)


def _sleepy(input, target, reduction="mean"):
    time.sleep(0.004)
    return _ref(input, target, reduction)


def _wrong(input, target, reduction="mean"):
    return _ref(input, target, reduction) * 1.01


def _run(out: Path, name: str = "sq"):
    spec = LossSpec(name=name, family="toy", formula="x^2", reference=_ref,
                    make_inputs=lambda c: {"input": c.randn(c.n), "target": c.randn(c.n)},
                    sizes={"quick": [64], "default": [300, 5000], "large": [5000]})
    reg = Registry()
    reg.losses[name] = spec
    spec.implementations["torch"] = Impl("torch", _builtin, kind="baseline", plugin="t")
    spec.implementations["sleepy"] = Impl("sleepy", _sleepy, plugin="t")
    spec.implementations["wrong"] = Impl("wrong", _wrong, plugin="t")
    df, writer = execute([name], device="cpu", registry=reg, sizes="default",
                         throughput=True, out=out)
    from lossreg.plots import plot_run

    plot_run(df, out / "plots" / f"_{writer.run_id}")
    return df


@pytest.fixture(scope="module")
def one_run(tmp_path_factory):
    res = tmp_path_factory.mktemp("report") / "res"
    return res, _run(res)


def test_fastest_table_derives_from_the_rows(one_run):
    _, df = one_run
    table = fastest_table(df)
    assert len(table) == 1
    row = table.iloc[0]
    full = df[(df.check == "throughput") & (df["mode"] == "full") & (df.n == 5000)]
    times = full.set_index("impl")["time_ms"]
    assert row.n == 5000 and row.fastest == times.idxmin() and row.fastest != "sleepy"
    assert abs(row.vs_reference - times["reference"] / times.min()) < 1e-12
    assert abs(row.vs_torch - times["torch"] / times.min()) < 1e-12
    peaks = full.set_index("impl")["peak_bytes"]
    if peaks["reference"]:
        assert abs(row.peak_vs_reference - peaks[row.fastest] / peaks["reference"]) < 1e-12


def test_report_cli_lists_failures_and_embeds_the_run_plots(one_run, tmp_path):
    res, df = one_run
    out = tmp_path / "docs" / "report.md"
    r = CliRunner().invoke(main, ["report", str(res), "--out", str(out)])
    assert r.exit_code == 0, r.output
    text = out.read_text()
    assert "| `sq` | toy |" in text
    # every failing row of the wrong implementation is listed with its message
    n_fail = int((df.status == "fail").sum())
    assert n_fail > 0
    assert len(re.findall(r"^\| sq \| wrong \|.*\| fail \| .*rel_err", text, re.M)) == n_fail
    # the run's own plots are linked, relative to the report, and resolve
    links = re.findall(r"!\[\w+\]\(([^)]+)\)", text)
    assert len(links) == 4 and all((out.parent / p).resolve().is_file() for p in links)
    assert all("plots/_" in p for p in links)
    assert not list(out.parent.glob("_report_plots"))  # nothing regenerated


def test_report_of_several_runs_makes_its_own_plots(one_run, tmp_path):
    res = tmp_path / "res"
    shutil.copytree(one_run[0], res)
    old = one_run[1].run_id.iloc[0]
    _run(res)
    _run(res, "sq_two")
    out = tmp_path / "r.md"
    r = CliRunner().invoke(main, ["report", str(res), "--out", str(out)])
    assert r.exit_code == 0, r.output
    text = out.read_text()
    # only the latest run of each loss is reported: sq's second run and sq_two's
    assert "from 2 run(s)" in text and old not in text
    assert "| `sq` |" in text and "| `sq_two` |" in text
    links = re.findall(r"!\[\w+\]\(([^)]+)\)", text)
    assert links and all(p.startswith("_r_plots/") for p in links)
    assert all((tmp_path / p).is_file() for p in links)


def test_report_bad_input(one_run, tmp_path):
    r = CliRunner().invoke(main, ["report", str(tmp_path / "nothing"), "--out",
                                  str(tmp_path / "r.md")])
    assert r.exit_code == 2 and "cannot read results" in r.output
    res = one_run[0]
    r = CliRunner().invoke(main, ["report", str(res), "--out", str(tmp_path / "r.txt")])
    assert r.exit_code == 2 and ".md" in r.output


def test_render_without_timings_says_so():
    import pandas as pd

    from lossreg.results import COLUMNS

    row = {c: None for c in COLUMNS}
    row.update(run_id="r1", timestamp=pd.Timestamp("2026-01-01", tz="UTC"), loss="sq",
               impl="reference", check="correctness", mode="forward", status="ok",
               device_name="cpu", n=10, dtype="float32")
    text = render(pd.DataFrame([row]))
    assert "No throughput rows" in text and "Not timed in these results" in text
    assert "None: all 1 correctness and gradient rows are ok" in text


def test_kernel_table_sets_each_triton_kernel_beside_torch_and_peers():
    import pandas as pd

    from lossreg.report import _kernel_section, kernel_table

    def row(impl, kind, backend, n, frac, mode="full", model=3 << 20):
        return {"check": "throughput", "status": "ok", "mode": mode, "loss": "ce",
                "device_name": "H200", "dtype": "bfloat16", "n": n, "impl": impl,
                "impl_kind": kind, "backend": backend, "model_bytes": model,
                "gbps": frac * 4000, "bw_fraction": frac}

    df = pd.DataFrame([row("triton", "optimized", "triton", 4096, 0.81),
                       row("triton", "optimized", "triton", 1024, 0.30),  # smaller n
                       row("triton", "optimized", "triton", 4096, 0.9, mode="backward"),
                       row("torch", "baseline", "torch", 4096, 0.42),
                       row("liger", "baseline", "liger_kernel", 4096, 0.66),
                       row("reference", "reference", "torch", 4096, 0.1)])
    k = kernel_table(df)
    assert len(k) == 1
    r = k.iloc[0]
    assert (r["impl"], r["n"], r["bw_fraction"], r["torch_fraction"]) == ("triton", 4096,
                                                                          0.81, 0.42)
    assert r["peers"] == "liger 66%"
    text = "\n".join(_kernel_section(df))
    assert "81.0%" in text and "42.0%" in text and "3 MiB" in text
