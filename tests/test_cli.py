"""Every CLI command through click's CliRunner, bad input included."""

import json

import pandas as pd
import pytest
from click.testing import CliRunner

from lossreg.cli import main

from conftest import WRONG_PLUGIN, make_dist


@pytest.fixture
def run(cubic_dist):
    runner = CliRunner()

    def invoke(*args):
        return runner.invoke(main, list(args), catch_exceptions=False)

    return invoke


def test_list(run):
    r = run("list")
    assert r.exit_code == 0
    assert "mse" in r.output and "cubic" in r.output
    data = json.loads(run("list", "--json", "--family", "third_party").output)
    assert [d["name"] for d in data] == ["cubic"]
    assert data[0]["implementations"] == ["reference", "compile", "fast"]


def test_list_unknown_family(run):
    r = run("list", "--family", "nope")
    assert r.exit_code == 2 and "no family 'nope'" in r.output


def test_show(run):
    r = run("show", "mse")
    assert r.exit_code == 0
    for text in ("formula", r"\frac{1}{n}", "reference", "triton", "torch", "compile",
                 "citation"):
        assert text in r.output


def test_show_unknown_suggests(run):
    r = run("show", "mes")
    assert r.exit_code == 2
    assert r.output.strip().startswith("lossreg: error: unknown loss 'mes'; did you mean 'mse'")
    assert len(r.output.strip().splitlines()) == 1


def test_plugins(run):
    r = run("plugins")
    assert r.exit_code == 0 and "cubic_losses" in r.output and "loaded" in r.output
    data = {p["name"]: p for p in json.loads(run("plugins", "--json").output)}
    assert data["linear_regression"]["losses"] == ["mse"]
    assert "mse:cubic_team_mse" in data["cubic_losses"]["implementations"]


def test_plugins_shows_failed(cubic_dist):
    make_dist(cubic_dist, "broken-a", {"broken_a": "raise RuntimeError('kaput')\n"},
              {"broken_a": "broken_a"})
    r = CliRunner().invoke(main, ["plugins"])
    assert r.exit_code == 0
    assert "broken_a" in r.output and "failed" in r.output and "kaput" in r.output


def test_check_ok_and_failing(run, cubic_dist):
    r = run("check", "cubic", "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert "0 fail, 0 error" in r.output
    make_dist(cubic_dist, "cubic-wrong", {"cubic_wrong": WRONG_PLUGIN},
              {"cubic_wrong": "cubic_wrong"})
    import lossreg.registry as reg

    reg._DEFAULT = None
    r = run("check", "cubic", "--device", "cpu")
    assert r.exit_code == 1
    assert "wrong" in r.output and "fail" in r.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["check", "cubik"], "unknown loss 'cubik'; did you mean 'cubic'?"),
        (["check", "cubic", "--device", "cuda"], "no CUDA GPU"),
        (["check", "cubic", "--device", "tpu"], "unknown device 'tpu'"),
        (["check", "cubic", "--dtype", "float8"], "unknown dtype 'float8'"),
        (["check", "cubic", "--impl", "fastest"], "unknown implementation 'fastest'"),
        (["bench", "cubic", "--sizes", "huge"], "unknown sizes 'huge'"),
        (["plot", "/nonexistent/results"], "cannot read results"),
        (["compare", "/nonexistent/a", "/nonexistent/b"], "cannot read results"),
    ],
)
def test_bad_input_exits_2_with_one_line(run, args, message, tmp_path):
    out = tmp_path / "never"
    extra = ["--out", str(out)] if args[0] in ("check", "bench") else []
    r = run(*args, *extra)
    assert r.exit_code == 2
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in r.output
    assert not out.exists()  # validated before anything was created


def test_bench_plot_compare(run, tmp_path):
    out = tmp_path / "res"
    r = run("bench", "cubic", "--device", "cpu", "--sizes", "quick", "--rounds", "2",
            "--out", str(out))
    assert r.exit_code == 0, r.output
    assert "cubic" in r.output and "speedup" in r.output and "plot:" in r.output
    df = pd.read_parquet(out, dtype_backend="numpy_nullable")  # ints stay ints
    assert set(df["impl"]) == {"reference", "fast"}
    assert set(df["check"]) == {"correctness", "gradient", "throughput"}

    r = run("bench", "cubic", "--device", "cpu", "--sizes", "quick", "--rounds", "1",
            "--out", str(out), "--no-plots")
    assert r.exit_code == 0 and "plot:" not in r.output
    assert pd.read_parquet(out)["run_id"].nunique() == 2

    r = run("plot", str(out), "--out", str(tmp_path / "plots"))
    assert r.exit_code == 0 and (tmp_path / "plots" / "time.png").stat().st_size > 1000

    r = run("compare", str(out), str(out), "--threshold", "10%")
    assert r.exit_code == 0, r.output
    assert "0 regressions" in r.output
    r = run("compare", str(out), str(out), "--format", "markdown")
    assert r.output.startswith("| loss |")
    r = run("compare", str(out), str(out), "--threshold", "ten")
    assert r.exit_code == 2 and "threshold 'ten'" in r.output
    r = run("compare", str(out), str(out), "--threshold", "0.05")
    assert r.exit_code == 0
    r = run("compare", str(out), str(out), "--threshold", "5")
    assert r.exit_code == 2 and "5%" in r.output and "0.05" in r.output

    other = tmp_path / "other.parquet"
    df = pd.read_parquet(out, dtype_backend="numpy_nullable")  # ints stay ints
    df.assign(loss="nothing_alike").to_parquet(other)
    r = run("compare", str(out), str(other))
    assert r.exit_code == 2 and "no timed row in common" in r.output

    r = run("report", str(out))
    assert r.exit_code == 0, r.output
    assert (tmp_path / "res-report.md").exists()  # beside its input, not in the cwd
    assert len(pd.read_parquet(out)) == len(df)  # the results folder still reads


def test_compare_detects_regression(run, tmp_path):
    base = tmp_path / "base"
    run("bench", "cubic", "--device", "cpu", "--sizes", "quick", "--rounds", "2", "--out",
        str(base), "--no-plots")
    df = pd.read_parquet(base, dtype_backend="numpy_nullable")  # ints stay ints
    slow = df.copy()
    for c in ("time_ms", "time_ms_p20", "time_ms_p80"):
        slow[c] = slow[c] * 3
    new = tmp_path / "new"
    new.mkdir()
    slow.to_parquet(new / "slow.parquet")
    r = run("compare", str(base), str(new), "--threshold", "5%")
    assert r.exit_code == 1
    head = r.output.splitlines()[:2]
    assert head[0].startswith("base: run ") and head[1].startswith("new: run ")
    assert all("2 timing rounds" in h and "GB/s" in h for h in head), head
    assert "regression" in r.output and "0 improvements" in r.output
    r = run("compare", str(new), str(base))
    assert r.exit_code == 0 and "0 regressions" in r.output and "improvement" in r.output


def test_bench_exit_status_follows_the_rows(run, cubic_dist, tmp_path):
    make_dist(cubic_dist, "cubic-wrong", {"cubic_wrong": WRONG_PLUGIN},
              {"cubic_wrong": "cubic_wrong"})
    import lossreg.registry as reg

    reg._DEFAULT = None
    args = ["bench", "cubic", "--device", "cpu", "--sizes", "quick", "--rounds", "1",
            "--impl", "wrong", "--no-plots", "--out", str(tmp_path / "r")]
    r = run(*args)
    assert r.exit_code == 1 and "fail" in r.output
    r = run(*args, "--allow-failures")
    assert r.exit_code == 0
