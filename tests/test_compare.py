"""`lossreg compare`'s verdicts on result sets built here, where the truth is known."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from lossreg.cli import main
from lossreg.compare import MIN_ROWS_TO_NORMALIZE, compare, summary_line


def _run(times: np.ndarray, spread: float = 0.05, run_id: str = "r") -> pd.DataFrame:
    n = len(times)
    return pd.DataFrame({
        "run_id": run_id, "git_commit": "abc", "device_name": "cpu", "loss": "sq",
        "impl": "fast", "dtype": "float32", "n": np.arange(n) * 64 + 67, "mode": "full",
        "check": "throughput", "status": "ok", "time_ms": times,
        "time_ms_p20": times * (1 - spread), "time_ms_p80": times * (1 + spread),
        "peak_gbps": 20.0, "rounds": 5,
    })


@pytest.fixture
def machine_shift():
    """NEW ran on a machine 1.3x slower overall; one row also truly got 2x slower."""
    rng = np.random.default_rng()
    t = rng.uniform(0.05, 50.0, size=16)
    slower = t * 1.3
    slower[7] *= 2.0
    return _run(t), _run(slower, run_id="s")


def test_a_machine_shift_flags_every_row_unless_normalized(machine_shift):
    base, new = machine_shift
    plain = compare(base, new, 0.10)
    assert (plain["verdict"] == "regression").all()
    assert plain.attrs["shift"] == pytest.approx(1.3)
    assert "run-wide median ratio 1.300" in summary_line(plain)

    norm = compare(base, new, 0.10, normalize=True)
    flagged = norm[norm["verdict"] == "regression"]
    assert list(flagged["n"]) == [7 * 64 + 67]
    assert flagged["ratio"].iloc[0] == pytest.approx(2.0)
    assert (norm.loc[norm["verdict"] != "regression", "ratio"].sub(1).abs() < 1e-9).all()
    assert "divided by the run-wide shift 1.300" in summary_line(norm)


def test_overlapping_bands_are_not_a_regression_even_past_the_threshold():
    t = np.random.default_rng().uniform(1.0, 5.0, size=12)
    # 15% slower medians, but the +-20% bands overlap: noise, not a regression
    table = compare(_run(t, spread=0.2), _run(t * 1.15, spread=0.2), 0.10)
    assert (table["verdict"] == "unchanged").all()


def test_normalize_needs_enough_rows():
    t = np.random.default_rng().uniform(1.0, 5.0, size=MIN_ROWS_TO_NORMALIZE - 1)
    with pytest.raises(ValueError, match=f"at least {MIN_ROWS_TO_NORMALIZE} rows"):
        compare(_run(t), _run(t * 2), 0.1, normalize=True)


def test_cli_says_when_rows_moved_together(machine_shift, tmp_path):
    base, new = machine_shift
    base.to_parquet(tmp_path / "base.parquet")
    new.to_parquet(tmp_path / "new.parquet")
    r = CliRunner().invoke(main, ["compare", str(tmp_path / "base.parquet"),
                                  str(tmp_path / "new.parquet"), "--threshold", "10%"])
    assert r.exit_code == 1 and "note: the rows moved together (median ratio 1.300)" in r.output
    r = CliRunner().invoke(main, ["compare", str(tmp_path / "base.parquet"),
                                  str(tmp_path / "new.parquet"), "--threshold", "10%",
                                  "--normalize"])
    assert r.exit_code == 1 and "1 regressions, 0 improvements, 15 unchanged" in r.output
    assert "note:" not in r.output

    few = tmp_path / "few.parquet"
    base.head(3).to_parquet(few)
    r = CliRunner().invoke(main, ["compare", str(few), str(few), "--normalize"])
    assert r.exit_code == 2 and "normalize needs at least" in r.output
    assert "Traceback" not in r.output
