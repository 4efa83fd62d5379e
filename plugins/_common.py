"""Small helpers shared by the built-in plugins (not a plugin itself: no hooks)."""

from __future__ import annotations

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least float32: 16-bit inputs are computed in float32, float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)


def reduce_loss(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    """torch's reductions: ``none`` keeps the terms, ``mean`` (nan when empty), ``sum``."""
    if reduction == "none":
        return loss
    return loss.mean() if reduction == "mean" else loss.sum()


def pm1_labels(case, *shape, dtype=None) -> torch.Tensor:
    """Random -1/+1 labels, in the case's dtype unless told."""
    return torch.where(case.rand(*shape) > 0.5, 1.0, -1.0).to(dtype or case.dtype)


def reductions() -> list[dict]:
    """The check_options every loss runs besides its default ``mean``."""
    return [{"reduction": "sum"}, {"reduction": "none"}]


def pointwise_flops(per_element_fwd: int, per_element_bwd: int, key: str = "input"):
    """A flops model for a loss whose cost is a fixed count per element of ``key``."""

    def model(inputs):
        n = inputs[key].numel()
        return {"forward": per_element_fwd * n, "backward": per_element_bwd * n,
                "full": (per_element_fwd + per_element_bwd) * n}

    return model


POINTWISE_SIZES = {
    "quick": [1000, 4099],
    "default": [2**12, 2**16, 2**20, 2**22],
    "large": [2**20, 2**24, 2**26],
}
