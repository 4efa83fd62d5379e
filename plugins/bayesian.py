"""Section 16, Bayesian deep learning: the KL divergence of a diagonal Gaussian posterior
from the standard normal prior (``gaussian_kl``), and the VAE's negative evidence lower
bound (``neg_elbo``), reconstruction negative log-likelihood plus beta times that KL.

Posteriors come as ``(mu, logvar)``, the encoder's two heads: any real ``logvar`` is a
positive variance ``e^logvar``. Per sample, sums run over every axis after the first.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence

from lossreg import Impl, LossSpec, hookimpl
from lossreg.kernels.traffic import streamed
from lossreg.validate import check_choice, check_number, check_reduction

from . import _per_sample
from ._common import reduce_loss, reductions
from lossreg.validate import check_float, check_shape, check_values

LIKELIHOODS = ("gaussian", "bernoulli")
#: -log N(x; x_hat, 1) = (x - x_hat)^2 / 2 + log(2 pi) / 2 per feature
HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def _features(t: torch.Tensor) -> int:
    return math.prod(t.shape[1:])


def _check_samples(loss: str, name: str, t: torch.Tensor, what: str) -> None:
    if t.dim() < 2 or _features(t) == 0:
        raise ValueError(f"{loss}: {name} must be (N, *dims) with at least one {what} per "
                         f"sample, got shape {tuple(t.shape)}")


def _validate_posterior(loss, mu, logvar):
    check_float(loss, mu=mu, logvar=logvar)
    _check_samples(loss, "mu", mu, "latent dimension")
    check_shape(loss, "logvar", logvar, mu.shape, "the shape of mu")


def _kl_per_sample(mu, logvar):
    return (0.5 * (mu**2 + torch.exp(logvar) - logvar - 1)).flatten(1).sum(dim=1)


def _kl_torch_per_sample(mu, logvar):
    posterior = Normal(mu, torch.exp(0.5 * logvar), validate_args=False)
    prior = Normal(torch.zeros_like(mu), torch.ones_like(mu), validate_args=False)
    return kl_divergence(posterior, prior).flatten(1).sum(dim=1)


# ---------------------------------------------------------------- gaussian_kl
def _validate_kl(mu, logvar, reduction):
    _validate_posterior("gaussian_kl", mu, logvar)
    check_reduction("gaussian_kl", reduction)


def gaussian_kl_reference(mu, logvar, reduction="mean"):
    """1/2 sum_d (mu^2 + sigma^2 - log sigma^2 - 1) per sample, sigma^2 = e^logvar."""
    _validate_kl(mu, logvar, reduction)
    return reduce_loss(_kl_per_sample(mu, logvar), reduction)


def gaussian_kl_torch(mu, logvar, reduction="mean"):
    _validate_kl(mu, logvar, reduction)
    return reduce_loss(_kl_torch_per_sample(mu, logvar), reduction)


def gaussian_kl_triton(mu, logvar, reduction="mean"):
    _validate_kl(mu, logvar, reduction)
    return _per_sample.gaussian_kl(mu, logvar, reduction)


def posterior(case, n=None, latent=None):
    """An encoder's (mu, logvar): means around 0, standard deviations from about 0.2 to
    3 (logvar in [-3.2, 2.2])."""
    n = case.n if n is None else n
    latent = latent or (int(case.params.get("latent", 32)),)
    return {"mu": case.randn(n, *latent), "logvar": case.rand(n, *latent) * 5.4 - 3.2}


def _extreme_posterior(case):
    """Nearly deterministic (sigma = e^-5) and very wide (sigma = e^4) coordinates, |mu|
    up to 50; each sample's KL stays within float16's range."""
    mu = case.randn(4, 33) * 10
    mu[:, 0] = 50.0
    logvar = case.randn(4, 33)
    logvar[:, ::3] = -10.0
    logvar[:, 1::3] = 8.0
    return {"mu": mu, "logvar": logvar}


KL_EDGE_CASES = {
    "one_element": lambda case: posterior(case, 1, (1,)),
    "latent_block_plus_one": lambda case: posterior(case, 1, (4097,)),
    "conv_latent": lambda case: posterior(case, 3, (4, 5, 6)),
    "wide_latent": lambda case: posterior(case, 2, (4100,)),
    "extreme_posterior": _extreme_posterior,
    "prior_itself": lambda case: {"mu": torch.zeros(3, 17, dtype=case.dtype,
                                                    device=case.device),
                                  "logvar": torch.zeros(3, 17, dtype=case.dtype,
                                                        device=case.device)},
}


# ---------------------------------------------------------------- neg_elbo
def _validate_elbo(recon, target, mu, logvar, beta, likelihood, reduction):
    check_float("neg_elbo", recon=recon, target=target, mu=mu, logvar=logvar)
    _check_samples("neg_elbo", "recon", recon, "feature")
    check_shape("neg_elbo", "target", target, recon.shape, "the shape of recon")
    _validate_posterior("neg_elbo", mu, logvar)
    if mu.shape[0] != recon.shape[0]:
        raise ValueError(f"neg_elbo: mu must hold one posterior per sample of recon "
                         f"({recon.shape[0]}), got {mu.shape[0]}")
    check_number("neg_elbo", "beta", beta, low=0.0)
    check_choice("neg_elbo", "likelihood", likelihood, LIKELIHOODS)
    check_reduction("neg_elbo", reduction)
    if likelihood == "bernoulli":
        check_values("neg_elbo", "target", target, 0.0, 1.0,
                     "probabilities, for likelihood='bernoulli'")


def neg_elbo_reference(recon, target, mu, logvar, beta=1.0, likelihood="gaussian",
                       reduction="mean"):
    """Per sample: -log p(x | z) summed over features, plus beta * KL(q(z|x) || N(0, I)).
    Gaussian: unit-variance Gaussian around ``recon``; Bernoulli: ``recon`` are logits,
    -log p = softplus(z) - x z, written in the stable form."""
    _validate_elbo(recon, target, mu, logvar, beta, likelihood, reduction)
    if likelihood == "gaussian":
        nll = 0.5 * (target - recon) ** 2 + HALF_LOG_2PI
    else:
        # torch.maximum splits the gradient at 0 evenly: with the kink of |z| that is
        # exactly sigma(0) - x, the derivative of the smooth softplus
        nll = (torch.maximum(recon, torch.zeros_like(recon)) - recon * target
               + torch.log1p(torch.exp(-recon.abs())))
    loss = nll.flatten(1).sum(dim=1) + beta * _kl_per_sample(mu, logvar)
    return reduce_loss(loss, reduction)


def neg_elbo_torch(recon, target, mu, logvar, beta=1.0, likelihood="gaussian",
                   reduction="mean"):
    """F.mse_loss / F.binary_cross_entropy_with_logits and torch.distributions' KL."""
    _validate_elbo(recon, target, mu, logvar, beta, likelihood, reduction)
    if likelihood == "gaussian":
        nll = 0.5 * F.mse_loss(recon, target, reduction="none") + HALF_LOG_2PI
    else:
        nll = F.binary_cross_entropy_with_logits(recon, target, reduction="none")
    loss = nll.flatten(1).sum(dim=1) + beta * _kl_torch_per_sample(mu, logvar)
    return reduce_loss(loss, reduction)


def neg_elbo_triton(recon, target, mu, logvar, beta=1.0, likelihood="gaussian",
                    reduction="mean"):
    """Two launches, each input read once: the likelihood term over (recon, target) and
    the KL over (mu, logvar); the Gaussian's constant is added on the host."""
    _validate_elbo(recon, target, mu, logvar, beta, likelihood, reduction)
    if likelihood == "gaussian":
        nll = _per_sample.squared_error(recon, target, reduction, scale=0.5)
        constant = HALF_LOG_2PI * _features(recon)
        nll = nll + (constant * recon.shape[0] if reduction == "sum" else constant)
    else:
        nll = _per_sample.bce_logits(recon, target, reduction)
    return nll + _per_sample.gaussian_kl(mu, logvar, reduction, scale=float(beta))


def elbo_inputs(case, n=None, features=None, latent=None):
    """A VAE batch: Gaussian data and a reconstruction near it, or for the Bernoulli
    likelihood targets in [0, 1] (some exactly 0 or 1) and decoder logits; the
    posterior of ``posterior``."""
    n = case.n if n is None else n
    features = features or (int(case.params.get("features", 96)),)
    latent = latent or (int(case.params.get("latent", 16)),)
    if case.params.get("likelihood", "gaussian") == "bernoulli":
        x = case.rand(n, *features)
        x = torch.where(case.rand(n, *features) < 0.3, (x > 0.5).to(x.dtype), x)
        recon = torch.logit(0.02 + 0.96 * x) + case.randn(n, *features)
    else:
        x = case.randn(n, *features)
        recon = x + 0.4 * case.randn(n, *features)
    return {"recon": recon, "target": x, **posterior(case, n, latent)}


def _extreme_reconstruction(case):
    """Decoder outputs of +-100: huge Gaussian errors, or saturated Bernoulli logits (the
    loss of each sample within float16's range)."""
    inputs = elbo_inputs(case, 5, (7,), (3,))
    recon = inputs["recon"]
    recon[:, ::2] = 100.0
    recon[:, 1::4] = -100.0
    return {**inputs, "recon": recon}


ELBO_EDGE_CASES = {
    "one_sample": lambda case: elbo_inputs(case, 1, (1,), (1,)),
    "features_block_plus_one": lambda case: elbo_inputs(case, 2, (4097,), (33,)),
    "image_batch": lambda case: elbo_inputs(case, 3, (3, 8, 8), (2, 5)),
    "wide_features": lambda case: elbo_inputs(case, 2, (4100,), (9,)),
    "extreme_reconstruction": _extreme_reconstruction,
}


# ---------------------------------------------------------------- registration
def _kl_flops(inputs):
    n = inputs["mu"].numel()
    return {"forward": 6 * n, "backward": 4 * n, "full": 10 * n}


def _elbo_flops(inputs):
    n, k = inputs["recon"].numel(), inputs["mu"].numel()
    return {"forward": 6 * n + 6 * k, "backward": 4 * n + 4 * k, "full": 10 * (n + k)}


@hookimpl
def register_losses(register):
    register(LossSpec(
        name="gaussian_kl",
        family="bayesian",
        title="KL divergence to the standard normal",
        formula=(r"\frac{1}{n}\sum_{i=1}^{n}\frac{1}{2}\sum_{d}\left(\mu_{id}^2"
                 r" + e^{v_{id}} - v_{id} - 1\right),\quad v = \log\sigma^2"),
        description=(
            "KL(N(mu, diag sigma^2) || N(0, I)) of each sample's diagonal Gaussian "
            "posterior, from mu and logvar = log sigma^2 of shape (N, *latent), summed over "
            "the latent axes; `none` gives one KL per sample. Gradients go to mu and "
            "logvar. The baseline is torch.distributions.kl_divergence of two Normals."),
        citation="Kingma & Welling (2014), Auto-Encoding Variational Bayes, appendix B; "
                 "torch.distributions.kl_divergence",
        reference=gaussian_kl_reference,
        make_inputs=posterior,
        options={"reduction": "mean"},
        check_options=reductions(),
        grad_inputs=("mu", "logvar"),
        sizes={"quick": [16, 67], "default": [2**10, 2**14, 2**17],
               "large": [2**17, 2**19]},
        x_name="samples",
        input_params={"quick": {"latent": 32}, "default": {"latent": 128},
                      "large": {"latent": 512}},
        flops=_kl_flops,
        edge_cases=KL_EDGE_CASES,
    ))
    register(LossSpec(
        name="neg_elbo",
        family="bayesian",
        title="Negative ELBO (VAE)",
        formula=(r"\frac{1}{n}\sum_{i=1}^{n}\Big[-\log p(x_i\mid\hat x_i)"
                 r" + \beta\,\frac{1}{2}\sum_{d}\left(\mu_{id}^2 + e^{v_{id}} - v_{id} - 1"
                 r"\right)\Big],\ -\log p(x\mid\hat x) = \sum_j \tfrac12(x_j-\hat x_j)^2"
                 r" + \tfrac12\log 2\pi\ \text{(gaussian)},\ \sum_j \max(\hat x_j,0)"
                 r" - \hat x_j x_j + \log(1+e^{-|\hat x_j|})\ \text{(bernoulli)}"),
        description=(
            "The VAE objective: the decoder's negative log-likelihood of the data, summed "
            "over features, plus beta times gaussian_kl of the encoder's posterior. "
            "likelihood='gaussian': unit-variance Gaussian with mean `recon` (the "
            "log(2 pi)/2 constant included, so it is a true bound); 'bernoulli': `recon` are "
            "logits and targets in [0, 1]. beta != 1 is the beta-VAE. Gradients go to recon, "
            "mu and logvar; `none` gives one loss per sample."),
        citation="Kingma & Welling (2014), Auto-Encoding Variational Bayes; "
                 "Higgins et al. (2017), beta-VAE",
        reference=neg_elbo_reference,
        make_inputs=elbo_inputs,
        options={"beta": 1.0, "likelihood": "gaussian", "reduction": "mean"},
        check_options=reductions() + [
            {"likelihood": "bernoulli"}, {"likelihood": "bernoulli", "reduction": "sum"},
            {"likelihood": "bernoulli", "reduction": "none", "beta": 0.25},
            {"beta": 4.0, "reduction": "none"}, {"beta": 0.0}],
        grad_inputs=("recon", "mu", "logvar"),
        sizes={"quick": [8, 33], "default": [2**10, 2**13, 2**15],
               "large": [2**14, 2**16]},
        x_name="samples",
        input_params={"quick": {"features": 96, "latent": 16},
                      "default": {"features": 784, "latent": 32},
                      "large": {"features": 3072, "latent": 128}},
        flops=_elbo_flops,
        edge_cases=ELBO_EDGE_CASES,
    ))


@hookimpl
def register_implementations(register):
    triton_kw = {"backend": "triton", "devices": ("cuda",), "grad_in_forward": True,
                 "requires": ("triton",)}
    register("gaussian_kl", Impl(
        "torch", gaussian_kl_torch, kind="baseline", backend="torch",
        description="torch.distributions.kl_divergence(Normal(mu, sigma), Normal(0, 1))"))
    register("gaussian_kl", Impl(
        "triton", gaussian_kl_triton, bytes_model=streamed("mu", "logvar"), **triton_kw,
        description="pointwise template over (mu, logvar) (mean/sum: one pass, gradients "
                    "in the forward); aligned-rows template for per-sample KLs"))
    register("neg_elbo", Impl(
        "torch", neg_elbo_torch, kind="baseline", backend="torch",
        description="F.mse_loss / F.binary_cross_entropy_with_logits + "
                    "torch.distributions.kl_divergence"))
    register("neg_elbo", Impl(
        "triton", neg_elbo_triton, bytes_model=streamed("recon", "mu", "logvar"), **triton_kw,
        description="two launches of the templates, likelihood and KL: each input read "
                    "once, gradients in the forward"))
