"""The pointwise Triton template, run under the interpreter, and compiled ahead of time."""

import json
import subprocess
import sys

import pytest
import torch

from lossreg.kernels import HAVE_TRITON, interpreting, jit, pointwise_loss, tl

from tolerances import assert_close64

pytestmark = pytest.mark.skipif(
    not HAVE_TRITON or (not interpreting() and not torch.cuda.is_available()),
    reason="needs triton (interpreter on CPU)")
DEVICE = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"


@jit
def _logcosh_term(x, y, p0, p1):
    # a loss with scalar parameters: p0 * log(cosh(p1 * (x - y))), stable form
    d = p1 * (x - y)
    a = tl.abs(d)
    loss = p0 * (a + tl.log(1.0 + tl.exp(-2.0 * a)) - 0.6931471805599453)
    e = tl.exp(-2.0 * a)
    t = (1.0 - e) / (1.0 + e)
    g = p0 * p1 * tl.where(d >= 0, t, -t)
    return loss, g, -g


logcosh = pointwise_loss(_logcosh_term, name="test_logcosh")


def logcosh_ref(x, y, reduction, scale, sharp):
    d = sharp * (x - y)
    t = scale * (d.abs() + torch.log1p(torch.exp(-2 * d.abs())) - torch.log(torch.tensor(2.0,
                 dtype=x.dtype)))
    return t if reduction == "none" else (t.mean() if reduction == "mean" else t.sum())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("n", [1, 4095, 4097, 10001])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_template_matches_float64(dtype, n, reduction):
    g = torch.Generator().manual_seed(n)
    x = (torch.randn(n, generator=g) * 3).to(dtype).to(DEVICE)
    y = torch.randn(n, generator=g).to(dtype).to(DEVICE)
    x.requires_grad_(True)
    y.requires_grad_(True)
    out = logcosh(x, y, reduction, 0.7, 1.3)
    x64 = x.detach().double().requires_grad_(True)
    y64 = y.detach().double().requires_grad_(True)
    ref = logcosh_ref(x64, y64, reduction, 0.7, 1.3)
    assert out.dtype == dtype and out.shape == ref.shape
    assert_close64(out, ref, dtype, "loss")
    cot = torch.rand(ref.shape, generator=g, dtype=torch.float64) + 0.5
    gx, gy = torch.autograd.grad(out, (x, y), cot.to(dtype).to(DEVICE))
    rx, ry = torch.autograd.grad(ref, (x64, y64), cot.to(dtype).double().to(DEVICE))
    assert gx.dtype == dtype and gy.dtype == dtype
    assert_close64(gx, rx, dtype, "grad x")
    assert_close64(gy, ry, dtype, "grad y")


@pytest.mark.parametrize("needs", [(True, False), (False, True)])
def test_only_required_gradients_are_written(needs):
    x = torch.randn(5000, device=DEVICE, requires_grad=needs[0])
    y = torch.randn(5000, device=DEVICE, requires_grad=needs[1])
    out = logcosh(x, y, "mean", 1.0, 1.0)
    out.backward()
    assert (x.grad is not None) == needs[0] and (y.grad is not None) == needs[1]
    leaf = x if needs[0] else y
    ref_leaf = leaf.detach().double().requires_grad_(True)
    other = (y if needs[0] else x).detach().double()
    ref = logcosh_ref(ref_leaf, other, "mean", 1.0, 1.0) if needs[0] else logcosh_ref(
        other, ref_leaf, "mean", 1.0, 1.0)
    ref.backward()
    assert_close64(leaf.grad, ref_leaf.grad, torch.float32)


def test_second_backward_scales_saved_gradient():
    x = torch.randn(3000, device=DEVICE, requires_grad=True)
    y = torch.randn(3000, device=DEVICE)
    (logcosh(x, y, "sum", 1.0, 2.0) * 3.0).backward()
    x64 = x.detach().double().requires_grad_(True)
    (logcosh_ref(x64, y.double(), "sum", 1.0, 2.0) * 3.0).backward()
    assert_close64(x.grad, x64.grad, torch.float32)


def test_template_validates():
    x = torch.randn(10, device=DEVICE)
    with pytest.raises(ValueError, match="reduction must be one of"):
        logcosh(x, x, "avg")
    with pytest.raises(ValueError, match="same shape"):
        logcosh(x, x[:5])


def test_empty_input_follows_torch():
    e = torch.empty(0, device=DEVICE)
    assert torch.isnan(logcosh(e, e, "mean"))
    assert logcosh(e, e, "sum").item() == 0
    assert logcosh(e, e, "none").shape == (0,)


@pytest.mark.slow
@pytest.mark.parametrize("arch", [80, 90])
def test_every_template_kernel_compiles_for_sm80_and_sm90(arch):
    # float32 and bfloat16 variants of every kernel (float16 shares bfloat16's code
    # paths and would add a third of the compile time); one test per architecture, so
    # that the two halves of the longest test can run on two workers
    out = subprocess.run([sys.executable, "-m", "lossreg.kernels.aot", "--json", "--arch",
                          str(arch), "--dtype", "fp32", "--dtype", "bf16"],
                         capture_output=True, text=True, timeout=900)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert {e["arch"] for e in report} == {f"sm_{arch}"}
    assert {e["instance"] for e in report} >= {"mse"}
    failed = [e for e in report if not e["ok"]]
    assert not failed, failed
    assert out.returncode == 0
    unread = [e for e in report if e.get("registers") is None]  # else no spill check
    assert not unread, unread[:3]
    spilled = [e for e in report if (e.get("spill_bytes") or 0) > 0]
    assert not spilled, spilled
