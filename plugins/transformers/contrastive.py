"""InfoNCE / NT-Xent over two views without the B x B similarity matrix.

With unit vectors u_i, v_j and S_ij = u_i . v_j / tau, the row loss is
lse_j S_ij - S_ii and, with ``symmetric``, the column loss lse_i S_ij - S_jj; the
per-sample loss is the row loss, or the mean of the two.

The chunked form holds one block of rows of S at a time (rows x B): the row
logsumexps come from whole rows, the column ones are kept online across blocks
(running max and sum per column). The backward recomputes each block and forms
dS = g_i (softmax_row - I) + g_j (softmax_col - I) for it, so memory is O(B * block)
both ways. The Triton implementation takes the two logsumexps from the pairwise
template (a `logsumexp` channel over column tiles) and shares this backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lossreg.kernels import jit, tl
from lossreg.kernels.pairwise import pairwise_reduction
from lossreg.validate import check_reduction

from .linear_ce import CHUNK_BYTES


def validate(u, v, temperature, symmetric, reduction):
    for name, x in (("u", u), ("v", v)):
        if not torch.is_tensor(x) or not x.is_floating_point() or x.dim() != 2:
            raise ValueError(f"info_nce: {name} must be a floating-point (B, D) tensor, got "
                             f"{getattr(x, 'shape', type(x).__name__)}")
    if u.shape != v.shape:
        raise ValueError(f"info_nce: the two views u and v must have the same shape, got "
                         f"u {tuple(u.shape)} and v {tuple(v.shape)}")
    if u.device != v.device:
        raise ValueError(f"info_nce: u and v must be on one device, got u on {u.device}, "
                         f"v on {v.device}")
    if not float(temperature) > 0:
        raise ValueError(f"info_nce: temperature must be > 0, got {temperature}")
    if not isinstance(symmetric, bool):
        raise ValueError(f"info_nce: symmetric must be True or False, got {symmetric!r}")
    check_reduction("info_nce", reduction)


def _finish(row, col, symmetric, reduction):
    per = (row + col) / 2 if symmetric else row
    if reduction == "none":
        return per
    return per.sum() if reduction == "sum" else per.mean()


def reference(u, v, temperature=0.1, symmetric=True, reduction="mean"):
    """The full similarity matrix and two cross-entropies with diagonal targets (16-bit
    views in float32, the loss rounded back: see `_acc`)."""
    validate(u, v, temperature, symmetric, reduction)
    acc = _acc(u)
    sim = F.normalize(u.to(acc), dim=1) @ F.normalize(v.to(acc), dim=1).T / temperature
    labels = torch.arange(u.shape[0], device=u.device)
    row = F.cross_entropy(sim, labels, reduction="none")
    col = F.cross_entropy(sim.T, labels, reduction="none") if symmetric else None
    return _finish(row, col, symmetric, reduction).to(u.dtype)


def _block_rows(b: int) -> int:
    return max(1, min(b, CHUNK_BYTES // (4 * max(b, 1))))


def _acc(x):
    """float32 for half and single precision, float64 for float64: every implementation
    normalizes and multiplies 16-bit views in float32. A unit vector rounded to 16 bits
    moves a cosine by ~u, its logit by u / tau (bfloat16 at tau 0.02: 0.2), and the loss,
    a difference of logits of size 1 / tau, by as much."""
    return torch.promote_types(x.dtype, torch.float32)


def _shifted(un_blk, vn, inv_t, acc):
    """A block of S - 1/tau = (cos - 1) / tau <= 0. Unit vectors bound cos by 1, so the
    shift keeps the logsumexps and the diagonal near 0 when the positives dominate
    (small tau): their difference, the loss, is then not a difference of two numbers
    of size 1/tau rounded in float32."""
    return ((un_blk @ vn.T).to(acc) - 1.0) * inv_t


def _stats_torch(un, vn, inv_t):
    """Row and column logsumexps of S - 1/tau and its diagonal, by blocks of rows."""
    b = un.shape[0]
    step = _block_rows(b)
    acc = _acc(un)
    row_lse = torch.empty(b, dtype=acc, device=un.device)
    diag = torch.empty(b, dtype=acc, device=un.device)
    col_max = torch.full((b,), float("-inf"), dtype=acc, device=un.device)
    col_sum = torch.zeros(b, dtype=acc, device=un.device)
    for start in range(0, b, step):
        s = _shifted(un[start:start + step], vn, inv_t, acc)
        rows = torch.arange(s.shape[0], device=un.device)
        diag[start:start + step] = s[rows, rows + start]
        row_lse[start:start + step] = torch.logsumexp(s, dim=1)
        blk_max = s.max(dim=0).values
        new_max = torch.maximum(col_max, blk_max)
        col_sum = col_sum * torch.exp(col_max - new_max) + torch.exp(
            s - new_max[None, :]).sum(0)
        col_max = new_max
    return row_lse, col_max + torch.log(col_sum), diag


@jit
def _shifted_dot(dot, sq_row, sq_col, lab_row, lab_col, row, col, p0, p1):
    v = (dot - 1.0) * p0
    return v, tl.where(row == col, v, 0.0)


_lse_pairs = pairwise_reduction(_shifted_dot, ("logsumexp", "sum"), name="info_nce_lse")


def _stats_triton(un, vn, inv_t):
    (row_lse, _), (diag, _) = _lse_pairs(un, vn, p0=inv_t)
    ((col_lse, _), _) = _lse_pairs(vn, un, p0=inv_t)
    acc = _acc(un)
    return row_lse.to(acc), col_lse.to(acc), diag.to(acc)


STATS = {"torch": _stats_torch, "triton": _stats_triton}


class _InfoNCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, un, vn, temperature, symmetric, engine):
        inv_t = 1.0 / temperature
        row_lse, col_lse, diag = STATS[engine](un, vn, inv_t)
        ctx.save_for_backward(un, vn, row_lse, col_lse)
        ctx.meta = (inv_t, symmetric)
        return row_lse - diag, col_lse - diag

    @staticmethod
    def backward(ctx, g_row, g_col):
        un, vn, row_lse, col_lse = ctx.saved_tensors
        inv_t, symmetric = ctx.meta
        b = un.shape[0]
        acc = _acc(un)
        g_row = g_row.to(acc)
        g_col = g_col.to(acc) if symmetric else torch.zeros_like(g_row)
        du = torch.empty_like(un)
        dv = torch.zeros(vn.shape, dtype=acc, device=vn.device)
        step = _block_rows(b)
        for start in range(0, b, step):
            stop = min(b, start + step)
            s = _shifted(un[start:stop], vn, inv_t, acc)
            ds = torch.exp(s - row_lse[start:stop, None]).mul_(g_row[start:stop, None])
            if symmetric:
                ds.add_(torch.exp(s.sub_(col_lse[None, :])).mul_(g_col[None, :]))
            idx = torch.arange(start, stop, device=un.device)
            ds[idx - start, idx] -= g_row[start:stop] + g_col[start:stop]
            ds.mul_(inv_t)
            du[start:stop] = (ds @ vn.to(acc)).to(du.dtype)
            dv.addmm_(ds.T, un[start:stop].to(acc))
        return du, dv.to(vn.dtype), None, None, None


def _chunked(engine):
    def fn(u, v, temperature=0.1, symmetric=True, reduction="mean"):
        validate(u, v, temperature, symmetric, reduction)
        acc = _acc(u)
        row, col = _InfoNCE.apply(F.normalize(u.to(acc), dim=1), F.normalize(v.to(acc), dim=1),
                                  float(temperature), symmetric, engine)
        out = _finish(row, col, symmetric, reduction)
        return out.to(u.dtype)

    fn.__name__ = f"info_nce_{engine}"
    return fn


chunked = _chunked("torch")
triton_impl = _chunked("triton")


def make_inputs(case):
    d = int(case.params.get("dim", 32))
    u = case.randn(case.n, d)
    return {"u": u, "v": u + 0.7 * case.randn(case.n, d)}  # two noisy views
