"""Template for histogram losses: a loss that is a smooth function of a few per-bin sums
of per-element statistics, ``L_t = finish(H_t)`` with

    H[t, b, k] = sum_{i : bin(y_i) = b} stat_k(s[t, i], y_i)        (t < T, b < B, k < K)

Soft split criteria of decision trees are of this form: with ``s`` the probability of
going left and ``y`` the class, ``stat_0 = s`` and ``stat_1 = 1`` give the left and total
class counts from which both children's Gini impurities follow; a regression split needs
one bin and the sums of ``s``, ``s y``, ``y``, ``y^2``. ``T`` rows of ``s`` (the trees of a
forest) share one ``y``.

A plugin supplies one ``@jit`` function, evaluated in float32 (float64 for float64 ``s``):

    stats(s, y, k, aux) -> (stat, dstat_ds)

``s`` and ``y`` are ``[BLOCK_N, 1]`` columns (``y`` as stored: integer labels, or values
in ``s``'s dtype), ``k`` a ``[1, BLOCK_K]`` row of statistic indices and ``aux`` a scalar the
kernel reads from device memory (a shift for sums of squares, say; no host sync). It
returns two ``[BLOCK_N, BLOCK_K]`` tiles: the statistics and their derivatives w.r.t.
``s`` (statistics are elementwise in ``s``). Then, in PyTorch, ``finish(H)`` maps the
float64 histogram ``(T, B, K)`` to the ``(T,)`` losses, differentiably: it touches
``T*B*K`` numbers, so it costs nothing next to the pass over ``s``.

Kernels:

* forward: each program reads a contiguous chunk of ``s[t]`` and ``y`` once and keeps a
  ``[B*K]`` running histogram in registers (a one-hot mask of the bins against the
  chunk's labels, summed over the chunk), then writes it as one partial; the partials
  are summed in float64. Program ``(t, p)`` handles tree ``t`` of chunk ``p``, trees of one
  chunk being adjacent, so ``y`` is read from DRAM about once and from L2 by the others.
* backward: autograd through ``finish`` gives ``G = dL/dH`` (tiny); one pass then writes
  ``ds[t, i] = sum_k G[t, bin(y_i), k] * dstat_k/ds(s[t, i], y_i)``.

With ``acc64=True`` statistics and sums are float64 whatever the input dtype: for
criteria that subtract sums (a sum of squares minus a squared sum over a count) and
would lose float32's few digits to cancellation. The finish is float64 in any case.

With ``binned=False`` every element falls in bin 0 (and ``y`` may be float values). The
one-hot tile costs ``B*K`` operations per element, fine for the class counts of tree
splits (``B <= MAX_BINS``), not for vocabularies.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from . import HAVE_TRITON, TEMPLATE_INSTANCES, tl_acc
from ._guard import guarded_call

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _histogram_fwd(
        S, Y, AUX, PART, n, n_bins, n_stats, chunk, n_chunks,
        STATS: tl.constexpr, BINNED: tl.constexpr, ACC: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        t = tl.program_id(0).to(tl.int64)
        p = tl.program_id(1).to(tl.int64)
        aux = tl.load(AUX).to(ACC)
        # flattened (bin, stat) axis: j -> bin j // BLOCK_K, stat j % BLOCK_K
        j = tl.arange(0, BLOCK_B * BLOCK_K)
        bin_j = j // BLOCK_K
        k_j = j % BLOCK_K
        acc = tl.zeros([BLOCK_B * BLOCK_K], dtype=ACC)
        start = p * chunk
        for off in range(start, tl.minimum(start + chunk, n), BLOCK_N):
            offs = off + tl.arange(0, BLOCK_N)
            mask = offs < n
            s = tl.load(S + t * n + offs, mask=mask, other=0).to(ACC)
            y = tl.load(Y + offs, mask=mask, other=0)
            stat, _ = STATS(s[:, None], y[:, None], k_j[None, :], aux)
            if BINNED:
                hit = mask[:, None] & (y[:, None] == bin_j[None, :])
            else:
                hit = mask[:, None] & (bin_j == 0)[None, :]
            acc += tl.sum(tl.where(hit, stat, 0.0), axis=0)
        keep = (bin_j < n_bins) & (k_j < n_stats)
        dest = PART + ((t * n_chunks + p) * n_bins + bin_j) * n_stats + k_j
        tl.store(dest, acc, mask=keep)

    @triton.jit
    def _histogram_bwd(
        S, Y, AUX, G, DS, n, n_bins, n_stats,
        STATS: tl.constexpr, BINNED: tl.constexpr, ACC: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        t = tl.program_id(0).to(tl.int64)
        p = tl.program_id(1).to(tl.int64)
        aux = tl.load(AUX).to(ACC)
        offs = p * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = offs < n
        k = tl.arange(0, BLOCK_K)
        s = tl.load(S + t * n + offs, mask=mask, other=0).to(ACC)
        y = tl.load(Y + offs, mask=mask, other=0)
        _, dstat = STATS(s[:, None], y[:, None], k[None, :], aux)
        if BINNED:
            b = y.to(tl.int64)
        else:
            b = tl.zeros([BLOCK_N], dtype=tl.int64)
        # bins outside [0, n_bins) (labels the plugin failed to validate) read nothing
        gmask = (mask & (b >= 0) & (b < n_bins))[:, None] & (k < n_stats)[None, :]
        g = tl.load(G + (t * n_bins + b[:, None]) * n_stats + k[None, :], mask=gmask, other=0)
        ds = tl.sum(tl.where(gmask, g.to(ACC) * dstat, 0.0), axis=1)
        tl.store(DS + t * n + offs, ds.to(DS.dtype.element_ty), mask=mask)

#: Largest number of bins (B) one histogram holds.
MAX_BINS = 256
#: Elements of the one-hot tile a program works on per step (BLOCK_N * BLOCK_B * BLOCK_K).
TILE = 4096
#: Upper bound on the programs of one forward launch (the partials stay tiny).
MAX_PROGRAMS = 1024
BWD_BLOCK = 1024
NUM_WARPS = 4


def _pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def blocks(n_bins: int, n_stats: int, wide: bool = False) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_B, BLOCK_K) for a histogram of ``n_bins`` x ``n_stats``; half the
    tile when accumulating in float64 (twice the registers per element)."""
    block_b, block_k = _pow2(n_bins), _pow2(n_stats)
    tile = TILE // 2 if wide else TILE
    return max(tile // (block_b * block_k), 16), block_b, block_k


class HistogramLoss:
    """A histogram-reduction kernel pair built from a ``stats`` function (see the module
    docstring). ``binned``: bins are ``y``'s integer labels, else everything is bin 0.
    ``aot_bins``: the bin counts whose tile shapes the ahead-of-time compile covers."""

    def __init__(self, stats, n_stats: int, name: str | None = None, *, binned: bool = True,
                 acc64: bool = False, aot_bins: tuple[int, ...] = (2, 16, MAX_BINS)):
        if not 1 <= n_stats <= 8:
            raise ValueError(f"n_stats must lie in [1, 8], got {n_stats}")
        self.stats = stats
        self.n_stats = n_stats
        self.name = name or getattr(stats, "__name__", "stats")
        self.binned = binned
        self.acc64 = acc64
        self.aot_bins = tuple(aot_bins) if binned else (1,)
        TEMPLATE_INSTANCES.append(self)

    # ------------------------------------------------------------ raw kernels
    def histogram(self, s: torch.Tensor, y: torch.Tensor, aux: torch.Tensor,
                  n_bins: int) -> torch.Tensor:
        """H of shape (T, n_bins, K) in float64, for ``s`` of shape (T, n), ``y`` (n,)."""
        T, n = s.shape
        wide = self.acc64 or s.dtype == torch.float64
        block_n, block_b, block_k = blocks(n_bins, self.n_stats, wide)
        blocks_n = triton.cdiv(n, block_n)
        per_tree = max(1, min(blocks_n, MAX_PROGRAMS // max(T, 1)))
        chunk = triton.cdiv(blocks_n, per_tree) * block_n
        n_chunks = triton.cdiv(n, chunk)
        part_dtype = torch.float64 if wide else torch.float32
        part = torch.empty((T, n_chunks, n_bins, self.n_stats), dtype=part_dtype,
                           device=s.device)
        guarded_call(_histogram_fwd[(T, n_chunks)],
                     s, y, aux, part, n, n_bins, self.n_stats, chunk, n_chunks,
                     STATS=self.stats, BINNED=self.binned, ACC=tl_acc(s.dtype, self.acc64),
                     BLOCK_N=block_n,
                     BLOCK_B=block_b, BLOCK_K=block_k, num_warps=NUM_WARPS)
        return part.sum(dim=1, dtype=torch.float64)

    def scatter(self, s: torch.Tensor, y: torch.Tensor, aux: torch.Tensor,
                grad_h: torch.Tensor) -> torch.Tensor:
        """ds[t, i] = sum_k grad_h[t, bin(y_i), k] * dstat_k/ds, shape (T, n)."""
        T, n = s.shape
        n_bins = grad_h.shape[1]
        ds = torch.empty_like(s)
        wide = self.acc64 or s.dtype == torch.float64
        g = grad_h.to(torch.float64 if wide else torch.float32).contiguous()
        guarded_call(_histogram_bwd[(T, triton.cdiv(n, BWD_BLOCK))],
                     s, y, aux, g, ds, n, n_bins, self.n_stats, STATS=self.stats,
                     BINNED=self.binned, ACC=tl_acc(s.dtype, self.acc64), BLOCK_N=BWD_BLOCK,
                     BLOCK_K=_pow2(self.n_stats), num_warps=NUM_WARPS)
        return ds

    # ------------------------------------------------------------ the loss
    def __call__(self, s: torch.Tensor, y: torch.Tensor, finish: Callable[[torch.Tensor],
                 torch.Tensor], n_bins: int = 1, aux: torch.Tensor | None = None
                 ) -> torch.Tensor:
        """``finish(H)`` of the histogram of ``s`` (T, n) or (n,), differentiable in ``s``.

        ``finish`` maps the float64 (T, n_bins, K) histogram to the losses (any shape);
        the result has ``s``'s dtype. ``aux``: a one-element tensor passed to ``stats``.
        """
        if not HAVE_TRITON:
            raise ImportError(f"{self.name}: triton is not installed")
        if s.dim() not in (1, 2) or y.dim() != 1 or s.shape[-1] != y.shape[0]:
            raise ValueError(f"{self.name}: expected s (T, n) or (n,) and y (n,), got "
                             f"{tuple(s.shape)} and {tuple(y.shape)}")
        if self.binned and not 1 <= n_bins <= MAX_BINS:
            raise ValueError(f"{self.name}: the histogram template holds 1 to {MAX_BINS} "
                             f"bins, got {n_bins}")
        n_bins = n_bins if self.binned else 1
        if aux is None:
            aux = s.detach().reshape(-1)[:1]
        return _HistogramFunction.apply(s, y, aux, self, n_bins, finish)

    def aot_sources(self, dtype: str = "fp32") -> list[tuple[Any, dict, dict, dict]]:
        """(kernel, signature, constexprs, compile options) for each kernel it launches."""
        wide = self.acc64 or dtype == "fp64"
        acc = "fp64" if wide else "fp32"
        acc_c = tl.float64 if wide else tl.float32
        p = f"*{dtype}"
        ys = "*i64" if self.binned else p
        opts = {"num_warps": NUM_WARPS}
        fwd_sig = {"S": p, "Y": ys, "AUX": p, "PART": f"*{acc}", "n": "i64", "n_bins": "i32",
                   "n_stats": "i32", "chunk": "i64", "n_chunks": "i64"}
        bwd_sig = {"S": p, "Y": ys, "AUX": p, "G": f"*{acc}", "DS": p, "n": "i64",
                   "n_bins": "i32", "n_stats": "i32"}
        common = {"STATS": self.stats, "BINNED": self.binned, "ACC": acc_c}
        sources = []
        for bins in self.aot_bins:
            block_n, block_b, block_k = blocks(bins, self.n_stats, wide)
            sources.append((_histogram_fwd, fwd_sig, {**common, "BLOCK_N": block_n,
                            "BLOCK_B": block_b, "BLOCK_K": block_k}, opts))
        sources.append((_histogram_bwd, bwd_sig, {**common, "BLOCK_N": BWD_BLOCK,
                        "BLOCK_K": _pow2(self.n_stats)}, opts))
        return sources


class _HistogramFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s, y, aux, inst, n_bins, finish):
        s2 = s.detach().reshape(-1, s.shape[-1]).contiguous()
        y = y.contiguous()
        aux = aux.detach().reshape(-1)[:1].to(s.dtype).contiguous()
        if s2.shape[1] == 0:
            h = torch.zeros((s2.shape[0], n_bins, inst.n_stats), dtype=torch.float64,
                            device=s.device)
        else:
            h = inst.histogram(s2, y, aux, n_bins)
        out = finish(h)
        ctx.save_for_backward(s2, y, aux, h)
        ctx.inst, ctx.finish, ctx.shape = inst, finish, s.shape
        return out.to(s.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        s2, y, aux, h = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        with torch.enable_grad():
            h = h.detach().requires_grad_(True)
            out = ctx.finish(h)
            (grad_h,) = torch.autograd.grad(out, h, grad_out.to(out.dtype))
        ds = ctx.inst.scatter(s2, y, aux, grad_h) if s2.shape[1] else torch.zeros_like(s2)
        return ds.view(ctx.shape), None, None, None, None, None


def histogram_loss(stats, n_stats: int, name: str | None = None, *, binned: bool = True,
                   acc64: bool = False, aot_bins: tuple[int, ...] = (2, 16, MAX_BINS)
                   ) -> HistogramLoss:
    """Build a histogram-reduction loss from ``stats`` (see the module docstring)."""
    return HistogramLoss(stats, n_stats, name, binned=binned, acc64=acc64, aot_bins=aot_bins)
