"""The dbscan plugin's losses (eps_separation) on the shared tester."""

from loss_tester import LossTester


class TestEpsSeparation(LossTester):
    loss = "eps_separation"
