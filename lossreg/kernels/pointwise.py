"""Template for pointwise losses: ``loss = reduce_i w_i f(x_i, y_i[, z_i])``.

A plugin supplies one ``@jit`` function computed in float32 (float64 for float64
inputs) with up to two scalar parameters (margin, delta, tau, ...), which reach it in
that dtype too (``split_param``: Triton passes Python floats as float32):

* ``term(x, y, p0, p1) -> (loss, dloss_dx, dloss_dy)``, or, with ``operands=3``,
* ``term(x, y, z, p0, p1) -> (loss, dloss_dx, dloss_dy)`` where ``z`` is a third,
  non-differentiable operand: labels (margin ranking's ``y``) or a per-element
  parameter (``pos_weight``).

``pointwise_loss(term, ...)`` returns a callable
``(input, target, reduction="mean", p0=0.0, p1=0.0, z=None, weight=None)`` backed by
two kernels:

* ``mean``/``sum``: one launch reads x and y once, writes the gradients of the inputs
  that require them (already divided by n for ``mean``) and a partial sum per
  program; the last program to finish adds the partials in program order and writes
  the loss in the input dtype (``_finish_sum``), so the loss is final when the kernel
  ends: no second launch, no host sync. The backward is free when the incoming
  gradient is 1 (the usual case: the loss is the last node): one launch of a few
  programs per SM reads that gradient on the device and exits at once; otherwise
  they scale the saved gradient in place.
* ``none``: the forward writes the per-element loss; the backward reads x, y and the
  incoming gradient once and writes each needed gradient once.

Options of an instance:

* ``weighted=True``: an optional ``weight`` tensor multiplies each term (torch's
  ``weight`` of ``binary_cross_entropy``); never differentiated.
* ``num_warps``: 8 gives each thread 16 elements of a block; a term heavy in
  transcendentals (libdevice calls) may need 16 warps to stay within registers.
* ``exp_form=True``: for losses ``e^{g(x, y)}`` (the exponential family) the term returns
  ``(g, dg/dx, dg/dy)``; the template forms ``e^g`` with an accurate exp, rounds it to the
  input dtype, and the gradients as ``e^g * dg``. An eager computation in float16
  overflows to inf at the exp; rounding the same value here makes the kernel overflow
  (loss and gradient) exactly where the eager reference does, in every dtype.

``z`` and ``weight`` broadcast to the input's shape. When their shape (leading 1s
dropped) is a suffix of the input's, as for a per-class vector over ``(N, C)``, the
kernel indexes them modulo their length and nothing is materialized; otherwise they
are expanded to the full shape first.

Inputs of any length (masked tail), float32/bfloat16/float16 (float32 accumulation)
and float64 (float64 accumulation). Gradients are written only for inputs that
require them (compile-time flags, so the unused stores vanish).
"""

from __future__ import annotations

from typing import Any

import torch

from . import HAVE_TRITON, TEMPLATE_INSTANCES, guarded, acc_dtype, tl_acc
from .libm import exp as _accurate_exp
from .tuning import launch_options

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def widen(hi, lo, ACC: tl.constexpr):
        """A scalar parameter from its float32 halves (``split_param``), in ACC. Under
        the interpreter the halves arrive as Python floats, hence the tensor sum."""
        zero = tl.zeros((1,), dtype=ACC)
        return tl.sum((zero + hi) + lo, axis=0)

    @triton.jit
    def _pointwise_eval(
        X, Y, Z, W, offs, mask, z_period, w_period, p0, p0_lo, p1, p1_lo,
        TERM: tl.constexpr, HAS_Z: tl.constexpr, Z_BCAST: tl.constexpr,
        HAS_W: tl.constexpr, W_BCAST: tl.constexpr, EXP_FORM: tl.constexpr,
        ACC: tl.constexpr,
    ):
        """Load one block of operands and evaluate the term: (loss, dx, dy) in ACC.
        A scalar parameter arrives as two float32 halves (see ``split_param``)."""
        p0 = widen(p0, p0_lo, ACC)
        p1 = widen(p1, p1_lo, ACC)
        x = tl.load(X + offs, mask=mask, other=0).to(ACC)
        y = tl.load(Y + offs, mask=mask, other=0).to(ACC)
        if HAS_Z:
            if Z_BCAST:
                z = tl.load(Z + offs % z_period, mask=mask, other=0).to(ACC)
            else:
                z = tl.load(Z + offs, mask=mask, other=0).to(ACC)
            loss, dx, dy = TERM(x, y, z, p0, p1)
        else:
            loss, dx, dy = TERM(x, y, p0, p1)
        # a term's literal (a sign, 0.5) is float32: the gradient is formed in ACC
        loss, dx, dy = loss.to(ACC), dx.to(ACC), dy.to(ACC)
        if EXP_FORM:
            # round e^g like an eager op in the input dtype would (inf where it overflows)
            loss = _accurate_exp(loss).to(X.dtype.element_ty).to(ACC)
            dx = tl.where(dx == 0, 0.0, loss * dx)
            dy = tl.where(dy == 0, 0.0, loss * dy)
        if HAS_W:
            if W_BCAST:
                w = tl.load(W + offs % w_period, mask=mask, other=0).to(ACC)
            else:
                w = tl.load(W + offs, mask=mask, other=0).to(ACC)
            loss = loss * w
            dx = dx * w
            dy = dy * w
        return loss, dx, dy

    @triton.jit
    def _finish_sum(PART, COUNT, OUT, denom, ACC: tl.constexpr, RBLOCK: tl.constexpr):
        """Last-program reduction: each program has stored its partial sum; the one
        that counts last sums them all in program order (deterministic), writes
        sum / denom in OUT's dtype and resets the counter for the next launch. The
        loss is final when the kernel ends: no second launch, no host sync."""
        npid = tl.num_programs(0)
        done = tl.atomic_add(COUNT, 1, sem="acq_rel")
        if done == npid - 1:
            acc = tl.zeros([RBLOCK], dtype=ACC)
            for start in range(0, npid, RBLOCK):
                idx = start + tl.arange(0, RBLOCK)
                acc += tl.load(PART + idx, mask=idx < npid, other=0.0, cache_modifier=".cg")
            tl.store(OUT, (tl.sum(acc, axis=0) / denom).to(OUT.dtype.element_ty))
            tl.atomic_xchg(COUNT, 0)

    @triton.jit
    def _pointwise_fwd(
        X, Y, Z, W, OUT, PART, COUNT, DX, DY, n, z_period, w_period, denom,
        p0, p0_lo, p1, p1_lo, TERM: tl.constexpr, HAS_Z: tl.constexpr, Z_BCAST: tl.constexpr,
        HAS_W: tl.constexpr, W_BCAST: tl.constexpr, EXP_FORM: tl.constexpr,
        REDUCE: tl.constexpr, WRITE_DX: tl.constexpr, WRITE_DY: tl.constexpr,
        ACC: tl.constexpr, BLOCK: tl.constexpr, RBLOCK: tl.constexpr,
    ):
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        loss, dx, dy = _pointwise_eval(
            X, Y, Z, W, offs, mask, z_period, w_period, p0, p0_lo, p1, p1_lo, TERM, HAS_Z,
            Z_BCAST, HAS_W, W_BCAST, EXP_FORM, ACC,
        )
        if REDUCE:
            if WRITE_DX:
                tl.store(DX + offs, (dx / denom).to(DX.dtype.element_ty), mask=mask)
            if WRITE_DY:
                tl.store(DY + offs, (dy / denom).to(DY.dtype.element_ty), mask=mask)
            tl.store(PART + pid, tl.sum(tl.where(mask, loss, 0.0), axis=0))
            _finish_sum(PART, COUNT, OUT, denom, ACC, RBLOCK)
        else:
            tl.store(OUT + offs, loss.to(OUT.dtype.element_ty), mask=mask)

    @triton.jit
    def _pointwise_bwd(
        X, Y, Z, W, G, DX, DY, n, z_period, w_period, p0, p0_lo, p1, p1_lo,
        TERM: tl.constexpr, HAS_Z: tl.constexpr, Z_BCAST: tl.constexpr,
        HAS_W: tl.constexpr, W_BCAST: tl.constexpr, EXP_FORM: tl.constexpr,
        WRITE_DX: tl.constexpr, WRITE_DY: tl.constexpr, ACC: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        g = tl.load(G + offs, mask=mask, other=0).to(ACC)
        _, dx, dy = _pointwise_eval(
            X, Y, Z, W, offs, mask, z_period, w_period, p0, p0_lo, p1, p1_lo, TERM, HAS_Z,
            Z_BCAST, HAS_W, W_BCAST, EXP_FORM, ACC,
        )
        if WRITE_DX:
            tl.store(DX + offs, (dx * g).to(DX.dtype.element_ty), mask=mask)
        if WRITE_DY:
            tl.store(DY + offs, (dy * g).to(DY.dtype.element_ty), mask=mask)

    @triton.jit
    def _scale_unless_one(X, G, n, ACC: tl.constexpr, BLOCK: tl.constexpr):
        """X *= G[0] in place over a small fixed grid (each program strides over the
        blocks), where every program returns at once when G[0] == 1: the usual case
        costs one launch of a few hundred programs, no host sync and no pass over X."""
        g = tl.load(G).to(ACC)
        if g != 1.0:
            step = tl.num_programs(0).to(tl.int64) * BLOCK
            for start in range(tl.program_id(0).to(tl.int64) * BLOCK, n, step):
                offs = start + tl.arange(0, BLOCK)
                mask = offs < n
                x = tl.load(X + offs, mask=mask).to(ACC)
                tl.store(X + offs, (x * g).to(X.dtype.element_ty), mask=mask)

BLOCK = 4096
NUM_WARPS = 8
RBLOCK = 1024  # partial sums the last program adds per step
REDUCTIONS = ("mean", "sum", "none")
_COUNTERS: dict = {}
_SCALE_GRID: dict = {}


def split_param(p: float) -> tuple[float, float]:
    """``p`` as float32 ``hi`` + ``lo`` halves: Triton passes a Python float as float32,
    and a float64 kernel adds the halves back (48 bits, ~4e-15 relative); a float32
    kernel gets ``hi``, ``p`` rounded once."""
    hi = float(torch.tensor(p, dtype=torch.float32))
    return hi, float(p - hi)


def launch_counter(device: torch.device) -> torch.Tensor:
    """A zeroed int32 counter per device for :func:`_finish_sum` (the last program
    resets it, so it is zero again when the kernel ends; launches on one stream)."""
    key = str(device)
    if key not in _COUNTERS:
        _COUNTERS[key] = torch.zeros(1, dtype=torch.int32, device=device)
    return _COUNTERS[key]


def scale_grid(device: torch.device, blocks: int) -> int:
    """Programs of :func:`_scale_unless_one`: four per SM at most."""
    key = str(device)
    if key not in _SCALE_GRID:
        _SCALE_GRID[key] = (4 * torch.cuda.get_device_properties(device).multi_processor_count
                            if device.type == "cuda" else 4)
    return max(1, min(blocks, _SCALE_GRID[key]))


def periodic_operand(t: torch.Tensor | None, shape: torch.Size, n: int):
    """A flat tensor for an operand broadcast to ``shape`` and its period: element ``i``
    of the full tensor is ``flat[i % period]``. Returns (None, 1) for no operand."""
    if t is None:
        return None, 1
    dims = list(t.shape)
    while dims and dims[0] == 1:
        dims.pop(0)
    if len(dims) <= len(shape) and tuple(dims) == tuple(shape)[len(shape) - len(dims):]:
        flat = t.contiguous().view(-1)
        return flat, max(flat.numel(), 1)
    return t.expand(shape).contiguous().view(-1), max(n, 1)


def _launch_flags(inst: "PointwiseLoss", z, z_period, w, w_period, n) -> dict:
    return dict(
        TERM=inst.term, HAS_Z=z is not None, Z_BCAST=z is not None and z_period != n,
        HAS_W=w is not None, W_BCAST=w is not None and w_period != n,
        EXP_FORM=inst.exp_form,
    )


class _PointwiseFunction(torch.autograd.Function):
    @staticmethod
    @guarded
    def forward(ctx, x, y, z, w, inst, reduction, p0, p1):
        shape = x.shape
        xf, yf = x.contiguous().view(-1), y.contiguous().view(-1)
        n = xf.numel()
        zf, z_period = periodic_operand(z, shape, n)
        wf, w_period = periodic_operand(w, shape, n)
        need_dx, need_dy = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grid = (triton.cdiv(n, BLOCK),)
        acc = tl_acc(x.dtype)
        flags = _launch_flags(inst, zf, z_period, wf, w_period, n)
        params = (*split_param(p0), *split_param(p1))
        ctx.reduction, ctx.flags, ctx.p = reduction, flags, params
        ctx.periods = (z_period, w_period)
        ctx.num_warps = inst.num_warps
        ctx.shape = shape
        zarg = xf if zf is None else zf
        warg = xf if wf is None else wf
        if reduction == "none":
            out = torch.empty_like(xf)
            if n:
                _pointwise_fwd[grid](
                    xf, yf, zarg, warg, out, out, out, xf, yf, n, z_period, w_period, 1,
                    *params, **flags, REDUCE=False, WRITE_DX=False, WRITE_DY=False,
                    ACC=acc, BLOCK=BLOCK, RBLOCK=RBLOCK, **launch_options(inst.num_warps),
                )
            ctx.save_for_backward(xf, yf, zf, wf)
            return out.view(shape)
        denom = n if (reduction == "mean" and n) else 1
        part_dtype = acc_dtype(x.dtype)
        partial = torch.empty(max(grid[0], 1), dtype=part_dtype, device=x.device)
        dx = torch.empty_like(xf) if need_dx else None
        dy = torch.empty_like(yf) if need_dy else None
        if n:
            total = torch.empty((), dtype=x.dtype, device=x.device)
            _pointwise_fwd[grid](
                xf, yf, zarg, warg, total, partial, launch_counter(x.device),
                xf if dx is None else dx, yf if dy is None else dy, n, z_period, w_period,
                denom, *params, **flags, REDUCE=True, WRITE_DX=need_dx, WRITE_DY=need_dy,
                ACC=acc, BLOCK=BLOCK, RBLOCK=RBLOCK, **launch_options(inst.num_warps),
            )
        else:  # torch semantics: the mean of nothing is nan, the sum is 0
            total = x.new_full((), float("nan") if reduction == "mean" else 0.0)
        ctx.save_for_backward(dx, dy)
        return total

    @staticmethod
    @guarded
    def backward(ctx, grad_out):
        if ctx.reduction == "none":
            xf, yf, zf, wf = ctx.saved_tensors
            need_dx, need_dy = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
            n = xf.numel()
            dx = torch.empty_like(xf) if need_dx else None
            dy = torch.empty_like(yf) if need_dy else None
            if n:
                g = grad_out.contiguous().view(-1)
                _pointwise_bwd[(triton.cdiv(n, BLOCK),)](
                    xf, yf, xf if zf is None else zf, xf if wf is None else wf, g,
                    xf if dx is None else dx, yf if dy is None else dy, n, *ctx.periods,
                    *ctx.p, **ctx.flags, WRITE_DX=need_dx, WRITE_DY=need_dy,
                    ACC=tl_acc(xf.dtype), BLOCK=BLOCK, **launch_options(ctx.num_warps),
                )
        else:
            # The gradient was computed in the forward for an incoming gradient of 1.
            dx, dy = ctx.saved_tensors
            g = grad_out.reshape(1).contiguous()
            for t in (dx, dy):
                if t is not None and t.numel():
                    _scale_unless_one[(scale_grid(t.device, triton.cdiv(t.numel(), BLOCK)),)](
                        t, g, t.numel(), ACC=tl_acc(t.dtype), BLOCK=BLOCK,
                        num_warps=NUM_WARPS)
        dx = None if dx is None else dx.view(ctx.shape)
        dy = None if dy is None else dy.view(ctx.shape)
        return dx, dy, None, None, None, None, None, None


class PointwiseLoss:
    """A pointwise loss kernel built from a ``term`` function (see module docstring)."""

    def __init__(self, term, name: str | None = None, *, operands: int = 2,
                 weighted: bool = False, exp_form: bool = False, num_warps: int = NUM_WARPS):
        if operands not in (2, 3):
            raise ValueError(f"operands must be 2 or 3, got {operands!r}")
        self.term = term
        self.name = name or getattr(term, "__name__", "term")
        self.operands = operands
        self.weighted = weighted
        self.exp_form = exp_form
        self.num_warps = num_warps
        TEMPLATE_INSTANCES.append(self)

    def __call__(
        self, input: torch.Tensor, target: torch.Tensor, reduction: str = "mean",
        p0: float = 0.0, p1: float = 0.0, z: torch.Tensor | None = None,
        weight: torch.Tensor | None = None,
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
        if (z is not None) != (self.operands == 3):
            raise ValueError(f"{self.name}: the term takes {self.operands} operands; "
                             f"z must be {'given' if self.operands == 3 else 'None'}")
        if weight is not None and not self.weighted:
            raise ValueError(f"{self.name}: built without weighted=True, weight must be None")
        for what, t in (("z", z), ("weight", weight)):
            if t is not None and t.requires_grad:
                raise ValueError(f"{self.name}: {what} is not differentiated by this kernel; "
                                 "pass it detached")
        return _PointwiseFunction.apply(input, target, z, weight, self, reduction, float(p0),
                                        float(p1))

    def aot_sources(self, dtype: str = "fp32") -> list[tuple[Any, dict, dict, dict]]:
        """(kernel, signature, constexprs, compile options) for each kernel it launches."""
        acc = "fp64" if dtype == "fp64" else "fp32"
        p = f"*{dtype}"
        acc_c = tl.float64 if dtype == "fp64" else tl.float32
        has_z, has_w = self.operands == 3, self.weighted
        common = {"TERM": self.term, "HAS_Z": has_z, "Z_BCAST": False, "HAS_W": has_w,
                  "W_BCAST": False, "EXP_FORM": self.exp_form, "ACC": acc_c, "BLOCK": BLOCK}
        opts = launch_options(self.num_warps)  # 16-warp terms: 74-92 registers uncapped
        params = {"p0": "fp32", "p0_lo": "fp32", "p1": "fp32", "p1_lo": "fp32"}
        fwd_sig = {"X": p, "Y": p, "Z": p, "W": p, "OUT": p, "PART": f"*{acc}",
                   "COUNT": "*i32", "DX": p, "DY": p, "n": "i64", "z_period": "i64",
                   "w_period": "i64", "denom": "i64", **params}
        bwd_sig = {"X": p, "Y": p, "Z": p, "W": p, "G": p, "DX": p, "DY": p, "n": "i64",
                   "z_period": "i64", "w_period": "i64", **params}
        grads = {"WRITE_DX": True, "WRITE_DY": True}
        fwd = {"RBLOCK": RBLOCK}
        sources = [
            (_pointwise_fwd, fwd_sig, {**common, **fwd, "REDUCE": True, **grads}, opts),
            (_pointwise_fwd, fwd_sig,
             {**common, **fwd, "REDUCE": False, "WRITE_DX": False, "WRITE_DY": False}, opts),
            (_pointwise_bwd, bwd_sig, {**common, **grads}, opts),
        ]
        if has_z or has_w:  # the broadcast (per-class vector) variant
            bcast = {**common, **fwd, "Z_BCAST": has_z, "W_BCAST": has_w}
            sources.append((_pointwise_fwd, fwd_sig, {**bcast, "REDUCE": True, **grads}, opts))
        sources.append((_scale_unless_one, {"X": p, "G": p, "n": "i64"},
                        {"ACC": acc_c, "BLOCK": BLOCK}, {"num_warps": NUM_WARPS}))
        return sources


def pointwise_loss(term, name: str | None = None, *, operands: int = 2, weighted: bool = False,
                   exp_form: bool = False, num_warps: int = NUM_WARPS) -> PointwiseLoss:
    """Build a fused pointwise loss from ``term`` (see the module docstring)."""
    return PointwiseLoss(term, name, operands=operands, weighted=weighted, exp_form=exp_form,
                         num_warps=num_warps)
