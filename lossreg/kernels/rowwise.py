"""Template for row-wise losses: a score matrix ``s`` of shape (N, C) with one integer
label per row, ``loss = reduce_i w_{y_i} f(s_i, y_i)``.

A plugin supplies one ``@jit`` function over a tile of whole rows, in float32 (float64
for float64 inputs):

    term(s, valid, is_label, C, p0, p1) -> (row_loss, grad)

``s`` is a ``[BLOCK_M, BLOCK_C]`` tile holding ``BLOCK_M`` complete rows (entries
outside the matrix are 0 and ``valid`` is False there), ``is_label`` is the one-hot
mask of each row's label, ``C`` the number of classes (as a float of the tile's
dtype) and ``p0``, ``p1`` two scalar
parameters. It returns the ``[BLOCK_M]`` row losses and the ``[BLOCK_M, BLOCK_C]``
gradient of each row loss with respect to its row. Reductions along ``axis=1`` are row
reductions, so margin losses (``s_y`` = the label's score) and softmax losses
(``tl.max``/``tl.sum`` of ``tl.exp`` over the valid entries, i.e. an in-tile
logsumexp) are both a few lines.

Each program reads its rows once and, for ``mean``/``sum``, writes the row gradients in
the forward (divided by N for ``mean``; the backward scales them in place unless the
incoming gradient is 1), exactly as the pointwise template does; for
``none`` the backward recomputes them scaled by the incoming gradient. Rows are short
for classic heads (C = 10), so a program takes ``BLOCK_M = TILE // BLOCK_C`` rows at
once (one program per row would leave most lanes idle); from ``C >= TILE`` on it is one
program per row. A row must fit one tile (``C <= MAX_C``); vocabulary-sized rows need
a chunked variant with an online (running max, running sum) state, which would be a
second kernel pair here with the term split into an update and a finish step.

Options: ``weighted=True`` takes a per-class ``weight`` vector, and multiplies row ``i``
by ``weight[y_i]`` (torch's ``weight`` of ``multi_margin_loss``); ``exp_form=True``
is the pointwise template's: the term returns the exponent ``g`` of the row loss
``e^g`` and ``dg/ds``, and the template rounds ``e^g`` to the input dtype so that it
overflows where an eager computation does.
"""

from __future__ import annotations

from typing import Any

import torch

from . import HAVE_TRITON, TEMPLATE_INSTANCES, guarded, acc_dtype, tl_acc
from .libm import exp as _accurate_exp

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from .pointwise import _scale_unless_one

    @triton.jit
    def _rowwise_eval(
        S, LABEL, W, pid, N, C, p0, p1,
        TERM: tl.constexpr, HAS_W: tl.constexpr, EXP_FORM: tl.constexpr, ACC: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        """Load BLOCK_M rows and evaluate the term: (row loss, grad, offsets, masks)."""
        rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_C)
        row_ok = rows < N
        valid = row_ok[:, None] & (cols < C)[None, :]
        offs = rows[:, None] * C + cols[None, :]
        s = tl.load(S + offs, mask=valid, other=0).to(ACC)
        label = tl.load(LABEL + rows, mask=row_ok, other=0)
        is_label = valid & (cols[None, :] == label[:, None])
        loss, grad = TERM(s, valid, is_label, tl.cast(C, ACC), p0, p1)
        if EXP_FORM:
            loss = _accurate_exp(loss).to(S.dtype.element_ty).to(ACC)
            grad = tl.where(grad == 0, 0.0, loss[:, None] * grad)
        if HAS_W:
            w = tl.load(W + label, mask=row_ok, other=0).to(ACC)
            loss = loss * w
            grad = grad * w[:, None]
        return tl.where(row_ok, loss, 0.0), grad, rows, row_ok, offs, valid

    # C is specialized as any integer argument (tl.cast takes C == 1, a constexpr): a
    # multiple of 16 is what lets a row start on a 16-byte boundary, for 128-bit accesses
    @triton.jit
    def _rowwise_fwd(
        S, LABEL, W, OUT, DS, N, C, denom, p0, p1,
        TERM: tl.constexpr, HAS_W: tl.constexpr, EXP_FORM: tl.constexpr,
        REDUCE: tl.constexpr, WRITE_DS: tl.constexpr, ACC: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        pid = tl.program_id(0)
        loss, grad, rows, row_ok, offs, valid = _rowwise_eval(
            S, LABEL, W, pid, N, C, p0, p1, TERM, HAS_W, EXP_FORM, ACC, BLOCK_M, BLOCK_C)
        if REDUCE:
            tl.store(OUT + pid, tl.sum(loss, axis=0))
            if WRITE_DS:
                tl.store(DS + offs, (grad / denom).to(DS.dtype.element_ty), mask=valid)
        else:
            tl.store(OUT + rows, loss.to(OUT.dtype.element_ty), mask=row_ok)

    @triton.jit
    def _rowwise_bwd(
        S, LABEL, W, G, DS, N, C, p0, p1,
        TERM: tl.constexpr, HAS_W: tl.constexpr, EXP_FORM: tl.constexpr,
        ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        pid = tl.program_id(0)
        _, grad, rows, row_ok, offs, valid = _rowwise_eval(
            S, LABEL, W, pid, N, C, p0, p1, TERM, HAS_W, EXP_FORM, ACC, BLOCK_M, BLOCK_C)
        g = tl.load(G + rows, mask=row_ok, other=0).to(ACC)
        tl.store(DS + offs, (grad * g[:, None]).to(DS.dtype.element_ty), mask=valid)

#: Elements per tile: rows shorter than this share a program.
TILE = 4096
#: Longest row one tile holds: 16 values per thread at 16 warps, in registers (the AOT
#: compile checks it does not spill).
MAX_C = 8192
REDUCTIONS = ("mean", "sum", "none")


def blocks(C: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_C) for rows of C classes."""
    block_c = max(triton.next_power_of_2(C), 2)
    return max(TILE // block_c, 1), block_c


def num_warps(block_c: int) -> int:
    """16 values of a tile per thread (8 warps), 32 for the widest rows (16 warps)."""
    return 8 if block_c <= TILE else 16


class _RowwiseFunction(torch.autograd.Function):
    @staticmethod
    @guarded
    def forward(ctx, s, label, weight, inst, reduction, p0, p1):
        s, label = s.contiguous(), label.contiguous()
        n_rows, C = s.shape
        block_m, block_c = blocks(C)
        grid = (triton.cdiv(n_rows, block_m),)
        flags = dict(TERM=inst.term, HAS_W=weight is not None, EXP_FORM=inst.exp_form,
                     ACC=tl_acc(s.dtype), BLOCK_M=block_m, BLOCK_C=block_c,
                     num_warps=num_warps(block_c))
        ctx.reduction, ctx.flags, ctx.p = reduction, flags, (p0, p1)
        w = s if weight is None else weight.contiguous()
        if reduction == "none":
            out = torch.empty(n_rows, dtype=s.dtype, device=s.device)
            if n_rows:
                _rowwise_fwd[grid](s, label, w, out, s, n_rows, C, 1, p0, p1, REDUCE=False,
                                   WRITE_DS=False, **flags)
            ctx.save_for_backward(s, label, weight)
            return out
        need_ds = ctx.needs_input_grad[0]
        denom = n_rows if (reduction == "mean" and n_rows) else 1
        part_dtype = acc_dtype(s.dtype)
        partial = torch.empty(max(grid[0], 1), dtype=part_dtype, device=s.device)
        ds = torch.empty_like(s) if need_ds else None
        if n_rows:
            _rowwise_fwd[grid](s, label, w, partial, s if ds is None else ds, n_rows, C, denom,
                               p0, p1, REDUCE=True, WRITE_DS=need_ds, **flags)
            total = partial.sum() / denom
        else:  # torch semantics: the mean of nothing is nan, the sum is 0
            total = partial.new_full((), float("nan") if reduction == "mean" else 0.0)
        ctx.save_for_backward(ds)
        return total.to(s.dtype)

    @staticmethod
    @guarded
    def backward(ctx, grad_out):
        if ctx.reduction == "none":
            s, label, weight = ctx.saved_tensors
            n_rows, C = s.shape
            ds = torch.empty_like(s)
            if n_rows:
                grid = (triton.cdiv(n_rows, ctx.flags["BLOCK_M"]),)
                _rowwise_bwd[grid](s, label, s if weight is None else weight,
                                   grad_out.contiguous(), ds, n_rows, C, *ctx.p, **ctx.flags)
        else:
            (ds,) = ctx.saved_tensors
            # The gradient was computed in the forward for an incoming gradient of 1: the
            # kernel scales it in place otherwise, without a host sync to find out.
            if ds is not None and ds.numel():
                flat = ds.view(-1)
                _scale_unless_one[(triton.cdiv(flat.numel(), TILE),)](
                    flat, grad_out.reshape(1).contiguous(), flat.numel(),
                    ACC=tl_acc(ds.dtype), BLOCK=TILE, num_warps=8)
        return ds, None, None, None, None, None, None


class RowwiseLoss:
    """A row-wise loss kernel built from a ``term`` function (see module docstring)."""

    def __init__(self, term, name: str | None = None, *, weighted: bool = False,
                 exp_form: bool = False, aot_classes: tuple[int, ...] = (10, 1000, 8192)):
        self.term = term
        self.name = name or getattr(term, "__name__", "term")
        self.weighted = weighted
        self.exp_form = exp_form
        #: class counts whose tile shapes the ahead-of-time compile covers
        self.aot_classes = tuple(aot_classes)
        TEMPLATE_INSTANCES.append(self)

    def __call__(
        self, input: torch.Tensor, target: torch.Tensor, reduction: str = "mean",
        p0: float = 0.0, p1: float = 0.0, weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if not HAVE_TRITON:
            raise ImportError(f"{self.name}: triton is not installed")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if input.dim() != 2 or target.shape != input.shape[:1]:
            raise ValueError(f"{self.name}: expected input (N, C) and target (N,), got "
                             f"{tuple(input.shape)} and {tuple(target.shape)}")
        if input.shape[1] > MAX_C:
            raise ValueError(f"{self.name}: rows of {input.shape[1]} classes exceed the "
                             f"row-wise template's single tile (C <= {MAX_C})")
        if weight is not None:
            if not self.weighted:
                raise ValueError(f"{self.name}: built without weighted=True, weight must be "
                                 "None")
            if weight.requires_grad:
                raise ValueError(f"{self.name}: weight is not differentiated by this kernel; "
                                 "pass it detached")
        return _RowwiseFunction.apply(input, target, weight, self, reduction, float(p0),
                                      float(p1))

    def aot_sources(self, dtype: str = "fp32") -> list[tuple[Any, dict, dict, dict]]:
        """(kernel, signature, constexprs, compile options) for each kernel it launches,
        for each class count in ``aot_classes`` (the tile shape depends on C)."""
        acc = "fp64" if dtype == "fp64" else "fp32"
        p = f"*{dtype}"
        acc_c = tl.float64 if dtype == "fp64" else tl.float32
        fwd_sig = {"S": p, "LABEL": "*i64", "W": p, "OUT": f"*{acc}", "DS": p, "N": "i64",
                   "C": "i32", "denom": "i64", "p0": "fp32", "p1": "fp32"}
        bwd_sig = {"S": p, "LABEL": "*i64", "W": p, "G": p, "DS": p, "N": "i64", "C": "i32",
                   "p0": "fp32", "p1": "fp32"}
        sources = []
        for classes in self.aot_classes:
            block_m, block_c = blocks(classes)
            common = {"TERM": self.term, "HAS_W": self.weighted, "EXP_FORM": self.exp_form,
                      "ACC": acc_c, "BLOCK_M": block_m, "BLOCK_C": block_c}
            opts = {"num_warps": num_warps(block_c)}
            sources += [
                (_rowwise_fwd, fwd_sig, {**common, "REDUCE": True, "WRITE_DS": True}, opts),
                (_rowwise_fwd, fwd_sig, {**common, "REDUCE": False, "WRITE_DS": False}, opts),
                (_rowwise_bwd, bwd_sig, common, opts),
            ]
        return sources


def rowwise_loss(term, name: str | None = None, *, weighted: bool = False,
                 exp_form: bool = False, aot_classes: tuple[int, ...] = (10, 1000, 8192)
                 ) -> RowwiseLoss:
    """Build a fused row-wise loss from ``term`` (see the module docstring)."""
    return RowwiseLoss(term, name, weighted=weighted, exp_form=exp_form,
                       aot_classes=aot_classes)
