"""The adaboost plugin's losses (exponential, samme) on the shared tester."""

from loss_tester import LossTester


class TestExponential(LossTester):
    loss = "exponential"


class TestSamme(LossTester):
    loss = "samme"
