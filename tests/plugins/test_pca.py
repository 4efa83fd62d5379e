"""pca_reconstruction: the projected form against float64 autograd, and its
cancellation regime pinned down."""

import pytest
import torch

import lossreg
from lossreg.spec import Case

from tolerances import assert_close64
from loss_tester import LossTester

SPEC = lossreg.get("pca_reconstruction")
IMPLS = sorted(SPEC.implementations.keys() - {"compile"})


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("center", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradients_match_float64(impl, center, reduction):
    inputs = SPEC.make_inputs(Case(n=97, seed=hash((center, reduction)) % 100,
                                   params={"dim": 29, "rank": 7}))
    x, w = (t.clone().requires_grad_(True) for t in (inputs["x"], inputs["weight"]))
    out = SPEC.implementations[impl].fn(x, w, reduction=reduction, center=center)
    x64, w64 = (t.detach().double().requires_grad_(True) for t in (x, w))
    ref = SPEC.reference(x64, w64, reduction=reduction, center=center)
    assert_close64(out, ref, torch.float32)
    cot = torch.rand(ref.shape, dtype=torch.float64) + 0.5
    gx, gw = torch.autograd.grad(out, (x, w), cot.float())
    rx, rw = torch.autograd.grad(ref, (x64, w64), cot)
    assert_close64(gx, rx, torch.float32, "grad x")
    assert_close64(gw, rw, torch.float32, "grad W")


def test_cancellation_regime_is_bounded_by_the_data_energy():
    """x almost in span(W): the projected loss is a small difference of large terms.
    Its error is bounded by a few eps * mean ||x||^2, not by eps * loss."""
    inputs = SPEC.edge_cases["near_span_of_w"](Case(n=1, seed=5))
    x, w = inputs["x"], inputs["weight"]
    exact = SPEC.reference(x.double(), w.double())
    energy = float((x.double() ** 2).sum(1).mean())
    assert float(exact) < 1e-4 * energy  # we are in the regime
    err = abs(float(SPEC.implementations["projected"].fn(x, w)) - float(exact))
    eps = torch.finfo(torch.float32).eps
    assert err <= 8 * eps * energy
    # and the regime is real: relative to the loss the error is far above float32 eps
    assert err / float(exact) > 100 * eps


def test_validation():
    f = SPEC.implementations["projected"].fn
    with pytest.raises(ValueError, match=r"x \(n, d\) and weight \(d, k\)"):
        f(torch.randn(4, 5), torch.randn(6, 2))
    with pytest.raises(ValueError, match="rank k=6 must be <= d=5"):
        f(torch.randn(4, 5), torch.randn(5, 6))
    with pytest.raises(ValueError, match="center must be True or False"):
        f(torch.randn(4, 5), torch.randn(5, 2), center="yes")
    with pytest.raises(TypeError, match="floating-point"):
        f(torch.ones(4, 5, dtype=torch.int64), torch.randn(5, 2))


@pytest.mark.parametrize("dim", [29, 37])
def test_one_row_edge_case_follows_the_case_dim(dim):
    """The one_row edge case is as wide as the case's W, whatever ``dim`` the preset sets
    (it once hard-coded 37 features and failed at every other width)."""
    inputs = SPEC.edge_cases["one_row"](Case(n=1, seed=2, params={"dim": dim, "rank": 4}))
    assert inputs["x"].shape == (1, dim) and inputs["weight"].shape == (dim, 4)
    ref = SPEC.reference(**{k: v.double() for k, v in inputs.items()})
    assert_close64(SPEC.implementations["projected"].fn(**inputs), ref, torch.float32)


# ---------------------------------------------------------------- the shared tester
class TestPcaReconstruction(LossTester):
    loss = "pca_reconstruction"
