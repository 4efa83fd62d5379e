"""Section 7, AdaBoost: the exponential loss it minimizes stagewise, and its multi-class
form SAMME.

Both are ``e^{g}`` of a margin, so they overflow for confidently wrong scores. The
Triton kernels use the templates' ``exp_form``: the value ``e^g`` is rounded to the
input dtype before it enters the gradient, so loss and gradient are inf exactly where
the eager reference's are in that dtype, and never NaN for finite inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lossreg import Impl, LossSpec, hookimpl
from lossreg.kernels.traffic import streamed
from lossreg.kernels import jit, pointwise_loss, rowwise_loss, tl
from lossreg.validate import (
    check_class_labels,
    check_floating,
    check_labels_in,
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


# ---------------------------------------------------------------- exponential
def _validate_exponential(input, target, reduction):
    check_floating("exponential", input=input)
    check_tensor("exponential", target=target)
    check_same_device("exponential", input=input, target=target)
    check_same_shape("exponential", input=input, target=target)
    check_reduction("exponential", reduction)
    check_labels_in("exponential", "target", target, PM1)


def exponential_reference(input, target, reduction="mean"):
    """e^{-y f} per element."""
    _validate_exponential(input, target, reduction)
    return reduce_loss(torch.exp(-target * input), reduction)


@jit
def _exponential_exponent(x, y, p0, p1):
    # exp_form: the exponent g = -y f and its derivatives; the template exponentiates
    return -y * x, -y, -x


_exponential_kernel = pointwise_loss(_exponential_exponent, name="exponential", exp_form=True)


def exponential_triton(input, target, reduction="mean"):
    _validate_exponential(input, target, reduction)
    return _exponential_kernel(input, target, reduction)


def exponential_inputs(case):
    return {"input": case.randn(case.n), "target": pm1_labels(case, case.n)}


def _overflow(case):
    """Margins of -1e4 (inf in every dtype), +1e4 (exactly 0), and ordinary ones."""
    y = pm1_labels(case, 3001)
    f = case.randn(3001)
    f[::3] = -y[::3] * 1e4
    f[1::3] = y[1::3] * 1e4
    return {"input": f, "target": y}


EXPONENTIAL_EDGE_CASES = {
    "one_element": lambda case: {"input": case.randn(1), "target": pm1_labels(case, 1)},
    "block_plus_one": lambda case: {"input": case.randn(4097), "target": pm1_labels(case, 4097)},
    "matrix": lambda case: {"input": case.randn(37, 53), "target": pm1_labels(case, 37, 53)},
    # |margin| <= 10: finite even in float16
    "large_margins": lambda case: {"input": (case.randn(3001) * 4).clamp(-10, 10),
                                   "target": pm1_labels(case, 3001)},
    "overflow": _overflow,
    "integer_labels": lambda case: {"input": case.randn(3001),
                                    "target": pm1_labels(case, 3001, dtype=torch.int64)},
}


# ---------------------------------------------------------------- samme
def _validate_samme(input, target, reduction):
    check_floating("samme", input=input)
    if input.dim() != 2 or input.shape[1] < 2:
        raise ValueError(f"samme: input must be a (N, K) matrix of class scores with K >= 2 "
                         f"classes, got shape {tuple(input.shape)}")
    check_same_device("samme", input=input, target=target)
    check_class_labels("samme", "target", target, *input.shape)
    check_reduction("samme", reduction)


def samme_reference(input, target, reduction="mean"):
    """exp(-c_i . f_i / K) with c_ik = 1 for the label, -1/(K-1) for the others."""
    _validate_samme(input, target, reduction)
    classes = input.shape[1]
    onehot = F.one_hot(target, classes).to(input.dtype)
    c = onehot - (1 - onehot) / (classes - 1)
    return reduce_loss(torch.exp(-(c * input).sum(dim=1) / classes), reduction)


@jit
def _samme_exponent(s, valid, is_label, C, p0, p1):
    # exp_form: the row exponent g = -c.f / K and dg/df = -c / K
    c = tl.where(is_label, 1.0, -1.0 / (C - 1.0))
    c = tl.where(valid, c, 0.0)
    return -tl.sum(c * s, axis=1) / C, -c / C


_samme_kernel = rowwise_loss(_samme_exponent, name="samme", exp_form=True)


def samme_triton(input, target, reduction="mean"):
    _validate_samme(input, target, reduction)
    return _samme_kernel(input, target, reduction)


def _scores(case, rows, classes=CLASSES):
    return {"input": case.randn(rows, classes), "target": case.randint(0, classes, rows)}


def samme_inputs(case):
    return _scores(case, case.n)


def _samme_overflow(case):
    """Rows whose label scores -1e4 (loss inf in every dtype), +1e4 (exactly 0)."""
    inputs = _scores(case, 60)
    s, y = inputs["input"], inputs["target"]
    s[::3].scatter_(1, y[::3, None], -1e4)
    s[1::3].scatter_(1, y[1::3, None], 1e4)
    return inputs


SAMME_EDGE_CASES = {
    "one_row": lambda case: _scores(case, 1),
    "tile_plus_one": lambda case: _scores(case, 257),  # 256 rows of 10 classes per tile
    "odd_classes": lambda case: _scores(case, 37, 7),
    "two_classes": lambda case: _scores(case, 101, 2),
    "wide_rows": lambda case: _scores(case, 5, 1000),
    "overflow": _samme_overflow,
}


@hookimpl
def register_losses(register):
    register(LossSpec(
        name="exponential", family="adaboost", title="Exponential loss",
        input_domains={"target": ("values", (-1, 1))},
        formula=r"\frac{1}{n}\sum_{i=1}^{n} e^{-y_i f_i},\quad y_i\in\{-1,+1\}",
        description="AdaBoost's loss on scores f and labels -1/+1 (float or integer). "
                    "Overflows to inf for very wrong scores exactly as the eager reference "
                    "does in the same dtype; never NaN for finite inputs.",
        citation="Freund & Schapire (1997); Friedman, Hastie & Tibshirani (2000), Additive "
                 "logistic regression: a statistical view of boosting",
        reference=exponential_reference, make_inputs=exponential_inputs,
        options={"reduction": "mean"}, check_options=reductions(),
        grad_inputs=("input",), sizes=POINTWISE_SIZES,
        flops=pointwise_flops(2, 2), edge_cases=EXPONENTIAL_EDGE_CASES))
    register(LossSpec(
        name="samme", family="adaboost", title="SAMME multi-class exponential loss",
        input_domains={"target": ("index", lambda inputs: inputs["input"].shape[1])},
        formula=(r"\frac{1}{n}\sum_{i=1}^{n}\exp\left(-\frac{1}{K}\mathbf c_i^\top f_i\right),"
                 r"\quad c_{ik} = \begin{cases}1 & k = y_i\\ -\frac{1}{K-1} & k\ne y_i"
                 r"\end{cases}"),
        description=("Multi-class AdaBoost's loss on an (N, K) score matrix and integer "
                     f"labels. Generated problems have K = {CLASSES}; n counts rows."),
        citation="Zhu, Zou, Rosset & Hastie (2009), Multi-class AdaBoost",
        reference=samme_reference, make_inputs=samme_inputs,
        options={"reduction": "mean"}, check_options=reductions(),
        grad_inputs=("input",), sizes=ROW_SIZES, x_name="rows",
        # per score: the weight, a multiply-add; per row an exp; backward a multiply
        flops=pointwise_flops(3, 1), edge_cases=SAMME_EDGE_CASES))


@hookimpl
def register_implementations(register):
    triton_kw = dict(backend="triton", devices=("cuda",), grad_in_forward=True,
                     requires=("triton",))
    register("exponential", Impl("triton", exponential_triton,
                                 bytes_model=streamed("input"), **triton_kw,
                                 description="pointwise template, exp_form: one pass, "
                                             "gradient in the forward"))
    register("samme", Impl("triton", samme_triton, bytes_model=streamed("input"), **triton_kw,
                           description="row-wise template, exp_form: each row read once, "
                                       "its gradient written in the forward"))
