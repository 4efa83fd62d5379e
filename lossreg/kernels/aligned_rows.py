"""Template for losses over aligned rows of two or three (N, D) matrices with an optional
label per row: ``loss = reduce_i f(a_i, b_i[, c_i], y_i)``. Cosine embedding (``x1``,
``x2``, ``y``) and triplet (anchor, positive, negative) losses have this shape; the
row-wise template does not fit them (it takes one matrix), nor does the pointwise one
(the terms couple a whole row through norms and dot products).

A plugin supplies one ``@jit`` function over a tile of ``BLOCK_M`` whole rows, computed in
float32 (float64 for float64 inputs):

    term(a, b, c, valid, y, p0, p1, p2, p3) -> (row_loss, da, db, dc)

``a``, ``b``, ``c`` are ``[BLOCK_M, BLOCK_D]`` tiles (0 outside the matrices, where ``valid``
is False; ``c`` is all 0 for two-operand losses), ``y`` the ``[BLOCK_M]`` row labels as
floats (0 without labels), ``p0..p3`` scalar options. It returns the ``[BLOCK_M]`` row
losses and the gradient tiles of each row loss w.r.t. its rows (``dc`` is ignored for
two operands). Row reductions are ``tl.sum(..., axis=1)``.

As in the pointwise template, ``mean``/``sum`` are one launch: the forward writes the
gradients (each input read once, each gradient written once) and the last program adds
the row tiles' partial sums into the loss (no second launch, no host sync); the
backward is one launch of a few programs that read the incoming gradient on the device
and return when it is 1 (else they rescale the gradients in place) and ``none`` recomputes them in the backward,
scaled by the incoming gradient. Gradients are written only for the operands that
require them (compile-time flags).

A row must fit one tile (``D <= MAX_D``): the three operands and their gradients live in
registers. Embedding widths are far below; wider rows would need a two-pass variant
(row statistics first, then the gradients).
"""

from __future__ import annotations

from typing import Any

import torch

from . import HAVE_TRITON, TEMPLATE_INSTANCES, acc_dtype, tl_acc
from ._guard import quiet
from .pointwise import RBLOCK, launch_counter, scale_grid

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from .pointwise import _finish_sum, _scale_unless_one

    @triton.jit
    def _aligned_eval(
        A, B, C, Y, pid, N, D, p0, p1, p2, p3,
        TERM: tl.constexpr, HAS_C: tl.constexpr, HAS_Y: tl.constexpr, ACC: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_D)
        row_ok = rows < N
        valid = row_ok[:, None] & (cols < D)[None, :]
        offs = rows[:, None] * D + cols[None, :]
        a = tl.load(A + offs, mask=valid, other=0).to(ACC)
        b = tl.load(B + offs, mask=valid, other=0).to(ACC)
        if HAS_C:
            c = tl.load(C + offs, mask=valid, other=0).to(ACC)
        else:
            c = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
        if HAS_Y:
            y = tl.load(Y + rows, mask=row_ok, other=0).to(ACC)
        else:
            y = tl.zeros([BLOCK_M], dtype=ACC)
        loss, da, db, dc = TERM(a, b, c, valid, y, p0, p1, p2, p3)
        return tl.where(row_ok, loss, 0.0), da, db, dc, rows, row_ok, offs, valid

    @triton.jit
    def _aligned_fwd(
        A, B, C, Y, OUT, PART, COUNT, DA, DB, DC, N, D, denom, p0, p1, p2, p3,
        TERM: tl.constexpr, HAS_C: tl.constexpr, HAS_Y: tl.constexpr, REDUCE: tl.constexpr,
        WRITE_A: tl.constexpr, WRITE_B: tl.constexpr, WRITE_C: tl.constexpr,
        ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
        RBLOCK: tl.constexpr,
    ):
        pid = tl.program_id(0)
        loss, da, db, dc, rows, row_ok, offs, valid = _aligned_eval(
            A, B, C, Y, pid, N, D, p0, p1, p2, p3, TERM, HAS_C, HAS_Y, ACC, BLOCK_M, BLOCK_D)
        if REDUCE:
            tl.store(PART + pid, tl.sum(loss, axis=0))
            if WRITE_A:
                tl.store(DA + offs, (da / denom).to(DA.dtype.element_ty), mask=valid)
            if WRITE_B:
                tl.store(DB + offs, (db / denom).to(DB.dtype.element_ty), mask=valid)
            if WRITE_C:
                tl.store(DC + offs, (dc / denom).to(DC.dtype.element_ty), mask=valid)
            # the last program adds the partials: the loss is final when the kernel ends
            _finish_sum(PART, COUNT, OUT, denom, ACC, RBLOCK)
        else:
            tl.store(OUT + rows, loss.to(OUT.dtype.element_ty), mask=row_ok)

    @triton.jit
    def _aligned_bwd(
        A, B, C, Y, G, DA, DB, DC, N, D, p0, p1, p2, p3,
        TERM: tl.constexpr, HAS_C: tl.constexpr, HAS_Y: tl.constexpr,
        WRITE_A: tl.constexpr, WRITE_B: tl.constexpr, WRITE_C: tl.constexpr,
        ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        pid = tl.program_id(0)
        _, da, db, dc, rows, row_ok, offs, valid = _aligned_eval(
            A, B, C, Y, pid, N, D, p0, p1, p2, p3, TERM, HAS_C, HAS_Y, ACC, BLOCK_M, BLOCK_D)
        g = tl.load(G + rows, mask=row_ok, other=0).to(ACC)[:, None]
        if WRITE_A:
            tl.store(DA + offs, (da * g).to(DA.dtype.element_ty), mask=valid)
        if WRITE_B:
            tl.store(DB + offs, (db * g).to(DB.dtype.element_ty), mask=valid)
        if WRITE_C:
            tl.store(DC + offs, (dc * g).to(DC.dtype.element_ty), mask=valid)

#: Elements of one operand a program holds: rows shorter than this share a program.
TILE = 1024
#: Widest row one tile holds (three operands and three gradients in registers).
MAX_D = 4096
REDUCTIONS = ("mean", "sum", "none")
#: elements per step of the in-place gradient scale (the pointwise template's block)
SCALE_BLOCK = 4096
_ITEMSIZE = {"fp64": 8, "fp32": 4, "bf16": 2, "fp16": 2}


def blocks(D: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_D) for rows of width D."""
    block_d = max(triton.next_power_of_2(D), 16)
    return max(TILE // block_d, 1), block_d


def num_warps(block_m: int, block_d: int, itemsize: int = 4) -> int:
    """8 warps: at most 16 elements of each operand per thread (three operands, their
    differences and gradients at 4 warps spill on the widest rows). Two-byte inputs in
    tiles of ``TILE`` take 4 warps, so that each thread holds 8 elements per operand: one
    128-bit load (at 8 warps a thread's 4 bfloat16 are a 64-bit load)."""
    return 4 if itemsize == 2 and block_m * block_d <= TILE else 8


#: registers per SM on sm_80 and sm_90
REGS_PER_SM = 65536


def max_registers(warps: int) -> int:
    """The register cap (``maxnreg``) that leaves room for two resident blocks per SM.
    Rows of ``MAX_D`` with three operands need ~145 registers at 8 warps uncapped (one
    block per SM); capped at 128 ptxas fits them without spilling (the ahead-of-time
    build checks that no kernel spills)."""
    return min(255, REGS_PER_SM // (2 * 32 * warps))


def launch_options(block_m: int, block_d: int, itemsize: int) -> dict:
    warps = num_warps(block_m, block_d, itemsize)
    return {"num_warps": warps, "maxnreg": max_registers(warps)}


class _AlignedFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, c, y, inst, reduction, p):
        a, b = a.contiguous(), b.contiguous()
        c = c.contiguous() if c is not None else None
        y = y.contiguous() if y is not None else None
        N, D = a.shape
        block_m, block_d = blocks(D)
        grid = (triton.cdiv(N, block_m),)
        flags = {"TERM": inst.term, "HAS_C": c is not None, "HAS_Y": y is not None,
                 "ACC": tl_acc(a.dtype), "BLOCK_M": block_m, "BLOCK_D": block_d,
                 **launch_options(block_m, block_d, a.element_size())}
        ctx.reduction, ctx.flags, ctx.p = reduction, flags, p
        cc = a if c is None else c
        yy = a if y is None else y
        if reduction == "none":
            out = torch.empty(N, dtype=a.dtype, device=a.device)
            if N:
                with quiet():
                    _aligned_fwd[grid](a, b, cc, yy, out, out, out, a, b, cc, N, D, 1, *p,
                                       REDUCE=False, WRITE_A=False, WRITE_B=False,
                                       WRITE_C=False, RBLOCK=RBLOCK, **flags)
            ctx.save_for_backward(a, b, c, y)
            return out
        need = ctx.needs_input_grad[:3]
        grads = [torch.empty_like(t) if (t is not None and nd) else None
                 for t, nd in zip((a, b, c), need)]
        denom = N if (reduction == "mean" and N) else 1
        part_dtype = acc_dtype(a.dtype)
        partial = torch.empty(max(grid[0], 1), dtype=part_dtype, device=a.device)
        if N:
            targets = [g if g is not None else t for g, t in zip(grads, (a, b, cc))]
            total = torch.empty((), dtype=a.dtype, device=a.device)
            with quiet():
                _aligned_fwd[grid](a, b, cc, yy, total, partial, launch_counter(a.device),
                                   *targets, N, D, denom, *p, REDUCE=True,
                                   WRITE_A=grads[0] is not None, WRITE_B=grads[1] is not None,
                                   WRITE_C=grads[2] is not None, RBLOCK=RBLOCK, **flags)
        else:  # torch semantics: the mean of nothing is nan, the sum is 0
            total = a.new_full((), float("nan") if reduction == "mean" else 0.0)
        ctx.save_for_backward(*grads)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        need = ctx.needs_input_grad[:3]
        if ctx.reduction == "none":
            a, b, c, y = ctx.saved_tensors
            N, D = a.shape
            grads = [torch.empty_like(t) if (t is not None and nd) else None
                     for t, nd in zip((a, b, c), need)]
            cc = a if c is None else c
            if N:
                targets = [g if g is not None else t for g, t in zip(grads, (a, b, cc))]
                grid = (triton.cdiv(N, ctx.flags["BLOCK_M"]),)
                with quiet():
                    _aligned_bwd[grid](a, b, cc, a if y is None else y,
                                       grad_out.contiguous(), *targets, N, D, *ctx.p,
                                       WRITE_A=grads[0] is not None,
                                       WRITE_B=grads[1] is not None,
                                       WRITE_C=grads[2] is not None, **ctx.flags)
        else:
            # computed in the forward for an incoming gradient of 1: one launch of a few
            # programs that read the gradient on the device and return (no host sync)
            grads = list(ctx.saved_tensors)
            g1 = grad_out.reshape(1).contiguous()
            with quiet():
                for t in grads:
                    if t is not None and t.numel():
                        _scale_unless_one[(scale_grid(t.device, triton.cdiv(
                            t.numel(), SCALE_BLOCK)),)](t, g1, t.numel(), ACC=tl_acc(t.dtype),
                                                       BLOCK=SCALE_BLOCK, num_warps=8)
        return grads[0], grads[1], grads[2], None, None, None, None


class AlignedRowsLoss:
    """A loss over aligned rows built from a ``term`` function (see the module docstring).
    ``operands``: 2 or 3 matrices; ``labels``: whether a per-row label is read."""

    def __init__(self, term, name: str | None = None, *, operands: int = 2,
                 labels: bool = False, aot_widths: tuple[int, ...] = (64, 1000, MAX_D)):
        if operands not in (2, 3):
            raise ValueError(f"operands must be 2 or 3, got {operands}")
        self.term = term
        self.name = name or getattr(term, "__name__", "term")
        self.operands = operands
        self.labels = labels
        self.aot_widths = tuple(aot_widths)
        TEMPLATE_INSTANCES.append(self)

    def __call__(self, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor | None = None,
                 y: torch.Tensor | None = None, reduction: str = "mean", p0: float = 0.0,
                 p1: float = 0.0, p2: float = 0.0, p3: float = 0.0) -> torch.Tensor:
        if not HAVE_TRITON:
            raise ImportError(f"{self.name}: triton is not installed")
        if reduction not in REDUCTIONS:
            raise ValueError(f"{self.name}: reduction must be one of {REDUCTIONS}, got "
                             f"{reduction!r}")
        ops = (a, b) if self.operands == 2 else (a, b, c)
        if any(t is None or t.dim() != 2 or t.shape != a.shape for t in ops):
            raise ValueError(f"{self.name}: expected {self.operands} matrices of one shape "
                             f"(N, D), got {[None if t is None else tuple(t.shape) for t in ops]}")
        if (y is None) == self.labels or (y is not None and y.shape != a.shape[:1]):
            raise ValueError(f"{self.name}: expected {'labels of shape (N,)' if self.labels else 'no labels'}")
        if a.shape[1] > MAX_D:
            raise ValueError(f"{self.name}: rows of width {a.shape[1]} exceed the aligned-rows "
                             f"template's single tile (D <= {MAX_D})")
        return _AlignedFunction.apply(a, b, c if self.operands == 3 else None, y, self,
                                      reduction, (float(p0), float(p1), float(p2), float(p3)))

    def aot_sources(self, dtype: str = "fp32") -> list[tuple[Any, dict, dict, dict]]:
        """(kernel, signature, constexprs, compile options) for each kernel it launches,
        for each width in ``aot_widths`` (the tile shape depends on D)."""
        acc = "fp64" if dtype == "fp64" else "fp32"
        p = f"*{dtype}"
        fwd_sig = {"A": p, "B": p, "C": p, "Y": p, "OUT": p, "PART": f"*{acc}",
                   "COUNT": "*i32", "DA": p, "DB": p, "DC": p, "N": "i64", "D": "i32", "denom": "i64", "p0": "fp32",
                   "p1": "fp32", "p2": "fp32", "p3": "fp32"}
        bwd_sig = {"A": p, "B": p, "C": p, "Y": p, "G": p, "DA": p, "DB": p, "DC": p,
                   "N": "i64", "D": "i32", "p0": "fp32", "p1": "fp32", "p2": "fp32",
                   "p3": "fp32"}
        three = self.operands == 3
        sources = []
        for width in self.aot_widths:
            block_m, block_d = blocks(width)
            common = {"TERM": self.term, "HAS_C": three, "HAS_Y": self.labels,
                      "ACC": tl.float64 if dtype == "fp64" else tl.float32,
                      "BLOCK_M": block_m, "BLOCK_D": block_d}
            writes = {"WRITE_A": True, "WRITE_B": True, "WRITE_C": three}
            opts = launch_options(block_m, block_d, _ITEMSIZE[dtype])
            sources += [
                (_aligned_fwd, fwd_sig, {**common, **writes, "REDUCE": True,
                                         "RBLOCK": RBLOCK}, opts),
                (_aligned_fwd, fwd_sig, {**common, "REDUCE": False, "WRITE_A": False,
                                         "WRITE_B": False, "WRITE_C": False,
                                         "RBLOCK": RBLOCK}, opts),
                (_aligned_bwd, bwd_sig, {**common, **writes}, opts),
            ]
        return sources


def aligned_rows_loss(term, name: str | None = None, *, operands: int = 2,
                      labels: bool = False, aot_widths: tuple[int, ...] = (64, 1000, MAX_D)
                      ) -> AlignedRowsLoss:
    """Build a fused loss over aligned rows from ``term`` (see the module docstring)."""
    return AlignedRowsLoss(term, name, operands=operands, labels=labels,
                           aot_widths=aot_widths)
