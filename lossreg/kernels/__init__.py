"""Triton kernel templates shared by all losses (and usable by third-party plugins).

Triton is optional: without it, `jit` leaves functions as plain Python and `tl` is a
stand-in, so plugin modules that define kernels still import; their implementations
declare ``requires=("triton",)`` and show as unavailable.

Without a visible GPU, Triton kernels can only run under the interpreter, so importing
this package turns ``TRITON_INTERPRET=1`` on by default when CUDA is not available (it
must be set before any kernel is defined). An explicit ``TRITON_INTERPRET`` wins.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True

    def jit(fn=None, **kwargs):
        """``triton.jit`` that also makes ``tl`` visible to the function (the
        interpreter needs ``triton.language`` among a kernel's globals)."""

        def wrap(f):
            f.__globals__.setdefault("tl", tl)
            return triton.jit(f, **kwargs)

        return wrap(fn) if fn is not None else wrap
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    HAVE_TRITON = False

    class _MissingTriton:
        def __getattr__(self, name):
            raise ImportError("triton is not installed (pip install 'lossreg[dev]' on Linux)")

    tl = _MissingTriton()

    def jit(fn=None, **kwargs):
        return fn if fn is not None else (lambda f: f)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Every template's accumulator: float64 stays float64, any other dtype float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tl_acc(dtype: torch.dtype, wide: bool = False):
    """`acc_dtype` as the Triton type a kernel's ``ACC`` constexpr takes (``wide``:
    float64 whatever the input)."""
    return tl.float64 if wide or dtype == torch.float64 else tl.float32


def interpreting() -> bool:
    """True when Triton kernels run on CPU tensors under the interpreter."""
    return HAVE_TRITON and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


if interpreting():  # bfloat16 rounding and tl.dot as on a GPU
    from .interp_patches import install as _install_patches

    _install_patches()


def launch_guard():
    """Context for launching template kernels. Under the interpreter, numpy would warn
    about IEEE results a GPU gives silently (log(0) in a masked lane, exp overflow to
    inf that the loss then reports): those warnings are noise, so they are silenced."""
    if interpreting():
        import numpy as np

        return np.errstate(all="ignore")
    return contextlib.nullcontext()


def guarded(fn):
    """Decorator: run ``fn`` (a forward or backward that launches kernels) under
    :func:`launch_guard`."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with launch_guard():
            return fn(*args, **kwargs)

    return wrapper


#: Every kernel instance built from a template, so that one test compiles them all
#: ahead of time for sm_80 and sm_90. Filled by the templates at definition time.
TEMPLATE_INSTANCES: list = []


def template_instances() -> list:
    return list(TEMPLATE_INSTANCES)


from . import libm  # noqa: E402
from .pointwise import PointwiseLoss, pointwise_loss  # noqa: E402
from .rowwise import RowwiseLoss, rowwise_loss  # noqa: E402

__all__ = [
    "HAVE_TRITON",
    "PointwiseLoss",
    "RowwiseLoss",
    "interpreting",
    "jit",
    "launch_guard",
    "libm",
    "pointwise_loss",
    "rowwise_loss",
    "template_instances",
    "tl",
    "triton",
]
