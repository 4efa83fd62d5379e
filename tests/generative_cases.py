"""Shared pieces of the autoencoder and bayesian plugins' tests: the incoming gradient
per sample, and one bad input per kind of mistake.
"""

import torch
from family_helpers import rand, randn


def per_row_scale(cot, reduction, n, ndim):
    """The incoming gradient of each sample, broadcast over its features."""
    c = cot.double().cpu() / (n if reduction == "mean" else 1)
    return c.reshape(c.shape + (1,) * (ndim - 1)) if reduction == "none" else c


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
