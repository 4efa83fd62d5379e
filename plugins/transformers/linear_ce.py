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

from lossreg.kernels.softmax import acc_dtype
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
                   denom=None, row_scale=None):
    """Eager twin of ``lossreg.kernels.softmax.ce_rows_inplace`` (float32 logits)."""
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
    loss = (r - shifted.gather(1, y[:, None]).squeeze(1))
    if label_smoothing:
        loss = (1 - label_smoothing) * loss + label_smoothing / n_cls * (
            n_cls * r - shifted.sum(1))
    if z_loss:
        loss = loss + z_loss * lse * lse
    loss = loss * keep
    p = shifted.sub_(r[:, None]).exp_()
    p.mul_((1 + 2 * z_loss * lse)[:, None])
    p.scatter_add_(1, y[:, None], torch.full_like(lse, -(1 - label_smoothing))[:, None])
    if label_smoothing:
        p.sub_(label_smoothing / n_cls)
    if row_scale is not None:
        scale = row_scale.to(logits.dtype)
    else:
        scale = (1.0 / denom if denom is not None else torch.ones_like(lse)).expand_as(lse)
    # ignored rows get exactly zero (also when nothing is kept and 1/denom is inf)
    p.mul_(torch.where(keep, scale, torch.zeros_like(scale))[:, None])
    return loss


def _ce_rows_triton_(*args, **kwargs):
    from lossreg.kernels.softmax import ce_rows_inplace

    return ce_rows_inplace(*args, **kwargs)


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


def run_chunks(h, weight, bias, target, opts, engine, denom=None, row_scale=None,
               want_grads=True):
    """One pass over the row chunks. Returns (per-row loss, dh, dW, db)."""
    ignore_index, eps, z, softcap = opts
    n = h.shape[0]
    n_cls = weight.shape[0]
    ce_rows = CE_ROWS[engine]
    # the eager engine works in float32 for half inputs; the Triton kernel reads them as is
    upcast = engine == "torch" and h.dtype in (torch.float16, torch.bfloat16)
    losses = torch.empty(n, dtype=acc_dtype(h.dtype), device=h.device)
    dh = torch.empty_like(h) if want_grads else None
    dw = torch.zeros_like(weight) if want_grads else None
    db = torch.zeros_like(bias) if (want_grads and bias is not None) else None
    step = chunk_rows(n, n_cls)
    for start in range(0, n, step):
        stop = min(n, start + step)
        h_c, y_c = h[start:stop], target[start:stop]
        logits, tanh = _chunk_logits(h_c, weight, bias, softcap, upcast)
        rs = row_scale[start:stop] if row_scale is not None else None
        losses[start:stop] = ce_rows(logits, y_c, ignore_index, eps, z, denom, rs)
        if not want_grads:
            continue
        if softcap:
            logits.mul_(1 - tanh * tanh)
        dl = logits.to(h.dtype)
        torch.mm(dl, weight, out=dh[start:stop])
        dw.addmm_(dl.T, h_c)
        if db is not None:
            db += dl.sum(0).to(db.dtype)
    return losses, dh, dw, db


class FusedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, target, ignore_index, eps, z, softcap, reduction, engine):
        opts = (ignore_index, eps, z, softcap)
        keep = target != ignore_index
        denom = keep.sum().to(acc_dtype(h.dtype))
        if reduction == "none":
            losses, *_ = run_chunks(h, weight, bias, target, opts, engine, want_grads=False)
            ctx.save_for_backward(h, weight, bias, target)
        else:
            scale = denom if reduction == "mean" else torch.ones_like(denom)
            losses, dh, dw, db = run_chunks(h, weight, bias, target, opts, engine, denom=scale)
            ctx.save_for_backward(dh, dw, db)
        ctx.opts, ctx.reduction, ctx.engine = opts, reduction, engine
        if reduction == "none":
            return losses.to(h.dtype)
        total = losses.sum()
        if reduction == "sum":
            return total.to(h.dtype)
        empty = denom == 0  # torch: nothing kept -> nan, with a zero gradient
        out = total / torch.where(empty, torch.ones_like(denom), denom)
        return torch.where(empty, torch.full_like(out, float("nan")), out).to(h.dtype)

    @staticmethod
    def backward(ctx, grad):
        if ctx.reduction == "none":
            h, weight, bias, target = ctx.saved_tensors
            _, dh, dw, db = run_chunks(h, weight, bias, target, ctx.opts, ctx.engine,
                                       row_scale=grad)
        else:
            dh, dw, db = ctx.saved_tensors
            dh, dw = dh * grad, dw * grad
            db = db * grad if db is not None else None
        return dh, dw, db, None, None, None, None, None, None, None


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


def flce_reference(hidden, weight, target, bias=None, ignore_index=-100, label_smoothing=0.0,
                   z_loss=0.0, softcap=None, reduction="mean"):
    """Materialize the logits, then cross-entropy: what the fused versions avoid."""
    validate_flce("fused_linear_cross_entropy", hidden, weight, bias, target, ignore_index,
                  label_smoothing, z_loss, softcap, reduction)
    return ce_reference(_logits(hidden, weight, bias, softcap), target,
                        ignore_index=ignore_index, label_smoothing=label_smoothing,
                        z_loss=z_loss, reduction=reduction)


def flce_torch(hidden, weight, target, bias=None, ignore_index=-100, label_smoothing=0.0,
               z_loss=0.0, softcap=None, reduction="mean"):
    validate_flce("fused_linear_cross_entropy", hidden, weight, bias, target, ignore_index,
                  label_smoothing, z_loss, softcap, reduction)
    return ce_torch(_logits(hidden, weight, bias, softcap), target, ignore_index=ignore_index,
                    label_smoothing=label_smoothing, z_loss=z_loss, reduction=reduction)


def _fused(engine):
    def fn(hidden, weight, target, bias=None, ignore_index=-100, label_smoothing=0.0,
           z_loss=0.0, softcap=None, reduction="mean"):
        validate_flce("fused_linear_cross_entropy", hidden, weight, bias, target,
                      ignore_index, label_smoothing, z_loss, softcap, reduction)
        return FusedLinearCE.apply(hidden, weight, bias, target, int(ignore_index),
                                   float(label_smoothing), float(z_loss),
                                   float(softcap) if softcap else None, reduction, engine)

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


# ------------------------------------------------------------------ masked LM
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
