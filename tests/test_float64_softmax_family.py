"""float64 is float64 in the softmax family (issue 18.1): every implementation that
accepts float64 computes and accumulates in it, the Triton kernels (interpreter) included.

A float32 accumulator shows as errors of ~1e-8 relative, far above float64's 1e-10; the
hand-made case below shows it as a wrong answer: the loss of a confident row is 4.08e-11,
which float32 rounds to 0, and the hidden gradient's sign flips."""

import pytest
import torch

import lossreg
from lossreg.planning import runnable
from lossreg.spec import Case
from lossreg.verify import compare_tensors, to64

FAMILY = ("cross_entropy", "perplexity", "causal_lm", "seq2seq", "mlm", "kl_distillation",
          "fused_linear_cross_entropy", "fused_linear_distillation", "jsd", "tvd")


def _impls(loss, dtype="float64"):
    spec = lossreg.get(loss)
    return [name for name, impl in spec.implementations.items()
            if name not in ("reference", "compile") and runnable(impl, "cpu", dtype) is None]


def _flce_params():
    return [pytest.param(name) for name in _impls("fused_linear_cross_entropy")]


@pytest.mark.parametrize("impl", _flce_params())
def test_confident_row_keeps_its_tiny_loss_and_gradient_sign(impl):
    """logits [1, -1.5, 25], target 2: loss log(1 + e^-24 + e^-26.5) = 4.085e-11 and
    d loss / d hidden = e^-24 (1, 0) + e^-26.5 (0, 1) - (e^-24 + e^-26.5)(25, 0)."""
    fn = lossreg.get("fused_linear_cross_entropy").implementations[impl].fn
    hidden = torch.tensor([[1.0, -2.0]], dtype=torch.float64, requires_grad=True)
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0], [25.0, 0.0]], dtype=torch.float64)
    bias = torch.tensor([0.0, 0.5, 0.0], dtype=torch.float64)
    loss = fn(hidden, weight, torch.tensor([2]), bias=bias)
    (grad,) = torch.autograd.grad(loss, hidden)
    a, b = torch.exp(torch.tensor(-24.0, dtype=torch.float64)), torch.exp(
        torch.tensor(-26.5, dtype=torch.float64))
    expected_loss = torch.log1p(a + b)
    expected_grad = torch.stack([a - 25 * (a + b), b])[None]
    assert float(loss) == pytest.approx(float(expected_loss), rel=1e-10)
    assert float(expected_loss) == pytest.approx(4.085e-11, rel=1e-3)
    # against the float64 reference at float64's tolerance, as the harness judges
    ref_h = hidden.detach().clone().requires_grad_(True)
    ref = lossreg.get("fused_linear_cross_entropy").reference(ref_h, weight, torch.tensor([2]),
                                                              bias=bias)
    (ref_grad,) = torch.autograd.grad(ref, ref_h)
    assert torch.allclose(grad, ref_grad, rtol=1e-10, atol=0)
    # and against the closed form: softmax - onehot holds 1 - p_y = 4e-11 only to
    # float64's absolute 1e-16 (3e-6 relative), in the reference as everywhere; a
    # float32 accumulator gives 0 or the wrong sign
    assert torch.allclose(grad, expected_grad, rtol=1e-5, atol=0)
    assert grad[0, 0] < 0


CASES = [(loss, impl) for loss in FAMILY for impl in _impls(loss)]


@pytest.mark.parametrize("loss, impl", CASES)
def test_random_float64_inputs_at_float64_tolerance(loss, impl):
    """Fresh random float64 inputs at the quick size, default options and one of the
    spec's option sets: forward and gradients within the float64 tolerance (1e-10)."""
    spec = lossreg.get(loss)
    fn = spec.implementations[impl].fn
    rtol, atol = spec.tolerance("float64")
    option_sets = [dict(spec.options)] + [{**spec.options, **o} for o in spec.check_options[-1:]]
    for seed, opts in enumerate(option_sets):
        inputs = spec.make_inputs(Case(n=spec.sizes["quick"][0], dtype=torch.float64,
                                       seed=100 + seed, params=spec.case_params("quick", opts)))
        names = spec.grad_names(inputs)
        leaves = {k: v.detach().clone().requires_grad_(True) if k in names else v
                  for k, v in inputs.items()}
        l64 = {k: v.detach().clone().requires_grad_(True) if k in names else v
               for k, v in to64(inputs).items()}
        try:
            out = fn(**leaves, **opts)
        except lossreg.UnsupportedOption:
            continue
        ref = spec.reference(**l64, **opts)
        assert out.dtype == torch.float64
        verdict = compare_tensors(out, ref, rtol, atol)
        assert verdict.ok, f"{opts}: {verdict.message}"
        cot = torch.rand(ref.shape, dtype=torch.float64,
                         generator=torch.Generator().manual_seed(seed)) + 0.5
        grads = torch.autograd.grad(out, [leaves[k] for k in names], cot)
        grads64 = torch.autograd.grad(ref, [l64[k] for k in names], cot)
        for k, g, g64 in zip(names, grads, grads64):
            assert g.dtype == torch.float64
            verdict = compare_tensors(g, g64, rtol, atol, what=f"grad of {k}")
            assert verdict.ok, f"{opts}: {verdict.message}"
