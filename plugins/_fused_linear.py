"""Template for fused-linear losses of per-token log-probs (no hooks: a helper module).

A loss of this kind reads the hidden states ``hidden`` (R, T, H) of R sequences, the
lm-head ``weight`` (V, H) and the target tokens ``target`` (R, T) (``ignore_index``
marks prompt and padding positions), forms each kept token's log-prob
``log softmax(h W^T)[y]`` and reduces them to one loss per *unit*: a pair (chosen row
i, rejected row U + i: ``groups=2``) or one sequence (``groups=1``). Optionally a
frozen reference model's ``ref_hidden`` (R, T, H') and ``ref_weight`` (V, H') give
reference log-probs, never differentiated.

A loss supplies a :class:`Head`: ``unit_loss(lp, ref_lp, keep, aux, opts)`` maps the
token log-probs of a chunk of units, shaped (groups, u, T) (0 at ignored positions),
to the per-unit losses (u,), in plain differentiable torch (DPO, ORPO, ... from the
per-sequence sums ``lp.sum(-1)`` and counts ``keep.sum(-1)``; GRPO per token); and
``divisor(target_keep, aux, opts)``, what ``reduction="mean"`` divides the sum by.
``aux`` holds the loss's other inputs: tensors of one or more dims are per unit (their
first dim is sliced with the chunk), 0-dim tensors and other values are passed whole.

Three implementations come out of one head:

* ``reference``: all logits at once, ``log_softmax``, gather (float64-faithful; 16-bit
  inputs computed in float32);
* ``eager``: all logits at once, ``F.cross_entropy(reduction="none")`` per token;
* ``chunked``: units in chunks sized from a logits budget (at least one unit), kept
  tokens only; per chunk one matmul for the logits (one more for the reference model),
  the per-unit loss and, by autograd on the (u, T) log-probs alone, ``dloss/dlp``; then
  ``dlogits = dlp (onehot - softmax)`` in place, ``dh = dlogits W``,
  ``dW += dlogits^T h``. Gradients are computed in the forward (for ``mean``/``sum``);
  peak memory is one chunk of logits plus the gradients, never R x T x V. The weight
  gradient accumulates in float32 for 16-bit weights (float64 for float64).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from lossreg.validate import check_float, check_reduction, check_tensor

from ._common import acc_dtype

#: Bytes of logits one chunk may hold (LOSSREG_CHUNK_BYTES overrides); at least one unit.
CHUNK_BYTES = int(os.environ.get("LOSSREG_CHUNK_BYTES", 64 << 20))


@dataclass
class Head:
    name: str
    groups: int
    unit_loss: Callable[..., torch.Tensor]
    divisor: Callable[..., Any]
    uses_reference_model: bool = False


# ---------------------------------------------------------------- validation
def validate(head: Head, hidden, weight, target, ref_hidden, ref_weight, ignore_index,
             reduction, **aux_tensors) -> None:
    loss = head.name
    check_float(loss, hidden=hidden, weight=weight)
    if hidden.dim() != 3:
        raise ValueError(f"{loss}: hidden must be (R, T, H): hidden states of R sequences of "
                         f"T tokens, got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[2]:
        raise ValueError(f"{loss}: weight must be (V, {hidden.shape[2]}), the lm head for "
                         f"hidden's size, got shape {tuple(weight.shape)}")
    rows, seq = hidden.shape[:2]
    if head.groups == 2 and rows % 2:
        raise ValueError(f"{loss}: hidden must hold 2 x pairs rows (chosen first, then "
                         f"rejected), got {rows} rows")
    check_tensor(loss, target=target)
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(f"{loss}: target must hold integer token ids, got {target.dtype}")
    if tuple(target.shape) != (rows, seq):
        raise ValueError(f"{loss}: target must have shape {(rows, seq)} (one token per "
                         f"position of hidden), got {tuple(target.shape)}")
    if target.device != hidden.device:
        raise ValueError(f"{loss}: target must be on hidden's device {hidden.device}, got "
                         f"{target.device}")
    if head.uses_reference_model:
        if ref_hidden is None or ref_weight is None:
            raise ValueError(f"{loss}: ref_hidden and ref_weight (the frozen reference "
                             "model) must be given")
        check_float(loss, hidden=hidden, ref_hidden=ref_hidden, ref_weight=ref_weight)
        if ref_hidden.dim() != 3 or tuple(ref_hidden.shape[:2]) != (rows, seq):
            raise ValueError(f"{loss}: ref_hidden must be ({rows}, {seq}, H'), the reference "
                             f"model's states, got shape {tuple(ref_hidden.shape)}")
        if tuple(ref_weight.shape) != (weight.shape[0], ref_hidden.shape[2]):
            raise ValueError(f"{loss}: ref_weight must be ({weight.shape[0]}, "
                             f"{ref_hidden.shape[2]}), got shape {tuple(ref_weight.shape)}")
    for name, t in aux_tensors.items():
        if t is not None and torch.is_tensor(t) and t.device != hidden.device:
            raise ValueError(f"{loss}: {name} must be on hidden's device {hidden.device}, "
                             f"got {t.device}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{loss}: ignore_index must be an int, got {ignore_index!r}")
    check_reduction(loss, reduction)
    if target.device.type == "cpu" and target.numel():
        kept = target[target != ignore_index]
        if kept.numel() and (int(kept.min()) < 0 or int(kept.max()) >= weight.shape[0]):
            raise ValueError(f"{loss}: target values must be in [0, {weight.shape[0]}) or "
                             f"equal ignore_index={ignore_index}, got range "
                             f"[{int(kept.min())}, {int(kept.max())}]")


def _reduce(per_unit: torch.Tensor, divisor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return per_unit
    total = per_unit.sum()
    return total / divisor if reduction == "mean" else total


def _units(head: Head, rows: int) -> int:
    return rows // head.groups


# ---------------------------------------------------------------- reference and eager
def token_logps_reference(hidden, weight, target, ignore_index):
    """log softmax(h W^T)[y] per position, 0 where ignored (never entering the loss)."""
    keep = target != ignore_index
    logp = torch.log_softmax(hidden @ weight.T, dim=-1)
    lp = logp.gather(-1, torch.where(keep, target, 0).long()[..., None]).squeeze(-1)
    return torch.where(keep, lp, torch.zeros_like(lp)), keep


def token_logps_eager(hidden, weight, target, ignore_index):
    keep = target != ignore_index
    logits = hidden.to(acc_dtype(hidden.dtype)) @ weight.to(acc_dtype(hidden.dtype)).T
    nll = F.cross_entropy(logits.flatten(0, 1), target.flatten().long(),
                          ignore_index=ignore_index, reduction="none")
    return -nll.view(target.shape), keep


def materialized(head: Head, engine: Callable, hidden, weight, target, ref_hidden,
                 ref_weight, aux, opts, ignore_index, reduction):
    """Every logit at once (the reference and the eager baseline)."""
    out_dtype = hidden.dtype
    if engine is token_logps_reference and hidden.dtype != torch.float64:
        hidden, weight = hidden.float(), weight.float()
        ref_hidden = None if ref_hidden is None else ref_hidden.float()
        ref_weight = None if ref_weight is None else ref_weight.float()
    lp, keep = engine(hidden, weight, target, ignore_index)
    ref_lp = None
    if head.uses_reference_model:
        with torch.no_grad():
            ref_lp, _ = engine(ref_hidden.detach(), ref_weight.detach(), target, ignore_index)
    g, u = head.groups, _units(head, hidden.shape[0])
    shape = (g, u, target.shape[1])
    per_unit = head.unit_loss(lp.reshape(shape), None if ref_lp is None
                              else ref_lp.reshape(shape).to(lp.dtype), keep.reshape(shape),
                              aux, opts)
    return _reduce(per_unit, head.divisor(keep.reshape(shape), aux, opts),
                   reduction).to(out_dtype)


# ---------------------------------------------------------------- chunked engine
def _chunk_logps(h, w, y):
    """Log-probs of the targets y of rows h (M, H) under the head w (V, H) and the rows'
    exp(logits - max) (M, V) with their sums; one (M, V) buffer, modified in place."""
    logits = h @ w.T
    m = logits.max(dim=1).values if logits.shape[1] else logits.new_zeros(h.shape[0])
    # a +inf logit: NaN, as log_softmax gives (x - max = inf - inf)
    m = m.masked_fill(m == float("inf"), float("nan"))
    shifted = logits.sub_(m[:, None])
    at_y = shifted.gather(1, y[:, None]).squeeze(1)
    e = shifted.exp_()
    s = e.sum(dim=1)
    return at_y - torch.log(s), e, s


def _chunk_units(head: Head, units: int, seq: int, vocab: int) -> int:
    per_unit = head.groups * seq * vocab * 4
    return max(1, min(units, CHUNK_BYTES // max(per_unit, 1)))


def run_chunks(head, hidden, weight, target, ref_hidden, ref_weight, aux, opts, ignore_index,
               unit_scale=None, want_grads=True):
    """One pass over the chunks of units. ``unit_scale`` (U,) or a 0-dim tensor weighs
    each unit's loss in the gradient. Returns (per-unit losses, dh, dW)."""
    acc = acc_dtype(hidden.dtype)
    g, seq = head.groups, hidden.shape[1]
    units = _units(head, hidden.shape[0])
    w = weight.detach().to(acc)
    ref_w = None if ref_weight is None else ref_weight.detach().to(acc)
    hv = hidden.detach().view(g, units, seq, hidden.shape[2])
    tv = target.view(g, units, seq)
    rv = (None if ref_hidden is None
          else ref_hidden.detach().view(g, units, seq, ref_hidden.shape[2]))
    losses = torch.empty(units, dtype=acc, device=hidden.device)
    dh = torch.zeros_like(hidden) if want_grads else None
    dw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if want_grads else None
    step = _chunk_units(head, units, seq, weight.shape[0])
    for a in range(0, units, step):
        b = min(units, a + step)
        y = tv[:, a:b].reshape(-1)
        keep = y != ignore_index
        idx = keep.nonzero().squeeze(1)
        y_sel = y.index_select(0, idx).long()
        h_sel = hv[:, a:b].reshape(-1, hv.shape[-1]).index_select(0, idx).to(acc)
        lp = torch.zeros(y.shape[0], dtype=acc, device=hidden.device)
        ref_lp = None
        if head.uses_reference_model:
            r_sel = rv[:, a:b].reshape(-1, rv.shape[-1]).index_select(0, idx).to(acc)
            ref_lp = torch.zeros_like(lp)
            ref_lp[idx] = _chunk_logps(r_sel, ref_w, y_sel)[0]
            ref_lp = ref_lp.view(g, b - a, seq)
            del r_sel
        lp_sel, e, s = _chunk_logps(h_sel, w, y_sel)
        lp[idx] = lp_sel
        leaf = lp.view(g, b - a, seq).detach().requires_grad_(want_grads)
        aux_c = {k: (v[a:b] if torch.is_tensor(v) and v.dim() else v) for k, v in aux.items()}
        with torch.enable_grad():
            per_unit = head.unit_loss(leaf, ref_lp, keep.view(g, b - a, seq), aux_c, opts)
            losses[a:b] = per_unit.detach()
            if not want_grads:
                continue
            scale = unit_scale[a:b] if unit_scale.dim() else unit_scale
            weighted = (per_unit * scale).sum()
        dlp = None
        if weighted.requires_grad:
            (dlp,) = torch.autograd.grad(weighted, leaf, allow_unused=True)
        if dlp is None:
            continue
        d_sel = dlp.reshape(-1).index_select(0, idx)
        # dlogits = dlp (onehot(y) - softmax), built in e's buffer
        p = e.div_(s[:, None]).mul_(-d_sel[:, None])
        p.scatter_add_(1, y_sel[:, None], d_sel[:, None])
        dh_view = dh.view(g, units, seq, hidden.shape[2])
        rows = (p @ w).to(hidden.dtype)
        flat = torch.zeros(y.shape[0], hidden.shape[2], dtype=hidden.dtype,
                           device=hidden.device)
        flat[idx] = rows
        dh_view[:, a:b] = flat.view(g, b - a, seq, -1)
        dw.addmm_(p.T, h_sel)
    return losses, dh, dw


class FusedLogpLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, ref_hidden, ref_weight, target, head, aux, opts,
                ignore_index, reduction):
        g, seq = head.groups, target.shape[1]
        keep = (target != ignore_index).view(g, _units(head, target.shape[0]), seq)
        divisor = head.divisor(keep, aux, opts)
        ctx.args = (head, aux, opts, ignore_index)
        ctx.reduction = reduction
        ctx.weight_dtype = weight.dtype
        if reduction == "none":
            losses, _, _ = run_chunks(head, hidden, weight, target, ref_hidden, ref_weight,
                                      aux, opts, ignore_index, want_grads=False)
            ctx.save_for_backward(hidden, weight, ref_hidden, ref_weight, target)
            return losses.to(hidden.dtype)
        acc = acc_dtype(hidden.dtype)
        scale = torch.as_tensor(1.0, dtype=acc, device=hidden.device)
        if reduction == "mean":
            scale = scale / torch.as_tensor(divisor, dtype=acc, device=hidden.device)
        losses, dh, dw = run_chunks(head, hidden, weight, target, ref_hidden, ref_weight,
                                    aux, opts, ignore_index, unit_scale=scale)
        ctx.save_for_backward(dh, dw)
        return _reduce(losses, divisor, reduction).to(hidden.dtype)

    @staticmethod
    def backward(ctx, grad):
        head, aux, opts, ignore_index = ctx.args
        if ctx.reduction == "none":
            hidden, weight, ref_hidden, ref_weight, target = ctx.saved_tensors
            _, dh, dw = run_chunks(head, hidden, weight, target, ref_hidden, ref_weight, aux,
                                   opts, ignore_index,
                                   unit_scale=grad.to(acc_dtype(hidden.dtype)))
        else:
            # computed in the forward for an incoming gradient of 1, the usual case: returned
            # as they are (scaling would hold a second copy of dW at the peak)
            dh, dw = ctx.saved_tensors
            if not torch.equal(grad, torch.ones_like(grad)):
                dh = dh * grad.to(dh.dtype)
                dw = dw * grad.to(dw.dtype)
        return (dh, dw.to(ctx.weight_dtype), None, None, None, None, None, None, None, None)


def chunked(head, hidden, weight, target, ref_hidden, ref_weight, aux, opts, ignore_index,
            reduction):
    return FusedLogpLoss.apply(hidden, weight, ref_hidden, ref_weight, target, head, aux,
                               opts, ignore_index, reduction)


# ---------------------------------------------------------------- inputs
def token_inputs(case, rows: int, uses_reference_model: bool, ignore_index: int = -100):
    """hidden (rows, T, H), weight (V, H), target (rows, T): each sequence's first 1 to
    T/3 positions are prompt and its last 0 to T/4 padding (ignore_index), at least one
    kept token each. The reference model is the policy a few steps earlier."""
    seq = int(case.params.get("seq", 9))
    hdim = int(case.params.get("hidden", 24))
    vocab = int(case.params.get("vocab", 300))
    hidden = case.randn(rows, seq, hdim)
    weight = case.randn(vocab, hdim) * (2.0 / hdim ** 0.5)
    target = case.randint(0, vocab, rows, seq)
    pos = torch.arange(seq, device=case.device)
    prompt = case.randint(1, max(2, seq // 3 + 1), rows, 1)
    pad = case.randint(0, max(1, seq // 4 + 1), rows, 1)
    ignored = (pos < prompt) | (pos >= seq - pad)
    ignored[:, seq // 2] = False  # past any prompt, before any padding: one kept token
    out = {"hidden": hidden, "weight": weight,
           "target": target.masked_fill(ignored, ignore_index)}
    if uses_reference_model:
        out["ref_hidden"] = hidden + 0.3 * case.randn(rows, seq, hdim)
        out["ref_weight"] = weight + case.randn(vocab, hdim) * (0.3 / hdim ** 0.5)
    return out


def flops_model(head: Head):
    def model(inputs):
        r, t, h = inputs["hidden"].shape
        mm = 2 * r * t * h * inputs["weight"].shape[0]
        ref = 0
        if head.uses_reference_model:
            ref = 2 * r * t * inputs["ref_hidden"].shape[2] * inputs["weight"].shape[0]
        return {"forward": mm + ref, "backward": 2 * mm, "full": 3 * mm + ref}

    return model


SIZES = {"quick": [2, 3], "default": [8], "large": [8]}
# quick: small enough for gradcheck of the float64 reference (one call per input element)
SHAPES = {"quick": {"seq": 7, "hidden": 12, "vocab": 67},
          "default": {"seq": 512, "hidden": 1024, "vocab": 32000},
          "large": {"seq": 1024, "hidden": 4096, "vocab": 128256}}
