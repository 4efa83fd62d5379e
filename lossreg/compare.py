"""Compare the throughput of two result sets.

Rows join on loss/impl/dtype/n/mode/device_name. A row regressed when its median
time grew past the threshold *and* its p20-p80 range does not overlap the base's:
a change inside the noise band is not a regression.

With ``normalize``, every NEW time is first divided by the run-wide shift (the median
ratio over all joined rows): on a machine whose overall speed differs between two runs,
rows are judged against what moved with everything else. That hides a change that
slowed most rows alike, so it is opt-in, and the shift is always reported.
"""

from __future__ import annotations

import pandas as pd

KEYS = ["loss", "impl", "dtype", "n", "mode", "device_name"]
MIN_ROWS_TO_NORMALIZE = 10  # a median of fewer rows says little about the machine


def parse_threshold(text: str | float) -> float:
    """'5%' or '0.05' -> 0.05. A bare number of 1 or more ('5') is refused: 5% and
    500% are both plausible readings of it."""
    s = str(text).strip()
    forms = "write a percentage like 5% or a fraction like 0.05"
    try:
        value = float(s[:-1]) / 100 if s.endswith("%") else float(s)
    except ValueError:
        raise ValueError(f"threshold {text!r} is not a number: {forms}") from None
    if not s.endswith("%") and value >= 1:
        raise ValueError(f"threshold {text!r} is ambiguous: {forms}")
    if not 0 <= value < 10:
        raise ValueError(f"threshold {text!r} must be between 0% and 1000%")
    return value


def _timings(df: pd.DataFrame) -> pd.DataFrame:
    t = df[(df["check"] == "throughput") & (df["status"] == "ok")]
    return t.groupby(KEYS, dropna=False)[["time_ms", "time_ms_p20", "time_ms_p80"]].median()


def compare(base: pd.DataFrame, new: pd.DataFrame, threshold: float = 0.05,
            normalize: bool = False) -> pd.DataFrame:
    """One row per timed case present in both, with ``ratio`` (NEW / BASE median) and
    ``verdict``. ``table.attrs["shift"]`` is the median ratio over all rows, and
    ``table.attrs["normalized"]`` whether NEW was divided by it before judging."""
    joined = _timings(base).merge(_timings(new), left_index=True, right_index=True,
                                  suffixes=("_base", "_new"), how="inner")
    joined = joined.reset_index()
    raw = joined["time_ms_new"] / joined["time_ms_base"]
    shift = float(raw.median()) if len(joined) else float("nan")
    if normalize and len(joined) < MIN_ROWS_TO_NORMALIZE:
        raise ValueError(f"normalize needs at least {MIN_ROWS_TO_NORMALIZE} rows in common "
                         f"to estimate the run-wide shift, got {len(joined)}")
    scale = shift if normalize else 1.0
    joined["ratio"] = raw / scale
    disjoint_slower = joined["time_ms_p20_new"] / scale > joined["time_ms_p80_base"]
    disjoint_faster = joined["time_ms_p80_new"] / scale < joined["time_ms_p20_base"]
    verdict = pd.Series("unchanged", index=joined.index)
    verdict[(joined["ratio"] > 1 + threshold) & disjoint_slower] = "regression"
    verdict[(joined["ratio"] < 1 / (1 + threshold)) & disjoint_faster] = "improvement"
    joined["verdict"] = verdict
    table = joined.sort_values(["verdict", "ratio"], ascending=[True, False])
    table.attrs.update(shift=shift, normalized=normalize)
    return table


def describe_runs(df: pd.DataFrame) -> str:
    """One line per run in a result set: id, commit, device, timing rounds and the copy
    bandwidth measured at its start (a machine busier in one run shows there first)."""
    t = df[(df["check"] == "throughput") & (df["status"] == "ok")]
    if t.empty:
        return "(no timed rows)"
    lines = []
    for run_id, g in t.groupby("run_id", sort=True):
        commit = g["git_commit"].dropna()
        rounds = g["rounds"].dropna() if "rounds" in g else pd.Series(dtype=float)
        gbps = g["peak_gbps"].dropna()
        lines.append(
            f"run {run_id}, commit {commit.iloc[0][:10] if len(commit) else '?'}, "
            f"{g['device_name'].iloc[0]}, "
            + (f"{int(rounds.max())} timing rounds" if len(rounds) else
               "timed in one block per case (no rounds)")
            + (f", copy {gbps.iloc[0]:.1f} GB/s" if len(gbps) else ""))
    return "\n".join(lines)


def summary_line(table: pd.DataFrame) -> str:
    counts = table["verdict"].value_counts()
    shift = table.attrs.get("shift")
    how = ""
    if shift is not None and shift == shift:  # not NaN
        how = (f"; ratios divided by the run-wide shift {shift:.3f}"
               if table.attrs.get("normalized") else f"; run-wide median ratio {shift:.3f}")
    return (f"{counts.get('regression', 0)} regressions, {counts.get('improvement', 0)} "
            f"improvements, {counts.get('unchanged', 0)} unchanged ({len(table)} rows "
            f"compared{how})")


def format_table(table: pd.DataFrame, fmt: str = "text") -> str:
    cols = KEYS[:-1] + ["time_ms_base", "time_ms_new", "ratio", "verdict"]
    view = table[cols].copy()
    for c in ("time_ms_base", "time_ms_new"):
        view[c] = view[c].map(lambda v: f"{v:.4g}")
    view["ratio"] = view["ratio"].map(lambda v: f"{v:.3f}")
    if fmt == "markdown":
        head = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
        body = "".join("| " + " | ".join(str(v) for v in r) + " |\n" for r in view.values)
        return head + body + "\n" + summary_line(table)
    return (view.to_string(index=False) if len(view) else "(no rows in common)") + "\n" + \
        summary_line(table)
