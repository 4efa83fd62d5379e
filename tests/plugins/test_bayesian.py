"""The bayesian plugin (gaussian_kl, neg_elbo): the general Gaussian KL in sigma,
torch.distributions' log-densities, analytic gradients, validation, for every
implementation, Triton included (under the interpreter on CPU), against float64
computations written independently of the plugin's references; the standard per-loss
tests are its `LossTester`s.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal
import lossreg
from lossreg.kernels.aligned_rows import MAX_D
from family_helpers import assert_close, gen, implementations, leaf, rand, randn, reduce
from generative_cases import BAD_INPUTS, per_row_scale
from loss_tester import LossTester


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


BAD = [b for b in BAD_INPUTS if lossreg.get(b[0]).plugin == "bayesian"]


@pytest.mark.parametrize("name,make,exc,match", BAD,
                         ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_inputs_are_rejected_by_every_implementation(name, make, exc, match):
    for impl in lossreg.get(name).implementations.values():
        if impl.backend == "compile" or impl.missing_requirements():
            continue
        with pytest.raises(exc, match=match):
            impl.fn(**make(gen(name, match)))


class TestGaussianKl(LossTester):
    loss = "gaussian_kl"


class TestNegElbo(LossTester):
    loss = "neg_elbo"
