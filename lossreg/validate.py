"""Input checks shared by every implementation of a loss, so all of them reject bad
input the same way: a ValueError/TypeError naming the argument and what was expected."""

from __future__ import annotations

from typing import Iterable

import torch

REDUCTIONS = ("mean", "sum", "none")


def check_reduction(loss: str, reduction, allowed: Iterable[str] = REDUCTIONS) -> None:
    allowed = tuple(allowed)
    if reduction not in allowed:
        raise ValueError(f"{loss}: reduction must be one of {allowed}, got {reduction!r}")


def check_tensor(loss: str, **tensors) -> None:
    for name, t in tensors.items():
        if not torch.is_tensor(t):
            raise TypeError(f"{loss}: {name} must be a torch.Tensor, got {type(t).__name__}")


def check_floating(loss: str, **tensors) -> None:
    check_tensor(loss, **tensors)
    for name, t in tensors.items():
        if not t.is_floating_point():
            raise TypeError(f"{loss}: {name} must be a floating-point tensor, got {t.dtype}")
    check_same_device(loss, **tensors)


def check_same_device(loss: str, **tensors) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{k} on {v}" for k, v in devices.items())
        raise ValueError(f"{loss}: all inputs must be on one device, got {listed}")


def check_same_shape(loss: str, **tensors) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{k} {v}" for k, v in shapes.items())
        raise ValueError(f"{loss}: expected inputs of the same shape, got {listed}")
