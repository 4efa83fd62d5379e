"""The grpo plugin's losses (fused_linear_grpo, grpo) on the shared tester."""

from loss_tester import LossTester


class TestFusedLinearGrpo(LossTester):
    loss = "fused_linear_grpo"
    no_oracle = "tests/test_grpo.py"


class TestGrpo(LossTester):
    loss = "grpo"
    no_oracle = "tests/test_grpo.py"
