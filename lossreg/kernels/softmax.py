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

from . import HAVE_TRITON, TEMPLATE_INSTANCES

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
                  BLOCK: tl.constexpr):
        m = tl.full((), float("-inf"), tl.float32)
        s = tl.zeros((), tl.float32)
        x_y = tl.zeros((), tl.float32)
        xw = tl.zeros((), tl.float32)
        for off in range(start, stop, BLOCK):
            cols = off + tl.arange(0, BLOCK)
            mask = cols < stop
            x = tl.load(X_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
            m, s = lse_update(m, s, x)
            x_y += tl.sum(tl.where(cols == y, x, 0.0), axis=0)
            if SMOOTH:
                if HAS_W:
                    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
                else:
                    w = tl.where(mask, 1.0, 0.0)
                xw += tl.sum(tl.where(mask, x, 0.0) * w, axis=0)
        return m, s, x_y, xw

    @triton.jit
    def ce_grad_range(X_row, DX_row, W, start, stop, y, lse, w_y, w_sum, eps, n_cls, z_coef,
                      scale, HAS_W: tl.constexpr, SMOOTH: tl.constexpr, HAS_Z: tl.constexpr,
                      BLOCK: tl.constexpr):
        """dL/dx_c = scale * [(1-eps) w_y (p_c - [c=y]) + eps/C (W p_c - w_c) + 2 z lse p_c]."""
        for off in range(start, stop, BLOCK):
            cols = off + tl.arange(0, BLOCK)
            mask = cols < stop
            x = tl.load(X_row + cols, mask=mask, other=0.0).to(tl.float32)
            p = tl.exp(x - lse)
            g = (1.0 - eps) * w_y * (p - tl.where(cols == y, 1.0, 0.0))
            if SMOOTH:
                if HAS_W:
                    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
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
        X, Y, W, STATS, DX, G, DENOM, stride_x, stride_dx, n_cls, chunk, ignore_index,
        eps, z_coef, w_sum,
        HAS_W: tl.constexpr, SMOOTH: tl.constexpr, HAS_Z: tl.constexpr,
        DO_STATS: tl.constexpr, DO_GRAD: tl.constexpr, G_PER_ROW: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """Program (row, part) handles columns [part*chunk, (part+1)*chunk).

        DO_STATS: write (m, s, x_y, xw) of its columns to STATS[row, part, :].
        DO_GRAD: write the gradient of its columns; the lse comes from this program's
        own statistics when DO_STATS (one part per row), else from STATS[row, 0, 0].
        """
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
            m, s, x_y, xw = row_stats(X_row, W, start, stop, y, HAS_W, SMOOTH, BLOCK)
            m = tl.where(bad, float("nan"), m)
            tl.store(st + 0, m)
            tl.store(st + 1, s)
            tl.store(st + 2, x_y)
            tl.store(st + 3, xw)
            lse = m + tl.log(s)
        else:
            lse = tl.load(STATS + row * n_parts * 4)
        if DO_GRAD:
            if ignored:
                _zero_range(DX_row, start, stop, BLOCK)
            else:
                y_safe = tl.where(bad, 0, y)
                if HAS_W:
                    w_y = tl.load(W + y_safe).to(tl.float32)
                else:
                    w_y = 1.0
                if G_PER_ROW:
                    scale = tl.load(G + row).to(tl.float32)
                else:
                    scale = 1.0 / tl.load(DENOM)
                ce_grad_range(X_row, DX_row, W, start, stop, y_safe, lse, w_y, w_sum, eps,
                              n_cls, z_coef, scale, HAS_W, SMOOTH, HAS_Z, BLOCK)

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


def row_loss(stats: torch.Tensor, target: torch.Tensor, weight, ignore_index: int, eps: float,
             z_loss: float, n_cls: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Combine per-part statistics (N, S, 4) into (loss per row, lse per row, kept-row
    weight) -- the same formula the gradient kernel differentiates."""
    m, s, x_y, xw = stats.unbind(-1)
    big = m.max(dim=1).values
    safe_big = torch.where(torch.isfinite(big), big, torch.zeros_like(big))
    lse = safe_big + torch.log((s * torch.exp(m - safe_big[:, None])).sum(1))
    lse = torch.where(torch.isnan(big), big, lse)
    x_y, xw = x_y.sum(1), xw.sum(1)
    keep = target != ignore_index
    y = torch.where(keep, target, 0)
    w_y = weight.float()[y] if weight is not None else torch.ones_like(lse)
    w_y = torch.where(keep, w_y, torch.zeros_like(w_y))
    loss = w_y * (lse - x_y)
    if eps:
        w_sum = float(weight.float().sum()) if weight is not None else float(n_cls)
        loss = (1 - eps) * loss + eps / n_cls * torch.where(keep, w_sum * lse - xw, 0.0)
    if z_loss:
        loss = loss + z_loss * torch.where(keep, lse * lse, 0.0)
    return loss, lse, w_y


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, weight, ignore_index, eps, z_loss, reduction, inplace):
        n_rows, n_cls = logits.shape
        x = logits if logits.stride(-1) == 1 else logits.contiguous()
        target = target.contiguous()
        block = _block(n_cls)
        parts = _parts(n_rows, n_cls, block)
        chunk = triton.cdiv(triton.cdiv(n_cls, parts), block) * block
        parts = triton.cdiv(n_cls, chunk)
        stats = torch.empty((n_rows, parts, 4), dtype=torch.float32, device=x.device)
        keep = target != ignore_index
        w = weight.contiguous() if weight is not None else None
        w_sum = float(w.float().sum()) if (w is not None and eps) else float(n_cls)
        if w is not None:
            denom = (w.float()[torch.where(keep, target, 0)] * keep).sum()
        else:
            denom = keep.sum().to(torch.float32)
        needs_grad = ctx.needs_input_grad[0]
        fused = needs_grad and reduction != "none" and parts == 1
        dx = (x if inplace else torch.empty_like(x)) if (needs_grad and reduction != "none") \
            else None
        common = dict(HAS_W=w is not None, SMOOTH=eps > 0, HAS_Z=z_loss != 0, BLOCK=block,
                      num_warps=NUM_WARPS)
        args = (x, target, w if w is not None else x, stats)
        scalars = (n_cls, chunk, ignore_index, float(eps), float(z_loss), w_sum)
        # the gradient kernel scales by 1/DENOM: the kept weight for mean, 1 for sum
        scale_denom = denom if reduction == "mean" else torch.ones_like(denom)
        if n_rows:
            _ce_rows[(n_rows, parts)](
                *args, dx if fused else x, scale_denom, scale_denom, x.stride(0),
                (dx if fused else x).stride(0), *scalars, DO_STATS=True, DO_GRAD=fused,
                G_PER_ROW=False, **common)
        loss, lse, _ = row_loss(stats, target, w, ignore_index, eps, z_loss, n_cls)
        if dx is not None and not fused and n_rows:
            stats[:, 0, 0] = lse
            _ce_rows[(n_rows, parts)](
                *args, dx, scale_denom, scale_denom, x.stride(0), dx.stride(0), *scalars,
                DO_STATS=False, DO_GRAD=True, G_PER_ROW=False, **common)
        ctx.reduction, ctx.shape = reduction, logits.shape
        ctx.meta = (ignore_index, float(eps), float(z_loss), w_sum, block, parts, chunk, common)
        if reduction == "none":
            stats[:, 0, 0] = lse
            ctx.save_for_backward(x, target, w, stats)
            return loss.to(logits.dtype)
        ctx.save_for_backward(dx)
        total = loss.sum()
        out = total / denom if reduction == "mean" else total
        return out.to(logits.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.reduction != "none":
            (dx,) = ctx.saved_tensors
            if dx is not None and dx.numel():
                flat = dx.view(-1)
                _scale_unless_one[(triton.cdiv(flat.numel(), 4096),)](
                    flat, grad_out.reshape(1).contiguous(), flat.numel(), ACC=tl.float32,
                    BLOCK=4096, num_warps=8)
            return dx, None, None, None, None, None, None, None
        x, target, w, stats = ctx.saved_tensors
        ignore_index, eps, z_loss, w_sum, block, parts, chunk, common = ctx.meta
        n_rows, n_cls = x.shape
        dx = torch.empty_like(x)
        g = grad_out.contiguous().to(torch.float32)
        if n_rows:
            _ce_rows[(n_rows, parts)](
                x, target, w if w is not None else x, stats, dx, g, g, x.stride(0),
                dx.stride(0), n_cls, chunk, ignore_index, eps, z_loss, w_sum,
                DO_STATS=False, DO_GRAD=True, G_PER_ROW=True, **common)
        return dx, None, None, None, None, None, None, None


class CrossEntropyKernel:
    """``(logits (N, C), target (N,), weight=None, ignore_index=-100,
    label_smoothing=0.0, z_loss=0.0, reduction="mean", inplace_backward=False)``."""

    name = "cross_entropy"

    def __init__(self):
        TEMPLATE_INSTANCES.append(self)

    def __call__(self, logits, target, weight=None, ignore_index=-100, label_smoothing=0.0,
                 z_loss=0.0, reduction="mean", inplace_backward=False):
        if not HAVE_TRITON:
            raise ImportError("cross_entropy: triton is not installed")
        return _CrossEntropy.apply(logits, target, weight, int(ignore_index),
                                   float(label_smoothing), float(z_loss), reduction,
                                   bool(inplace_backward))

    def aot_sources(self, dtype: str = "fp32"):
        p = f"*{dtype}"
        sig = {"X": p, "Y": "*i64", "W": "*fp32", "STATS": "*fp32", "DX": p, "G": "*fp32",
               "DENOM": "*fp32", "stride_x": "i64", "stride_dx": "i64", "n_cls": "i32",
               "chunk": "i32", "ignore_index": "i32", "eps": "fp32", "z_coef": "fp32",
               "w_sum": "fp32"}
        opts = {"num_warps": NUM_WARPS}
        base = {"HAS_W": True, "SMOOTH": True, "HAS_Z": True, "BLOCK": BLOCK_MAX}
        return [
            (_ce_rows, sig, {**base, "DO_STATS": True, "DO_GRAD": True, "G_PER_ROW": False},
             opts),
            (_ce_rows, sig, {**base, "DO_STATS": True, "DO_GRAD": False, "G_PER_ROW": False},
             opts),
            (_ce_rows, sig, {**base, "DO_STATS": False, "DO_GRAD": True, "G_PER_ROW": True},
             opts),
            (_ce_rows, sig, {"HAS_W": False, "SMOOTH": False, "HAS_Z": False,
                             "BLOCK": BLOCK_MAX, "DO_STATS": True, "DO_GRAD": True,
                             "G_PER_ROW": False}, opts),
        ]


cross_entropy = CrossEntropyKernel()
