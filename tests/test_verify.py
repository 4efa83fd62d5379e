"""`lossreg.verify.compare_tensors` judges like with like: where the float64 reference
overflows the output's dtype when rounded to it, the expected value is that inf."""

import pytest
import torch

from lossreg.tolerances import default_tolerance
from lossreg.verify import compare_tensors, rounded_overflow

F16_TOL = default_tolerance("float16")


def _ref():
    """float64 values around a mean of 3e7 (far beyond float16's 65504), of both signs,
    beside ordinary ones."""
    g = torch.Generator().manual_seed(5)
    ref = torch.randn(40, generator=g, dtype=torch.float64) * 3
    ref[::4] = 3.1e7 + torch.rand(10, generator=g, dtype=torch.float64)
    ref[1::8] = -2.2e5
    return ref


def test_the_correctly_rounded_overflow_passes():
    ref = _ref()
    out = ref.to(torch.float16)
    assert torch.isinf(out).sum() == 15
    v = compare_tensors(out, ref, *F16_TOL)
    assert v.ok, v.message


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_a_scalar_whose_rounding_overflows_must_be_that_inf(dtype):
    big = torch.finfo(dtype).max * 4.0
    ref = torch.tensor(big, dtype=torch.float64)
    assert compare_tensors(torch.tensor(float("inf"), dtype=dtype), ref, 1e-3, 1e-3).ok
    finite = torch.tensor(torch.finfo(dtype).max, dtype=dtype)
    v = compare_tensors(finite, ref, 1e-3, 1e-3)
    assert not v.ok and "NaN/inf" in v.message
    assert not compare_tensors(torch.tensor(-float("inf"), dtype=dtype), ref, 1e-3, 1e-3).ok
    assert not compare_tensors(torch.tensor(float("nan"), dtype=dtype), ref, 1e-3, 1e-3).ok


def test_a_finite_output_where_the_rounded_reference_overflows_fails():
    ref = _ref()
    out = ref.to(torch.float16)
    out[4] = 65504.0  # the largest float16: still not the correctly rounded 3.1e7
    v = compare_tensors(out, ref, *F16_TOL)
    assert not v.ok and "1 positions" in v.message


def test_an_inf_of_the_wrong_sign_fails():
    ref = _ref()
    out = ref.to(torch.float16)
    out[1] = float("inf")  # the reference is -2.2e5: -inf in float16
    assert not compare_tensors(out, ref, *F16_TOL).ok


def test_an_inf_where_the_rounded_reference_is_finite_still_fails():
    ref = _ref()
    out = ref.to(torch.float16)
    out[2] = float("inf")
    assert not compare_tensors(out, ref, *F16_TOL).ok


def test_the_finite_part_is_still_judged():
    ref = _ref()
    out = ref.to(torch.float16)
    finite = torch.isfinite(out)
    out[finite] = (ref[finite] * 1.01).to(torch.float16)
    v = compare_tensors(out, ref, *F16_TOL)
    assert not v.ok and "rel_err" in v.message


def test_float64_outputs_and_representable_references_are_unchanged():
    ref = _ref()
    assert rounded_overflow(ref, torch.float64) is ref
    small = torch.randn(7, dtype=torch.float64)
    assert rounded_overflow(small, torch.float16) is small
    # a float64 output never sees an inf the float64 reference lacks
    assert not compare_tensors(torch.full_like(ref, float("inf")), ref, 1e-10, 1e-14).ok


# the losses whose 16-bit rows this round made pass (docs/numerics.md, round 3): the
# default tolerances, no widening; a 1%-wrong reference must still fail every dtype
# (bfloat16's 2e-2 through lossreg.lowprec's common-factor fit)
ROUND3 = ["mse", "cpo", "entropy_impurity", "cosine_embedding", "gaussian_nll",
          "cross_entropy", "squared_hinge", "dpo"]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("loss", ROUND3)
def test_a_one_percent_wrong_reference_still_fails_in_16_bits(loss, dtype):
    import lossreg
    from test_lowprec import UNRESOLVED, _rows, one_percent_wrong

    if (loss, dtype) in UNRESOLVED:
        pytest.skip(UNRESOLVED[loss, dtype])
    spec = lossreg.get(loss)
    assert spec.tolerance(dtype) == default_tolerance(dtype)
    wrong_passes = all(v.ok for v in _rows(spec, one_percent_wrong(spec), dtype, spec.options))
    if wrong_passes and (loss, dtype) == ("gaussian_nll", "bfloat16"):
        # open, as before this round: 1/var makes the gradients heavy-tailed (n = 4099:
        # effective count 120 for input, 13.5 for var), so the fit's allowance, two unit
        # roundoffs plus four standard errors (1.1% and 2.0%), exceeds the 1% factor
        pytest.xfail("a 1% factor on heavy-tailed bfloat16 gradients is not resolvable")
    assert not wrong_passes
    bad = [v.message for v in _rows(spec, spec.implementations["reference"], dtype,
                                    spec.options) if not v.ok]
    assert not bad, bad
