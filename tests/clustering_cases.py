"""Shared pieces of the kmeans and dbscan plugins' tests: which implementations run,
seeded clustered points, explicit (not Gram-form) distances, float64 leaves.
"""

import pytest
import torch
import lossreg
from lossreg.kernels import HAVE_TRITON, interpreting


TRITON_OK = HAVE_TRITON and (interpreting() or torch.cuda.is_available())


DEVICE = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"


F64 = torch.float64


F32 = torch.float32


def impls(name):
    out = []
    for impl in lossreg.get(name).implementations.values():
        if impl.backend == "compile" or impl.missing_requirements():
            continue
        if impl.backend == "triton" and not TRITON_OK:
            continue
        out.append(impl)
    return out


def impl_params(*names):
    return [pytest.param(n, i.name, id=f"{n}-{i.name}") for n in names for i in impls(n)]


def fn(name, impl):
    return lossreg.get(name).implementations[impl].fn


def gen(seed):
    return torch.Generator().manual_seed(seed)


def leaf(t, dtype=F32):
    return t.detach().clone().to(DEVICE, dtype).requires_grad_(True)


def clustered(g, n, k, d, spread=0.5):
    """Points around k centres (distances O(1)), centroids near the centres, float64."""
    centres = torch.randn(k, d, generator=g, dtype=F64) / d ** 0.5
    assign = torch.randint(0, k, (n,), generator=g)
    x = centres[assign] + spread * torch.randn(n, d, generator=g, dtype=F64) / d ** 0.5
    mu = centres + 0.1 * torch.randn(k, d, generator=g, dtype=F64) / d ** 0.5
    return x, mu


def explicit_sq(x, y):
    """|x_i - y_j|^2 from explicit differences (n, m, d): no Gram-form cancellation."""
    return ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)


def reduce(per, reduction):
    return {"none": per, "sum": per.sum(), "mean": per.mean()}[reduction]


def cotangent_like(out, g):
    return torch.rand(out.shape, generator=g, dtype=F64) + 0.5


# ---------------------------------------------------------------- validation
def _pts(n=6, d=3, dtype=F32):
    return torch.randn(n, d, dtype=dtype, device=DEVICE)
