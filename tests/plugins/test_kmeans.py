"""The kmeans plugin's losses (soft_kmeans, wcss) on the shared tester."""

from loss_tester import LossTester


class TestSoftKmeans(LossTester):
    loss = "soft_kmeans"


class TestWcss(LossTester):
    loss = "wcss"
