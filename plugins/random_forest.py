"""Section 5, random forests: soft-split criteria for many trees and for regression.

* ``forest_gini``: ``soft_split_gini`` of ``T`` trees at once, sharing the labels; the
  histogram template reads each row of ``s`` once (the labels about once in all).
* ``split_variance``: the regression criterion, within-child weighted variance. The
  Triton kernel forms five float64 sums in one pass (``s``, ``s z``, ``1 - s``,
  ``(1 - s) z``, ``z^2`` with ``z = y - y_0``): sums of squares minus squared sums cancel,
  so they are accumulated in float64 and shifted by the first target, which removes
  the mean's share of the cancellation.
"""

from __future__ import annotations

import torch

from lossreg import Impl, LossSpec, hookimpl
from lossreg.kernels.traffic import streamed
from lossreg.kernels import jit, tl
from lossreg.kernels.histogram import histogram_loss

from ._common import acc_dtype, reduce_loss, reductions
from lossreg.validate import (
    check_device,
    check_floating,
    check_ndim,
    check_nonempty,
    check_reduction,
    check_same_dtype,
    check_shape,
    check_values,
)
from .decision_tree import (
    CITATION_GINI,
    SPLIT_SIZES,
    _hard_split,
    _split_bytes,
    _split_flops,
    infer_classes,
    soft_split_gini_rows,
    split_gini_triton,
    split_inputs,
    validate_split,
)

#: Trees of the generated forests.
TREES = 16
FOREST_SIZES = {
    "quick": [300, 1000],
    "default": [2**10, 2**14, 2**18],
    "large": [2**18, 2**20, 2**22],
}


# ---------------------------------------------------------------- forest_gini
def _validate_forest(s, target, num_classes, reduction):
    validate_split("forest_gini", s, target, num_classes, (2,),
                   "a matrix (T, n): one soft split per tree")
    check_reduction("forest_gini", reduction)


def forest_gini_reference(s, target, num_classes=None, reduction="mean"):
    """soft_split_gini of each tree (row of s), then the mean (or sum) over trees."""
    _validate_forest(s, target, num_classes, reduction)
    per_tree = soft_split_gini_rows(s, target, infer_classes(target, num_classes))
    return reduce_loss(per_tree, reduction)


def forest_gini_triton(s, target, num_classes=None, reduction="mean"):
    _validate_forest(s, target, num_classes, reduction)
    return reduce_loss(split_gini_triton(s, target, infer_classes(target, num_classes)),
                       reduction)


def forest_inputs(case):
    return split_inputs(case, trees=TREES)


FOREST_EDGE_CASES = {
    "one_tree": lambda case: split_inputs(case, 500, 4, trees=1),
    "hard_splits": lambda case: {"s": torch.stack([_hard_split(case, 200) for _ in range(3)]),
                                 "target": case.randint(0, 3, 200)},
    "tail_not_multiple_of_block": lambda case: split_inputs(case, 4097, 6, trees=3),
    "many_trees": lambda case: split_inputs(case, 50, 3, trees=300),
}


# ---------------------------------------------------------------- split_variance
def _validate_variance(s, target):
    check_floating("split_variance", s=s, target=target)
    check_same_dtype("split_variance", s=s, target=target)
    check_ndim("split_variance", "s", s, (1,), "a vector (n,)")
    check_nonempty("split_variance", "s", s, "at least one sample")
    check_device("split_variance", "s", s, target=target)
    check_shape("split_variance", "target", target, s.shape, "one regression target per "
                "sample")
    check_values("split_variance", "s", s, 0.0, 1.0, "the probability of going left")


def _child_sse(w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """sum_i w_i (y_i - mu)^2 with mu the w-weighted mean (0 for an empty child)."""
    mass = w.sum()
    mu = (w * y).sum() / torch.where(mass > 0, mass, torch.ones_like(mass))
    return (w * (y - mu) ** 2).sum()


def split_variance_reference(s, target):
    """w_L Var_L(y) + w_R Var_R(y) = the MSE of predicting each child's weighted mean.
    16-bit inputs in float32, the result rounded back: squared deviations of targets
    near 1e4 overflow float16, and the sums lose the deviations in bfloat16."""
    _validate_variance(s, target)
    wide = acc_dtype(s.dtype)
    x, y = s.to(wide), target.detach().to(wide)
    return ((_child_sse(x, y) + _child_sse(1.0 - x, y)) / s.shape[0]).to(s.dtype)


@jit
def _variance_stats(s, y, k, aux):
    """k = 0..4: s, s z, 1 - s, (1 - s) z, z^2 with z = y - aux, and d/ds of each."""
    z = y.to(s.dtype) - aux
    r = 1.0 - s
    stat = tl.where(k == 0, s, tl.where(k == 1, s * z, tl.where(
        k == 2, r, tl.where(k == 3, r * z, z * z))))
    dstat = tl.where(k == 0, 1.0, tl.where(k == 1, z, tl.where(
        k == 2, -1.0, tl.where(k == 3, -z, 0.0 * z))))
    return stat, dstat


_variance_kernel = histogram_loss(_variance_stats, 5, name="split_variance", binned=False,
                                  acc64=True)


def _safe_ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    nonempty = den > 0
    return torch.where(nonempty, num / torch.where(nonempty, den, torch.ones_like(den)),
                       torch.zeros_like(num))


def variance_finish(h: torch.Tensor) -> torch.Tensor:
    """(T, 1, 5) sums -> (T,) criteria: (sum z^2 - A^2/S_L - B^2/S_R) / n."""
    sl, a, sr, b, q = h[:, 0].unbind(-1)
    return (q - _safe_ratio(a * a, sl) - _safe_ratio(b * b, sr)) / (sl + sr)


def split_variance_triton(s, target):
    _validate_variance(s, target)
    y = target.detach()
    return _variance_kernel(s, y, variance_finish, aux=y[:1])[0]


def variance_inputs(case, n: int | None = None, offset: float = 0.0):
    n = case.n if n is None else n
    s = 0.02 + 0.96 * case.rand(n)
    # targets that depend on the split: the children's means differ
    target = offset + case.randn(n) + 2.0 * (s > 0.5).to(case.dtype)
    return {"s": s, "target": target}


def _variance_flops(inputs):
    n = inputs["s"].numel()
    return {"forward": 9 * n, "backward": 4 * n, "full": 13 * n}


VARIANCE_EDGE_CASES = {
    "large_offset": lambda case: variance_inputs(case, 3000, offset=1e4),
    "hard_split": lambda case: {"s": _hard_split(case, 257), "target": case.randn(257)},
    "tail_not_multiple_of_block": lambda case: variance_inputs(case, 4097),
    "two_samples": lambda case: {
        "s": torch.tensor([0.25, 0.6], dtype=case.dtype, device=case.device),
        "target": torch.tensor([1.5, -0.5], dtype=case.dtype, device=case.device)},
}


# ---------------------------------------------------------------- registration
@hookimpl
def register_losses(register):
    register(LossSpec(
        name="forest_gini", family="random_forest", title="Forest soft-split Gini",
        input_domains={"s": ("range", 0.0, 1.0), "target": ("index", None)},
        formula=r"\frac{1}{T}\sum_{t=1}^{T}\Bigl[w_{L,t}\,G(p_{L,t})+w_{R,t}\,G(p_{R,t})\Bigr],"
                r"\quad p_{L,t}\propto\sum_i s_{ti} e_{y_i},\ "
                r"p_{R,t}\propto\sum_i (1-s_{ti}) e_{y_i},\ w_{L,t}=\frac1n\sum_i s_{ti}",
        description="soft_split_gini for T trees at once: s (T, n) holds each tree's soft "
                    "split of the same labelled samples. reduction applies over trees "
                    "('none' gives the (T,) criteria). Gradient w.r.t. s only.",
        citation=CITATION_GINI + "; Breiman, Random forests, Machine Learning 45 (2001)",
        reference=forest_gini_reference, make_inputs=forest_inputs,
        options={"num_classes": None, "reduction": "mean"},
        check_options=reductions() + [{"num_classes": 9}], grad_inputs=("s",),
        sizes=FOREST_SIZES, x_name="samples", bytes_moved=_split_bytes, flops=_split_flops,
        edge_cases=FOREST_EDGE_CASES))
    register(LossSpec(
        name="split_variance", family="random_forest", title="Soft-split variance",
        input_domains={"s": ("range", 0.0, 1.0)},
        formula=r"w_L\,\mathrm{Var}_L(y)+w_R\,\mathrm{Var}_R(y)=\frac1n\sum_i\Bigl[s_i(y_i-"
                r"\mu_L)^2+(1-s_i)(y_i-\mu_R)^2\Bigr],\quad \mu_L=\frac{\sum_i s_i y_i}"
                r"{\sum_i s_i},\ \mu_R=\frac{\sum_i (1-s_i) y_i}{\sum_i (1-s_i)}",
        description="Regression split criterion (CART's within-node variance) with soft "
                    "weights s in [0, 1]: the MSE of predicting each child's weighted "
                    "mean. A scalar; gradient w.r.t. s only (target is data). An empty "
                    "child contributes 0. 16-bit inputs are computed in float32 (the "
                    "Triton sums in float64) and the criterion and gradient rounded once, "
                    "so bfloat16 is judged at rtol 8e-3 (two unit roundoffs) and an "
                    "absolute floor of 1e-5 (the gradient elements are ~1/n): the default "
                    "2e-2 and 4e-3 would pass a 1% error.",
        tolerances={"bfloat16": (8e-3, 1e-5)},
        citation="Breiman, Friedman, Olshen & Stone, Classification and Regression Trees "
                 "(1984)",
        reference=split_variance_reference, make_inputs=variance_inputs, options={},
        grad_inputs=("s",), sizes=SPLIT_SIZES, x_name="n",
        bytes_moved=_split_bytes,
        flops=_variance_flops, edge_cases=VARIANCE_EDGE_CASES))


@hookimpl
def register_implementations(register):
    register("forest_gini", Impl(
        "triton", forest_gini_triton,
        bytes_model=streamed("s", fused=False),
        backend="triton", devices=("cuda",), requires=("triton",),
        description="histogram template: per-tree, per-class left/right masses in one read "
                    "of s, float64 finish"))
    register("split_variance", Impl(
        "triton", split_variance_triton,
        bytes_model=streamed("s", fused=False), backend="triton", devices=("cuda",),
        requires=("triton",),
        description="histogram template, one bin: five float64 sums in one read, shifted by "
                    "the first target"))
