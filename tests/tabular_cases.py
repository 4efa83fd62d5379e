"""Shared pieces of the decision_tree, random_forest, knn and naive_bayes plugins' tests:
which implementations run, seeded inputs, float64 leaves, and one bad input per kind
of mistake for each loss.
"""

import pytest
import torch
import lossreg
from lossreg.kernels import HAVE_TRITON, interpreting


TRITON_OK = HAVE_TRITON and (interpreting() or torch.cuda.is_available())


DEVICE = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"


F64 = torch.float64


def impls(name):
    """Every runnable implementation of a loss except torch.compile (slow to build)."""
    out = []
    for impl in lossreg.get(name).implementations.values():
        if impl.backend == "compile" or impl.missing_requirements():
            continue
        if impl.backend == "triton" and not TRITON_OK:
            continue
        out.append(impl)
    return out


def impl_params(*names):
    return [pytest.param(n, i.name, id=f"{n}-{i.name}") for n in names for i in impls(n)]


def fn(name, impl):
    return lossreg.get(name).implementations[impl].fn


def gen(seed):
    return torch.Generator().manual_seed(seed)


def rel_err(out, ref):
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    return float((out - ref).norm() / ref.norm())


def leaf(t):
    return t.detach().clone().to(DEVICE).requires_grad_(True)


# ---------------------------------------------------------------- soft splits vs CART
def cart_gini(counts):
    n = counts.sum()
    return 1.0 - ((counts / n) ** 2).sum() if n > 0 else torch.tensor(0.0, dtype=F64)


# ---------------------------------------------------------------- validation
def _rows(*shape):
    return torch.softmax(torch.randn(*shape, generator=gen(9)), -1).to(DEVICE)


def _labels(*values):
    return torch.tensor(values, device=DEVICE)


VALIDATION = {
    "gini_impurity": [
        (lambda: {"input": _rows(10)}, ValueError, r"gini_impurity: input must be a matrix"),
        (lambda: {"input": _rows(4, 3) * 2}, ValueError,
         r"gini_impurity: input must lie in \[0, 1\] \(class probabilities\)"),
        (lambda: {"input": _rows(4, 3), "reduction": "avg"}, ValueError,
         r"gini_impurity: reduction must be one of"),
        (lambda: {"input": torch.ones(3, 2, dtype=torch.int64)}, TypeError,
         r"gini_impurity: input must be a floating-point tensor"),
    ],
    "entropy_impurity": [
        (lambda: {"input": -_rows(4, 3)}, ValueError, r"entropy_impurity: input must lie in"),
        (lambda: {"input": _rows(2, 3, 4)}, ValueError, r"entropy_impurity: input must be a"),
    ],
    "soft_split_gini": [
        (lambda: {"s": torch.full((4,), 1.5, device=DEVICE), "target": _labels(0, 1, 0, 1)},
         ValueError, r"soft_split_gini: s must lie in \[0, 1\] \(the probability of going"),
        (lambda: {"s": torch.rand(4, device=DEVICE), "target": _labels(0.0, 1.0, 0.0, 1.0)},
         TypeError, r"soft_split_gini: target must hold integer class indices"),
        (lambda: {"s": torch.rand(4, device=DEVICE), "target": _labels(0, 1)}, ValueError,
         r"soft_split_gini: target must have shape \(4,\)"),
        (lambda: {"s": torch.rand(4, device=DEVICE), "target": _labels(0, 1, 2, 3),
                  "num_classes": 3}, ValueError,
         r"soft_split_gini: target must hold class indices in \[0, 2\], got 3"),
        (lambda: {"s": torch.rand(2, 4, device=DEVICE), "target": _labels(0, 1, 0, 1)},
         ValueError, r"soft_split_gini: s must be a vector \(n,\)"),
        (lambda: {"s": torch.rand(0, device=DEVICE), "target": _labels(0)[:0]}, ValueError,
         r"soft_split_gini: s must not be empty"),
    ],
    "forest_gini": [
        (lambda: {"s": torch.rand(4, device=DEVICE), "target": _labels(0, 1, 0, 1)},
         ValueError, r"forest_gini: s must be a matrix \(T, n\)"),
        (lambda: {"s": torch.rand(2, 4, device=DEVICE), "target": _labels(0, -1, 0, 1)},
         ValueError, r"forest_gini: target must hold class indices >= 0, got -1"),
        (lambda: {"s": torch.rand(2, 4, device=DEVICE), "target": _labels(0, 1, 0, 1),
                  "num_classes": 0}, ValueError, r"forest_gini: num_classes must be >= 1"),
    ],
    "split_variance": [
        (lambda: {"s": torch.rand(4, device=DEVICE),
                  "target": torch.rand(4, dtype=F64, device=DEVICE)}, TypeError,
         r"split_variance: expected inputs of one floating dtype"),
        (lambda: {"s": torch.rand(4, device=DEVICE), "target": torch.rand(5, device=DEVICE)},
         ValueError, r"split_variance: target must have shape \(4,\)"),
    ],
    "cosine_embedding": [
        (lambda: {"input1": torch.randn(3, 4, device=DEVICE),
                  "input2": torch.randn(3, 4, device=DEVICE), "target": _labels(1, 0, -1)},
         ValueError, r"cosine_embedding: target must hold only labels in \{-1, \+1\}, got 0"),
        (lambda: {"input1": torch.randn(3, 4, device=DEVICE),
                  "input2": torch.randn(3, 5, device=DEVICE), "target": _labels(1, 1, -1)},
         ValueError, r"cosine_embedding: input2 must have shape \(3, 4\)"),
        (lambda: {"input1": torch.randn(3, 4, device=DEVICE),
                  "input2": torch.randn(3, 4, device=DEVICE), "target": _labels(1, 1, -1),
                  "margin": 2.0}, ValueError, r"cosine_embedding: margin must lie in \[-1, 1\]"),
    ],
    "triplet": [
        (lambda: {"anchor": torch.randn(3, 4, device=DEVICE),
                  "positive": torch.randn(3, 4, device=DEVICE),
                  "negative": torch.randn(3, 4, device=DEVICE), "p": 0.5}, ValueError,
         r"triplet: p must lie in \[1, inf\], got 0.5"),
        (lambda: {"anchor": torch.randn(3, 4, device=DEVICE),
                  "positive": torch.randn(3, 4, device=DEVICE),
                  "negative": torch.randn(3, 4, device=DEVICE), "margin": 0.0}, ValueError,
         r"triplet: margin must lie in \(0, inf\]"),
        (lambda: {"anchor": torch.randn(3, 4, device=DEVICE),
                  "positive": torch.randn(3, 4, device=DEVICE),
                  "negative": torch.randn(3, 4, device=DEVICE), "distance": "manhattan"},
         ValueError, r"triplet: distance must be one of \('euclidean', 'cosine'\)"),
        (lambda: {"anchor": torch.randn(3, 4, device=DEVICE),
                  "positive": torch.randn(3, 4, device=DEVICE),
                  "negative": torch.randn(3, 4, device=DEVICE), "swap": 1}, TypeError,
         r"triplet: swap must be a bool"),
        (lambda: {"anchor": torch.randn(4, device=DEVICE),
                  "positive": torch.randn(4, device=DEVICE),
                  "negative": torch.randn(4, device=DEVICE)}, ValueError,
         r"triplet: anchor must be a matrix \(N, D\)"),
    ],
    "batch_hard_triplet": [
        (lambda: {"input": torch.randn(4, 8, device=DEVICE), "target": _labels(0, 0, 0, 0)},
         ValueError, r"batch_hard_triplet: target must hold at least two classes"),
        (lambda: {"input": torch.randn(5, 8, device=DEVICE),
                  "target": _labels(0, 0, 1, 1, 7)}, ValueError,
         r"batch_hard_triplet: target must give every class at least two members .* class 7"),
        (lambda: {"input": torch.randn(4, 8, device=DEVICE), "target": _labels(0, 1, 0)},
         ValueError, r"batch_hard_triplet: target must have shape \(4,\)"),
        (lambda: {"input": torch.randn(4, 8, device=DEVICE), "target": _labels(0, 1, 0, 1),
                  "margin": -1.0}, ValueError, r"batch_hard_triplet: margin must lie in \[0,"),
    ],
    "nll": [
        (lambda: {"input": _rows(3, 4).log(), "target": _labels(0, 4, 1)}, ValueError,
         r"nll: target must hold class indices in \[0, 3\] or ignore_index=-100, got 4"),
        (lambda: {"input": _rows(3, 4).log(), "target": _labels(0, 1, 1),
                  "weight": torch.ones(3, device=DEVICE)}, ValueError,
         r"nll: weight must have shape \(4,\)"),
        (lambda: {"input": _rows(3, 4).log(), "target": _labels(0.0, 1.0, 1.0)}, TypeError,
         r"nll: target must hold integer class indices"),
    ],
    "gaussian_nll": [
        (lambda: {"input": torch.randn(5, 2, device=DEVICE),
                  "target": torch.randn(5, 2, device=DEVICE),
                  "var": -torch.rand(5, 2, device=DEVICE)}, ValueError,
         r"gaussian_nll: var must be non-negative"),
        (lambda: {"input": torch.randn(5, 2, device=DEVICE),
                  "target": torch.randn(5, 2, device=DEVICE),
                  "var": torch.rand(5, 3, device=DEVICE)}, ValueError,
         r"gaussian_nll: var must have input's shape \(5, 2\)"),
        (lambda: {"input": torch.randn(5, 2, device=DEVICE),
                  "target": torch.randn(5, 2, device=DEVICE),
                  "var": torch.rand(5, 2, device=DEVICE), "eps": 0.0}, ValueError,
         r"gaussian_nll: eps must lie in \(0, inf\]"),
    ],
}


VALIDATION_PARAMS = [
    pytest.param(name, impl.name, i, id=f"{name}-{impl.name}-{i}")
    for name, cases in VALIDATION.items() for impl in impls(name) for i in range(len(cases))
]
