"""Section 11, K-means: the within-cluster sum of squares and its soft (annealed) form.

Both need the n x K squared distances ``D_ik = |x_i - mu_k|^2``; the references form
that matrix (Gram form, see :func:`_clustering.sq_distances`). The rewrites never hold
it:

* ``wcss`` depends on ``D`` only through each row's nearest centroid. The ``chunked``
  implementation finds it ``chunk`` rows at a time under ``no_grad`` and the Triton one
  with the pairwise-tile template's ``min`` channel; both then evaluate and
  differentiate ``|x_i - mu_{k_i}|^2`` on the gathered centroid (O(n d), and exact in
  the difference form). Ties go to the first centroid, as ``torch.min(dim)`` does.
* ``soft_kmeans``'s gradient reaches every ``D_ik`` through the softmin weights:
  ``dL_i/dD_ik = a_ik (1 - (D_ik - L_i) / tau)``, whose row sums are exactly 1. The
  ``chunked`` implementation recomputes a chunk's distances in the backward from the
  saved per-row losses; the Triton one takes each row's minimum distance from the
  pairwise template, its softmin normaliser and loss from a weighted-sum pass, and
  the gradients from two more (rows side for x, columns side for mu), see
  :mod:`lossreg.kernels.pairwise_grad`.

Memory of the rewrites: O(n d + chunk K) instead of O(n K).
"""

from __future__ import annotations

import torch

from lossreg import Impl, LossSpec, hookimpl
from lossreg.kernels.traffic import streamed
from lossreg.kernels import jit, nanops, tl
from lossreg.kernels.pairwise import pairwise_reduction
from lossreg.kernels.pairwise_grad import pairwise_weighted_sum

from ._clustering import (
    CLUSTER_SPREAD,
    check_centroids,
    clustered_points,
    param,
    sq_distances,
    work,
)
from ._common import reduce_loss, reductions
from lossreg.validate import check_number, check_reduction

#: Distance entries per chunk of the chunked implementations (16 MiB in float32); read
#: at call time, so tests may shrink it.
CHUNK_ELEMENTS = 1 << 22
#: Spread of the given centroids around their clusters' centres (relative to the
#: clusters' own spread): centroids near, not at, the clusters.
CENTROID_JITTER = 0.2


def _chunk_rows(per_row: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(per_row, 1))


def _validate(loss, x, centroids, reduction, tau=None):
    check_centroids(loss, x, centroids)
    check_reduction(loss, reduction)
    if tau is not None:
        check_number(loss, "tau", tau, 0.0, None, low_open=True)


def _chunk_sq_distances(xc: torch.Tensor, c: torch.Tensor, sq_c: torch.Tensor):
    """Gram-form squared distances of a chunk of rows to every centroid, in place."""
    d2 = torch.addmm(sq_c[None, :], xc, c.T, alpha=-2.0)
    return d2.add_((xc * xc).sum(dim=1)[:, None]).clamp_min_(0.0)


# ---------------------------------------------------------------- wcss
def wcss_reference(x, centroids, reduction="sum"):
    """All n x K squared distances, the minimum of each row (first centroid on ties)."""
    _validate("wcss", x, centroids, reduction)
    per_point = sq_distances(work(x), work(centroids)).min(dim=1).values
    return reduce_loss(per_point, reduction).to(x.dtype)


class _GatheredSqDistance(torch.autograd.Function):
    """``|x_i - mu_{idx_i}|^2`` per row, chunk by chunk; saves only the inputs and the
    indices, so the backward's temporaries are O(chunk d) besides the gradients."""

    @staticmethod
    def forward(ctx, x, centroids, idx):
        c = work(centroids)
        out = torch.empty(x.shape[0], dtype=c.dtype, device=x.device)
        rows = _chunk_rows(x.shape[1])
        for s in range(0, x.shape[0], rows):
            diff = work(x[s:s + rows]) - c[idx[s:s + rows]]
            out[s:s + rows] = (diff * diff).sum(dim=1)
        ctx.save_for_backward(x, centroids, idx)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, centroids, idx = ctx.saved_tensors
        c = work(centroids)
        need_x, need_c = ctx.needs_input_grad[:2]
        dx = torch.empty_like(x) if need_x else None
        dc = torch.zeros_like(c) if need_c else None
        rows = _chunk_rows(x.shape[1])
        for s in range(0, x.shape[0], rows):
            i = idx[s:s + rows]
            g = (work(x[s:s + rows]) - c[i]).mul_(2.0 * grad[s:s + rows, None])
            if need_x:
                dx[s:s + rows] = g
            if need_c:
                dc.index_add_(0, i, g, alpha=-1.0)
        return dx, (dc.to(centroids.dtype) if need_c else None), None


def wcss_from_indices(x, centroids, idx, reduction, mined=None):
    """The loss from each point's chosen centroid: O(n d) work and autograd. ``mined``:
    each point's mined (Gram-form) minimum; where it is NaN or inf it is the reference's
    value (inf - inf gives NaN in the Gram form where the direct one gives inf, and a NaN
    distance wins the minimum): a per-point fix-up, no extra pass."""
    per_point = _GatheredSqDistance.apply(x, centroids, idx)
    if mined is not None:
        per_point = torch.where(torch.isfinite(mined), per_point,
                                mined.to(per_point.dtype))
    return reduce_loss(per_point, reduction).to(x.dtype)


@torch.no_grad()
def nearest_chunked(x: torch.Tensor, centroids: torch.Tensor, values: bool = False):
    """Index of each point's nearest centroid (first on ties), ``chunk`` rows at a time:
    the same clamped Gram-form distances as the reference, never n x K at once. With
    ``values``, (minimum squared distances, indices), NaN where the reference's is."""
    x, c = work(x.detach()), work(centroids.detach())
    sq_c = (c * c).sum(dim=1)
    idx = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
    dmin = torch.empty(x.shape[0], dtype=c.dtype, device=x.device)
    rows = _chunk_rows(c.shape[0])
    for s in range(0, x.shape[0], rows):
        torch.min(_chunk_sq_distances(x[s:s + rows], c, sq_c), dim=1,
                  out=(dmin[s:s + rows], idx[s:s + rows]))
    return (dmin, idx) if values else idx


def wcss_chunked(x, centroids, reduction="sum"):
    _validate("wcss", x, centroids, reduction)
    dmin, idx = nearest_chunked(x, centroids, values=True)
    return wcss_from_indices(x, centroids, idx, reduction, mined=dmin)


@jit
def _sq_distance_pair(dot, sq_r, sq_c, lab_r, lab_c, row, col, p0, p1):
    d2 = nanops.maximum(sq_r + sq_c - 2.0 * dot, 0.0)  # clamp_min keeps NaN
    return d2, d2


#: Each row's smallest squared distance and its (first) centroid.
_nearest_kernel = pairwise_reduction(_sq_distance_pair, ("min",), name="kmeans_nearest")


def wcss_triton(x, centroids, reduction="sum"):
    _validate("wcss", x, centroids, reduction)
    [(dmin, idx)] = _nearest_kernel(x.detach(), centroids.detach())
    return wcss_from_indices(x, centroids, idx, reduction, mined=dmin)


# ---------------------------------------------------------------- soft_kmeans
def soft_kmeans_reference(x, centroids, tau=1.0, reduction="mean"):
    """All n x K squared distances, softmax of -D / tau per row, the weighted mean."""
    _validate("soft_kmeans", x, centroids, reduction, tau)
    d2 = sq_distances(work(x), work(centroids))
    a = torch.softmax(-d2 / tau, dim=1)
    return reduce_loss((a * d2).sum(dim=1), reduction).to(x.dtype)


class _SoftKMeansChunked(torch.autograd.Function):
    """Forward and backward ``chunk`` rows at a time; saves the per-row losses L_i and
    recomputes each chunk's distances and softmin in the backward."""

    @staticmethod
    def forward(ctx, x, centroids, tau):
        xw, c = work(x), work(centroids)
        sq_c = (c * c).sum(dim=1)
        out = torch.empty(x.shape[0], dtype=c.dtype, device=x.device)
        rows = _chunk_rows(c.shape[0])
        for s in range(0, x.shape[0], rows):
            d2 = _chunk_sq_distances(xw[s:s + rows], c, sq_c)
            out[s:s + rows] = (torch.softmax(-d2 / tau, dim=1) * d2).sum(dim=1)
        ctx.save_for_backward(x, centroids, out)
        ctx.tau = tau
        return out

    @staticmethod
    def backward(ctx, grad):
        x, centroids, per_row = ctx.saved_tensors
        tau = ctx.tau
        xw, c = work(x), work(centroids)
        sq_c = (c * c).sum(dim=1)
        need_x, need_c = ctx.needs_input_grad[:2]
        dx = torch.empty_like(xw) if need_x else None
        dc = torch.zeros_like(c) if need_c else None
        col_sums = torch.zeros(c.shape[0], dtype=c.dtype, device=c.device)
        rows = _chunk_rows(c.shape[0])
        for s in range(0, x.shape[0], rows):
            xc = xw[s:s + rows]
            d2 = _chunk_sq_distances(xc, c, sq_c)
            a = torch.softmax(-d2 / tau, dim=1)
            # w_ik = g_i dL_i/dD_ik = g_i a_ik (1 - (D_ik - L_i) / tau), in place on d2
            w = d2.sub_(per_row[s:s + rows, None]).div_(-tau).add_(1.0).mul_(a)
            w.mul_(grad[s:s + rows, None])
            if need_x:  # dx_i = 2 (sum_k w_ik) x_i - 2 sum_k w_ik mu_k
                dx[s:s + rows] = torch.addmm(xc * (2.0 * w.sum(dim=1))[:, None], w, c,
                                             alpha=-2.0)
            if need_c:  # dmu_k = 2 (sum_i w_ik) mu_k - 2 sum_i w_ik x_i
                dc.addmm_(w.T, xc, alpha=-2.0)
                col_sums += w.sum(dim=0)
        if need_c:
            dc.addcmul_(c, 2.0 * col_sums[:, None])
        return ((dx.to(x.dtype) if need_x else None),
                (dc.to(centroids.dtype) if need_c else None), None)


def soft_kmeans_chunked(x, centroids, tau=1.0, reduction="mean"):
    _validate("soft_kmeans", x, centroids, reduction, tau)
    per_row = _SoftKMeansChunked.apply(x, centroids, float(tau))
    return reduce_loss(per_row, reduction).to(x.dtype)


@jit
def _softmin_stats(dot, sq_r, sq_c, lab_r, lab_c, row, col, r0, r1, r2, r3, p0, p1, p2, p3):
    """r0 the row's minimum distance, p0 tau: e = exp(-(D - min) / tau) and e D (NaN
    rows stay NaN: the clamp keeps NaN as the reference's clamp_min, and so does r0)."""
    d2 = nanops.maximum(sq_r + sq_c - 2.0 * dot, 0.0)
    e = tl.exp((r0 - d2) / p0)
    return e, e * d2


@jit
def _softmin_grad(dot, sq_r, sq_c, lab_r, lab_c, row, col, r0, r1, r2, r3, p0, p1, p2, p3):
    """r0 min distance, r1 1 / normaliser, r2 the row's loss L, r3 its incoming
    gradient, p0 tau: w = g a (1 - (D - L) / tau) (0 where a underflows)."""
    d2 = nanops.maximum(sq_r + sq_c - 2.0 * dot, 0.0)
    a = tl.exp((r0 - d2) / p0) * r1
    w = tl.where(a > 0.0, r3 * a * (1.0 - (d2 - r2) / p0), 0.0)
    return w, w


_softmin_stats_kernel = pairwise_weighted_sum(_softmin_stats, "soft_kmeans_stats", vec=False,
                                              row_stats=1)
_softmin_grad_kernel = pairwise_weighted_sum(_softmin_grad, "soft_kmeans_grad",
                                             sides=("rows", "cols"), row_stats=4)


class _SoftKMeansTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, centroids, tau):
        x_, c_ = x.detach(), centroids.detach()
        [(dmin, _)] = _nearest_kernel(x_, c_)
        _, norm, weighted = _softmin_stats_kernel(x_, c_, row_stats=dmin[:, None],
                                                  params=(tau,))
        per_row = weighted / norm
        ctx.save_for_backward(x, centroids, torch.stack([dmin, 1.0 / norm, per_row], 1))
        ctx.tau = tau
        return per_row

    @staticmethod
    def backward(ctx, grad):
        x, centroids, stats = ctx.saved_tensors
        stats = torch.cat([stats, grad[:, None].to(stats.dtype)], dim=1)
        x_, c_ = x.detach(), centroids.detach()
        dx = dc = None
        if ctx.needs_input_grad[0]:
            vec, s0, _ = _softmin_grad_kernel(x_, c_, side="rows", row_stats=stats,
                                              params=(ctx.tau,))
            dx = (2.0 * (s0[:, None] * work(x_) - vec)).to(x.dtype)
        if ctx.needs_input_grad[1]:
            vec, s0, _ = _softmin_grad_kernel(x_, c_, side="cols", row_stats=stats,
                                              params=(ctx.tau,))
            dc = (2.0 * (s0[:, None] * work(c_) - vec)).to(centroids.dtype)
        return dx, dc, None


def soft_kmeans_triton(x, centroids, tau=1.0, reduction="mean"):
    _validate("soft_kmeans", x, centroids, reduction, tau)
    per_row = _SoftKMeansTriton.apply(x, centroids, float(tau))
    return reduce_loss(per_row, reduction).to(x.dtype)


# ---------------------------------------------------------------- inputs
def kmeans_inputs(case, n: int | None = None, clusters: int | None = None,
                  d: int | None = None):
    """Clustered points and one centroid per cluster, near (not at) its centre."""
    n = case.n if n is None else n
    clusters = param(case, "clusters", 8) if clusters is None else clusters
    d = param(case, "dim", 16) if d is None else d
    x, _, centers = clustered_points(case, n, clusters, d)
    jitter = CENTROID_JITTER * CLUSTER_SPREAD / max(d, 1) ** 0.5
    return {"x": x, "centroids": centers + jitter * case.randn(clusters, d)}


def _duplicate_centroids(case):
    """Exact ties: small-integer coordinates keep every Gram-form distance exact in every
    dtype, so all implementations see the same ties. Centroids 0 and 3, and 1 and 5,
    are copies, and integer points tie between distinct centroids too. Each point's
    wcss gradient must reach the first of its tied centroids only."""
    distinct = torch.randint(-2, 3, (4, 5), device=case.device, generator=case.generator)
    distinct[1] = distinct[0] + 1  # not a copy, whatever the draw
    centroids = distinct[[0, 1, 2, 0, 3, 1]]
    x = torch.randint(-2, 3, (90, 5), device=case.device, generator=case.generator)
    return {"x": x.to(case.dtype), "centroids": centroids.to(case.dtype)}


def _identical_points(case):
    """A cluster of 40 identical points sitting exactly on a centroid (distance 0,
    gradient 0), among ordinary ones."""
    inputs = kmeans_inputs(case, 100, 6, 16)
    inputs["x"][::2] = inputs["centroids"][2]
    return inputs


KMEANS_EDGE_CASES = {
    "one_centroid": lambda case: kmeans_inputs(case, 50, 1, 16),
    "duplicate_centroids": _duplicate_centroids,
    "off_tile": lambda case: kmeans_inputs(case, 67, 65, 33),
    "off_tile_wide": lambda case: kmeans_inputs(case, 130, 67, 70),
    "identical_points": _identical_points,
}

KMEANS_SIZES = {
    "quick": [67, 250],
    # n = 65536, K = 1024, d = 64 is the chunked-vs-reference memory/time benchmark
    "default": [4096, 65536],
    "large": [65536, 262144],
}
KMEANS_PARAMS = {
    "quick": {"clusters": 37, "dim": 24},
    "default": {"clusters": 1024, "dim": 64},
    "large": {"clusters": 1024, "dim": 64},
}


def _io_bytes(inputs):
    x, c = inputs["x"], inputs["centroids"]
    read = x.numel() * x.element_size() + c.numel() * c.element_size()
    return {"forward": read, "backward": 2 * read, "full": 2 * read}


def _flops(fwd_nkd, fwd_nk, bwd_nkd, bwd_nk, fwd_nd, bwd_nd):
    """Counts per n K d (distance products), n K (elementwise on distances), n d."""

    def model(inputs):
        (n, d), k = inputs["x"].shape, inputs["centroids"].shape[0]
        fwd = fwd_nkd * n * k * d + fwd_nk * n * k + fwd_nd * n * d
        bwd = bwd_nkd * n * k * d + bwd_nk * n * k + bwd_nd * n * d
        return {"forward": fwd, "backward": bwd, "full": fwd + bwd}

    return model


# ---------------------------------------------------------------- registration
CITATION_WCSS = ("Lloyd, Least squares quantization in PCM, IEEE Trans. Inf. Theory 28(2) "
                 "(1982); MacQueen (1967)")
CITATION_SOFT = ("Rose, Gurewitz & Fox, Statistical mechanics and phase transitions in "
                 "clustering, Phys. Rev. Lett. 65 (1990); Bishop, PRML (2006) sec. 9.2")


@hookimpl
def register_losses(register):
    register(LossSpec(
        name="wcss", family="kmeans", title="Within-cluster sum of squares (K-means)",
        formula=r"\sum_{i=1}^{n} \min_{k=1..K} \lVert x_i-\mu_k\rVert^2",
        description=(
            "K-means objective (inertia): x (n, d) points, centroids (K, d), K >= 1. "
            "reduction='sum' (the default, the formula), 'mean' divides by n, 'none' "
            "returns each point's squared distance to its nearest centroid. Distances "
            "are compared in the Gram form |x|^2 + |mu|^2 - 2 x.mu clamped at 0; ties go "
            "to the first centroid (torch.min's rule), and the gradient reaches x and "
            "the chosen centroid only: 2 (x_i - mu_k) and its negative."),
        citation=CITATION_WCSS,
        reference=wcss_reference, make_inputs=kmeans_inputs,
        options={"reduction": "sum"},
        check_options=[{"reduction": "mean"}, {"reduction": "none"}],
        sizes=KMEANS_SIZES, input_params=KMEANS_PARAMS, x_name="points",
        bytes_moved=_io_bytes, flops=_flops(2, 4, 0, 0, 3, 4),
        edge_cases=KMEANS_EDGE_CASES))
    register(LossSpec(
        name="soft_kmeans", family="kmeans", title="Soft K-means",
        formula=r"\frac{1}{n}\sum_{i=1}^{n}\sum_{k=1}^{K} a_{ik}\lVert x_i-\mu_k\rVert^2,"
                r"\quad a_{ik}=\frac{\exp(-\lVert x_i-\mu_k\rVert^2/\tau)}"
                r"{\sum_{l}\exp(-\lVert x_i-\mu_l\rVert^2/\tau)}",
        description=(
            "Soft (deterministic-annealing) K-means: each point's squared distances "
            "averaged under the softmin of -D/tau, tau > 0 (tau -> 0: wcss / n; tau -> "
            "inf: the mean over centroids). x (n, d), centroids (K, d). Gradients flow "
            "through the weights a as well (autograd of the formula): dL_i/dD_ik = "
            "a_ik (1 - (D_ik - L_i)/tau). reduction as torch's ('none': L_i per point)."),
        citation=CITATION_SOFT,
        reference=soft_kmeans_reference, make_inputs=kmeans_inputs,
        options={"tau": 1.0, "reduction": "mean"},
        check_options=reductions() + [{"tau": 1e-3}, {"tau": 1e3}, {"tau": 0.1}],
        sizes=KMEANS_SIZES, input_params=KMEANS_PARAMS, x_name="points",
        bytes_moved=_io_bytes, flops=_flops(2, 10, 6, 12, 0, 4),
        edge_cases=KMEANS_EDGE_CASES))


@hookimpl
def register_implementations(register):
    register("wcss", Impl(
        "chunked", wcss_chunked,
        description="nearest centroid found chunk by chunk under no_grad (O(chunk K) "
                    "memory), loss and gradients from the gathered centroids (O(n d))"))
    register("wcss", Impl(
        "triton", wcss_triton,
        bytes_model=streamed("x", "centroids", fused=False),
        backend="triton", devices=("cuda",), requires=("triton",),
        description="pairwise-tile template (min + argmin per point, never n x K); loss "
                    "and gradients from the gathered centroids"))
    register("soft_kmeans", Impl(
        "chunked", soft_kmeans_chunked,
        description="forward and backward chunk by chunk (O(n d + chunk K) memory); the "
                    "backward recomputes each chunk's distances from the saved L_i"))
    register("soft_kmeans", Impl(
        "triton", soft_kmeans_triton,
        bytes_model=streamed("x", "centroids", fused=False), backend="triton", devices=("cuda",),
        requires=("triton",), dtypes=("float32", "bfloat16", "float16"),
        description="pairwise-tile min, then weighted-sum passes for the softmin "
                    "normaliser and loss, and for the gradients of x (rows) and "
                    "centroids (columns); never n x K. tau reaches the kernels as a "
                    "float32 scalar, hence no float64"))
