"""Section 8, k-nearest neighbours: metric-learning losses that shape the embedding a
k-NN classifier searches.

* ``cosine_embedding`` and ``triplet`` couple aligned rows of two or three (N, D)
  matrices: Triton through the aligned-rows template (each row read once, gradients in
  the forward).
* ``batch_hard_triplet`` mines, for every anchor of a labelled batch, its farthest
  positive and nearest negative. The reference forms the B x B distance matrix; the
  ``chunked`` rewrite mines block by block under ``no_grad`` (O(B * CHUNK) memory) and
  differentiates only the gathered O(B * D) rows; the Triton version mines with the
  pairwise-tile template and shares that gathered finish.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lossreg import Impl, LossSpec, hookimpl
from lossreg.kernels.traffic import streamed
from lossreg.kernels import jit, nanops, tl
from lossreg.kernels.aligned_rows import aligned_rows_loss
from lossreg.kernels.pairwise import pairwise_reduction

from ._common import acc_dtype, reduce_loss, reductions
from lossreg.validate import (
    check_bool,
    check_choice,
    check_device,
    check_floating,
    check_integer,
    check_ndim,
    check_number,
    check_pm1,
    check_reduction,
    check_same_dtype,
    check_shape,
)

#: Width of the generated embeddings.
EMBED_DIM = 64
ROW_SIZES = {
    "quick": [64, 300],
    "default": [2**10, 2**14, 2**17],
    "large": [2**17, 2**19, 2**21],
}


def _validate_rows(loss, **tensors):
    check_floating(loss, **tensors)
    check_same_dtype(loss, **tensors)
    first, ref = next(iter(tensors.items()))
    for name, t in tensors.items():
        check_ndim(loss, name, t, (2,), "a matrix (N, D) of embeddings")
        check_shape(loss, name, t, ref.shape, f"the shape of {first}")


def _rows_bytes(*names):
    def model(inputs):
        read = sum(inputs[k].numel() * inputs[k].element_size() for k in inputs
                   if torch.is_tensor(inputs[k]))
        write = sum(inputs[k].numel() * inputs[k].element_size() for k in names)
        return {"forward": read, "backward": read + write, "full": read + write}
    return model


def _rows_flops(per_entry_fwd, per_entry_bwd, key):
    def model(inputs):
        n = inputs[key].numel()
        return {"forward": per_entry_fwd * n, "backward": per_entry_bwd * n,
                "full": (per_entry_fwd + per_entry_bwd) * n}
    return model


# ---------------------------------------------------------------- cosine_embedding
#: torch's cosine_embedding_loss adds this to each squared norm.
COS_EPS = 1e-12


def _validate_cosine(input1, input2, target, margin, reduction):
    _validate_rows("cosine_embedding", input1=input1, input2=input2)
    check_device("cosine_embedding", "input1", input1, target=target)
    check_shape("cosine_embedding", "target", target, input1.shape[:1], "one label per row")
    check_pm1("cosine_embedding", "target", target)
    check_number("cosine_embedding", "margin", margin, -1.0, 1.0)
    check_reduction("cosine_embedding", reduction)


def cosine_embedding_reference(input1, input2, target, margin=0.0, reduction="mean"):
    """1 - cos for y = 1, max(0, cos - margin) for y = -1, with torch's norm epsilon;
    16-bit inputs in float32, the result rounded back: in float16 the product of the
    squared norms overflows (65504) once |x1| |x2| > 256 (rows of 3000 normal entries),
    and cos comes out 0."""
    _validate_cosine(input1, input2, target, margin, reduction)
    dtype = input1.dtype
    wide = acc_dtype(dtype)
    input1, input2 = input1.to(wide), input2.to(wide)
    dot = (input1 * input2).sum(dim=1)
    sq1 = (input1 * input1).sum(dim=1) + COS_EPS
    sq2 = (input2 * input2).sum(dim=1) + COS_EPS
    cos = dot / torch.sqrt(sq1 * sq2)
    loss = torch.where(target == 1, 1.0 - cos, (cos - margin).clamp_min(0.0))
    return reduce_loss(loss, reduction).to(dtype)


def cosine_embedding_torch(input1, input2, target, margin=0.0, reduction="mean"):
    _validate_cosine(input1, input2, target, margin, reduction)
    return F.cosine_embedding_loss(input1, input2, target, margin=margin, reduction=reduction)


@jit
def _cosine_term(a, b, c, valid, y, p0, p1, p2, p3):
    dot = tl.sum(a * b, axis=1)
    sq_a = tl.sum(a * a, axis=1) + 1e-12
    sq_b = tl.sum(b * b, axis=1) + 1e-12
    inv = 1.0 / tl.sqrt(sq_a * sq_b)
    cos = dot * inv
    positive = y > 0.0
    hinge = cos - p0
    loss = tl.where(positive, 1.0 - cos, tl.maximum(hinge, 0.0))
    # d loss / d cos: -1 for similar pairs, 1 for dissimilar ones inside the margin
    # (clamp_min passes the gradient at 0, as torch's does)
    g = tl.where(positive, -1.0, tl.where(hinge >= 0.0, 1.0, 0.0))
    da = g[:, None] * (b * inv[:, None] - (cos / sq_a)[:, None] * a)
    db = g[:, None] * (a * inv[:, None] - (cos / sq_b)[:, None] * b)
    return loss, da, db, da


_cosine_kernel = aligned_rows_loss(_cosine_term, name="cosine_embedding", operands=2,
                                   labels=True)


def cosine_embedding_triton(input1, input2, target, margin=0.0, reduction="mean"):
    _validate_cosine(input1, input2, target, margin, reduction)
    return _cosine_kernel(input1, input2, y=target.detach().to(input1.dtype),
                          reduction=reduction, p0=margin)


def _pm1(case, n):
    return torch.where(case.rand(n) > 0.5, 1, -1)


def cosine_inputs(case, n: int | None = None, d: int = EMBED_DIM):
    n = case.n if n is None else n
    x1 = case.randn(n, d)
    # correlated pairs: cosines spread over (-1, 1), so the margin's hinge is active for
    # some dissimilar pairs and not for others
    x2 = 0.6 * x1 + case.randn(n, d) * 0.8
    return {"input1": x1, "input2": x2, "target": _pm1(case, n)}


COSINE_EDGE_CASES = {
    "one_row": lambda case: cosine_inputs(case, 1),
    "wide_rows": lambda case: cosine_inputs(case, 5, 3000),
    "odd_width": lambda case: cosine_inputs(case, 37, 33),
    "all_similar": lambda case: {**cosine_inputs(case, 40),
                                 "target": torch.ones(40, dtype=torch.int64, device=case.device)},
    "float_labels": lambda case: {**cosine_inputs(case, 40),
                                  "target": _pm1(case, 40).to(case.dtype)},
}


# ---------------------------------------------------------------- triplet
#: F.cosine_similarity clamps each norm at this.
COSINE_NORM_EPS = 1e-8
DISTANCES = ("euclidean", "cosine")


def _validate_triplet(anchor, positive, negative, margin, p, eps, swap, reduction, distance):
    _validate_rows("triplet", anchor=anchor, positive=positive, negative=negative)
    check_number("triplet", "margin", margin, 0.0, None, low_open=True)
    check_number("triplet", "p", p, 1.0, None)
    check_number("triplet", "eps", eps, 0.0, None)
    check_bool("triplet", "swap", swap)
    check_reduction("triplet", reduction)
    check_choice("triplet", "distance", distance, DISTANCES)


def _triplet_distance(x, y, p, eps, distance):
    if distance == "euclidean":
        # torch.pairwise_distance: the p-norm of x - y + eps
        return torch.linalg.vector_norm(x - y + eps, ord=p, dim=-1)
    nx = torch.linalg.vector_norm(x, dim=-1).clamp_min(COSINE_NORM_EPS)
    ny = torch.linalg.vector_norm(y, dim=-1).clamp_min(COSINE_NORM_EPS)
    return 1.0 - (x * y).sum(dim=-1) / (nx * ny)


def triplet_reference(anchor, positive, negative, margin=1.0, p=2.0, eps=1e-6, swap=False,
                      reduction="mean", distance="euclidean"):
    """max(0, d(a, p) - d(a, n) + margin); with swap, d(a, n) -> min(d(a, n), d(p, n)).
    16-bit rows in float32, the loss rounded back (`_wide`)."""
    _validate_triplet(anchor, positive, negative, margin, p, eps, swap, reduction, distance)
    dtype, (anchor, positive, negative) = anchor.dtype, _wide(anchor, positive, negative)
    d_pos = _triplet_distance(anchor, positive, p, eps, distance)
    d_neg = _triplet_distance(anchor, negative, p, eps, distance)
    if swap:
        d_neg = torch.minimum(d_neg, _triplet_distance(positive, negative, p, eps, distance))
    return reduce_loss((margin + d_pos - d_neg).clamp_min(0.0), reduction).to(dtype)


def _wide(*rows):
    """16-bit rows as float32 (as torch's autocast runs triplet_margin_loss): 16-bit
    distances of ~4 carry ~u * 4 of error into a hinge on their difference plus a margin
    of ~0.3, flipping triplets in and out of the active set (and p = 1's signs), and
    each p-norm gradient is a difference of such terms (bfloat16: 28% off)."""
    return [r.to(acc_dtype(r.dtype)) for r in rows]


def triplet_torch(anchor, positive, negative, margin=1.0, p=2.0, eps=1e-6, swap=False,
                  reduction="mean", distance="euclidean"):
    _validate_triplet(anchor, positive, negative, margin, p, eps, swap, reduction, distance)
    dtype, (anchor, positive, negative) = anchor.dtype, _wide(anchor, positive, negative)
    if distance == "euclidean":
        return F.triplet_margin_loss(anchor, positive, negative, margin=margin, p=p, eps=eps,
                                     swap=swap, reduction=reduction).to(dtype)
    return F.triplet_margin_with_distance_loss(
        anchor, positive, negative, margin=margin, swap=swap, reduction=reduction,
        distance_function=lambda x, y: 1.0 - F.cosine_similarity(x, y, dim=-1,
                                                                 eps=COSINE_NORM_EPS)
    ).to(dtype)


@jit
def _unit(v, dist):
    """d dist / d v for dist = |v|_2 (0 where the norm is 0, as torch.norm's gradient;
    NaN for a NaN norm, as torch's v * (g / norm) even where the hinge passes g = 0)."""
    return v * tl.where(dist == 0.0, 0.0, 1.0 / dist)[:, None]


@jit
def _lp(v, p):
    """(|v|_p per row, d |v|_p / d v) for p >= 1, through exp2/log2 of |v|."""
    av = tl.abs(v)
    nz = av != 0.0  # NaN counts: the norm of a row holding NaN is NaN
    log_av = tl.log2(tl.where(nz, av, 1.0))
    total = tl.sum(tl.where(nz, tl.exp2(p * log_av), 0.0), axis=1)
    pos = total != 0.0
    log_d = tl.log2(tl.where(pos, total, 1.0)) / p
    dist = tl.where(pos, tl.exp2(log_d), 0.0)
    # sign(v) |v|^(p-1) / dist^(p-1)
    grad = tl.where(nz & pos[:, None], tl.exp2((p - 1.0) * (log_av - log_d[:, None])), 0.0)
    return dist, tl.where(v < 0.0, -grad, grad)


@jit
def _swap_weights(d_an, d_pn, swap):
    """Shares of d(a, n) and d(p, n) in min(d_an, d_pn) (ties split, as torch.minimum)."""
    w_an = tl.where(d_an < d_pn, 1.0, tl.where(d_an == d_pn, 0.5, 0.0))
    w_an = tl.where(swap, w_an, 1.0)
    return w_an, 1.0 - w_an


@jit
def _triplet_finish(d_ap, d_an, d_pn, u_ap, u_an, u_pn, margin, swap):
    """Hinge on the three distances and their unit gradients -> (loss, da, dp, dn)."""
    w_an, w_pn = _swap_weights(d_an, d_pn, swap)
    # NaN-propagating min and max, as the reference's torch.minimum and clamp_min
    d_neg = tl.where(swap, nanops.minimum(d_an, d_pn), d_an)
    z = margin + d_ap - d_neg
    act = tl.where(z >= 0.0, 1.0, 0.0)[:, None]
    w_an = w_an[:, None] * act
    w_pn = w_pn[:, None] * act
    # without swap d(p, n) is not part of the loss: its gradient (NaN for an inf row)
    # must not reach p and n
    pn = tl.where(swap, w_pn * u_pn, 0.0)
    da = act * u_ap - w_an * u_an
    dp = -act * u_ap - pn
    dn = w_an * u_an + pn
    return nanops.maximum(z, 0.0), da, dp, dn


@jit
def _triplet_l2_term(a, b, c, valid, y, p0, p1, p2, p3):
    """p0 margin, p1 eps, p3 swap (0/1): Euclidean distances of x - y + eps."""
    v_ap = tl.where(valid, a - b + p1, 0.0)
    v_an = tl.where(valid, a - c + p1, 0.0)
    v_pn = tl.where(valid, b - c + p1, 0.0)
    d_ap = tl.sqrt(tl.sum(v_ap * v_ap, axis=1))
    d_an = tl.sqrt(tl.sum(v_an * v_an, axis=1))
    d_pn = tl.sqrt(tl.sum(v_pn * v_pn, axis=1))
    return _triplet_finish(d_ap, d_an, d_pn, _unit(v_ap, d_ap), _unit(v_an, d_an),
                           _unit(v_pn, d_pn), p0, p3 != 0.0)


@jit
def _triplet_lp_term(a, b, c, valid, y, p0, p1, p2, p3):
    """p0 margin, p1 eps, p2 the norm's p, p3 swap (0/1)."""
    d_ap, u_ap = _lp(tl.where(valid, a - b + p1, 0.0), p2)
    d_an, u_an = _lp(tl.where(valid, a - c + p1, 0.0), p2)
    d_pn, u_pn = _lp(tl.where(valid, b - c + p1, 0.0), p2)
    return _triplet_finish(d_ap, d_an, d_pn, u_ap, u_an, u_pn, p0, p3 != 0.0)


@jit
def _cos_distance(x, y):
    """(1 - cos(x, y), d/dx, d/dy) with each norm clamped at 1e-8 (no gradient there)."""
    nx = tl.sqrt(tl.sum(x * x, axis=1))
    ny = tl.sqrt(tl.sum(y * y, axis=1))
    cx = nanops.maximum(nx, 1e-8)  # clamp_min keeps NaN
    cy = nanops.maximum(ny, 1e-8)
    inv = 1.0 / (cx * cy)
    cos = tl.sum(x * y, axis=1) * inv
    kx = tl.where(nx > 1e-8, cos / (cx * cx), 0.0)
    ky = tl.where(ny > 1e-8, cos / (cy * cy), 0.0)
    gx = -(y * inv[:, None] - kx[:, None] * x)
    gy = -(x * inv[:, None] - ky[:, None] * y)
    return 1.0 - cos, gx, gy


@jit
def _triplet_cos_term(a, b, c, valid, y, p0, p1, p2, p3):
    """p0 margin, p3 swap (0/1): cosine distances."""
    d_ap, ga_ap, gp_ap = _cos_distance(a, b)
    d_an, ga_an, gn_an = _cos_distance(a, c)
    d_pn, gp_pn, gn_pn = _cos_distance(b, c)
    swap = p3 != 0.0
    w_an, w_pn = _swap_weights(d_an, d_pn, swap)
    d_neg = tl.where(swap, nanops.minimum(d_an, d_pn), d_an)
    z = p0 + d_ap - d_neg
    act = tl.where(z >= 0.0, 1.0, 0.0)[:, None]
    w_an = w_an[:, None] * act
    w_pn = w_pn[:, None] * act
    da = act * ga_ap - w_an * ga_an
    # without swap d(p, n) is not part of the loss (its gradient may be NaN)
    dp = act * gp_ap - tl.where(swap, w_pn * gp_pn, 0.0)
    dn = -(w_an * gn_an + tl.where(swap, w_pn * gn_pn, 0.0))
    return nanops.maximum(z, 0.0), da, dp, dn


_triplet_l2_kernel = aligned_rows_loss(_triplet_l2_term, name="triplet_l2", operands=3)
_triplet_lp_kernel = aligned_rows_loss(_triplet_lp_term, name="triplet_lp", operands=3)
_triplet_cos_kernel = aligned_rows_loss(_triplet_cos_term, name="triplet_cosine", operands=3)


def triplet_triton(anchor, positive, negative, margin=1.0, p=2.0, eps=1e-6, swap=False,
                   reduction="mean", distance="euclidean"):
    _validate_triplet(anchor, positive, negative, margin, p, eps, swap, reduction, distance)
    if distance == "cosine":
        kernel = _triplet_cos_kernel
    else:
        kernel = _triplet_l2_kernel if p == 2 else _triplet_lp_kernel
    return kernel(anchor, positive, negative, reduction=reduction, p0=margin, p1=eps, p2=p,
                  p3=1.0 if swap else 0.0)


def triplet_inputs(case, n: int | None = None, d: int = EMBED_DIM):
    n = case.n if n is None else n
    anchor = case.randn(n, d)
    # positives nearer than negatives on average, with overlap: some triplets satisfy
    # the margin (zero loss and gradient), others do not
    positive = anchor + 0.5 * case.randn(n, d)
    negative = anchor + 0.6 * case.randn(n, d)
    return {"anchor": anchor, "positive": positive, "negative": negative}


TRIPLET_EDGE_CASES = {
    "one_row": lambda case: triplet_inputs(case, 1),
    "wide_rows": lambda case: triplet_inputs(case, 3, 3000),
    "odd_width": lambda case: triplet_inputs(case, 45, 7),
    # the swap's min(d(a, n), d(p, n)) decides: positives far from their anchors
    "far_positives": lambda case: {**triplet_inputs(case, 40),
                                   "positive": case.randn(40, EMBED_DIM) * 2.0},
}


# ---------------------------------------------------------------- batch_hard_triplet
#: Anchors mined per block by the chunked implementation: memory O(B * CHUNK).
CHUNK = 1024
BATCH_DIM = 128
BATCH_SIZES = {
    "quick": [64, 130],
    "default": [1024, 4096],
    "large": [4096, 16384],
}


def _validate_batch_hard(input, target, margin, soft_margin, eps, reduction):
    loss = "batch_hard_triplet"
    check_floating(loss, input=input)
    check_ndim(loss, "input", input, (2,), "a matrix (B, D) of embeddings")
    check_integer(loss, "target", target)
    check_device(loss, "input", input, target=target)
    check_shape(loss, "target", target, input.shape[:1], "one class label per embedding")
    check_number(loss, "margin", margin, 0.0, None)
    check_bool(loss, "soft_margin", soft_margin)
    check_number(loss, "eps", eps, 0.0, None)
    check_reduction(loss, reduction)
    classes, counts = torch.unique(target, return_counts=True)
    if classes.numel() < 2:
        raise ValueError(f"{loss}: target must hold at least two classes (every anchor needs "
                         f"a negative), got {classes.numel()}")
    if bool((counts < 2).any()):
        lonely = classes[counts < 2]
        raise ValueError(f"{loss}: target must give every class at least two members (every "
                         f"anchor needs a positive), class {lonely[0].item()} has one"
                         + (f" (and {lonely.numel() - 1} more)" if lonely.numel() > 1 else ""))


def _hinge(z: torch.Tensor, soft_margin: bool) -> torch.Tensor:
    """max(0, z), or the soft margin log(1 + e^z)."""
    return torch.logaddexp(z, torch.zeros_like(z)) if soft_margin else z.clamp_min(0.0)


def batch_hard_reference(input, target, margin=1.0, soft_margin=False, eps=1e-12,
                         reduction="mean"):
    """Distance matrix D_ij = sqrt(|x_i - x_j|^2 + eps) (Gram form), per anchor the max over
    its positives and the min over its negatives (first index on ties), then the hinge.
    16-bit inputs are computed in float32 (`_work`), the result rounded back."""
    _validate_batch_hard(input, target, margin, soft_margin, eps, reduction)
    x = _work(input)
    sq = (x * x).sum(dim=1)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * x @ x.T).clamp_min(0.0)
    dist = torch.sqrt(d2 + eps)
    same = target[:, None] == target[None, :]
    self_pair = torch.eye(len(target), dtype=torch.bool, device=input.device)
    hardest_pos = dist.masked_fill(~same | self_pair, float("-inf")).max(dim=1).values
    hardest_neg = dist.masked_fill(same, float("inf")).min(dim=1).values
    out = reduce_loss(_hinge(margin + hardest_pos - hardest_neg, soft_margin), reduction)
    return out.to(input.dtype)


def _work(x: torch.Tensor) -> torch.Tensor:
    """Mining needs at least float32: half-precision distances tie far too often, and
    in float16 eps = 1e-12 underflows, so that sqrt(0 + eps)'s gradient (the masked
    self-pair's) is inf and times its zero cotangent NaN."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def batch_hard_pinned(inputs, options):
    """The float64 loss at the pairs a 16-bit computation mines: hardest positive and
    negative per anchor from float32 distances of the 16-bit embeddings (`mine_chunked`),
    as every implementation mines them (`LossSpec.pinned_reference`)."""
    pos, neg = mine_chunked(inputs["input"], inputs["target"])

    def at_pairs(input, target, margin=1.0, soft_margin=False, eps=1e-12, reduction="mean"):
        _validate_batch_hard(input, target, margin, soft_margin, eps, reduction)
        return _loss_from_indices(input, pos, neg, margin, soft_margin, eps, reduction)

    return at_pairs


def _nonfinite_as_mined(d: torch.Tensor, mined_d2: torch.Tensor, eps) -> torch.Tensor:
    """The reference's distance where the mined squared distance (its Gram form) is NaN
    or inf: inf - inf there gives NaN where the direct form gives inf, and a NaN anywhere
    among an anchor's candidates makes its hardest distance NaN. B values: no extra pass."""
    return torch.where(torch.isfinite(mined_d2), d, torch.sqrt(mined_d2.to(d.dtype) + eps))


def _loss_from_indices(input, pos, neg, margin, soft_margin, eps, reduction, mined=None):
    """The loss from the mined indices: only O(B D) rows enter autograd. ``mined``: the
    mined squared distances (hardest positive, hardest negative), for NaN/inf."""
    x = _work(input)
    d_pos = torch.sqrt(((x - x[pos]) ** 2).sum(dim=1) + eps)
    d_neg = torch.sqrt(((x - x[neg]) ** 2).sum(dim=1) + eps)
    if mined is not None:
        d_pos = _nonfinite_as_mined(d_pos, mined[0], eps)
        d_neg = _nonfinite_as_mined(d_neg, mined[1], eps)
    loss = _hinge(margin + d_pos - d_neg, soft_margin)
    return reduce_loss(loss, reduction).to(input.dtype)


@torch.no_grad()
def mine_chunked(x: torch.Tensor, target: torch.Tensor, chunk: int = CHUNK,
                 values: bool = False):
    """Hardest positive / negative index per anchor, ``chunk`` anchors at a time (and,
    with ``values``, their squared distances, NaN where the reference's are)."""
    x = _work(x.detach())
    B = x.shape[0]
    sq = (x * x).sum(dim=1)
    pos = torch.empty(B, dtype=torch.int64, device=x.device)
    neg = torch.empty(B, dtype=torch.int64, device=x.device)
    pos_d2 = torch.empty(B, dtype=x.dtype, device=x.device)
    neg_d2 = torch.empty(B, dtype=x.dtype, device=x.device)
    for start in range(0, B, chunk):
        stop = min(start + chunk, B)
        d2 = torch.addmm(sq[None, :], x[start:stop], x.T, alpha=-2.0)
        d2.add_(sq[start:stop, None]).clamp_min_(0.0)
        same = target[start:stop, None] == target[None, :]
        rows = torch.arange(stop - start, device=x.device)
        excluded = ~same
        excluded[rows, rows + start] = True  # the anchor is not its own positive
        # max/min(dim) as argmax/argmin (first index on ties), values too: NaN wins
        torch.max(d2.masked_fill(excluded, float("-inf")), dim=1,
                  out=(pos_d2[start:stop], pos[start:stop]))
        torch.min(d2.masked_fill_(same, float("inf")), dim=1,
                  out=(neg_d2[start:stop], neg[start:stop]))
    return (pos, neg, pos_d2, neg_d2) if values else (pos, neg)


def batch_hard_chunked(input, target, margin=1.0, soft_margin=False, eps=1e-12,
                       reduction="mean"):
    _validate_batch_hard(input, target, margin, soft_margin, eps, reduction)
    pos, neg, pos_d2, neg_d2 = mine_chunked(input, target, CHUNK, values=True)
    return _loss_from_indices(input, pos, neg, margin, soft_margin, eps, reduction,
                              mined=(pos_d2, neg_d2))


@jit
def _hardest_pair(dot, sq_r, sq_c, lab_r, lab_c, row, col, p0, p1):
    """Squared distances (monotone in the distance): positives for max, negatives for min."""
    d2 = nanops.maximum(sq_r + sq_c - 2.0 * dot, 0.0)  # clamp_min keeps NaN
    same = lab_r == lab_c
    return (tl.where(same & (row != col), d2, float("-inf")),
            tl.where(same, float("inf"), d2))


_mine_kernel = pairwise_reduction(_hardest_pair, ("max", "min"), name="batch_hard_mining",
                                  labels=True)


def batch_hard_triton(input, target, margin=1.0, soft_margin=False, eps=1e-12,
                      reduction="mean"):
    _validate_batch_hard(input, target, margin, soft_margin, eps, reduction)
    (pos_d2, pos), (neg_d2, neg) = _mine_kernel(input.detach(), row_labels=target)
    return _loss_from_indices(input, pos, neg, margin, soft_margin, eps, reduction,
                              mined=(pos_d2, neg_d2))


def batch_labels(case, n: int, per_class: int = 4) -> torch.Tensor:
    """P x K batch labels (K = per_class members per class, P >= 2), shuffled."""
    classes = max(2, n // per_class)
    labels = torch.arange(n, device=case.device) % classes
    return labels[case.rand(n).argsort()]


def batch_inputs(case, n: int | None = None, d: int = BATCH_DIM):
    n = max(4, case.n if n is None else n)
    target = batch_labels(case, n)
    centers = case.randn(int(target.max()) + 1, d)
    # class structure strong enough that some anchors satisfy the margin
    return {"input": case.randn(n, d) + 0.8 * centers[target], "target": target}


def _tied_batch(case, classes: int = 8, members: int = 6):
    """Exact ties: member m of class c sits at 1.5 e_c + e'_m (two one-hot blocks), so all
    positives of an anchor are at distance sqrt(2) and its nearest negatives (the same m
    in every other class) at sqrt(4.5), inside the margin. Coordinates exact in binary keep
    the Gram form exact in every dtype, so every implementation sees the same ties and
    must break them the same way (lowest index); the rows are shuffled so that index
    order matters."""
    n = classes * members
    label = torch.arange(n, device=case.device) // members
    member = torch.arange(n, device=case.device) % members
    x = torch.cat([1.5 * F.one_hot(label, classes), F.one_hot(member, members)], dim=1)
    order = case.rand(n).argsort()
    return {"input": x[order].to(case.dtype), "target": label[order]}


BATCH_EDGE_CASES = {
    "ties": _tied_batch,
    "smallest_batch": lambda case: {"input": case.randn(4, 16),
                                    "target": torch.tensor([0, 1, 0, 1], device=case.device)},
    "not_multiple_of_tile": lambda case: batch_inputs(case, 67, 33),
    "two_classes": lambda case: {"input": case.randn(70, 24),
                                 "target": batch_labels(case, 70, per_class=35)},
}


def _batch_bytes(inputs):
    x, y = inputs["input"], inputs["target"]
    read = x.numel() * x.element_size() + y.numel() * y.element_size()
    return {"forward": read, "backward": read + x.numel() * x.element_size(),
            "full": read + x.numel() * x.element_size()}


def _batch_flops(inputs):
    B, D = inputs["input"].shape
    return {"forward": 2 * B * B * D + 6 * B * D, "backward": 8 * B * D,
            "full": 2 * B * B * D + 14 * B * D}


# ---------------------------------------------------------------- registration
@hookimpl
def register_losses(register):
    register(LossSpec(
        name="cosine_embedding", family="knn", title="Cosine embedding loss",
        input_domains={"target": ("values", (-1, 1))},
        formula=r"\frac1n\sum_i \begin{cases}1-\cos(x_{1i},x_{2i}) & y_i=1\\ "
                r"\max(0,\cos(x_{1i},x_{2i})-m) & y_i=-1\end{cases},\quad "
                r"\cos(a,b)=\frac{a\cdot b}{\sqrt{(\lVert a\rVert^2+\epsilon)"
                r"(\lVert b\rVert^2+\epsilon)}},\ \epsilon=10^{-12}",
        description="Pulls similar pairs (y = 1) to cosine 1 and pushes dissimilar ones "
                    "(y = -1) below the margin. input1, input2 (N, D); target (N,) in "
                    "{-1, +1} (torch silently treats other labels as 0-loss; here they "
                    "are an error). Gradients to both inputs.",
        citation="torch.nn.CosineEmbeddingLoss; Hadsell, Chopra & LeCun (2006)",
        reference=cosine_embedding_reference, make_inputs=cosine_inputs,
        options={"margin": 0.0, "reduction": "mean"},
        check_options=reductions() + [{"margin": 0.3}, {"margin": -0.5}],
        grad_inputs=("input1", "input2"), sizes=ROW_SIZES, x_name="rows",
        bytes_moved=_rows_bytes("input1", "input2"),
        flops=_rows_flops(6, 8, "input1"), edge_cases=COSINE_EDGE_CASES))
    register(LossSpec(
        name="triplet", family="knn", title="Triplet margin loss",
        formula=r"\frac1n\sum_i \max\bigl(0,\ d(a_i,p_i)-d(a_i,n_i)+m\bigr),\quad "
                r"d(x,y)=\lVert x-y+\epsilon\rVert_p",
        description="Anchor, positive, negative (N, D). distance='euclidean' is torch's "
                    "pairwise_distance (the p-norm of x - y + eps, p >= 1); "
                    "distance='cosine' uses 1 - cos(x, y) with each norm clamped at 1e-8 "
                    "(F.cosine_similarity), p and eps unused. swap replaces d(a, n) by "
                    "min(d(a, n), d(p, n)) (Balntas et al. 2016). Degenerate (near-zero) "
                    "vectors under the cosine distance have clamp-dependent gradients that "
                    "may differ from torch's. 16-bit rows are computed in float32 (as "
                    "torch's autocast runs triplet_margin_loss; the Triton kernel "
                    "accumulates in float32) and the loss and gradients rounded once: 16-bit "
                    "distances of ~4 (0.5 to 0.6 sqrt(D)) carry ~4u of error into a hinge "
                    "on their difference plus the margin (~0.3), flipping triplets in and "
                    "out of the active set, and each p-norm gradient is a difference of "
                    "such terms (eager bfloat16: 28% off on the p=3 gradients, 5.2% forward "
                    "on an H200). So bfloat16 is judged at rtol 8e-3 (two unit roundoffs) "
                    "and an absolute floor of 1e-5 (the mean's gradient elements are "
                    "~1e-4): the default 2e-2 and 4e-3 would pass a 1% error.",
        tolerances={"bfloat16": (8e-3, 1e-5)},
        citation="Schroff, Kalenichenko & Philbin, FaceNet, CVPR 2015; Balntas et al., BMVC "
                 "2016; torch.nn.TripletMarginLoss",
        reference=triplet_reference, make_inputs=triplet_inputs,
        options={"margin": 1.0, "p": 2.0, "eps": 1e-6, "swap": False, "reduction": "mean",
                 "distance": "euclidean"},
        check_options=reductions() + [{"swap": True}, {"p": 1.0}, {"p": 3.0},
                                      {"margin": 0.2}, {"distance": "cosine"},
                                      {"distance": "cosine", "swap": True, "margin": 0.03}],
        sizes=ROW_SIZES, x_name="rows",
        bytes_moved=_rows_bytes("anchor", "positive", "negative"),
        flops=_rows_flops(9, 12, "anchor"), edge_cases=TRIPLET_EDGE_CASES))
    register(LossSpec(
        name="batch_hard_triplet", family="knn", title="Batch-hard triplet loss",
        input_domains={"target": ("integers",)},
        formula=r"\frac1B\sum_{a=1}^{B}\Bigl[m+\max_{p\neq a,\,y_p=y_a}D_{ap}-"
                r"\min_{n:\,y_n\neq y_a}D_{an}\Bigr]_+,\quad "
                r"D_{ij}=\sqrt{\lVert x_i-x_j\rVert^2+\epsilon}",
        description="Hermans, Beyer & Leibe's batch-hard mining over a labelled batch: "
                    "input (B, D), target (B,) class labels with at least two classes and "
                    "at least two members per class. soft_margin=True replaces [z]_+ by "
                    "log(1 + e^z) (the paper's soft margin; use margin=0 for it exactly). "
                    "Ties between candidates go to the lowest index, as torch.max(dim) "
                    "does; the gradient flows through the chosen pair only. 16-bit "
                    "embeddings are mined (and the reference computed) in float32: "
                    "16-bit distances tie far too often. Their checks judge against the "
                    "float64 loss at the pairs mined so (pinned_reference): a near-tie "
                    "flipped by rounding moves an anchor's gradient to another row.",
        citation="Hermans, Beyer & Leibe, In Defense of the Triplet Loss for Person "
                 "Re-Identification, arXiv:1703.07737 (2017)",
        reference=batch_hard_reference, make_inputs=batch_inputs,
        options={"margin": 1.0, "soft_margin": False, "eps": 1e-12, "reduction": "mean"},
        check_options=reductions() + [{"soft_margin": True, "margin": 0.0},
                                      {"margin": 0.2}],
        grad_inputs=("input",), sizes=BATCH_SIZES, x_name="batch",
        pinned_reference=batch_hard_pinned, bytes_moved=_batch_bytes, flops=_batch_flops, edge_cases=BATCH_EDGE_CASES))


@hookimpl
def register_implementations(register):
    register("cosine_embedding", Impl(
        "torch", cosine_embedding_torch, kind="baseline",
        dtypes=("float32", "float64", "bfloat16"),
        description="torch.nn.functional.cosine_embedding_loss; not float16: it multiplies "
                    "the squared norms in the input dtype, which overflows float16 once "
                    "|x1| |x2| > 256 (cos comes out 0; 24% off on rows of 3000)"))
    register("cosine_embedding", Impl(
        "triton", cosine_embedding_triton,
        bytes_model=streamed("input1", "input2"), backend="triton", devices=("cuda",),
        grad_in_forward=True, requires=("triton",),
        description="aligned-rows template: both rows read once, gradients in the forward"))
    register("triplet", Impl("torch", triplet_torch, kind="baseline",
                             description="F.triplet_margin_loss (cosine: "
                                         "F.triplet_margin_with_distance_loss)"))
    register("triplet", Impl(
        "triton", triplet_triton,
        bytes_model=streamed("anchor", "positive", "negative"),
        backend="triton", devices=("cuda",), grad_in_forward=True,
        requires=("triton",),
        description="aligned-rows template: three rows read once, gradients in the forward"))
    register("batch_hard_triplet", Impl(
        "chunked", batch_hard_chunked, backend="torch",
        description=f"mines {CHUNK} anchors at a time under no_grad (O(B * {CHUNK}) memory), "
                    "differentiates the gathered rows only"))
    register("batch_hard_triplet", Impl(
        "triton", batch_hard_triton,
        bytes_model=streamed("input", fused=False),
        backend="triton", devices=("cuda",), requires=("triton",),
        description="pairwise-tile template mines (max/min with index per anchor, never the "
                    "B x B matrix); loss and backward from the gathered rows"))
