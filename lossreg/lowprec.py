"""Low-precision verdicts: what a bfloat16 or float16 row is judged on besides its
norm tolerance.

A 16-bit implementation's error against the float64 reference is rounding noise: each
rounding moves a value by at most one unit roundoff ``u`` (bfloat16 2^-8, float16
2^-11), in either direction. Where the loss is ill-conditioned in 16 bits (a distance
of ~5 rounded to bfloat16, then a hinge on a difference of two such distances near 0)
that noise reaches several percent and the spec declares a wider tolerance with the
reason in its description. A tolerance of 1% or more (bfloat16's default rtol 2e-2,
every widened one) must not let a wrong implementation through: an output or gradient
that is off by a common factor (a missing or doubled scale, a 1/n taken as 1/(n-1)) is
not noise, whatever the loss's conditioning. So every such 16-bit verdict also fits
``out = (1 + beta) ref`` by least squares and fails when ``|beta|`` exceeds what rounding explains: one unit roundoff per
rounding of a shared scalar (a rounded 1/n scales every element alike; two allowed) plus four standard
errors of the fit (heteroscedastic: rounding noise grows with the value). At a widened
tolerance this holds even where the absolute floor ``atol`` would pass the result (a
mean-reduced gradient's elements are far below bfloat16's floor of 4e-3). At the
default bfloat16 tolerance it holds where the result passes on its relative error
(rel <= 2e-2: a 1% factor passes there, and the fit rejects it); a result whose
relative error is above 2e-2 and that passes only on the floor is judged by the floor
alone, as before: its values are rounding noise near zero (a softmax gradient at
temperature 0.02 whose probabilities round to 1, a split criterion's gradient that is
a cancelling difference), where a fitted "factor" measures the noise, not the code.

`systematic_error` is called by `lossreg.verify.compare_tensors` for every verdict;
it says nothing below an rtol of `FIT_FROM_RTOL`, for float32/float64, or for fewer
than `MIN_ELEMENTS` values carrying the norm (a scalar's error cannot be split into a
factor and noise: its gradient's verdict catches the factor).
"""

from __future__ import annotations

import math

import torch

from .tolerances import default_tolerance

#: unit roundoff (half the machine epsilon) of the dtypes judged here
UNIT_ROUNDOFF: dict[torch.dtype, float] = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
#: roundings of shared scalars a correct implementation may compound, each at most one
#: unit roundoff (u is already half the machine epsilon): a rounded 1/n, then the
#: product with the incoming gradient rounded again (the Triton pointwise template saves
#: the mean's gradient in the dtype and scales it in place when the incoming gradient
#: is not 1: mae's at n=1000 comes out 1.18 u off, torch's one rounding 0.5 u)
SHARED_ROUNDINGS = 2
#: standard errors of the fitted factor allowed for noise
SIGMAS = 4.0
MIN_ELEMENTS = 16
#: the fit judges every 16-bit verdict whose rtol could pass a 1% common factor (the
#: default bfloat16 rtol 2e-2 and every widened one); below it the norm rejects it
FIT_FROM_RTOL = 1e-2


def scale_error(out64: torch.Tensor, ref64: torch.Tensor) -> tuple[float, float, float]:
    """(beta, its standard error, effective count) of the least-squares fit
    ``out - ref = beta * ref``. The standard error is the heteroscedastic one, taken from
    the whole difference (not the residual after the fit), so that one element holding
    most of the norm cannot make its own rounding look like a common factor; the
    effective count ``(sum r^2)^2 / sum r^4`` says how many elements carry the fit."""
    r2 = ref64 * ref64
    rr = float(r2.sum())
    if rr == 0.0:
        return 0.0, math.inf, 0.0
    diff = out64 - ref64
    beta = float((diff * ref64).sum()) / rr
    return beta, math.sqrt(float((diff * diff * r2).sum())) / rr, rr * rr / float((r2 * r2).sum())


def systematic_error(dtype: torch.dtype, out64: torch.Tensor, ref64: torch.Tensor,
                     rtol: float, what: str = "output", by_rtol: bool = True) -> str:
    """A failure message when a 16-bit result judged at an ``rtol`` of 1% or more is
    off by a common factor beyond what rounding explains; "" otherwise, and always
    below that rtol or for float32/float64. ``by_rtol``: the result passed on its
    relative error (not only on the absolute floor); at a dtype's default tolerance a
    result that passed only on the floor is not fitted. ``out64`` and ``ref64`` are
    the finite values, already in float64."""
    u = UNIT_ROUNDOFF.get(dtype)
    if u is None or rtol < FIT_FROM_RTOL or out64.numel() < MIN_ELEMENTS:
        return ""
    if not by_rtol and rtol <= default_tolerance(dtype)[0]:
        return ""  # judged on the absolute floor at the default tolerance: see above
    beta, se, count = scale_error(out64, ref64)
    if count < MIN_ELEMENTS:
        return ""
    allowed = SHARED_ROUNDINGS * u + SIGMAS * se
    if abs(beta) <= allowed:
        return ""
    return (f"{what}: off by a common factor {1 + beta:.4g} (|beta| {abs(beta):.3g} > "
            f"{allowed:.3g}, what {str(dtype).removeprefix('torch.')} rounding explains)")
