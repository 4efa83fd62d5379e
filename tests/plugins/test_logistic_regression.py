"""The logistic_regression plugin's losses (bce, bce_with_logits) on the shared tester."""

from loss_tester import LossTester


class TestBce(LossTester):
    loss = "bce"


class TestBceWithLogits(LossTester):
    loss = "bce_with_logits"
