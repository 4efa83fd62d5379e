"""Section 4, decision trees: differentiable impurities, for trees built on embeddings.

* ``gini_impurity`` and ``entropy_impurity`` score rows of class probabilities (a node's
  class distribution per sample, e.g. a softmax head); Triton: the row-wise template.
* ``soft_split_gini`` scores a soft split ``s`` (the probability that each sample goes
  left) of labelled samples by the weighted Gini impurity of the two children; its
  gradient w.r.t. ``s`` trains the router. Triton: the histogram template (per-class
  sums of ``s`` and ``1 - s`` in one read, a float64 finish on ``C`` numbers).

``forest_gini`` (section 5) reuses this module's soft-split pieces.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lossreg import Impl, LossSpec, hookimpl
from lossreg.kernels.traffic import streamed
from lossreg.kernels import jit, rowwise_loss, tl
from lossreg.kernels.histogram import histogram_loss

from ._common import acc_dtype, reduce_loss, reductions
from lossreg.validate import (
    check_device,
    check_floating,
    check_int_option,
    check_labels,
    check_ndim,
    check_nonempty,
    check_reduction,
    check_shape,
    check_values,
)

#: Classes of the generated probability rows and labels (not a power of two: the
#: kernels' masked lanes are exercised at every size).
CLASSES = 10
ROW_SIZES = {
    "quick": [256, 1000],
    "default": [2**12, 2**16, 2**20],
    "large": [2**20, 2**22, 2**24],
}
SPLIT_SIZES = {
    "quick": [500, 4099],
    "default": [2**12, 2**16, 2**20, 2**22],
    "large": [2**22, 2**24, 2**26],
}


# ---------------------------------------------------------------- impurities of rows
def _validate_rows(loss, input, reduction):
    check_floating(loss, input=input)
    check_ndim(loss, "input", input, (2,), "a matrix (N, C) of class-probability rows")
    check_reduction(loss, reduction)
    check_values(loss, "input", input, 0.0, 1.0, "class probabilities")


def gini_reference(input: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """1 - sum_k p_ik^2 per row."""
    _validate_rows("gini_impurity", input, reduction)
    return reduce_loss(1.0 - (input * input).sum(dim=1), reduction)


def _xlogx(p: torch.Tensor) -> torch.Tensor:
    """p log p with 0 log 0 = 0. The inner where keeps log(0) out of the graph, so the
    gradient at p = 0 is 0 (the term is constant there by convention), not nan."""
    positive = p > 0
    safe = torch.where(positive, p, torch.ones_like(p))
    return torch.where(positive, p * torch.log(safe), torch.zeros_like(p))


def entropy_reference(input: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """-sum_k p_ik log p_ik per row, 0 log 0 = 0; 16-bit ``input`` in float32, the result
    rounded back. In float16 the gradient -(1 + log p) cancels near p = 1/e once log p
    is rounded (0.3-0.9% off the float64 reference, above float16's 2e-3; the Triton
    kernel, which accumulates in float32, is within it)."""
    _validate_rows("entropy_impurity", input, reduction)
    wide = input.to(acc_dtype(input.dtype))
    return reduce_loss(-_xlogx(wide).sum(dim=1), reduction).to(input.dtype)


@jit
def _gini_term(s, valid, is_label, C, p0, p1):
    sq = tl.where(valid, s * s, 0.0)
    return 1.0 - tl.sum(sq, axis=1), -2.0 * s


@jit
def _entropy_term(s, valid, is_label, C, p0, p1):
    positive = valid & (s > 0.0)
    log_s = tl.log(tl.where(positive, s, 1.0))
    loss = -tl.sum(tl.where(positive, s * log_s, 0.0), axis=1)
    return loss, tl.where(positive, -(log_s + 1.0), 0.0)


_gini_kernel = rowwise_loss(_gini_term, name="gini_impurity")
_entropy_kernel = rowwise_loss(_entropy_term, name="entropy_impurity")


def _no_labels(input: torch.Tensor) -> torch.Tensor:
    # the row-wise template reads a label per row; these losses ignore it
    return torch.zeros(input.shape[0], dtype=torch.int64, device=input.device)


def gini_triton(input, reduction="mean"):
    _validate_rows("gini_impurity", input, reduction)
    return _gini_kernel(input, _no_labels(input), reduction)


def entropy_triton(input, reduction="mean"):
    _validate_rows("entropy_impurity", input, reduction)
    return _entropy_kernel(input, _no_labels(input), reduction)


def probability_rows(case, rows: int, classes: int = CLASSES) -> torch.Tensor:
    """Softmax rows of scaled normal logits: spread-out, strictly positive probabilities."""
    return torch.softmax(case.randn(rows, classes, dtype=torch.float64) * 2.0, dim=1).to(
        case.dtype)


def rows_inputs(case):
    return {"input": probability_rows(case, case.n)}


def _one_hot_rows(case, rows, classes):
    return F.one_hot(case.randint(0, classes, rows), classes).to(case.dtype)


ROW_EDGE_CASES = {
    "one_row": lambda case: {"input": probability_rows(case, 1)},
    "rows_not_multiple_of_block": lambda case: {"input": probability_rows(case, 411, 7)},
    "one_class": lambda case: {"input": torch.ones(5, 1, dtype=case.dtype, device=case.device)},
    "many_classes": lambda case: {"input": probability_rows(case, 6, 1000)},
    "pure_rows": lambda case: {"input": torch.cat([_one_hot_rows(case, 5, CLASSES),
                                                   probability_rows(case, 5)])},
}
ENTROPY_EDGE_CASES = {
    **ROW_EDGE_CASES,
    # exact zeros: 0 log 0 = 0 and a zero gradient there, as the reference defines it
    "exact_zeros": lambda case: {"input": torch.cat([
        _one_hot_rows(case, 4, CLASSES),
        torch.softmax(case.randn(4, CLASSES), 1) * (case.rand(4, CLASSES) > 0.5),
        torch.full((1, CLASSES), 1.0 / CLASSES, dtype=case.dtype, device=case.device),
    ]).clamp(0, 1)},
}


def _rows_flops(per_entry_fwd, per_entry_bwd):
    def model(inputs):
        n = inputs["input"].numel()
        return {"forward": per_entry_fwd * n, "backward": per_entry_bwd * n,
                "full": (per_entry_fwd + per_entry_bwd) * n}
    return model


# ---------------------------------------------------------------- soft splits
def _weighted_gini(mass: torch.Tensor, total: torch.Tensor, n: float) -> torch.Tensor:
    """w G(p) for one child: ``mass`` (..., C) its soft class counts, ``total`` (...) their
    sum, w = total / n, p = mass / total. An empty child (total 0) contributes 0; the
    safe denominator keeps its gradient finite."""
    nonempty = total > 0
    p = mass / torch.where(nonempty, total, torch.ones_like(total)).unsqueeze(-1)
    return torch.where(nonempty, total / n * (1.0 - (p * p).sum(dim=-1)),
                       torch.zeros_like(total))


def soft_split_gini_rows(s: torch.Tensor, target: torch.Tensor, classes: int) -> torch.Tensor:
    """The criterion for each row of ``s`` (T, n) (or (n,)), term by term."""
    onehot = F.one_hot(target, classes).to(s.dtype)
    n = s.shape[-1]
    left = s @ onehot                 # sum_i s_i e_{y_i}
    right = (1.0 - s) @ onehot        # sum_i (1 - s_i) e_{y_i}
    return (_weighted_gini(left, left.sum(-1), n)
            + _weighted_gini(right, right.sum(-1), n))


def infer_classes(target: torch.Tensor, num_classes) -> int:
    return int(target.max()) + 1 if num_classes is None else num_classes


def validate_split(loss, s, target, num_classes, s_dims, s_layout):
    check_floating(loss, s=s)
    check_ndim(loss, "s", s, s_dims, s_layout)
    check_nonempty(loss, "s", s, "at least one sample")
    check_device(loss, "s", s, target=target)
    check_shape(loss, "target", target, (s.shape[-1],), "one class label per sample")
    if num_classes is not None:
        check_int_option(loss, "num_classes", num_classes, 1)
    check_labels(loss, "target", target, num_classes)
    check_values(loss, "s", s, 0.0, 1.0, "the probability of going left")


def soft_split_gini_reference(s: torch.Tensor, target: torch.Tensor, num_classes=None):
    """w_L G(p_L) + w_R G(p_R) of the soft split ``s`` of the labelled samples; 16-bit
    ``s`` in float32, the result rounded back (16-bit class masses round the Gini's
    1 - sum p^2, and its gradient is a difference of such terms: 7.8e-3 in bfloat16
    where the truth is 0, at one sample)."""
    validate_split("soft_split_gini", s, target, num_classes, (1,), "a vector (n,)")
    wide = s.to(acc_dtype(s.dtype))
    return soft_split_gini_rows(wide, target, infer_classes(target, num_classes)).to(s.dtype)


@jit
def _split_gini_stats(s, y, k, aux):
    """Per class: the mass going left (s) and right (1 - s)."""
    left = k == 0
    stat = tl.where(left, s, 1.0 - s)
    return stat, tl.where(left, 1.0, -1.0) + 0.0 * s


_split_gini_kernel = histogram_loss(_split_gini_stats, 2, name="soft_split_gini")


def gini_finish(h: torch.Tensor) -> torch.Tensor:
    """(T, C, 2) per-class left/right masses -> (T,) criteria, in float64."""
    left, right = h[..., 0], h[..., 1]
    total_left, total_right = left.sum(-1), right.sum(-1)
    n = total_left + total_right
    return _weighted_gini(left, total_left, n) + _weighted_gini(right, total_right, n)


def split_gini_triton(s: torch.Tensor, target: torch.Tensor, classes: int) -> torch.Tensor:
    """(T,) criteria of the rows of ``s`` (T, n) from one histogram pass."""
    return _split_gini_kernel(s, target, gini_finish, classes)


def soft_split_gini_triton(s, target, num_classes=None):
    validate_split("soft_split_gini", s, target, num_classes, (1,), "a vector (n,)")
    return split_gini_triton(s, target, infer_classes(target, num_classes))[0]


def split_inputs(case, n: int | None = None, classes: int = 5, trees: int | None = None):
    """Soft assignments strictly inside (0, 1) and labels covering every class."""
    n = case.n if n is None else n
    shape = (n,) if trees is None else (trees, n)
    s = 0.02 + 0.96 * case.rand(*shape)
    target = case.randint(0, classes, n)
    target[: min(classes, n)] = torch.arange(min(classes, n), device=target.device)
    return {"s": s, "target": target}


def _split_bytes(inputs):
    s, y = inputs["s"], inputs["target"]
    read = s.numel() * s.element_size() + y.numel() * y.element_size()
    write = s.numel() * s.element_size()
    return {"forward": read, "backward": read + write, "full": read + write}


def _split_flops(inputs):
    n = inputs["s"].numel()
    return {"forward": 4 * n, "backward": 2 * n, "full": 6 * n}


def _hard_split(case, n):
    """s in {0, 1} with both children non-empty."""
    s = (case.rand(n) > 0.5).to(case.dtype)
    s[0], s[1] = 1.0, 0.0
    return s


SPLIT_EDGE_CASES = {
    "hard_split": lambda case: {"s": _hard_split(case, 300), "target": case.randint(0, 3, 300)},
    "one_class": lambda case: {"s": 0.1 + 0.8 * case.rand(77),
                               "target": torch.full((77,), 2, dtype=torch.int64,
                                                     device=case.device)},
    "tail_not_multiple_of_block": lambda case: split_inputs(case, 4097, 4),
    "many_classes": lambda case: split_inputs(case, 2000, 100),
    "one_sample": lambda case: {"s": torch.full((1,), 0.3, dtype=case.dtype, device=case.device),
                                "target": torch.zeros(1, dtype=torch.int64, device=case.device)},
}


# ---------------------------------------------------------------- registration
CITATION_GINI = ("Breiman, Friedman, Olshen & Stone, Classification and Regression Trees "
                 "(1984)")


@hookimpl
def register_losses(register):
    register(LossSpec(
        name="gini_impurity", family="decision_tree", title="Gini impurity",
        input_domains={"input": ("range", 0.0, 1.0)},
        formula=r"\frac{1}{n}\sum_{i=1}^{n}\Bigl(1-\sum_{k=1}^{C} p_{ik}^2\Bigr)",
        description="Gini impurity of rows of class probabilities (N, C), e.g. a node's "
                    "soft class distribution per sample. Entries must lie in [0, 1].",
        citation=CITATION_GINI, reference=gini_reference, make_inputs=rows_inputs,
        options={"reduction": "mean"}, check_options=reductions(), sizes=ROW_SIZES,
        x_name="rows", flops=_rows_flops(2, 1), edge_cases=ROW_EDGE_CASES))
    register(LossSpec(
        name="entropy_impurity", family="decision_tree", title="Entropy impurity",
        input_domains={"input": ("range", 0.0, 1.0)},
        formula=r"\frac{1}{n}\sum_{i=1}^{n}-\sum_{k=1}^{C} p_{ik}\log p_{ik},"
                r"\quad 0\log 0 = 0",
        description="Shannon entropy (nats) of rows of class probabilities (N, C). "
                    "Exact zeros are allowed: 0 log 0 = 0 and the gradient there is taken "
                    "as 0 (the term is constant by convention; the one-sided derivative "
                    "is +inf).",
        citation="Quinlan, Induction of decision trees, Machine Learning 1 (1986); "
                 "Shannon (1948)",
        reference=entropy_reference, make_inputs=rows_inputs, options={"reduction": "mean"},
        check_options=reductions(), sizes=ROW_SIZES, x_name="rows",
        flops=_rows_flops(3, 2), edge_cases=ENTROPY_EDGE_CASES))
    register(LossSpec(
        name="soft_split_gini", family="decision_tree", title="Soft-split Gini criterion",
        input_domains={"s": ("range", 0.0, 1.0), "target": ("index", None)},
        formula=r"w_L\,G(p_L)+w_R\,G(p_R),\quad G(p)=1-\sum_k p_k^2,\quad "
                r"p_L\propto\sum_i s_i e_{y_i},\ p_R\propto\sum_i (1-s_i) e_{y_i},\quad "
                r"w_L=\frac{1}{n}\sum_i s_i,\ w_R=1-w_L",
        description="Weighted Gini impurity of the two children of a soft split: s_i in "
                    "[0, 1] is the probability that sample i goes left, target its class. "
                    "A scalar (no per-sample loss, so no reduction); gradient w.r.t. s "
                    "only. An empty child (all s = 0 or all s = 1) contributes 0. "
                    "num_classes defaults to max(target) + 1 (one host sync); the Triton "
                    "histogram holds up to 256 classes. 16-bit s is computed in float32 "
                    "and the criterion and gradient rounded once, so bfloat16 is judged "
                    "at rtol 8e-3 (two unit roundoffs) and an absolute floor of 1e-5 (the "
                    "gradient elements are ~1/n): the default 2e-2 and 4e-3 would pass a "
                    "1% error.",
        tolerances={"bfloat16": (8e-3, 1e-5)},
        citation="Breiman et al. (1984); soft splits as in Irsoy, Yildiz & Alpaydin, Soft "
                 "decision trees, ICPR 2012",
        reference=soft_split_gini_reference, make_inputs=split_inputs,
        options={"num_classes": None}, check_options=[{"num_classes": 12}],
        grad_inputs=("s",), sizes=SPLIT_SIZES, bytes_moved=_split_bytes, flops=_split_flops,
        edge_cases=SPLIT_EDGE_CASES))


@hookimpl
def register_implementations(register):
    for name, fn in (("gini_impurity", gini_triton), ("entropy_impurity", entropy_triton)):
        register(name, Impl("triton", fn,
                            bytes_model=streamed("input"), backend="triton", devices=("cuda",),
                            grad_in_forward=True, requires=("triton",),
                            description="row-wise template: one read per row, gradient in "
                                        "the forward"))
    register("soft_split_gini", Impl(
        "triton", soft_split_gini_triton,
        bytes_model=streamed("s", fused=False), backend="triton", devices=("cuda",),
        requires=("triton",),
        description="histogram template: per-class left/right masses in one read of s and "
                    "y, float64 finish; backward one pass gathering dL/dH by class"))
