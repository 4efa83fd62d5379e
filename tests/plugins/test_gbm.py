"""The gbm plugin's losses (huber, mae, quantile) on the shared tester."""

from loss_tester import LossTester


class TestHuber(LossTester):
    loss = "huber"


class TestMae(LossTester):
    loss = "mae"


class TestQuantile(LossTester):
    loss = "quantile"
