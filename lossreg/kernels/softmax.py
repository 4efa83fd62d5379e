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
    def ce_grad_range(X_row, DX_row, W, start, stop, y, m, r, w_y, w_sum, eps, n_cls, z_coef,
                      scale, HAS_W: tl.constexpr, SMOOTH: tl.constexpr, HAS_Z: tl.constexpr,
                      BLOCK: tl.constexpr):
        """dL/dx_c = scale * [(1-eps) w_y (p_c - [c=y]) + eps/C (W p_c - w_c) + 2 z lse p_c],
        with lse = m + r split into the row max m and r = log(sum exp(x - m)): p_c =
        exp((x_c - m) - r) stays exact for logits of 1e4, where x - lse in float32
        would round lse to 1e-3."""
        lse = m + r
        for off in range(start, stop, BLOCK):
            cols = off + tl.arange(0, BLOCK)
            mask = cols < stop
            x = tl.load(X_row + cols, mask=mask, other=0.0).to(tl.float32)
            p = tl.exp((x - m) - r)
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
                    w_y = tl.load(W + y_safe).to(tl.float32)
                else:
                    w_y = 1.0
                if G_PER_ROW:
                    scale = tl.load(G + row).to(tl.float32)
                else:
                    scale = 1.0 / tl.load(DENOM)
                ce_grad_range(X_row, DX_row, W, start, stop, y_safe, m, r, w_y, w_sum, eps,
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
    r = torch.log((s * torch.exp(m - safe_big[:, None])).sum(1))
    r = torch.where(torch.isnan(big), big, r)
    lse = safe_big + r
    x_y, xw = x_y.sum(1), xw.sum(1)
    keep = target != ignore_index
    y = torch.where(keep, target, 0)
    w_y = weight.float()[y] if weight is not None else torch.ones_like(lse)
    w_y = torch.where(keep, w_y, torch.zeros_like(w_y))
    loss = w_y * ((safe_big - x_y) + r)  # not lse - x_y: that rounds lse at 1e4
    if eps:
        w_sum = float(weight.float().sum()) if weight is not None else float(n_cls)
        loss = (1 - eps) * loss + eps / n_cls * torch.where(keep, w_sum * lse - xw, 0.0)
    if z_loss:
        loss = loss + z_loss * torch.where(keep, lse * lse, 0.0)
    return loss, torch.stack([safe_big, r], dim=1), w_y


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
        loss, max_r, _ = row_loss(stats, target, w, ignore_index, eps, z_loss, n_cls)
        if dx is not None and not fused and n_rows:
            stats[:, 0, :2] = max_r
            _ce_rows[(n_rows, parts)](
                *args, dx, scale_denom, scale_denom, x.stride(0), dx.stride(0), *scalars,
                DO_STATS=False, DO_GRAD=True, G_PER_ROW=False, **common)
        ctx.reduction, ctx.shape = reduction, logits.shape
        ctx.meta = (ignore_index, float(eps), float(z_loss), w_sum, block, parts, chunk, common)
        if reduction == "none":
            stats[:, 0, :2] = max_r
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


def ce_rows_inplace(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -100,
                    label_smoothing: float = 0.0, z_loss: float = 0.0,
                    denom: torch.Tensor | None = None,
                    row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of a block of rows (unweighted classes), overwriting ``logits`` with
    the gradient scaled by ``1/denom`` (a 0-d tensor) or per row by ``row_scale``. One
    launch, one program per row; returns the per-row loss (0 for ignored rows).

    The building block of the chunked fused-linear losses: they compute a chunk of
    logits with a matmul, call this, and multiply the gradient back into the weights.
    """
    n_rows, n_cls = logits.shape
    if n_rows == 0:
        return logits.new_zeros(0, dtype=torch.float32)
    assert logits.stride(-1) == 1
    block = _block(n_cls)
    chunk = triton.cdiv(n_cls, block) * block
    stats = torch.empty((n_rows, 1, 4), dtype=torch.float32, device=logits.device)
    if denom is None:
        denom = torch.ones((), dtype=torch.float32, device=logits.device)
    g = row_scale.to(torch.float32).contiguous() if row_scale is not None else denom
    _ce_rows[(n_rows, 1)](
        logits, target.contiguous(), logits, stats, logits, g, denom.to(torch.float32),
        logits.stride(0), logits.stride(0), n_cls, chunk, int(ignore_index),
        float(label_smoothing), float(z_loss), float(n_cls), HAS_W=False,
        SMOOTH=label_smoothing > 0, HAS_Z=z_loss != 0, DO_STATS=True, DO_GRAD=True,
        G_PER_ROW=row_scale is not None, BLOCK=block, num_warps=NUM_WARPS)
    loss, _, _ = row_loss(stats, target, None, ignore_index, label_smoothing, z_loss, n_cls)
    return loss


# ------------------------------------------------------------------ distillation
KL_MODES = {"forward": 0, "reverse": 1, "jsd": 2}

if HAVE_TRITON:

    @triton.jit
    def _kl_terms(s, t, m_s, r_s, m_t, r_t, inv_temp, log_beta, log_1mb, beta,
                  MODE: tl.constexpr):
        """Per-column loss term and `a` (dL/dq = a, for the softmax chain rule). The
        log-softmaxes are (x - max) - log-sum, never x - lse (lse rounds at 1e4)."""
        logq = (s * inv_temp - m_s) - r_s
        logp = (t * inv_temp - m_t) - r_t
        q = tl.exp(logq)
        p = tl.exp(logp)
        if MODE == 0:  # KL(p || q)
            term = p * (logp - logq)
            a = -p / tl.maximum(q, 1e-38)  # unused: the forward gradient is q - p
        elif MODE == 1:  # KL(q || p)
            term = q * (logq - logp)
            a = logq - logp
        else:  # beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q
            x = log_beta + logp
            y = log_1mb + logq
            mx = tl.maximum(x, y)
            logm = mx + tl.log(tl.exp(x - mx) + tl.exp(y - mx))
            term = beta * p * (logp - logm) + (1.0 - beta) * q * (logq - logm)
            a = (1.0 - beta) * (logq - logm)
        return term, a, q, p

    @triton.jit
    def _kl_rows(S, T, LOSS, DS, G, stride_s, stride_t, stride_ds, n_cls, inv_temp, log_beta,
                 log_1mb, beta, grad_scale, MODE: tl.constexpr, WRITE_GRAD: tl.constexpr,
                 BLOCK: tl.constexpr):
        """One program per row: pass 1 the two logsumexps, pass 2 the loss (and the
        gradient for forward KL), pass 3 the gradient of reverse KL / JSD, which needs
        the row sum of q * a first. The gradient is grad_scale * G[row] * q (a - sum q a)."""
        row = tl.program_id(0).to(tl.int64)
        S_row = S + row * stride_s
        T_row = T + row * stride_t
        D_row = DS + row * stride_ds
        m_s = tl.full((), float("-inf"), tl.float32)
        m_t = tl.full((), float("-inf"), tl.float32)
        z_s = tl.zeros((), tl.float32)
        z_t = tl.zeros((), tl.float32)
        for off in range(0, n_cls, BLOCK):
            cols = off + tl.arange(0, BLOCK)
            mask = cols < n_cls
            s = tl.load(S_row + cols, mask=mask, other=float("-inf")).to(tl.float32) * inv_temp
            t = tl.load(T_row + cols, mask=mask, other=float("-inf")).to(tl.float32) * inv_temp
            m_s, z_s = lse_update(m_s, z_s, s)
            m_t, z_t = lse_update(m_t, z_t, t)
        r_s = tl.log(z_s)
        r_t = tl.log(z_t)
        scale = grad_scale * tl.load(G + row).to(tl.float32)
        loss = tl.zeros((), tl.float32)
        qa = tl.zeros((), tl.float32)
        for off in range(0, n_cls, BLOCK):
            cols = off + tl.arange(0, BLOCK)
            mask = cols < n_cls
            s = tl.load(S_row + cols, mask=mask, other=0.0).to(tl.float32)
            t = tl.load(T_row + cols, mask=mask, other=0.0).to(tl.float32)
            term, a, q, p = _kl_terms(s, t, m_s, r_s, m_t, r_t, inv_temp, log_beta, log_1mb,
                                      beta, MODE)
            loss += tl.sum(tl.where(mask, term, 0.0), axis=0)
            qa += tl.sum(tl.where(mask, q * a, 0.0), axis=0)
            if WRITE_GRAD and MODE == 0:
                tl.store(D_row + cols, (scale * (q - p)).to(D_row.dtype.element_ty), mask=mask)
        tl.store(LOSS + row, loss)
        if WRITE_GRAD and MODE != 0:
            for off in range(0, n_cls, BLOCK):
                cols = off + tl.arange(0, BLOCK)
                mask = cols < n_cls
                s = tl.load(S_row + cols, mask=mask, other=0.0).to(tl.float32)
                t = tl.load(T_row + cols, mask=mask, other=0.0).to(tl.float32)
                term, a, q, p = _kl_terms(s, t, m_s, r_s, m_t, r_t, inv_temp, log_beta,
                                          log_1mb, beta, MODE)
                tl.store(D_row + cols, (scale * q * (a - qa)).to(D_row.dtype.element_ty),
                         mask=mask)


def kl_rows_inplace(student: torch.Tensor, teacher: torch.Tensor, temperature: float,
                    direction: str, beta: float, row_scale: torch.Tensor,
                    grad_out: torch.Tensor | None = None, write_grad: bool = True):
    """Per-row T^2-scaled divergence of a (n, V) block; writes d loss / d student into
    ``grad_out`` (may be ``student`` itself), scaled per row by ``row_scale``."""
    n_rows, n_cls = student.shape
    loss = torch.empty(n_rows, dtype=torch.float32, device=student.device)
    if n_rows == 0:
        return loss
    mode = KL_MODES[direction]
    grad_out = student if grad_out is None else grad_out
    beta = float(beta)
    log_beta = math.log(beta) if beta > 0 else float("-inf")
    log_1mb = math.log(1 - beta) if beta < 1 else float("-inf")
    _kl_rows[(n_rows,)](
        student, teacher, loss, grad_out, row_scale.to(torch.float32).contiguous(),
        student.stride(0), teacher.stride(0), grad_out.stride(0), n_cls,
        1.0 / float(temperature), log_beta, log_1mb, beta, float(temperature),
        MODE=mode, WRITE_GRAD=write_grad, BLOCK=_block(n_cls), num_warps=NUM_WARPS)
    return loss * float(temperature) ** 2


class _KLDistill(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, temperature, direction, beta, reduction):
        s = student.contiguous()
        t = teacher.contiguous()
        n = s.shape[0]
        ctx.meta = (temperature, direction, beta, reduction)
        if reduction == "none" or not ctx.needs_input_grad[0]:
            loss = kl_rows_inplace(s, t, temperature, direction, beta,
                                   torch.ones(n, device=s.device), write_grad=False)
            ctx.save_for_backward(s, t)
        else:
            scale = torch.full((n,), 1.0 / n if reduction == "mean" else 1.0, device=s.device)
            grad = torch.empty_like(s)
            loss = kl_rows_inplace(s, t, temperature, direction, beta, scale, grad_out=grad)
            ctx.save_for_backward(grad)
        if reduction == "none":
            return loss.to(student.dtype)
        total = loss.sum()
        return (total / n if reduction == "mean" else total).to(student.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        temperature, direction, beta, reduction = ctx.meta
        if len(ctx.saved_tensors) == 2:
            s, t = ctx.saved_tensors
            if reduction == "none":
                scale = grad_out
            else:
                scale = grad_out.expand(s.shape[0]) / (s.shape[0] if reduction == "mean" else 1)
            grad = torch.empty_like(s)
            kl_rows_inplace(s, t, temperature, direction, beta, scale, grad_out=grad)
            return grad, None, None, None, None, None
        (grad,) = ctx.saved_tensors
        flat = grad.view(-1)
        _scale_unless_one[(triton.cdiv(flat.numel(), 4096),)](
            flat, grad_out.reshape(1).contiguous(), flat.numel(), ACC=tl.float32, BLOCK=4096,
            num_warps=8)
        return grad, None, None, None, None, None


class KLDistillKernel:
    """``(student (N, V), teacher (N, V), temperature, direction, beta, reduction)``."""

    name = "kl_distillation"

    def __init__(self):
        TEMPLATE_INSTANCES.append(self)

    def __call__(self, student, teacher, temperature=1.0, direction="forward", beta=0.5,
                 reduction="mean"):
        if not HAVE_TRITON:
            raise ImportError("kl_distillation: triton is not installed")
        return _KLDistill.apply(student, teacher, float(temperature), direction, float(beta),
                                reduction)

    def aot_sources(self, dtype: str = "fp32"):
        p = f"*{dtype}"
        sig = {"S": p, "T": p, "LOSS": "*fp32", "DS": p, "G": "*fp32", "stride_s": "i64",
               "stride_t": "i64", "stride_ds": "i64", "n_cls": "i32", "inv_temp": "fp32",
               "log_beta": "fp32", "log_1mb": "fp32", "beta": "fp32", "grad_scale": "fp32"}
        return [(_kl_rows, sig, {"MODE": mode, "WRITE_GRAD": True, "BLOCK": BLOCK_MAX},
                 {"num_warps": NUM_WARPS}) for mode in (0, 1, 2)]


kl_distill = KLDistillKernel()
