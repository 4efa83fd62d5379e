"""Cross-entropy options of fused_linear_cross_entropy (issue 20.5) in every
implementation: class weights, softcap, shift, z-loss returned apart, lse, the
weight-gradient accumulation dtype; each against torch's own F.cross_entropy on the
materialized logits or the float64 reference."""

import pytest
import torch
import torch.nn.functional as F

import lossreg
from lossreg.planning import runnable
from lossreg_plugins.transformers import linear_ce

LOSS = "fused_linear_cross_entropy"


def _impls(dtype="float64"):
    spec = lossreg.get(LOSS)
    return [n for n, i in spec.implementations.items()
            if n not in ("compile", "cce_compile") and runnable(i, "cpu", dtype) is None]


def _inputs(n=29, h=12, v=53, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=dtype)
    weight = torch.randn(v, h, generator=g, dtype=dtype) * 0.6
    target = torch.randint(0, v, (n,), generator=g)
    target[[2, 11]] = -100
    class_weight = torch.rand(v, generator=g, dtype=dtype) + 0.5
    return hidden, weight, target, class_weight


def _call(impl, *args, **kwargs):
    try:
        return lossreg.get(LOSS).implementations[impl].fn(*args, **kwargs)
    except lossreg.UnsupportedOption as exc:
        pytest.skip(str(exc))


@pytest.mark.parametrize("impl", _impls() + ["reference"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_class_weight_softcap_smoothing_match_torch(impl, reduction):
    hidden, weight, target, cw = _inputs()
    hidden.requires_grad_(True)
    out = _call(impl, hidden, weight, target, class_weight=cw, softcap=3.0,
                label_smoothing=0.1, reduction=reduction)
    h64 = hidden.detach().clone().requires_grad_(True)
    logits = 3.0 * torch.tanh((h64 @ weight.T) / 3.0)
    want = F.cross_entropy(logits, target, weight=cw, label_smoothing=0.1, reduction=reduction)
    if reduction == "none":
        want = torch.where(target != -100, want, 0.0)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-13)
    cot = torch.rand_like(want) + 0.5
    (g,) = torch.autograd.grad(out, hidden, cot)
    (g64,) = torch.autograd.grad(want, h64, cot)
    torch.testing.assert_close(g, g64, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("impl", _impls() + ["reference"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_z_loss_and_lse_returned_apart(impl, reduction):
    hidden, weight, target, cw = _inputs(seed=1)
    out, z, lse = _call(impl, hidden, weight, target, z_loss=1e-2, class_weight=cw,
                        reduction=reduction, return_z_loss=True, return_lse=True)
    plain = _call(impl, hidden, weight, target, class_weight=cw, reduction=reduction)
    logits = hidden @ weight.T
    want_lse = torch.logsumexp(logits, dim=1)
    torch.testing.assert_close(lse, want_lse, rtol=1e-12, atol=0)
    keep = target != -100
    rows = 1e-2 * want_lse**2 * keep
    want_z = rows if reduction == "none" else rows.sum() / cw[torch.where(keep, target, 0)][
        keep].sum()
    torch.testing.assert_close(z, want_z, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(out, plain + want_z, rtol=1e-10, atol=1e-14)  # loss includes it


@pytest.mark.parametrize("impl", _impls())
def test_shift_scores_the_next_target_without_the_last_row(impl):
    hidden, weight, target, _ = _inputs(seed=2)
    hidden.requires_grad_(True)
    out = _call(impl, hidden, weight, target, shift=True, reduction="none")
    assert out.shape == (hidden.shape[0] - 1,)
    want = F.cross_entropy(hidden.detach()[:-1] @ weight.T, target[1:], reduction="none")
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-13)
    mean = _call(impl, hidden, weight, target, shift=True)
    (g,) = torch.autograd.grad(mean, hidden)
    assert torch.all(g[-1] == 0) and torch.any(g[:-1] != 0)
    torch.testing.assert_close(mean, want.sum() / (target[1:] != -100).sum(), rtol=1e-10,
                               atol=0)


@pytest.mark.parametrize("impl", ["chunked", "triton"])
def test_bf16_weight_gradient_accumulates_in_float32_by_default(monkeypatch, impl):
    """Many chunks (a 16-row budget): dW summed in bfloat16 drifts; the default float32
    accumulation stays at bfloat16's own rounding of the result."""
    if runnable(lossreg.get(LOSS).implementations[impl], "cpu", "bfloat16"):
        pytest.skip("not runnable here")
    monkeypatch.setattr(linear_ce, "CHUNK_BYTES", 4 * 53 * 16)
    hidden, weight, target, _ = _inputs(n=400, seed=3)
    h16, w16 = hidden.bfloat16(), weight.bfloat16().requires_grad_(True)
    w64 = w16.detach().double().requires_grad_(True)
    (g64,) = torch.autograd.grad(
        lossreg.get(LOSS).reference(h16.double(), w64, target, reduction="sum"), w64)

    def err(accum):
        w = w16.detach().clone().requires_grad_(True)
        out = _call(impl, h16, w, target, reduction="sum", accum_dtype=accum)
        (g,) = torch.autograd.grad(out, w)
        assert g.dtype == torch.bfloat16
        return float((g.double() - g64).norm() / g64.norm())

    default, narrow = err(None), err("bfloat16")
    assert default < 1e-2
    assert default < narrow


@pytest.mark.parametrize("kwargs, match", [
    ({"class_weight": torch.ones(5, dtype=torch.float64)}, "class_weight must be None or"),
    ({"accum_dtype": "int8"}, "accum_dtype must be None or one of"),
    ({"shift": "yes"}, "shift must be True or False"),
])
def test_bad_options_are_named(kwargs, match):
    hidden, weight, target, _ = _inputs()
    for impl in _impls() + ["reference"]:
        with pytest.raises(ValueError, match=match):
            lossreg.get(LOSS).implementations[impl].fn(hidden, weight, target, **kwargs)


# ------------------------------------------------------------------ causal_lm
def _causal_impls():
    spec = lossreg.get("causal_lm")
    return [n for n, i in spec.implementations.items()
            if n != "compile" and runnable(i, "cpu", "float64") is None]


@pytest.mark.parametrize("impl", _causal_impls())
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_causal_lm_options_match_torch(impl, reduction):
    g = torch.Generator().manual_seed(4)
    logits = (torch.randn(3, 6, 41, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    ids = torch.randint(0, 41, (3, 6), generator=g)
    ids[1, 4:] = -100
    cw = torch.rand(41, generator=g, dtype=torch.float64) + 0.5
    fn = lossreg.get("causal_lm").implementations[impl].fn
    out, z, lse = fn(logits, ids, z_loss=1e-2, softcap=4.0, weight=cw, label_smoothing=0.1,
                     reduction=reduction, return_z_loss=True, return_lse=True)
    x = 4.0 * torch.tanh(logits[:, :-1].reshape(-1, 41) / 4.0)
    y = ids[:, 1:].reshape(-1)
    keep = y != -100
    want_lse = torch.logsumexp(x, 1)
    rows = 1e-2 * want_lse**2 * keep
    ce = F.cross_entropy(x, y, weight=cw, label_smoothing=0.1, reduction=reduction)
    if reduction == "none":
        want, want_z = (torch.where(keep, ce, 0.0) + rows).view(3, 5), rows.view(3, 5)
    else:
        want_z = rows.sum() / cw[torch.where(keep, y, 0)][keep].sum()
        want = ce + want_z
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(z, want_z, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(lse, want_lse.view(3, 5).detach(), rtol=1e-12, atol=0)
    cot = torch.rand_like(want) + 0.5
    (grad,) = torch.autograd.grad(out, logits, cot)
    (grad_want,) = torch.autograd.grad(want, logits, cot)
    torch.testing.assert_close(grad, grad_want, rtol=1e-10, atol=1e-13)


# ------------------------------------------------------------------ cross_entropy
def _ce_impls():
    spec = lossreg.get("cross_entropy")
    return [n for n, i in spec.implementations.items()
            if n != "compile" and runnable(i, "cpu", "float64") is None] + (
        ["liger"] if runnable(spec.implementations.get("liger", spec.reference), "cpu",
                              "float32") is None else [])


def _ce_call(impl, *args, **kwargs):
    try:
        return lossreg.get("cross_entropy").implementations[impl].fn(*args, **kwargs)
    except lossreg.UnsupportedOption as exc:
        pytest.skip(str(exc))


@pytest.mark.parametrize("impl", _ce_impls())
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cross_entropy_softcap_shift_extras_match_torch(impl, reduction):
    """softcap, shift, z-loss returned apart and lse against F.cross_entropy on the capped,
    shifted logits, with class weights and label smoothing; the gradient through the cap
    and the shift (the last row gets none)."""
    dtype = torch.float32 if impl == "liger" else torch.float64
    g = torch.Generator().manual_seed(5)
    logits = (torch.randn(23, 61, generator=g, dtype=torch.float64) * 4).to(dtype)
    target = torch.randint(0, 61, (23,), generator=g)
    target[[3, 9]] = -100
    cw = (torch.rand(61, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    # Liger under the interpreter: no class weights, no softcap (its kernel fails there)
    cap, cw = (None, None) if impl == "liger" else (6.0, cw)
    x = logits.clone().requires_grad_(True)
    result = _ce_call(impl, x.clone() if impl == "triton_inplace" else x, target, weight=cw,
                      label_smoothing=0.1, z_loss=1e-2, softcap=cap, shift=True,
                      reduction=reduction, return_z_loss=True, return_lse=impl != "liger")
    out, z, lse = result if impl != "liger" else (*result, None)
    x64 = logits.double().requires_grad_(True)
    capped = 6.0 * torch.tanh(x64[:-1] / 6.0) if cap else x64[:-1]
    y = target[1:]
    keep = y != -100
    want_lse = torch.logsumexp(capped, 1)
    rows = 1e-2 * want_lse**2 * keep
    cw = torch.ones(61, dtype=torch.float64) if cw is None else cw.double()
    ce = F.cross_entropy(capped, y, weight=cw, label_smoothing=0.1, reduction=reduction)
    if reduction == "none":
        want, want_z = torch.where(keep, ce, 0.0) + rows, rows
    else:
        want_z = rows.sum() / cw[torch.where(keep, y, 0)][keep].sum()
        want = ce + want_z
    tol = dict(rtol=1e-10, atol=1e-13) if dtype == torch.float64 else dict(rtol=2e-5,
                                                                         atol=2e-6)
    assert out.shape == want.shape
    torch.testing.assert_close(out.double(), want, **tol)
    torch.testing.assert_close(z.double(), want_z.detach(), **tol)
    assert not z.requires_grad
    if lse is not None:
        assert lse.shape == (22,) and not lse.requires_grad
        torch.testing.assert_close(lse.double(), want_lse.detach(), **tol)
    cot = torch.rand(want.shape, generator=g, dtype=torch.float64) + 0.5
    (grad,) = torch.autograd.grad(out, x, cot.to(dtype))
    (grad_want,) = torch.autograd.grad(want, x64, cot)
    assert torch.all(grad[-1] == 0)
    torch.testing.assert_close(grad.double(), grad_want, **tol)


@pytest.mark.parametrize("kwargs, match", [
    ({"softcap": 0.0}, "softcap must be None or a number > 0"),
    ({"shift": 1}, "shift must be True or False"),
    ({"return_lse": "yes"}, "return_lse must be True or False"),
])
def test_cross_entropy_bad_extras_are_named(kwargs, match):
    logits, target = torch.randn(5, 7, dtype=torch.float64), torch.randint(0, 7, (5,))
    for impl in lossreg.get("cross_entropy").implementations:
        if impl == "compile":
            continue
        with pytest.raises(ValueError, match=match):
            lossreg.get("cross_entropy").implementations[impl].fn(logits, target, **kwargs)
