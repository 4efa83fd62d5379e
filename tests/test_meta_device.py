"""The meta-device detector of ``tests/meta_device.py`` (which `loss_tester.LossTester`
runs on every loss's input makers) finds tensors built off ``case.device``."""

import pytest
import torch

from meta_device import misplaced

# ---------------------------------------------------------------- the detector itself
def _good(case):
    x = case.randn(5)
    return {"input": x, "target": torch.tensor([1.0, 2.0], device=x.device),
            "idx": torch.arange(3, device=case.device).sort().values}


def _needs_values_good(case):
    x = case.randn(6)
    k = int((x > 0).sum().item())  # data-dependent: meta cannot run this
    return {"input": x, "index": torch.arange(k + 1, device=case.device)}


def _needs_values_bad(case):
    x = case.randn(6)
    k = int((x > 0).sum().item())
    return {"input": x, "index": torch.arange(k + 1)}


def _moved_later(case):
    x = case.randn(4)
    return {"input": x, "target": torch.tensor([0, 1, 0, 1]).to(x.device)}


def _forgot_device(case):
    return {"input": case.randn(4), "target": torch.zeros(4)}


def _forgot_device_mixed(case):
    x = case.randn(4)
    return {"input": x, "target": x.detach() * 0 + torch.ones(4)}


@pytest.mark.parametrize("make,bad", [
    (_good, False), (_needs_values_good, False), (_moved_later, False),
    (_needs_values_bad, True), (_forgot_device, True), (_forgot_device_mixed, True),
])
def test_detector_finds_tensors_off_the_device(make, bad):
    found = misplaced(make, dict(n=4, dtype=torch.float32, seed=0, params={}))
    assert bool(found) == bad, found
