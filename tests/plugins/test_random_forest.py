"""The random_forest plugin's losses (forest_gini, split_variance) on the shared tester."""

from loss_tester import LossTester


class TestForestGini(LossTester):
    loss = "forest_gini"


class TestSplitVariance(LossTester):
    loss = "split_variance"
