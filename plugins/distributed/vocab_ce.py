"""Vocabulary-parallel cross-entropy (Megatron-LM): each rank holds the logits of its
slice of the vocabulary, ``logits[:, start:start+V_r]``, and every rank the targets.

The loss needs three per-token numbers that span the vocabulary: the row max (for a
safe exp), the sum of exponentials and the target logit (with label smoothing, the
sum of the logits too). Each rank reduces its slice to them, so the communication is
O(tokens), never O(tokens x vocab). The fused implementation sends two buffers:
one MAX all-reduce of the row maxima (plus one element, the end of this rank's
vocabulary, whose max over ranks is the vocabulary size) and one SUM all-reduce of
``[sum of exps, (1-eps) z_y + eps/V sum z]``: 12 bytes per token in float32. The
backward needs no communication: the gradient of a rank's logits is its slice of
``softmax (1 + 2 z_loss lse) - (1-eps) onehot - eps/V``.
"""

from __future__ import annotations

import torch

from lossreg.collectives import active_group, all_gather, all_reduce_, rank_and_size
from lossreg.validate import check_reduction

from .._common import acc_dtype as stat_dtype

LOSS = "vocab_parallel_cross_entropy"
#: rows per chunk of the fused forward/backward (temporaries are chunk x V_r floats)
CHUNK_ELEMS = 1 << 22


def validate(loss, logits, target, ignore_index, label_smoothing, z_loss, reduction,
             rows_name="logits"):
    check_reduction(loss, reduction)
    for name, t in ((rows_name, logits), ("target", target)):
        if not torch.is_tensor(t):
            raise TypeError(f"{loss}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not logits.is_floating_point() or logits.dim() != 2:
        raise ValueError(f"{loss}: {rows_name} must be a 2-D floating tensor (tokens, ...), "
                         f"got {tuple(logits.shape)} {logits.dtype}")
    if target.dtype not in (torch.int64, torch.int32) or target.dim() != 1 \
            or target.shape[0] != logits.shape[0]:
        raise ValueError(f"{loss}: target must be int64 of shape ({logits.shape[0]},), got "
                         f"{tuple(target.shape)} {target.dtype}")
    if target.device != logits.device:
        raise ValueError(f"{loss}: target and {rows_name} must be on one device, got target "
                         f"on {target.device}, {rows_name} on {logits.device}")
    bad = (target < 0) & (target != ignore_index)
    if bool(bad.any()):
        raise ValueError(f"{loss}: target must hold vocabulary ids >= 0 or ignore_index "
                         f"({ignore_index}), got {int(target[bad][0])}")
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"{loss}: label_smoothing must lie in [0, 1], got {label_smoothing!r}")
    if float(z_loss) < 0:
        raise ValueError(f"{loss}: z_loss must be >= 0, got {z_loss!r}")


def check_upper(loss, target, ignore_index, vocab):
    """In one process the whole vocabulary is here: targets must lie below it. (Over
    ranks no rank can tell alone, and raising on some ranks only would hang the rest.)"""
    bad = (target >= vocab) & (target != ignore_index)
    if bool(bad.any()):
        raise ValueError(f"{loss}: target must hold class indices in [0, {vocab - 1}] or "
                         f"ignore_index ({ignore_index}), got {int(target[bad][0])}")


def vocab_range(loss, target, ignore_index, local_vocab: int, vocab_start, group=None) -> int:
    """The first vocabulary id of this rank (all-gathers the slice sizes if not given)."""
    rank, world = rank_and_size(group)
    if world == 1:
        if vocab_start:
            raise ValueError(f"{loss}: vocab_start must be 0 or None without a process "
                             f"group (one rank holds the whole vocabulary), got {vocab_start}")
        check_upper(loss, target, ignore_index, local_vocab)
        return 0
    if vocab_start is not None:
        return int(vocab_start)
    device = target.device
    sizes = all_gather(torch.tensor([local_vocab], device=device), group)
    return int(sum(int(s) for s in sizes[:rank]))


def reduce_rows(loss: torch.Tensor, keep: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return loss
    total = loss.sum()
    return total / keep.sum() if reduction == "mean" else total


# ---------------------------------------------------------------- reference
def reference(logits, target, vocab_start=None, ignore_index=-100, label_smoothing=0.0,
              z_loss=0.0, reduction="mean"):
    """Whole-vocabulary cross-entropy with label smoothing and z-loss (one process)."""
    validate(LOSS, logits, target, ignore_index, label_smoothing, z_loss, reduction)
    check_upper(LOSS, target, ignore_index, logits.shape[1])
    keep = target != ignore_index
    y = torch.where(keep, target, 0).long()
    m = logits.amax(dim=1, keepdim=True).detach() if logits.shape[1] else logits[:, :1]
    lse = m.squeeze(1) + (logits - m).exp().sum(dim=1).log()  # NaN at a +inf logit
    loss = (1 - label_smoothing) * (lse - logits.gather(1, y[:, None]).squeeze(1))
    if label_smoothing:
        loss = loss + label_smoothing * (lse - logits.mean(dim=1))
    if z_loss:
        loss = loss + z_loss * lse * lse
    return reduce_rows(torch.where(keep, loss, torch.zeros_like(loss)), keep, reduction)


# ---------------------------------------------------------------- torch
class SumOverRanks(torch.autograd.Function):
    """All-reduce SUM of per-rank partial values into a replicated value. Backward is
    the identity: every rank receives the same gradient of the replicated result."""

    @staticmethod
    def forward(ctx, t, group):
        return all_reduce_(t.clone(), "sum", group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def torch_impl(logits, target, vocab_start=None, ignore_index=-100, label_smoothing=0.0,
               z_loss=0.0, reduction="mean", group=None):
    """Plain autograd over the slice: one all-reduce per statistic (max, sum of exps,
    target logit, and with smoothing the vocabulary size and the sum of logits)."""
    validate(LOSS, logits, target, ignore_index, label_smoothing, z_loss, reduction)
    g = active_group(group)
    x = logits.to(stat_dtype(logits.dtype))
    n, v_local = x.shape
    start = vocab_range(LOSS, target, ignore_index, v_local, vocab_start, g)
    keep = target != ignore_index
    m = x.detach().amax(dim=1) if v_local else x.new_full((n,), float("-inf"))
    all_reduce_(m, "max", g)
    sumexp = SumOverRanks.apply((x - m[:, None]).exp().sum(dim=1), g)
    lse = m + sumexp.log()
    local_y = target.long() - start
    mine = keep & (local_y >= 0) & (local_y < v_local)
    picked = x.gather(1, torch.where(mine, local_y, 0)[:, None]).squeeze(1) if v_local \
        else x.new_zeros(n)
    z_y = SumOverRanks.apply(torch.where(mine, picked, torch.zeros_like(picked)), g)
    loss = (1 - label_smoothing) * (lse - z_y) + z_loss * lse * lse
    if label_smoothing:
        vocab = all_reduce_(torch.tensor([float(v_local)], dtype=x.dtype, device=x.device), "sum", g)
        loss = loss + label_smoothing * (lse - SumOverRanks.apply(x.sum(dim=1), g) / vocab)
    loss = torch.where(keep, loss, torch.zeros_like(loss)).to(logits.dtype)
    return reduce_rows(loss, keep, reduction)


# ---------------------------------------------------------------- fused
def _chunks(n: int, v: int):
    """Row spans whose float temporaries stay under CHUNK_ELEMS and under an eighth of
    the logits, so that they never rival the gradient itself (peak ~ 1.25x its size)."""
    step = max(1, min(CHUNK_ELEMS // max(v, 1), -(-n // 8)))
    return [(i, min(n, i + step)) for i in range(0, n, step)]


def row_statistics(x_chunks, target, start, v_local, n, dtype, keep, eps, group):
    """(lse, vocabulary size, target term) of every row, from this rank's logit chunks
    (``x_chunks``: ``[(lo, hi, chunk logits)]``, read twice) and two all-reduces."""
    buf = torch.empty(n + 1, dtype=dtype, device=target.device)
    for lo, hi, chunk in x_chunks():
        buf[lo:hi] = chunk.amax(dim=1) if v_local else float("-inf")
    buf[n] = start + v_local
    all_reduce_(buf, "max", group)
    m, vocab = buf[:n], float(buf[n])
    stats = torch.zeros(2, n, dtype=dtype, device=target.device)
    local_y = target.long() - start
    mine = keep & (local_y >= 0) & (local_y < v_local)
    for lo, hi, chunk in x_chunks():
        if not v_local:
            continue
        z = chunk.to(dtype)
        stats[0, lo:hi] = (z - m[lo:hi, None]).exp().sum(dim=1)
        picked = z.gather(1, torch.where(mine[lo:hi], local_y[lo:hi], 0)[:, None]).squeeze(1)
        term = (1 - eps) * torch.where(mine[lo:hi], picked, torch.zeros_like(picked))
        if eps:
            term = term + (eps / vocab) * z.sum(dim=1)
        stats[1, lo:hi] = term
    all_reduce_(stats, "sum", group)
    return m + stats[0].log(), vocab, stats[1], local_y, mine


def grad_rows_(z, lse, local_y, mine, eps, vocab, z_loss, scale):
    """Turn float logits ``z`` (a chunk) in place into d loss_row / d z, times ``scale``
    per row (0 at ignored rows)."""
    p = z.sub_(lse[:, None]).exp_()
    if z_loss:
        p.mul_((1 + 2 * z_loss * lse)[:, None])
    if eps:
        p.sub_(eps / vocab)
    rows = mine.nonzero().squeeze(1)
    p[rows, local_y[rows]] -= 1 - eps
    return p.mul_(scale[:, None])


class _FusedVocabCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, start, ignore_index, eps, z_loss, group):
        n, v_local = logits.shape
        dtype = stat_dtype(logits.dtype)
        keep = target != ignore_index
        spans = _chunks(n, v_local)

        def x_chunks():
            return ((lo, hi, logits[lo:hi]) for lo, hi in spans)

        lse, vocab, term, local_y, mine = row_statistics(
            x_chunks, target, start, v_local, n, dtype, keep, eps, group)
        loss = lse - term + z_loss * lse * lse
        loss = torch.where(keep, loss, torch.zeros_like(loss))
        ctx.save_for_backward(logits, lse, local_y, mine, keep)
        ctx.args = (eps, vocab, z_loss, spans)
        return loss.to(logits.dtype)

    @staticmethod
    def backward(ctx, grad):
        logits, lse, local_y, mine, keep = ctx.saved_tensors
        eps, vocab, z_loss, spans = ctx.args
        out = torch.empty_like(logits)
        scale = torch.where(keep, grad.to(lse.dtype), torch.zeros_like(lse))
        for lo, hi in spans:
            z = logits[lo:hi].to(lse.dtype, copy=True)
            out[lo:hi] = grad_rows_(z, lse[lo:hi], local_y[lo:hi], mine[lo:hi], eps, vocab,
                                    z_loss, scale[lo:hi])
        return out, None, None, None, None, None, None


def fused(logits, target, vocab_start=None, ignore_index=-100, label_smoothing=0.0,
          z_loss=0.0, reduction="mean", group=None):
    """Two all-reduces per step (MAX of row maxima, SUM of stacked statistics), chunked
    over tokens, a hand-written backward with no communication."""
    validate(LOSS, logits, target, ignore_index, label_smoothing, z_loss, reduction)
    g = active_group(group)
    start = vocab_range(LOSS, target, ignore_index, logits.shape[1], vocab_start, g)
    loss = _FusedVocabCE.apply(logits, target, start, ignore_index, float(label_smoothing),
                               float(z_loss), g)
    return reduce_rows(loss, target != ignore_index, reduction)
