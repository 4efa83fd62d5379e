"""Maxima and minima that propagate NaN as torch's do.

``tl.maximum``/``tl.minimum`` and the ``tl.max``/``tl.min`` reductions return the other
operand when one is NaN (IEEE maxNum; the interpreter's ``tl.maximum`` is numpy's
``fmax``), so a kernel built on them turns a NaN input into a finite loss where
``torch.max``, ``torch.amax``, ``clamp`` and ``relu`` give NaN. These return NaN when
either operand (or any reduced element) is NaN. On sm_80+ they compile to the same single
``max.NaN``/``min.NaN`` instruction as the plain ones: no extra cost.
"""

from __future__ import annotations

from . import HAVE_TRITON, jit, tl

if HAVE_TRITON:

    @jit
    def maximum(a, b):
        """max(a, b), NaN when either is NaN (torch.maximum)."""
        return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)

    @jit
    def minimum(a, b):
        """min(a, b), NaN when either is NaN (torch.minimum)."""
        return tl.minimum(a, b, propagate_nan=tl.PropagateNan.ALL)

    @jit
    def amax(x, axis):
        """Maximum along ``axis``, NaN where a reduced element is NaN (torch.amax)."""
        return tl.reduce(x, axis, maximum)

    @jit
    def amin(x, axis):
        """Minimum along ``axis``, NaN where a reduced element is NaN (torch.amin)."""
        return tl.reduce(x, axis, minimum)

    @jit
    def isnan(x):
        """True where ``x`` is NaN (the only value unequal to itself)."""
        return x != x  # noqa: PLR0124
