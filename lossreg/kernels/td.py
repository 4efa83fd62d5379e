"""Template for temporal-difference losses on Q-values:

    delta_i = Q[i, a_i] - (r_i + gamma (1 - d_i) max_j Q'[i, j]),    loss_i = f(delta_i)

``Q`` (N, A) are the online network's Q-values (differentiated), ``a`` the actions taken,
``r`` the rewards, ``d`` the done flags and ``Q'`` (N, A) the target network's Q-values at
the next states. The target is a constant: no gradient ever reaches ``Q'``, ``r`` or ``d``.

A plugin supplies one ``@jit`` function of the TD error, in float32 (float64 for float64
inputs), with two scalar parameters (Huber's delta, ...):

    term(delta, p0, p1) -> (loss, dloss_ddelta)

Neither existing template fits: the row-wise one reads one matrix and no per-row floats,
and only one entry of each row of ``Q`` is needed. Each program takes ``BLOCK_M`` rows,
reads ``Q'`` once (the row max, in chunks of ``BLOCK_A`` actions, so any number of actions
works), gathers the single ``Q[i, a_i]`` of each row, and writes the gradient of ``Q``
once: ``f'(delta_i)`` at the action, exact zeros elsewhere. For ``mean``/``sum`` the
gradient is written in the forward (the backward only rescales it in place when the
incoming gradient is not 1); for ``none`` the forward keeps ``f'(delta_i)`` (N floats) so
that the backward writes the gradient without reading ``Q`` or ``Q'`` again.

An action outside [0, A) gives that row a NaN loss instead of an out-of-bounds read (the
plugins reject such actions before launching).
"""

from __future__ import annotations

from typing import Any

import torch

from . import HAVE_TRITON, TEMPLATE_INSTANCES, guarded, acc_dtype, tl_acc
from .pointwise import split_param

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from . import nanops
    from .pointwise import _scale_unless_one, widen

    @triton.jit
    def _td_error(Q, ACT, R, D, QT, pid, N, n_act, gamma, gamma_lo, p0, p0_lo, p1, p1_lo,
                  TERM: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_A: tl.constexpr):
        """(loss, dloss/ddelta, rows, row_ok, actions) of BLOCK_M rows; each scalar
        parameter arrives as float32 halves (``pointwise.split_param``)."""
        gamma = widen(gamma, gamma_lo, ACC)
        p0 = widen(p0, p0_lo, ACC)
        p1 = widen(p1, p1_lo, ACC)
        rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < N
        act = tl.load(ACT + rows, mask=row_ok, other=0).to(tl.int64)
        act_ok = (act >= 0) & (act < n_act)
        q_sa = tl.load(Q + rows * n_act + act, mask=row_ok & act_ok, other=0).to(ACC)
        r = tl.load(R + rows, mask=row_ok, other=0).to(ACC)
        d = tl.load(D + rows, mask=row_ok, other=0).to(ACC)
        best = tl.full([BLOCK_M], float("-inf"), dtype=ACC)
        for start in range(0, n_act, BLOCK_A):
            cols = start + tl.arange(0, BLOCK_A)
            valid = row_ok[:, None] & (cols < n_act)[None, :]
            qt = tl.load(QT + rows[:, None] * n_act + cols[None, :], mask=valid,
                         other=float("-inf")).to(ACC)
            # torch's max over actions is NaN when one Q' is: so is this one
            best = nanops.maximum(best, nanops.amax(qt, axis=1))
        delta = q_sa - (r + gamma * (1.0 - d) * best)
        loss, dl = TERM(delta, p0, p1)
        loss, dl = loss.to(ACC), dl.to(ACC)
        loss = tl.where(act_ok, loss, float("nan"))
        return tl.where(row_ok, loss, 0.0), tl.where(row_ok, dl, 0.0), rows, row_ok, act

    @triton.jit
    def _write_grad(DQ, rows, row_ok, act, g, n_act, BLOCK_A: tl.constexpr):
        """DQ[i, :] = g_i at the action a_i, 0 elsewhere."""
        for start in range(0, n_act, BLOCK_A):
            cols = start + tl.arange(0, BLOCK_A)
            valid = row_ok[:, None] & (cols < n_act)[None, :]
            val = tl.where(cols[None, :] == act[:, None], g[:, None], 0.0)
            tl.store(DQ + rows[:, None] * n_act + cols[None, :],
                     val.to(DQ.dtype.element_ty), mask=valid)

    @triton.jit(do_not_specialize=["n_act"])
    def _td_fwd(
        Q, ACT, R, D, QT, OUT, DQ, DL, N, n_act, denom, gamma, gamma_lo, p0, p0_lo, p1,
        p1_lo, TERM: tl.constexpr, REDUCE: tl.constexpr, WRITE_DQ: tl.constexpr,
        ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_A: tl.constexpr,
    ):
        pid = tl.program_id(0)
        loss, dl, rows, row_ok, act = _td_error(
            Q, ACT, R, D, QT, pid, N, n_act, gamma, gamma_lo, p0, p0_lo, p1, p1_lo, TERM, ACC,
            BLOCK_M, BLOCK_A)
        if REDUCE:
            tl.store(OUT + pid, tl.sum(loss, axis=0))
            if WRITE_DQ:
                _write_grad(DQ, rows, row_ok, act, dl / denom, n_act, BLOCK_A)
        else:
            tl.store(OUT + rows, loss.to(OUT.dtype.element_ty), mask=row_ok)
            tl.store(DL + rows, dl, mask=row_ok)

    @triton.jit(do_not_specialize=["n_act"])
    def _td_bwd(ACT, DL, G, DQ, N, n_act, ACC: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_A: tl.constexpr):
        pid = tl.program_id(0)
        rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < N
        act = tl.load(ACT + rows, mask=row_ok, other=0).to(tl.int64)
        dl = tl.load(DL + rows, mask=row_ok, other=0).to(ACC)
        g = tl.load(G + rows, mask=row_ok, other=0).to(ACC)
        _write_grad(DQ, rows, row_ok, act, dl * g, n_act, BLOCK_A)

#: Entries of a Q-value matrix a program holds at a time (8 per thread).
TILE = 2048
#: Widest chunk of a row loaded at once; more actions are walked in chunks.
MAX_BLOCK_A = 1024
NUM_WARPS = 8
REDUCTIONS = ("mean", "sum", "none")


def blocks(n_act: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_A) for rows of n_act actions."""
    block_a = min(max(triton.next_power_of_2(max(n_act, 1)), 2), MAX_BLOCK_A)
    return max(TILE // block_a, 1), block_a


class _TDFunction(torch.autograd.Function):
    @staticmethod
    @guarded
    def forward(ctx, q, actions, rewards, dones, target_q, inst, reduction, gamma, p0, p1):
        q, actions = q.contiguous(), actions.contiguous()
        rewards, dones, target_q = rewards.contiguous(), dones.contiguous(), target_q.contiguous()
        N, n_act = q.shape
        block_m, block_a = blocks(n_act)
        grid = (triton.cdiv(N, block_m),)
        acc_t = acc_dtype(q.dtype)
        flags = {"TERM": inst.term, "ACC": tl_acc(q.dtype), "BLOCK_M": block_m,
                 "BLOCK_A": block_a, "num_warps": NUM_WARPS}
        ctx.reduction, ctx.flags, ctx.shape = reduction, flags, (N, n_act)
        params = (*split_param(gamma), *split_param(p0), *split_param(p1))
        if reduction == "none":
            out = torch.empty(N, dtype=q.dtype, device=q.device)
            dl = torch.empty(N, dtype=acc_t, device=q.device)
            if N:
                _td_fwd[grid](q, actions, rewards, dones, target_q, out, q, dl, N, n_act, 1,
                              *params, REDUCE=False, WRITE_DQ=False, **flags)
            ctx.save_for_backward(actions, dl)
            ctx.q_dtype = q.dtype
            return out
        need_dq = ctx.needs_input_grad[0]
        denom = N if (reduction == "mean" and N) else 1
        partial = torch.empty(max(grid[0], 1), dtype=acc_t, device=q.device)
        dq = torch.empty_like(q) if need_dq else None
        if N:
            _td_fwd[grid](q, actions, rewards, dones, target_q, partial,
                          q if dq is None else dq, partial, N, n_act, denom, *params,
                          REDUCE=True, WRITE_DQ=need_dq, **flags)
            total = partial.sum() / denom
        else:  # torch semantics: the mean of nothing is nan, the sum is 0
            total = partial.new_full((), float("nan") if reduction == "mean" else 0.0)
        ctx.save_for_backward(dq)
        return total.to(q.dtype)

    @staticmethod
    @guarded
    def backward(ctx, grad_out):
        if ctx.reduction == "none":
            actions, dl = ctx.saved_tensors
            N, n_act = ctx.shape
            dq = torch.empty(N, n_act, dtype=ctx.q_dtype, device=dl.device)
            if N:
                f = ctx.flags
                _td_bwd[(triton.cdiv(N, f["BLOCK_M"]),)](
                    actions, dl, grad_out.contiguous(), dq, N, n_act, ACC=f["ACC"],
                    BLOCK_M=f["BLOCK_M"], BLOCK_A=f["BLOCK_A"], num_warps=NUM_WARPS)
        else:
            (dq,) = ctx.saved_tensors
            if dq is not None and dq.numel():
                flat = dq.view(-1)
                _scale_unless_one[(triton.cdiv(flat.numel(), TILE),)](
                    flat, grad_out.reshape(1).contiguous(), flat.numel(),
                    ACC=tl_acc(dq.dtype), BLOCK=TILE, num_warps=NUM_WARPS)
        return dq, None, None, None, None, None, None, None, None, None


class TDLoss:
    """A temporal-difference loss kernel built from a ``term`` (see the module docstring)."""

    def __init__(self, term, name: str | None = None, *,
                 aot_actions: tuple[int, ...] = (6, 18, 4096)):
        self.term = term
        self.name = name or getattr(term, "__name__", "term")
        #: action counts whose tile shapes the ahead-of-time compile covers
        self.aot_actions = tuple(aot_actions)
        TEMPLATE_INSTANCES.append(self)

    def __call__(self, q: torch.Tensor, actions: torch.Tensor, rewards: torch.Tensor,
                 dones: torch.Tensor, target_q: torch.Tensor, reduction: str = "mean",
                 gamma: float = 0.99, p0: float = 0.0, p1: float = 0.0) -> torch.Tensor:
        """``rewards`` and ``dones`` are read as they are (cast them to q's dtype for the
        kernels compiled ahead of time); ``actions`` int64 or int32."""
        if not HAVE_TRITON:
            raise ImportError(f"{self.name}: triton is not installed")
        if reduction not in REDUCTIONS:
            raise ValueError(f"{self.name}: reduction must be one of {REDUCTIONS}, got "
                             f"{reduction!r}")
        if q.dim() != 2 or target_q.shape != q.shape:
            raise ValueError(f"{self.name}: expected q and target_q of one shape (N, A), got "
                             f"{tuple(q.shape)} and {tuple(target_q.shape)}")
        for what, t in (("actions", actions), ("rewards", rewards), ("dones", dones)):
            if t.shape != q.shape[:1]:
                raise ValueError(f"{self.name}: {what} must have shape ({q.shape[0]},), got "
                                 f"{tuple(t.shape)}")
        # the target is a constant: whatever requires grad there gets none
        return _TDFunction.apply(q, actions, rewards.detach(), dones.detach(),
                                 target_q.detach(), self, reduction, float(gamma), float(p0),
                                 float(p1))

    def aot_sources(self, dtype: str = "fp32") -> list[tuple[Any, dict, dict, dict]]:
        """(kernel, signature, constexprs, compile options) for each kernel it launches,
        for each action count in ``aot_actions`` (the tile shape depends on A)."""
        acc = "fp64" if dtype == "fp64" else "fp32"
        p = f"*{dtype}"
        acc_c = tl.float64 if dtype == "fp64" else tl.float32
        fwd_sig = {"Q": p, "ACT": "*i64", "R": p, "D": p, "QT": p, "OUT": f"*{acc}", "DQ": p,
                   "DL": f"*{acc}", "N": "i64", "n_act": "i32", "denom": "i64",
                   "gamma": "fp32", "gamma_lo": "fp32", "p0": "fp32", "p0_lo": "fp32",
                   "p1": "fp32", "p1_lo": "fp32"}
        bwd_sig = {"ACT": "*i64", "DL": f"*{acc}", "G": p, "DQ": p, "N": "i64", "n_act": "i32"}
        opts = {"num_warps": NUM_WARPS}
        sources = []
        for n_act in self.aot_actions:
            block_m, block_a = blocks(n_act)
            shape = {"ACC": acc_c, "BLOCK_M": block_m, "BLOCK_A": block_a}
            common = {"TERM": self.term, **shape}
            sources += [
                (_td_fwd, fwd_sig, {**common, "REDUCE": True, "WRITE_DQ": True}, opts),
                (_td_fwd, fwd_sig, {**common, "REDUCE": False, "WRITE_DQ": False}, opts),
                (_td_bwd, bwd_sig, shape, opts),
            ]
        return sources


def td_loss(term, name: str | None = None, *,
            aot_actions: tuple[int, ...] = (6, 18, 4096)) -> TDLoss:
    """Build a fused TD loss on Q-values from ``term`` (see the module docstring)."""
    return TDLoss(term, name, aot_actions=aot_actions)
