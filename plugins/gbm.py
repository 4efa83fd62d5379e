"""Section 6, gradient boosting machines: the robust regression losses whose negative
gradients boosting fits, mean absolute error, Huber and quantile (pinball). GBM's
classification loss is ``cross_entropy`` (neural_networks).

Residuals are ``r = target - input``. At a tie (``input == target``) the gradients are
the references' autograd ones: 0 for ``mae`` (torch's ``abs``), ``tau - 1/2`` for
``quantile`` (``torch.maximum`` splits a tie evenly); ``huber`` is smooth there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lossreg import Impl, LossSpec, hookimpl
from lossreg.kernels.traffic import streamed
from lossreg.kernels import jit, pointwise_loss, tl
from lossreg.validate import check_floating, check_number, check_reduction, check_same_shape

from ._common import POINTWISE_SIZES, pointwise_flops, reduce_loss, reductions


def _validate(loss, input, target, reduction):
    check_floating(loss, input=input, target=target)
    check_same_shape(loss, input=input, target=target)
    check_reduction(loss, reduction)


# ---------------------------------------------------------------- mae
def mae_reference(input, target, reduction="mean"):
    """|y - f| per element."""
    _validate("mae", input, target, reduction)
    return reduce_loss((target - input).abs(), reduction)


def mae_torch(input, target, reduction="mean"):
    _validate("mae", input, target, reduction)
    return F.l1_loss(input, target, reduction=reduction)


@jit
def _mae_term(x, y, p0, p1):
    d = x - y
    sign = tl.where(d > 0.0, 1.0, tl.where(d < 0.0, -1.0, 0.0))
    return tl.abs(d), sign, -sign


_mae_kernel = pointwise_loss(_mae_term, name="mae")


def mae_triton(input, target, reduction="mean"):
    _validate("mae", input, target, reduction)
    return _mae_kernel(input, target, reduction)


# ---------------------------------------------------------------- huber
def _validate_huber(input, target, delta, reduction):
    _validate("huber", input, target, reduction)
    check_number("huber", "delta", delta, low=0.0, open_interval=True)


def huber_reference(input, target, delta=1.0, reduction="mean"):
    """r^2/2 inside |r| <= delta, delta (|r| - delta/2) outside."""
    _validate_huber(input, target, delta, reduction)
    r = target - input
    a = r.abs()
    loss = torch.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))
    return reduce_loss(loss, reduction)


def huber_torch(input, target, delta=1.0, reduction="mean"):
    _validate_huber(input, target, delta, reduction)
    return F.huber_loss(input, target, delta=delta, reduction=reduction)


@jit
def _huber_term(x, y, p0, p1):
    d = x - y  # p0: delta
    a = tl.abs(d)
    inside = a <= p0
    loss = tl.where(inside, 0.5 * d * d, p0 * (a - 0.5 * p0))
    dx = tl.where(inside, d, tl.where(d > 0.0, p0, -p0))
    return loss, dx, -dx


_huber_kernel = pointwise_loss(_huber_term, name="huber")


def huber_triton(input, target, delta=1.0, reduction="mean"):
    _validate_huber(input, target, delta, reduction)
    return _huber_kernel(input, target, reduction, p0=delta)


# ---------------------------------------------------------------- quantile
def _validate_quantile(input, target, tau, reduction):
    _validate("quantile", input, target, reduction)
    check_number("quantile", "tau", tau, low=0.0, high=1.0, open_interval=True)


def quantile_reference(input, target, tau=0.5, reduction="mean"):
    """max(tau r, (tau - 1) r), r = y - f: under-prediction costs tau, over 1 - tau."""
    _validate_quantile(input, target, tau, reduction)
    r = target - input
    return reduce_loss(torch.maximum(tau * r, (tau - 1) * r), reduction)


@jit
def _quantile_term(x, y, p0, p1):
    r = y - x  # p0: tau
    loss = tl.maximum(p0 * r, (p0 - 1.0) * r)
    dr = tl.where(r > 0.0, p0, tl.where(r < 0.0, p0 - 1.0, p0 - 0.5))
    return loss, -dr, dr


_quantile_kernel = pointwise_loss(_quantile_term, name="quantile")


def quantile_triton(input, target, tau=0.5, reduction="mean"):
    _validate_quantile(input, target, tau, reduction)
    return _quantile_kernel(input, target, reduction, p0=tau)


# ---------------------------------------------------------------- inputs
def make_inputs(case):
    return {"input": case.randn(case.n), "target": case.randn(case.n)}


def _ties(case):
    """Half the predictions exact (r = 0, the kink of mae and quantile)."""
    f, y = case.randn(3001), case.randn(3001)
    f[::2] = y[::2]
    return {"input": f, "target": y}


EDGE_CASES = {
    "one_element": lambda case: {"input": case.randn(1), "target": case.randn(1)},
    "block_plus_one": lambda case: {"input": case.randn(4097), "target": case.randn(4097)},
    "matrix": lambda case: {"input": case.randn(37, 53), "target": case.randn(37, 53)},
    "large_residuals": lambda case: {"input": case.randn(3001) * 1e3,
                                     "target": case.randn(3001) * 1e3},
    "ties": _ties,
}


@hookimpl
def register_losses(register):
    common = dict(family="gbm", make_inputs=make_inputs, sizes=POINTWISE_SIZES,
                  edge_cases=EDGE_CASES)
    register(LossSpec(
        name="mae", title="Mean absolute error",
        formula=r"\frac{1}{n}\sum_{i=1}^{n} |y_i - \hat y_i|",
        description="L1 loss: boosting on it fits the signs of the residuals (the median).",
        citation="Friedman (2001), Greedy function approximation: a gradient boosting "
                 "machine; torch.nn.functional.l1_loss",
        reference=mae_reference, options={"reduction": "mean"}, check_options=reductions(),
        flops=pointwise_flops(2, 2), **common))
    register(LossSpec(
        name="huber", title="Huber loss",
        formula=(r"\frac{1}{n}\sum_{i=1}^{n} h_\delta(y_i - \hat y_i),\quad h_\delta(r) = "
                 r"\begin{cases}\frac12 r^2 & |r|\le\delta\\ \delta(|r| - \frac12\delta)"
                 r" & |r|>\delta\end{cases}"),
        description="Quadratic near zero, linear in the tails: option `delta` (> 0, "
                    "default 1).",
        citation="Huber (1964), Robust estimation of a location parameter; "
                 "torch.nn.functional.huber_loss",
        reference=huber_reference, options={"reduction": "mean", "delta": 1.0},
        check_options=reductions() + [{"delta": 0.5}, {"delta": 3.0}],
        flops=pointwise_flops(5, 2), **common))
    register(LossSpec(
        name="quantile", title="Quantile (pinball) loss",
        formula=(r"\frac{1}{n}\sum_{i=1}^{n} \max(\tau r_i,\, (\tau-1) r_i),"
                 r"\quad r_i = y_i - \hat y_i,\ \tau\in(0,1)"),
        description="Its minimizer is the tau-quantile of the target: option `tau` "
                    "(default 0.5, half the absolute error).",
        citation="Koenker & Bassett (1978), Regression quantiles",
        reference=quantile_reference, options={"reduction": "mean", "tau": 0.5},
        check_options=reductions() + [{"tau": 0.9}, {"tau": 0.1, "reduction": "none"}],
        flops=pointwise_flops(4, 2), **common))


@hookimpl
def register_implementations(register):
    triton_kw = dict(backend="triton", devices=("cuda",), grad_in_forward=True,
                     requires=("triton",),
                     description="pointwise template: one pass, gradient in the forward")
    register("mae", Impl("torch", mae_torch, kind="baseline",
                         description="torch.nn.functional.l1_loss"))
    register("mae", Impl("triton", mae_triton,
                         bytes_model=streamed("input", "target"), **triton_kw))
    register("huber", Impl("torch", huber_torch, kind="baseline",
                           description="torch.nn.functional.huber_loss"))
    register("huber", Impl("triton", huber_triton,
                           bytes_model=streamed("input", "target"), **triton_kw))
    register("quantile", Impl("triton", quantile_triton,
                              bytes_model=streamed("input", "target"), **triton_kw))
