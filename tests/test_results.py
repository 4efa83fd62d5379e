"""The Parquet dataset: schema, atomic writes, several runs, old and foreign files."""

import datetime as dt
import warnings

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lossreg.results import COLUMNS, SCHEMA, ResultWriter, load_results

DESIGN_COLUMNS = """run_id, timestamp, lossreg_version, git_commit, hostname, device_type,
device_name, torch_version, triton_version, python_version, loss, family, impl, impl_kind,
backend, plugin, check, mode, dtype, x_name, n, params, status, message, max_abs_err, rel_err,
atol, rtol, time_ms, time_ms_p20, time_ms_p80, repeats, gbps, tflops, peak_bytes, speedup,
peak_gbps, bw_fraction"""
# "New columns may be added; existing ones are never renamed."
ADDED_COLUMNS = ["rounds", "world_size", "rank", "comm_bytes", "model_bytes", "case_seconds"]


def _row(run_id, **kw):
    base = {"run_id": run_id, "timestamp": dt.datetime.now(dt.timezone.utc), "loss": "mse",
            "impl": "reference", "check": "throughput", "mode": "full", "dtype": "float32",
            "n": 1024, "status": "ok", "time_ms": 0.5, "params": "{}"}
    base.update(kw)
    return base


def test_schema_is_exactly_the_design():
    assert COLUMNS == [c.strip() for c in DESIGN_COLUMNS.replace("\n", " ").split(",")] + \
        ADDED_COLUMNS


def test_round_trip_several_runs_with_plots(tmp_path):
    for run_id in ("r1", "r2"):
        w = ResultWriter(tmp_path, run_id)
        w.write([_row(run_id, n=10), _row(run_id, n=20, time_ms=None, status="skipped")])
        w.write([_row(run_id, n=30, peak_bytes=123)])
        if run_id == "r1":
            w.finish()
    (tmp_path / "plots" / "_r1").mkdir(parents=True)
    (tmp_path / "plots" / "_r1" / "time.png").write_bytes(b"\x89PNG not parquet")
    df = pd.read_parquet(tmp_path)
    assert list(df.columns) == COLUMNS
    assert len(df) == 6 and sorted(df.run_id.unique()) == ["r1", "r2"]
    assert (tmp_path / "run-r1.parquet").exists() and not (tmp_path / "r1").exists()
    assert len(list((tmp_path / "r2").glob("part-*.parquet"))) == 2  # unfinished run: parts
    loaded = load_results(tmp_path)
    pd.testing.assert_frame_equal(
        loaded.sort_values(["run_id", "n"]).reset_index(drop=True),
        df.sort_values(["run_id", "n"]).reset_index(drop=True))
    assert (loaded.loc[loaded.n == 30, "peak_bytes"] == 123).all()


def test_unknown_column_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="outside the schema"):
        ResultWriter(tmp_path, "r").write([_row("r", colour="red")])


def test_old_files_load_with_nulls_and_corrupt_files_are_skipped(tmp_path):
    old = pa.table({"loss": ["mse"], "status": ["ok"], "n": pa.array([5], pa.int64())})
    pq.write_table(old, tmp_path / "old.parquet")
    (tmp_path / "junk.parquet").write_bytes(b"definitely not parquet")
    ResultWriter(tmp_path, "r").write([_row("r")])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        df = load_results(tmp_path)
    assert any("junk.parquet" in str(w.message) for w in caught)
    assert len(df) == 2 and list(df.columns) == COLUMNS
    assert df.loc[df.n == 5, "time_ms"].isna().all()
    with pytest.raises(ValueError, match="junk.parquet"):
        load_results(tmp_path, strict=True)


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_results(tmp_path / "nope")


def test_empty_schema_table():
    assert SCHEMA.empty_table().num_columns == len(COLUMNS)
