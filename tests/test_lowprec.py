"""Low-precision verdicts: no tolerance hides a wrong implementation, and every widened
16-bit tolerance is needed and tight.

`OnePercentWrong` is the reference with its output scaled by 1.01 (so its gradients
too). Every dtype's check must reject it, for a representative set of losses that
includes every loss whose 16-bit tolerance was widened (`WIDENED`): there the norm
tolerance alone would let it through, and `lossreg.lowprec.systematic_error` (a fitted
common factor beyond rounding) is what rejects it.
"""

import pytest
import torch

import lossreg
from lossreg import lowprec, verify
from lossreg.spec import DTYPES, Case, Impl
from lossreg.tolerances import DEFAULT_TOLERANCES

#: loss -> the 16-bit dtypes whose tolerance the spec widens (reason in its description)
WIDENED = {"triplet": ("bfloat16", "float16")}
REPRESENTATIVE = ["mse", "cross_entropy", "nll", "hinge", "bce_with_logits", "wcss",
                  *WIDENED]


def one_percent_wrong(spec) -> Impl:
    return Impl("one_percent_wrong", lambda **kw: spec.reference(**kw) * 1.01)


def _rows(spec, impl, dtype, options, seeds=(0, 1, 2)):
    """Forward and gradient verdicts as the harness's check makes them, at the largest
    quick size (its rows fail if any seed fails)."""
    n, tol = max(spec.sizes["quick"]), spec.tolerance(dtype)
    out = []
    for seed in seeds:
        inputs = spec.make_inputs(Case(n, DTYPES[dtype], "cpu", seed=seed,
                                       params=spec.case_params("quick", options)))
        out.append(verify.check_forward(spec, impl, inputs, options, tol))
        out.append(verify.check_gradient(spec, impl, inputs, options, tol, seed))
    return out


def _fixture_params():
    for name in REPRESENTATIVE:
        for dtype in DTYPES:
            marks = ()
            if dtype == "bfloat16" and dtype not in WIDENED.get(name, ()):
                # the default bfloat16 tolerance (rtol 2e-2, and an absolute floor of 4e-3
                # above every element of a mean-reduced gradient) cannot reject a 1% error;
                # the common-factor fit would (beta 0.007-0.008 against a correct
                # reference's 0.001-0.002) but is not yet applied at default tolerances
                marks = pytest.mark.xfail(strict=True, reason="bfloat16 default tolerance "
                                          "is wider than 1%: see docs/numerics.md")
            yield pytest.param(name, dtype, marks=marks, id=f"{name}-{dtype}")


@pytest.mark.parametrize("name,dtype", list(_fixture_params()))
def test_every_dtype_rejects_a_one_percent_wrong_implementation(name, dtype):
    spec = lossreg.get(name)
    rows = _rows(spec, one_percent_wrong(spec), dtype, dict(spec.options))
    assert not all(v.ok for v in rows), f"{name} {dtype}: a 1% wrong implementation passed"
    # ... while the reference itself passes the same verdicts
    bad = [v.message for v in _rows(spec, spec.implementations["reference"], dtype,
                                    dict(spec.options)) if not v.ok]
    assert not bad, bad


#: (loss, dtype) -> option sets (beyond the spec's options) whose 16-bit rows still fail
#: the common-factor fit on the correct reference: open, see docs/numerics.md
KNOWN_OPEN = {
    # cosine distance with margin 0.03: most triplets sit at the hinge's kink, and those
    # that flip in or out of the active set under bfloat16 rounding bias the gradient's
    # fitted factor by -5% (13 standard errors); needs a like-with-like comparison
    ("triplet", "bfloat16"): [{"distance": "cosine", "swap": True, "margin": 0.03}],
}


@pytest.mark.parametrize("name,dtype", [(n, d) for n, ds in WIDENED.items() for d in ds])
def test_widened_tolerance_is_needed_and_tight(name, dtype):
    """The reference in ``dtype`` misses the default tolerance on some option set, passes
    the widened one (and the common-factor fit) on every option set but the known open
    ones, and its worst error is within a factor 4 of the widened bound."""
    spec = lossreg.get(name)
    rtol = spec.tolerance(dtype)[0]
    assert rtol > DEFAULT_TOLERANCES[dtype][0], "not widened"
    worst, failing = 0.0, []
    for extra in [{}] + spec.check_options:
        for v in _rows(spec, spec.implementations["reference"], dtype,
                       {**spec.options, **extra}, seeds=(0,)):
            if not v.ok:
                failing.append(extra)
                break
            worst = max(worst, v.rel or 0.0)
    assert failing == KNOWN_OPEN.get((name, dtype), []), failing
    assert worst > DEFAULT_TOLERANCES[dtype][0], f"{name} {dtype}: default tolerance suffices"
    assert worst > rtol / 4, f"{name} {dtype}: worst rel {worst:.3g}, tolerance {rtol:g}"


def test_common_factor_fit():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(4000, generator=g, dtype=torch.float64)
    noise = ref * 0.02 * torch.randn(4000, generator=g, dtype=torch.float64)
    beta, se, count = lowprec.scale_error(ref * 1.01 + noise, ref)
    assert abs(beta - 0.01) < 4 * se and se < 0.002 and count > 1000
    # noise alone is no factor; a factor is one even under 2% noise; a widened rtol only
    assert lowprec.systematic_error(torch.bfloat16, ref + noise, ref, 0.2) == ""
    assert "common factor" in lowprec.systematic_error(torch.bfloat16, ref * 1.01 + noise,
                                                       ref, 0.2)
    assert lowprec.systematic_error(torch.bfloat16, ref * 1.01, ref, 2e-2) == ""
    assert lowprec.systematic_error(torch.float32, ref * 1.01, ref, 1.0) == ""
    # one element carrying the norm: its rounding is no common factor
    spike = torch.full((100,), 1e-3, dtype=torch.float64)
    spike[0] = 10.0
    assert lowprec.systematic_error(torch.bfloat16, spike * 1.01, spike, 0.2) == ""


def test_interpreter_rounds_bfloat16_to_nearest_even():
    """Under the interpreter a kernel's bfloat16 store rounds as on a GPU (to nearest
    even), not toward zero: mae's mean gradient 1/4099 rounds up to 2^-12, as torch's."""
    from lossreg.kernels import interpreting
    if not interpreting():
        pytest.skip("Triton runs compiled here")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4099, generator=g).bfloat16().requires_grad_(True)
    y = torch.randn(4099, generator=g).bfloat16()
    impls = lossreg.get("mae").implementations
    for cot in (1.0, 0.51953125):
        grads = [torch.autograd.grad(impls[k].fn(x, y, "mean"), [x],
                                     torch.tensor(cot, dtype=torch.bfloat16))[0]
                 for k in ("triton", "torch")]
        assert torch.equal(grads[0], grads[1]), cot


def test_interpreter_bfloat16_dot_multiplies_values():
    """A bfloat16 ``tl.dot`` under the interpreter multiplies values, not their uint16
    bit patterns: wcss's Triton nearest-centroid kernel agrees with the reference."""
    from lossreg.kernels import interpreting
    if not interpreting():
        pytest.skip("Triton runs compiled here")
    spec = lossreg.get("wcss")
    n = min(spec.sizes["quick"])
    inputs = spec.make_inputs(Case(n, torch.bfloat16, "cpu", seed=4,
                                   params=spec.case_params("quick", spec.options)))
    v = verify.check_forward(spec, spec.implementations["triton"], inputs, spec.options,
                             spec.tolerance("bfloat16"))
    assert v.ok, v.message
