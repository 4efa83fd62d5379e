"""Row-wise softmax / logsumexp template, and the cross-entropy kernel built on it.

Building blocks (``@triton.jit``, usable from other kernels):

* ``lse_update(m, s, x)``: one step of the online logsumexp over a block ``x`` of a
  row (masked entries as -inf): running max ``m`` and sum ``s`` of ``exp(x - m)``.
* ``row_stats(...)``: streams columns ``[start, stop)`` of a row once and returns
  ``(m, s, x_target, sum_c w_c x_c)``; ``lse = m + log(s)``.
* ``ce_grad_range(...)``: writes ``d loss / d x`` for columns ``[start, stop)`` of a
  row given its ``lse`` (softmax recomputed on the fly).

Cross entropy (``CrossEntropyKernel``), with torch's semantics for ``weight``,
``ignore_index``, ``label_smoothing`` and ``reduction``, plus a z-loss
``z_loss * lse^2`` per kept row:

* ``mean``/``sum``: the gradient is written during the forward (reads each row twice,
  the second time mostly from L2, writes it once), optionally over the logits
  themselves (``inplace_backward=True``: no N x V gradient buffer). The backward is a
  no-op kernel when the incoming gradient is 1 and an in-place scale otherwise.
* ``none``: the forward only computes row statistics (one read); the backward reads
  each row once more and writes the gradient scaled by the incoming per-row gradient.
* Few rows and a large vocabulary: each row is split across ``S`` programs; partial
  (max, sum) pairs are combined on the host side of the launch (tiny tensors), and a
  second launch writes the gradient chunk by chunk.

Targets out of range on CUDA are not checked on the host (that would sync the
device every call); the kernel gives such rows a NaN loss instead of reading out of
bounds. On CPU tensors the shared validation raises a ValueError first.
"""

from __future__ import annotations

import math

import torch

from . import HAVE_TRITON, TEMPLATE_INSTANCES, acc_dtype, tl_acc

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from .pointwise import _scale_unless_one

    @triton.jit
    def lse_update(m, s, x):
        m_new = tl.maximum(m, tl.max(x, axis=0))
        # exp(-inf - -inf) would be nan on an all-masked first block: guard the rescale
        alpha = tl.where(m == m_new, 1.0, tl.exp(m - m_new))
        s = s * alpha + tl.sum(tl.exp(x - m_new), axis=0)
        return m_new, s

    @triton.jit
    def row_stats(X_row, W, start, stop, y, HAS_W: tl.constexpr, SMOOTH: tl.constexpr,
                  ACC: tl.constexpr, BLOCK: tl.constexpr):
        m = tl.full((), float("-inf"), ACC)
        s = tl.zeros((), ACC)
        x_y = tl.zeros((), ACC)
        xw = tl.zeros((), ACC)
        for off in range(start, stop, BLOCK):
            cols = off + tl.arange(0, BLOCK)
            mask = cols < stop
            x = tl.load(X_row + cols, mask=mask, other=float("-inf")).to(ACC)
            m, s = lse_update(m, s, x)
            x_y += tl.sum(tl.where(cols == y, x, 0.0), axis=0)
            if SMOOTH:
                if HAS_W:
                    w = tl.load(W + cols, mask=mask, other=0.0).to(ACC)
                else:
                    w = tl.where(mask, 1.0, 0.0).to(ACC)
                xw += tl.sum(tl.where(mask, x, 0.0) * w, axis=0)
        return m, s, x_y, xw

    @triton.jit
    def ce_grad_range(X_row, DX_row, W, start, stop, y, m, r, w_y, w_sum, eps, n_cls, z_coef,
                      scale, HAS_W: tl.constexpr, SMOOTH: tl.constexpr, HAS_Z: tl.constexpr,
                      ACC: tl.constexpr, BLOCK: tl.constexpr):
        """dL/dx_c = scale * [(1-eps) w_y (p_c - [c=y]) + eps/C (W p_c - w_c) + 2 z lse p_c],
        with lse = m + r split into the row max m and r = log(sum exp(x - m)): p_c =
        exp((x_c - m) - r) stays exact for logits of 1e4, where x - lse in float32
        would round lse to 1e-3."""
        lse = m + r
        for off in range(start, stop, BLOCK):
            cols = off + tl.arange(0, BLOCK)
            mask = cols < stop
            x = tl.load(X_row + cols, mask=mask, other=0.0).to(ACC)
            p = tl.exp((x - m) - r)
            g = (1.0 - eps) * w_y * (p - tl.where(cols == y, 1.0, 0.0))
            if SMOOTH:
                if HAS_W:
                    w = tl.load(W + cols, mask=mask, other=0.0).to(ACC)
                else:
                    w = 1.0
                g += eps / n_cls * (w_sum * p - w)
            if HAS_Z:
                g += 2.0 * z_coef * lse * p
            tl.store(DX_row + cols, (g * scale).to(DX_row.dtype.element_ty), mask=mask)

    @triton.jit
    def _zero_range(DX_row, start, stop, BLOCK: tl.constexpr):
        for off in range(start, stop, BLOCK):
            cols = off + tl.arange(0, BLOCK)
            tl.store(DX_row + cols, tl.zeros((BLOCK,), DX_row.dtype.element_ty),
                     mask=cols < stop)

    @triton.jit
    def _ce_rows(
        X, Y, W, STATS, DX, G, DENOM, P, stride_x, stride_dx, n_cls, chunk, ignore_index,
        HAS_W: tl.constexpr, SMOOTH: tl.constexpr, HAS_Z: tl.constexpr,
        DO_STATS: tl.constexpr, DO_GRAD: tl.constexpr, G_PER_ROW: tl.constexpr,
        ACC: tl.constexpr, BLOCK: tl.constexpr,
    ):
        """Program (row, part) handles columns [part*chunk, (part+1)*chunk).

        DO_STATS: write (m, s, x_y, xw) of its columns to STATS[row, part, :].
        DO_GRAD: write the gradient of its columns; the lse comes from this program's
        own statistics when DO_STATS (one part per row), else from STATS[row, 0, 0].
        P holds (label smoothing, z-loss scale, class-weight sum) in ACC, the accumulator
        dtype (float64 for float64 logits, else float32): scalars passed as Python floats
        would arrive as float32 and cost float64 its precision.
        """
        eps = tl.load(P + 0)
        z_coef = tl.load(P + 1)
        w_sum = tl.load(P + 2)
        row = tl.program_id(0).to(tl.int64)
        part = tl.program_id(1)
        n_parts = tl.num_programs(1)
        start = part * chunk
        stop = tl.minimum(start + chunk, n_cls)
        X_row = X + row * stride_x
        DX_row = DX + row * stride_dx
        y = tl.load(Y + row).to(tl.int32)
        ignored = y == ignore_index
        bad = (y != ignore_index) & ((y < 0) | (y >= n_cls))
        st = STATS + (row * n_parts + part) * 4
        if DO_STATS:
            m, s, x_y, xw = row_stats(X_row, W, start, stop, y, HAS_W, SMOOTH, ACC, BLOCK)
            m = tl.where(bad, float("nan"), m)
            tl.store(st + 0, m)
            tl.store(st + 1, s)
            tl.store(st + 2, x_y)
            tl.store(st + 3, xw)
            r = tl.log(s)
        else:  # the host combined the parts: STATS[row, 0, :2] = (max, log-sum-exp - max)
            m = tl.load(STATS + row * n_parts * 4)
            r = tl.load(STATS + row * n_parts * 4 + 1)
        if DO_GRAD:
            if ignored:
                _zero_range(DX_row, start, stop, BLOCK)
            else:
                y_safe = tl.where(bad, 0, y)
                if HAS_W:
                    w_y = tl.load(W + y_safe).to(ACC)
                else:
                    w_y = 1.0
                if G_PER_ROW:
                    scale = tl.load(G + row).to(ACC)
                else:
                    scale = 1.0 / tl.load(DENOM)
                ce_grad_range(X_row, DX_row, W, start, stop, y_safe, m, r, w_y, w_sum, eps,
                              n_cls, z_coef, scale, HAS_W, SMOOTH, HAS_Z, ACC, BLOCK)

BLOCK_MAX = 4096  # H200 sweep (benchmarks/tune_kernels.py): 4096 x 8 warps beat 8192-32768
NUM_WARPS = 8
#: Split rows across programs when there are fewer rows than this many programs.
TARGET_PROGRAMS = 1024


def _block(n_cls: int) -> int:
    return max(16, min(BLOCK_MAX, triton.next_power_of_2(n_cls)))


def _parts(n_rows: int, n_cls: int, block: int) -> int:
    if n_rows >= TARGET_PROGRAMS:
        return 1
    return max(1, min(math.ceil(n_cls / (4 * block)), math.ceil(TARGET_PROGRAMS / max(n_rows, 1))))


def scalars(device, dtype: torch.dtype, *values: float) -> torch.Tensor:
    """Kernel scalars as a tensor of the accumulator dtype (see ``_ce_rows``'s ``P``)."""
    return torch.tensor(values, dtype=acc_dtype(dtype), device=device)


def row_loss(stats: torch.Tensor, target: torch.Tensor, weight, ignore_index: int, eps: float,
             z_loss: float, n_cls: int):
    """Combine per-part statistics (N, S, 4) into (loss per row, (max, lse - max) per row,
    kept-row weight, z-loss part of the loss per row) -- the same formula the gradient
    kernel differentiates. Computed in the statistics' dtype."""
    m, s, x_y, xw = stats.unbind(-1)
    big = m.max(dim=1).values
    safe_big = torch.where(torch.isfinite(big), big, torch.zeros_like(big))
    r = torch.log((s * torch.exp(m - safe_big[:, None])).sum(1))
    r = torch.where(torch.isnan(big), big, r)
    lse = safe_big + r
    x_y, xw = x_y.sum(1), xw.sum(1)
    keep = target != ignore_index
    y = torch.where(keep, target, 0)
    w_y = weight.to(stats.dtype)[y] if weight is not None else torch.ones_like(lse)
    w_y = torch.where(keep, w_y, torch.zeros_like(w_y))
    loss = w_y * ((safe_big - x_y) + r)  # not lse - x_y: that rounds lse at 1e4
    if eps:
        w_sum = weight.to(stats.dtype).sum() if weight is not None else float(n_cls)
        loss = (1 - eps) * loss + eps / n_cls * torch.where(keep, w_sum * lse - xw, 0.0)
    z_rows = z_loss * torch.where(keep, lse * lse, 0.0) if z_loss else torch.zeros_like(lse)
    return loss + z_rows, torch.stack([safe_big, r], dim=1), w_y, z_rows


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, weight, ignore_index, eps, z_loss, reduction, inplace,
                out_dtype):
        n_rows, n_cls = logits.shape
        x = logits if logits.stride(-1) == 1 else logits.contiguous()
        target = target.contiguous()
        acc = acc_dtype(x.dtype)
        block = _block(n_cls)
        parts = _parts(n_rows, n_cls, block)
        chunk = triton.cdiv(triton.cdiv(n_cls, parts), block) * block
        parts = triton.cdiv(n_cls, chunk)
        stats = torch.empty((n_rows, parts, 4), dtype=acc, device=x.device)
        keep = target != ignore_index
        w = weight.contiguous() if weight is not None else None
        w_sum = float(w.to(acc).sum()) if (w is not None and eps) else float(n_cls)
        if w is not None:
            denom = (w.to(acc)[torch.where(keep, target, 0)] * keep).sum()
        else:
            denom = keep.sum().to(acc)
        params = scalars(x.device, x.dtype, eps, z_loss, w_sum)
        needs_grad = ctx.needs_input_grad[0]
        fused = needs_grad and reduction != "none" and parts == 1
        dx = (x if inplace else torch.empty_like(x)) if (needs_grad and reduction != "none") \
            else None
        common = dict(HAS_W=w is not None, SMOOTH=eps > 0, HAS_Z=z_loss != 0,
                      ACC=tl_acc(x.dtype), BLOCK=block, num_warps=NUM_WARPS)
        args = (x, target, w if w is not None else x, stats)
        # the gradient kernel scales by 1/DENOM: the kept weight for mean, 1 for sum
        scale_denom = denom if reduction == "mean" else torch.ones_like(denom)
        if n_rows:
            _ce_rows[(n_rows, parts)](
                *args, dx if fused else x, scale_denom, scale_denom, params, x.stride(0),
                (dx if fused else x).stride(0), n_cls, chunk, ignore_index, DO_STATS=True,
                DO_GRAD=fused, G_PER_ROW=False, **common)
        loss, max_r, _, _ = row_loss(stats, target, w, ignore_index, eps, z_loss, n_cls)
        if dx is not None and not fused and n_rows:
            stats[:, 0, :2] = max_r
            _ce_rows[(n_rows, parts)](
                *args, dx, scale_denom, scale_denom, params, x.stride(0), dx.stride(0), n_cls,
                chunk, ignore_index, DO_STATS=False, DO_GRAD=True, G_PER_ROW=False, **common)
        ctx.reduction, ctx.shape = reduction, logits.shape
        ctx.meta = (ignore_index, parts, chunk, common)
        if reduction == "none":
            stats[:, 0, :2] = max_r
            ctx.save_for_backward(x, target, w, stats, params)
            return loss.to(out_dtype)
        ctx.save_for_backward(dx)
        total = loss.sum()
        out = total / denom if reduction == "mean" else total
        return out.to(out_dtype)

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.reduction != "none":
            (dx,) = ctx.saved_tensors
            if dx is not None and dx.numel():
                flat = dx.view(-1)
                _scale_unless_one[(triton.cdiv(flat.numel(), 4096),)](
                    flat, grad_out.reshape(1).contiguous(), flat.numel(),
                    ACC=tl_acc(dx.dtype), BLOCK=4096, num_warps=8)
            return dx, None, None, None, None, None, None, None, None
        x, target, w, stats, params = ctx.saved_tensors
        ignore_index, parts, chunk, common = ctx.meta
        n_rows, n_cls = x.shape
        dx = torch.empty_like(x)
        g = grad_out.contiguous().to(stats.dtype)
        if n_rows:
            _ce_rows[(n_rows, parts)](
                x, target, w if w is not None else x, stats, dx, g, g, params, x.stride(0),
                dx.stride(0), n_cls, chunk, ignore_index, DO_STATS=False, DO_GRAD=True,
                G_PER_ROW=True, **common)
        return dx, None, None, None, None, None, None, None, None


class CrossEntropyKernel:
    """``(logits (N, C), target (N,), weight=None, ignore_index=-100,
    label_smoothing=0.0, z_loss=0.0, reduction="mean", inplace_backward=False,
    out_dtype=None)``. Accumulates in float64 for float64 logits, else in float32;
    returns the loss in ``out_dtype`` (default the logits' dtype: float32 spares a 16-bit
    caller the rounding of a loss it transforms further, as perplexity's exp)."""

    name = "cross_entropy"

    def __init__(self):
        TEMPLATE_INSTANCES.append(self)

    def __call__(self, logits, target, weight=None, ignore_index=-100, label_smoothing=0.0,
                 z_loss=0.0, reduction="mean", inplace_backward=False, out_dtype=None):
        if not HAVE_TRITON:
            raise ImportError("cross_entropy: triton is not installed")
        return _CrossEntropy.apply(logits, target, weight, int(ignore_index),
                                   float(label_smoothing), float(z_loss), reduction,
                                   bool(inplace_backward), out_dtype or logits.dtype)

    def aot_sources(self, dtype: str = "fp32"):
        p = f"*{dtype}"
        acc = "fp64" if dtype == "fp64" else "fp32"
        sig = {"X": p, "Y": "*i64", "W": f"*{acc}", "STATS": f"*{acc}", "DX": p,
               "G": f"*{acc}", "DENOM": f"*{acc}", "P": f"*{acc}", "stride_x": "i64",
               "stride_dx": "i64", "n_cls": "i32", "chunk": "i32", "ignore_index": "i32"}
        opts = {"num_warps": NUM_WARPS}
        base = {"HAS_W": True, "SMOOTH": True, "HAS_Z": True, "BLOCK": BLOCK_MAX,
                "ACC": tl.float64 if acc == "fp64" else tl.float32}
        return [
            (_ce_rows, sig, {**base, "DO_STATS": True, "DO_GRAD": True, "G_PER_ROW": False},
             opts),
            (_ce_rows, sig, {**base, "DO_STATS": True, "DO_GRAD": False, "G_PER_ROW": False},
             opts),
            (_ce_rows, sig, {**base, "DO_STATS": False, "DO_GRAD": True, "G_PER_ROW": True},
             opts),
            (_ce_rows, sig, {**base, "HAS_W": False, "SMOOTH": False, "HAS_Z": False,
                             "DO_STATS": True, "DO_GRAD": True, "G_PER_ROW": False}, opts),
        ]


cross_entropy = CrossEntropyKernel()


def ce_rows_inplace(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -100,
                    label_smoothing: float = 0.0, z_loss: float = 0.0,
                    denom: torch.Tensor | None = None,
                    row_scale: torch.Tensor | None = None, return_stats: bool = False,
                    weight: torch.Tensor | None = None):
    """Cross-entropy of a block of rows (``weight``: optional class weights), overwriting ``logits`` with
    the gradient scaled by ``1/denom`` (a 0-d tensor) or per row by ``row_scale``. One
    launch, one program per row; returns the per-row loss (0 for ignored rows), in the
    accumulator dtype (float64 for float64 logits, else float32). ``return_stats``:
    (loss, lse, z-loss part) per row.

    The building block of the chunked fused-linear losses: they compute a chunk of
    logits with a matmul, call this, and multiply the gradient back into the weights.
    """
    n_rows, n_cls = logits.shape
    acc = acc_dtype(logits.dtype)
    if n_rows == 0:
        empty = logits.new_zeros(0, dtype=acc)
        return (empty, empty, empty) if return_stats else empty
    assert logits.stride(-1) == 1
    block = _block(n_cls)
    chunk = triton.cdiv(n_cls, block) * block
    stats = torch.empty((n_rows, 1, 4), dtype=acc, device=logits.device)
    if denom is None:
        denom = torch.ones((), dtype=acc, device=logits.device)
    denom = denom.to(acc)
    g = row_scale.to(acc).contiguous() if row_scale is not None else denom
    w = weight.contiguous() if weight is not None else None
    w_sum = float(w.to(acc).sum()) if w is not None else float(n_cls)
    _ce_rows[(n_rows, 1)](
        logits, target.contiguous(), w if w is not None else logits, stats, logits, g, denom,
        scalars(logits.device, logits.dtype, label_smoothing, z_loss, w_sum),
        logits.stride(0), logits.stride(0), n_cls, chunk, int(ignore_index), HAS_W=w is not None,
        SMOOTH=label_smoothing > 0, HAS_Z=z_loss != 0, DO_STATS=True, DO_GRAD=True,
        G_PER_ROW=row_scale is not None, ACC=tl_acc(logits.dtype), BLOCK=block,
        num_warps=NUM_WARPS)
    loss, max_r, _, z_rows = row_loss(stats, target, w, ignore_index, label_smoothing,
                                      z_loss, n_cls)
    if return_stats:
        return loss, max_r.sum(1), z_rows
    return loss
