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


def test_right_names_wrong_types_are_skipped_by_name(tmp_path):
    ResultWriter(tmp_path, "r").write([_row("r")])
    junk = pa.table({c: pa.array(["x"], pa.string()) for c in COLUMNS})  # n, time_ms ... as text
    pq.write_table(junk, tmp_path / "typed_wrong.parquet")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        df = load_results(tmp_path)
    messages = [str(w.message) for w in caught]
    assert any("typed_wrong.parquet" in m and "n is string, expected int64" in m
               for m in messages), messages
    assert len(df) == 1 and df.n.tolist() == [1024]
    with pytest.raises(ValueError, match=r"typed_wrong\.parquet.*time_ms is string"):
        load_results(tmp_path, strict=True)


def test_unknown_status_and_widened_types(tmp_path):
    # narrower ints and an int for a float column conform; an unknown status does not
    pq.write_table(pa.table({"loss": ["mse"], "status": ["ok"], "n": pa.array([7], pa.int32()),
                             "time_ms": pa.array([3], pa.int16())}), tmp_path / "narrow.parquet")
    pq.write_table(pa.table({"loss": ["mse"], "status": ["maybe"]}), tmp_path / "odd.parquet")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        df = load_results(tmp_path)
    assert [str(w.message) for w in caught if "odd.parquet" in str(w.message)]
    assert "maybe" not in set(df.status)
    assert df.n.tolist() == [7] and df.time_ms.tolist() == [3.0]
    assert str(df.n.dtype) == "int64"


def test_a_pandas_round_trip_loads_and_fractions_in_int_columns_do_not(tmp_path):
    """pandas writes a nullable int column (model_bytes with nulls) as floats: whole
    numbers load back as ints; 1.5 in an int column is refused, naming the column."""
    ResultWriter(tmp_path / "run", "r").write([_row("r", n=3), {**_row("r", n=4),
                                                                "model_bytes": 96}])
    df = load_results(tmp_path / "run")
    df.to_parquet(tmp_path / "pandas.parquet")
    assert pq.read_schema(tmp_path / "pandas.parquet").field("model_bytes").type == pa.float64()
    again = load_results(tmp_path / "pandas.parquet", strict=True)
    assert again.n.tolist() == [3, 4] and str(again.n.dtype) == "int64"
    assert again.model_bytes.isna().tolist() == [True, False] and again.model_bytes[1] == 96
    df.assign(n=[3.0, 1.5]).to_parquet(tmp_path / "fraction.parquet")
    with pytest.raises(ValueError, match=r"fraction\.parquet.*1\.5"):
        load_results(tmp_path / "fraction.parquet", strict=True)


def test_full_disk_raises_one_line_and_keeps_written_rows(tmp_path, monkeypatch):
    import errno

    from lossreg import results

    w = ResultWriter(tmp_path, "r")
    w.write([_row("r", n=1), _row("r", n=2)])

    def full(table, where, **kw):
        open(where, "wb").write(b"partial")  # what a write cut short leaves
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(results.pq, "write_table", full)
    with pytest.raises(results.ResultsWriteError) as info:
        w.write([_row("r", n=3)])
    assert isinstance(info.value, OSError) and info.value.errno == errno.ENOSPC
    message = str(info.value)
    assert "\n" not in message and "disk full" in message and "2 rows" in message
    with pytest.raises(results.ResultsWriteError, match="consolidated"):
        w.finish()
    monkeypatch.undo()
    assert not list(tmp_path.rglob(".*.tmp"))  # no half-written temporary left
    assert sorted(load_results(tmp_path).n) == [1, 2]
    assert w.finish() is not None and sorted(load_results(tmp_path).n) == [1, 2]


def test_unwritable_out_raises_results_write_error(tmp_path):

    from lossreg.results import ResultsWriteError

    blocked = tmp_path / "file_not_dir"
    blocked.write_text("a file where the out folder should be")
    with pytest.raises(ResultsWriteError, match="cannot write results to"):
        ResultWriter(blocked, "r").write([_row("r")])


def test_read_only_out_raises_results_write_error(tmp_path):
    import os

    from lossreg.results import ResultsWriteError

    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):  # root ignores permission bits
            pytest.skip("running as a user that can write anywhere")
        with pytest.raises(ResultsWriteError, match="no rows were written"):
            ResultWriter(ro, "r").write([_row("r")])
    finally:
        ro.chmod(0o700)
