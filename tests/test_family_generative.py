"""Numerics and validation of the autoencoder and bayesian families (reconstruction,
masked_reconstruction, gaussian_kl, neg_elbo), for every implementation of each loss,
Triton included (under the interpreter on CPU). The generic contract over all losses
lives in test_conformance.

Expected values are float64 computations written here, independently of the plugins'
references: per-patch loops, the general Gaussian KL in sigma, torch.distributions'
log-densities, log-sigmoid, and analytic gradients.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal

import lossreg
from lossreg.kernels.aligned_rows import MAX_D

from family_helpers import (  # noqa: F401
    DEVICE,
    TOL,
    assert_close,
    gen,
    implementations,
    leaf,
    neg_log_sigmoid,
    rand,
    randn,
    reduce,
)


def per_row_scale(cot, reduction, n, ndim):
    """The incoming gradient of each sample, broadcast over its features."""
    c = cot.double().cpu() / (n if reduction == "mean" else 1)
    return c.reshape(c.shape + (1,) * (ndim - 1)) if reduction == "none" else c


# ---------------------------------------------------------------- reconstruction
SHAPES = [(9, 40), (4, 3, 5, 7), (3, MAX_D + 3)]  # rows, images, rows wider than a tile


@pytest.mark.parametrize("name,impl", implementations("reconstruction"))
@pytest.mark.parametrize("shape", SHAPES, ids=["rows", "images", "wide"])
@pytest.mark.parametrize("loss_type", ["mse", "bce"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reconstruction_sums_features_and_averages_samples(name, impl, shape, loss_type,
                                                           reduction):
    g = gen(impl.name, shape, loss_type, reduction)
    n = shape[0]
    if loss_type == "mse":
        x = randn(g, *shape)
        x_hat = x + 0.5 * randn(g, *shape)
    else:
        x = rand(g, *shape)
        x[::2] = (x[::2] > 0.5).float()  # binarized samples next to grey ones
        x_hat = 0.02 + 0.96 * rand(g, *shape)
    xl = leaf(x_hat)
    out = impl.fn(input=xl, target=x, loss_type=loss_type, reduction=reduction)
    p, y = x_hat.double().cpu(), x.double().cpu()
    if loss_type == "mse":
        per_element, slope = (p - y) ** 2, 2 * (p - y)
    else:
        per_element = -(y * torch.log(p) + (1 - y) * torch.log(1 - p))
        slope = (p - y) / (p * (1 - p))
    per_sample = torch.stack([row.sum() for row in per_element])
    assert_close(out, reduce(per_sample, reduction), torch.float32, "loss")
    cot = rand(g, *out.shape) + 0.5
    (gx,) = torch.autograd.grad(out, (xl,), cot)
    assert_close(gx, slope * per_row_scale(cot, reduction, n, len(shape)), torch.float32,
                 "grad")


@pytest.mark.parametrize("name,impl", implementations("reconstruction"))
def test_reconstruction_bce_clamps_saturated_probabilities(name, impl):
    """p in {0, 1}: torch's clamp makes each log -100 (loss 100 where the target
    disagrees) and the formula's gradient 0 through a clamped log."""
    x_hat = torch.tensor([[0.0, 1.0, 0.0, 1.0, 0.3]], device=DEVICE)
    x = torch.tensor([[0.0, 1.0, 1.0, 0.0, 1.0]], device=DEVICE)
    out = impl.fn(input=x_hat, target=x, loss_type="bce", reduction="none")
    expected = 100.0 + 100.0 - math.log(0.3)
    torch.testing.assert_close(out.double().cpu(), torch.tensor([expected], dtype=torch.float64),
                               rtol=1e-6, atol=1e-5)


# ---------------------------------------------------------------- masked_reconstruction
def mae_expected(pred, target, mask):
    """Per masked patch, the mean over its values of the squared error; a loop."""
    n, length, _ = pred.shape
    per_patch = torch.zeros(n, length, dtype=torch.float64)
    for i in range(n):
        for j in range(length):
            if mask[i, j]:
                per_patch[i, j] = ((pred[i, j] - target[i, j]) ** 2).mean()
    return per_patch


@pytest.mark.parametrize("name,impl", implementations("masked_reconstruction"))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", [(3, 10, 48), (2, 7, 33)], ids=["mae", "odd"])
def test_masked_reconstruction_counts_masked_patches_only(name, impl, reduction, shape):
    g = gen(impl.name, reduction, shape)
    n, length, dim = shape
    target = randn(g, *shape)
    pred = target + randn(g, *shape)
    mask = rand(g, n, length) < 0.6
    mask[0, 0] = True
    if impl.name != "torch":  # MAE's formulation multiplies by the mask: NaN * 0 = NaN
        pred[~mask] = float("nan")  # visible patches are never read into the loss
    pl = leaf(pred)
    out = impl.fn(input=pl, target=target, mask=mask, reduction=reduction)
    p64, t64 = pred.double().cpu(), target.double().cpu()
    per_patch = mae_expected(p64, t64, mask.cpu())
    count = int(mask.sum())
    expected = {"none": per_patch, "sum": per_patch.sum(), "mean": per_patch.sum() / count}
    assert_close(out, expected[reduction], torch.float32, "loss")
    cot = rand(g, *out.shape) + 0.5
    (gp,) = torch.autograd.grad(out, (pl,), cot)
    c = cot.double().cpu()
    c = c[..., None] if reduction == "none" else c / (count if reduction == "mean" else 1)
    slope = torch.where(mask.cpu()[..., None], 2 * (p64 - t64) / dim, 0.0)
    assert_close(gp, slope * c, torch.float32, "grad")
    assert not gp[~mask].any(), "visible patches get exactly 0"


@pytest.mark.parametrize("name,impl", [p for p in implementations("masked_reconstruction")
                                       if p.id.endswith(("reference", "triton"))])
def test_masked_reconstruction_with_nothing_masked_is_nan_with_zero_gradient(name, impl):
    """torch's mean over nothing (as cross_entropy with every target ignored). MAE's own
    formulation, the torch baseline, backpropagates NaN there instead."""
    g = gen(impl.name, "empty")
    pred = leaf(randn(g, 2, 5, 8))
    out = impl.fn(input=pred, target=randn(g, 2, 5, 8),
                  mask=torch.zeros(2, 5, dtype=torch.bool, device=DEVICE))
    (gp,) = torch.autograd.grad(out, (pred,))
    assert out.isnan() and torch.equal(gp, torch.zeros_like(gp))


# ---------------------------------------------------------------- gaussian_kl
def kl_expected(mu, logvar):
    """KL(N(mu, s^2) || N(0, 1)) = -log s + (s^2 + mu^2) / 2 - 1/2 per coordinate, with
    s = e^{logvar / 2}; summed per sample."""
    s = torch.exp(logvar / 2)
    per = -torch.log(s) + (s * s + mu * mu) / 2 - 0.5
    return per.flatten(1).sum(1)


@pytest.mark.parametrize("name,impl", implementations("gaussian_kl"))
@pytest.mark.parametrize("shape", [(17, 32), (3, 4, 5), (2, MAX_D + 5)],
                         ids=["vectors", "conv", "wide"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gaussian_kl_closed_form_and_gradients(name, impl, shape, reduction):
    g = gen(impl.name, shape, reduction)
    mu = randn(g, *shape, scale=2)
    logvar = randn(g, *shape, scale=2)
    logvar.view(-1)[::7] = -10.0  # nearly deterministic coordinates
    ml, ll = leaf(mu), leaf(logvar)
    out = impl.fn(mu=ml, logvar=ll, reduction=reduction)
    m64, v64 = mu.double().cpu(), logvar.double().cpu()
    assert_close(out, reduce(kl_expected(m64, v64), reduction), torch.float32, "kl")
    cot = rand(g, *out.shape) + 0.5
    gm, gv = torch.autograd.grad(out, (ml, ll), cot)
    c = per_row_scale(cot, reduction, shape[0], len(shape))
    assert_close(gm, m64 * c, torch.float32, "grad mu")
    assert_close(gv, 0.5 * (torch.exp(v64) - 1) * c, torch.float32, "grad logvar")


# ---------------------------------------------------------------- neg_elbo
def elbo_expected(recon, x, mu, logvar, beta, likelihood):
    if likelihood == "gaussian":
        nll = -Normal(recon, torch.ones_like(recon)).log_prob(x)
    else:
        nll = -(x * F.logsigmoid(recon) + (1 - x) * F.logsigmoid(-recon))
    return nll.flatten(1).sum(1) + beta * kl_expected(mu, logvar)


@pytest.mark.parametrize("name,impl", implementations("neg_elbo"))
@pytest.mark.parametrize("likelihood", ["gaussian", "bernoulli"])
@pytest.mark.parametrize("reduction,beta", [("mean", 1.0), ("sum", 0.25), ("none", 4.0)])
def test_neg_elbo_is_nll_plus_beta_kl(name, impl, likelihood, reduction, beta):
    g = gen(impl.name, likelihood, reduction)
    n, features, latent = 6, (3, 11), (7,)
    if likelihood == "gaussian":
        x = randn(g, n, *features)
        recon = x + 0.5 * randn(g, n, *features)
    else:
        x = rand(g, n, *features)
        x[::2] = (x[::2] > 0.5).float()
        recon = randn(g, n, *features, scale=3)
        recon[:, 0] = 1e4  # saturated logits: finite loss, gradient sigma - x
        recon[:, 1] = -1e4
    mu, logvar = randn(g, n, *latent), randn(g, n, *latent)
    rl, ml, ll = leaf(recon), leaf(mu), leaf(logvar)
    out = impl.fn(recon=rl, target=x, mu=ml, logvar=ll, beta=beta, likelihood=likelihood,
                  reduction=reduction)
    r64, x64, m64, v64 = (t.double().cpu() for t in (recon, x, mu, logvar))
    assert_close(out, reduce(elbo_expected(r64, x64, m64, v64, beta, likelihood), reduction),
                 torch.float32, "loss")
    cot = rand(g, *out.shape) + 0.5
    gr, gm, gv = torch.autograd.grad(out, (rl, ml, ll), cot)
    assert torch.isfinite(gr).all()
    slope = r64 - x64 if likelihood == "gaussian" else torch.sigmoid(r64) - x64
    assert_close(gr, slope * per_row_scale(cot, reduction, n, 3), torch.float32, "grad recon")
    c = per_row_scale(cot, reduction, n, 2)
    assert_close(gm, beta * m64 * c, torch.float32, "grad mu")
    assert_close(gv, beta * 0.5 * (torch.exp(v64) - 1) * c, torch.float32, "grad logvar")


# ---------------------------------------------------------------- validation
def _elbo(g, **changes):
    args = {"recon": randn(g, 4, 6), "target": randn(g, 4, 6), "mu": randn(g, 4, 3),
            "logvar": randn(g, 4, 3)}
    return {**args, **changes}


BAD_INPUTS = [
    ("reconstruction", lambda g: {"input": randn(g, 4, 5), "target": randn(g, 4, 6)},
     ValueError, r"reconstruction: target must have shape \(4, 5\)"),
    ("reconstruction", lambda g: {"input": randn(g, 8), "target": randn(g, 8)}, ValueError,
     r"input must be \(N, \*features\)"),
    ("reconstruction", lambda g: {"input": randn(g, 4, 5), "target": randn(g, 4, 5),
                                  "loss_type": "l1"}, ValueError, "loss_type must be one of"),
    ("reconstruction", lambda g: {"input": randn(g, 4, 5) + 2, "target": rand(g, 4, 5),
                                  "loss_type": "bce"}, ValueError,
     r"input must lie in \[0, 1\] \(probabilities"),
    ("reconstruction", lambda g: {"input": randn(g, 4, 5),
                                  "target": randn(g, 4, 5, dtype=torch.float64)}, TypeError,
     "target must have input's dtype"),
    ("masked_reconstruction", lambda g: {"input": randn(g, 2, 3, 4), "target": randn(g, 2, 3, 4),
                                         "mask": torch.ones(2, 4, dtype=torch.bool)},
     ValueError, r"mask must have shape \(2, 3\)"),
    ("masked_reconstruction", lambda g: {"input": randn(g, 2, 3, 4), "target": randn(g, 2, 3, 4),
                                         "mask": torch.full((2, 3), 3)}, ValueError,
     "mask must hold only 0 and 1, got 3"),
    ("masked_reconstruction", lambda g: {"input": randn(g, 6, 4), "target": randn(g, 6, 4),
                                         "mask": torch.ones(6, dtype=torch.bool)}, ValueError,
     r"input must be \(N, L, D\)"),
    ("gaussian_kl", lambda g: {"mu": randn(g, 3, 4), "logvar": randn(g, 3, 5)}, ValueError,
     r"logvar must have shape \(3, 4\)"),
    ("gaussian_kl", lambda g: {"mu": randn(g, 3, 4), "logvar": randn(g, 3, 4),
                               "reduction": "batchmean"}, ValueError,
     "gaussian_kl: reduction must be one of"),
    ("neg_elbo", lambda g: _elbo(g, beta=-1.0), ValueError, r"beta must lie in \[0, inf\]"),
    ("neg_elbo", lambda g: _elbo(g, likelihood="poisson"), ValueError,
     "likelihood must be one of"),
    ("neg_elbo", lambda g: _elbo(g, likelihood="bernoulli"), ValueError,
     r"target must lie in \[0, 1\] \(probabilities, for likelihood='bernoulli'\)"),
    ("neg_elbo", lambda g: _elbo(g, mu=randn(g, 5, 3), logvar=randn(g, 5, 3)), ValueError,
     "mu must hold one posterior per sample of recon"),
]


@pytest.mark.parametrize("name,make,exc,match", BAD_INPUTS,
                         ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD_INPUTS)])
def test_bad_inputs_are_rejected_by_every_implementation(name, make, exc, match):
    for impl in lossreg.get(name).implementations.values():
        if impl.backend == "compile" or impl.missing_requirements():
            continue
        with pytest.raises(exc, match=match):
            impl.fn(**make(gen(name, match)))
