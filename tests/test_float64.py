"""float64 is float64: every CPU implementation that is not a Triton kernel (those are
checked under the interpreter by their own tests) computes in float64 when handed
float64, to the float64 tolerance, for every option set the spec checks.

Each case also proves its input can tell: the same implementation run on the inputs
cast to float32 (the "float32 shadow", what a stray ``.float()`` or a float32 scale
amounts to) must fail the same comparison. An implementation that truly cannot compute
in float64 declares ``dtypes`` without it and is skipped here.
"""

import pytest
import torch

import lossreg
from lossreg import verify
from lossreg.planning import runnable
from lossreg.spec import Case, Impl, UnsupportedOption
from lossreg.tolerances import default_tolerance

TOL = default_tolerance("float64")


def _cases():
    for spec in lossreg.losses():
        for impl in spec.implementations.values():
            if impl.uses_triton or impl.backend == "compile" or \
                    runnable(impl, "cpu", "float64") is not None:
                continue
            yield pytest.param(spec, impl, id=f"{spec.name}-{impl.name}")


def _float32_shadow(impl: Impl) -> Impl:
    def fn(**kw):
        cast = {k: v.float() if torch.is_tensor(v) and v.dtype == torch.float64 else v
                for k, v in kw.items()}
        out = impl.fn(**cast)
        return out.double()

    return Impl("float32_shadow", fn)


def _hard_inputs(spec, options, seed=0):
    case = Case(min(spec.sizes["quick"]), torch.float64, "cpu", seed=seed,
                params=spec.case_params("quick", options))
    return spec.make_inputs(case)


@pytest.mark.parametrize("spec,impl", list(_cases()))
def test_float64_to_float64_tolerance(spec, impl):
    failures = []
    for options in spec.option_sets():
        inputs = _hard_inputs(spec, options)
        try:
            verdicts = (("forward", verify.check_forward(spec, impl, inputs, options, TOL)),
                        ("gradient", verify.check_gradient(spec, impl, inputs, options, TOL, 1)))
        except UnsupportedOption:  # a peer library without this option set
            continue
        for what, v in verdicts:
            if not v.ok:
                failures.append(f"{options} {what}: {v.message}")
    assert not failures, "\n".join(failures)
    # the input tells float64 from float32: the float32 shadow fails the same check
    options = dict(spec.options)
    inputs = _hard_inputs(spec, options)
    shadow = _float32_shadow(impl)
    fwd = verify.check_forward(spec, shadow, inputs, options, TOL)
    grad = verify.check_gradient(spec, shadow, inputs, options, TOL, 1)
    assert not (fwd.ok and grad.ok), "inputs too easy: float32 passes at the float64 tolerance"
