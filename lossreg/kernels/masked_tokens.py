"""Template for per-token losses over sequences with a token mask, averaged per sequence:

    loss_i = sum_t m_it f(x_it, y_it, z_it) / sum_t m_it

``x`` (N, T) is the differentiated operand (the policy's per-token log-probs of PPO),
``y`` (N, T) and ``z`` ((N, T), or (N,) for one value per sequence) are constants (old
log-probs, advantages), ``m`` (N, T) is a {0, 1} mask (padding and prompt tokens are 0).
The pointwise template does not fit: the per-sequence denominator couples a row, and a
mask would have to be materialized as a weight; the aligned-rows template holds a whole
row in registers and reads one label per row, not a mask per token.

A plugin supplies one ``@jit`` function, computed in float32 (float64 for float64
inputs) with two scalar parameters:

    term(x, y, z, p0, p1) -> (loss, dloss_dx)

on ``[BLOCK_M, BLOCK_T]`` tiles (``z`` may be a ``[BLOCK_M, 1]`` column that broadcasts).

Each program takes ``BLOCK_M`` rows and walks along them in chunks of ``BLOCK_T`` tokens,
so sequences of any length work. It first counts each row's mask (a read of the mask
alone), then reads x, y, z and the mask once, accumulates the row loss and, for
``mean``/``sum``, writes the gradient already divided by the row's count (and by N for
``mean``): as in the other templates, the backward then only rescales it in place when
the incoming gradient is not 1. For ``none`` the forward writes one loss and one token
count per row, and the backward recomputes the gradient scaled by the incoming per-row
gradient over that count (no second count of the mask).

Masked-out tokens are never loaded (their x, y, z may be anything, even inf or NaN): they
contribute exactly 0 to the loss and get a gradient of exactly 0. A row with no token
gets 0/0 = NaN, as the formula does (the plugins reject such masks up front).
"""

from __future__ import annotations

from typing import Any

import torch

from . import HAVE_TRITON, TEMPLATE_INSTANCES, guarded, acc_dtype, tl_acc

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from .pointwise import _scale_unless_one

    @triton.jit
    def _row_counts(M, rows, row_ok, T, ACC: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_T: tl.constexpr):
        count = tl.zeros([BLOCK_M], dtype=ACC)
        for start in range(0, T, BLOCK_T):
            cols = start + tl.arange(0, BLOCK_T)
            valid = row_ok[:, None] & (cols < T)[None, :]
            m = tl.load(M + rows[:, None] * T + cols[None, :], mask=valid, other=0)
            count += tl.sum(tl.where(m != 0, 1.0, 0.0).to(ACC), axis=1)
        return count

    @triton.jit
    def _chunk_eval(X, Y, Z, M, rows, row_ok, start, T, z_row, p0, p1,
                    TERM: tl.constexpr, Z_PER_ROW: tl.constexpr, ACC: tl.constexpr,
                    BLOCK_T: tl.constexpr):
        """(loss, dx) of one chunk of tokens, both exactly 0 where the mask is 0."""
        cols = start + tl.arange(0, BLOCK_T)
        valid = row_ok[:, None] & (cols < T)[None, :]
        offs = rows[:, None] * T + cols[None, :]
        keep = tl.load(M + offs, mask=valid, other=0) != 0
        x = tl.load(X + offs, mask=keep, other=0).to(ACC)
        y = tl.load(Y + offs, mask=keep, other=0).to(ACC)
        if Z_PER_ROW:
            z = z_row[:, None]
        else:
            z = tl.load(Z + offs, mask=keep, other=0).to(ACC)
        loss, dx = TERM(x, y, z, p0, p1)
        return tl.where(keep, loss, 0.0), tl.where(keep, dx, 0.0), offs, valid

    @triton.jit(do_not_specialize=["T"])
    def _tokens_fwd(
        X, Y, Z, M, OUT, CNT, DX, N, T, denom, p0, p1,
        TERM: tl.constexpr, Z_PER_ROW: tl.constexpr, REDUCE: tl.constexpr,
        WRITE_DX: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_T: tl.constexpr,
    ):
        pid = tl.program_id(0)
        rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < N
        count = _row_counts(M, rows, row_ok, T, ACC, BLOCK_M, BLOCK_T)
        if Z_PER_ROW:
            z_row = tl.load(Z + rows, mask=row_ok, other=0).to(ACC)
        else:
            z_row = count  # unused
        # gradient scale of each row: 1 / (count * denom), denom = N for mean, 1 for sum
        inv = 1.0 / (count * denom)
        total = tl.zeros([BLOCK_M], dtype=ACC)
        for start in range(0, T, BLOCK_T):
            loss, dx, offs, valid = _chunk_eval(X, Y, Z, M, rows, row_ok, start, T, z_row,
                                                p0, p1, TERM, Z_PER_ROW, ACC, BLOCK_T)
            total += tl.sum(loss, axis=1)
            if WRITE_DX:
                tl.store(DX + offs, (dx * inv[:, None]).to(DX.dtype.element_ty), mask=valid)
        row_loss = total / count
        if REDUCE:
            tl.store(OUT + pid, tl.sum(tl.where(row_ok, row_loss, 0.0), axis=0))
        else:
            tl.store(OUT + rows, row_loss.to(OUT.dtype.element_ty), mask=row_ok)
            tl.store(CNT + rows, count, mask=row_ok)  # for the backward: no recount

    @triton.jit(do_not_specialize=["T"])
    def _tokens_bwd(
        X, Y, Z, M, CNT, G, DX, N, T, p0, p1,
        TERM: tl.constexpr, Z_PER_ROW: tl.constexpr, ACC: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr,
    ):
        pid = tl.program_id(0)
        rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < N
        if Z_PER_ROW:
            z_row = tl.load(Z + rows, mask=row_ok, other=0).to(ACC)
        else:
            z_row = tl.zeros([BLOCK_M], dtype=ACC)  # unused
        scale = (tl.load(G + rows, mask=row_ok, other=0).to(ACC)
                 / tl.load(CNT + rows, mask=row_ok, other=1))
        for start in range(0, T, BLOCK_T):
            _, dx, offs, valid = _chunk_eval(X, Y, Z, M, rows, row_ok, start, T, z_row,
                                             p0, p1, TERM, Z_PER_ROW, ACC, BLOCK_T)
            tl.store(DX + offs, (dx * scale[:, None]).to(DX.dtype.element_ty), mask=valid)

#: Tokens of one operand a program holds at a time; short rows share a program (a
#: [16, 64] tile for T <= 64). At 4 warps no variant spills; at 8, ptxas holds the
#: [16, 64] forward in 64 registers and spills on sm_80.
TILE = 1024
#: Longest chunk of a row a program loads at once; longer rows are walked in chunks.
MAX_BLOCK_T = 1024
NUM_WARPS = 4
REDUCTIONS = ("mean", "sum", "none")


def blocks(T: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_T) for sequences of T tokens."""
    block_t = min(max(triton.next_power_of_2(max(T, 1)), 16), MAX_BLOCK_T)
    return max(TILE // block_t, 1), block_t


def _mask_operand(mask: torch.Tensor) -> torch.Tensor:
    """A bool mask is read as bytes (a free view); other dtypes are read as they are."""
    mask = mask.contiguous()
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


class _TokensFunction(torch.autograd.Function):
    @staticmethod
    @guarded
    def forward(ctx, x, y, z, m, inst, reduction, p0, p1):
        x, y, z, m = x.contiguous(), y.contiguous(), z.contiguous(), _mask_operand(m)
        N, T = x.shape
        block_m, block_t = blocks(T)
        grid = (triton.cdiv(N, block_m),)
        flags = {"TERM": inst.term, "Z_PER_ROW": z.dim() == 1, "ACC": tl_acc(x.dtype),
                 "BLOCK_M": block_m, "BLOCK_T": block_t, "num_warps": NUM_WARPS}
        ctx.reduction, ctx.flags, ctx.p = reduction, flags, (p0, p1)
        acc_t = acc_dtype(x.dtype)
        if reduction == "none":
            out = torch.empty(N, dtype=x.dtype, device=x.device)
            count = torch.empty(N, dtype=acc_t, device=x.device)
            if N:
                _tokens_fwd[grid](x, y, z, m, out, count, x, N, T, 1, p0, p1, REDUCE=False,
                                  WRITE_DX=False, **flags)
            ctx.save_for_backward(x, y, z, m, count)
            return out
        need_dx = ctx.needs_input_grad[0]
        denom = N if (reduction == "mean" and N) else 1
        partial = torch.empty(max(grid[0], 1), dtype=acc_t, device=x.device)
        dx = torch.empty_like(x) if need_dx else None
        if N:
            _tokens_fwd[grid](x, y, z, m, partial, partial, x if dx is None else dx, N, T,
                              denom, p0, p1, REDUCE=True, WRITE_DX=need_dx, **flags)
            total = partial.sum() / denom
        else:  # torch semantics: the mean of nothing is nan, the sum is 0
            total = partial.new_full((), float("nan") if reduction == "mean" else 0.0)
        ctx.save_for_backward(dx)
        return total.to(x.dtype)

    @staticmethod
    @guarded
    def backward(ctx, grad_out):
        if ctx.reduction == "none":
            x, y, z, m, count = ctx.saved_tensors
            N, T = x.shape
            dx = torch.empty_like(x)
            if N:
                grid = (triton.cdiv(N, ctx.flags["BLOCK_M"]),)
                _tokens_bwd[grid](x, y, z, m, count, grad_out.contiguous(), dx, N, T, *ctx.p,
                                  **ctx.flags)
        else:
            (dx,) = ctx.saved_tensors
            # computed in the forward for an incoming gradient of 1: scaled in place
            # otherwise, on the device (no host sync)
            if dx is not None and dx.numel():
                flat = dx.view(-1)
                _scale_unless_one[(triton.cdiv(flat.numel(), TILE),)](
                    flat, grad_out.reshape(1).contiguous(), flat.numel(),
                    ACC=tl_acc(dx.dtype), BLOCK=TILE, num_warps=NUM_WARPS)
        return dx, None, None, None, None, None, None, None


class MaskedTokensLoss:
    """A masked per-token loss kernel built from a ``term`` function (module docstring)."""

    def __init__(self, term, name: str | None = None, *,
                 aot_lengths: tuple[int, ...] = (37, 1024)):
        self.term = term
        self.name = name or getattr(term, "__name__", "term")
        #: sequence lengths whose tile shapes the ahead-of-time compile covers
        self.aot_lengths = tuple(aot_lengths)
        TEMPLATE_INSTANCES.append(self)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, z: torch.Tensor, mask: torch.Tensor,
                 reduction: str = "mean", p0: float = 0.0, p1: float = 0.0) -> torch.Tensor:
        if not HAVE_TRITON:
            raise ImportError(f"{self.name}: triton is not installed")
        if reduction not in REDUCTIONS:
            raise ValueError(f"{self.name}: reduction must be one of {REDUCTIONS}, got "
                             f"{reduction!r}")
        if x.dim() != 2 or y.shape != x.shape or mask.shape != x.shape:
            raise ValueError(f"{self.name}: expected x, y and mask of one shape (N, T), got "
                             f"{tuple(x.shape)}, {tuple(y.shape)}, {tuple(mask.shape)}")
        if z.shape != x.shape and z.shape != x.shape[:1]:
            raise ValueError(f"{self.name}: z must have shape (N, T) or (N,), got "
                             f"{tuple(z.shape)} for x {tuple(x.shape)}")
        for what, t in (("y", y), ("z", z), ("mask", mask)):
            if t.requires_grad:
                raise ValueError(f"{self.name}: {what} is not differentiated by this kernel; "
                                 "pass it detached")
        return _TokensFunction.apply(x, y, z, mask, self, reduction, float(p0), float(p1))

    def aot_sources(self, dtype: str = "fp32") -> list[tuple[Any, dict, dict, dict]]:
        """(kernel, signature, constexprs, compile options) for each kernel it launches,
        for each length in ``aot_lengths`` (the tile shape depends on T); the mask as
        bytes (a bool mask's view)."""
        acc = "fp64" if dtype == "fp64" else "fp32"
        p = f"*{dtype}"
        acc_c = tl.float64 if dtype == "fp64" else tl.float32
        fwd_sig = {"X": p, "Y": p, "Z": p, "M": "*u8", "OUT": f"*{acc}", "CNT": f"*{acc}",
                   "DX": p, "N": "i64", "T": "i32", "denom": "i64", "p0": "fp32", "p1": "fp32"}
        bwd_sig = {"X": p, "Y": p, "Z": p, "M": "*u8", "CNT": f"*{acc}", "G": p, "DX": p,
                   "N": "i64", "T": "i32", "p0": "fp32", "p1": "fp32"}
        opts = {"num_warps": NUM_WARPS}
        sources = []
        for length in self.aot_lengths:
            block_m, block_t = blocks(length)
            for per_row in (False, True):
                common = {"TERM": self.term, "Z_PER_ROW": per_row, "ACC": acc_c,
                          "BLOCK_M": block_m, "BLOCK_T": block_t}
                sources += [
                    (_tokens_fwd, fwd_sig, {**common, "REDUCE": True, "WRITE_DX": True}, opts),
                    (_tokens_fwd, fwd_sig, {**common, "REDUCE": False, "WRITE_DX": False},
                     opts),
                    (_tokens_bwd, bwd_sig, common, opts),
                ]
        return sources


def masked_tokens_loss(term, name: str | None = None, *,
                       aot_lengths: tuple[int, ...] = (37, 1024)) -> MaskedTokensLoss:
    """Build a fused masked per-token loss from ``term`` (see the module docstring)."""
    return MaskedTokensLoss(term, name, aot_lengths=aot_lengths)
