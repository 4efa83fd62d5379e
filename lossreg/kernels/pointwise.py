"""Template for pointwise losses: ``loss = reduce_i f(x_i, y_i)``.

A plugin supplies one ``@jit`` function ``term(x, y, p0, p1) -> (loss, dloss_dx,
dloss_dy)`` computed in float32 (float64 for float64 inputs), with up to two scalar
parameters (margin, delta, tau, ...). ``pointwise_loss(term)`` returns a callable
``(input, target, reduction="mean", p0=0.0, p1=0.0)`` backed by two kernels:

* ``mean``/``sum``: one pass reads x and y once, writes a partial sum per program and
  the gradients of the inputs that require them (already divided by n for ``mean``),
  so the backward is free when the incoming gradient is 1 (the usual case: the loss
  is the last node). Otherwise the saved gradient is scaled in place. That check
  syncs the device once; recomputing instead would cost a second full read of x, y.
* ``none``: the forward writes the per-element loss; the backward reads x, y and the
  incoming gradient once and writes each needed gradient once.

Inputs of any length (masked tail), float32/bfloat16/float16 (float32 accumulation)
and float64 (float64 accumulation). Gradients are written only for inputs that
require them (compile-time flags, so the unused stores vanish).
"""

from __future__ import annotations

from typing import Any

import torch

from . import HAVE_TRITON, TEMPLATE_INSTANCES

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _pointwise_fwd(
        X, Y, OUT, DX, DY, n, denom, p0, p1,
        TERM: tl.constexpr, REDUCE: tl.constexpr, WRITE_DX: tl.constexpr,
        WRITE_DY: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
    ):
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(X + offs, mask=mask, other=0.0).to(ACC)
        y = tl.load(Y + offs, mask=mask, other=0.0).to(ACC)
        loss, dx, dy = TERM(x, y, p0, p1)
        if REDUCE:
            tl.store(OUT + pid, tl.sum(tl.where(mask, loss, 0.0), axis=0))
            if WRITE_DX:
                tl.store(DX + offs, (dx / denom).to(DX.dtype.element_ty), mask=mask)
            if WRITE_DY:
                tl.store(DY + offs, (dy / denom).to(DY.dtype.element_ty), mask=mask)
        else:
            tl.store(OUT + offs, loss.to(OUT.dtype.element_ty), mask=mask)

    @triton.jit
    def _pointwise_bwd(
        X, Y, G, DX, DY, n, p0, p1,
        TERM: tl.constexpr, WRITE_DX: tl.constexpr, WRITE_DY: tl.constexpr,
        ACC: tl.constexpr, BLOCK: tl.constexpr,
    ):
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(X + offs, mask=mask, other=0.0).to(ACC)
        y = tl.load(Y + offs, mask=mask, other=0.0).to(ACC)
        g = tl.load(G + offs, mask=mask, other=0.0).to(ACC)
        loss, dx, dy = TERM(x, y, p0, p1)
        if WRITE_DX:
            tl.store(DX + offs, (dx * g).to(DX.dtype.element_ty), mask=mask)
        if WRITE_DY:
            tl.store(DY + offs, (dy * g).to(DY.dtype.element_ty), mask=mask)

BLOCK = 4096
NUM_WARPS = 8
REDUCTIONS = ("mean", "sum", "none")


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


class _PointwiseFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, term, reduction, p0, p1):
        shape = x.shape
        xf, yf = x.contiguous().view(-1), y.contiguous().view(-1)
        n = xf.numel()
        need_dx, need_dy = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grid = (triton.cdiv(n, BLOCK),)
        acc = _acc_dtype(x.dtype)
        ctx.reduction, ctx.term, ctx.p = reduction, term, (p0, p1)
        if reduction == "none":
            out = torch.empty_like(xf)
            if n:
                _pointwise_fwd[grid](
                    xf, yf, out, xf, yf, n, 1, p0, p1, TERM=term, REDUCE=False,
                    WRITE_DX=False, WRITE_DY=False, ACC=acc, BLOCK=BLOCK, num_warps=NUM_WARPS,
                )
            ctx.save_for_backward(xf, yf)
            ctx.shape = shape
            return out.view(shape)
        denom = n if (reduction == "mean" and n) else 1
        part_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        partial = torch.empty(max(grid[0], 1), dtype=part_dtype, device=x.device)
        dx = torch.empty_like(xf) if need_dx else None
        dy = torch.empty_like(yf) if need_dy else None
        if n:
            _pointwise_fwd[grid](
                xf, yf, partial, xf if dx is None else dx, yf if dy is None else dy, n, denom,
                p0, p1, TERM=term, REDUCE=True, WRITE_DX=need_dx, WRITE_DY=need_dy, ACC=acc,
                BLOCK=BLOCK, num_warps=NUM_WARPS,
            )
            total = partial.sum() / denom
        else:  # torch semantics: the mean of nothing is nan, the sum is 0
            total = partial.new_full((), float("nan") if reduction == "mean" else 0.0)
        ctx.save_for_backward(dx, dy)
        ctx.shape = shape
        return total.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.reduction == "none":
            xf, yf = ctx.saved_tensors
            need_dx, need_dy = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
            n = xf.numel()
            dx = torch.empty_like(xf) if need_dx else None
            dy = torch.empty_like(yf) if need_dy else None
            if n:
                g = grad_out.contiguous().view(-1)
                _pointwise_bwd[(triton.cdiv(n, BLOCK),)](
                    xf, yf, g, xf if dx is None else dx, yf if dy is None else dy, n,
                    *ctx.p, TERM=ctx.term, WRITE_DX=need_dx, WRITE_DY=need_dy,
                    ACC=_acc_dtype(xf.dtype), BLOCK=BLOCK, num_warps=NUM_WARPS,
                )
        else:
            dx, dy = ctx.saved_tensors
            # The gradient was computed in the forward for an incoming gradient of 1.
            if not bool(grad_out == 1):
                dx = None if dx is None else dx.mul_(grad_out)
                dy = None if dy is None else dy.mul_(grad_out)
        dx = None if dx is None else dx.view(ctx.shape)
        dy = None if dy is None else dy.view(ctx.shape)
        return dx, dy, None, None, None, None


class PointwiseLoss:
    """A pointwise loss kernel built from a ``term`` function (see module docstring)."""

    def __init__(self, term, name: str | None = None):
        self.term = term
        self.name = name or getattr(term, "__name__", "term")
        TEMPLATE_INSTANCES.append(self)

    def __call__(
        self, input: torch.Tensor, target: torch.Tensor, reduction: str = "mean",
        p0: float = 0.0, p1: float = 0.0,
    ) -> torch.Tensor:
        if not HAVE_TRITON:
            raise ImportError(f"{self.name}: triton is not installed")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if input.shape != target.shape:
            raise ValueError(
                f"{self.name}: input and target must have the same shape, "
                f"got {tuple(input.shape)} and {tuple(target.shape)}"
            )
        return _PointwiseFunction.apply(input, target, self.term, reduction, float(p0), float(p1))

    def aot_sources(self, dtype: str = "fp32") -> list[tuple[Any, dict, dict, dict]]:
        """(kernel, signature, constexprs, compile options) for each kernel it launches."""
        acc = "fp64" if dtype == "fp64" else "fp32"
        p = f"*{dtype}"
        acc_c = tl.float64 if dtype == "fp64" else tl.float32
        common = {"TERM": self.term, "ACC": acc_c, "BLOCK": BLOCK}
        opts = {"num_warps": NUM_WARPS}
        fwd_sig = {"X": p, "Y": p, "OUT": f"*{acc}", "DX": p, "DY": p, "n": "i64",
                   "denom": "i64", "p0": "fp32", "p1": "fp32"}
        bwd_sig = {"X": p, "Y": p, "G": p, "DX": p, "DY": p, "n": "i64",
                   "p0": "fp32", "p1": "fp32"}
        return [
            (_pointwise_fwd, fwd_sig,
             {**common, "REDUCE": True, "WRITE_DX": True, "WRITE_DY": True}, opts),
            (_pointwise_fwd, fwd_sig,
             {**common, "REDUCE": False, "WRITE_DX": False, "WRITE_DY": False}, opts),
            (_pointwise_bwd, bwd_sig, {**common, "WRITE_DX": True, "WRITE_DY": True}, opts),
        ]


def pointwise_loss(term, name: str | None = None) -> PointwiseLoss:
    """Build a fused pointwise loss from ``term(x, y, p0, p1) -> (loss, dx, dy)``."""
    return PointwiseLoss(term, name)
