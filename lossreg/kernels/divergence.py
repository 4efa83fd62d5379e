"""Row-wise divergences between two softmaxes over a vocabulary, on the softmax template:
forward / reverse KL, the generalized Jensen-Shannon divergence and total variation.

With q = softmax(s / T) (student, differentiated) and p = softmax(t / T) (teacher,
constant), per row:

* ``forward``: KL(p || q);  ``reverse``: KL(q || p);
* ``jsd``: beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q;
* ``tvd``: 1/2 sum_c |p_c - q_c|.

One program per row: pass 1 the two online logsumexps, pass 2 the loss (and, for
forward KL, the gradient ``q - p``), pass 3 the gradient of the others through the
softmax chain rule, ``q (a - sum q a)`` with ``a = dL/dq``. Everything accumulates in
float64 for float64 logits and in float32 otherwise; scalars travel in a tensor of that
dtype (a Python float argument would arrive as float32).
"""

from __future__ import annotations

import math

import torch

from . import HAVE_TRITON, TEMPLATE_INSTANCES
from . import acc_dtype, tl_acc
from .softmax import BLOCK_MAX, NUM_WARPS, _block, scalars

MODES = {"forward": 0, "reverse": 1, "jsd": 2, "tvd": 3}

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from .pointwise import _scale_unless_one
    from .softmax import lse_update

    @triton.jit
    def _div_terms(s, t, m_s, r_s, m_t, r_t, inv_temp, log_beta, log_1mb, beta,
                   MODE: tl.constexpr):
        """Per-column loss term and ``a = dL/dq``. The log-softmaxes are
        (x - max) - log-sum, never x - lse (lse rounds at logits of 1e4)."""
        logq = (s * inv_temp - m_s) - r_s
        logp = (t * inv_temp - m_t) - r_t
        q = tl.exp(logq)
        p = tl.exp(logp)
        if MODE == 0:  # KL(p || q): the gradient q - p is written in pass 2
            term = p * (logp - logq)
            a = logq * 0.0
        elif MODE == 1:  # KL(q || p)
            term = q * (logq - logp)
            a = logq - logp
        elif MODE == 2:  # beta KL(p || m) + (1 - beta) KL(q || m)
            x = log_beta + logp
            y = log_1mb + logq
            mx = tl.maximum(x, y)
            logm = mx + tl.log(tl.exp(x - mx) + tl.exp(y - mx))
            term = beta * p * (logp - logm) + (1.0 - beta) * q * (logq - logm)
            a = (1.0 - beta) * (logq - logm)
        else:  # 1/2 |q - p|, subgradient 0 where they are equal
            d = q - p
            term = 0.5 * tl.abs(d)
            a = tl.where(d > 0, 0.5, tl.where(d < 0, -0.5, 0.0))
        return term, a, q, p

    @triton.jit
    def _div_rows(S, T, LOSS, DS, G, P, stride_s, stride_t, stride_ds, n_cls,
                  MODE: tl.constexpr, WRITE_GRAD: tl.constexpr, ACC: tl.constexpr,
                  BLOCK: tl.constexpr):
        """P = (1/T, log beta, log(1 - beta), beta, gradient scale); the gradient is
        P[4] * G[row] * q (a - sum q a) (forward KL: P[4] * G[row] * (q - p))."""
        row = tl.program_id(0).to(tl.int64)
        inv_temp = tl.load(P + 0)
        log_beta = tl.load(P + 1)
        log_1mb = tl.load(P + 2)
        beta = tl.load(P + 3)
        S_row = S + row * stride_s
        T_row = T + row * stride_t
        D_row = DS + row * stride_ds
        m_s = tl.full((), float("-inf"), ACC)
        m_t = tl.full((), float("-inf"), ACC)
        z_s = tl.zeros((), ACC)
        z_t = tl.zeros((), ACC)
        for off in range(0, n_cls, BLOCK):
            cols = off + tl.arange(0, BLOCK)
            mask = cols < n_cls
            s = tl.load(S_row + cols, mask=mask, other=float("-inf")).to(ACC) * inv_temp
            t = tl.load(T_row + cols, mask=mask, other=float("-inf")).to(ACC) * inv_temp
            m_s, z_s = lse_update(m_s, z_s, s)
            m_t, z_t = lse_update(m_t, z_t, t)
        r_s = tl.log(z_s)
        r_t = tl.log(z_t)
        scale = tl.load(P + 4) * tl.load(G + row).to(ACC)
        loss = tl.zeros((), ACC)
        qa = tl.zeros((), ACC)
        for off in range(0, n_cls, BLOCK):
            cols = off + tl.arange(0, BLOCK)
            mask = cols < n_cls
            s = tl.load(S_row + cols, mask=mask, other=0.0).to(ACC)
            t = tl.load(T_row + cols, mask=mask, other=0.0).to(ACC)
            term, a, q, p = _div_terms(s, t, m_s, r_s, m_t, r_t, inv_temp, log_beta, log_1mb,
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
                s = tl.load(S_row + cols, mask=mask, other=0.0).to(ACC)
                t = tl.load(T_row + cols, mask=mask, other=0.0).to(ACC)
                term, a, q, p = _div_terms(s, t, m_s, r_s, m_t, r_t, inv_temp, log_beta,
                                           log_1mb, beta, MODE)
                tl.store(D_row + cols, (scale * q * (a - qa)).to(D_row.dtype.element_ty),
                         mask=mask)


def _mode(direction: str, beta: float) -> int:
    """Generalized JSD at beta 0 / 1 is forward / reverse KL (Liger-Kernel's convention)."""
    if direction == "jsd" and beta == 0.0:
        return MODES["forward"]
    if direction == "jsd" and beta == 1.0:
        return MODES["reverse"]
    return MODES[direction]


def div_rows_inplace(student: torch.Tensor, teacher: torch.Tensor, temperature: float,
                     direction: str, beta: float, row_scale: torch.Tensor,
                     grad_out: torch.Tensor | None = None, write_grad: bool = True,
                     loss_scale: float | None = None) -> torch.Tensor:
    """Per-row divergence of a (n, V) block times ``loss_scale`` (default T^2, the
    distillation convention), in the accumulator dtype; writes d loss / d student into
    ``grad_out`` (may be ``student`` itself), scaled per row by ``row_scale``."""
    n_rows, n_cls = student.shape
    acc = acc_dtype(student.dtype)
    loss = torch.empty(n_rows, dtype=acc, device=student.device)
    if n_rows == 0:
        return loss
    t = float(temperature)
    loss_scale = t * t if loss_scale is None else float(loss_scale)
    grad_out = student if grad_out is None else grad_out
    beta = float(beta)
    params = scalars(student.device, student.dtype, 1.0 / t,
                     math.log(beta) if beta > 0 else float("-inf"),
                     math.log1p(-beta) if beta < 1 else float("-inf"), beta, loss_scale / t)
    _div_rows[(n_rows,)](
        student, teacher, loss, grad_out, row_scale.to(acc).contiguous(), params,
        student.stride(0), teacher.stride(0), grad_out.stride(0), n_cls,
        MODE=_mode(direction, beta), WRITE_GRAD=write_grad, ACC=tl_acc(student.dtype),
        BLOCK=_block(n_cls), num_warps=NUM_WARPS)
    return loss * loss_scale


class _Divergence(torch.autograd.Function):
    """Rows whose ``keep`` is False give 0 and no gradient; ``mean`` divides by the kept
    rows (nothing kept: NaN, zero gradient, as torch's mean over no element)."""

    @staticmethod
    def forward(ctx, student, teacher, keep, temperature, direction, beta, loss_scale,
                reduction):
        s = student.contiguous()
        t = teacher.contiguous()
        n = s.shape[0]
        acc = acc_dtype(s.dtype)
        keep = torch.ones(n, dtype=torch.bool, device=s.device) if keep is None else keep
        kept = keep.sum().to(acc)
        ctx.meta = (temperature, direction, beta, loss_scale, reduction)
        rows_w = keep.to(acc)
        if reduction == "none" or not ctx.needs_input_grad[0]:
            loss = div_rows_inplace(s, t, temperature, direction, beta, rows_w,
                                    write_grad=False, loss_scale=loss_scale)
            ctx.save_for_backward(s, t, keep)
        else:
            denom = torch.where(kept > 0, kept, torch.ones_like(kept))
            scale = rows_w / denom if reduction == "mean" else rows_w
            grad = torch.empty_like(s)
            loss = div_rows_inplace(s, t, temperature, direction, beta, scale, grad_out=grad,
                                    loss_scale=loss_scale)
            ctx.save_for_backward(grad)
        loss = torch.where(keep, loss, torch.zeros_like(loss))
        if reduction == "none":
            return loss.to(student.dtype)
        total = loss.sum()
        if reduction == "sum":
            return total.to(student.dtype)
        return torch.where(kept > 0, total / kept.clamp_min(1), torch.full_like(
            total, float("nan"))).to(student.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        temperature, direction, beta, loss_scale, reduction = ctx.meta
        if len(ctx.saved_tensors) == 3:
            s, t, keep = ctx.saved_tensors
            acc = acc_dtype(s.dtype)
            if reduction == "none":
                scale = grad_out.to(acc) * keep
            else:
                kept = keep.sum().to(acc).clamp_min(1)
                scale = grad_out.to(acc).expand(s.shape[0]) * keep
                scale = scale / kept if reduction == "mean" else scale
            grad = torch.empty_like(s)
            div_rows_inplace(s, t, temperature, direction, beta, scale, grad_out=grad,
                             loss_scale=loss_scale)
            return grad, None, None, None, None, None, None, None
        (grad,) = ctx.saved_tensors
        flat = grad.view(-1)
        if flat.numel():
            _scale_unless_one[(triton.cdiv(flat.numel(), 4096),)](
                flat, grad_out.reshape(1).contiguous(), flat.numel(),
                ACC=tl_acc(grad.dtype), BLOCK=4096, num_warps=8)
        return grad, None, None, None, None, None, None, None


class DivergenceKernel:
    """``(student (N, V), teacher (N, V), direction, temperature=1.0, beta=0.5,
    reduction="mean", keep=None, loss_scale=None)``: loss_scale defaults to T^2."""

    name = "divergence"

    def __init__(self):
        TEMPLATE_INSTANCES.append(self)

    def __call__(self, student, teacher, direction, temperature=1.0, beta=0.5,
                 reduction="mean", keep=None, loss_scale=None):
        if not HAVE_TRITON:
            raise ImportError("divergence: triton is not installed")
        t = float(temperature)
        return _Divergence.apply(student, teacher, keep, t, direction, float(beta),
                                 t * t if loss_scale is None else float(loss_scale), reduction)

    def aot_sources(self, dtype: str = "fp32"):
        p = f"*{dtype}"
        acc = "fp64" if dtype == "fp64" else "fp32"
        sig = {"S": p, "T": p, "LOSS": f"*{acc}", "DS": p, "G": f"*{acc}", "P": f"*{acc}",
               "stride_s": "i64", "stride_t": "i64", "stride_ds": "i64", "n_cls": "i32"}
        acc_c = tl.float64 if acc == "fp64" else tl.float32
        return [(_div_rows, sig, {"MODE": mode, "WRITE_GRAD": True, "ACC": acc_c,
                                  "BLOCK": BLOCK_MAX}, {"num_warps": NUM_WARPS})
                for mode in MODES.values()]


divergence = DivergenceKernel()
