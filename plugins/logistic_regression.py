"""Section 2, logistic regression: binary cross-entropy on probabilities (``bce``) and on
logits (``bce_with_logits``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lossreg import Impl, LossSpec, hookimpl
from lossreg.kernels.traffic import streamed
from lossreg.kernels import jit, libm, pointwise_loss, tl
from lossreg.validate import (
    check_broadcasts_to,
    check_floating,
    check_values,
    check_number,
    check_reduction,
    check_same_shape,
)

from ._common import POINTWISE_SIZES, pointwise_flops, reduce_loss, reductions

#: torch clamps each log of binary_cross_entropy at -100 so that p in {0, 1} is finite.
LOG_CLAMP = -100.0


# ---------------------------------------------------------------- bce
def _validate_bce(input, target, weight, reduction):
    check_floating("bce", input=input, target=target)
    check_same_shape("bce", input=input, target=target)
    check_reduction("bce", reduction)
    check_values("bce", "input (probabilities)", input, 0.0, 1.0)
    check_values("bce", "target", target, 0.0, 1.0)
    if weight is not None:
        check_floating("bce", input=input, weight=weight)
        check_broadcasts_to("bce", "weight", weight, input.shape)


def _clamped_log(p: torch.Tensor) -> torch.Tensor:
    """max(log p, -100) as torch computes it. Where the clamp is active the gradient is
    0; the inner where keeps that 0 from becoming 0/0 = nan at p = 0."""
    positive = p > 0
    log_p = torch.log(torch.where(positive, p, torch.ones_like(p)))
    return torch.where(positive, log_p, torch.full_like(p, LOG_CLAMP)).clamp(min=LOG_CLAMP)


def bce_reference(input, target, weight=None, reduction="mean"):
    """-[y log p + (1-y) log(1-p)] with each log clamped at -100, times weight."""
    _validate_bce(input, target, weight, reduction)
    loss = -(target * _clamped_log(input) + (1 - target) * _clamped_log(1 - input))
    if weight is not None:
        loss = loss * weight
    return reduce_loss(loss, reduction)


def bce_torch(input, target, weight=None, reduction="mean"):
    _validate_bce(input, target, weight, reduction)
    return F.binary_cross_entropy(input, target, weight=weight, reduction=reduction)


@jit
def _bce_term(p, y, p0, p1):
    log_p = tl.log(p)
    log_q = libm.log1p(-p)  # log(1 - p), accurate for small p
    keep_p = log_p >= -100.0
    keep_q = log_q >= -100.0
    log_p = tl.maximum(log_p, -100.0)
    log_q = tl.maximum(log_q, -100.0)
    loss = -(y * log_p + (1.0 - y) * log_q)
    # clamped logs are constants: their terms contribute no gradient
    dp = tl.where(keep_q, (1.0 - y) / (1.0 - p), 0.0) - tl.where(keep_p, y / p, 0.0)
    dy = log_q - log_p
    return loss, dp, dy


_bce_kernel = pointwise_loss(_bce_term, name="bce", weighted=True, num_warps=16)


def bce_triton(input, target, weight=None, reduction="mean"):
    _validate_bce(input, target, weight, reduction)
    return _bce_kernel(input, target, reduction, weight=weight)


def _probabilities(case, *shape):
    # strictly inside (0, 1) in every dtype (bfloat16 rounds 0.999 to 1)
    return 0.01 + 0.98 * case.rand(*shape)


def bce_inputs(case):
    return {"input": _probabilities(case, case.n), "target": case.rand(case.n)}


def _near_saturated(case):
    """p within a few ulps of 0 and 1 (at least 2^-20 from them, so that p(1-p) stays
    above the 1e-12 floor of torch's backward), hard targets that agree and disagree."""
    step = max(torch.finfo(case.dtype).eps, 2.0**-20)
    k = torch.arange(1, 6, device=case.device, dtype=torch.float64) * step
    p = torch.cat([k, 1 - k, torch.tensor([0.5], dtype=torch.float64, device=case.device)])
    p = p.repeat(7).to(case.dtype)
    y = (case.rand(p.numel()) > 0.5).to(case.dtype)
    return {"input": p, "target": y}


BCE_EDGE_CASES = {
    "one_element": lambda case: {"input": _probabilities(case, 1), "target": case.rand(1)},
    "block_plus_one": lambda case: {"input": _probabilities(case, 4097),
                                    "target": case.rand(4097)},
    "matrix": lambda case: {"input": _probabilities(case, 37, 53), "target": case.rand(37, 53)},
    "hard_targets": lambda case: {"input": _probabilities(case, 3001),
                                  "target": (case.rand(3001) > 0.5).to(case.dtype)},
    "near_saturated": _near_saturated,
    "weight_per_class": lambda case: {"input": _probabilities(case, 37, 53),
                                      "target": case.rand(37, 53),
                                      "weight": case.rand(53) + 0.5},
}


# ---------------------------------------------------------------- bce_with_logits
def _validate_bcel(input, target, weight, pos_weight, reduction):
    """Checks shared by every implementation; returns pos_weight as a tensor (or None)."""
    check_floating("bce_with_logits", input=input, target=target)
    check_same_shape("bce_with_logits", input=input, target=target)
    check_reduction("bce_with_logits", reduction)
    check_values("bce_with_logits", "target", target, 0.0, 1.0)
    if weight is not None:
        check_floating("bce_with_logits", input=input, weight=weight)
        check_broadcasts_to("bce_with_logits", "weight", weight, input.shape)
    if pos_weight is None or torch.is_tensor(pos_weight):
        if pos_weight is not None:
            check_floating("bce_with_logits", input=input, pos_weight=pos_weight)
            check_broadcasts_to("bce_with_logits", "pos_weight", pos_weight, input.shape)
        return pos_weight
    check_number("bce_with_logits", "pos_weight", pos_weight, low=0.0)
    return torch.tensor(float(pos_weight), dtype=input.dtype, device=input.device)


def bce_with_logits_reference(input, target, weight=None, pos_weight=None, reduction="mean"):
    """The stable form max(z,0) - zy + log(1+e^{-|z|}), plus (p-1) y softplus(-z) for
    torch's pos_weight p. torch.maximum splits the gradient at z = 0 evenly, which is
    exactly sigma(0) = 1/2: the kinks of max and |z| cancel as they should."""
    pos_weight = _validate_bcel(input, target, weight, pos_weight, reduction)
    z, y = input, target
    zero = torch.zeros_like(z)
    log1p_exp = torch.log1p(torch.exp(-z.abs()))
    loss = torch.maximum(z, zero) - z * y + log1p_exp
    if pos_weight is not None:
        softplus_neg = torch.maximum(-z, zero) + log1p_exp  # -log sigma(z)
        loss = loss + (pos_weight - 1) * y * softplus_neg
    if weight is not None:
        loss = loss * weight
    return reduce_loss(loss, reduction)


def bce_with_logits_torch(input, target, weight=None, pos_weight=None, reduction="mean"):
    pos_weight = _validate_bcel(input, target, weight, pos_weight, reduction)
    return F.binary_cross_entropy_with_logits(input, target, weight=weight,
                                              pos_weight=pos_weight, reduction=reduction)


@jit
def _bcel(z, y, pw):
    e = tl.exp(-tl.abs(z))
    log1p_e = libm.log1p(e)
    softplus_neg = tl.maximum(-z, 0.0) + log1p_e  # -log sigma(z)
    loss = tl.maximum(z, 0.0) - z * y + log1p_e + (pw - 1.0) * y * softplus_neg
    inv = 1.0 / (1.0 + e)
    sig = tl.where(z >= 0, inv, e * inv)  # sigma(z), no cancellation on either side
    sig_neg = tl.where(z >= 0, e * inv, inv)  # sigma(-z)
    dz = (1.0 - y) * sig - pw * y * sig_neg
    dy = (pw - 1.0) * softplus_neg - z
    return loss, dz, dy


@jit
def _bcel_term(z, y, p0, p1):
    return _bcel(z, y, p0)  # p0: a scalar pos_weight (1 when there is none)


@jit
def _bcel_pos_weight_term(z, y, pw, p0, p1):
    return _bcel(z, y, pw)


_bcel_kernel = pointwise_loss(_bcel_term, name="bce_with_logits", weighted=True, num_warps=16)
_bcel_pw_kernel = pointwise_loss(_bcel_pos_weight_term, name="bce_with_logits_pos_weight",
                                 operands=3, weighted=True, num_warps=16)


def bce_with_logits_triton(input, target, weight=None, pos_weight=None, reduction="mean"):
    scalar = pos_weight is None or not torch.is_tensor(pos_weight)
    pw = _validate_bcel(input, target, weight, pos_weight, reduction)
    if scalar:  # no tensor to read: the scalar rides in p0
        return _bcel_kernel(input, target, reduction, p0=1.0 if pw is None else float(pos_weight),
                            weight=weight)
    return _bcel_pw_kernel(input, target, reduction, z=pw, weight=weight)


def bcel_inputs(case):
    return {"input": case.randn(case.n) * 3, "target": case.rand(case.n)}


def _extreme_logits(case):
    z = case.randn(3001) * 3
    z[::3] = 1e4
    z[1::3] = -1e4
    y = case.rand(3001)
    y[::2] = (y[::2] > 0.5).to(case.dtype)
    return {"input": z, "target": y}


BCEL_EDGE_CASES = {
    "one_element": lambda case: {"input": case.randn(1) * 3, "target": case.rand(1)},
    "block_plus_one": lambda case: {"input": case.randn(4097) * 3, "target": case.rand(4097)},
    "matrix": lambda case: {"input": case.randn(37, 53) * 3, "target": case.rand(37, 53)},
    "extreme_logits": _extreme_logits,
    "zero_logits": lambda case: {"input": torch.zeros(999, dtype=case.dtype,
                                                      device=case.device),
                                 "target": case.rand(999)},
    "pos_weight_per_class": lambda case: {"input": case.randn(37, 53) * 3,
                                          "target": case.rand(37, 53),
                                          "pos_weight": case.rand(53) * 3 + 0.1},
    "weight_and_pos_weight": lambda case: {"input": case.randn(4099) * 3,
                                           "target": case.rand(4099),
                                           "weight": case.rand(4099) + 0.5,
                                           "pos_weight": case.rand(4099) * 3 + 0.1},
}


@hookimpl
def register_losses(register):
    register(
        LossSpec(
            name="bce",
            input_domains={"input": ("range", 0.0, 1.0), "target": ("range", 0.0, 1.0)},
            family="logistic_regression",
            title="Binary cross-entropy",
            formula=(r"\frac{1}{n}\sum_{i=1}^{n} -w_i\left[y_i\max(\log\hat y_i,-100)"
                     r" + (1-y_i)\max(\log(1-\hat y_i),-100)\right]"),
            description=(
                "Cross-entropy of probabilities p in [0, 1] against targets in [0, 1], each "
                "log clamped at -100 as torch does; optional torch `weight` tensor "
                "broadcast to the input. Gradients are the formula's: 0 through a clamped "
                "log. torch's own backward divides by max(p(1-p), 1e-12) instead, so it "
                "differs from this where p(1-p) < 1e-12 (p within 1e-12 of 0 or 1)."),
            citation="Cox (1958), The regression analysis of binary sequences; "
                     "torch.nn.functional.binary_cross_entropy",
            reference=bce_reference,
            make_inputs=bce_inputs,
            options={"reduction": "mean"},
            check_options=reductions(),
            grad_inputs=("input", "target"),
            sizes=POINTWISE_SIZES,
            # forward: two logs, clamps, 4 mul/add; backward: two divides, selects
            flops=pointwise_flops(8, 8),
            edge_cases=BCE_EDGE_CASES,
        )
    )
    register(
        LossSpec(
            name="bce_with_logits",
            input_domains={"target": ("range", 0.0, 1.0)},
            family="logistic_regression",
            title="Binary cross-entropy with logits",
            formula=(r"\frac{1}{n}\sum_{i=1}^{n} w_i\left[\max(z_i,0) - z_i y_i"
                     r" + \log(1+e^{-|z_i|}) + (p_i-1)\,y_i\left(\max(-z_i,0)"
                     r" + \log(1+e^{-|z_i|})\right)\right]"),
            description=(
                "Binary cross-entropy of sigma(z) computed stably on logits z; finite loss "
                "and exact gradients at any logit. torch's `pos_weight` p (a float or a "
                "tensor broadcast to the input, e.g. one per class) weighs the positive "
                "term, torch's `weight` tensor each element."),
            citation="torch.nn.functional.binary_cross_entropy_with_logits",
            reference=bce_with_logits_reference,
            make_inputs=bcel_inputs,
            options={"reduction": "mean"},
            check_options=reductions() + [{"pos_weight": 3.0},
                                          {"pos_weight": 0.5, "reduction": "none"}],
            grad_inputs=("input", "target"),
            sizes=POINTWISE_SIZES,
            # forward: exp, log1p, ~8 mul/add/max; backward: a divide and ~8 mul/add
            flops=pointwise_flops(10, 9),
            edge_cases=BCEL_EDGE_CASES,
        )
    )


@hookimpl
def register_implementations(register):
    triton_kw = dict(backend="triton", devices=("cuda",), grad_in_forward=True,
                     requires=("triton",))
    register("bce", Impl("torch", bce_torch, kind="baseline", backend="torch",
                         description="torch.nn.functional.binary_cross_entropy"))
    register("bce", Impl("triton", bce_triton, bytes_model=streamed("input", "target"), **triton_kw,
                         description="pointwise template, weighted: one pass, gradient in "
                                     "the forward"))
    register("bce_with_logits", Impl(
        "torch", bce_with_logits_torch, kind="baseline", backend="torch",
        description="torch.nn.functional.binary_cross_entropy_with_logits"))
    register("bce_with_logits", Impl(
        "triton", bce_with_logits_triton, bytes_model=streamed("input", "target"), **triton_kw,
        description="pointwise template; a tensor pos_weight is a third operand read "
                    "modulo its length (no broadcast copy)"))
