"""Input checks shared by every implementation of a loss, so all of them reject bad
input the same way: a ValueError/TypeError naming the argument and what was expected."""

from __future__ import annotations

import math
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


def _first_bad(t: torch.Tensor, ok: torch.Tensor) -> str:
    bad = t[~ok]
    more = f" (and {bad.numel() - 1} more)" if bad.numel() > 1 else ""
    return f"{bad[0].item()!r}{more}"


def check_labels_in(loss: str, name: str, t: torch.Tensor, allowed: tuple) -> None:
    """Every value of ``t`` is one of ``allowed``, e.g. (-1, 1) for margin labels."""
    check_real(loss, name, t)
    ok = torch.zeros(t.shape, dtype=torch.bool, device=t.device)
    for value in allowed:
        ok |= t == value
    if not bool(ok.all()):
        listed = ", ".join(f"{v:+g}" if isinstance(v, (int, float)) else str(v) for v in allowed)
        raise ValueError(f"{loss}: {name} must hold only labels in {{{listed}}}, "
                         f"got {_first_bad(t, ok)}")


def check_real(loss: str, name: str, t: torch.Tensor) -> None:
    """A real (not complex) tensor: complex labels compare equal to real ones."""
    if t.is_complex():
        raise TypeError(f"{loss}: {name} must be a real tensor, got {t.dtype}")


def check_in_range(loss: str, name: str, t: torch.Tensor, low: float, high: float) -> None:
    """Every value of ``t`` lies in [low, high] (NaN does not)."""
    ok = (t >= low) & (t <= high)
    if not bool(ok.all()):
        raise ValueError(f"{loss}: {name} must lie in [{low:g}, {high:g}], "
                         f"got {_first_bad(t, ok)}")


def check_class_labels(loss: str, name: str, t: torch.Tensor, rows: int, classes: int) -> None:
    """``t`` is an integer tensor of shape (rows,) with values in [0, classes)."""
    check_tensor(loss, **{name: t})
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{loss}: {name} must hold integer class indices, got {t.dtype}")
    if tuple(t.shape) != (rows,):
        raise ValueError(f"{loss}: {name} must have shape ({rows},) (one class index per "
                         f"row of input), got {tuple(t.shape)}")
    ok = (t >= 0) & (t < classes)
    if not bool(ok.all()):
        raise ValueError(f"{loss}: {name} must hold class indices in [0, {classes - 1}], "
                         f"got {_first_bad(t, ok)}")


def check_broadcasts_to(loss: str, name: str, t: torch.Tensor, shape) -> None:
    """``t`` broadcasts to ``shape`` without growing it."""
    shape = tuple(shape)
    try:
        out = torch.broadcast_shapes(tuple(t.shape), shape)
    except RuntimeError:
        out = None
    if out != shape:
        raise ValueError(f"{loss}: {name} of shape {tuple(t.shape)} must broadcast to the "
                         f"input's shape {shape}")


def check_number(loss: str, name: str, value, low: float | None = None,
                 high: float | None = None, open_interval: bool = False) -> None:
    """A real scalar option, optionally within bounds (open or closed)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{loss}: {name} must be a number, got {type(value).__name__}")
    if math.isnan(value):
        raise ValueError(f"{loss}: {name} must be a number, got nan")
    below = low is not None and (value <= low if open_interval else value < low)
    above = high is not None and (value >= high if open_interval else value > high)
    if below or above:
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        brackets = ("(", ")") if open_interval else ("[", "]")
        raise ValueError(f"{loss}: {name} must lie in {brackets[0]}{lo}, {hi}{brackets[1]}, "
                         f"got {value!r}")


def check_choice(loss: str, name: str, value, allowed: Iterable) -> None:
    allowed = tuple(allowed)
    if value not in allowed or isinstance(value, bool):
        raise ValueError(f"{loss}: {name} must be one of {allowed}, got {value!r}")


#: The forms of `LossSpec.input_domains` entries (what an input may hold):
#:   ("index", high[, extra])  integer class indices in [0, high), or one of ``extra`` or
#:                             the option ``ignore_index``; ``high`` is an int, a callable
#:                             of the inputs, or None (no upper bound)
#:   ("integers",)             integer labels of any value (only equality matters)
#:   ("values", (v, ...))      only these values, in any real dtype (a bool mask: (0, 1))
#:   ("range", low, high)      real values in [low, high] (NaN is not)
DOMAIN_KINDS = ("index", "integers", "values", "range")
