"""Every registered loss, whoever registered it, must meet the contract: this file is
parametrized over the registry, so a new family is tested by being registered."""

import pytest
import torch

import lossreg
from lossreg import verify
from lossreg.planning import runnable
from lossreg.spec import DTYPES, Case, UnsupportedOption

SPECS = lossreg.losses()
IDS = [s.name for s in SPECS]


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_spec_is_complete(spec):
    assert spec.formula.strip() and spec.family and spec.plugin
    assert "reference" in spec.implementations and "compile" in spec.implementations
    inputs = spec.make_inputs(Case(n=min(spec.sizes["quick"]), seed=3))
    assert inputs and all(k for k in inputs)
    assert spec.grad_names(inputs), "at least one input should take a gradient"
    assert spec.model("bytes", inputs, "full") > 0


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_reference_is_differentiable(spec):
    inputs = spec.make_inputs(Case(n=min(spec.sizes["quick"]), dtype=torch.float64, seed=4))
    names = spec.grad_names(inputs)
    leaves = {k: v.requires_grad_(True) if k in names else v for k, v in inputs.items()}
    out = spec.reference(**leaves, **spec.options)
    grads = torch.autograd.grad(out.sum(), [leaves[k] for k in names], allow_unused=True)
    assert any(g is not None and torch.isfinite(g).all() for g in grads)


#: `lossreg check` covers these dtypes by default on a CPU. float32 runs the whole
#: check (every quick size, seed, option set and edge case); each other dtype runs a
#: cheaper pass through the same verdict code: the smallest quick size, one seed, every
#: option set, and the edge cases, so that `make test` pays about one extra float32
#: check for all of them together instead of three.
EXTRA_DTYPES = ("float64", "bfloat16", "float16")


def _option_sets(spec):
    sets = [dict(spec.options)]
    for extra in spec.check_options:
        merged = {**spec.options, **extra}
        if merged not in sets:
            sets.append(merged)
    return sets


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_every_implementation_passes_check_on_cpu(spec):
    df = lossreg.check([spec.name], device="cpu", dtypes=["float32"])
    bad = df[df.status.isin(["fail", "error"])]
    assert bad.empty, bad[["impl", "check", "n", "params", "message"]].to_string()
    ran = set(df[df.status == "ok"].impl)
    expected = {i.name for i in spec.implementations.values()
                if i.backend != "compile" and runnable(i, "cpu", "float32") is None}
    assert ran == expected


@pytest.mark.parametrize("dtype", EXTRA_DTYPES)
@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_every_implementation_passes_other_dtypes_on_cpu(spec, dtype):
    n, dt, tol = min(spec.sizes["quick"]), DTYPES[dtype], spec.tolerance(dtype)
    cases = [(f"{opts}", opts, spec.make_inputs(Case(n, dt, "cpu", seed=0, params=spec.case_params(
        "quick", opts)))) for opts in _option_sets(spec)]
    cases += [(f"edge {name}", dict(spec.options), make(Case(1, dt, "cpu", seed=11, params=(
        spec.case_params("quick", spec.options))))) for name, make in spec.edge_cases.items()]
    failures, ran = [], 0
    for impl in spec.implementations.values():
        if impl.backend == "compile" or runnable(impl, "cpu", dtype) is not None:
            continue
        ran += 1
        for label, opts, inputs in cases:
            try:
                verdicts = (verify.check_forward(spec, impl, inputs, opts, tol),
                            verify.check_gradient(spec, impl, inputs, opts, tol, 1))
            except UnsupportedOption:
                continue
            failures += [f"{impl.name} {label}: {v.message}" for v in verdicts if not v.ok]
    assert ran, f"no implementation runs {dtype} on a CPU"
    assert not failures, "\n".join(failures)
