"""The decision_tree plugin's losses (entropy_impurity, gini_impurity, soft_split_gini) on the shared tester."""

from loss_tester import LossTester


class TestEntropyImpurity(LossTester):
    loss = "entropy_impurity"


class TestGiniImpurity(LossTester):
    loss = "gini_impurity"


class TestSoftSplitGini(LossTester):
    loss = "soft_split_gini"
