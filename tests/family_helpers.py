"""Helpers shared by the per-family test files: which implementations to run, seeded
random inputs on the test device, and a float64 comparison with per-dtype tolerances."""

import zlib

import pytest
import torch

import lossreg
from lossreg.kernels import interpreting
from tolerances import TOL  # noqa: F401 - the one table (lossreg.tolerances)

DEVICE = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"


def implementations(*names):
    """pytest params (loss, impl) for every runnable implementation of each loss."""
    out = []
    for name in names:
        for impl in lossreg.get(name).implementations.values():
            if impl.backend == "compile" or impl.missing_requirements():
                continue
            if impl.backend == "triton" and DEVICE == "cpu" and not interpreting():
                continue
            out.append(pytest.param(name, impl, id=f"{name}-{impl.name}"))
    return out


def gen(*key):
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def randn(g, *shape, scale=1.0, dtype=torch.float32):
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(DEVICE)


def rand(g, *shape, dtype=torch.float32):
    return torch.rand(shape, generator=g, dtype=torch.float64).to(dtype).to(DEVICE)


def leaf(t):
    return t.detach().clone().requires_grad_(True)


def reduce(loss, reduction):
    return loss if reduction == "none" else (loss.mean() if reduction == "mean" else loss.sum())


def assert_close(out, expected, dtype, what=""):
    out, expected = out.detach().double().cpu(), expected.detach().double().cpu()
    assert out.shape == expected.shape, f"{what}: shape {out.shape} vs {expected.shape}"
    assert torch.isfinite(out).all(), f"{what}: not finite"
    diff = (out - expected).abs()
    norm = float(expected.norm())
    rel = float(diff.norm()) / norm if norm > 0 else float(diff.max())
    rtol, atol = TOL[dtype]
    assert rel <= rtol or float(diff.max()) <= atol, f"{what}: rel {rel:.3g}, max {diff.max():.3g}"


def neg_log_sigmoid(u):
    """-log sigma(u) = log(1 + e^{-u}), in float64, on either side of 0 without overflow."""
    return torch.where(u >= 0, torch.log1p(torch.exp(-u)), -u + torch.log1p(torch.exp(u)))
