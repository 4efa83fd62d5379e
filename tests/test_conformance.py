"""Every registered loss, whoever registered it, must meet the contract: this file is
parametrized over the registry, so a new family is tested by being registered."""

import pytest
import torch

import lossreg
from lossreg.planning import runnable
from lossreg.spec import Case

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


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_every_implementation_passes_check_on_cpu(spec):
    df = lossreg.check([spec.name], device="cpu")
    bad = df[df.status.isin(["fail", "error"])]
    assert bad.empty, bad[["impl", "check", "n", "params", "message"]].to_string()
    ran = set(df[df.status == "ok"].impl)
    expected = {i.name for i in spec.implementations.values()
                if i.backend != "compile" and runnable(i, "cpu", "float32") is None}
    assert ran == expected
