"""The gbm plugin (huber, mae, quantile): validation, for every implementation of each
loss, Triton included (under the interpreter on CPU), against float64 formulas written
independently of the plugin's references (``tests/classic_cases.py``); the standard
per-loss tests are its `LossTester`s.
"""

import pytest

import lossreg
from family_helpers import implementations
from classic_cases import BAD
from loss_tester import LossTester


@pytest.mark.parametrize(
    "name,impl,kwargs,exc,message",
    [pytest.param(name, p.values[1], kwargs, exc, msg, id=f"{p.id}-{i}")
     for i, (name, kwargs, exc, msg) in enumerate(BAD)
     for p in implementations(name)
     if lossreg.get(name).plugin == "gbm"])
def test_every_implementation_rejects_bad_input_alike(name, impl, kwargs, exc, message):
    with pytest.raises(exc, match=message):
        impl.fn(**kwargs)


class TestHuber(LossTester):
    loss = "huber"


class TestMae(LossTester):
    loss = "mae"


class TestQuantile(LossTester):
    loss = "quantile"
