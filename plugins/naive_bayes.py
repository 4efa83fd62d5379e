"""Section 9, naive Bayes: the likelihood losses its class-conditional models train on.

* ``nll``: negative log-likelihood of log-probabilities (N, C) with torch's ``weight``
  and ``ignore_index``; Triton through the row-wise template (per-class weights, ignored
  rows mapped to a zero-weight extra class).
* ``gaussian_nll``: heteroscedastic Gaussian negative log-likelihood with torch's
  ``eps`` clamp, ``full`` constant and variance broadcasting; Triton through the
  pointwise template (input, variance and the target as a third operand).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lossreg import Impl, LossSpec, hookimpl
from lossreg.kernels.traffic import streamed
from lossreg.kernels import jit, pointwise_loss, rowwise_loss, tl

from ._common import POINTWISE_SIZES, acc_dtype, reduce_loss, reductions
from lossreg.validate import (
    check_bool,
    check_device,
    check_floating,
    check_int_option,
    check_labels,
    check_ndim,
    check_number,
    check_reduction,
    check_same_dtype,
    check_shape,
)

CLASSES = 10
ROW_SIZES = {
    "quick": [100, 1000],
    "default": [2**12, 2**16, 2**20],
    "large": [2**20, 2**22, 2**24],
}


# ---------------------------------------------------------------- nll
def _validate_nll(input, target, weight, ignore_index, reduction):
    check_floating("nll", input=input)
    check_ndim("nll", "input", input, (2,), "a matrix (N, C) of log-probabilities")
    check_int_option("nll", "ignore_index", ignore_index, -(2**63))
    check_device("nll", "input", input, target=target)
    check_shape("nll", "target", target, input.shape[:1], "one class index per row")
    check_labels("nll", "target", target, input.shape[1], ignore_index)
    if weight is not None:
        check_floating("nll", input=input, weight=weight)
        check_shape("nll", "weight", weight, input.shape[1:], "one weight per class")
    check_reduction("nll", reduction)


def nll_reference(input, target, weight=None, ignore_index=-100, reduction="mean"):
    """-w_{y_i} log p_{i, y_i} per row (0 for ignored rows); mean divides by the weights
    of the kept rows, so with every row ignored it is 0/0 = nan (as torch), with a zero
    gradient (as torch: the where keeps 0/0 out of the backward)."""
    _validate_nll(input, target, weight, ignore_index, reduction)
    kept = target != ignore_index
    safe_target = torch.where(kept, target, torch.zeros_like(target))
    picked = input.gather(1, safe_target[:, None]).squeeze(1)
    w = torch.ones_like(picked) if weight is None else weight.detach()[safe_target]
    w = torch.where(kept, w, torch.zeros_like(w))
    loss = -w * picked
    if reduction != "mean":
        return reduce_loss(loss, reduction)
    total = w.sum()
    defined = total != 0
    return torch.where(defined, loss.sum() / torch.where(defined, total, torch.ones_like(total)),
                       torch.full_like(total, float("nan")))


def nll_torch(input, target, weight=None, ignore_index=-100, reduction="mean"):
    _validate_nll(input, target, weight, ignore_index, reduction)
    return F.nll_loss(input, target, weight=weight, ignore_index=ignore_index,
                      reduction=reduction)


@jit
def _nll_term(s, valid, is_label, C, p0, p1):
    return -tl.sum(tl.where(is_label, s, 0.0), axis=1), tl.where(is_label, -1.0, 0.0)


_nll_kernel = rowwise_loss(_nll_term, name="nll", weighted=True)


def nll_triton(input, target, weight=None, ignore_index=-100, reduction="mean"):
    _validate_nll(input, target, weight, ignore_index, reduction)
    C = input.shape[1]
    # ignored rows point at an extra class C of weight 0: no column matches it, so their
    # loss and gradient are 0, and they add 0 to the weight total
    w = torch.ones(C, dtype=input.dtype, device=input.device) if weight is None else (
        weight.detach().to(input.dtype))
    w = torch.cat([w, w.new_zeros(1)])
    kept = target != ignore_index
    label = torch.where(kept, target, torch.full_like(target, C))
    if reduction != "mean":
        return _nll_kernel(input, label, reduction, weight=w)
    total = w[label].sum(dtype=acc_dtype(input.dtype))
    defined = total != 0
    summed = _nll_kernel(input, label, "sum", weight=w)
    scale = torch.where(defined, 1.0 / torch.where(defined, total, torch.ones_like(total)),
                        torch.zeros_like(total))
    out = summed * scale.to(input.dtype)
    return torch.where(defined, out, torch.full_like(out, float("nan")))


def log_probabilities(case, rows: int, classes: int = CLASSES) -> torch.Tensor:
    return torch.log_softmax(case.randn(rows, classes, dtype=torch.float64) * 2.0, dim=1).to(
        case.dtype)


def nll_inputs(case, n: int | None = None, classes: int = CLASSES, ignored: float = 0.1):
    n = case.n if n is None else n
    target = case.randint(0, classes, n)
    ignore_index = case.params.get("ignore_index", -100)
    target = torch.where(case.rand(n) < ignored, torch.full_like(target, ignore_index), target)
    return {"input": log_probabilities(case, n, classes), "target": target}


def _class_weights(case, classes=CLASSES):
    return 0.2 + 1.6 * case.rand(classes)


NLL_EDGE_CASES = {
    # torch's semantics: mean over no kept row is nan (its gradient 0)
    "all_ignored": lambda case: {"input": log_probabilities(case, 20),
                                 "target": torch.full((20,), -100, dtype=torch.int64,
                                                       device=case.device)},
    "class_weights": lambda case: {**nll_inputs(case, 300), "weight": _class_weights(case)},
    "weights_all_ignored": lambda case: {"input": log_probabilities(case, 20),
                                         "target": torch.full((20,), -100, dtype=torch.int64,
                                                               device=case.device),
                                         "weight": _class_weights(case)},
    "one_row": lambda case: nll_inputs(case, 1, ignored=0.0),
    "many_classes": lambda case: nll_inputs(case, 7, classes=5000),
    "rows_not_multiple_of_block": lambda case: nll_inputs(case, 1027, classes=3),
}


def _nll_bytes(inputs):
    x, y = inputs["input"], inputs["target"]
    n, es = y.numel(), x.element_size()
    read = n * y.element_size() + n * es  # the labels and the picked log-probability
    return {"forward": read, "backward": read + x.numel() * es,
            "full": read + x.numel() * es}


# ---------------------------------------------------------------- gaussian_nll
HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def _validate_gaussian(input, target, var, full, eps, reduction):
    check_floating("gaussian_nll", input=input, target=target, var=var)
    check_same_dtype("gaussian_nll", input=input, target=target, var=var)
    check_shape("gaussian_nll", "target", target, input.shape, "the shape of input")
    if var.shape != input.shape and var.shape != input.shape[:-1]:
        ok = var.dim() == input.dim() and sum(
            v != i for v, i in zip(var.shape, input.shape)) == 1 and sum(
            v for v, i in zip(var.shape, input.shape) if v != i) == 1
        if not ok:
            raise ValueError(
                f"gaussian_nll: var must have input's shape {tuple(input.shape)}, that shape "
                f"without its last dimension, or that shape with one dimension of size 1 "
                f"(homoscedastic), got {tuple(var.shape)}")
    if var.numel() and bool((var < 0).any()):
        raise ValueError("gaussian_nll: var must be non-negative (a variance), got "
                         f"{var[var < 0][0].item()!r}")
    check_bool("gaussian_nll", "full", full)
    check_number("gaussian_nll", "eps", eps, 0.0, None, low_open=True)
    check_reduction("gaussian_nll", reduction)


def _var_like_input(var, input):
    return var.unsqueeze(-1) if var.shape == input.shape[:-1] and var.shape != input.shape \
        else var


def gaussian_nll_reference(input, target, var, full=False, eps=1e-6, reduction="mean"):
    """1/2 (log max(var, eps) + (input - target)^2 / max(var, eps)) [+ 1/2 log 2 pi].

    As in torch, the clamp is applied without gradient (``clamp_`` under ``no_grad``): the
    gradient w.r.t. var is the formula's at max(var, eps), also where var < eps.

    16-bit inputs in float32, the result rounded back: in float16 the default eps 1e-6 is
    subnormal (it rounds to 1.013e-6), and near it (input - target)^2 / var and the
    gradients' 1/var^2 overflow 65504 where the float64 results are representable."""
    _validate_gaussian(input, target, var, full, eps, reduction)
    dtype = input.dtype
    wide = acc_dtype(dtype)
    input, target, var = input.to(wide), target.to(wide), var.to(wide)
    var = _var_like_input(var, input)
    clamped = var + (var.clamp(min=eps) - var).detach()
    target = target.detach()
    loss = 0.5 * (torch.log(clamped) + (input - target) ** 2 / clamped)
    if full:
        loss = loss + HALF_LOG_2PI
    return reduce_loss(loss, reduction).to(dtype)


def gaussian_nll_torch(input, target, var, full=False, eps=1e-6, reduction="mean"):
    _validate_gaussian(input, target, var, full, eps, reduction)
    return F.gaussian_nll_loss(input, target.detach(), var, full=full, eps=eps,
                               reduction=reduction)


@jit
def _gaussian_term(x, v, t, p0, p1):
    """x input, v variance, t target (third operand); p0 eps, p1 the constant."""
    # the reference's var + (max(var, eps) - var).detach(): NaN for a NaN var (torch's
    # clamp keeps it; tl.maximum would not) and for var = +inf (inf - inf); v - v is 0
    # for every finite var, so finite values are untouched
    vc = tl.where(v < p0, p0, v) + (v - v)
    inv = 1.0 / vc
    d = x - t
    q = d * d * inv
    return 0.5 * (tl.log(vc) + q) + p1, d * inv, 0.5 * inv * (1.0 - q)


_gaussian_kernel = pointwise_loss(_gaussian_term, name="gaussian_nll", operands=3)


def gaussian_nll_triton(input, target, var, full=False, eps=1e-6, reduction="mean"):
    _validate_gaussian(input, target, var, full, eps, reduction)
    var = _var_like_input(var, input).expand(input.shape)  # autograd sums the broadcast
    return _gaussian_kernel(input, var, reduction, p0=eps, p1=HALF_LOG_2PI if full else 0.0,
                            z=target.detach())


def gaussian_inputs(case, n: int | None = None, shape: tuple | None = None):
    shape = (case.n if n is None else n,) if shape is None else shape
    mean = case.randn(*shape)
    return {"input": mean, "target": mean + case.randn(*shape),
            "var": 0.05 + 2.0 * case.rand(*shape)}


def _homoscedastic(case, var_shape):
    inputs = gaussian_inputs(case, shape=(33, 7))
    return {**inputs, "var": 0.05 + 2.0 * case.rand(*var_shape)}


GAUSSIAN_EDGE_CASES = {
    "one_element": lambda case: gaussian_inputs(case, 1),
    "tail_not_multiple_of_block": lambda case: gaussian_inputs(case, 4097),
    # below eps the clamp holds the value; the gradient is torch's (at the clamped value)
    "var_below_eps": lambda case: {**gaussian_inputs(case, 500),
                                   "var": case.rand(500) * 2e-6},
    "var_per_row": lambda case: _homoscedastic(case, (33, 1)),
    "var_one_dim_short": lambda case: _homoscedastic(case, (33,)),
    "var_broadcast_middle": lambda case: {**gaussian_inputs(case, shape=(6, 5, 4)),
                                          "var": 0.1 + case.rand(6, 1, 4)},
}


def _nll_mean_count(inputs, options):
    """What ``mean`` divides by: the total class weight of the kept rows."""
    target = inputs["target"]
    kept = target[target != options.get("ignore_index", -100)]
    weight = inputs.get("weight")
    return float(kept.numel() if weight is None else weight[kept].sum())


# ---------------------------------------------------------------- registration
@hookimpl
def register_losses(register):
    register(LossSpec(
        name="nll", family="naive_bayes", title="Negative log-likelihood",
        input_domains={"target": ("index", lambda inputs: inputs["input"].shape[1])},
        formula=r"-\frac{\sum_i w_{y_i}\,[y_i\neq \mathrm{ii}]\,\log\hat p_{i,y_i}}"
                r"{\sum_i w_{y_i}\,[y_i\neq \mathrm{ii}]}",
        description="NLL of log-probabilities input (N, C) (e.g. a naive Bayes model's "
                    "log-posteriors) at class targets (N,), with torch's weight (per class, "
                    "not differentiated) and ignore_index (ii). The mean divides by the "
                    "total weight of the kept rows (1 each without weight). With every "
                    "target equal to ignore_index the mean is nan and its gradient 0, as "
                    "torch's nll_loss gives; sum is 0 and none all zeros.",
        citation="Fisher (1922), maximum likelihood; torch.nn.NLLLoss",
        reference=nll_reference, make_inputs=nll_inputs,
        options={"ignore_index": -100, "reduction": "mean"},
        check_options=reductions() + [{"ignore_index": 3}], grad_inputs=("input",),
        mean_count=_nll_mean_count,
        sizes=ROW_SIZES, x_name="rows", bytes_moved=_nll_bytes,
        flops=lambda inp: {"forward": 2 * inp["target"].numel(),
                           "backward": inp["input"].numel(),
                           "full": 2 * inp["target"].numel() + inp["input"].numel()},
        edge_cases=NLL_EDGE_CASES))
    register(LossSpec(
        name="gaussian_nll", family="naive_bayes", title="Gaussian negative log-likelihood",
        input_domains={"var": ("range", 0.0, float("inf"))},
        formula=r"\frac1n\sum_i \frac12\Bigl(\log\max(\sigma_i^2,\epsilon)+"
                r"\frac{(y_i-\mu_i)^2}{\max(\sigma_i^2,\epsilon)}\Bigr)"
                r"\ \Bigl[+\tfrac12\log 2\pi\ \text{if full}\Bigr]",
        description="Heteroscedastic Gaussian NLL of predicted means input and variances "
                    "var at targets (the likelihood of Gaussian naive Bayes). var has "
                    "input's shape, or lacks its last dimension, or has size 1 in one "
                    "dimension (torch's rules); it must be non-negative. As in torch the "
                    "eps clamp carries no gradient: below eps the gradient w.r.t. var is "
                    "the formula's at eps. Gradients to input and var, not target.",
        citation="Nix & Weigend, Estimating the mean and variance of the target probability "
                 "distribution, ICNN 1994; torch.nn.GaussianNLLLoss",
        reference=gaussian_nll_reference, make_inputs=gaussian_inputs,
        options={"full": False, "eps": 1e-6, "reduction": "mean"},
        check_options=reductions() + [{"full": True}, {"eps": 0.1}],
        grad_inputs=("input", "var"), sizes=POINTWISE_SIZES,
        flops=lambda inp: {"forward": 8 * inp["input"].numel(),
                           "backward": 6 * inp["input"].numel(),
                           "full": 14 * inp["input"].numel()},
        edge_cases=GAUSSIAN_EDGE_CASES))


@hookimpl
def register_implementations(register):
    register("nll", Impl("torch", nll_torch, kind="baseline",
                         description="torch.nn.functional.nll_loss"))
    register("nll", Impl(
        "triton", nll_triton,
        bytes_model=streamed("input"), backend="triton", devices=("cuda",), grad_in_forward=True,
        requires=("triton",),
        description="row-wise template with per-class weights (ignored rows: a zero-weight "
                    "extra class); mean divides by the kept weight"))
    register("gaussian_nll", Impl(
        "torch", gaussian_nll_torch, kind="baseline", dtypes=("float32", "float64", "bfloat16"),
        description="torch.nn.functional.gaussian_nll_loss; not float16: it computes in the "
                    "input dtype, where eps 1e-6 is subnormal (1.3% off) and, for var near "
                    "eps, (input - target)^2 / var and the gradients overflow to inf where "
                    "the float64 results are finite"))
    register("gaussian_nll", Impl(
        "triton", gaussian_nll_triton,
        bytes_model=streamed("input", "var"), backend="triton", devices=("cuda",),
        grad_in_forward=True, requires=("triton",),
        description="pointwise template, target as the third operand; a broadcast var is "
                    "expanded and its gradient summed by autograd"))
