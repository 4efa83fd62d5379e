"""The results dataset: one fixed Parquet schema, rows written as a run goes.

Layout under ``out``::

    <out>/<run_id>/part-00000.parquet   while the run goes (one file per case, atomic)
    <out>/run-<run_id>.parquet          the run, consolidated once it finished
    <out>/plots/_<run_id>/*.png         its plots

A crash or Ctrl-C leaves the part files, which read like any other. The plots folder
starts with ``_`` because Parquet readers (``pandas.read_parquet(out)``) skip names
starting with ``_`` or ``.``, and would otherwise choke on the PNGs.
"""

from __future__ import annotations

import errno
import os
import shutil
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

if TYPE_CHECKING:  # pandas loads when a DataFrame is made (to_pandas), not at import
    import pandas as pd

SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("timestamp", pa.timestamp("us", tz="UTC")),
        ("lossreg_version", pa.string()),
        ("git_commit", pa.string()),
        ("hostname", pa.string()),
        ("device_type", pa.string()),
        ("device_name", pa.string()),
        ("torch_version", pa.string()),
        ("triton_version", pa.string()),
        ("python_version", pa.string()),
        ("loss", pa.string()),
        ("family", pa.string()),
        ("impl", pa.string()),
        ("impl_kind", pa.string()),
        ("backend", pa.string()),
        ("plugin", pa.string()),
        ("check", pa.string()),
        ("mode", pa.string()),
        ("dtype", pa.string()),
        ("x_name", pa.string()),
        ("n", pa.int64()),
        ("params", pa.string()),
        ("status", pa.string()),
        ("message", pa.string()),
        ("max_abs_err", pa.float64()),
        ("rel_err", pa.float64()),
        ("atol", pa.float64()),
        ("rtol", pa.float64()),
        ("time_ms", pa.float64()),
        ("time_ms_p20", pa.float64()),
        ("time_ms_p80", pa.float64()),
        ("repeats", pa.int64()),
        ("gbps", pa.float64()),
        ("tflops", pa.float64()),
        ("peak_bytes", pa.int64()),
        ("speedup", pa.float64()),
        ("peak_gbps", pa.float64()),
        ("bw_fraction", pa.float64()),
        ("rounds", pa.int64()),
        ("world_size", pa.int64()),
        ("rank", pa.int64()),
        ("comm_bytes", pa.int64()),
        ("model_bytes", pa.int64()),
        ("case_seconds", pa.float64()),
    ]
)
COLUMNS = SCHEMA.names
STATUSES = ("ok", "fail", "error", "skipped")


class ResultsWriteError(OSError):
    """The results could not be written (disk full, ``--out`` not writable). Its message
    is one line saying where and why, and how many rows are already safe on disk."""

    def __str__(self) -> str:  # the sentence, without OSError's "[Errno N]" prefix
        return self.strerror or super().__str__()


def _write_error(what: str, path: Path, exc: OSError, kept: str) -> ResultsWriteError:
    reason = "disk full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
    return ResultsWriteError(exc.errno, f"cannot {what} {str(path)!r}: {reason}; {kept}")


def check_writable(out: str | os.PathLike) -> None:
    """Fail before a run when ``out`` cannot be created or written (nothing is made)."""
    out = Path(out)
    probe = out
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe.exists() and (not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK)):
        code = errno.ENOTDIR if not probe.is_dir() else errno.EACCES
        raise ResultsWriteError(code, f"cannot write results to {str(out)!r}: "
                                f"{str(probe)!r} is "
                                + ("not a folder" if not probe.is_dir() else "not writable"))


def to_table(rows: Iterable[dict]) -> pa.Table:
    rows = list(rows)
    unknown = {k for r in rows for k in r} - set(COLUMNS)
    if unknown:
        raise ValueError(f"rows carry columns outside the schema: {sorted(unknown)}")
    return pa.Table.from_pylist([{c: r.get(c) for c in COLUMNS} for r in rows], schema=SCHEMA)


def write_atomic(table: pa.Table, path: Path) -> None:
    """Write to a hidden temporary name in the same folder, then rename into place; a
    failed write leaves no temporary file behind."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(text: str, path: Path) -> None:
    """Text files (reports) get the same temporary-name-then-rename treatment."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class ResultWriter:
    """Appends rows for one run; each `write` is one atomic Parquet file."""

    def __init__(self, out: str | os.PathLike, run_id: str):
        self.out = Path(out)
        self.run_id = run_id
        self.part_dir = self.out / run_id
        self.final = self.out / f"run-{run_id}.parquet"
        self.parts = 0
        self.rows = 0

    def _kept(self) -> str:
        if not self.rows:
            return "no rows were written"
        return f"the {self.rows} rows written before are kept in {str(self.location)!r}"

    def write(self, rows: list[dict]) -> None:
        """One atomic part file; ``ResultsWriteError`` (an OSError) when the disk is full
        or the folder is not writable, the parts already written untouched."""
        if not rows:
            return
        table = to_table(rows)
        path = self.part_dir / f"part-{self.parts:05d}.parquet"
        try:
            self.part_dir.mkdir(parents=True, exist_ok=True)
            write_atomic(table, path)
        except OSError as exc:
            raise _write_error("write results to", self.part_dir, exc, self._kept()) from exc
        self.parts += 1
        self.rows += len(rows)

    def finish(self, rows: list[dict] | None = None) -> Path | None:
        """Consolidate the parts into one file; the parts go only once it is in place.
        Calling it again after that is a no-op.

        ``rows``, when given, are every row written, some updated since (later timing
        rounds refine throughput rows); they replace the parts' copies. Their count must
        match what was written: a consolidation never drops a row."""
        if not self.parts:
            return None
        if self.final.exists() and not self.part_dir.exists():
            return self.final
        if rows is not None:
            if len(rows) != self.rows:
                raise ValueError(f"finish() got {len(rows)} rows, {self.rows} were written")
            table = to_table(rows)
        else:
            table = pa.concat_tables(
                pq.read_table(p, schema=SCHEMA)
                for p in sorted(self.part_dir.glob("part-*.parquet")))
        try:
            write_atomic(table, self.final)
        except OSError as exc:
            raise _write_error("write the consolidated run", self.final, exc,
                               self._kept()) from exc
        trash = self.out / f"_{self.run_id}.parts-done"
        os.replace(self.part_dir, trash)
        shutil.rmtree(trash, ignore_errors=True)
        return self.final

    @property
    def location(self) -> Path:
        return self.final if self.final.exists() else self.part_dir


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(("_", ".")) for part in path.relative_to(root).parts)


def _type_conforms(expected: pa.DataType, actual: pa.DataType) -> bool:
    """The column's type is the schema's, or one that converts to it without loss of
    meaning: all nulls, a narrower int (or an int for a float), a float for an int
    (pandas writes a nullable int column as floats; `conform` refuses fractions), large
    or dictionary strings, a timestamp of another unit."""
    if actual == expected or pa.types.is_null(actual):
        return True
    if pa.types.is_dictionary(actual):
        actual = actual.value_type
    if pa.types.is_string(expected):
        return pa.types.is_string(actual) or pa.types.is_large_string(actual)
    if pa.types.is_integer(expected):
        return pa.types.is_integer(actual) or pa.types.is_floating(actual)
    if pa.types.is_floating(expected):
        return pa.types.is_floating(actual) or pa.types.is_integer(actual)
    if pa.types.is_timestamp(expected):
        return pa.types.is_timestamp(actual)
    return False


def conform(t: pa.Table) -> pa.Table:
    """The table in the schema's column order and types (missing columns null, extra ones
    kept at the end); ValueError naming every column whose type is not the schema's and
    every unknown status."""
    if "loss" not in t.column_names or "status" not in t.column_names:
        raise ValueError("not a lossreg results file (no loss/status columns)")
    wrong = [f"{c} is {t.schema.field(c).type}, expected {SCHEMA.field(c).type}"
             for c in COLUMNS
             if c in t.column_names and not _type_conforms(SCHEMA.field(c).type,
                                                           t.schema.field(c).type)]
    if wrong:
        raise ValueError("column types differ from the schema: " + "; ".join(wrong))
    for c in COLUMNS:
        if c not in t.column_names:
            t = t.append_column(c, pa.nulls(t.num_rows, SCHEMA.field(c).type))
    extra = [c for c in t.column_names if c not in COLUMNS]
    t = t.select(COLUMNS + extra)
    try:  # safe casts: a float that is not a whole number is refused, not truncated
        t = t.cast(pa.schema([SCHEMA.field(c) for c in COLUMNS]
                             + [t.schema.field(c) for c in extra]))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise ValueError(f"column values do not fit the schema's types: {exc}") from None
    statuses = {s for s in t.column("status").unique().to_pylist()}
    unknown = sorted(str(s) for s in statuses - set(STATUSES))
    if unknown:
        raise ValueError(f"status values {unknown} are not among {list(STATUSES)}")
    return t


def load_results(path: str | os.PathLike = "results", strict: bool = False) -> pd.DataFrame:
    """Every row under `path` (a directory of runs, or one Parquet file) as a DataFrame.

    Files written before a column existed load with nulls in it. A file that is not
    readable Parquet, or whose columns' types are not the schema's (see `conform`), is
    skipped with a warning naming it, or raises ValueError with ``strict=True``.
    """
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"no results at {str(root)!r}")
    if root.is_file():
        files = [root]
    else:
        files = sorted(p for p in root.rglob("*.parquet") if not _hidden(p, root))
    tables = []
    for f in files:
        try:
            tables.append(conform(pq.read_table(f)))
        except Exception as exc:  # noqa: BLE001 - any unreadable file is skipped or raised
            if strict:
                raise ValueError(f"unreadable results file {str(f)!r}: {exc}") from exc
            warnings.warn(f"skipping unreadable results file {str(f)!r}: {exc}", stacklevel=2)
    if not tables:
        return SCHEMA.empty_table().to_pandas()
    return pa.concat_tables(tables, promote_options="default").to_pandas()
