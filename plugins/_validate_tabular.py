"""Input checks for the tree, forest, k-NN and naive Bayes plugins (not a plugin: no hooks).

They complement :mod:`lossreg.validate` and follow its convention: every message starts
with the loss's name, names the argument and says what was expected. Each loss calls
one ``_validate`` function from every implementation, so all of them reject bad input
the same way.

Checks on the values of float inputs (probabilities in [0, 1], a positive variance)
cost one read of the input; torch's own ``gaussian_nll_loss`` pays the same to reject a
negative variance. They catch NaN too (NaN is not in any range).
"""

from __future__ import annotations

import math

import torch

from lossreg.validate import (  # noqa: F401
    check_floating,
    check_real,
    check_reduction,
    check_tensor,
)


def _first_bad(t: torch.Tensor, ok: torch.Tensor) -> str:
    bad = t[~ok]
    more = f" (and {bad.numel() - 1} more)" if bad.numel() > 1 else ""
    return f"{bad[0].item()!r}{more}"


def check_ndim(loss: str, name: str, t: torch.Tensor, ndims: tuple[int, ...], what: str) -> None:
    """``t.dim()`` is one of ``ndims``; ``what`` describes the expected layout."""
    if t.dim() not in ndims:
        raise ValueError(f"{loss}: {name} must be {what}, got shape {tuple(t.shape)}")


def check_shape(loss: str, name: str, t: torch.Tensor, shape: tuple, what: str) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{loss}: {name} must have shape {tuple(shape)} ({what}), "
                         f"got {tuple(t.shape)}")


def check_nonempty(loss: str, name: str, t: torch.Tensor, what: str) -> None:
    if t.numel() == 0:
        raise ValueError(f"{loss}: {name} must not be empty ({what}), got shape "
                         f"{tuple(t.shape)}")


def check_integer(loss: str, name: str, t: torch.Tensor) -> None:
    check_tensor(loss, **{name: t})
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{loss}: {name} must hold integer class indices, got {t.dtype}")


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


def check_values_in(loss: str, name: str, t: torch.Tensor, low: float, high: float,
                    what: str) -> None:
    """Every value lies in [low, high] (NaN does not)."""
    ok = (t >= low) & (t <= high)
    if t.numel() and not bool(ok.all()):
        raise ValueError(f"{loss}: {name} must lie in [{low:g}, {high:g}] ({what}), "
                         f"got {_first_bad(t, ok)}")


def check_pm1(loss: str, name: str, t: torch.Tensor) -> None:
    """Labels in {-1, +1}, integer or float."""
    check_tensor(loss, **{name: t})
    check_real(loss, name, t)
    ok = (t == 1) | (t == -1)
    if t.numel() and not bool(ok.all()):
        raise ValueError(f"{loss}: {name} must hold only labels in {{-1, +1}}, "
                         f"got {_first_bad(t, ok)}")


def check_number(loss: str, name: str, value, low: float | None = None,
                 high: float | None = None, low_open: bool = False) -> None:
    """A finite real scalar option within [low, high] (or (low, high] with ``low_open``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{loss}: {name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{loss}: {name} must be a finite number, got {value!r}")
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and value > high
    if below or above:
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        raise ValueError(f"{loss}: {name} must lie in {'(' if low_open else '['}{lo}, {hi}], "
                         f"got {value!r}")


def check_int_option(loss: str, name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{loss}: {name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{loss}: {name} must be >= {low}, got {value}")


def check_bool(loss: str, name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{loss}: {name} must be a bool, got {type(value).__name__}")


def check_choice(loss: str, name: str, value, allowed: tuple) -> None:
    if isinstance(value, bool) or value not in allowed:
        raise ValueError(f"{loss}: {name} must be one of {allowed}, got {value!r}")


def check_same_dtype(loss: str, **tensors) -> None:
    dtypes = {k: t.dtype for k, t in tensors.items()}
    if len(set(dtypes.values())) > 1:
        listed = ", ".join(f"{k} {v}" for k, v in dtypes.items())
        raise TypeError(f"{loss}: expected inputs of one floating dtype, got {listed}")


def check_device(loss: str, ref_name: str, ref: torch.Tensor, **tensors) -> None:
    """Tensors (of any dtype, e.g. labels) on the same device as ``ref``."""
    for name, t in tensors.items():
        if t.device != ref.device:
            raise ValueError(f"{loss}: {name} must be on {ref_name}'s device {ref.device}, "
                             f"got {t.device}")
