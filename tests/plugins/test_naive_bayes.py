"""The naive_bayes plugin (nll, gaussian_nll): ignored targets, weights, variance
broadcasting and clamping, validation, for every implementation (Triton under the
interpreter on a CPU), against float64 values computed here independently of the
plugin's references; the standard per-loss tests are its `LossTester`s.
"""

import pytest
import torch
import torch.nn.functional as F
from tolerances import assert_close64
import lossreg
from tabular_cases import DEVICE, F64, VALIDATION, VALIDATION_PARAMS, fn, gen, impl_params, leaf
from loss_tester import LossTester


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


@pytest.mark.parametrize("name, impl, case", [
    p for p in VALIDATION_PARAMS if lossreg.get(p.values[0]).plugin == "naive_bayes"])
def test_every_implementation_rejects_bad_input_alike(name, impl, case):
    make, error, message = VALIDATION[name][case]
    with pytest.raises(error, match=message):
        fn(name, impl)(**make())


def test_every_catalog_loss_is_registered_with_its_family():
    for name in ("nll", "gaussian_nll"):
        spec = lossreg.get(name)
        assert spec.family == "naive_bayes" and spec.citation and spec.formula
        assert "triton" in spec.implementations
        assert spec.implementations["torch"].kind == "baseline"


class TestGaussianNll(LossTester):
    loss = "gaussian_nll"

    def test_torch_is_not_float16_near_eps(self):
        """torch's built-in computes in float16, where eps 1e-6 is subnormal and var near
        it overflows (so it declares no float16); the reference, in float32 for 16-bit
        inputs, is right there."""
        from lossreg import verify
        from lossreg.spec import Case, Impl
        spec = self.spec
        assert "float16" not in spec.implementations["torch"].dtypes
        inputs = spec.edge_cases["var_below_eps"](Case(1, torch.float16, "cpu", seed=11))
        tol = spec.tolerance("float16")
        builtin = Impl("builtin", lambda input, target, var, **o: F.gaussian_nll_loss(
            input, target.detach(), var, **o))
        assert not verify.check_gradient(spec, builtin, inputs, spec.options, tol, 1).ok
        assert verify.check_gradient(spec, spec.implementations["reference"], inputs,
                                     spec.options, tol, 1).ok


class TestNll(LossTester):
    loss = "nll"
