"""Row projection template: one pass over X (n, d) that yields, per row, its projection
z = W^T x (k values), its squared norm ||x||^2 and, optionally, x . mu.

Losses of the form f(||x||^2, W^T x) (PCA reconstruction through z, whitening,
Mahalanobis-style norms) need exactly these; reading X once for all three is what a
matmul plus a separate norm (two passes) does not do. Each program owns BLOCK_M rows
and walks d in BLOCK_D slices: ``tl.dot`` of the X slice with the matching W slice
accumulates z (IEEE float32, not TF32: the results feed differences that cancel),
and the slice's squares accumulate the norm. k is padded to a power of two >= 16.
float64 inputs accumulate (and return z, ||x||^2, x . mu) in float64, the product
formed as a broadcast multiply-add, exact IEEE on every target.
"""

from __future__ import annotations

import torch

from . import HAVE_TRITON, TEMPLATE_INSTANCES

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _project_rows(X, W, MU, Z, SQ, XMU, n, d, k, stride_x, stride_w, stride_z,
                      HAS_MU: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                      BLOCK_K: tl.constexpr, ACC: tl.constexpr = tl.float32):
        pid = tl.program_id(0)
        rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < n
        ks = tl.arange(0, BLOCK_K)
        z = tl.zeros((BLOCK_M, BLOCK_K), dtype=ACC)
        sq = tl.zeros((BLOCK_M,), dtype=ACC)
        xmu = tl.zeros((BLOCK_M,), dtype=ACC)
        for off in range(0, d, BLOCK_D):
            cols = off + tl.arange(0, BLOCK_D)
            col_ok = cols < d
            x = tl.load(X + rows[:, None] * stride_x + cols[None, :],
                        mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(ACC)
            w = tl.load(W + cols[:, None] * stride_w + ks[None, :],
                        mask=col_ok[:, None] & (ks[None, :] < k), other=0.0).to(ACC)
            if ACC == tl.float64:
                z += tl.sum(x[:, :, None] * w[None, :, :], axis=1)
            else:
                z += tl.dot(x, w, input_precision="ieee")
            sq += tl.sum(x * x, axis=1)
            if HAS_MU:
                mu = tl.load(MU + cols, mask=col_ok, other=0.0).to(ACC)
                xmu += tl.sum(x * mu[None, :], axis=1)
        tl.store(Z + rows[:, None] * stride_z + ks[None, :], z,
                 mask=row_ok[:, None] & (ks[None, :] < k))
        tl.store(SQ + rows, sq, mask=row_ok)
        if HAS_MU:
            tl.store(XMU + rows, xmu, mask=row_ok)

BLOCK_M = 16
BLOCK_D = 16
NUM_WARPS = 4  # 16 x 16 x 4 warps: no ptxas spills on sm_80 or sm_90 (32 x 32 spilled)


class RowProjection:
    """``project(x, weight, mu=None) -> (z (n, k), ||x||^2, x . mu or None)``, float32
    (float64 for float64 inputs)."""

    name = "row_projection"

    def __init__(self):
        TEMPLATE_INSTANCES.append(self)

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, mu: torch.Tensor | None = None):
        if not HAVE_TRITON:
            raise ImportError("row_projection: triton is not installed")
        n, d = x.shape
        k = weight.shape[1]
        if k > 128:
            raise ValueError(f"row_projection: rank k={k} is above the template's 128")
        x, weight = x.detach().contiguous(), weight.detach().contiguous()
        wide = x.dtype == torch.float64
        acc = torch.float64 if wide else torch.float32
        z = torch.empty((n, k), dtype=acc, device=x.device)
        sq = torch.empty(n, dtype=acc, device=x.device)
        xmu = torch.empty(n, dtype=acc, device=x.device) if mu is not None else sq
        if n:
            _project_rows[(triton.cdiv(n, BLOCK_M),)](
                x, weight, mu.detach().contiguous() if mu is not None else x, z, sq, xmu, n,
                d, k, x.stride(0), weight.stride(0), z.stride(0), HAS_MU=mu is not None,
                BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D, BLOCK_K=max(16, triton.next_power_of_2(k)),
                ACC=tl.float64 if wide else tl.float32, num_warps=NUM_WARPS)
        return z, sq, (xmu if mu is not None else None)

    def aot_sources(self, dtype: str = "fp32"):
        p = f"*{dtype}"
        sig = {"X": p, "W": p, "MU": p, "Z": "*fp32", "SQ": "*fp32", "XMU": "*fp32",
               "n": "i32", "d": "i32", "k": "i32", "stride_x": "i64", "stride_w": "i64",
               "stride_z": "i64"}
        return [(_project_rows, sig, {"HAS_MU": has_mu, "BLOCK_M": BLOCK_M,
                                      "BLOCK_D": BLOCK_D, "BLOCK_K": 64},
                 {"num_warps": NUM_WARPS}) for has_mu in (False, True)]


project_rows = RowProjection()
