"""lossreg: a plugin registry of loss functions and a harness that proves and times them."""

from .hookspecs import hookimpl
from .registry import get, losses, reload
from .results import load_results
from .spec import Case, Impl, LossSpec, UnsupportedOption

__version__ = "0.1.0"


def check(names=None, **kwargs):
    """Correctness and gradient checks; returns the rows as a DataFrame."""
    from .harness import check as _check

    return _check(names, **kwargs)


def bench(names=None, **kwargs):
    """Checks plus throughput, written as Parquet under ``out`` (default ``results``)."""
    from .harness import bench as _bench

    return _bench(names, **kwargs)


__all__ = ["Case", "Impl", "LossSpec", "UnsupportedOption", "bench", "check", "get", "hookimpl", "load_results",
           "losses", "reload"]
