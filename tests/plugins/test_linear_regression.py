"""The linear_regression plugin's loss (mse) on the shared tester."""

from loss_tester import LossTester


class TestMse(LossTester):
    loss = "mse"
