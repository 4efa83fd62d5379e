"""The svm plugin's losses (hinge, margin_ranking, multiclass_hinge, squared_hinge) on the shared tester."""

from loss_tester import LossTester


class TestHinge(LossTester):
    loss = "hinge"


class TestMarginRanking(LossTester):
    loss = "margin_ranking"


class TestMulticlassHinge(LossTester):
    loss = "multiclass_hinge"


class TestSquaredHinge(LossTester):
    loss = "squared_hinge"
