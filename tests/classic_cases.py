"""Shared pieces of the classic plugins' tests (logistic regression, SVM, GBM, AdaBoost):
seeded inputs, a float64 comparison that also pins inf positions, independent float64
formulas, and one bad input per kind of mistake.
"""

import math
import torch
import torch.nn.functional as F
from family_helpers import DEVICE, TOL, rand, randn


def gen(seed):
    return torch.Generator().manual_seed(seed)


def pm1(g, *shape, dtype=torch.float32):
    return (torch.randint(0, 2, shape, generator=g) * 2 - 1).to(dtype).to(DEVICE)


def assert_close(out, expected, dtype, what=""):
    """Same non-finite entries, then rel (norm) or max-abs error within the dtype's
    tolerance; NaN never passes."""
    out, expected = out.detach().double().cpu(), expected.detach().double().cpu()
    assert out.shape == expected.shape, f"{what}: shape {out.shape} vs {expected.shape}"
    assert not out.isnan().any(), f"{what}: NaN"
    assert torch.equal(torch.isinf(out), torch.isinf(expected)), f"{what}: inf positions differ"
    assert torch.equal(out[out.isinf()], expected[expected.isinf()]), f"{what}: inf signs"
    fin = torch.isfinite(expected)
    if not fin.any():
        return
    diff = (out[fin] - expected[fin]).abs()
    norm = float(expected[fin].norm())
    rel = float(diff.norm()) / norm if norm > 0 else float(diff.max())
    rtol, atol = TOL[dtype]
    assert rel <= rtol or float(diff.max()) <= atol, f"{what}: rel {rel:.3g}, max {diff.max():.3g}"


def reduce(loss, reduction):
    return loss if reduction == "none" else (loss.mean() if reduction == "mean" else loss.sum())


def leaf(t):
    return t.detach().clone().requires_grad_(True)


# ---------------------------------------------------------------- bce_with_logits
def bcel_expected(z, y, pos_weight, weight, reduction):
    """-(p y log sigma(z) + (1-y) log sigma(-z)) via logsigmoid, in float64."""
    p = 1.0 if pos_weight is None else pos_weight.double()
    loss = -(p * y * F.logsigmoid(z) + (1 - y) * F.logsigmoid(-z))
    return reduce(loss if weight is None else loss * weight.double(), reduction)


# ---------------------------------------------------------------- bce
def bce_expected(p, y):
    """Per element, with Python's math.log and torch's clamp at -100."""
    def clog(v):
        return -100.0 if v <= 0 else max(math.log(v), -100.0)
    return torch.tensor([-(b * clog(a) + (1 - b) * clog(1 - a))
                         for a, b in zip(p.double().tolist(), y.double().tolist())],
                        dtype=torch.float64)


# ---------------------------------------------------------------- row-wise losses
def multiclass_hinge_expected(s, t, margin, p, weight):
    """Per-row loop over the classes (float64)."""
    rows = []
    for i in range(s.shape[0]):
        y = int(t[i])
        terms = [torch.clamp(margin - s[i, y] + s[i, j], min=0) ** p
                 for j in range(s.shape[1]) if j != y]
        row = torch.stack(terms).sum() / s.shape[1]
        rows.append(row if weight is None else row * weight[y])
    return torch.stack(rows)


def samme_expected(s, t):
    """exp(-(K f_y - sum_k f_k) / (K (K - 1))): c.f rewritten through the row sum."""
    k = s.shape[1]
    f_y = s.gather(1, t[:, None]).squeeze(1)
    return torch.exp(-(k * f_y - s.sum(dim=1)) / (k * (k - 1)))


ROW_SHAPES = [(37, 7), (101, 13), (257, 10), (5, 3), (3, 1000)]


# ---------------------------------------------------------------- validation
def _v(g, *shape):
    return randn(g, *shape)


def bad_inputs():
    """(loss, kwargs, exception, message regex): one per kind of bad input."""
    g = gen(17)
    f, y = _v(g, 50), pm1(g, 50)
    p, q = rand(g, 50) * 0.9 + 0.05, rand(g, 50)
    s, t = _v(g, 20, 7), torch.randint(0, 7, (20,), generator=g).to(DEVICE)
    t[0] = 0
    y_bad = y.clone()
    y_bad[3] = 0.5
    return [
        ("hinge", {"input": f, "target": y_bad}, ValueError,
         r"hinge: target must hold only labels in \{-1, \+1\}, got 0\.5"),
        ("squared_hinge", {"input": f, "target": y * 2}, ValueError, r"labels in \{-1, \+1\}"),
        ("hinge", {"input": f, "target": y[:49]}, ValueError, "same shape"),
        ("hinge", {"input": f, "target": y, "reduction": "avg"}, ValueError,
         r"hinge: reduction must be one of \('mean', 'sum', 'none'\), got 'avg'"),
        ("exponential", {"input": f, "target": torch.zeros_like(y)}, ValueError,
         r"exponential: target must hold only labels in \{-1, \+1\}, got 0\.0 \(and 49 more\)"),
        ("margin_ranking", {"input1": f, "input2": f.flip(0), "target": y_bad}, ValueError,
         "margin_ranking: target must hold only labels"),
        ("margin_ranking", {"input1": f, "input2": f[:10], "target": y}, ValueError,
         "same shape"),
        ("bce", {"input": p + 1.0, "target": q}, ValueError,
         r"bce: input \(probabilities\) must lie in \[0, 1\]"),
        ("bce", {"input": p, "target": q - 2.0}, ValueError, r"bce: target must lie in \[0, 1\]"),
        ("bce", {"input": p, "target": q, "weight": rand(g, 3)}, ValueError,
         r"weight of shape \(3,\) must broadcast"),
        ("bce_with_logits", {"input": f, "target": q + 1.5}, ValueError,
         r"bce_with_logits: target must lie in \[0, 1\]"),
        ("bce_with_logits", {"input": f, "target": q, "pos_weight": -1.0}, ValueError,
         r"pos_weight must lie in \[0, inf\]"),
        ("multiclass_hinge", {"input": s, "target": torch.full_like(t, 7)}, ValueError,
         r"multiclass_hinge: target must hold class indices in \[0, 6\], got 7"),
        ("multiclass_hinge", {"input": s, "target": t.float()}, TypeError,
         "integer class indices"),
        ("multiclass_hinge", {"input": s, "target": t[:5]}, ValueError, r"shape \(20,\)"),
        ("multiclass_hinge", {"input": s, "target": t, "p": 3}, ValueError,
         r"p must be one of \(1, 2\), got 3"),
        ("multiclass_hinge", {"input": s, "target": t, "weight": rand(g, 6)}, ValueError,
         "one entry per class"),
        ("samme", {"input": s, "target": t - 1}, ValueError,
         r"samme: target must hold class indices in \[0, 6\], got -1"),
        ("samme", {"input": s[:, :1], "target": torch.zeros_like(t)}, ValueError, "K >= 2"),
        ("mae", {"input": f, "target": f[:7]}, ValueError, "same shape"),
        ("huber", {"input": f, "target": q, "delta": 0.0}, ValueError,
         r"huber: delta must lie in \(0, inf\), got 0\.0"),
        ("quantile", {"input": f, "target": q, "tau": 1.5}, ValueError,
         r"quantile: tau must lie in \(0, 1\), got 1\.5"),
        ("quantile", {"input": f, "target": q, "reduction": None}, ValueError,
         "reduction must be one of"),
    ]


BAD = bad_inputs()
