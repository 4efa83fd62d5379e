"""Section 1, linear regression: mean squared error."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lossreg import Impl, LossSpec, hookimpl
from lossreg.kernels.traffic import streamed
from lossreg.kernels import jit, pointwise_loss
from lossreg.validate import check_reduction, check_same_shape, check_floating


def _validate(input, target, reduction):
    check_floating("mse", input=input, target=target)
    check_same_shape("mse", input=input, target=target)
    check_reduction("mse", reduction)


def mse_reference(input: torch.Tensor, target: torch.Tensor, reduction: str = "mean"):
    """The formula, term by term."""
    _validate(input, target, reduction)
    sq = (input - target) ** 2
    if reduction == "none":
        return sq
    return sq.sum() / sq.numel() if reduction == "mean" else sq.sum()


def mse_torch(input, target, reduction="mean"):
    _validate(input, target, reduction)
    return F.mse_loss(input, target, reduction=reduction)


@jit
def _mse_term(x, y, p0, p1):
    d = x - y
    return d * d, 2.0 * d, -2.0 * d


_mse_kernel = pointwise_loss(_mse_term, name="mse")


def mse_triton(input, target, reduction="mean"):
    _validate(input, target, reduction)
    return _mse_kernel(input, target, reduction)


def make_inputs(case):
    return {"input": case.randn(case.n), "target": case.randn(case.n)}


EDGE_CASES = {
    "one_element": lambda case: {"input": case.randn(1), "target": case.randn(1)},
    "block_plus_one": lambda case: {"input": case.randn(4097), "target": case.randn(4097)},
    "large_values": lambda case: {
        "input": case.randn(3001) * 1e3, "target": case.randn(3001) * 1e3
    },
    "matrix": lambda case: {"input": case.randn(37, 53), "target": case.randn(37, 53)},
}


@hookimpl
def register_losses(register):
    register(
        LossSpec(
            name="mse",
            family="linear_regression",
            title="Mean squared error",
            formula=r"\frac{1}{n}\sum_{i=1}^{n} (y_i - \hat y_i)^2",
            description="Squared error of a regression head; gradients flow to input and target.",
            citation="Gauss (1809); torch.nn.functional.mse_loss",
            reference=mse_reference,
            make_inputs=make_inputs,
            options={"reduction": "mean"},
            check_options=[{"reduction": "sum"}, {"reduction": "none"}],
            sizes={
                "quick": [1000, 4099],
                "default": [2**12, 2**16, 2**20, 2**22],
                "large": [2**20, 2**24, 2**26],
            },
            # 3 flops per element forward (sub, mul, add), 2 backward (scale both grads).
            flops=lambda inp: {"forward": 3 * inp["input"].numel(),
                               "backward": 2 * inp["input"].numel(),
                               "full": 5 * inp["input"].numel()},
            edge_cases=EDGE_CASES,
        )
    )


@hookimpl
def register_implementations(register):
    register("mse", Impl("torch", mse_torch, kind="baseline", backend="torch",
                         description="torch.nn.functional.mse_loss"))
    register("mse", Impl("triton", mse_triton,
                         bytes_model=streamed("input", "target"),
                         backend="triton", devices=("cuda",),
                         grad_in_forward=True, requires=("triton",),
                         description="pointwise template: one pass, gradient in the forward"))
