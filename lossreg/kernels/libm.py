"""Accurate ``exp`` and ``log1p`` for kernels.

On the GPU ``tl.exp`` is ``ex2.approx(x * log2(e))``: a few ulps off and, near the
float32 overflow threshold, it can return inf one or two values of ``x`` before an
eager ``torch.exp`` does. Losses whose overflow must match the reference's (the
exponential family) use these instead: libdevice's correctly behaved ``__nv_expf`` /
``__nv_log1pf`` when compiling for CUDA. The interpreter has no libdevice, so there they
fall back to ``tl.exp`` (numpy's exp) and a log1p built from ``tl.log`` that is exact
to a few ulps (Goldberg's trick: ``log(u) * x / (u - 1)`` with ``u = 1 + x``).
"""

from __future__ import annotations

from . import HAVE_TRITON, interpreting, jit, tl

if HAVE_TRITON and not interpreting():
    from triton.language.extra import libdevice

    @jit
    def exp(x):
        return libdevice.exp(x)

    @jit
    def log1p(x):
        return libdevice.log1p(x)

else:

    @jit
    def exp(x):
        return tl.exp(x)

    @jit
    def log1p(x):
        u = 1.0 + x
        # u == 1 exactly when x is below half an ulp of 1: then log1p(x) == x to rounding
        safe = tl.where(u == 1.0, 2.0, u)
        return tl.where(u == 1.0, x, tl.log(safe) * (x / (safe - 1.0)))
