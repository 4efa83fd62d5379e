"""Low-precision verdicts: no tolerance hides a wrong implementation, and every widened
16-bit tolerance is needed and tight.

`OnePercentWrong` is the reference with its output scaled by 1.01 (so its gradients
too). Every dtype's check must reject it, for a representative set of losses that
includes every loss whose 16-bit tolerance was widened (`WIDENED`): in bfloat16 (rtol
2e-2) and at a widened tolerance the norm alone would let it through, and
`lossreg.lowprec.systematic_error` (a fitted common factor beyond rounding) is what
rejects it.
"""

import pytest
import torch

import lossreg
from lossreg import lowprec, verify
from lossreg.spec import DTYPES, Case, Impl
from lossreg.tolerances import DEFAULT_TOLERANCES

#: loss -> the 16-bit dtypes whose tolerance the spec widens (reason in its description);
#: none today: triplet's were, until its 16-bit rows were computed in float32
WIDENED: dict[str, tuple[str, ...]] = {}
REPRESENTATIVE = ["mse", "cross_entropy", "nll", "hinge", "bce_with_logits", "wcss",
                  "triplet", *WIDENED]


class _OnePercentValue(torch.autograd.Function):
    """x * 1.01 formed in float32 and rounded once; the gradient passes through."""

    @staticmethod
    def forward(ctx, x):
        return (x.float() * 1.01).to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        return g


class _OnePercentGrad(torch.autograd.Function):
    """x itself; the gradient g * 1.01, formed in float32 and rounded once. (In a 16-bit
    dtype ``out * 1.01`` would round the factor itself into the cotangent, bfloat16
    1.0078, and test a 0.8% error, not a 1% one.)"""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return (g.float() * 1.01).to(g.dtype)


def one_percent_wrong(spec) -> Impl:
    """The reference with its output and every input's gradient 1% too large."""
    def fn(**kw):
        kw = {k: _OnePercentGrad.apply(v) if torch.is_tensor(v) and v.requires_grad else v
              for k, v in kw.items()}
        return _OnePercentValue.apply(spec.reference(**kw))
    return Impl("one_percent_wrong", fn)


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


#: (loss, dtype) whose 1%-wrong implementation the check cannot yet reject: open
UNRESOLVED = {
    # the mean gradient's norm sits on ~32 elements (the targets' p - 1), whose bfloat16
    # spacing (0.8%) rounds a 1% factor to 0.7% on average, within two unit roundoffs
    # plus four standard errors of a 32-element fit
    ("cross_entropy", "bfloat16"): "a 1% factor on 32 bfloat16 values is not resolvable",
}


def _fixture_params():
    for name in REPRESENTATIVE:
        for dtype in DTYPES:
            reason = UNRESOLVED.get((name, dtype))
            marks = pytest.mark.xfail(strict=True, reason=reason) if reason else ()
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
KNOWN_OPEN: dict[tuple[str, str], list] = {}


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
    # a 1% factor is one under per-element noise of a few u (two shared roundings, 2u
    # = 0.78%, are allowed, so 2% noise over 4000 values would blur it)
    assert "common factor" in lowprec.systematic_error(torch.bfloat16,
                                                       ref * 1.01 + noise / 2, ref, 0.2)
    # the default bfloat16 rtol (2e-2) passes a 1% factor on the norm: the fit rejects it
    assert "common factor" in lowprec.systematic_error(torch.bfloat16, ref * 1.01, ref, 2e-2)
    # ... unless the result passed only on the absolute floor (noise near zero)
    assert lowprec.systematic_error(torch.bfloat16, ref * 1.01, ref, 2e-2,
                                    by_rtol=False) == ""
    assert "common factor" in lowprec.systematic_error(torch.bfloat16, ref * 1.01, ref, 0.2,
                                                       by_rtol=False)
    # below an rtol of 1% the norm rejects a 1% factor by itself
    assert lowprec.systematic_error(torch.float16, ref * 1.01, ref, 2e-3) == ""
    assert lowprec.systematic_error(torch.float32, ref * 1.01, ref, 1.0) == ""
    # a shared value rounded (nll's -1/n): within one unit roundoff, passes; 1% fails
    shared = torch.full((1000,), -1 / 999, dtype=torch.float64)
    assert lowprec.systematic_error(torch.bfloat16, shared.bfloat16().double(), shared,
                                    2e-2) == ""
    assert "common factor" in lowprec.systematic_error(torch.bfloat16, shared * 1.01,
                                                       shared, 2e-2)
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
