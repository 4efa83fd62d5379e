"""Input checks shared by every implementation of a loss, so all of them reject bad
input the same way: a ValueError/TypeError that starts with the loss's name, names the
argument and says what was expected.

This is the one validation module: the core and every built-in plugin import from it.
Each loss calls one ``_validate`` function from every implementation. Checks on values
(a {0, 1} mask, labels in range, probabilities in [0, 1]) cost one read of the input;
they keep a kernel from reading out of bounds, and catch NaN (NaN is in no range).
"""

from __future__ import annotations

import math
from typing import Iterable

import torch

REDUCTIONS = ("mean", "sum", "none")


def _first_bad(t: torch.Tensor, ok: torch.Tensor) -> str:
    """The first value of ``t`` where ``ok`` is False, and how many more there are."""
    bad = t[~ok]
    more = f" (and {bad.numel() - 1} more)" if bad.numel() > 1 else ""
    return f"{bad[0].item()!r}{more}"


def describe(t) -> str:
    if torch.is_tensor(t):
        return f"{t.dtype} tensor of shape {tuple(t.shape)}"
    return type(t).__name__


# ---------------------------------------------------------------- options
def check_reduction(loss: str, reduction, allowed: Iterable[str] = REDUCTIONS) -> None:
    allowed = tuple(allowed)
    if reduction not in allowed:
        raise ValueError(f"{loss}: reduction must be one of {allowed}, got {reduction!r}")


def check_number(loss: str, name: str, value, low: float | None = None,
                 high: float | None = None, open_interval: bool = False, *,
                 low_open: bool = False) -> None:
    """A finite real scalar option within [low, high]; ``open_interval`` excludes both
    bounds, ``low_open`` only the lower one."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{loss}: {name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{loss}: {name} must be a finite number, got {value!r}")
    low_open = low_open or open_interval
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and (value >= high if open_interval else value > high)
    if below or above:
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        raise ValueError(f"{loss}: {name} must lie in {'(' if low_open else '['}{lo}, {hi}"
                         f"{')' if open_interval else ']'}, got {value!r}")


def check_int_option(loss: str, name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{loss}: {name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{loss}: {name} must be >= {low}, got {value}")


def check_bool(loss: str, name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{loss}: {name} must be a bool, got {type(value).__name__}")


def check_choice(loss: str, name: str, value, allowed: Iterable) -> None:
    allowed = tuple(allowed)
    if isinstance(value, bool) or value not in allowed:
        raise ValueError(f"{loss}: {name} must be one of {allowed}, got {value!r}")


# ---------------------------------------------------------------- tensors: type, device
def check_tensor(loss: str, **tensors) -> None:
    for name, t in tensors.items():
        if not torch.is_tensor(t):
            raise TypeError(f"{loss}: {name} must be a torch.Tensor, got {type(t).__name__}")


def check_floating(loss: str, **tensors) -> None:
    """Floating-point tensors on one device (dtypes may differ)."""
    check_tensor(loss, **tensors)
    for name, t in tensors.items():
        if not t.is_floating_point():
            raise TypeError(f"{loss}: {name} must be a floating-point tensor, got {t.dtype}")
    check_same_device(loss, **tensors)


def check_float(loss: str, **tensors) -> None:
    """Floating-point tensors of one dtype on one device (the first one's)."""
    for name, t in tensors.items():
        if not torch.is_tensor(t) or not t.is_floating_point():
            raise TypeError(f"{loss}: {name} must be a floating-point tensor, got "
                            f"{describe(t)}")
    first, ref = next(iter(tensors.items()))
    for name, t in tensors.items():
        if t.dtype != ref.dtype:
            raise TypeError(f"{loss}: {name} must have {first}'s dtype {ref.dtype}, got "
                            f"{t.dtype}")
    check_device(loss, first, ref, **tensors)


def check_same_dtype(loss: str, **tensors) -> None:
    dtypes = {k: t.dtype for k, t in tensors.items()}
    if len(set(dtypes.values())) > 1:
        listed = ", ".join(f"{k} {v}" for k, v in dtypes.items())
        raise TypeError(f"{loss}: expected inputs of one floating dtype, got {listed}")


def check_real(loss: str, name: str, t: torch.Tensor) -> None:
    """A real (not complex) tensor: complex labels compare equal to real ones."""
    if t.is_complex():
        raise TypeError(f"{loss}: {name} must be a real tensor, got {t.dtype}")


def check_integer(loss: str, name: str, t: torch.Tensor) -> None:
    check_tensor(loss, **{name: t})
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{loss}: {name} must hold integer class indices, got {t.dtype}")


def check_same_device(loss: str, **tensors) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{k} on {v}" for k, v in devices.items())
        raise ValueError(f"{loss}: all inputs must be on one device, got {listed}")


def check_device(loss: str, ref_name: str, ref: torch.Tensor, **tensors) -> None:
    """Tensors (of any dtype, e.g. labels) on the same device as ``ref``."""
    for name, t in tensors.items():
        if t.device != ref.device:
            raise ValueError(f"{loss}: {name} must be on {ref_name}'s device {ref.device}, "
                             f"got {t.device}")


# ---------------------------------------------------------------- tensors: shape
def check_same_shape(loss: str, **tensors) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{k} {v}" for k, v in shapes.items())
        raise ValueError(f"{loss}: expected inputs of the same shape, got {listed}")


def check_shape(loss: str, name: str, t: torch.Tensor, shape, what: str) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{loss}: {name} must have shape {tuple(shape)} ({what}), got "
                         f"{tuple(t.shape)}")


def check_ndim(loss: str, name: str, t: torch.Tensor, ndims: int | tuple[int, ...],
               what: str) -> None:
    """``t.dim()`` is ``ndims`` (or one of them); ``what`` describes the expected layout."""
    if t.dim() not in ((ndims,) if isinstance(ndims, int) else tuple(ndims)):
        raise ValueError(f"{loss}: {name} must be {what}, got shape {tuple(t.shape)}")


def check_nonempty(loss: str, name: str, t: torch.Tensor, what: str) -> None:
    if t.numel() == 0:
        raise ValueError(f"{loss}: {name} must not be empty ({what}), got shape "
                         f"{tuple(t.shape)}")


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


# ---------------------------------------------------------------- tensors: values
def check_values(loss: str, name: str, t: torch.Tensor, low: float, high: float,
                 what: str = "") -> None:
    """Every value lies in [low, high] (NaN does not); ``what`` says what they are."""
    ok = (t >= low) & (t <= high)
    if t.numel() and not bool(ok.all()):
        about = f" ({what})" if what else ""
        raise ValueError(f"{loss}: {name} must lie in [{low:g}, {high:g}]{about}, got "
                         f"{_first_bad(t, ok)}")


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


def check_pm1(loss: str, name: str, t: torch.Tensor) -> None:
    """Labels in {-1, +1}, integer or float."""
    check_tensor(loss, **{name: t})
    check_labels_in(loss, name, t, (-1, 1))


def check_mask(loss: str, name: str, t, shape, what: str) -> None:
    """A mask of ``shape``: bool, or numbers that are all 0 or 1."""
    check_tensor(loss, **{name: t})
    check_shape(loss, name, t, shape, what)
    if t.dtype == torch.bool or not t.numel():
        return
    if t.is_complex():
        raise TypeError(f"{loss}: {name} must be a bool or real tensor of 0s and 1s, got "
                        f"{t.dtype}")
    ok = (t == 0) | (t == 1)
    if not bool(ok.all()):
        raise ValueError(f"{loss}: {name} must hold only 0 and 1, got {_first_bad(t, ok)}")


def check_class_labels(loss: str, name: str, t: torch.Tensor, rows: int, classes: int) -> None:
    """``t`` is an integer tensor of shape (rows,) with values in [0, classes)."""
    check_integer(loss, name, t)
    if tuple(t.shape) != (rows,):
        raise ValueError(f"{loss}: {name} must have shape ({rows},) (one class index per "
                         f"row of input), got {tuple(t.shape)}")
    ok = (t >= 0) & (t < classes)
    if not bool(ok.all()):
        raise ValueError(f"{loss}: {name} must hold class indices in [0, {classes - 1}], "
                         f"got {_first_bad(t, ok)}")


def check_index(loss: str, name: str, t, rows: int, high: int) -> None:
    """Integer indices of shape (rows,) in [0, high)."""
    check_tensor(loss, **{name: t})
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{loss}: {name} must hold integer indices, got {t.dtype}")
    check_shape(loss, name, t, (rows,), "one index per row")
    ok = (t >= 0) & (t < high)
    if t.numel() and not bool(ok.all()):
        raise ValueError(f"{loss}: {name} must hold indices in [0, {high - 1}], got "
                         f"{_first_bad(t, ok)}")


def check_labels(loss: str, name: str, t: torch.Tensor, classes: int | None = None,
                 ignore_index: int | None = None) -> None:
    """Integer class indices in [0, classes) (>= 0 when ``classes`` is None), or equal to
    ``ignore_index``."""
    check_integer(loss, name, t)
    ok = t >= 0 if classes is None else (t >= 0) & (t < classes)
    if ignore_index is not None:
        ok |= t == ignore_index
    if t.numel() and not bool(ok.all()):
        extra = f" or ignore_index={ignore_index}" if ignore_index is not None else ""
        span = ">= 0" if classes is None else f"in [0, {classes - 1}]"
        raise ValueError(f"{loss}: {name} must hold class indices {span}{extra}, "
                         f"got {_first_bad(t, ok)}")


#: The forms of `LossSpec.input_domains` entries (what an input may hold):
#:   ("index", high[, extra])  integer class indices in [0, high), or one of ``extra`` or
#:                             the option ``ignore_index``; ``high`` is an int, a callable
#:                             of the inputs, or None (no upper bound)
#:   ("integers",)             integer labels of any value (only equality matters)
#:   ("values", (v, ...))      only these values, in any real dtype (a bool mask: (0, 1))
#:   ("range", low, high)      real values in [low, high] (NaN is not)
DOMAIN_KINDS = ("index", "integers", "values", "range")
