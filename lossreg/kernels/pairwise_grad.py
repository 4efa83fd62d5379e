"""Template for weighted sums over all pairs: the second pass that
:mod:`lossreg.kernels.pairwise` leaves to losses summing over every pair (soft K-means,
DBSCAN-style separation, InfoNCE).

For ``X`` (M, D) and ``Y`` (N, D), a plugin supplies one ``@jit`` weight function on
``[BLOCK_M, BLOCK_N]`` tiles, with the pairwise template's arguments plus per-row
statistics of ``X`` and four scalars, in float32 (float64 for float64 inputs):

    weight(dot, sq_row, sq_col, lab_row, lab_col, row, col,
           r0, r1, r2, r3, p0, p1, p2, p3) -> (w, u)

``r0..r3`` are ``[BLOCK_M, 1]`` tiles read from an (M, R) tensor of row statistics
(``R <= 4``; zeros beyond ``R``), e.g. what a forward pass found per row (a row minimum,
a normaliser, the row's loss) and the row's incoming gradient. Pairs outside the
matrices get ``w = u = 0`` whatever the function returns, so it may compute freely
(``exp`` of garbage included) on masked lanes. The kernel computes one of two sides:

* ``side="rows"``: for each row ``i`` of ``X``: ``vec_i = sum_j w_ij y_j`` (a row of
  D), ``s0_i = sum_j w_ij``, ``s1_i = sum_j u_ij``;
* ``side="cols"``: for each row ``j`` of ``Y``: ``vec_j = sum_i w_ij x_i``,
  ``s0_j = sum_i w_ij``, ``s1_j = sum_i u_ij``.

With ``w_ij = dL/dD_ij`` for squared distances ``D_ij = |x_i - y_j|^2``, the gradients
are ``dL/dx_i = 2 (s0_i x_i - vec_i)`` (rows side) and ``dL/dy_j = 2 (s0_j y_j - vec_j)``
(cols side): one pass each, never the M x N weight matrix. Without ``vec``
(``vec=False``) the rows side is a two-channel weighted row sum, e.g. a softmin's
normaliser and its weighted mean given the row minimum from the pairwise template.

Both sides evaluate the weights on tiles of the same orientation (``X`` rows down,
``Y`` rows across), so one weight function serves both: the rows side walks ``Y``'s
tiles and accumulates ``tl.dot(w, y)``, the cols side walks ``X``'s tiles and
accumulates ``tl.dot(w^T, x)``. Sums are deterministic (no atomics). Each program
owns ``BLOCK_V`` (64) of the output's D columns; for ``D > BLOCK_V`` a second grid axis
splits them, and each slice recomputes the distance tiles, so the work is
``(1 + D / BLOCK_V)`` times a distance pass: fine for embedding widths up to a few
hundred, wasteful beyond.

Distances use ``tl.dot`` as the pairwise template does (IEEE float32 for float32
inputs); the weighted sums use IEEE float32 as well for float32 and float64, TF32 for
half-precision inputs (the weights stay in float32, above the inputs' precision).
"""

from __future__ import annotations

from typing import Any

import torch

from . import HAVE_TRITON, TEMPLATE_INSTANCES, acc_dtype, tl_acc
from ._guard import guarded_call
from .tuning import max_registers

SIDES = ("rows", "cols")
MAX_ROW_STATS = 4

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _dot_tile(X, Y, rows, cols, row_ok, col_ok, D, ACC: tl.constexpr,
                  IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_D: tl.constexpr):
        """Inner products of a [BLOCK_M, BLOCK_N] tile and both sides' squared norms."""
        dk = tl.arange(0, BLOCK_D)
        dot = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
        sq_r = tl.zeros([BLOCK_M], dtype=ACC)
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
            xf = x.to(ACC)
            yf = y.to(ACC)
            sq_r += tl.sum(xf * xf, axis=1)
            sq_c += tl.sum(yf * yf, axis=1)
        return dot, sq_r, sq_c

    @triton.jit
    def _row_stat(R, rows, row_ok, k: tl.constexpr, NR: tl.constexpr, ACC: tl.constexpr,
                  BLOCK_M: tl.constexpr):
        """Column ``k`` of the (M, NR) row statistics as a [BLOCK_M, 1] tile (0 past NR)."""
        if k < NR:
            r = tl.load(R + rows * NR + k, mask=row_ok, other=0).to(ACC)
        else:
            r = tl.zeros([BLOCK_M], dtype=ACC)
        return r[:, None]

    @triton.jit
    def _weights(X, Y, LR, LC, R, rows, cols, row_ok, col_ok, D, p0, p1, p2, p3,
                 WEIGHT: tl.constexpr, NR: tl.constexpr, HAS_LABELS: tl.constexpr,
                 ACC: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        """The (w, u) tiles of one block of pairs, zero outside the matrices."""
        dot, sq_r, sq_c = _dot_tile(X, Y, rows, cols, row_ok, col_ok, D, ACC, IEEE,
                                    BLOCK_M, BLOCK_N, BLOCK_D)
        if HAS_LABELS:
            lab_r = tl.load(LR + rows, mask=row_ok, other=0)
            lab_c = tl.load(LC + cols, mask=col_ok, other=0)
        else:
            lab_r = tl.zeros([BLOCK_M], dtype=tl.int64)
            lab_c = tl.zeros([BLOCK_N], dtype=tl.int64)
        r0 = _row_stat(R, rows, row_ok, 0, NR, ACC, BLOCK_M)
        r1 = _row_stat(R, rows, row_ok, 1, NR, ACC, BLOCK_M)
        r2 = _row_stat(R, rows, row_ok, 2, NR, ACC, BLOCK_M)
        r3 = _row_stat(R, rows, row_ok, 3, NR, ACC, BLOCK_M)
        w, u = WEIGHT(dot, sq_r[:, None], sq_c[None, :], lab_r[:, None], lab_c[None, :],
                      rows[:, None], cols[None, :], r0, r1, r2, r3, p0, p1, p2, p3)
        ok = row_ok[:, None] & col_ok[None, :]
        return tl.where(ok, w, 0.0).to(ACC), tl.where(ok, u, 0.0).to(ACC)

    @triton.jit
    def _pairwise_weighted(
        X, Y, LR, LC, R, VEC, S0, S1, M, N, D, p0, p1, p2, p3,
        WEIGHT: tl.constexpr, COLS: tl.constexpr, NR: tl.constexpr, HAS_VEC: tl.constexpr,
        HAS_LABELS: tl.constexpr, ACC: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_V: tl.constexpr,
    ):
        pid = tl.program_id(0)
        pid_v = tl.program_id(1)
        dv = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
        dv_ok = dv < D
        if COLS:
            # this program owns BLOCK_N rows of Y and walks the rows of X
            cols = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
            col_ok = cols < N
            acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=ACC)
            s0 = tl.zeros([BLOCK_N], dtype=ACC)
            s1 = tl.zeros([BLOCK_N], dtype=ACC)
            for r0_ in range(0, M, BLOCK_M):
                rows = r0_ + tl.arange(0, BLOCK_M).to(tl.int64)
                row_ok = rows < M
                w, u = _weights(X, Y, LR, LC, R, rows, cols, row_ok, col_ok, D, p0, p1, p2,
                                p3, WEIGHT, NR, HAS_LABELS, ACC, IEEE, BLOCK_M, BLOCK_N,
                                BLOCK_D)
                s0 += tl.sum(w, axis=0)
                s1 += tl.sum(u, axis=0)
                if HAS_VEC:
                    xv = tl.load(X + rows[:, None] * D + dv[None, :],
                                 mask=row_ok[:, None] & dv_ok[None, :], other=0).to(ACC)
                    if IEEE:
                        acc = tl.dot(tl.trans(w), xv, acc, input_precision="ieee")
                    else:
                        acc = tl.dot(tl.trans(w), xv, acc)
            own, own_ok = cols, col_ok
        else:
            # this program owns BLOCK_M rows of X and walks the rows of Y
            rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
            row_ok = rows < M
            acc = tl.zeros([BLOCK_M, BLOCK_V], dtype=ACC)
            s0 = tl.zeros([BLOCK_M], dtype=ACC)
            s1 = tl.zeros([BLOCK_M], dtype=ACC)
            for c0 in range(0, N, BLOCK_N):
                cols = c0 + tl.arange(0, BLOCK_N).to(tl.int64)
                col_ok = cols < N
                w, u = _weights(X, Y, LR, LC, R, rows, cols, row_ok, col_ok, D, p0, p1, p2,
                                p3, WEIGHT, NR, HAS_LABELS, ACC, IEEE, BLOCK_M, BLOCK_N,
                                BLOCK_D)
                s0 += tl.sum(w, axis=1)
                s1 += tl.sum(u, axis=1)
                if HAS_VEC:
                    yv = tl.load(Y + cols[:, None] * D + dv[None, :],
                                 mask=col_ok[:, None] & dv_ok[None, :], other=0).to(ACC)
                    if IEEE:
                        acc = tl.dot(w, yv, acc, input_precision="ieee")
                    else:
                        acc = tl.dot(w, yv, acc)
            own, own_ok = rows, row_ok
        if HAS_VEC:
            tl.store(VEC + own[:, None] * D + dv[None, :], acc.to(VEC.dtype.element_ty),
                     mask=own_ok[:, None] & dv_ok[None, :])
        if pid_v == 0:
            tl.store(S0 + own, s0.to(S0.dtype.element_ty), mask=own_ok)
            tl.store(S1 + own, s1.to(S1.dtype.element_ty), mask=own_ok)

#: Tile shapes (BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_V, num_warps) by input precision. IEEE
#: float32 dots run on FMA units with operands held in registers: two 64 x 64 dots per
#: step spill on sm_80/sm_90 (ptxas), 32 x 32 tiles do not. Half precision runs on
#: tensor cores and keeps the pairwise template's 64 x 64.
CONFIGS = {"full": (32, 32, 32, 64, 8), "half": (64, 64, 32, 64, 8)}
NUM_STAGES = 2


def _config(half: bool) -> dict:
    bm, bn, bd, bv, warps = CONFIGS["half" if half else "full"]
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D": bd, "BLOCK_V": bv, "num_warps": warps}


class PairwiseWeightedSum:
    """Weighted sums over all (row, column) pairs from a ``weight`` function (see the
    module docstring). ``sides``: which of ``rows``/``cols`` this instance launches;
    ``vec``: whether it accumulates the D-wide sums (False: only ``s0``, ``s1``);
    ``row_stats``: how many per-row statistics (0 to 4) the weight function reads;
    ``labels``: whether it reads row/column labels."""

    def __init__(self, weight, name: str | None = None, *, sides: tuple[str, ...] = ("rows",),
                 vec: bool = True, row_stats: int = 0, labels: bool = False):
        if not sides or any(s not in SIDES for s in sides):
            raise ValueError(f"sides must be among {SIDES}, got {sides!r}")
        if not 0 <= row_stats <= MAX_ROW_STATS:
            raise ValueError(f"row_stats must be 0 to {MAX_ROW_STATS}, got {row_stats!r}")
        self.weight = weight
        self.name = name or getattr(weight, "__name__", "weight")
        self.sides = tuple(sides)
        self.vec = vec
        self.row_stats = row_stats
        self.labels = labels
        TEMPLATE_INSTANCES.append(self)

    def __call__(self, x: torch.Tensor, y: torch.Tensor | None = None, *,
                 side: str = "rows", row_stats: torch.Tensor | None = None,
                 row_labels: torch.Tensor | None = None,
                 col_labels: torch.Tensor | None = None,
                 params: tuple[float, ...] = ()) -> tuple[torch.Tensor | None, torch.Tensor,
                                                          torch.Tensor]:
        """``(vec, s0, s1)`` for ``side``: vec (M, D) or (N, D) in the accumulation dtype
        (None without ``vec``), s0 and s1 of length M or N. ``row_stats``: (M, R) with R
        the instance's ``row_stats``; ``params``: up to four floats."""
        if not HAVE_TRITON:
            raise ImportError(f"{self.name}: triton is not installed")
        if side not in self.sides:
            raise ValueError(f"{self.name}: side must be one of {self.sides}, got {side!r}")
        y = x if y is None else y
        if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1]:
            raise ValueError(f"{self.name}: expected X (M, D) and Y (N, D), got "
                             f"{tuple(x.shape)} and {tuple(y.shape)}")
        if x.dtype != y.dtype:
            raise TypeError(f"{self.name}: X and Y must share a dtype, got {x.dtype} and "
                            f"{y.dtype}")
        if len(params) > 4:
            raise ValueError(f"{self.name}: at most four params, got {len(params)}")
        M, N, D = x.shape[0], y.shape[0], x.shape[1]
        acc_t = acc_dtype(x.dtype)
        if self.row_stats:
            if row_stats is None or tuple(row_stats.shape) != (M, self.row_stats):
                got = None if row_stats is None else tuple(row_stats.shape)
                raise ValueError(f"{self.name}: expected row_stats of shape "
                                 f"({M}, {self.row_stats}), got {got}")
            stats = row_stats.detach().to(acc_t).contiguous()
        else:
            stats = torch.zeros(1, dtype=acc_t, device=x.device)
        if self.labels:
            col_labels = row_labels if col_labels is None else col_labels
            if row_labels is None or row_labels.shape != x.shape[:1] or (
                    col_labels.shape != y.shape[:1]):
                raise ValueError(f"{self.name}: expected row labels ({M},) and column "
                                 f"labels ({N},)")
            lr, lc = row_labels.contiguous().long(), col_labels.contiguous().long()
        else:
            lr = lc = torch.zeros(1, dtype=torch.int64, device=x.device)
        x, y = x.detach().contiguous(), y.detach().contiguous()
        cols = side == "cols"
        own = N if cols else M
        vec = torch.empty((own, D) if self.vec else (1,), dtype=acc_t, device=x.device)
        s0 = torch.empty(own, dtype=acc_t, device=x.device)
        s1 = torch.empty(own, dtype=acc_t, device=x.device)
        if own:  # (with no pairs to walk, the sums come out 0)
            p = [float(v) for v in params] + [0.0] * (4 - len(params))
            full = x.dtype in (torch.float32, torch.float64)
            cfg = _config(half=not full)
            grid = (triton.cdiv(own, cfg["BLOCK_N"] if cols else cfg["BLOCK_M"]),
                    max(1, triton.cdiv(D, cfg["BLOCK_V"])) if self.vec else 1)
            guarded_call(
                _pairwise_weighted[grid], x, y, lr, lc, stats, vec, s0, s1, M, N, D, *p,
                WEIGHT=self.weight, COLS=cols, NR=self.row_stats, HAS_VEC=self.vec,
                HAS_LABELS=self.labels, ACC=tl_acc(x.dtype), IEEE=full,
                num_stages=NUM_STAGES, maxnreg=max_registers(cfg["num_warps"]), **cfg)
        return (vec if self.vec else None), s0, s1

    def aot_sources(self, dtype: str = "fp32") -> list[tuple[Any, dict, dict, dict]]:
        """(kernel, signature, constexprs, compile options) for each side it launches."""
        acc = "fp64" if dtype == "fp64" else "fp32"
        p = f"*{dtype}"
        sig = {"X": p, "Y": p, "LR": "*i64", "LC": "*i64", "R": f"*{acc}", "VEC": f"*{acc}",
               "S0": f"*{acc}", "S1": f"*{acc}", "M": "i64", "N": "i64", "D": "i64",
               "p0": "fp32", "p1": "fp32", "p2": "fp32", "p3": "fp32"}
        full = dtype in ("fp32", "fp64")
        cfg = _config(half=not full)
        warps = cfg.pop("num_warps")
        out = []
        for side in self.sides:
            constexprs = {"WEIGHT": self.weight, "COLS": side == "cols", "NR": self.row_stats,
                          "HAS_VEC": self.vec, "HAS_LABELS": self.labels,
                          "ACC": tl.float64 if dtype == "fp64" else tl.float32,
                          "IEEE": full, **cfg}
            out.append((_pairwise_weighted, sig, constexprs,
                        {"num_warps": warps, "num_stages": NUM_STAGES,
                         # float32 FMA tiles took 186-212 registers uncapped (1 block/SM)
                         "maxnreg": max_registers(warps)}))
        return out


def pairwise_weighted_sum(weight, name: str | None = None, *,
                          sides: tuple[str, ...] = ("rows",), vec: bool = True,
                          row_stats: int = 0, labels: bool = False) -> PairwiseWeightedSum:
    """Build a pairwise weighted-sum pass from ``weight`` (see the module docstring)."""
    return PairwiseWeightedSum(weight, name, sides=sides, vec=vec, row_stats=row_stats,
                               labels=labels)
