"""Fused-linear preference losses (plugins/fused_preference.py on plugins/_fused_linear.py):
the references against numpy (log-softmax of h W^T, per-sequence sums, the papers'
formulas), the chunked implementation against the float64 reference over several
chunks (float32, and a bfloat16 weight whose gradient accumulates in float32), and a
tracer that fails if the chunked forward + backward ever allocates a tensor of the full
rows x tokens x vocabulary logits."""

import os

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import lossreg
from lossreg.spec import Case
from lossreg_plugins import _fused_linear as fl
from loss_tester import LossTester

NAMES = ["fused_linear_dpo", "fused_linear_orpo", "fused_linear_cpo", "fused_linear_simpo",
         "fused_linear_kto"]


def logsig(u):
    return -np.logaddexp(0.0, -u)


def sig(u):
    return 1.0 / (1.0 + np.exp(-u))


def np_seq_logps(h, w, y):
    """Per-sequence (sum of kept token log-probs, kept count) in numpy."""
    logits = h @ w.T
    m = logits.max(-1, keepdims=True)
    logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
    keep = y != -100
    tok = np.take_along_axis(logp, np.where(keep, y, 0)[..., None], -1)[..., 0]
    return np.where(keep, tok, 0.0).sum(-1), keep.sum(-1)


def expected(name, x, opts):
    s, c = np_seq_logps(x["hidden"], x["weight"], x["target"])
    if name == "fused_linear_kto":
        r = s - np_seq_logps(x["ref_hidden"], x["ref_weight"], x["target"])[0]
        z0 = max(0.0, float(x["kl"]))
        d = x["desirable"]
        return np.where(d, 1 - sig(opts["beta"] * (r - z0)), 1 - sig(opts["beta"] * (z0 - r)))
    b = len(s) // 2
    sc, sr, cc, cr = s[:b], s[b:], c[:b], c[b:]
    beta = opts["beta"]
    if name == "fused_linear_dpo":
        rs = np_seq_logps(x["ref_hidden"], x["ref_weight"], x["target"])[0]
        return -logsig(beta * ((sc - rs[:b]) - (sr - rs[b:])))
    if name == "fused_linear_cpo":
        return -logsig(beta * sc - beta * sr) - opts["alpha"] * sc
    if name == "fused_linear_simpo":
        return -logsig(beta * sc / cc - beta * sr / cr - opts["gamma"])
    pc, pr = np.exp(sc / cc), np.exp(sr / cr)  # ORPO's length-normalized likelihoods
    return -sc / cc - beta * logsig(np.log(pc / (1 - pc)) - np.log(pr / (1 - pr)))


def inputs(name, n=3, dtype=torch.float64, seed=0, **params):
    spec = lossreg.get(name)
    p = {**spec.case_params("quick", spec.options), **params}
    return spec.make_inputs(Case(n, dtype, "cpu", seed=seed, params=p))


@pytest.mark.parametrize("name", NAMES)
def test_reference_matches_numpy(name):
    spec = lossreg.get(name)
    x = inputs(name)
    # ORPO needs P < 1: the sequences' average log-probs are well below 0 here
    out = spec.reference(**x, reduction="none")
    opts = {k: v for k, v in spec.options.items() if k not in ("reduction", "ignore_index")}
    np_x = {k: (v.numpy() if torch.is_tensor(v) else v) for k, v in x.items()}
    np.testing.assert_allclose(out.numpy(), expected(name, np_x, opts), rtol=1e-10)


def _small_chunks(monkeypatch):
    """One unit per chunk (here and in any worker process the harness starts)."""
    monkeypatch.setattr(fl, "CHUNK_BYTES", 1)
    monkeypatch.setenv("LOSSREG_CHUNK_BYTES", "1")


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_chunked_matches_reference_over_many_chunks(name, reduction, monkeypatch):
    _small_chunks(monkeypatch)
    spec = lossreg.get(name)
    x = inputs(name, n=5, dtype=torch.float32, seed=3, seq=11)
    leaves = {k: v.clone().requires_grad_(k in ("hidden", "weight")) for k, v in x.items()}
    out = spec.implementations["chunked"].fn(**leaves, reduction=reduction)
    x64 = {k: v.double().requires_grad_(k in ("hidden", "weight")) if v.is_floating_point()
           else v for k, v in x.items()}
    ref = spec.reference(**x64, reduction=reduction)
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    cot = torch.rand(out.shape, generator=torch.Generator().manual_seed(1)) + 0.5
    g = torch.autograd.grad(out, [leaves["hidden"], leaves["weight"]], cot)
    g64 = torch.autograd.grad(ref, [x64["hidden"], x64["weight"]], cot.double())
    for a, b in zip(g, g64):
        rel = float((a.double() - b).norm() / b.norm())
        assert rel < 1e-5, rel


def test_bfloat16_weight_gradient_accumulates_in_float32(monkeypatch):
    """Many chunks adding into one bfloat16 dW would drift; float32 accumulation keeps the
    result within bfloat16's own rounding of the float64 gradient."""
    _small_chunks(monkeypatch)
    spec = lossreg.get("fused_linear_dpo")
    x = inputs("fused_linear_dpo", n=8, dtype=torch.bfloat16, seed=5, seq=13)
    w = x["weight"].clone().requires_grad_(True)
    out = spec.implementations["chunked"].fn(**{**x, "weight": w})
    (gw,) = torch.autograd.grad(out, w)
    assert gw.dtype == torch.bfloat16
    w64 = x["weight"].double().requires_grad_(True)
    ref = spec.reference(**{k: v.double() if v.is_floating_point() else v
                            for k, v in x.items()} | {"weight": w64})
    (gw64,) = torch.autograd.grad(ref, w64)
    rel = float((gw.double() - gw64).norm() / gw64.norm())
    assert rel < 8e-3, rel


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if torch.is_tensor(t):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("name", ["fused_linear_dpo", "fused_linear_kto"])
def test_chunked_never_allocates_the_full_logits(name, monkeypatch):
    _small_chunks(monkeypatch)
    spec = lossreg.get(name)
    x = inputs(name, n=6, dtype=torch.float32, seq=16, vocab=500, hidden=8)
    full = x["target"].numel() * x["weight"].shape[0]
    sizes = {}
    for impl in ("chunked", "eager"):
        leaves = {k: v.clone().requires_grad_(k in ("hidden", "weight"))
                  for k, v in x.items()}
        with LargestTensor() as tracer:
            out = spec.implementations[impl].fn(**leaves)
            torch.autograd.grad(out, [leaves["hidden"], leaves["weight"]])
        sizes[impl] = tracer.largest
    assert sizes["eager"] >= full  # the tracer sees the logits where they exist
    # one unit's logits (a pair's two sequences, or one sequence: 6 units) and no more
    assert sizes["chunked"] <= full // 6, (sizes, full)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("LOSSREG_DEEP_TESTS") != "1",
                    reason="minutes of harness checks: LOSSREG_DEEP_TESTS=1")
def test_chunked_checks_pass_over_many_chunks(monkeypatch):
    """The harness's check of the chunked implementations (edge cases included) with one
    unit per chunk; the conformance test runs the default chunking."""
    _small_chunks(monkeypatch)
    df = lossreg.check(NAMES, device="cpu", impls=["chunked"], case_timeout=0)
    bad = df[df.status.isin(["fail", "error"])]
    assert bad.empty, bad[["loss", "check", "n", "params", "message"]].to_string()
    assert set(df.loss) == set(NAMES)


# ---------------------------------------------------------------- the shared tester
class TestFusedLinearCpo(LossTester):
    loss = "fused_linear_cpo"
    no_oracle = "tests/plugins/test_fused_preference.py"


class TestFusedLinearDpo(LossTester):
    loss = "fused_linear_dpo"
    no_oracle = "tests/plugins/test_fused_preference.py"


class TestFusedLinearKto(LossTester):
    loss = "fused_linear_kto"
    no_oracle = "tests/plugins/test_fused_preference.py"


class TestFusedLinearOrpo(LossTester):
    loss = "fused_linear_orpo"
    no_oracle = "tests/plugins/test_fused_preference.py"


class TestFusedLinearSimpo(LossTester):
    loss = "fused_linear_simpo"
    no_oracle = "tests/plugins/test_fused_preference.py"
