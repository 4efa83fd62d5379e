"""The autoencoder plugin's losses (masked_reconstruction, reconstruction) on the shared tester."""

from loss_tester import LossTester


class TestMaskedReconstruction(LossTester):
    loss = "masked_reconstruction"


class TestReconstruction(LossTester):
    loss = "reconstruction"
