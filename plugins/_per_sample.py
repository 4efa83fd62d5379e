"""Per-sample sums of elementwise terms on the Triton templates, shared by the autoencoder
and bayesian plugins (not a plugin: no hooks).

Their losses are ``loss_i = sum_j f(a_ij, b_ij)`` over the features ``j`` of sample ``i``
(squared error, binary cross-entropy, the Gaussian KL), reduced over samples. One
elementwise term feeds two templates:

* ``mean`` and ``sum`` need no per-sample structure: the pointwise template over all
  elements, the term scaled by ``p0``. ``mean`` over samples is the template's mean over
  the N*D elements with ``p0 = D``: an integer, exact in float32, so float64 inputs keep
  float64 accuracy. One read of each input, gradients written in the forward.
* ``none`` needs one sum per row: the aligned-rows template, whose tile holds whole rows
  up to ``aligned_rows.MAX_D`` features. Wider samples take the pointwise template's
  per-element losses and sum them (one extra pass over the per-element losses).
"""

from __future__ import annotations

import math

import torch

from lossreg.kernels import jit, libm, pointwise_loss, tl
from lossreg.kernels.aligned_rows import MAX_D, aligned_rows_loss

#: torch clamps each log of binary_cross_entropy at -100 so that p in {0, 1} is finite.
LOG_CLAMP = -100.0


# ---------------------------------------------------------------- elementwise terms
@jit
def _sq(x, y, p0):
    """p0 (x - y)^2 and its derivatives."""
    d = x - y
    return p0 * d * d, 2.0 * p0 * d, -2.0 * p0 * d


@jit
def _bce_prob(p, y, p0):
    """p0 * -[y log p + (1 - y) log(1 - p)], each log clamped at -100 as torch does; a
    clamped log is a constant (no gradient through it)."""
    log_p = tl.log(p)
    log_q = libm.log1p(-p)
    keep_p = log_p >= -100.0
    keep_q = log_q >= -100.0
    log_p = tl.maximum(log_p, -100.0)
    log_q = tl.maximum(log_q, -100.0)
    loss = -(y * log_p + (1.0 - y) * log_q)
    dp = tl.where(keep_q, (1.0 - y) / (1.0 - p), 0.0) - tl.where(keep_p, y / p, 0.0)
    return p0 * loss, p0 * dp, p0 * (log_q - log_p)


@jit
def _bce_logit(z, y, p0):
    """p0 * -[y log sigma(z) + (1 - y) log sigma(-z)] in the stable form
    max(z, 0) - z y + log(1 + e^{-|z|})."""
    e = tl.exp(-tl.abs(z))
    loss = tl.maximum(z, 0.0) - z * y + libm.log1p(e)
    inv = 1.0 / (1.0 + e)
    sig = tl.where(z >= 0, inv, e * inv)  # sigma(z) without cancellation
    return p0 * loss, p0 * (sig - y), -p0 * z


@jit
def _kl(mu, logvar, p0):
    """p0 * KL(N(mu, e^logvar) || N(0, 1)) of one coordinate."""
    half_var = 0.5 * tl.exp(logvar)
    loss = half_var + 0.5 * (mu * mu - logvar - 1.0)
    return p0 * loss, p0 * mu, p0 * (half_var - 0.5)


# ---------------------------------------------------------------- template adapters
@jit
def _sq_term(x, y, p0, p1):
    return _sq(x, y, p0)


@jit
def _bce_prob_term(x, y, p0, p1):
    return _bce_prob(x, y, p0)


@jit
def _bce_logit_term(x, y, p0, p1):
    return _bce_logit(x, y, p0)


@jit
def _kl_term(x, y, p0, p1):
    return _kl(x, y, p0)


# Row versions: the template pads rows with zeros (valid is False there), where a term is
# not necessarily 0 (log 2 for bce on logits): padding is excluded from each row's sum.
@jit
def _sq_rows(a, b, c, valid, y, p0, p1, p2, p3):
    loss, da, db = _sq(a, b, p0)
    return tl.sum(tl.where(valid, loss, 0.0), axis=1), da, db, da


@jit
def _bce_prob_rows(a, b, c, valid, y, p0, p1, p2, p3):
    loss, da, db = _bce_prob(a, b, p0)
    return tl.sum(tl.where(valid, loss, 0.0), axis=1), da, db, da


@jit
def _bce_logit_rows(a, b, c, valid, y, p0, p1, p2, p3):
    loss, da, db = _bce_logit(a, b, p0)
    return tl.sum(tl.where(valid, loss, 0.0), axis=1), da, db, da


@jit
def _kl_rows(a, b, c, valid, y, p0, p1, p2, p3):
    loss, da, db = _kl(a, b, p0)
    return tl.sum(tl.where(valid, loss, 0.0), axis=1), da, db, da


class PerSampleSum:
    """``sum_j scale * f(a_ij, b_ij)`` per sample ``i``, reduced over samples, from the
    pointwise and aligned-rows instances of one term (see the module docstring)."""

    def __init__(self, name: str, term, rows_term, *, num_warps: int = 8,
                 max_width: int = MAX_D):
        self.name = name
        self.pointwise = pointwise_loss(term, name=name, num_warps=num_warps)
        #: widest sample the aligned-rows template takes (at most its MAX_D)
        self.max_width = min(max_width, MAX_D)
        self.rows = aligned_rows_loss(rows_term, name=f"{name}_rows", operands=2,
                                      aot_widths=(64, 1000, self.max_width))

    def __call__(self, a: torch.Tensor, b: torch.Tensor, reduction: str = "mean",
                 scale: float = 1.0) -> torch.Tensor:
        """``a``, ``b`` of one shape (N, *features) with at least one feature."""
        n = a.shape[0]
        features = math.prod(a.shape[1:])
        if reduction == "mean":
            return self.pointwise(a, b, "mean", p0=scale * features)
        if reduction == "sum":
            return self.pointwise(a, b, "sum", p0=scale)
        a2, b2 = a.reshape(n, features), b.reshape(n, features)
        if features <= self.max_width:
            return self.rows(a2, b2, reduction="none", p0=scale)
        return self.pointwise(a2, b2, "none", p0=scale).sum(dim=1)


squared_error = PerSampleSum("sample_squared_error", _sq_term, _sq_rows)
# the clamped logs are libdevice calls: 16 warps keep a block's values in registers
bce_probabilities = PerSampleSum("sample_bce", _bce_prob_term, _bce_prob_rows, num_warps=16)
bce_logits = PerSampleSum("sample_bce_logits", _bce_logit_term, _bce_logit_rows,
                          num_warps=16)
# ptxas holds a 4096-wide KL row of float16 in 64 registers with a spill: 2048 at most
gaussian_kl = PerSampleSum("sample_gaussian_kl", _kl_term, _kl_rows, num_warps=16,
                           max_width=2048)
