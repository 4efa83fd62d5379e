"""Vocabulary-parallel linear cross-entropy: CE of ``hidden @ weight.T`` where every
rank holds the hidden states (tokens, H) and its slice of the classifier weight
(V_r, H), rows ``start:start+V_r`` of the whole (V, H) weight.

No rank ever holds the full logits: the fused implementation walks the tokens in
chunks, computes a chunk's logits over its own vocabulary slice, and reduces them
to the row statistics of `vocab_ce.row_statistics` (two all-reduces of O(chunk)).
The backward recomputes each chunk's logits from the saved log-sum-exp (no
communication), and accumulates this rank's weight gradient (V_r, H) in place: it
never leaves the rank. The hidden states' gradient is this rank's part of it
(``partial``): as in Megatron, the tensor-parallel layer the hidden states came
from all-reduces it in its own backward; sum it over the ranks for the whole one.
"""

from __future__ import annotations

import torch

from lossreg.collectives import active_group, all_reduce_, rank_and_size

from . import vocab_ce

LOSS = "vocab_parallel_linear_cross_entropy"
CHUNK_ELEMS = 1 << 22


def _validate(hidden, weight, target, ignore_index, label_smoothing, z_loss, reduction):
    vocab_ce.validate(LOSS, hidden, target, ignore_index, label_smoothing, z_loss, reduction,
                      rows_name="hidden")
    if not torch.is_tensor(weight) or weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        got = tuple(weight.shape) if torch.is_tensor(weight) else type(weight).__name__
        raise ValueError(f"{LOSS}: weight must be (vocab slice, {hidden.shape[1]}) to match "
                         f"hidden {tuple(hidden.shape)}, got {got}")
    if weight.dtype != hidden.dtype or weight.device != hidden.device:
        raise ValueError(f"{LOSS}: weight ({weight.dtype}, {weight.device}) must match hidden "
                         f"({hidden.dtype}, {hidden.device})")


def reference(hidden, weight, target, vocab_start=None, ignore_index=-100,
              label_smoothing=0.0, z_loss=0.0, reduction="mean"):
    """The whole-vocabulary loss in one process: full logits, then cross-entropy."""
    _validate(hidden, weight, target, ignore_index, label_smoothing, z_loss, reduction)
    return vocab_ce.reference(hidden @ weight.T, target, None, ignore_index, label_smoothing,
                              z_loss, reduction)


def torch_impl(hidden, weight, target, vocab_start=None, ignore_index=-100,
               label_smoothing=0.0, z_loss=0.0, reduction="mean", group=None):
    """This rank's logit slice (tokens x V_r) in one matmul, then the autograd
    vocabulary-parallel cross-entropy."""
    _validate(hidden, weight, target, ignore_index, label_smoothing, z_loss, reduction)
    return vocab_ce.torch_impl(hidden @ weight.T, target, vocab_start, ignore_index,
                               label_smoothing, z_loss, reduction, group)


def _spans(n: int, v_local: int, device, group):
    """Token chunks of at most ~CHUNK_ELEMS logits, the same on every rank: each chunk
    is a collective, so the step comes from the largest vocabulary slice (one 8-byte
    MAX all-reduce where the slices may differ)."""
    v = v_local
    if rank_and_size(group)[1] > 1:
        v = int(all_reduce_(torch.tensor([v_local], dtype=torch.int64, device=device), "max",
                            group).item())
    step = max(16, CHUNK_ELEMS // max(v, 1))
    return [(i, min(n, i + step)) for i in range(0, n, step)]


class _FusedLinearVocabCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, target, start, ignore_index, eps, z_loss, group):
        n, v_local = hidden.shape[0], weight.shape[0]
        dtype = vocab_ce.stat_dtype(hidden.dtype)
        keep = target != ignore_index
        spans = _spans(n, v_local, hidden.device, group)
        lse = torch.empty(n, dtype=dtype, device=hidden.device)
        term = torch.empty_like(lse)
        local_y = target.long() - start
        vocab = 0.0
        for lo, hi in spans:
            z = (hidden[lo:hi] @ weight.T).to(dtype)
            lse[lo:hi], vocab, term[lo:hi], _, _ = vocab_ce.row_statistics(
                lambda z=z, c=hi - lo: [(0, c, z)], target[lo:hi], start, v_local, hi - lo,
                dtype, keep[lo:hi], eps, group)
        mine = keep & (local_y >= 0) & (local_y < v_local)
        loss = torch.where(keep, lse - term + z_loss * lse * lse, torch.zeros_like(lse))
        ctx.save_for_backward(hidden, weight, lse, local_y, mine, keep)
        ctx.args = (eps, vocab, z_loss, spans)
        return loss.to(hidden.dtype)

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, lse, local_y, mine, keep = ctx.saved_tensors
        eps, vocab, z_loss, spans = ctx.args
        dtype = lse.dtype
        w = weight.to(dtype)
        dh = torch.empty_like(hidden)
        dw = torch.zeros_like(w)
        scale = torch.where(keep, grad.to(dtype), torch.zeros_like(lse))
        for lo, hi in spans:
            h = hidden[lo:hi].to(dtype)
            dz = vocab_ce.grad_rows_(h @ w.T, lse[lo:hi], local_y[lo:hi], mine[lo:hi], eps,
                                     vocab, z_loss, scale[lo:hi])
            dh[lo:hi] = dz @ w
            dw.addmm_(dz.T, h)
        return dh, dw.to(weight.dtype), None, None, None, None, None, None


def fused(hidden, weight, target, vocab_start=None, ignore_index=-100, label_smoothing=0.0,
          z_loss=0.0, reduction="mean", group=None):
    """Chunked over tokens, never the full logits; two O(chunk) all-reduces per chunk."""
    _validate(hidden, weight, target, ignore_index, label_smoothing, z_loss, reduction)
    g = active_group(group)
    start = vocab_ce.vocab_range(LOSS, target, ignore_index, weight.shape[0], vocab_start, g)
    loss = _FusedLinearVocabCE.apply(hidden, weight, target, start, ignore_index,
                                     float(label_smoothing), float(z_loss), g)
    return vocab_ce.reduce_rows(loss, target != ignore_index, reduction)
