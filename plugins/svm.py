"""Section 3, support vector machines: hinge, squared hinge, multi-class (Weston-Watkins)
hinge and margin ranking losses.

Binary labels are -1/+1, as a float or an integer tensor. The kinks follow the torch
built-ins: ``clamp(min=0)`` (gradient at the kink itself, as ``margin_ranking_loss``)
for the binary losses, strictly positive terms for the multi-class one (as
``multi_margin_loss``). Terms past the margin have exactly zero gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lossreg import Impl, LossSpec, hookimpl
from lossreg.kernels.traffic import streamed
from lossreg.kernels import jit, pointwise_loss, rowwise_loss, tl
from lossreg.validate import (
    check_choice,
    check_class_labels,
    check_floating,
    check_labels_in,
    check_number,
    check_reduction,
    check_same_device,
    check_same_shape,
    check_tensor,
)

from ._common import POINTWISE_SIZES, pm1_labels, pointwise_flops, reduce_loss, reductions

PM1 = (-1, 1)
#: classes of the generated multi-class problems (n counts rows)
CLASSES = 10
ROW_SIZES = {"quick": [200, 333], "default": [2**10, 2**14, 2**18], "large": [2**20, 2**22]}


def _validate_binary(loss, input, target, margin, reduction):
    check_floating(loss, input=input)
    check_tensor(loss, target=target)
    check_same_device(loss, input=input, target=target)
    check_same_shape(loss, input=input, target=target)
    check_reduction(loss, reduction)
    check_number(loss, "margin", margin)
    check_labels_in(loss, "target", target, PM1)


# ---------------------------------------------------------------- hinge, squared_hinge
def hinge_reference(input, target, margin=1.0, reduction="mean"):
    """max(0, m - y f) per element."""
    _validate_binary("hinge", input, target, margin, reduction)
    return reduce_loss(torch.clamp(margin - target * input, min=0), reduction)


def squared_hinge_reference(input, target, margin=1.0, reduction="mean"):
    """max(0, m - y f)^2 per element."""
    _validate_binary("squared_hinge", input, target, margin, reduction)
    return reduce_loss(torch.clamp(margin - target * input, min=0) ** 2, reduction)


@jit
def _hinge_term(x, y, p0, p1):
    t = p0 - y * x  # p0: margin
    active = t >= 0.0
    # where(t < 0, 0, t), not maximum(t, 0): a NaN propagates, as in torch's clamp
    return tl.where(t < 0.0, 0.0, t), tl.where(active, -y, 0.0), tl.where(active, -x, 0.0)


@jit
def _squared_hinge_term(x, y, p0, p1):
    t = p0 - y * x
    h = tl.where(t < 0.0, 0.0, t)  # a NaN propagates, as in torch's clamp
    return h * h, -2.0 * h * y, -2.0 * h * x


_hinge_kernel = pointwise_loss(_hinge_term, name="hinge")
_squared_hinge_kernel = pointwise_loss(_squared_hinge_term, name="squared_hinge")


def hinge_triton(input, target, margin=1.0, reduction="mean"):
    _validate_binary("hinge", input, target, margin, reduction)
    return _hinge_kernel(input, target, reduction, p0=margin)


def squared_hinge_triton(input, target, margin=1.0, reduction="mean"):
    _validate_binary("squared_hinge", input, target, margin, reduction)
    return _squared_hinge_kernel(input, target, reduction, p0=margin)


def binary_inputs(case):
    return {"input": case.randn(case.n) * 2, "target": pm1_labels(case, case.n)}


def _far_past_margin(case):
    """Scores of +-1e4 on the right side (loss and gradient exactly 0) and the wrong side,
    mixed with ordinary ones."""
    y = pm1_labels(case, 3001)
    f = case.randn(3001) * 2
    f[::3] = y[::3] * 1e4
    f[1::3] = -y[1::3] * 1e4
    return {"input": f, "target": y}


BINARY_EDGE_CASES = {
    "one_element": lambda case: {"input": case.randn(1), "target": pm1_labels(case, 1)},
    "block_plus_one": lambda case: {"input": case.randn(4097) * 2,
                                    "target": pm1_labels(case, 4097)},
    "matrix": lambda case: {"input": case.randn(37, 53) * 2, "target": pm1_labels(case, 37, 53)},
    "far_past_margin": _far_past_margin,
    "integer_labels": lambda case: {"input": case.randn(3001) * 2,
                                    "target": pm1_labels(case, 3001, dtype=torch.int64)},
}


# ---------------------------------------------------------------- margin_ranking
def _validate_ranking(input1, input2, target, margin, reduction):
    check_floating("margin_ranking", input1=input1, input2=input2)
    check_tensor("margin_ranking", target=target)
    check_same_device("margin_ranking", input1=input1, target=target)
    check_same_shape("margin_ranking", input1=input1, input2=input2, target=target)
    check_reduction("margin_ranking", reduction)
    check_number("margin_ranking", "margin", margin)
    check_labels_in("margin_ranking", "target", target, PM1)


def margin_ranking_reference(input1, input2, target, margin=0.0, reduction="mean"):
    """max(0, -y (a - b) + m): y = 1 asks for a to rank above b by the margin."""
    _validate_ranking(input1, input2, target, margin, reduction)
    return reduce_loss(torch.clamp(-target * (input1 - input2) + margin, min=0), reduction)


def margin_ranking_torch(input1, input2, target, margin=0.0, reduction="mean"):
    _validate_ranking(input1, input2, target, margin, reduction)
    return F.margin_ranking_loss(input1, input2, target, margin=margin, reduction=reduction)


@jit
def _margin_ranking_term(a, b, y, p0, p1):
    t = -y * (a - b) + p0
    active = t >= 0.0
    # a NaN propagates, as in torch's clamp
    return tl.where(t < 0.0, 0.0, t), tl.where(active, -y, 0.0), tl.where(active, y, 0.0)


_margin_ranking_kernel = pointwise_loss(_margin_ranking_term, name="margin_ranking",
                                        operands=3)


def margin_ranking_triton(input1, input2, target, margin=0.0, reduction="mean"):
    _validate_ranking(input1, input2, target, margin, reduction)
    return _margin_ranking_kernel(input1, input2, reduction, p0=margin, z=target)


def ranking_inputs(case):
    return {"input1": case.randn(case.n), "input2": case.randn(case.n),
            "target": pm1_labels(case, case.n)}


def _ranking(case, *shape, dtype=None):
    return {"input1": case.randn(*shape), "input2": case.randn(*shape),
            "target": pm1_labels(case, *shape, dtype=dtype)}


def _ranking_far_apart(case):
    inputs = _ranking(case, 3001)
    a, y = inputs["input1"], inputs["target"]
    a[::3] = y[::3] * 1e4  # ranked right by far: zero loss and gradient
    a[1::3] = -y[1::3] * 1e4  # ranked wrong by far
    return inputs


RANKING_EDGE_CASES = {
    "one_element": lambda case: _ranking(case, 1),
    "block_plus_one": lambda case: _ranking(case, 4097),
    "matrix": lambda case: _ranking(case, 37, 53),
    "far_past_margin": _ranking_far_apart,
    "integer_labels": lambda case: _ranking(case, 3001, dtype=torch.int64),
}


# ---------------------------------------------------------------- multiclass_hinge
def _validate_multiclass(input, target, p, margin, weight, reduction):
    check_floating("multiclass_hinge", input=input)
    if input.dim() != 2:
        raise ValueError(f"multiclass_hinge: input must be a (N, C) matrix of class scores, "
                         f"got shape {tuple(input.shape)}")
    check_same_device("multiclass_hinge", input=input, target=target)
    check_class_labels("multiclass_hinge", "target", target, *input.shape)
    check_reduction("multiclass_hinge", reduction)
    check_choice("multiclass_hinge", "p", p, (1, 2))
    check_number("multiclass_hinge", "margin", margin)
    if weight is not None:
        check_floating("multiclass_hinge", input=input, weight=weight)
        if tuple(weight.shape) != (input.shape[1],):
            raise ValueError(f"multiclass_hinge: weight must have one entry per class, shape "
                             f"({input.shape[1]},), got {tuple(weight.shape)}")


def multiclass_hinge_reference(input, target, p=1, margin=1.0, weight=None, reduction="mean"):
    """(1/C) sum_{j != y_i} max(0, m - s_{i,y_i} + s_ij)^p, times weight[y_i]."""
    _validate_multiclass(input, target, p, margin, weight, reduction)
    classes = input.shape[1]
    is_label = F.one_hot(target, classes).bool()
    score_y = input.gather(1, target[:, None])
    z = margin - score_y + input
    # relu: no gradient at the kink itself, as torch's multi_margin_loss
    h = torch.where(is_label, torch.zeros_like(z), torch.relu(z))
    loss = (h ** p).sum(dim=1) / classes
    if weight is not None:
        loss = loss * weight[target]
    return reduce_loss(loss, reduction)


def multiclass_hinge_torch(input, target, p=1, margin=1.0, weight=None, reduction="mean"):
    _validate_multiclass(input, target, p, margin, weight, reduction)
    if input.shape[0] == 0:  # torch's multi_margin_loss returns garbage for no rows
        return multiclass_hinge_reference(input, target, p, margin, weight, reduction)
    if input.device.type == "cpu" and input.dtype in (torch.bfloat16, torch.float16):
        # torch has no 16-bit multi_margin_loss on a CPU: the same op on float32 copies,
        # rounded back (CUDA runs it in the dtype)
        w = None if weight is None else weight.float()
        return F.multi_margin_loss(input.float(), target, p=p, margin=margin, weight=w,
                                   reduction=reduction).to(input.dtype)
    return F.multi_margin_loss(input, target, p=p, margin=margin, weight=weight,
                               reduction=reduction)


@jit
def _multiclass_hinge_term(s, valid, is_label, C, p0, p1):
    score_y = tl.sum(tl.where(is_label, s, 0.0), axis=1)
    z = p0 - score_y[:, None] + s  # p0: margin
    # relu as torch's: NaN stays NaN (not z <= 0), and its gradient there is 1
    h = tl.where(valid & ~(z <= 0.0), z, 0.0)
    h = tl.where(is_label, 0.0, h)
    squared = p1 == 2.0  # p1: the exponent p, 1 or 2
    loss = tl.sum(tl.where(squared, h * h, h), axis=1) / C
    dh = tl.where(squared, 2.0 * h, tl.where(h <= 0.0, 0.0, 1.0)) / C
    # the label's score enters every term with a minus sign
    grad = tl.where(is_label, -tl.sum(dh, axis=1)[:, None], dh)
    return loss, grad


_multiclass_hinge_kernel = rowwise_loss(_multiclass_hinge_term, name="multiclass_hinge",
                                        weighted=True)


def multiclass_hinge_triton(input, target, p=1, margin=1.0, weight=None, reduction="mean"):
    _validate_multiclass(input, target, p, margin, weight, reduction)
    return _multiclass_hinge_kernel(input, target, reduction, p0=margin, p1=p, weight=weight)


def _scores(case, rows, classes=CLASSES):
    return {"input": case.randn(rows, classes), "target": case.randint(0, classes, rows)}


def multiclass_inputs(case):
    return _scores(case, case.n)


def _multiclass_far_past_margin(case):
    """Label scores 1e3 above the rest: every term is past the margin (zero gradient)."""
    inputs = _scores(case, 57)
    s = inputs["input"]
    s.scatter_(1, inputs["target"][:, None], 1e3)
    return inputs


MULTICLASS_EDGE_CASES = {
    "one_row": lambda case: _scores(case, 1),
    "tile_plus_one": lambda case: _scores(case, 257),  # 256 rows of 10 classes per tile
    "odd_classes": lambda case: _scores(case, 37, 7),
    "two_classes": lambda case: _scores(case, 101, 2),
    "wide_rows": lambda case: _scores(case, 5, 1000),
    "far_past_margin": _multiclass_far_past_margin,
    "weight_per_class": lambda case: {**_scores(case, 99, 13), "weight": case.rand(13) + 0.5},
}


@hookimpl
def register_losses(register):
    binary = dict(family="svm", options={"reduction": "mean", "margin": 1.0},
                  grad_inputs=("input",), sizes=POINTWISE_SIZES, make_inputs=binary_inputs,
                  edge_cases=BINARY_EDGE_CASES)
    register(LossSpec(
        name="hinge", title="Hinge loss",
        input_domains={"target": ("values", (-1, 1))},
        formula=r"\frac{1}{n}\sum_{i=1}^{n} \max(0,\, m - y_i \hat y_i),\quad y_i\in\{-1,+1\}",
        description="The soft-margin SVM loss on scores f and labels -1/+1 (float or "
                    "integer); option `margin` (m, default 1).",
        citation="Cortes & Vapnik (1995), Support-vector networks",
        reference=hinge_reference,
        check_options=reductions() + [{"margin": 0.5}],
        flops=pointwise_flops(3, 1), **binary))
    register(LossSpec(
        name="squared_hinge", title="Squared hinge loss",
        input_domains={"target": ("values", (-1, 1))},
        formula=r"\frac{1}{n}\sum_{i=1}^{n} \max(0,\, m - y_i \hat y_i)^2,"
                r"\quad y_i\in\{-1,+1\}",
        description="The L2-SVM loss: differentiable at the margin; option `margin` "
                    "(default 1).",
        citation="Lee & Mangasarian (2001), SSVM: a smooth support vector machine",
        reference=squared_hinge_reference,
        check_options=reductions() + [{"margin": 2.0}],
        flops=pointwise_flops(4, 2), **binary))
    register(LossSpec(
        name="multiclass_hinge", family="svm", title="Multi-class hinge (Weston-Watkins)",
        input_domains={"target": ("index", lambda inputs: inputs["input"].shape[1])},
        formula=(r"\frac{1}{n}\sum_{i=1}^{n} \frac{w_{y_i}}{C}\sum_{j\ne y_i}"
                 r"\max(0,\, m - s_{i,y_i} + s_{ij})^p"),
        description=("Multi-class SVM loss on an (N, C) score matrix and integer labels, "
                     f"torch's multi_margin_loss: options `margin` (1), `p` (1 or 2) and an "
                     f"optional per-class `weight` tensor. Generated problems have "
                     f"C = {CLASSES}; n counts rows. bfloat16 tolerance 5e-2 (not 2e-2): "
                     "an eager bfloat16 computation rounds m - s_y + s_j to 8 bits, which "
                     "switches terms near the margin on or off, and each switch moves a "
                     "gradient entry by 1/C (seen on an H200: rel 0.021 for torch's own). "
                     "float32 rtol 2e-5: torch's own multi_margin_loss reaches rel 1.05e-5 "
                     "on the gradient of 5000-wide rows."),
        tolerances={"bfloat16": (5e-2, 2e-2), "float32": (2e-5, 5e-7)},
        citation="Weston & Watkins (1999), Support vector machines for multi-class pattern "
                 "recognition; torch.nn.functional.multi_margin_loss",
        reference=multiclass_hinge_reference, make_inputs=multiclass_inputs,
        options={"reduction": "mean", "margin": 1.0, "p": 1},
        check_options=reductions() + [{"margin": 0.5}, {"p": 2}],
        grad_inputs=("input",), sizes=ROW_SIZES, x_name="rows",
        # per score of the (N, C) matrix: sub, add, max, sum; backward: select, row sum
        flops=pointwise_flops(4, 3),
        edge_cases=MULTICLASS_EDGE_CASES))
    register(LossSpec(
        name="margin_ranking", family="svm", title="Margin ranking loss",
        input_domains={"target": ("values", (-1, 1))},
        formula=r"\frac{1}{n}\sum_{i=1}^{n} \max(0,\, -y_i(a_i - b_i) + m),"
                r"\quad y_i\in\{-1,+1\}",
        description="Pairwise ranking hinge: y = 1 asks a to score above b by the margin "
                    "(torch's default margin 0); labels float or integer.",
        citation="Herbrich, Graepel & Obermayer (1999), Support vector learning for ordinal "
                 "regression; torch.nn.functional.margin_ranking_loss",
        reference=margin_ranking_reference, make_inputs=ranking_inputs,
        options={"reduction": "mean", "margin": 0.0},
        check_options=reductions() + [{"margin": 0.5}],
        grad_inputs=("input1", "input2"), sizes=POINTWISE_SIZES,
        flops=pointwise_flops(4, 2, key="input1"),
        edge_cases=RANKING_EDGE_CASES))


@hookimpl
def register_implementations(register):
    triton_kw = dict(backend="triton", devices=("cuda",), grad_in_forward=True,
                     requires=("triton",))
    register("hinge", Impl("triton", hinge_triton, bytes_model=streamed("input"), **triton_kw,
                           description="pointwise template: one pass, gradient in the forward"))
    register("squared_hinge", Impl("triton", squared_hinge_triton,
                                   bytes_model=streamed("input"), **triton_kw,
                                   description="pointwise template: one pass, gradient in the "
                                               "forward"))
    register("multiclass_hinge", Impl("torch", multiclass_hinge_torch, kind="baseline",
                                      description="torch.nn.functional.multi_margin_loss"))
    register("multiclass_hinge", Impl("triton", multiclass_hinge_triton,
                                      bytes_model=streamed("input"), **triton_kw,
                                      description="row-wise template: each row read once, "
                                                  "its gradient written in the forward"))
    register("margin_ranking", Impl("torch", margin_ranking_torch, kind="baseline",
                                    description="torch.nn.functional.margin_ranking_loss"))
    register("margin_ranking", Impl("triton", margin_ranking_triton,
                                    bytes_model=streamed("input1", "input2"), **triton_kw,
                                    description="pointwise template with the labels as a "
                                                "third operand"))
