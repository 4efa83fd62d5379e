"""Stability and validation of the classic families (logistic regression, SVM, GBM,
AdaBoost), for every implementation of each loss, Triton included (under the
interpreter on CPU). The generic contract over all losses lives in test_conformance.

Expected values come from float64 formulas written here independently of the plugins'
references (log-sigmoid instead of the stable max/log1p form, per-row loops, ...).
"""

import math
import zlib

import pytest
import torch
import torch.nn.functional as F

import lossreg

from family_helpers import DEVICE, TOL, implementations, rand, randn  # noqa: F401


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


@pytest.mark.parametrize("name,impl", implementations("bce_with_logits"))
@pytest.mark.parametrize("pos_weight", [None, "float", "per_class"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_bce_with_logits_is_exact_at_extreme_logits(name, impl, pos_weight, reduction):
    g = gen(zlib.crc32(f"{impl.name}-{pos_weight}-{reduction}".encode()))
    z = randn(g, 67, 11, scale=3.0)
    z[::2, ::3] = 1e4
    z[1::2, 1::3] = -1e4
    y = rand(g, 67, 11)
    y[::3] = (y[::3] > 0.5).float()
    pw = {None: None, "float": 2.5, "per_class": rand(g, 11) * 3 + 0.1}[pos_weight]
    weight = rand(g, 11) + 0.5 if pos_weight == "per_class" else None
    zl, yl = leaf(z), leaf(y)
    out = impl.fn(input=zl, target=yl, weight=weight, pos_weight=pw, reduction=reduction)
    assert torch.isfinite(out).all()

    pw64 = None if pw is None else torch.as_tensor(pw, dtype=torch.float64, device=DEVICE)
    z64, y64 = leaf(z.double()), leaf(y.double())
    expected = bcel_expected(z64, y64, pw64, weight, reduction)
    assert_close(out, expected, torch.float32, "loss")
    cot = rand(g, *out.shape) + 0.5
    gz, gy = torch.autograd.grad(out, (zl, yl), cot)
    ez, ey = torch.autograd.grad(expected, (z64, y64), cot.double())
    assert torch.isfinite(gz).all() and torch.isfinite(gy).all()
    assert_close(gz, ez, torch.float32, "grad z")
    assert_close(gy, ey, torch.float32, "grad y")
    # saturated: sigma(+-1e4) is 1 or 0, so the gradient is (1 - y) or -y, to rounding
    if reduction == "sum" and pos_weight is None:
        big, small = z == 1e4, z == -1e4
        torch.testing.assert_close(gz[big], (cot * (1 - y))[big], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(gz[small], (-cot * y)[small], rtol=1e-6, atol=1e-6)

    ref = lossreg.get(name).reference
    zr, yr = leaf(z), leaf(y)
    ref_out = ref(input=zr, target=yr, weight=weight, pos_weight=pw, reduction=reduction)
    assert_close(out, ref_out, torch.float32, "loss vs reference")
    rz, ry = torch.autograd.grad(ref_out, (zr, yr), cot)
    assert_close(gz, rz, torch.float32, "grad z vs reference")
    assert_close(gy, ry, torch.float32, "grad y vs reference")


# ---------------------------------------------------------------- bce
def bce_expected(p, y):
    """Per element, with Python's math.log and torch's clamp at -100."""
    def clog(v):
        return -100.0 if v <= 0 else max(math.log(v), -100.0)
    return torch.tensor([-(b * clog(a) + (1 - b) * clog(1 - a))
                         for a, b in zip(p.double().tolist(), y.double().tolist())],
                        dtype=torch.float64)


@pytest.mark.parametrize("name,impl", implementations("bce"))
def test_bce_clamps_logs_at_minus_100(name, impl):
    g = gen(7)
    p = torch.tensor([0.0, 1.0, 1e-45, 1.0 - 2**-24, 0.0, 1.0, 1e-30], device=DEVICE)
    y = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0], device=DEVICE)
    p = torch.cat([p, rand(g, 500) * 0.98 + 0.01])
    y = torch.cat([y, rand(g, 500)])
    out = impl.fn(input=p, target=y, reduction="none")
    expected = bce_expected(p.cpu(), y.cpu())
    assert torch.equal(out[:3].cpu(), torch.tensor([100.0, 100.0, 100.0]))
    assert_close(out, expected, torch.float32, "loss")
    for reduction in ("mean", "sum"):
        assert_close(impl.fn(input=p, target=y, reduction=reduction), reduce(expected, reduction),
                     torch.float32, reduction)
    if impl.backend == "torch" and impl.kind == "baseline":
        return  # torch's backward clips p(1-p) at 1e-12 instead: see the spec's description
    pl = leaf(p)
    (grad,) = torch.autograd.grad(impl.fn(input=pl, target=y, reduction="sum"), pl)
    assert not grad.isnan().any()
    # d/dp: a clamped log contributes nothing, an unclamped one -y/p or (1-y)/(1-p)
    p64, y64 = p.double(), y.double()
    keep_p = torch.log(p64) >= -100
    keep_q = torch.log1p(-p64) >= -100
    expected_grad = (torch.where(keep_q, (1 - y64) / (1 - p64), 0.0)
                     - torch.where(keep_p, y64 / p64.clamp(min=1e-300), 0.0))
    assert_close(grad, expected_grad, torch.float32, "grad")


@pytest.mark.parametrize("name,impl", implementations("bce"))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_bce_weight_broadcasts_per_class(name, impl, reduction):
    g = gen(11)
    p, y, w = rand(g, 41, 13) * 0.98 + 0.01, rand(g, 41, 13), rand(g, 13) + 0.5
    pl, yl = leaf(p), leaf(y)
    out = impl.fn(input=pl, target=yl, weight=w, reduction=reduction)
    p64, y64 = leaf(p.double()), leaf(y.double())
    expected = reduce(-(y64 * torch.log(p64) + (1 - y64) * torch.log(1 - p64)) * w.double(),
                      reduction)
    assert_close(out, expected, torch.float32, "loss")
    cot = rand(g, *out.shape) + 0.5
    for got, exp, what in zip(torch.autograd.grad(out, (pl, yl), cot),
                              torch.autograd.grad(expected, (p64, y64), cot.double()),
                              ("grad p", "grad y")):
        assert_close(got, exp, torch.float32, what)


# ---------------------------------------------------------------- exponential overflow
#: margins -y f bracketing each dtype's overflow threshold log(max), plus far beyond
THRESHOLD = {torch.float32: 88.7228, torch.float16: 11.0898, torch.bfloat16: 88.7}


def exponential_inputs(g, dtype):
    t = THRESHOLD[dtype]
    near = torch.linspace(t - 0.05, t + 0.05, 101, dtype=torch.float64)
    margins = torch.cat([near, torch.tensor([1e4, -1e4, 200.0, -200.0, 60.0, 30.0]),
                         torch.randn(400, generator=g, dtype=torch.float64) * 3])
    y = pm1(g, margins.numel(), dtype=dtype)
    f = (-y.double().cpu() * margins).to(dtype).to(DEVICE)
    return f, y


@pytest.mark.parametrize("name,impl", implementations("exponential"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_exponential_overflows_exactly_where_the_reference_does(name, impl, dtype):
    ref = lossreg.get(name).reference
    g = gen({torch.float32: 1, torch.float16: 2, torch.bfloat16: 3}[dtype])
    f, y = exponential_inputs(g, dtype)
    out = impl.fn(input=f, target=y, reduction="none")
    expected = ref(input=f, target=y, reduction="none")  # eager, in the same dtype
    assert out.dtype == dtype
    assert torch.isinf(expected).any() and torch.isfinite(expected).any()
    assert_close(out, expected, dtype, "loss")

    # reductions: with and without an overflowing term
    finite = torch.isfinite(expected)
    for reduction in ("mean", "sum"):
        for sel in (finite, torch.ones_like(finite)):
            got = impl.fn(input=f[sel], target=y[sel], reduction=reduction)
            want = ref(input=f[sel], target=y[sel], reduction=reduction)
            assert not got.isnan()
            assert bool(torch.isinf(got)) == bool(torch.isinf(want)), reduction

    # gradients: inf where the reference's are, never NaN
    for reduction in ("none", "mean"):
        fl, fr = leaf(f), leaf(f)
        out = impl.fn(input=fl, target=y, reduction=reduction)
        want = ref(input=fr, target=y, reduction=reduction)
        cot = torch.ones_like(out)
        (got_g,), (want_g,) = (torch.autograd.grad(out, fl, cot),
                               torch.autograd.grad(want, fr, cot))
        assert not got_g.isnan().any()
        assert torch.equal(torch.isinf(got_g), torch.isinf(want_g)), reduction
        assert_close(got_g, want_g, dtype, f"grad ({reduction})")


# ---------------------------------------------------------------- zero gradient past the margin
def past_margin_inputs(name, g):
    """Inputs where the first half of the terms is far past the margin."""
    if name in ("hinge", "squared_hinge"):
        y = pm1(g, 3001)
        f = randn(g, 3001) * 2
        f[:1500] = y[:1500] * (1.0 + rand(g, 1500) * 1e3 + 1e-3)
        return {"input": f, "target": y}, slice(0, 1500)
    if name == "margin_ranking":
        y = pm1(g, 3001)
        a, b = randn(g, 3001), randn(g, 3001)
        a[:1500] = b[:1500] + y[:1500] * (1.01 + rand(g, 1500) * 1e3)
        return {"input1": a, "input2": b, "target": y}, slice(0, 1500)
    s = randn(g, 301, 10)  # multiclass_hinge: label scores far above every other
    t = torch.randint(0, 10, (301,), generator=g).to(DEVICE)
    s[:150].scatter_(1, t[:150, None], 1e3)
    return {"input": s, "target": t}, slice(0, 150)


@pytest.mark.parametrize(
    "name,impl", implementations("hinge", "squared_hinge", "margin_ranking", "multiclass_hinge"))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_terms_past_the_margin_have_exactly_zero_gradient(name, impl, reduction):
    inputs, past = past_margin_inputs(name, gen(5))
    opts = {"margin": 1.0, "reduction": reduction}
    grad_keys = [k for k in ("input", "input1", "input2") if k in inputs]
    leaves = {k: leaf(v) if k in grad_keys else v for k, v in inputs.items()}
    out = impl.fn(**leaves, **opts)
    if reduction == "none":
        assert torch.equal(out[past], torch.zeros_like(out[past]))
    cot = rand(gen(6), *out.shape) + 0.5
    grads = torch.autograd.grad(out, [leaves[k] for k in grad_keys], cot)
    ref = lossreg.get(name).reference
    ref_leaves = {k: leaf(v) if k in grad_keys else v for k, v in inputs.items()}
    ref_grads = torch.autograd.grad(ref(**ref_leaves, **opts),
                                    [ref_leaves[k] for k in grad_keys], cot)
    for k, got, want in zip(grad_keys, grads, ref_grads):
        assert torch.equal(got[past], torch.zeros_like(got[past])), k
        assert got[past.stop:].abs().sum() > 0, k  # the rest does get gradients
        assert_close(got, want, torch.float32, f"grad {k}")


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


@pytest.mark.parametrize("name,impl", implementations("multiclass_hinge", "samme"))
@pytest.mark.parametrize("rows,classes", ROW_SHAPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_rowwise_losses_at_odd_shapes(name, impl, rows, classes, reduction):
    g = gen(rows * classes + len(reduction))
    s = randn(g, rows, classes, scale=2.0)
    t = torch.randint(0, classes, (rows,), generator=g).to(DEVICE)
    sl, s64 = leaf(s), leaf(s.double())
    if name == "samme":
        configs = [({}, lambda: samme_expected(s64, t))]
    else:
        w = rand(g, classes) + 0.5
        configs = [
            ({"margin": 1.0, "p": 1}, lambda: multiclass_hinge_expected(s64, t, 1.0, 1, None)),
            ({"margin": 0.5, "p": 2, "weight": w},
             lambda: multiclass_hinge_expected(s64, t, 0.5, 2, w.double())),
        ]
    for opts, expected_rows in configs:
        out = impl.fn(input=sl, target=t, reduction=reduction, **opts)
        expected = reduce(expected_rows(), reduction)
        assert_close(out, expected, torch.float32, f"loss {opts}")
        cot = rand(g, *out.shape) + 0.5
        (got,) = torch.autograd.grad(out, sl, cot)
        (want,) = torch.autograd.grad(expected, s64, cot.double())
        assert_close(got, want, torch.float32, f"grad {opts}")


@pytest.mark.parametrize("name,impl", implementations("samme"))
def test_samme_overflow_is_inf_not_nan(name, impl):
    g = gen(13)
    s = randn(g, 60, 7)
    t = torch.randint(0, 7, (60,), generator=g).to(DEVICE)
    s[::3].scatter_(1, t[::3, None], -1e4)  # label far below: exp(+1e4/6) = inf
    s[1::3].scatter_(1, t[1::3, None], 1e4)  # far above: exactly 0
    sl, sr = leaf(s), leaf(s)
    out = impl.fn(input=sl, target=t, reduction="none")
    want = lossreg.get(name).reference(input=sr, target=t, reduction="none")
    assert torch.isinf(out[::3]).all() and torch.equal(out[1::3], torch.zeros_like(out[1::3]))
    assert_close(out, want, torch.float32, "loss")
    (got,) = torch.autograd.grad(out, sl, torch.ones_like(out))
    (exp,) = torch.autograd.grad(want, sr, torch.ones_like(want))
    assert_close(got, exp, torch.float32, "grad")


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


@pytest.mark.parametrize(
    "name,impl,kwargs,exc,message",
    [pytest.param(name, p.values[1], kwargs, exc, msg, id=f"{p.id}-{i}")
     for i, (name, kwargs, exc, msg) in enumerate(BAD)
     for p in implementations(name)])
def test_every_implementation_rejects_bad_input_alike(name, impl, kwargs, exc, message):
    with pytest.raises(exc, match=message):
        impl.fn(**kwargs)
