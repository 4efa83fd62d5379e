"""Fused linear cross-entropy (CE of h W^T + b without the N x V logits) and masked-LM.

The chunk engine walks the rows in chunks sized from a memory budget. For each chunk
it computes the chunk's logits with one matmul, turns them in place into the loss
gradient (``ce_rows_*``: eager PyTorch, or the Triton cross-entropy kernel), and
multiplies that back: ``dh = dlogits W`` into the chunk's rows of dh, ``dW +=
dlogits^T h``, ``db += sum dlogits``. Peak memory is one chunk of logits plus the
gradients themselves, never N x V.

For ``mean``/``sum`` the gradients are computed during the forward for an incoming
gradient of 1 and scaled in the backward; for ``none`` the forward only computes the
per-row losses and the backward runs the chunks again with the per-row gradient.
"""

from __future__ import annotations

import os

import torch

from lossreg.kernels import acc_dtype
from lossreg_plugins.neural_networks import (
    ce_reference,
    ce_torch,
    validate_ce_options,
    validate_targets,
)

#: Bytes of float32 logits one chunk may hold (LOSSREG_CHUNK_BYTES overrides).
CHUNK_BYTES = int(os.environ.get("LOSSREG_CHUNK_BYTES", 64 << 20))


def chunk_rows(n_rows: int, n_cls: int, budget: int | None = None) -> int:
    """Rows per chunk: as many as fit the budget in float32 logits, at least 16."""
    budget = CHUNK_BYTES if budget is None else budget
    return max(1, min(n_rows, max(16, budget // (4 * max(n_cls, 1)))))


def ce_rows_torch_(logits, target, ignore_index=-100, label_smoothing=0.0, z_loss=0.0,
                   denom=None, row_scale=None, weight=None):
    """Eager twin of ``lossreg.kernels.softmax.ce_rows_inplace``: per-row (loss, lse,
    z-loss part), the logits overwritten by the gradient. ``weight``: class weights.

    d loss / d x_c = (1-eps) w_y (p_c - [c=y]) + eps/C (W p_c - w_c) + 2 z lse p_c,
    W = sum_c w_c; the loss is (1-eps) w_y (lse - x_y) + eps/C sum_c w_c (lse - x_c)."""
    n_cls = logits.shape[1]
    keep = target != ignore_index
    y = torch.where(keep, target, torch.zeros_like(target))
    # lse = m + r with the row max m apart: (m - x_y) + r keeps the loss exact where
    # lse - x_y would cancel (a confident row: loss 4e-11 from logits of 25)
    m = logits.max(dim=1).values
    # a +inf logit: the reference's log_softmax (x - max) and the Triton kernel give NaN
    m = m.masked_fill(m == float("inf"), float("nan"))
    shifted = logits.sub_(m[:, None])
    r = torch.logsumexp(shifted, dim=1)
    lse = m + r
    w = weight.to(logits.dtype) if weight is not None else None
    w_y = w[y] if w is not None else torch.ones_like(r)
    w_sum = w.sum() if w is not None else float(n_cls)
    loss = (r - shifted.gather(1, y[:, None]).squeeze(1)) * w_y
    if label_smoothing:
        xw = (shifted * w).sum(1) if w is not None else shifted.sum(1)
        loss = (1 - label_smoothing) * loss + label_smoothing / n_cls * (w_sum * r - xw)
    z_rows = z_loss * lse * lse * keep if z_loss else torch.zeros_like(lse)
    loss = loss * keep + z_rows
    p = shifted.sub_(r[:, None]).exp_()
    p.mul_(((1 - label_smoothing) * w_y + label_smoothing * w_sum / n_cls
            + 2 * z_loss * lse)[:, None])
    p.scatter_add_(1, y[:, None], (-(1 - label_smoothing) * w_y)[:, None])
    if label_smoothing:
        p.sub_(label_smoothing / n_cls * (w if w is not None else 1.0))
    if row_scale is not None:
        scale = row_scale.to(logits.dtype)
    else:
        scale = (1.0 / denom if denom is not None else torch.ones_like(lse)).expand_as(lse)
    # ignored rows get exactly zero (also when nothing is kept and 1/denom is inf)
    p.mul_(torch.where(keep, scale, torch.zeros_like(scale))[:, None])
    return loss, lse, z_rows


def _ce_rows_triton_(*args, weight=None, **kwargs):
    from lossreg.kernels.softmax import ce_rows_inplace

    return ce_rows_inplace(*args, weight=weight, return_stats=True, **kwargs)


CE_ROWS = {"torch": ce_rows_torch_, "triton": _ce_rows_triton_}


def _chunk_logits(h, weight, bias, softcap, upcast):
    logits = h @ weight.T
    if bias is not None:
        logits = logits + bias
    if upcast:
        logits = logits.float()
    tanh = None
    if softcap:
        tanh = torch.tanh(logits / softcap)
        logits = softcap * tanh
    return logits, tanh


def default_accum(weight_dtype: torch.dtype) -> torch.dtype:
    """Weight-gradient accumulation: float32 for 16-bit weights (bf16 sums of many
    chunks drift), the weight's own dtype otherwise."""
    return torch.float32 if weight_dtype in (torch.float16, torch.bfloat16) else weight_dtype


def run_chunks(h, weight, bias, target, opts, engine, denom=None, row_scale=None,
               want_grads=True):
    """One pass over the row chunks. Returns (per-row loss, lse, z-loss part, dh, dW,
    db); dW and db accumulate in ``opts.accum`` and come back in the weight's dtype."""
    ignore_index, eps, z, softcap, cw, accum = opts
    n = h.shape[0]
    n_cls = weight.shape[0]
    ce_rows = CE_ROWS[engine]
    # the eager engine works in float32 for half inputs; the Triton kernel reads them as is
    upcast = engine == "torch" and h.dtype in (torch.float16, torch.bfloat16)
    acc = acc_dtype(h.dtype)
    losses, lses, zs = (torch.empty(n, dtype=acc, device=h.device) for _ in range(3))
    dh = torch.empty_like(h) if want_grads else None
    dw = torch.zeros(weight.shape, dtype=accum, device=h.device) if want_grads else None
    db = torch.zeros(bias.shape, dtype=accum, device=h.device) \
        if (want_grads and bias is not None) else None
    step = chunk_rows(n, n_cls)
    for start in range(0, n, step):
        stop = min(n, start + step)
        h_c, y_c = h[start:stop], target[start:stop]
        logits, tanh = _chunk_logits(h_c, weight, bias, softcap, upcast)
        rs = row_scale[start:stop] if row_scale is not None else None
        losses[start:stop], lses[start:stop], zs[start:stop] = ce_rows(
            logits, y_c, ignore_index, eps, z, denom, rs, weight=cw)
        if not want_grads:
            continue
        if softcap:
            logits.mul_(1 - tanh * tanh)
        dl = logits.to(h.dtype)
        torch.mm(dl, weight, out=dh[start:stop])
        if accum == h.dtype:
            dw.addmm_(dl.T, h_c)
        else:
            dw.addmm_(logits.T.to(accum), h_c.to(accum))
        if db is not None:
            db += logits.sum(0).to(accum)
    if want_grads:
        dw = dw.to(weight.dtype)
        db = db.to(bias.dtype) if db is not None else None
    return losses, lses, zs, dh, dw, db


def kept_weight(target, ignore_index, class_weight, dtype):
    """What ``mean`` divides by: the kept rows, or their class weights' sum."""
    keep = target != ignore_index
    if class_weight is None:
        return keep.sum().to(dtype)
    y = torch.where(keep, target, torch.zeros_like(target))
    return (class_weight.to(dtype)[y] * keep).sum()


def _mean(total, denom):
    empty = denom == 0  # torch: nothing kept -> nan, with a zero gradient
    out = total / torch.where(empty, torch.ones_like(denom), denom)
    return torch.where(empty, torch.full_like(out, float("nan")), out)


class FusedLinearCE(torch.autograd.Function):
    """Returns (loss, z-loss part, lse per row); the last two carry no gradient."""

    @staticmethod
    def forward(ctx, h, weight, bias, target, class_weight, ignore_index, eps, z, softcap,
                reduction, engine, accum):
        opts = (ignore_index, eps, z, softcap, class_weight, accum)
        denom = kept_weight(target, ignore_index, class_weight, acc_dtype(h.dtype))
        if reduction == "none":
            losses, lses, zs, *_ = run_chunks(h, weight, bias, target, opts, engine,
                                              want_grads=False)
            ctx.save_for_backward(h, weight, bias, target)
        else:
            scale = denom if reduction == "mean" else torch.ones_like(denom)
            losses, lses, zs, dh, dw, db = run_chunks(h, weight, bias, target, opts, engine,
                                                      denom=scale)
            ctx.save_for_backward(dh, dw, db)
        ctx.opts, ctx.reduction, ctx.engine = opts, reduction, engine
        lse = lses.to(h.dtype)
        if reduction == "none":
            out, zout = losses.to(h.dtype), zs.to(h.dtype)
        elif reduction == "sum":
            out, zout = losses.sum().to(h.dtype), zs.sum().to(h.dtype)
        else:
            out, zout = _mean(losses.sum(), denom).to(h.dtype), _mean(zs.sum(), denom).to(
                h.dtype)
        ctx.mark_non_differentiable(zout, lse)
        return out, zout, lse

    @staticmethod
    def backward(ctx, grad, _grad_z, _grad_lse):
        if ctx.reduction == "none":
            h, weight, bias, target = ctx.saved_tensors
            *_, dh, dw, db = run_chunks(h, weight, bias, target, ctx.opts, ctx.engine,
                                        row_scale=grad)
        else:
            dh, dw, db = ctx.saved_tensors
            dh, dw = dh * grad, dw * grad
            db = db * grad if db is not None else None
        return dh, dw, db, None, None, None, None, None, None, None, None, None


# ------------------------------------------------------------------ the loss
def validate_flce(loss, hidden, weight, bias, target, ignore_index, label_smoothing, z_loss,
                  softcap, reduction, target_name="target"):
    for name, t in (("hidden", hidden), ("weight", weight)):
        if not torch.is_tensor(t) or not t.is_floating_point() or t.dim() != 2:
            raise ValueError(f"{loss}: {name} must be a 2-D floating-point tensor, got "
                             f"{getattr(t, 'shape', type(t).__name__)}")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"{loss}: hidden is (N, {hidden.shape[1]}) but weight is "
                         f"(V, {weight.shape[1]}): the hidden sizes must agree")
    if hidden.dtype != weight.dtype or hidden.device != weight.device:
        raise ValueError(f"{loss}: hidden and weight must share dtype and device, got "
                         f"{hidden.dtype}/{hidden.device} and {weight.dtype}/{weight.device}")
    if bias is not None and (not torch.is_tensor(bias) or bias.shape != weight.shape[:1]):
        raise ValueError(f"{loss}: bias must have shape ({weight.shape[0]},), got "
                         f"{getattr(bias, 'shape', type(bias).__name__)}")
    if softcap is not None and float(softcap) <= 0:
        raise ValueError(f"{loss}: softcap must be None or > 0, got {softcap}")
    validate_targets(loss, target, hidden.shape[0], weight.shape[0], hidden.device, ignore_index,
                     name=target_name, ref_name="hidden")
    validate_ce_options(loss, label_smoothing, z_loss, reduction)


def _logits(hidden, weight, bias, softcap):
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    return logits


ACCUM_DTYPES = {"float32": torch.float32, "float64": torch.float64,
                "bfloat16": torch.bfloat16, "float16": torch.float16}


def validate_extras(loss, hidden, weight, target, class_weight, shift, accum_dtype):
    """The options beyond cross_entropy's; returns the accumulation dtype."""
    v = weight.shape[0]
    if class_weight is not None and (
            not torch.is_tensor(class_weight) or class_weight.shape != (v,)
            or not class_weight.is_floating_point() or class_weight.device != hidden.device):
        raise ValueError(f"{loss}: class_weight must be None or a floating-point tensor of "
                         f"shape ({v},) on {hidden.device}, got "
                         f"{getattr(class_weight, 'shape', type(class_weight).__name__)}")
    if shift not in (True, False):
        raise ValueError(f"{loss}: shift must be True or False, got {shift!r}")
    if shift and hidden.shape[0] < 2:
        raise ValueError(f"{loss}: shift needs at least 2 rows (row i predicts target i+1), "
                         f"got {hidden.shape[0]}")
    if accum_dtype is None:
        return default_accum(weight.dtype)
    key = accum_dtype if isinstance(accum_dtype, str) else str(accum_dtype).removeprefix(
        "torch.")
    if key not in ACCUM_DTYPES:
        raise ValueError(f"{loss}: accum_dtype must be None or one of {list(ACCUM_DTYPES)}, "
                         f"got {accum_dtype!r}")
    return ACCUM_DTYPES[key]


def _targets(target, shift, ignore_index):
    """Next-token targets: row i scored against target i+1, the last row ignored (a
    copy of the N targets, never of the logits)."""
    if not shift:
        return target
    return torch.cat([target[1:], target.new_full((1,), ignore_index)])


def _extras(out, logits, target, class_weight, ignore_index, z_loss, reduction,
            return_z_loss, return_lse):
    """(loss, [z-loss part], [lse]) from materialized logits: the z-loss reduced like the
    loss (mean: over the kept rows' class weight), lse per row."""
    if not (return_z_loss or return_lse):
        return out
    lse = torch.logsumexp(logits.to(acc_dtype(logits.dtype)), dim=1)
    result = [out]
    if return_z_loss:
        rows = z_loss * lse * lse * (target != ignore_index)
        z = rows if reduction == "none" else rows.sum()
        if reduction == "mean":
            z = _mean(z, kept_weight(target, ignore_index, class_weight, z.dtype))
        result.append(z.to(out.dtype).detach())
    if return_lse:
        result.append(lse.to(out.dtype).detach())
    return tuple(result)


def _eager(ce):
    def fn(hidden, weight, target, bias=None, ignore_index=-100, label_smoothing=0.0,
           z_loss=0.0, softcap=None, reduction="mean", class_weight=None, shift=False,
           return_z_loss=False, return_lse=False, accum_dtype=None):
        loss = "fused_linear_cross_entropy"
        validate_flce(loss, hidden, weight, bias, target, ignore_index, label_smoothing,
                      z_loss, softcap, reduction)
        validate_extras(loss, hidden, weight, target, class_weight, shift, accum_dtype)
        if shift:
            hidden, target = hidden[:-1], target[1:]
        logits = _logits(hidden, weight, bias, softcap)
        out = ce(logits, target, weight=class_weight, ignore_index=ignore_index,
                 label_smoothing=label_smoothing, z_loss=z_loss, reduction=reduction)
        return _extras(out, logits, target, class_weight, ignore_index, z_loss, reduction,
                       return_z_loss, return_lse)

    return fn


#: Materialize the logits, then cross-entropy: what the fused versions avoid.
flce_reference = _eager(ce_reference)
#: Full logits + F.cross_entropy (autograd keeps the N x V logits).
flce_torch = _eager(ce_torch)


def _fused(engine):
    def fn(hidden, weight, target, bias=None, ignore_index=-100, label_smoothing=0.0,
           z_loss=0.0, softcap=None, reduction="mean", class_weight=None, shift=False,
           return_z_loss=False, return_lse=False, accum_dtype=None):
        loss = "fused_linear_cross_entropy"
        validate_flce(loss, hidden, weight, bias, target, ignore_index, label_smoothing,
                      z_loss, softcap, reduction)
        accum = validate_extras(loss, hidden, weight, target, class_weight, shift,
                                accum_dtype)
        out, z, lse = FusedLinearCE.apply(
            hidden, weight, bias, _targets(target, shift, int(ignore_index)), class_weight,
            int(ignore_index), float(label_smoothing), float(z_loss),
            float(softcap) if softcap else None, reduction, engine, accum)
        if shift:  # the last row predicts nothing
            lse = lse[:-1]
            if reduction == "none":
                out, z = out[:-1], z[:-1]
        if not (return_z_loss or return_lse):
            return out
        return (out,) + ((z,) if return_z_loss else ()) + ((lse,) if return_lse else ())

    fn.__name__ = f"flce_{engine}"
    return fn


flce_chunked = _fused("torch")
flce_triton = _fused("triton")


def make_flce_inputs(case):
    hdim = int(case.params.get("hidden", 64))
    vocab = int(case.params.get("vocab", 1000))
    ignore = int(case.params.get("ignore_index", -100))
    hidden = case.randn(case.n, hdim)
    weight = case.randn(vocab, hdim) * (1.5 / hdim**0.5)
    target = case.randint(0, vocab, case.n)
    target = torch.where(case.rand(case.n, dtype=torch.float32) < 0.1,
                         torch.full_like(target, ignore), target)
    return {"hidden": hidden, "weight": weight, "target": target}


def flce_flops(inputs):
    n, h = inputs["hidden"].shape
    v = inputs["weight"].shape[0]
    mm = 2 * n * h * v
    return {"forward": mm, "backward": 2 * mm, "full": 3 * mm}
