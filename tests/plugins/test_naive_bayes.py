"""The naive_bayes plugin's losses (gaussian_nll, nll) on the shared tester."""

from loss_tester import LossTester


class TestGaussianNll(LossTester):
    loss = "gaussian_nll"


class TestNll(LossTester):
    loss = "nll"
