"""What ``lossreg check --world-size`` and ``lossreg bench --world-size`` do (and
either under torchrun): run the distributed checks or measurements, write the rows
to ``out`` from rank 0, and hand the table back (None on the other ranks)."""

from __future__ import annotations

from typing import Sequence

from .planning import HarnessError
from .ranks import RanksInterrupted
from .sharding import current


def _written(rows: list[dict], out: str | None):
    from .results import ResultWriter, to_table

    df = to_table(rows).to_pandas()
    if out and rows:
        writer = ResultWriter(out, rows[0]["run_id"])
        writer.write(rows)
        df.attrs["location"] = str(writer.finish())
    return df


def _stopped(stop, out):
    """The rows the ranks finished, written; then the run's usual Ctrl-C/SIGTERM end."""
    from .runner import Interrupted

    location = _written(stop.rows, out).attrs.get("location") if out and stop.rows else None
    raise Interrupted("a distributed run", stop.done, stop.total, len(stop.rows),
                      location or ("memory (no --out given)" if not out else "nowhere (none "
                                   "finished)"), stop.signum) from None


def _names(names: Sequence[str]) -> list[str]:
    if not names:
        raise HarnessError("--world-size needs the names of distributed losses (e.g. "
                           "vocab_parallel_cross_entropy)")
    return list(names)


def _device(device: str) -> str:
    return "cpu" if device == "auto" and current() is None else device


def _over_ranks(run, out):
    """``run()`` (the rows of a distributed run) after checking ``out``; rank 0 (or the
    only process) writes them and gets the table, other torchrun ranks None."""
    from .results import check_writable

    if out:
        check_writable(out)
    try:
        rows = run()
    except RanksInterrupted as stop:
        _stopped(stop, out)
    info = current()
    return None if info is not None and info.rank != 0 else _written(rows, out)


def check_command(names, world_size, device, dtypes, impls, sizes, out, case_timeout,
                  progress=None):
    """Every rank's forward and gradient shards against the float64 reference's slices
    (`lossreg.distributed.check_distributed`)."""
    from .distributed import check_distributed

    return _over_ranks(lambda: check_distributed(
        _names(names), world_size, device=_device(device), dtypes=dtypes or None,
        impls=impls or None, sizes=sizes, timeout=case_timeout or 300.0,
        progress=progress), out)


def bench_command(names, world_sizes, device, dtypes, impls, sizes, out, case_timeout,
                  progress=None):
    """Per-rank time, peak memory and bytes communicated per step at each world size
    (`lossreg.distributed_bench.bench_distributed`)."""
    from .distributed_bench import bench_distributed

    return _over_ranks(lambda: bench_distributed(
        _names(names), list(world_sizes) or None, device=_device(device),
        dtypes=dtypes or None, impls=impls or None, sizes=sizes or "quick",
        case_timeout_s=case_timeout or None, progress=progress), out)
