"""lossreg: a plugin registry of loss functions and a harness that proves and times them.

The public names load on first use (module ``__getattr__``), so ``import lossreg`` and
``lossreg --help`` pay for neither torch nor pandas; a plugin's ``from lossreg import
LossSpec`` loads only the spec module (and torch, which it needs anyway).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

#: public name -> the submodule that defines it
_LAZY = {
    "Case": "spec",
    "Impl": "spec",
    "LossSpec": "spec",
    "UnsupportedOption": "spec",
    "SpecError": "spec",
    "hookimpl": "hookspecs",
    "get": "registry",
    "losses": "registry",
    "reload": "registry",
    "PluginError": "registry",
    "UnknownLossError": "registry",
    "load_results": "results",
    "ResultsWriteError": "results",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'lossreg' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # the next access is a plain lookup
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


def check(names=None, **kwargs):
    """Correctness and gradient checks; returns the rows as a DataFrame."""
    from .api import check as _check

    return _check(names, **kwargs)


def bench(names=None, **kwargs):
    """Checks plus throughput, written as Parquet under ``out`` (default ``results``),
    then plots and a summary (`lossreg.api.bench`)."""
    from .api import bench as _bench

    return _bench(names, **kwargs)


__all__ = ["Case", "Impl", "LossSpec", "PluginError", "ResultsWriteError", "SpecError",
           "UnknownLossError", "UnsupportedOption", "bench", "check", "get", "hookimpl",
           "load_results", "losses", "reload"]
