"""Input checks for the autoencoder, rl and bayesian plugins (not a plugin: no hooks).

They complement :mod:`lossreg.validate` and follow its convention: every message starts
with the loss's name, names the argument and says what was expected. Each loss calls one
``_validate`` function from every implementation, so all of them reject bad input the
same way. Value checks (a {0, 1} mask, actions in range) cost one read of a small
tensor; they keep a kernel from reading out of bounds or averaging over nothing.
"""

from __future__ import annotations

import torch

from lossreg.validate import check_tensor


def _first_bad(t: torch.Tensor, ok: torch.Tensor) -> str:
    bad = t[~ok]
    more = f" (and {bad.numel() - 1} more)" if bad.numel() > 1 else ""
    return f"{bad[0].item()!r}{more}"


def describe(t) -> str:
    if torch.is_tensor(t):
        return f"{t.dtype} tensor of shape {tuple(t.shape)}"
    return type(t).__name__


def check_float(loss: str, **tensors) -> None:
    """Floating-point tensors of one dtype on one device."""
    for name, t in tensors.items():
        if not torch.is_tensor(t) or not t.is_floating_point():
            raise TypeError(f"{loss}: {name} must be a floating-point tensor, got "
                            f"{describe(t)}")
    first, ref = next(iter(tensors.items()))
    for name, t in tensors.items():
        if t.dtype != ref.dtype:
            raise TypeError(f"{loss}: {name} must have {first}'s dtype {ref.dtype}, got "
                            f"{t.dtype}")
        if t.device != ref.device:
            raise ValueError(f"{loss}: {name} must be on {first}'s device {ref.device}, got "
                             f"{t.device}")


def check_shape(loss: str, name: str, t: torch.Tensor, shape, what: str) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{loss}: {name} must have shape {tuple(shape)} ({what}), got "
                         f"{tuple(t.shape)}")


def check_ndim(loss: str, name: str, t: torch.Tensor, ndim: int, what: str) -> None:
    if t.dim() != ndim:
        raise ValueError(f"{loss}: {name} must be {what}, got shape {tuple(t.shape)}")


def check_device(loss: str, ref_name: str, ref: torch.Tensor, **tensors) -> None:
    for name, t in tensors.items():
        if t.device != ref.device:
            raise ValueError(f"{loss}: {name} must be on {ref_name}'s device {ref.device}, "
                             f"got {t.device}")


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


def check_values(loss: str, name: str, t: torch.Tensor, low: float, high: float,
                 what: str) -> None:
    """Every value lies in [low, high] (NaN does not)."""
    ok = (t >= low) & (t <= high)
    if t.numel() and not bool(ok.all()):
        raise ValueError(f"{loss}: {name} must lie in [{low:g}, {high:g}] ({what}), got "
                         f"{_first_bad(t, ok)}")
