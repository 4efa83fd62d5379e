"""The knn plugin's losses (batch_hard_triplet, cosine_embedding, triplet) on the shared tester."""

from loss_tester import LossTester


class TestBatchHardTriplet(LossTester):
    loss = "batch_hard_triplet"


class TestCosineEmbedding(LossTester):
    loss = "cosine_embedding"


class TestTriplet(LossTester):
    loss = "triplet"
