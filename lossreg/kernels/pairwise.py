"""Template for pairwise-tile reductions: for every row ``i`` of ``X`` (M, D), reduce a
function of its pairs with every row ``j`` of ``Y`` (N, D) without ever holding the M x N
matrix, as flash attention does for softmax:

    out_c[i] = REDUCE_c over j of  pair_c(x_i . y_j, |x_i|^2, |y_j|^2, labels, i, j)

for up to two channels ``c``, each with its own running reduction:

* ``"max"`` / ``"min"``: the extreme value and the column index where it is reached (the
  first such column on ties, as ``torch.max(dim)`` returns; NaN where a pair is NaN, as
  torch's); ``-1`` where every pair of a
  row was excluded (the pair function returns the reduction's identity, ``-inf`` for
  max and ``+inf`` for min, to exclude a pair);
* ``"sum"``: the sum over columns;
* ``"logsumexp"``: ``log sum_j exp(v_ij)``, kept online as (running max, running sum
  of ``exp(v - max)``), rescaled when the max grows.

A plugin supplies one ``@jit`` function on ``[BLOCK_M, BLOCK_N]`` tiles (broadcast from
``[BLOCK_M, 1]`` and ``[1, BLOCK_N]`` operands), in float32 (float64 for float64 inputs):

    pair(dot, sq_row, sq_col, lab_row, lab_col, row, col, p0, p1) -> (v0, v1)

``dot`` is the tile of inner products, ``sq_row``/``sq_col`` the squared norms (so a
squared distance is ``sq_row + sq_col - 2 dot`` and a cosine ``dot / sqrt(sq_row
sq_col)``), ``lab_*`` integer labels (zeros when none are given), ``row``/``col`` the
global indices (``row == col`` is the diagonal when ``Y`` is ``X``) and ``p0``, ``p1``
two scalars. Pairs with a column beyond ``N`` never reach a reduction. With one
channel, ``v1`` is ignored.

Each program owns ``BLOCK_M`` rows and walks the columns in ``BLOCK_N`` tiles; each tile's
inner products accumulate over ``D`` in ``BLOCK_D`` slices with ``tl.dot`` (IEEE float32 for
float32 inputs, not TF32: distances must match an eager computation). Memory is ``O(M +
N)`` outputs, never ``O(MN)``; reading is ``O(MD)`` for the rows plus ``O(ND)`` per row tile
for the columns, from L2 for batches that fit it.

Losses it serves: batch-hard triplet mining (``max`` over same-label distances, ``min``
over other-label ones), K-means WCSS (``min`` over centroids), InfoNCE (``logsumexp`` of
scaled cosines, and a ``sum`` channel that keeps the diagonal), DBSCAN-style
separation (two ``sum`` channels of hinge terms over same- and different-label pairs).
The kernel is a reduction primitive, not a loss: plugins gather what the indices
select and differentiate that (O(MD) for the mining losses). Gradients of losses that
sum over all pairs (InfoNCE, separation) are another pairwise pass of the same shape,
``dX_i = sum_j w_ij (y_j ...)``, a ``tl.dot`` of a weight tile with the column tile; that
kernel belongs here when such a loss arrives.
"""

from __future__ import annotations

from typing import Any

import torch

from . import HAVE_TRITON, TEMPLATE_INSTANCES, acc_dtype, tl_acc
from ._guard import guarded_call

REDUCTIONS = {"sum": 0, "max": 1, "min": 2, "logsumexp": 3}
NO_CHANNEL = -1

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from . import nanops

    @triton.jit
    def _start(BLOCK_M: tl.constexpr, ACC: tl.constexpr, RED: tl.constexpr):
        """The reduction's identity, one per row: -inf (max, logsumexp), inf (min), 0 (sum)."""
        if RED == 2:
            v = tl.full([BLOCK_M], float("inf"), ACC)
        elif RED == 0:
            v = tl.zeros([BLOCK_M], dtype=ACC)
        else:
            v = tl.full([BLOCK_M], float("-inf"), ACC)
        return v

    @triton.jit
    def _exclude(v, ok, RED: tl.constexpr):
        """``v`` where ``ok``, else the reduction's identity."""
        if RED == 2:
            v = tl.where(ok, v, float("inf"))
        elif RED == 0:
            v = tl.where(ok, v, 0.0)
        else:
            v = tl.where(ok, v, float("-inf"))
        return v

    @triton.jit
    def _running_update(run_v, run_i, run_s, v, col0, RED: tl.constexpr):
        """Fold one [BLOCK_M, BLOCK_N] tile ``v`` into the per-row running state."""
        if RED == 0:
            run_v = run_v + tl.sum(v, axis=1)
        elif RED == 1:
            # NaN wins, as in torch.max(dim): the value is NaN, the index the first NaN
            # (or +inf) column of the tile, and a later tile never replaces a NaN
            tv = nanops.amax(v, axis=1)
            ti = tl.argmax(tl.where(nanops.isnan(v), float("inf"), v), axis=1,
                           tie_break_left=True).to(tl.int64) + col0
            # strict: an earlier column keeps a tie
            better = (tv > run_v) | (nanops.isnan(tv) & ~nanops.isnan(run_v))
            run_i = tl.where(better, ti, run_i)
            run_v = tl.where(better, tv, run_v)
        elif RED == 2:
            tv = nanops.amin(v, axis=1)
            ti = tl.argmin(tl.where(nanops.isnan(v), float("-inf"), v), axis=1,
                           tie_break_left=True).to(tl.int64) + col0
            better = (tv < run_v) | (nanops.isnan(tv) & ~nanops.isnan(run_v))
            run_i = tl.where(better, ti, run_i)
            run_v = tl.where(better, tv, run_v)
        elif RED == 3:
            m_new = tl.maximum(run_v, tl.max(v, axis=1))
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            run_s = run_s * tl.exp(run_v - shift) + tl.sum(tl.exp(v - shift[:, None]), axis=1)
            run_v = m_new
        return run_v, run_i, run_s

    @triton.jit
    def _pairwise_reduce(
        X, Y, LR, LC, V0, I0, V1, I1, M, N, D, p0, p1,
        PAIR: tl.constexpr, RED0: tl.constexpr, RED1: tl.constexpr,
        HAS_LABELS: tl.constexpr, ACC: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        pid = tl.program_id(0)
        rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        dk = tl.arange(0, BLOCK_D)
        # squared norms of this program's rows, once
        sq_r = tl.zeros([BLOCK_M], dtype=ACC)
        for k0 in range(0, D, BLOCK_D):
            xm = row_ok[:, None] & ((k0 + dk) < D)[None, :]
            x = tl.load(X + rows[:, None] * D + (k0 + dk)[None, :], mask=xm, other=0).to(ACC)
            sq_r += tl.sum(x * x, axis=1)
        if HAS_LABELS:
            lab_r = tl.load(LR + rows, mask=row_ok, other=0)
        else:
            lab_r = tl.zeros([BLOCK_M], dtype=tl.int64)
        v0 = _start(BLOCK_M, ACC, RED0)
        i0 = tl.full([BLOCK_M], -1, tl.int64)
        s0 = tl.zeros([BLOCK_M], dtype=ACC)
        v1 = _start(BLOCK_M, ACC, RED1)
        i1 = tl.full([BLOCK_M], -1, tl.int64)
        s1 = tl.zeros([BLOCK_M], dtype=ACC)
        for c0 in range(0, N, BLOCK_N):
            cols = c0 + tl.arange(0, BLOCK_N).to(tl.int64)
            col_ok = cols < N
            dot = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
            sq_c = tl.zeros([BLOCK_N], dtype=ACC)
            for k0 in range(0, D, BLOCK_D):
                kk = k0 + dk
                x = tl.load(X + rows[:, None] * D + kk[None, :],
                            mask=row_ok[:, None] & (kk < D)[None, :], other=0)
                y = tl.load(Y + cols[:, None] * D + kk[None, :],
                            mask=col_ok[:, None] & (kk < D)[None, :], other=0)
                if IEEE:
                    dot = tl.dot(x, tl.trans(y), dot, input_precision="ieee")
                else:
                    dot = tl.dot(x, tl.trans(y), dot)
                yf = y.to(ACC)
                sq_c += tl.sum(yf * yf, axis=1)
            if HAS_LABELS:
                lab_c = tl.load(LC + cols, mask=col_ok, other=0)
            else:
                lab_c = tl.zeros([BLOCK_N], dtype=tl.int64)
            a, b = PAIR(dot, sq_r[:, None], sq_c[None, :], lab_r[:, None], lab_c[None, :],
                        rows[:, None], cols[None, :], p0, p1)
            if RED0 != -1:
                a = _exclude(a, col_ok[None, :], RED0)
                v0, i0, s0 = _running_update(v0, i0, s0, a, c0, RED0)
            if RED1 != -1:
                b = _exclude(b, col_ok[None, :], RED1)
                v1, i1, s1 = _running_update(v1, i1, s1, b, c0, RED1)
        if RED0 == 3:
            v0 = v0 + tl.log(s0)
        if RED1 == 3:
            v1 = v1 + tl.log(s1)
        if RED0 != -1:
            tl.store(V0 + rows, v0.to(V0.dtype.element_ty), mask=row_ok)
            tl.store(I0 + rows, i0, mask=row_ok)
        if RED1 != -1:
            tl.store(V1 + rows, v1.to(V1.dtype.element_ty), mask=row_ok)
            tl.store(I1 + rows, i1, mask=row_ok)

BLOCK_M = 64
BLOCK_N = 64
BLOCK_D = 32
NUM_WARPS = 8
#: one stage: a second pipelined stage of the X and Y slices takes the float32 FMA
#: tiles to 240 registers on sm_80 (one block per SM); with one they fit 128
NUM_STAGES = 1


class PairwiseReduction:
    """Per-row reductions over all (row, column) pairs, built from a ``pair`` function
    (see the module docstring). ``reductions``: one or two of ``sum``, ``max``, ``min``,
    ``logsumexp``. ``labels``: whether the kernel reads row/column labels."""

    def __init__(self, pair, reductions: tuple[str, ...], name: str | None = None, *,
                 labels: bool = False):
        if not 1 <= len(reductions) <= 2 or any(r not in REDUCTIONS for r in reductions):
            raise ValueError(f"reductions must be one or two of {tuple(REDUCTIONS)}, got "
                             f"{reductions!r}")
        self.pair = pair
        self.reductions = tuple(reductions)
        self.codes = tuple(REDUCTIONS[r] for r in reductions) + (NO_CHANNEL,) * (
            2 - len(reductions))
        self.name = name or getattr(pair, "__name__", "pair")
        self.labels = labels
        TEMPLATE_INSTANCES.append(self)

    def __call__(self, x: torch.Tensor, y: torch.Tensor | None = None,
                 row_labels: torch.Tensor | None = None,
                 col_labels: torch.Tensor | None = None, p0: float = 0.0, p1: float = 0.0
                 ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One (values, indices) pair per channel, each of shape (M,). Values are in the
        accumulation dtype (float32, or float64 for float64 inputs); indices are int64
        (meaningful for max/min, -1 where a row had no admissible pair)."""
        if not HAVE_TRITON:
            raise ImportError(f"{self.name}: triton is not installed")
        y = x if y is None else y
        if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1]:
            raise ValueError(f"{self.name}: expected X (M, D) and Y (N, D), got "
                             f"{tuple(x.shape)} and {tuple(y.shape)}")
        if x.dtype != y.dtype:
            raise TypeError(f"{self.name}: X and Y must share a dtype, got {x.dtype} and "
                            f"{y.dtype}")
        if self.labels:
            col_labels = row_labels if col_labels is None else col_labels
            if row_labels is None or row_labels.shape != x.shape[:1] or (
                    col_labels.shape != y.shape[:1]):
                raise ValueError(f"{self.name}: expected row labels ({x.shape[0]},) and "
                                 f"column labels ({y.shape[0]},)")
            lr, lc = row_labels.contiguous().long(), col_labels.contiguous().long()
        else:
            lr = lc = torch.zeros(1, dtype=torch.int64, device=x.device)
        x, y = x.detach().contiguous(), y.detach().contiguous()
        M, N, D = x.shape[0], y.shape[0], x.shape[1]
        acc_t = acc_dtype(x.dtype)
        outs = [(torch.empty(M, dtype=acc_t, device=x.device),
                 torch.empty(M, dtype=torch.int64, device=x.device)) for _ in range(2)]
        if M:
            guarded_call(
                _pairwise_reduce[(triton.cdiv(M, BLOCK_M),)],
                x, y, lr, lc, outs[0][0], outs[0][1], outs[1][0], outs[1][1], M, N, D,
                float(p0), float(p1), PAIR=self.pair, RED0=self.codes[0],
                RED1=self.codes[1], HAS_LABELS=self.labels, ACC=tl_acc(x.dtype),
                IEEE=x.dtype in (torch.float32, torch.float64), BLOCK_M=BLOCK_M,
                BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, num_warps=NUM_WARPS, num_stages=NUM_STAGES)
        return outs[:len(self.reductions)]

    def aot_sources(self, dtype: str = "fp32") -> list[tuple[Any, dict, dict, dict]]:
        """(kernel, signature, constexprs, compile options) for the kernel it launches."""
        acc = "fp64" if dtype == "fp64" else "fp32"
        p = f"*{dtype}"
        sig = {"X": p, "Y": p, "LR": "*i64", "LC": "*i64", "V0": f"*{acc}", "I0": "*i64",
               "V1": f"*{acc}", "I1": "*i64", "M": "i64", "N": "i64", "D": "i64",
               "p0": "fp32", "p1": "fp32"}
        constexprs = {"PAIR": self.pair, "RED0": self.codes[0], "RED1": self.codes[1],
                      "HAS_LABELS": self.labels,
                      "ACC": tl.float64 if dtype == "fp64" else tl.float32,
                      "IEEE": dtype in ("fp32", "fp64"), "BLOCK_M": BLOCK_M,
                      "BLOCK_N": BLOCK_N, "BLOCK_D": BLOCK_D}
        return [(_pairwise_reduce, sig, constexprs,
                 {"num_warps": NUM_WARPS, "num_stages": NUM_STAGES})]


def pairwise_reduction(pair, reductions: tuple[str, ...], name: str | None = None, *,
                       labels: bool = False) -> PairwiseReduction:
    """Build a pairwise-tile reduction from ``pair`` (see the module docstring)."""
    return PairwiseReduction(pair, reductions, name, labels=labels)
