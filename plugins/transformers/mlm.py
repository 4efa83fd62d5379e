"""Masked-LM loss: cross-entropy of the LM head over the masked positions only. The
optimized versions select the masked rows before the vocabulary projection, then run
fused linear cross-entropy on them alone."""

from __future__ import annotations

import torch

from lossreg_plugins.neural_networks import ce_reference

from .linear_ce import _fused, make_flce_inputs, validate_flce


def validate_mlm(hidden, weight, labels, reduction):
    validate_flce("mlm", hidden, weight, None, labels, -100, 0.0, 0.0, None, reduction,
                  target_name="labels")


def mlm_reference(hidden, weight, labels, reduction="mean"):
    """Project every position, then CE where labels are not -100."""
    validate_mlm(hidden, weight, labels, reduction)
    return ce_reference(hidden @ weight.T, labels, ignore_index=-100, reduction=reduction)


def _mlm_selected(engine):
    flce = _fused(engine)

    def fn(hidden, weight, labels, reduction="mean"):
        """Select the masked rows first, then fused linear CE on them alone."""
        validate_mlm(hidden, weight, labels, reduction)
        idx = (labels != -100).nonzero().squeeze(1)
        out = flce(hidden.index_select(0, idx), weight, labels.index_select(0, idx),
                   reduction=reduction)
        if reduction != "none":
            return out
        full = out.new_zeros(labels.shape)
        return full.index_put((idx,), out)

    fn.__name__ = f"mlm_{engine}"
    return fn


mlm_selected = _mlm_selected("torch")
mlm_triton = _mlm_selected("triton")


def make_mlm_inputs(case):
    inputs = make_flce_inputs(case)
    masked = case.rand(case.n, dtype=torch.float32) < 0.15
    masked[0] = True  # at least one masked position
    labels = torch.where(masked, inputs.pop("target"), torch.full((case.n,), -100,
                                                               device=case.device))
    return {**inputs, "labels": labels}
