"""The svm plugin (hinge, squared_hinge, margin_ranking, multiclass_hinge): exact zero
gradients past the margin, odd row shapes, validation, for every implementation of each
loss, Triton included (under the interpreter on CPU), against float64 formulas written
independently of the plugin's references (``tests/classic_cases.py``); the standard
per-loss tests are its `LossTester`s.
"""

import pytest
import torch
import lossreg
from family_helpers import DEVICE, implementations, rand, randn
from classic_cases import (
    BAD,
    ROW_SHAPES,
    assert_close,
    gen,
    leaf,
    multiclass_hinge_expected,
    pm1,
    reduce,
    samme_expected,
)
from loss_tester import LossTester


# ---------------------------------------------------------------- zero gradient past the margin
def past_margin_inputs(name, g):
    """Inputs where the first half of the terms is far past the margin."""
    if name in ("hinge", "squared_hinge"):
        y = pm1(g, 3001)
        f = randn(g, 3001) * 2
        f[:1500] = y[:1500] * (1.0 + rand(g, 1500) * 1e3 + 1e-3)
        return {"input": f, "target": y}, slice(0, 1500)
    if name == "margin_ranking":
        y = pm1(g, 3001)
        a, b = randn(g, 3001), randn(g, 3001)
        a[:1500] = b[:1500] + y[:1500] * (1.01 + rand(g, 1500) * 1e3)
        return {"input1": a, "input2": b, "target": y}, slice(0, 1500)
    s = randn(g, 301, 10)  # multiclass_hinge: label scores far above every other
    t = torch.randint(0, 10, (301,), generator=g).to(DEVICE)
    s[:150].scatter_(1, t[:150, None], 1e3)
    return {"input": s, "target": t}, slice(0, 150)


@pytest.mark.parametrize(
    "name,impl", implementations("hinge", "squared_hinge", "margin_ranking", "multiclass_hinge"))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_terms_past_the_margin_have_exactly_zero_gradient(name, impl, reduction):
    inputs, past = past_margin_inputs(name, gen(5))
    opts = {"margin": 1.0, "reduction": reduction}
    grad_keys = [k for k in ("input", "input1", "input2") if k in inputs]
    leaves = {k: leaf(v) if k in grad_keys else v for k, v in inputs.items()}
    out = impl.fn(**leaves, **opts)
    if reduction == "none":
        assert torch.equal(out[past], torch.zeros_like(out[past]))
    cot = rand(gen(6), *out.shape) + 0.5
    grads = torch.autograd.grad(out, [leaves[k] for k in grad_keys], cot)
    ref = lossreg.get(name).reference
    ref_leaves = {k: leaf(v) if k in grad_keys else v for k, v in inputs.items()}
    ref_grads = torch.autograd.grad(ref(**ref_leaves, **opts),
                                    [ref_leaves[k] for k in grad_keys], cot)
    for k, got, want in zip(grad_keys, grads, ref_grads):
        assert torch.equal(got[past], torch.zeros_like(got[past])), k
        assert got[past.stop:].abs().sum() > 0, k  # the rest does get gradients
        assert_close(got, want, torch.float32, f"grad {k}")


@pytest.mark.parametrize("name,impl", implementations("multiclass_hinge"))
@pytest.mark.parametrize("rows,classes", ROW_SHAPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_rowwise_losses_at_odd_shapes(name, impl, rows, classes, reduction):
    g = gen(rows * classes + len(reduction))
    s = randn(g, rows, classes, scale=2.0)
    t = torch.randint(0, classes, (rows,), generator=g).to(DEVICE)
    sl, s64 = leaf(s), leaf(s.double())
    if name == "samme":
        configs = [({}, lambda: samme_expected(s64, t))]
    else:
        w = rand(g, classes) + 0.5
        configs = [
            ({"margin": 1.0, "p": 1}, lambda: multiclass_hinge_expected(s64, t, 1.0, 1, None)),
            ({"margin": 0.5, "p": 2, "weight": w},
             lambda: multiclass_hinge_expected(s64, t, 0.5, 2, w.double())),
        ]
    for opts, expected_rows in configs:
        out = impl.fn(input=sl, target=t, reduction=reduction, **opts)
        expected = reduce(expected_rows(), reduction)
        assert_close(out, expected, torch.float32, f"loss {opts}")
        cot = rand(g, *out.shape) + 0.5
        (got,) = torch.autograd.grad(out, sl, cot)
        (want,) = torch.autograd.grad(expected, s64, cot.double())
        assert_close(got, want, torch.float32, f"grad {opts}")


@pytest.mark.parametrize(
    "name,impl,kwargs,exc,message",
    [pytest.param(name, p.values[1], kwargs, exc, msg, id=f"{p.id}-{i}")
     for i, (name, kwargs, exc, msg) in enumerate(BAD)
     for p in implementations(name)
     if lossreg.get(name).plugin == "svm"])
def test_every_implementation_rejects_bad_input_alike(name, impl, kwargs, exc, message):
    with pytest.raises(exc, match=message):
        impl.fn(**kwargs)


class TestHinge(LossTester):
    loss = "hinge"


class TestMarginRanking(LossTester):
    loss = "margin_ranking"


class TestMulticlassHinge(LossTester):
    loss = "multiclass_hinge"


class TestSquaredHinge(LossTester):
    loss = "squared_hinge"
