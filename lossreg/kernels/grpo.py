"""GRPO's per-token clipped policy-gradient loss with a k3 KL penalty, fused: one pass
over the tokens reads the policy, rollout (old) and reference log-probs and the mask
once, sums each sequence's loss and, for ``mean``/``sum``, writes the gradient in the
forward (the backward then only rescales it when the incoming gradient is not 1).

Per token, with rho = exp(lp - old), A the sequence's advantage (N,), and
delta = ref - lp:

    l = -min(rho A, clip(rho, lo, hi) A) + beta (expm1(delta) - delta)
    dl/dlp = -rho A where the unclipped term is the minimum (else 0) + beta (1 - e^delta)

Each sequence's share is its masked sum, divided by its token count when
``PER_SEQ_MEAN`` (loss type ``grpo``); ``mean`` divides the total by ``div`` (a
one-element tensor on the device: the number of sequences, a token count or a constant,
so that no host sync is needed). Everything is computed in the accumulation dtype,
float32 (float64 for float64 inputs); the scalar parameters (beta, the clip bounds) come
in a small tensor of that dtype, never rounded to float32 on the way. Masked-out tokens
are never loaded and get a gradient of exactly 0.

Modes (``MODE``): 0 reduce (partial sum per program, gradient / div written), 1 the
per-sequence losses (``none``, no gradient), 2 the ``none`` backward (gradient times the
incoming per-sequence gradient, recomputed).
"""

from __future__ import annotations

from typing import Any

import torch

from . import HAVE_TRITON, TEMPLATE_INSTANCES, guarded, acc_dtype, tl_acc

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from .masked_tokens import _row_counts
    from .pointwise import _scale_unless_one, scale_grid
    from .preference import expm1

    @triton.jit(do_not_specialize=["T"])
    def _grpo_kernel(
        LP, OLD, REF, ADV, M, G, PAR, DIV, OUT, DX, N, T,
        HAS_REF: tl.constexpr, PER_SEQ_MEAN: tl.constexpr, MODE: tl.constexpr,
        ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr,
    ):
        pid = tl.program_id(0)
        rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < N
        beta = tl.load(PAR).to(ACC)
        lo = tl.load(PAR + 1).to(ACC)
        hi = tl.load(PAR + 2).to(ACC)
        adv = tl.load(ADV + rows, mask=row_ok, other=0).to(ACC)
        if PER_SEQ_MEAN:
            count = tl.maximum(_row_counts(M, rows, row_ok, T, ACC, BLOCK_M, BLOCK_T), 1.0)
            scale = 1.0 / count
        else:
            count = tl.full([BLOCK_M], 1.0, ACC)
            scale = count
        if MODE == 0:
            scale = scale / tl.load(DIV).to(ACC)
        if MODE == 2:
            scale = scale * tl.load(G + rows, mask=row_ok, other=0).to(ACC)
        total = tl.zeros([BLOCK_M], dtype=ACC)
        for start in range(0, T, BLOCK_T):
            cols = start + tl.arange(0, BLOCK_T)
            valid = row_ok[:, None] & (cols < T)[None, :]
            offs = rows[:, None] * T + cols[None, :]
            keep = tl.load(M + offs, mask=valid, other=0) != 0
            lp = tl.load(LP + offs, mask=keep, other=0).to(ACC)
            old = tl.load(OLD + offs, mask=keep, other=0).to(ACC)
            rho = tl.exp(lp - old)
            clipped = tl.minimum(tl.maximum(rho, lo), hi)
            a = adv[:, None]
            un, cl = rho * a, clipped * a
            loss = -tl.minimum(un, cl)
            d = tl.where(un <= cl, -un, 0.0)
            if HAS_REF:
                ref = tl.load(REF + offs, mask=keep, other=0).to(ACC)
                delta = ref - lp
                em1 = expm1(delta)
                loss += beta * (em1 - delta)
                d += -beta * em1
            total += tl.sum(tl.where(keep, loss, 0.0), axis=1)
            if MODE != 1:
                tl.store(DX + offs, tl.where(keep, d * scale[:, None], 0.0)
                         .to(DX.dtype.element_ty), mask=valid)
        if PER_SEQ_MEAN:
            total = total / count
        if MODE == 0:
            tl.store(OUT + pid, tl.sum(tl.where(row_ok, total, 0.0), axis=0))
        if MODE == 1:
            tl.store(OUT + rows, total.to(OUT.dtype.element_ty), mask=row_ok)

TILE = 1024
MAX_BLOCK_T = 1024
NUM_WARPS = 4


def blocks(T: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_T) for sequences of T tokens."""
    block_t = min(max(triton.next_power_of_2(max(T, 1)), 16), MAX_BLOCK_T)
    return max(TILE // block_t, 1), block_t


def _flags(x, has_ref, per_seq_mean):
    block_m, block_t = blocks(x.shape[1])
    acc = tl_acc(x.dtype)
    return {"HAS_REF": has_ref, "PER_SEQ_MEAN": per_seq_mean, "ACC": acc,
            "BLOCK_M": block_m, "BLOCK_T": block_t, "num_warps": NUM_WARPS}


class _GRPOFunction(torch.autograd.Function):
    @staticmethod
    @guarded
    def forward(ctx, lp, old, ref, adv, mask, par, div, per_seq_mean, reduction):
        N, T = lp.shape
        has_ref = ref is not None
        refp = ref if has_ref else lp
        flags = _flags(lp, has_ref, per_seq_mean)
        grid = (triton.cdiv(N, flags["BLOCK_M"]),)
        ctx.reduction, ctx.flags = reduction, flags
        if reduction == "none":
            out = torch.empty(N, dtype=lp.dtype, device=lp.device)
            if N:
                _grpo_kernel[grid](lp, old, refp, adv, mask, adv, par, div, out, lp, N, T,
                                   MODE=1, **flags)
            ctx.save_for_backward(lp, old, refp, adv, mask, par, div)
            return out
        need_dx = ctx.needs_input_grad[0]
        partial = torch.empty(max(grid[0], 1), dtype=acc_dtype(lp.dtype), device=lp.device)
        dx = torch.empty_like(lp)
        if N:
            _grpo_kernel[grid](lp, old, refp, adv, mask, adv, par, div, partial, dx, N, T,
                               MODE=0, **flags)
        total = partial[:grid[0]].sum() / div[0]
        ctx.save_for_backward(dx if need_dx else None)
        return total.to(lp.dtype)

    @staticmethod
    @guarded
    def backward(ctx, grad_out):
        if ctx.reduction == "none":
            lp, old, refp, adv, mask, par, div = ctx.saved_tensors
            N, T = lp.shape
            dx = torch.empty_like(lp)
            if N:
                grid = (triton.cdiv(N, ctx.flags["BLOCK_M"]),)
                _grpo_kernel[grid](lp, old, refp, adv, mask, grad_out.contiguous(), par, div,
                                   dx, dx, N, T, MODE=2, **ctx.flags)
        else:
            (dx,) = ctx.saved_tensors
            if dx is not None and dx.numel():
                flat = dx.view(-1)
                acc = tl_acc(dx.dtype)
                _scale_unless_one[(scale_grid(dx.device, triton.cdiv(flat.numel(), TILE)),)](
                    flat, grad_out.reshape(1).contiguous(), flat.numel(), ACC=acc,
                    BLOCK=TILE, num_warps=NUM_WARPS)
        return dx, None, None, None, None, None, None, None, None


class GRPOKernel:
    """The kernel's entry point (module docstring) and its ahead-of-time signatures."""

    name = "grpo"

    def __init__(self, aot_lengths: tuple[int, ...] = (37, 1024)):
        self.aot_lengths = aot_lengths
        TEMPLATE_INSTANCES.append(self)

    def __call__(self, log_probs, old_log_probs, ref_log_probs, advantages, mask, *, beta,
                 low, high, div, per_seq_mean, reduction):
        """``advantages`` (N,) detached; ``div`` what ``mean`` divides by (a number or a
        one-element tensor); ``low``/``high`` the clip bounds of the ratio."""
        if not HAVE_TRITON:
            raise ImportError("grpo: triton is not installed")
        acc = acc_dtype(log_probs.dtype)
        dev = log_probs.device
        par = torch.tensor([beta, low, high], dtype=acc, device=dev)
        div = (div.reshape(1).to(acc) if torch.is_tensor(div)
               else torch.tensor([div], dtype=acc, device=dev))
        m = mask.contiguous()
        m = m.view(torch.uint8) if m.dtype == torch.bool else m
        ref = None if ref_log_probs is None else ref_log_probs.detach().contiguous()
        return _GRPOFunction.apply(log_probs.contiguous(), old_log_probs.detach().contiguous(),
                                   ref, advantages.detach().to(acc).contiguous(), m, par, div,
                                   bool(per_seq_mean), reduction)

    def aot_sources(self, dtype: str = "fp32") -> list[tuple[Any, dict, dict, dict]]:
        acc = "fp64" if dtype == "fp64" else "fp32"
        p = f"*{dtype}"
        acc_c = tl.float64 if dtype == "fp64" else tl.float32
        sig = {"LP": p, "OLD": p, "REF": p, "ADV": f"*{acc}", "M": "*u8", "G": p,
               "PAR": f"*{acc}", "DIV": f"*{acc}", "OUT": f"*{acc}", "DX": p, "N": "i64",
               "T": "i32"}
        sources = []
        for length in self.aot_lengths:
            block_m, block_t = blocks(length)
            for mode in (0, 1, 2):
                for per_seq in (True, False):
                    const = {"HAS_REF": True, "PER_SEQ_MEAN": per_seq, "MODE": mode,
                             "ACC": acc_c, "BLOCK_M": block_m, "BLOCK_T": block_t}
                    s = dict(sig, G=f"*{acc}") if mode != 2 else sig
                    s = dict(s, OUT=p) if mode == 1 else s
                    s = dict(s, OUT=p) if mode == 2 else s
                    sources.append((_grpo_kernel, s, const, {"num_warps": NUM_WARPS}))
            # beta = 0 (DAPO drops the KL term): no reference read, the mean's variant
            sources.append((_grpo_kernel, dict(sig, G=f"*{acc}"),
                            {**const, "HAS_REF": False, "MODE": 0},
                            {"num_warps": NUM_WARPS}))
        return sources


GRPO = GRPOKernel()
