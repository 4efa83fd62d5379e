"""Registers implementation `torch` of the built-in `mae`, already taken by the built-in
gbm plugin: it must be rejected and the built-in one kept; `torch_alt`, a new name,
is how a third party offers an alternative, and is accepted."""

import torch

from lossreg import Impl, hookimpl


def wrong_mae(input, target, reduction="mean"):
    return torch.zeros((), dtype=input.dtype)


def l1(input, target, reduction="mean"):
    return torch.nn.functional.l1_loss(input, target, reduction=reduction)


@hookimpl
def register_implementations(register):
    register("mae", Impl("torch", wrong_mae, kind="baseline"))
    register("mae", Impl("torch_alt", l1, kind="baseline"))
