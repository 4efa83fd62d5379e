"""The logistic_regression plugin (bce, bce_with_logits): stability at extreme logits,
clamped logs, weights, validation, for every implementation of each loss, Triton
included (under the interpreter on CPU), against float64 formulas written independently
of the plugin's references (``tests/classic_cases.py``); the standard per-loss tests are
its `LossTester`s.
"""

import zlib
import pytest
import torch
import lossreg
from family_helpers import DEVICE, implementations, rand, randn
from classic_cases import BAD, assert_close, bce_expected, bcel_expected, gen, leaf, reduce
from loss_tester import LossTester


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


@pytest.mark.parametrize(
    "name,impl,kwargs,exc,message",
    [pytest.param(name, p.values[1], kwargs, exc, msg, id=f"{p.id}-{i}")
     for i, (name, kwargs, exc, msg) in enumerate(BAD)
     for p in implementations(name)
     if lossreg.get(name).plugin == "logistic_regression"])
def test_every_implementation_rejects_bad_input_alike(name, impl, kwargs, exc, message):
    with pytest.raises(exc, match=message):
        impl.fn(**kwargs)


class TestBce(LossTester):
    loss = "bce"


class TestBceWithLogits(LossTester):
    loss = "bce_with_logits"
