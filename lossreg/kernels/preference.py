"""Per-pair preference-loss terms (ORPO, CPO, SimPO, KTO) on the pointwise template.

Each loss of a pair of sequence log-probs ``(x, y)`` (chosen, rejected; or, for KTO,
policy and the reference point) is a ``term`` of :mod:`lossreg.kernels.pointwise`:
one launch reads both operands once and, for ``mean``/``sum``, writes both
gradients in the forward. Terms are evaluated in the accumulation dtype the template
takes from the input (float32, float64 for float64), with two scalar parameters:

* ``orpo``: ``p0 = beta`` (the paper's lambda); ``x, y`` per-token average log-probs;
  loss ``-x - beta log sigma(log odds_x - log odds_y)``, ``log odds(a) = a - log(1 - e^a)``.
* ``cpo``: ``p0 = beta``, ``p1 = alpha`` (NLL weight); loss
  ``-log sigma(beta (x - y)) - alpha x``.
* ``simpo``: ``p0 = beta``, ``p1 = gamma``; loss ``-log sigma(beta (x - y) - gamma)``.
* ``kto``: ``x`` the policy log-prob, ``y`` the reference log-prob plus the reference
  point z0 (in the accumulation dtype, never differentiated), ``z`` the signed weight
  (``+lambda_D`` desirable, ``-lambda_U`` undesirable); ``p0 = beta``; loss
  ``|z| (1 - sigma(sign(z) beta (x - y)))``.
"""

from __future__ import annotations

from . import jit, libm, tl
from .pointwise import PointwiseLoss


@jit
def neg_log_sigmoid(u):
    """(-log sigma(u), d/du = -sigma(-u)), stable at any |u|."""
    e = tl.exp(-tl.abs(u))
    loss = tl.maximum(-u, 0.0) + libm.log1p(e)
    inv = 1.0 / (1.0 + e)
    return loss, -tl.where(u >= 0, e * inv, inv)


@jit
def sigmoid(u):
    e = tl.exp(-tl.abs(u))
    inv = 1.0 / (1.0 + e)
    return tl.where(u >= 0, inv, e * inv)


@jit
def expm1(a):
    """e^a - 1 accurate near 0 (Kahan: (u - 1) a / log u with u = e^a)."""
    u = tl.exp(a)
    um1 = u - 1.0
    safe = tl.where((u == 1.0) | (um1 == -1.0), 2.0, u)
    out = um1 * a / tl.log(safe)
    out = tl.where(u == 1.0, a, out)
    return tl.where(um1 == -1.0, -1.0, out)


@jit
def log_odds(a):
    """(log(p / (1 - p)) for p = e^a, d/da = 1 / (1 - e^a)); a < 0."""
    m = -expm1(a)  # 1 - e^a without cancellation
    return a - tl.log(m), 1.0 / m


@jit
def orpo_term(x, y, p0, p1):
    ox, dox = log_odds(x)
    oy, doy = log_odds(y)
    loss, d = neg_log_sigmoid(ox - oy)
    return p0 * loss - x, p0 * d * dox - 1.0, -p0 * d * doy


@jit
def cpo_term(x, y, p0, p1):
    loss, d = neg_log_sigmoid(p0 * (x - y))
    return loss - p1 * x, p0 * d - p1, -p0 * d


@jit
def simpo_term(x, y, p0, p1):
    loss, d = neg_log_sigmoid(p0 * (x - y) - p1)
    return loss, p0 * d, -p0 * d


@jit
def kto_term(x, y, z, p0, p1):
    s = tl.where(z >= 0.0, 1.0, -1.0)
    w = tl.abs(z)
    v = s * p0 * (x - y)
    lose = sigmoid(-v)  # 1 - sigma(v)
    dx = -w * s * p0 * lose * sigmoid(v)
    return w * lose, dx, -dx


class AccOperandKernel(PointwiseLoss):
    """The pointwise template where the second and third operands are held in the
    accumulation dtype (float32; float64 for float64): KTO's reference log-prob shifted
    by z0 and its signed weights. The ahead-of-time compile covers that signature."""

    def aot_sources(self, dtype: str = "fp32"):
        acc = "*fp64" if dtype == "fp64" else "*fp32"
        return [(kernel, {k: (acc if k in ("Y", "DY", "Z") else v) for k, v in sig.items()},
                 constexprs, options)
                for kernel, sig, constexprs, options in super().aot_sources(dtype)]


ORPO = PointwiseLoss(orpo_term, "orpo", num_warps=16)
CPO = PointwiseLoss(cpo_term, "cpo", num_warps=16)
SIMPO = PointwiseLoss(simpo_term, "simpo", num_warps=16)
KTO = AccOperandKernel(kto_term, "kto", operands=3, num_warps=16)
