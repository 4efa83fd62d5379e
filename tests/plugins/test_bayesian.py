"""The bayesian plugin's losses (gaussian_kl, neg_elbo) on the shared tester."""

from loss_tester import LossTester


class TestGaussianKl(LossTester):
    loss = "gaussian_kl"


class TestNegElbo(LossTester):
    loss = "neg_elbo"
