"""CLIP-style symmetric InfoNCE over the global batch (Radford et al. 2021; open_clip's
``ClipLoss``): every rank holds its own rows of the image and text embeddings; the
logits of a row are scored against the columns of every rank, gathered.

What each rank returns, and what its gradients are, so that they add up to the
single-process loss on the gathered batch exactly (no DDP averaging assumed):

- ``local_loss=False``: every rank computes the whole B x B logits and the whole
  loss (replicated). A rank's embedding gradient is its rows of the whole gradient
  (the gather's backward takes the rank's slice, no communication); the learnable
  ``logit_scale``'s gradient is replicated.
- ``local_loss=True``: a rank scores only its rows (B_r x B for each direction) and
  returns its share of the loss (``mean``: the sum over its rows divided by the
  global B; ``none``: its rows); summed over ranks it is the whole loss. The gather's
  backward all-reduces the gradient of the gathered embeddings, so every rank's rows
  get the contributions of all ranks' losses; ``logit_scale``'s gradient is partial.
  open_clip's local loss is this times the world size (DDP then averages).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lossreg.collectives import active_group, all_gather, all_reduce_, gather_sizes, rank_and_size
from lossreg.validate import check_reduction

LOSS = "gathered_info_nce"


def validate(image, text, logit_scale, reduction, local_loss):
    check_reduction(LOSS, reduction)
    for name, t in (("image", image), ("text", text), ("logit_scale", logit_scale)):
        if not torch.is_tensor(t) or not t.is_floating_point():
            raise TypeError(f"{LOSS}: {name} must be a floating-point tensor")
    if image.dim() != 2 or image.shape != text.shape:
        raise ValueError(f"{LOSS}: image and text must be 2-D of one shape (rows, dim), got "
                         f"{tuple(image.shape)} and {tuple(text.shape)}")
    if logit_scale.numel() != 1:
        raise ValueError(f"{LOSS}: logit_scale must hold one number (log of the inverse "
                         f"temperature), got shape {tuple(logit_scale.shape)}")
    if len({image.device, text.device, logit_scale.device}) > 1:
        raise ValueError(f"{LOSS}: image, text and logit_scale must be on one device")
    if not isinstance(local_loss, bool):
        raise TypeError(f"{LOSS}: local_loss must be True or False, got {local_loss!r}")


def _symmetric(logits: torch.Tensor) -> torch.Tensor:
    diag = logits.diagonal()
    return ((torch.logsumexp(logits, 1) - diag) + (torch.logsumexp(logits, 0) - diag)) / 2


def _acc(x):
    """float32 for 16-bit embeddings (float64 for float64): the logits are products of
    a scale of ~1/tau with dot products, and their row logsumexp minus the diagonal is a
    difference of such values; `logit_scale`'s gradient, sum(dL/dlogits * logits), is a
    sum of cancelling terms. Gathered in their own dtype, computed in this one."""
    return torch.promote_types(x.dtype, torch.float32)


def _reduce(per_row, total_rows, reduction):
    if reduction == "none":
        return per_row
    s = per_row.sum()
    return s / total_rows if reduction == "mean" else s


def reference(image, text, logit_scale, local_loss=False, reduction="mean"):
    """The whole batch in one process: (CE over rows + CE over columns) / 2 per pair."""
    validate(image, text, logit_scale, reduction, local_loss)
    acc = _acc(image)
    logits = logit_scale.reshape(()).to(acc).exp() * image.to(acc) @ text.to(acc).T
    return _reduce(_symmetric(logits), image.shape[0], reduction).to(image.dtype)


class GatherRows(torch.autograd.Function):
    """All-gather of every rank's rows (padded to the largest rank's count). Backward:
    this rank's rows of the incoming gradient, all-reduced first when each rank's loss
    differs (``reduce``), taken as they are when every rank computed the same loss."""

    @staticmethod
    def forward(ctx, x, sizes, rank, reduce, group):
        ctx.args = (sizes, rank, reduce, group)
        if len(sizes) == 1:
            return x.clone()
        width = max(sizes)
        padded = x.new_zeros((width,) + tuple(x.shape[1:]))
        padded[:x.shape[0]] = x
        parts = all_gather(padded, group)
        return torch.cat([p[:k] for p, k in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad):
        sizes, rank, reduce, group = ctx.args
        if reduce and len(sizes) > 1:
            grad = all_reduce_(grad.contiguous().clone(), "sum", group)
        lo = sum(sizes[:rank])
        return grad[lo:lo + sizes[rank]], None, None, None, None


def torch_impl(image, text, logit_scale, local_loss=False, reduction="mean", group=None):
    """Each embedding gathered on its own (two all-gathers; in ``local_loss``, two
    all-reduces in the backward), logits and cross-entropy by autograd."""
    validate(image, text, logit_scale, reduction, local_loss)
    g = active_group(group)
    rank, sizes = _sizes(image, g)
    acc, dtype = _acc(image), image.dtype
    all_img = GatherRows.apply(image, sizes, rank, local_loss, g).to(acc)
    all_txt = GatherRows.apply(text, sizes, rank, local_loss, g).to(acc)
    image, text = image.to(acc), text.to(acc)
    scale = logit_scale.reshape(()).to(acc).exp()
    total = sum(sizes)
    if not local_loss:
        return _reduce(_symmetric(scale * all_img @ all_txt.T), total, reduction).to(dtype)
    labels = torch.arange(image.shape[0], device=image.device) + sum(sizes[:rank])
    per = (F.cross_entropy(scale * image @ all_txt.T, labels, reduction="none")
           + F.cross_entropy(scale * text @ all_img.T, labels, reduction="none")) / 2
    return _reduce(per, total, reduction).to(dtype)


def _sizes(image, group):
    rank, world = rank_and_size(group)
    if world == 1:
        return 0, [image.shape[0]]
    return rank, gather_sizes(image.shape[0], image.device, group)


def fused(image, text, logit_scale, local_loss=False, reduction="mean", group=None):
    """One all-gather of the stacked (image, text) rows, one all-reduce of their stacked
    gradient in the backward (``local_loss``); log-sum-exp over both axes of one
    logits block."""
    validate(image, text, logit_scale, reduction, local_loss)
    g = active_group(group)
    rank, sizes = _sizes(image, g)
    acc, dtype = _acc(image), image.dtype
    both = GatherRows.apply(torch.stack([image, text], dim=1), sizes, rank, local_loss, g)
    all_img, all_txt = both[:, 0].to(acc), both[:, 1].to(acc)
    image, text = image.to(acc), text.to(acc)
    scale = logit_scale.reshape(()).to(acc).exp()
    total = sum(sizes)
    if not local_loss:
        return _reduce(_symmetric(scale * all_img @ all_txt.T), total, reduction).to(dtype)
    lo = sum(sizes[:rank])
    rows = torch.arange(image.shape[0], device=image.device)
    li = scale * image @ all_txt.T
    lt = scale * text @ all_img.T
    per = ((torch.logsumexp(li, 1) - li[rows, lo + rows])
           + (torch.logsumexp(lt, 1) - lt[rows, lo + rows])) / 2
    return _reduce(per, total, reduction).to(dtype)
