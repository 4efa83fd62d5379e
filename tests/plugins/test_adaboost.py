"""The adaboost plugin (exponential, samme): overflow exactly where the reference
overflows, odd row shapes, validation, for every implementation of each loss, Triton
included (under the interpreter on CPU), against float64 formulas written independently
of the plugin's references (``tests/classic_cases.py``); the standard per-loss tests are
its `LossTester`s.
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


# ---------------------------------------------------------------- exponential overflow
#: margins -y f bracketing each dtype's overflow threshold log(max), plus far beyond
THRESHOLD = {torch.float32: 88.7228, torch.float16: 11.0898, torch.bfloat16: 88.7}


def exponential_inputs(g, dtype):
    t = THRESHOLD[dtype]
    near = torch.linspace(t - 0.05, t + 0.05, 101, dtype=torch.float64)
    margins = torch.cat([near, torch.tensor([1e4, -1e4, 200.0, -200.0, 60.0, 30.0]),
                         torch.randn(400, generator=g, dtype=torch.float64) * 3])
    y = pm1(g, margins.numel(), dtype=dtype)
    f = (-y.double().cpu() * margins).to(dtype).to(DEVICE)
    return f, y


@pytest.mark.parametrize("name,impl", implementations("exponential"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_exponential_overflows_exactly_where_the_reference_does(name, impl, dtype):
    ref = lossreg.get(name).reference
    g = gen({torch.float32: 1, torch.float16: 2, torch.bfloat16: 3}[dtype])
    f, y = exponential_inputs(g, dtype)
    out = impl.fn(input=f, target=y, reduction="none")
    expected = ref(input=f, target=y, reduction="none")  # eager, in the same dtype
    assert out.dtype == dtype
    assert torch.isinf(expected).any() and torch.isfinite(expected).any()
    assert_close(out, expected, dtype, "loss")

    # reductions: with and without an overflowing term
    finite = torch.isfinite(expected)
    for reduction in ("mean", "sum"):
        for sel in (finite, torch.ones_like(finite)):
            got = impl.fn(input=f[sel], target=y[sel], reduction=reduction)
            want = ref(input=f[sel], target=y[sel], reduction=reduction)
            assert not got.isnan()
            assert bool(torch.isinf(got)) == bool(torch.isinf(want)), reduction

    # gradients: inf where the reference's are, never NaN
    for reduction in ("none", "mean"):
        fl, fr = leaf(f), leaf(f)
        out = impl.fn(input=fl, target=y, reduction=reduction)
        want = ref(input=fr, target=y, reduction=reduction)
        cot = torch.ones_like(out)
        (got_g,), (want_g,) = (torch.autograd.grad(out, fl, cot),
                               torch.autograd.grad(want, fr, cot))
        assert not got_g.isnan().any()
        assert torch.equal(torch.isinf(got_g), torch.isinf(want_g)), reduction
        assert_close(got_g, want_g, dtype, f"grad ({reduction})")


@pytest.mark.parametrize("name,impl", implementations("samme"))
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


@pytest.mark.parametrize("name,impl", implementations("samme"))
def test_samme_overflow_is_inf_not_nan(name, impl):
    g = gen(13)
    s = randn(g, 60, 7)
    t = torch.randint(0, 7, (60,), generator=g).to(DEVICE)
    s[::3].scatter_(1, t[::3, None], -1e4)  # label far below: exp(+1e4/6) = inf
    s[1::3].scatter_(1, t[1::3, None], 1e4)  # far above: exactly 0
    sl, sr = leaf(s), leaf(s)
    out = impl.fn(input=sl, target=t, reduction="none")
    want = lossreg.get(name).reference(input=sr, target=t, reduction="none")
    assert torch.isinf(out[::3]).all() and torch.equal(out[1::3], torch.zeros_like(out[1::3]))
    assert_close(out, want, torch.float32, "loss")
    (got,) = torch.autograd.grad(out, sl, torch.ones_like(out))
    (exp,) = torch.autograd.grad(want, sr, torch.ones_like(want))
    assert_close(got, exp, torch.float32, "grad")


@pytest.mark.parametrize(
    "name,impl,kwargs,exc,message",
    [pytest.param(name, p.values[1], kwargs, exc, msg, id=f"{p.id}-{i}")
     for i, (name, kwargs, exc, msg) in enumerate(BAD)
     for p in implementations(name)
     if lossreg.get(name).plugin == "adaboost"])
def test_every_implementation_rejects_bad_input_alike(name, impl, kwargs, exc, message):
    with pytest.raises(exc, match=message):
        impl.fn(**kwargs)


class TestExponential(LossTester):
    loss = "exponential"


class TestSamme(LossTester):
    loss = "samme"
