"""Token-level cross-entropy over (B, T, V) logits: causal LM and seq2seq decoders.

Both reuse the `cross_entropy` kernel (no second CE kernel). The causal shift is done
on the targets, not the logits: row (b, t) is scored against token (b, t+1) and the
last position of each sequence is ignored, so the kernel runs over the contiguous
(B*T, V) logits without copying the (B, T-1, V) slice a shifted view would need.
"""

from __future__ import annotations

import torch

from lossreg.validate import check_reduction
from lossreg_plugins.neural_networks import (
    _ce_kernel,
    ce_reference,
    ce_torch,
    validate_ce_options,
    validate_targets,
)

from .linear_ce import _extras


def _check_logits(loss, logits):
    if not torch.is_tensor(logits) or not logits.is_floating_point() or logits.dim() != 3:
        raise ValueError(f"{loss}: logits must be a floating-point (B, T, V) tensor, got "
                         f"{getattr(logits, 'shape', type(logits).__name__)}")


# ------------------------------------------------------------------ causal LM
def validate_causal(logits, input_ids, ignore_index, label_smoothing, reduction, z_loss=0.0,
                    softcap=None, weight=None):
    _check_logits("causal_lm", logits)
    b, t, v = logits.shape
    if t < 2:
        raise ValueError(f"causal_lm: need at least 2 positions to predict a next token, "
                         f"got T={t}")
    if not torch.is_tensor(input_ids) or input_ids.shape != (b, t):
        raise ValueError(f"causal_lm: input_ids must have shape ({b}, {t}), got "
                         f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
    validate_targets("causal_lm", input_ids.reshape(-1), b * t, v, logits.device, ignore_index,
                     name="input_ids", ref_name="logits")
    validate_ce_options("causal_lm", label_smoothing, z_loss, reduction)
    if softcap is not None and not float(softcap) > 0:
        raise ValueError(f"causal_lm: softcap must be None or > 0, got {softcap}")
    if weight is not None and (not torch.is_tensor(weight) or weight.shape != (v,)
                               or not weight.is_floating_point()
                               or weight.device != logits.device):
        raise ValueError(f"causal_lm: weight (class weights) must be None or a floating-point "
                         f"tensor of shape ({v},) on {logits.device}, got "
                         f"{getattr(weight, 'shape', type(weight).__name__)}")


def _cap(x, softcap):
    return softcap * torch.tanh(x / softcap) if softcap else x


def _causal_eager(ce):
    def fn(logits, input_ids, ignore_index=-100, label_smoothing=0.0, reduction="mean",
           z_loss=0.0, softcap=None, weight=None, return_z_loss=False, return_lse=False):
        """Shift, flatten, cross-entropy: position t predicts token t+1."""
        validate_causal(logits, input_ids, ignore_index, label_smoothing, reduction, z_loss,
                        softcap, weight)
        b, t, v = logits.shape
        x = _cap(logits[:, :-1].reshape(-1, v), softcap)
        y = input_ids[:, 1:].reshape(-1)
        out = ce(x, y, weight=weight, ignore_index=ignore_index,
                 label_smoothing=label_smoothing, z_loss=z_loss, reduction=reduction)
        return _shape(_extras(out, x, y, weight, ignore_index, z_loss, reduction,
                              return_z_loss, return_lse), b, t - 1, reduction)

    return fn


def _shape(result, b, t, reduction):
    """(B, T) views of the per-position outputs: the loss and z-loss for ``none``, lse."""
    if not isinstance(result, tuple):
        return result.view(b, t) if reduction == "none" else result
    out = [r.view(b, t) if (reduction == "none" or k == len(result) - 1 and r.dim() == 1)
           else r for k, r in enumerate(result)]
    return tuple(out)


causal_reference = _causal_eager(ce_reference)
causal_torch = _causal_eager(ce_torch)


def shifted_targets(input_ids, ignore_index):
    """Targets for every (b, t) row: token t+1, and ignore_index at the last position."""
    pad = torch.full_like(input_ids[:, :1], ignore_index)
    return torch.cat([input_ids[:, 1:], pad], dim=1).reshape(-1)


def causal_triton(logits, input_ids, ignore_index=-100, label_smoothing=0.0, reduction="mean",
                  z_loss=0.0, softcap=None, weight=None, return_z_loss=False,
                  return_lse=False):
    """The cross_entropy kernel over all B*T rows of the unshifted logits, the targets
    shifted instead (no copy of the logits); softcap is applied by torch before it (a
    capped copy). The z-loss part and lse, when asked for, come from one more read."""
    validate_causal(logits, input_ids, ignore_index, label_smoothing, reduction, z_loss,
                    softcap, weight)
    b, t, v = logits.shape
    x = _cap(logits.reshape(b * t, v), softcap)
    y = shifted_targets(input_ids, ignore_index)
    out = _ce_kernel(x, y, weight, ignore_index, label_smoothing, z_loss, reduction)
    if reduction == "none":
        out = out.view(b, t)[:, :-1]
    if not (return_z_loss or return_lse):
        return out
    x_kept = x.detach().view(b, t, v)[:, :-1].reshape(-1, v)
    y_kept = input_ids[:, 1:].reshape(-1)
    extras = _extras(out, x_kept, y_kept, weight, ignore_index, z_loss, reduction,
                     return_z_loss, return_lse)
    return _shape(extras, b, t - 1, reduction)


def make_causal_inputs(case):
    """n sequences of `seq` tokens; each ends in a run of padding of random length."""
    t = int(case.params.get("seq", 17))
    v = int(case.params.get("vocab", 1000))
    ignore = int(case.params.get("ignore_index", -100))
    ids = case.randint(0, v, case.n, t)
    lengths = case.randint(2, t + 1, case.n)
    pad = torch.arange(t, device=case.device)[None, :] >= lengths[:, None]
    ids = torch.where(pad, torch.full_like(ids, ignore), ids)
    return {"logits": case.randn(case.n, t, v) * 2.0, "input_ids": ids}


# ------------------------------------------------------------------ seq2seq
NORMALIZE = ("token", "sequence")


def validate_seq2seq(logits, target, mask, label_smoothing, normalize, reduction):
    _check_logits("seq2seq", logits)
    b, t, v = logits.shape
    validate_targets("seq2seq", target.reshape(-1) if torch.is_tensor(target) else target,
                     b * t, v, logits.device, ignore_index=-100, ref_name="logits")
    if not torch.is_tensor(target) or target.shape != (b, t):
        raise ValueError(f"seq2seq: target must have shape ({b}, {t}), got {target.shape}")
    if not torch.is_tensor(mask) or mask.shape != (b, t) or mask.is_floating_point() \
            or mask.is_complex():
        raise ValueError(f"seq2seq: mask must be a bool or integer (B, T) = ({b}, {t}) tensor "
                         f"(1 = real token, 0 = padding), got "
                         f"{getattr(mask, 'dtype', type(mask).__name__)} "
                         f"{tuple(getattr(mask, 'shape', ()))}")
    if mask.device != logits.device:
        raise ValueError(f"seq2seq: mask must be on logits' device {logits.device}, got "
                         f"{mask.device}")
    # values on the host only, as validate_targets: on a GPU the check would sync
    if mask.device.type == "cpu" and mask.dtype != torch.bool and mask.numel() \
            and not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("seq2seq: mask must hold only 0 and 1 (1 = real token, 0 = "
                         f"padding), got {mask[(mask != 0) & (mask != 1)][0].item()}")
    if normalize not in NORMALIZE:
        raise ValueError(f"seq2seq: normalize must be one of {NORMALIZE}, got {normalize!r}")
    validate_ce_options("seq2seq", label_smoothing, 0.0, reduction)
    check_reduction("seq2seq", reduction)


def _normalize(tokens, mask, normalize, reduction):
    """Per-token losses (B, T), zero at padding -> the requested reduction.

    none: the (B, T) losses; sum: their total; mean: over real tokens (`token`) or the
    mean over sequences of each sequence's mean over its real tokens (`sequence`;
    sequences without real tokens count as 0).
    """
    if reduction == "none":
        return tokens
    if reduction == "sum":
        return tokens.sum()
    m = mask.to(tokens.dtype)
    if normalize == "token":
        return tokens.sum() / m.sum()
    return (tokens.sum(1) / m.sum(1).clamp_min(1)).mean()


def _masked_targets(target, mask):
    return torch.where(mask.bool(), target, torch.full_like(target, -100))


def seq2seq_reference(logits, target, mask, label_smoothing=0.0, normalize="token",
                      reduction="mean"):
    validate_seq2seq(logits, target, mask, label_smoothing, normalize, reduction)
    b, t, v = logits.shape
    tokens = ce_reference(logits.reshape(-1, v), _masked_targets(target, mask).reshape(-1),
                          label_smoothing=label_smoothing, reduction="none").view(b, t)
    return _normalize(tokens, mask, normalize, reduction)


def seq2seq_torch(logits, target, mask, label_smoothing=0.0, normalize="token",
                  reduction="mean"):
    validate_seq2seq(logits, target, mask, label_smoothing, normalize, reduction)
    b, t, v = logits.shape
    tokens = ce_torch(logits.reshape(-1, v), _masked_targets(target, mask).reshape(-1),
                      label_smoothing=label_smoothing, reduction="none").view(b, t)
    return _normalize(tokens, mask, normalize, reduction)


def seq2seq_triton(logits, target, mask, label_smoothing=0.0, normalize="token",
                   reduction="mean"):
    validate_seq2seq(logits, target, mask, label_smoothing, normalize, reduction)
    b, t, v = logits.shape
    targets = _masked_targets(target, mask).reshape(-1)
    if reduction == "mean" and normalize == "token":  # the fused path: grad in the forward
        return _ce_kernel(logits.reshape(-1, v), targets, None, -100, label_smoothing, 0.0,
                          "mean")
    tokens = _ce_kernel(logits.reshape(-1, v), targets, None, -100, label_smoothing, 0.0,
                        "none").view(b, t)
    return _normalize(tokens, mask, normalize, reduction)


def make_seq2seq_inputs(case):
    t = int(case.params.get("seq", 17))
    v = int(case.params.get("vocab", 1000))
    lengths = case.randint(1, t + 1, case.n)
    mask = torch.arange(t, device=case.device)[None, :] < lengths[:, None]
    return {"logits": case.randn(case.n, t, v) * 2.0, "target": case.randint(0, v, case.n, t),
            "mask": mask}
