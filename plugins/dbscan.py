"""Section 13, DBSCAN: ``eps_separation``, this project's differentiable stand-in for
DBSCAN's implicit objective, a contrastive loss over all pairs of a labelled batch
(after Hadsell, Chopra & LeCun 2006): same-cluster pairs are pulled inside each
other's eps-ball, pairs from different clusters pushed beyond eps + margin.

Pairs are ordered, ``i != j``. A pair is *positive* when both points carry the same
label >= 0, *negative* otherwise: label -1 (noise) has no positives, so a noise point
is negative with every other point, another noise point included. Each term is the
mean over its pairs, and 0 when there are none (all noise or a single point: no
positives; one cluster and no noise: no negatives), with zero gradient.

The distance ``d_ij = sqrt(D_ij)`` comes from the Gram form of ``D`` clamped at 0, and its
gradient is taken as 0 where ``D_ij = 0`` (coincident points: no direction; the pull
term's gradient vanishes there anyway). In float32 the Gram form's rounding (a few
ulps of |x|^2) leaves coincident points up to ~5e-4 |x| apart: harmless for positives
(below eps), but coincident points of different labels get a relative error of that
order in their push term, and a gradient direction from rounding noise.

The Triton implementation sums both terms per row with the pairwise-tile template (two
``sum`` channels, never the n x n matrix) and the gradient with one weighted-sum pass
of :mod:`lossreg.kernels.pairwise_grad`:
``dL/dx_i = sum_j w_ij (x_i - x_j)``, ``w_ij = 2 h'(d_ij) / (c d_ij)`` with ``c`` the
pair count of the pair's term (2: the pair enters as (i, j) and as (j, i)).
"""

from __future__ import annotations

import torch

from lossreg import Impl, LossSpec, hookimpl
from lossreg.kernels.traffic import streamed
from lossreg.kernels import jit, tl
from lossreg.kernels.pairwise import pairwise_reduction
from lossreg.kernels.pairwise_grad import pairwise_weighted_sum

from ._clustering import (
    check_cluster_labels,
    check_points,
    clustered_points,
    param,
    sq_distances,
    work,
)
from lossreg.validate import check_number

#: Share of the generated points that are noise (label -1).
NOISE_SHARE = 0.1


def _validate(x, labels, eps, margin):
    check_points("eps_separation", x)
    check_cluster_labels("eps_separation", x, labels)
    check_number("eps_separation", "eps", eps, 0.0, None)
    check_number("eps_separation", "margin", margin, 0.0, None)


def _mean_over(values: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over the ``pairs`` mask; 0 (zero gradient) when it is empty."""
    return torch.where(pairs, values, 0.0).sum() / pairs.sum().clamp_min(1)


def reference(x, labels, eps=0.5, margin=1.0):
    """The n x n distance matrix, the two pair masks and the two means."""
    _validate(x, labels, eps, margin)
    d2 = sq_distances(work(x), work(x))
    nonzero = d2 > 0
    dist = torch.sqrt(torch.where(nonzero, d2, 1.0)) * nonzero  # gradient 0 at d = 0
    n = x.shape[0]
    other = ~torch.eye(n, dtype=torch.bool, device=x.device)
    same = (labels[:, None] == labels[None, :]) & (labels >= 0)[:, None]
    positive = same & other
    negative = other & ~same
    pull = (dist - eps).clamp_min(0.0) ** 2
    push = (eps + margin - dist).clamp_min(0.0) ** 2
    return (_mean_over(pull, positive) + _mean_over(push, negative)).to(x.dtype)


def pair_counts(labels: torch.Tensor) -> tuple[int, int]:
    """(positive, negative) ordered pair counts: sum_c n_c (n_c - 1) over clusters c >= 0,
    and the rest of the n (n - 1)."""
    n = labels.numel()
    _, counts = torch.unique(labels[labels >= 0], return_counts=True)
    positive = int((counts * (counts - 1)).sum())
    return positive, n * (n - 1) - positive


@jit
def _separation_pair(dot, sq_r, sq_c, lab_r, lab_c, row, col, p0, p1):
    """p0 eps, p1 margin: the pull term on positive pairs, the push term on negatives."""
    dist = tl.sqrt(tl.maximum(sq_r + sq_c - 2.0 * dot, 0.0))
    other = row != col
    positive = (lab_r == lab_c) & (lab_r >= 0) & other
    negative = other & ~((lab_r == lab_c) & (lab_r >= 0))
    pull = tl.maximum(dist - p0, 0.0)
    push = tl.maximum(p0 + p1 - dist, 0.0)
    return tl.where(positive, pull * pull, 0.0), tl.where(negative, push * push, 0.0)


@jit
def _separation_grad(dot, sq_r, sq_c, lab_r, lab_c, row, col, r0, r1, r2, r3, p0, p1, p2,
                     p3):
    """p0 eps, p1 margin, p2 1 / positive pairs, p3 1 / negative pairs (0 when none):
    w = 2 h'(d) / (count d), the pair's weight in dx_i = sum_j w_ij (x_i - x_j)."""
    dist = tl.sqrt(tl.maximum(sq_r + sq_c - 2.0 * dot, 0.0))
    other = row != col
    same = (lab_r == lab_c) & (lab_r >= 0)
    dh = tl.where(same & other, 2.0 * tl.maximum(dist - p0, 0.0) * p2,
                  tl.where(other, -2.0 * tl.maximum(p0 + p1 - dist, 0.0) * p3, 0.0))
    w = tl.where(dist > 0.0, 2.0 * dh / dist, 0.0)
    return w, w


_sums_kernel = pairwise_reduction(_separation_pair, ("sum", "sum"), name="eps_separation",
                                  labels=True)
_grad_kernel = pairwise_weighted_sum(_separation_grad, "eps_separation_grad", labels=True)


class _SeparationTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, labels, eps, margin):
        x_ = x.detach()
        (pull, _), (push, _) = _sums_kernel(x_, row_labels=labels, p0=eps, p1=margin)
        n_pos, n_neg = pair_counts(labels)
        inv_pos = 1.0 / n_pos if n_pos else 0.0
        inv_neg = 1.0 / n_neg if n_neg else 0.0
        ctx.save_for_backward(x, labels)
        ctx.params = (eps, margin, inv_pos, inv_neg)
        return pull.sum() * inv_pos + push.sum() * inv_neg

    @staticmethod
    def backward(ctx, grad):
        x, labels = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        vec, s0, _ = _grad_kernel(x.detach(), row_labels=labels, params=ctx.params)
        dx = (s0[:, None] * work(x.detach()) - vec) * grad
        return dx.to(x.dtype), None, None, None


def triton_impl(x, labels, eps=0.5, margin=1.0):
    _validate(x, labels, eps, margin)
    return _SeparationTriton.apply(x, labels, float(eps), float(margin)).to(x.dtype)


# ---------------------------------------------------------------- inputs
def make_inputs(case, n: int | None = None, clusters: int | None = None,
                d: int | None = None, noise: float = NOISE_SHARE):
    """Clustered points labelled by cluster; a ``noise`` share relabelled -1 and moved
    to random positions."""
    n = case.n if n is None else n
    clusters = param(case, "clusters", 5) if clusters is None else clusters
    d = param(case, "dim", 16) if d is None else d
    x, labels, _ = clustered_points(case, n, clusters, d)
    is_noise = case.rand(n) < noise
    x = torch.where(is_noise[:, None], 1.5 * case.randn(n, d) / max(d, 1) ** 0.5, x)
    return {"x": x, "labels": torch.where(is_noise, -1, labels)}


def _all_noise(case):
    inputs = make_inputs(case, 40)
    return {**inputs, "labels": torch.full_like(inputs["labels"], -1)}


def _one_cluster(case):
    inputs = make_inputs(case, 40, noise=0.0)
    return {**inputs, "labels": torch.zeros_like(inputs["labels"])}


def _identical_points(case):
    """A cluster of 20 identical points (d = 0 between them, below eps: no pull, and no
    NaN from the distance's gradient at 0) among ordinary labelled points."""
    inputs = make_inputs(case, 60, 3, 16, noise=0.0)
    inputs["x"][:20] = inputs["x"][0]
    inputs["labels"][:20] = inputs["labels"][0]
    return inputs


def _int32_labels(case):
    inputs = make_inputs(case, 50)
    return {**inputs, "labels": inputs["labels"].to(torch.int32)}


EDGE_CASES = {
    "all_noise": _all_noise,
    "one_cluster_no_noise": _one_cluster,
    "single_point": lambda case: make_inputs(case, 1),
    "identical_points": _identical_points,
    "off_tile": lambda case: make_inputs(case, 67, 4, 33),
    "off_tile_wide": lambda case: make_inputs(case, 130, 6, 70),
    "int32_labels": _int32_labels,
}


def _bytes(inputs):
    x, y = inputs["x"], inputs["labels"]
    read = x.numel() * x.element_size() + y.numel() * y.element_size()
    write = x.numel() * x.element_size()
    return {"forward": read, "backward": read + write, "full": read + write}


def _flops(inputs):
    n, d = inputs["x"].shape
    fwd = 2 * n * n * d + 14 * n * n
    bwd = 4 * n * n * d + 16 * n * n
    return {"forward": fwd, "backward": bwd, "full": fwd + bwd}


@hookimpl
def register_losses(register):
    register(LossSpec(
        name="eps_separation", family="dbscan", title="Epsilon-ball separation",
        input_domains={"labels": ("index", None, (-1,))},
        formula=r"\frac{1}{|P|}\sum_{(i,j)\in P}\max(0,d_{ij}-\varepsilon)^2+\frac{1}{|N|}"
                r"\sum_{(i,j)\in N}\max(0,\varepsilon+m-d_{ij})^2,\quad "
                r"P=\{(i,j): i\neq j,\ y_i=y_j\geq 0\},\ "
                r"N=\{(i,j): i\neq j\}\setminus P,\ d_{ij}=\lVert x_i-x_j\rVert_2",
        description=(
            "Differentiable stand-in for DBSCAN's objective: x (n, d) points, labels (n,) "
            "integers >= 0 (clusters) or -1 (noise), eps >= 0, margin >= 0. Positive "
            "pairs: i != j with the same label >= 0; every other pair i != j is negative "
            "(a noise point pairs with nobody as a positive, and is negative with every "
            "other point, noise included). A term with no pairs is 0 (all noise: no "
            "positives). The gradient of d_ij is taken as 0 where the points coincide. "
            "No reduction option: the loss is a mean over pairs, not over samples."),
        citation="This project, after Hadsell, Chopra & LeCun, Dimensionality Reduction by "
                 "Learning an Invariant Mapping, CVPR 2006; Ester et al., DBSCAN, KDD 1996",
        reference=reference, make_inputs=make_inputs,
        options={"eps": 0.5, "margin": 1.0},
        check_options=[{"eps": 0.0}, {"eps": 0.2, "margin": 0.5}, {"margin": 0.0}],
        grad_inputs=("x",),
        sizes={"quick": [64, 300], "default": [1024, 4096], "large": [4096, 16384]},
        input_params={"quick": {"clusters": 5, "dim": 16},
                      "default": {"clusters": 32, "dim": 64},
                      "large": {"clusters": 128, "dim": 128}},
        x_name="points", bytes_moved=_bytes, flops=_flops, edge_cases=EDGE_CASES))


@hookimpl
def register_implementations(register):
    register("eps_separation", Impl(
        "triton", triton_impl,
        bytes_model=streamed("x", fused=False),
        backend="triton", devices=("cuda",), requires=("triton",),
        dtypes=("float32", "bfloat16", "float16"),
        description="pairwise-tile template (two sum channels per point, never n x n); "
                    "gradient from one weighted-sum pass over all pairs. eps and margin "
                    "reach the kernels as float32 scalars, hence no float64"))
