"""Decision tree, random forest, k-NN and naive Bayes losses: edge cases, validation and
the new templates, for every implementation (Triton under the interpreter on a CPU),
against float64 values computed here independently of the plugins' references.

The registry-wide contract (every loss's `check` passes) is tests/test_conformance.py.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from tolerances import assert_close64

import lossreg
from lossreg.kernels import HAVE_TRITON, interpreting
from lossreg.measure import cpu_peak_bytes
from lossreg.spec import Case

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


# ---------------------------------------------------------------- entropy: 0 log 0
@pytest.mark.parametrize("name, impl", impl_params("entropy_impurity"))
def test_entropy_exact_zeros_follow_0log0_with_zero_gradient(name, impl):
    g = gen(0)
    p = torch.softmax(torch.randn(300, 7, generator=g, dtype=F64), 1)
    p = p * (torch.rand(300, 7, generator=g) > 0.4)       # exact zeros...
    p[::5] = F.one_hot(torch.randint(0, 7, (60,), generator=g), 7).double()  # ...and pure rows
    p[p.sum(1) == 0, 0] = 1.0
    x = leaf(p.float())
    out = fn(name, impl)(x, reduction="sum")
    expected = torch.special.entr(p).sum()  # independent: entr(0) = 0
    assert_close64(out.cpu(), expected, torch.float32, "entropy")
    (grad,) = torch.autograd.grad(out, x)
    grad = grad.cpu().double()
    assert torch.isfinite(grad).all()
    assert (grad[p == 0] == 0).all()
    positive = p > 0
    assert_close64(grad[positive], -(torch.log(p[positive]) + 1.0), torch.float32, "grad")


# ---------------------------------------------------------------- nll: all ignored
@pytest.mark.parametrize("name, impl", impl_params("nll"))
@pytest.mark.parametrize("weighted", [False, True])
def test_nll_all_ignored_is_torch_nan_with_zero_gradient(name, impl, weighted):
    g = gen(1)
    x = leaf(torch.log_softmax(torch.randn(33, 5, generator=g), 1))
    target = torch.full((33,), -100, dtype=torch.int64, device=DEVICE)
    weight = (torch.rand(5, generator=g) + 0.5).to(DEVICE) if weighted else None
    for reduction in ("mean", "sum", "none"):
        out = fn(name, impl)(x, target, weight=weight, reduction=reduction)
        ref = F.nll_loss(x.detach(), target, weight=weight, reduction=reduction)
        if reduction == "mean":
            assert torch.isnan(out) and torch.isnan(ref)
        else:
            assert torch.equal(out.detach().cpu(), ref.cpu())
        (grad,) = torch.autograd.grad(out.sum() if reduction == "none" else out, x)
        assert torch.equal(grad.cpu(), torch.zeros(33, 5))


@pytest.mark.parametrize("name, impl", impl_params("nll"))
def test_nll_weights_and_ignore_index_match_float64_torch(name, impl):
    g = gen(2)
    x64 = torch.log_softmax(torch.randn(257, 11, generator=g, dtype=F64), 1)
    target = torch.randint(0, 11, (257,), generator=g)
    target[::4] = 3  # ignore_index inside the class range, as torch allows
    weight = torch.rand(11, generator=g, dtype=F64) + 0.2
    x = leaf(x64.float())
    out = fn(name, impl)(x, target.to(DEVICE), weight=weight.float().to(DEVICE),
                         ignore_index=3)
    ref64 = x64.clone().requires_grad_(True)
    ref = F.nll_loss(ref64, target, weight=weight, ignore_index=3)
    assert_close64(out.cpu(), ref, torch.float32, "nll")
    cot = torch.tensor(1.7)
    (grad,) = torch.autograd.grad(out, x, cot.to(DEVICE))
    (grad64,) = torch.autograd.grad(ref, ref64, cot.double())
    assert_close64(grad.cpu(), grad64, torch.float32, "grad")


# ---------------------------------------------------------------- batch-hard ties
def brute_force_batch_hard(x, target, margin=1.0, pick=min):
    """Per anchor, in float64, by loops: the farthest positive and nearest negative by
    distances of differences; ties go to ``pick`` of the tied indices."""
    x = x.double()
    losses, pairs = [], []
    for a in range(len(x)):
        d = torch.sqrt(((x - x[a]) ** 2).sum(1) + 1e-12)
        pos = [j for j in range(len(x)) if j != a and target[j] == target[a]]
        neg = [j for j in range(len(x)) if target[j] != target[a]]
        dp = max(d[j] for j in pos)
        dn = min(d[j] for j in neg)
        p = pick(j for j in pos if d[j] == dp)
        n = pick(j for j in neg if d[j] == dn)
        pairs.append((p, n))
        losses.append(max(0.0, margin + float(dp) - float(dn)))
    return torch.tensor(losses, dtype=F64), pairs


def tied_batch():
    from lossreg_plugins.knn import BATCH_EDGE_CASES

    return BATCH_EDGE_CASES["ties"](Case(1, torch.float32, seed=5))


def test_tied_batch_really_has_ties_that_matter():
    inputs = tied_batch()
    _, first = brute_force_batch_hard(inputs["input"], inputs["target"], pick=min)
    _, last = brute_force_batch_hard(inputs["input"], inputs["target"], pick=max)
    assert sum(f != lst for f, lst in zip(first, last)) > len(first) // 2


@pytest.mark.parametrize("name, impl", impl_params("batch_hard_triplet"))
def test_batch_hard_ties_break_to_the_lowest_index(name, impl):
    inputs = tied_batch()
    x, target = leaf(inputs["input"]), inputs["target"].to(DEVICE)
    out = fn(name, impl)(x, target, reduction="none")
    expected, pairs = brute_force_batch_hard(inputs["input"], inputs["target"])
    assert (expected > 0).all()
    assert_close64(out.cpu(), expected, torch.float32, "loss")
    # the gradient flows through the lowest-index tied pair only
    (grad,) = torch.autograd.grad(out.sum(), x)
    x64 = inputs["input"].double()
    grad64 = torch.zeros_like(x64)
    for a, (p, n) in enumerate(pairs):
        u_p = (x64[a] - x64[p]) / torch.sqrt(((x64[a] - x64[p]) ** 2).sum() + 1e-12)
        u_n = (x64[a] - x64[n]) / torch.sqrt(((x64[a] - x64[n]) ** 2).sum() + 1e-12)
        grad64[a] += u_p - u_n
        grad64[p] -= u_p
        grad64[n] += u_n
    assert_close64(grad.cpu(), grad64, torch.float32, "grad")


@pytest.mark.parametrize("name, impl", impl_params("batch_hard_triplet"))
@pytest.mark.parametrize("B, D", [(67, 33), (130, 128)])
def test_batch_hard_sizes_off_the_tile_match_brute_force(name, impl, B, D):
    from lossreg_plugins.knn import batch_inputs

    inputs = batch_inputs(Case(B, torch.float32, seed=B), B, D)
    x, target = leaf(inputs["input"]), inputs["target"].to(DEVICE)
    out = fn(name, impl)(x, target, margin=0.5, reduction="none")
    expected, _ = brute_force_batch_hard(inputs["input"], inputs["target"], margin=0.5)
    assert 0 < int((expected > 0).sum()) < B  # some anchors inside the margin, some not
    assert_close64(out.cpu(), expected, torch.float32, "loss")


def test_chunked_batch_hard_memory_is_a_fraction_of_the_reference(monkeypatch):
    from lossreg_plugins import knn

    monkeypatch.setattr(knn, "CHUNK", 128)
    inputs = knn.batch_inputs(Case(2048, torch.float32, seed=3), 2048, 32)

    def full(f):
        x = inputs["input"].clone().requires_grad_(True)
        return lambda: torch.autograd.grad(f(x, inputs["target"]), x)

    ref_peak = cpu_peak_bytes(full(knn.batch_hard_reference))
    chunked_peak = cpu_peak_bytes(full(knn.batch_hard_chunked))
    assert chunked_peak < 0.25 * ref_peak, (chunked_peak, ref_peak)
    x = inputs["input"].clone().requires_grad_(True)
    x64 = inputs["input"].double().requires_grad_(True)
    (g,) = torch.autograd.grad(knn.batch_hard_chunked(x, inputs["target"]), x)
    (g64,) = torch.autograd.grad(knn.batch_hard_reference(x64, inputs["target"]), x64)
    assert_close64(g, g64, torch.float32, "grad")


# ---------------------------------------------------------------- soft splits vs CART
def cart_gini(counts):
    n = counts.sum()
    return 1.0 - ((counts / n) ** 2).sum() if n > 0 else torch.tensor(0.0, dtype=F64)


@pytest.mark.parametrize("name, impl", impl_params("soft_split_gini"))
@pytest.mark.parametrize("n, classes", [(1023, 3), (4097, 37)])
def test_hard_split_gini_is_carts_weighted_gini(name, impl, n, classes):
    g = gen(n)
    y = torch.randint(0, classes, (n,), generator=g)
    s = (torch.rand(n, generator=g) > 0.3).float()
    out = fn(name, impl)(s.to(DEVICE), y.to(DEVICE))
    left = torch.bincount(y[s == 1], minlength=classes).double()
    right = torch.bincount(y[s == 0], minlength=classes).double()
    expected = (left.sum() * cart_gini(left) + right.sum() * cart_gini(right)) / n
    assert_close64(out.cpu(), expected, torch.float32, "gini")


@pytest.mark.parametrize("name, impl", impl_params("soft_split_gini", "forest_gini"))
def test_soft_split_gradient_matches_finite_differences_of_float64(name, impl):
    g = gen(3)
    n, classes = 600, 6
    trees = 3 if name == "forest_gini" else None
    shape = (n,) if trees is None else (trees, n)
    s64 = 0.05 + 0.9 * torch.rand(*shape, generator=g, dtype=F64)
    y = torch.randint(0, classes, (n,), generator=g)
    s = leaf(s64.float())
    (grad,) = torch.autograd.grad(fn(name, impl)(s, y.to(DEVICE)), s)
    # central differences of an independent float64 evaluation (counts by bincount)

    def criterion(v):
        rows = v.reshape(-1, n)
        total = 0.0
        for row in rows:
            left = torch.bincount(y, weights=row, minlength=classes)
            right = torch.bincount(y, weights=1 - row, minlength=classes)
            total += float((left.sum() * cart_gini(left) + right.sum() * cart_gini(right)) / n)
        return total / len(rows)

    flat = s64.reshape(-1)
    for i in torch.randint(0, flat.numel(), (5,), generator=g).tolist():
        h = 1e-6
        up, down = flat.clone(), flat.clone()
        up[i] += h
        down[i] -= h
        fd = (criterion(up.reshape(shape)) - criterion(down.reshape(shape))) / (2 * h)
        got = float(grad.reshape(-1)[i])
        assert abs(got - fd) <= 1e-4 * max(abs(fd), 1e-3), (i, got, fd)


@pytest.mark.parametrize("name, impl", impl_params("split_variance"))
@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_hard_split_variance_is_within_child_variance(name, impl, offset):
    g = gen(4)
    n = 5001
    s = (torch.rand(n, generator=g) > 0.5).float()
    y64 = offset + torch.randn(n, generator=g, dtype=F64) + 3.0 * s.double()
    y = y64.float()
    out = fn(name, impl)(s.to(DEVICE), y.to(DEVICE))
    yd = y.double()  # the float32 targets, exactly
    left, right = yd[s == 1], yd[s == 0]
    expected = (left.var(unbiased=False) * len(left) + right.var(unbiased=False) * len(right)) / n
    assert_close64(out.cpu(), expected, torch.float32, "variance")


@pytest.mark.parametrize("name, impl", impl_params("forest_gini"))
def test_forest_is_the_mean_of_its_trees(name, impl):
    g = gen(5)
    trees, n = 300, 50  # more trees than the kernel's program budget per launch
    s = 0.05 + 0.9 * torch.rand(trees, n, generator=g)
    y = torch.randint(0, 4, (n,), generator=g)
    out = fn(name, impl)(s.to(DEVICE), y.to(DEVICE), reduction="none")
    single = fn("soft_split_gini", "reference")
    expected = torch.stack([single(row.double(), y) for row in s])
    assert out.shape == (trees,)
    assert_close64(out.cpu(), expected, torch.float32, "per tree")


# ---------------------------------------------------------------- rows off the tile
@pytest.mark.parametrize("name, impl", impl_params("gini_impurity", "entropy_impurity"))
@pytest.mark.parametrize("rows, classes", [(257, 16), (3, 1000), (4099, 3)])
def test_impurity_rows_off_the_tile(name, impl, rows, classes):
    g = gen(rows)
    p64 = torch.softmax(torch.randn(rows, classes, generator=g, dtype=F64) * 2, 1)
    x = leaf(p64.float())
    out = fn(name, impl)(x, reduction="none")
    p = p64.float().double()
    expected = 1 - (p * p).sum(1) if name == "gini_impurity" else torch.special.entr(p).sum(1)
    assert_close64(out.cpu(), expected, torch.float32, name)
    cot = torch.rand(rows, generator=g) + 0.5
    (grad,) = torch.autograd.grad(out, x, cot.to(DEVICE))
    dp = -2 * p if name == "gini_impurity" else -(torch.log(p) + 1)
    assert_close64(grad.cpu(), dp * cot.double()[:, None], torch.float32, "grad")


@pytest.mark.parametrize("name, impl", impl_params("cosine_embedding"))
@pytest.mark.parametrize("N, D", [(33, 64), (5, 1000), (70, 17)])
def test_cosine_embedding_matches_float64_torch(name, impl, N, D):
    g = gen(N * D)
    a64 = torch.randn(N, D, generator=g, dtype=F64)
    b64 = 0.5 * a64 + torch.randn(N, D, generator=g, dtype=F64)
    y = torch.where(torch.rand(N, generator=g) > 0.5, 1, -1)
    a, b = leaf(a64.float()), leaf(b64.float())
    out = fn(name, impl)(a, b, y.to(DEVICE), margin=0.1, reduction="sum")
    ra, rb = a64.float().double().requires_grad_(), b64.float().double().requires_grad_()
    ref = F.cosine_embedding_loss(ra, rb, y, margin=0.1, reduction="sum")
    assert_close64(out.cpu(), ref, torch.float32, "loss")
    ga, gb = torch.autograd.grad(out, (a, b))
    rga, rgb = torch.autograd.grad(ref, (ra, rb))
    assert_close64(ga.cpu(), rga, torch.float32, "grad input1")
    assert_close64(gb.cpu(), rgb, torch.float32, "grad input2")


@pytest.mark.parametrize("name, impl", impl_params("triplet"))
@pytest.mark.parametrize("options", [{}, {"p": 1.0, "swap": True}, {"p": 3.0},
                                     {"distance": "cosine", "swap": True, "margin": 0.03}])
def test_triplet_matches_float64_torch(name, impl, options):
    g = gen(6)
    N, D = 37, 65
    a64 = torch.randn(N, D, generator=g, dtype=F64)
    p64 = a64 + 0.5 * torch.randn(N, D, generator=g, dtype=F64)
    n64 = a64 + 0.6 * torch.randn(N, D, generator=g, dtype=F64)
    leaves = [leaf(t.float()) for t in (a64, p64, n64)]
    out = fn(name, impl)(*leaves, reduction="none", **options)
    refs = [t.float().double().requires_grad_() for t in (a64, p64, n64)]
    if options.get("distance") == "cosine":
        ref = F.triplet_margin_with_distance_loss(
            *refs, margin=options["margin"], swap=True, reduction="none",
            distance_function=lambda x, y: 1 - F.cosine_similarity(x, y, dim=-1))
    else:
        ref = F.triplet_margin_loss(*refs, p=options.get("p", 2.0),
                                    swap=options.get("swap", False), reduction="none")
    assert 0 < int((ref > 0).sum()) < N
    assert_close64(out.cpu(), ref, torch.float32, "loss")
    cot = torch.rand(N, generator=g, dtype=F64) + 0.5
    grads = torch.autograd.grad(out, leaves, cot.float().to(DEVICE))
    grads64 = torch.autograd.grad(ref, refs, cot)
    for got, want in zip(grads, grads64):
        assert_close64(got.cpu(), want, torch.float32, "grad")


@pytest.mark.parametrize("name, impl", impl_params("gaussian_nll"))
@pytest.mark.parametrize("var_shape", [(41, 3), (41, 1), (41,)])
def test_gaussian_nll_broadcasts_var_and_clamps_like_torch(name, impl, var_shape):
    g = gen(7)
    mu64 = torch.randn(41, 3, generator=g, dtype=F64)
    y64 = mu64 + torch.randn(41, 3, generator=g, dtype=F64)
    var64 = torch.rand(*var_shape, generator=g, dtype=F64) * 2
    var64.view(-1)[::4] = 1e-7  # below eps: clamped, gradient taken at eps as torch does
    mu, var = leaf(mu64.float()), leaf(var64.float())
    out = fn(name, impl)(mu, y64.float().to(DEVICE), var, full=True)
    rmu, rvar = mu64.float().double().requires_grad_(), var64.float().double().requires_grad_()
    ref = F.gaussian_nll_loss(rmu, y64.float().double(), rvar, full=True)
    assert_close64(out.cpu(), ref, torch.float32, "loss")
    gm, gv = torch.autograd.grad(out, (mu, var))
    rgm, rgv = torch.autograd.grad(ref, (rmu, rvar))
    assert_close64(gm.cpu(), rgm, torch.float32, "grad input")
    assert_close64(gv.cpu(), rgv, torch.float32, "grad var")


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


@pytest.mark.parametrize("name, impl, case", VALIDATION_PARAMS)
def test_every_implementation_rejects_bad_input_alike(name, impl, case):
    make, error, message = VALIDATION[name][case]
    with pytest.raises(error, match=message):
        fn(name, impl)(**make())


# ---------------------------------------------------------------- the new templates
@pytest.mark.skipif(not TRITON_OK, reason="needs triton (interpreter on CPU)")
def test_pairwise_template_min_argmin_and_logsumexp_channels():
    """The API later losses use: WCSS (min + argmin against centroids) and InfoNCE
    (online logsumexp over column tiles, a sum channel for the diagonal)."""
    from lossreg.kernels import jit, tl
    from lossreg.kernels.pairwise import pairwise_reduction

    @jit
    def nearest(dot, sq_r, sq_c, lab_r, lab_c, row, col, p0, p1):
        d2 = sq_r + sq_c - 2.0 * dot
        return d2, d2

    @jit
    def scaled_cosine(dot, sq_r, sq_c, lab_r, lab_c, row, col, p0, p1):
        cos = dot / tl.sqrt(sq_r * sq_c) / p0
        return cos, tl.where(row == col, cos, 0.0)

    g = gen(10)
    x = torch.randn(70, 40, generator=g)
    mu = torch.randn(67, 40, generator=g)
    [(dmin, arg)] = pairwise_reduction(nearest, ("min",), "test_wcss")(x.to(DEVICE),
                                                                       mu.to(DEVICE))
    d2 = torch.cdist(x.double(), mu.double()) ** 2
    assert torch.equal(arg.cpu(), d2.argmin(1))
    assert_close64(dmin.cpu(), d2.min(1).values, torch.float32, "min")
    (lse, _), (diag, _) = pairwise_reduction(scaled_cosine, ("logsumexp", "sum"), "test_nce")(
        x.to(DEVICE), p0=0.07)
    sim = F.normalize(x.double(), dim=1) @ F.normalize(x.double(), dim=1).T / 0.07
    assert_close64(lse.cpu(), sim.logsumexp(1), torch.float32, "logsumexp")
    assert_close64(diag.cpu(), sim.diag(), torch.float32, "diagonal")


@pytest.mark.skipif(not TRITON_OK, reason="needs triton (interpreter on CPU)")
def test_histogram_template_rejects_too_many_bins():
    from lossreg_plugins.decision_tree import split_gini_triton

    from lossreg.kernels.histogram import MAX_BINS

    s = torch.rand(1, 10, device=DEVICE)
    y = torch.arange(10, device=DEVICE)
    with pytest.raises(ValueError, match=f"holds 1 to {MAX_BINS} bins"):
        split_gini_triton(s, y, MAX_BINS + 1)


def test_every_catalog_loss_is_registered_with_its_family():
    families = {"gini_impurity": "decision_tree", "entropy_impurity": "decision_tree",
                "soft_split_gini": "decision_tree", "forest_gini": "random_forest",
                "split_variance": "random_forest", "cosine_embedding": "knn",
                "triplet": "knn", "batch_hard_triplet": "knn", "nll": "naive_bayes",
                "gaussian_nll": "naive_bayes"}
    for name, family in families.items():
        spec = lossreg.get(name)
        assert spec.family == family and spec.citation and spec.formula
        assert "triton" in spec.implementations
    for name in ("cosine_embedding", "triplet", "nll", "gaussian_nll"):
        assert lossreg.get(name).implementations["torch"].kind == "baseline"
    assert lossreg.get("batch_hard_triplet").implementations["chunked"].devices == ("cpu",
                                                                                    "cuda")
    assert math.isclose(lossreg.get("triplet").options["eps"], 1e-6)
