"""How long a planned case takes: from earlier runs where they have its figures, from a
bytes/flops estimate otherwise. `planning` fits runs to a time budget with it.

Public API::

    History.from_frame(df) / load_history(paths=None) -> History
    default_history_paths() -> list[Path]     results/cpu, results/gpu, ./runs (existing)
    CostModel(device_type, history=None)
        .check_seconds(task, first=False, gradcheck=False) -> float
        .timing_seconds(task, rounds) -> float  all rounds of one timed case
        .round_seconds(task, rounds) -> float   one later round of it
        .call_ms(task, mode) -> float           one call of the implementation
        .source(task, check) -> "history" | "estimate"
        .plan_seconds(tasks, rounds, checks) -> {checks, timing, fixed}
    cost_model(device_type) -> CostModel      cached, with the default history
    RUN_START_S, ROUND_START_S                 fixed costs of a run and of a round

History, in order of preference, for a (device type, loss, impl, dtype, n):
1. ``case_seconds`` of earlier rows (the wall time the harness spent on the case's
   check, or on all timing rounds of it): the median over runs. A timing figure taken
   with another number of rounds is scaled by the estimate's ratio between the two.
2. ``time_ms`` of earlier throughput rows (runs made before ``case_seconds`` existed,
   such as the committed ones): the per-call time, put through the timing policy below.
   Rows of the same loss/impl/dtype at another n are scaled by the estimate's ratio.
3. The estimate: one call takes ``c0 + bytes / BW + flops / FLOPS`` (the loss's bytes
   and flops models evaluated on inputs built on the ``meta`` device, so nothing is
   allocated). Constants per device type, fitted in log space to the committed runs
   (median |log error| 0.6-0.7 on CPU, 0.4-0.5 on the H200):

   ====== ======= ======== ========== ====================================================
   device mode    c0 (ms)  BW (GB/s)  FLOPS (GFLOP/s)  fitted to
   ====== ======= ======== ========== ====================================================
   cpu    forward 0.015    2.4        90               results/cpu (083babd, 211 rows of
   cpu    full    0.07     2.0        110              eager torch at `default` sizes)
   cuda   forward 0.2      1650       50000            results/gpu (H200, 236 rows;
   cuda   full    0.3      1650       25000            flops: fp32 matmul, not fitted)
   ====== ======= ======== ========== ====================================================

   backward is full minus forward (at least c0). A timed case then costs, per mode,
   warm-up + the first call + max(repeats to fill ``timing.BUDGET_S``, the sample floor)
   + one call for peak memory, each later round 1 + repeats calls (a backward sample
   also runs its forward), plus making the rotating input sets (randn at GEN_GBPS) and
   CASE_OVERHEAD_S. A check case at the quick sizes costs CHECK_BASE_S, more on the
   first size of a loss/impl/dtype (edge cases) and for the reference's gradcheck, plus
   its float64 flops at CHECK_GFLOPS (the Triton interpreter at INTERP_GFLOPS). These
   were measured here (2-core EPYC, process CPU seconds of `lossreg check` at the quick
   sizes, float32: 124 cases, median 0.4 s, 227 s in all with four outliers of 17-55 s
   that only history predicts well).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable

from .timing import BUDGET_S, MIN_SAMPLES, MODES, ROTATION_BYTES

REPO = Path(__file__).resolve().parent.parent
#: (c0 ms, GB/s, GFLOP/s) per device type and mode (see the module docstring)
CALL_MODEL = {
    "cpu": {"forward": (0.015, 2.4, 90.0), "full": (0.07, 2.0, 110.0)},
    "cuda": {"forward": (0.2, 1650.0, 50000.0), "full": (0.3, 1650.0, 25000.0)},
}
GEN_GBPS = {"cpu": 0.4, "cuda": 200.0}  # making random inputs
CASE_OVERHEAD_S = {"cpu": 0.3, "cuda": 0.2}  # worker round trip, rows, peak-memory probe
CHECK_BASE_S = {"cpu": 0.35, "cuda": 0.15}
CHECK_FIRST_S = {"cpu": 0.3, "cuda": 0.1}  # the edge cases, on a group's first size
GRADCHECK_S = {"cpu": 1.0, "cuda": 0.5}
CHECK_GFLOPS = {"cpu": 0.05, "cuda": 1000.0}  # flops of a check's float64 passes
INTERP_GFLOPS = 0.01  # the Triton interpreter on a CPU
TRITON_COMPILE_S = 0.5  # a Triton kernel's first JIT compile on a GPU (fwd + bwd)
#: fixed costs: starting the worker and measuring copy bandwidth; one fresh round worker
RUN_START_S = {"cpu": 8.0, "cuda": 15.0}
ROUND_START_S = {"cpu": 6.0, "cuda": 10.0}
WARMUP = 2  # timing.measure: 2 warm-up calls (3 for compile/triton)


def default_history_paths() -> list[Path]:
    """The committed runs and the default output folder (``./runs``), those that exist."""
    paths = [REPO / "results" / "cpu", REPO / "results" / "gpu", Path("runs")]
    return [p for p in paths if p.exists()]


@dataclass
class History:
    """Figures of earlier runs, keyed by (device_type, loss, impl, dtype, n)."""

    check_s: dict[tuple, float] = field(default_factory=dict)
    timing_s: dict[tuple, tuple[float, int]] = field(default_factory=dict)  # (s, rounds)
    call_ms: dict[tuple, dict[str, float]] = field(default_factory=dict)  # key -> mode -> ms

    @classmethod
    def from_frame(cls, df) -> "History":
        h = cls()
        if df is None or len(df) == 0:
            return h
        keys = ["device_type", "loss", "impl", "dtype", "n"]
        if "case_seconds" in df.columns:
            cs = df[df["case_seconds"].notna()]
            checks = cs[cs["check"].isin(["correctness", "gradient"])]
            per_run = checks.groupby(keys + ["run_id", "check"])["case_seconds"].max() \
                .groupby(keys + ["run_id"]).sum()
            for key, s in per_run.groupby(keys).median().items():
                h.check_s[_key(key)] = float(s)
            timed = cs[cs["check"] == "throughput"]
            if len(timed):
                rounds = timed["rounds"] if "rounds" in timed.columns else None
                timed = timed.assign(_r=1 if rounds is None else rounds.fillna(1))
                per_run = timed.groupby(keys + ["run_id"]).agg(s=("case_seconds", "max"),
                                                                r=("_r", "max"))
                for key, g in per_run.groupby(keys):
                    h.timing_s[_key(key)] = (float(g["s"].median()), int(g["r"].median()))
        ok = df[(df["check"] == "throughput") & (df["status"] == "ok") & df["time_ms"].notna()]
        for key, ms in ok.groupby(keys + ["mode"])["time_ms"].median().items():
            h.call_ms.setdefault(_key(key[:-1]), {})[key[-1]] = float(ms)
        return h

    def nearest_calls(self, key: tuple) -> tuple[int, dict[str, float]] | None:
        """The figures of the same device/loss/impl/dtype at the n closest (in log)."""
        if getattr(self, "_by_prefix", None) is None or self._indexed != len(self.call_ms):
            self._by_prefix: dict[tuple, list] = {}
            for k, v in self.call_ms.items():
                self._by_prefix.setdefault(k[:-1], []).append((k[-1], v))
            self._indexed = len(self.call_ms)
        same = self._by_prefix.get(key[:-1])
        if not same:
            return None
        return min(same, key=lambda kv: abs(math.log(kv[0] / key[-1])))


def _key(key: Iterable) -> tuple:
    dev, loss, impl, dtype, n = key
    return (dev, loss, impl, dtype, int(n))


HISTORY_COLUMNS = ["run_id", "device_type", "loss", "impl", "dtype", "n", "check", "mode",
                   "status", "time_ms", "case_seconds", "rounds"]


def load_history(paths: Iterable[str | Path] | None = None) -> History:
    """Read the columns the model needs from every Parquet file under ``paths``
    (default: `default_history_paths`); names starting with ``_`` or ``.`` are skipped,
    as Parquet readers do, and so is a file that does not read."""
    import pandas as pd
    import pyarrow.parquet as pq

    frames = []
    for root in map(Path, default_history_paths() if paths is None else paths):
        files = [root] if root.is_file() else sorted(
            f for f in root.rglob("*.parquet")
            if not any(part.startswith(("_", ".")) for part in f.relative_to(root).parts))
        for f in files:
            try:
                names = set(pq.read_schema(f).names)
                t = pq.read_table(f, columns=[c for c in HISTORY_COLUMNS if c in names])
            except Exception:  # noqa: BLE001 - not a results file: its rows just don't count
                continue
            df = t.to_pandas()
            for c in HISTORY_COLUMNS:
                if c not in df.columns:
                    df[c] = None
            frames.append(df)
    frames = [f for f in frames if len(f)]
    return History.from_frame(pd.concat(frames, ignore_index=True) if frames else None)


class CostModel:
    """Seconds per planned case on one device type (see the module docstring)."""

    def __init__(self, device_type: str, history: History | None = None):
        if device_type not in CALL_MODEL:
            raise ValueError(f"no cost model for device type {device_type!r}: expected "
                             f"{' or '.join(CALL_MODEL)}")
        self.dev = device_type
        self.history = history or History()
        self._models: dict[tuple, Any] = {}

    # ---------------------------------------------------------------- models
    def _sizes(self, task) -> dict[str, tuple[float, float]] | None:
        """{mode: (bytes, flops)} and the inputs' bytes, from inputs built on `meta`."""
        key = (task.spec.name, task.dtype, task.n, task.preset)
        if key not in self._models:
            self._models[key] = _models_on_meta(task)
        return self._models[key]

    def _estimate_ms(self, task, mode: str) -> float:
        m = self._sizes(task)
        if mode == "backward":
            return max(self._estimate_ms(task, "full") - self._estimate_ms(task, "forward"),
                       CALL_MODEL[self.dev]["forward"][0])
        c0, gbps, gflops = CALL_MODEL[self.dev][mode]
        nbytes, flops = m[mode] if m else (0.0, 0.0)
        return c0 + nbytes / gbps * 1e-6 + flops / gflops * 1e-6

    def call_ms(self, task, mode: str) -> float:
        key = self._hkey(task)
        hist = self.history.call_ms.get(key)
        if hist and mode in hist:
            return hist[mode]
        near = self.history.nearest_calls(key)
        if near and mode in near[1]:
            other = _with_n(task, near[0])
            return near[1][mode] * self._estimate_ms(task, mode) / self._estimate_ms(other, mode)
        return self._estimate_ms(task, mode)

    def _hkey(self, task) -> tuple:
        return (self.dev, task.spec.name, task.impl.name, task.dtype, int(task.n))

    def source(self, task, check: str) -> str:
        key = self._hkey(task)
        if check == "throughput":
            found = key in self.history.timing_s or key in self.history.call_ms or \
                self.history.nearest_calls(key) is not None
        else:
            found = key in self.history.check_s
        return "history" if found else "estimate"

    # ---------------------------------------------------------------- cases
    def check_seconds(self, task, first: bool = False, gradcheck: bool = False) -> float:
        """Correctness + gradient checks of one case (edge cases on a group's first)."""
        hist = self.history.check_s.get(self._hkey(task))
        if hist is not None:
            return hist
        m = self._sizes(task)
        flops = m["full"][1] if m else 0.0
        interp = task.impl.uses_triton and self.dev == "cpu"
        s = CHECK_BASE_S[self.dev] + flops * 1e-9 / (INTERP_GFLOPS if interp
                                                     else CHECK_GFLOPS[self.dev])
        if first:
            s += CHECK_FIRST_S[self.dev]
            if task.impl.backend == "triton" and self.dev == "cuda":
                s += TRITON_COMPILE_S
        if gradcheck:
            s += GRADCHECK_S[self.dev]
        return s

    def _policy_seconds(self, task, rounds: int) -> tuple[float, float]:
        """(first round, one later round) of a timed case from its per-call times."""
        budget = BUDGET_S[self.dev]
        warmup = 3 if task.impl.backend in ("compile", "triton") else WARMUP
        fwd = self.call_ms(task, "forward") * 1e-3
        first = later = 0.0
        for mode in MODES:
            t = self.call_ms(task, mode) * 1e-3
            sample = t + (fwd if mode == "backward" else 0.0)
            floor = max(math.ceil(5 / rounds), min(math.ceil(MIN_SAMPLES / rounds),
                                                   int(budget / max(t, 1e-6))))
            if t > 1.0:
                floor = min(floor, 3)
            repeats = min(200, max(floor, int(budget / rounds / max(t, 1e-6))))
            first += (warmup + 2) * sample + repeats * sample
            later += (1 + repeats) * sample
        setup = self._setup_seconds(task) + CASE_OVERHEAD_S[self.dev]
        return first + setup, later + setup

    def _setup_seconds(self, task) -> float:
        m = self._sizes(task)
        in_bytes = m["inputs"] if m else 0.0
        sets = min(8, max(2, math.ceil(ROTATION_BYTES[self.dev] / max(in_bytes, 1))))
        return sets * (in_bytes / GEN_GBPS[self.dev] * 1e-9 + 0.002)

    def timing_seconds(self, task, rounds: int = 1) -> float:
        """All ``rounds`` timing rounds of one case (worker starts not included)."""
        first, later = self._policy_seconds(task, rounds)
        estimate = first + (rounds - 1) * later
        hist = self.history.timing_s.get(self._hkey(task))
        if hist is not None:
            seconds, hist_rounds = hist
            f0, l0 = self._policy_seconds(task, hist_rounds)
            return seconds * estimate / (f0 + (hist_rounds - 1) * l0)
        return estimate

    def plan_seconds(self, tasks, rounds: int, checks: tuple) -> dict[str, float]:
        """{checks, timing, fixed} seconds of a plan's tasks (those whose ``checks`` is
        ``checks`` are check cases, the others timed); sets each task's ``seconds`` and
        ``source``. Edge cases on a loss/impl/dtype's first check case, the gradcheck on
        a loss's first reference case, a fresh worker for each later round."""
        seen, gradchecked = set(), set()
        out = {"checks": 0.0, "timing": 0.0, "fixed": RUN_START_S[self.dev]}
        timed = False
        for t in tasks:
            if t.checks == checks:
                group = (t.spec.name, t.impl.name, t.dtype)
                grad = t.impl.kind == "reference" and t.spec.name not in gradchecked
                t.seconds = self.check_seconds(t, first=group not in seen, gradcheck=grad)
                seen.add(group)
                if grad:
                    gradchecked.add(t.spec.name)
                out["checks"] += t.seconds
                t.source = self.source(t, "correctness")
            else:
                t.seconds = self.timing_seconds(t, rounds)
                out["timing"] += t.seconds
                timed = True
                t.source = self.source(t, "throughput")
        out["fixed"] += (rounds - 1) * ROUND_START_S[self.dev] * timed
        return out

    def round_seconds(self, task, rounds: int) -> float:
        """One later timing round of a case."""
        return self._policy_seconds(task, rounds)[1]


def _with_n(task, n: int):
    from dataclasses import replace

    return replace(task, n=int(n))


def _models_on_meta(task) -> dict | None:
    """{forward|backward|full: (bytes, flops), inputs: bytes} of a task's inputs, built
    on the meta device; None when the input maker cannot build them there."""
    import torch

    from .spec import DTYPES, Case

    spec = task.spec
    try:
        case = Case(int(task.n), DTYPES[task.dtype], "meta", seed=0,
                    params=spec.case_params(task.preset, spec.options),
                    generator=torch.Generator())
        inputs = spec.make_inputs(case)
        out: dict[str, Any] = {m: (spec.model("bytes", inputs, m) or 0.0,
                                   spec.model("flops", inputs, m) or 0.0) for m in MODES}
        out["inputs"] = float(sum(t.numel() * t.element_size() for t in inputs.values()
                                  if torch.is_tensor(t)))
        return out
    except Exception:  # noqa: BLE001 - an input maker that needs real values (.item())
        return _models_scaled(task)


def _models_scaled(task) -> dict | None:
    """The models at the smallest quick size on the CPU, scaled linearly to ``n``."""
    import torch

    from .spec import DTYPES, Case

    spec = task.spec
    n0 = min(spec.sizes["quick"])
    try:
        inputs = spec.make_inputs(Case(n0, DTYPES[task.dtype], "cpu", seed=0,
                                       params=spec.case_params("quick", spec.options)))
        k = task.n / n0
        out: dict[str, Any] = {m: ((spec.model("bytes", inputs, m) or 0.0) * k,
                                   (spec.model("flops", inputs, m) or 0.0) * k) for m in MODES}
        out["inputs"] = k * float(sum(t.numel() * t.element_size() for t in inputs.values()
                                      if torch.is_tensor(t)))
        return out
    except Exception:  # noqa: BLE001
        return None


@lru_cache(maxsize=4)
def cost_model(device_type: str) -> CostModel:
    """The model for a device type with the default history (read once per process)."""
    try:
        history = load_history()
    except Exception:  # noqa: BLE001 - no history is a fine history
        history = History()
    return CostModel(device_type, history)

