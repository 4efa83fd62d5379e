"""A Markdown report of a results set: per loss the fastest implementation, its
speedup over the reference and the torch built-in, its peak memory against the
reference's, the bandwidth fraction it reached, every check that did not pass, and
the run's plots.

All figures come from rows of one run on one device (speedups are only meaningful
within a run), at each loss's largest size; with several runs, the latest run of
each loss x device is reported.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

PROBLEMS = ("fail", "error")


def _fmt(value, spec: str, suffix: str = "") -> str:
    return "" if value is None or pd.isna(value) else f"{value:{spec}}{suffix}"


def _latest_runs(df: pd.DataFrame) -> pd.DataFrame:
    """Keep, for each loss x device, only the latest run that has rows for it."""
    last = df.groupby(["loss", "device_name"], dropna=False)["timestamp"].transform("max")
    return df[df["timestamp"] == last]


def fastest_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per loss x device x dtype at the largest timed n: the fastest
    implementation by fwd+bwd median time (forward where nothing takes a gradient)."""
    t = df[(df["check"] == "throughput") & (df["status"] == "ok")].copy()
    if t.empty:
        return pd.DataFrame()
    keys = ["loss", "device_name", "dtype"]
    has_full = t.groupby(keys)["mode"].transform(lambda m: (m == "full").any())
    t = t[(t["mode"] == "full") | (~has_full & (t["mode"] == "forward"))]
    t = t[t["n"] == t.groupby(keys)["n"].transform("max")]
    out = []
    for (loss, device, dtype), g in t.groupby(keys, dropna=False):
        best = g.loc[g["time_ms"].idxmin()]
        ref = g[g["impl_kind"] == "reference"]
        builtin = g[(g["impl_kind"] == "baseline") & (g["backend"] == "torch")]
        ref_t = ref["time_ms"].min() if len(ref) else None
        ref_peak = ref["peak_bytes"].min() if len(ref) else None
        torch_t = builtin["time_ms"].min() if len(builtin) else None
        out.append({
            "loss": loss, "family": best["family"], "device_name": device, "dtype": dtype,
            "x_name": best["x_name"], "n": int(best["n"]), "mode": best["mode"],
            "fastest": best["impl"], "time_ms": best["time_ms"],
            "vs_reference": ref_t / best["time_ms"] if ref_t else None,
            "vs_torch": torch_t / best["time_ms"] if torch_t else None,
            "peak_vs_reference": (best["peak_bytes"] / ref_peak
                                  if ref_peak and not pd.isna(best["peak_bytes"]) else None),
            "bw_fraction": best["bw_fraction"],
            "impls_timed": ", ".join(sorted(g["impl"])),
        })
    return pd.DataFrame(out)


def kernel_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per Triton kernel (loss x triton implementation x device x dtype) at the
    largest timed n, fwd+bwd (forward where nothing takes a gradient): the bytes model,
    the achieved GB/s and fraction, beside the torch built-in's and the peers' fractions
    in the same run."""
    t = df[(df["check"] == "throughput") & (df["status"] == "ok")].copy()
    if t.empty or "model_bytes" not in t:
        return pd.DataFrame()
    keys = ["loss", "device_name", "dtype"]
    has_full = t.groupby(keys)["mode"].transform(lambda m: (m == "full").any())
    t = t[(t["mode"] == "full") | (~has_full & (t["mode"] == "forward"))]
    t = t[t["n"] == t.groupby(keys)["n"].transform("max")]
    out = []
    for (loss, device, dtype), g in t.groupby(keys, dropna=False):
        torch_rows = g[(g["impl_kind"] == "baseline") & (g["backend"] == "torch")]
        peers = g[(g["impl_kind"] == "baseline") & (g["backend"] != "torch")]
        for r in g[g["backend"] == "triton"].itertuples():
            out.append({
                "loss": loss, "device_name": device, "dtype": dtype, "impl": r.impl,
                "n": int(r.n), "mode": r.mode, "model_bytes": r.model_bytes,
                "gbps": r.gbps, "bw_fraction": r.bw_fraction,
                "torch_fraction": torch_rows["bw_fraction"].max() if len(torch_rows) else None,
                "peers": ", ".join(f"{p.impl} {_fmt(p.bw_fraction, '.0%')}"
                                   for p in peers.itertuples()),
            })
    return pd.DataFrame(out)


def _kernel_section(df: pd.DataFrame) -> list[str]:
    k = kernel_table(df)
    if k.empty:
        return []
    rows = [[f"`{r.loss}`", f"`{r.impl}`", r.dtype, r.n, r.mode,
             _fmt(r.model_bytes / 2**20 if pd.notna(r.model_bytes) else None, ".4g", " MiB"),
             _fmt(r.gbps, ".0f"), _fmt(r.bw_fraction, ".1%"), _fmt(r.torch_fraction, ".1%"),
             r.peers] for r in k.sort_values(["loss", "impl", "dtype"]).itertuples()]
    return ["", "## Triton kernels against their bytes model", "",
            "Per kernel at its largest size: the minimum traffic of its bytes model "
            "(`model`), the GB/s that traffic took, and that as a fraction of the measured "
            "copy bandwidth (`bw`), beside the torch built-in's and the peers' fractions.",
            "", _md_table(["loss", "impl", "dtype", "n", "mode", "model", "GB/s", "bw",
                           "torch bw", "peers bw"], rows)]


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    def esc(cell) -> str:
        return str(cell).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _problems(df: pd.DataFrame) -> pd.DataFrame:
    cols = ["loss", "impl", "dtype", "n", "check", "mode", "status", "message", "device_name"]
    return df[df["status"].isin(PROBLEMS)][cols].sort_values(["loss", "impl", "dtype", "n"])


def render(df: pd.DataFrame, plots: list[Path] | None = None,
           base_dir: str | Path = ".") -> str:
    """The report as Markdown; image links are relative to ``base_dir``."""
    df = _latest_runs(df)
    runs = df.groupby("run_id").agg(
        device=("device_name", "first"), commit=("git_commit", "first"),
        torch=("torch_version", "first"), triton=("triton_version", "first"),
        start=("timestamp", "first"), rows=("status", "size"))
    counts = df["status"].value_counts()
    parts = ["# lossreg results report", ""]
    parts.append(
        f"{len(df)} rows from {len(runs)} run(s): "
        + ", ".join(f"{counts.get(s, 0)} {s}" for s in ("ok", "fail", "error", "skipped"))
        + f"; {df['loss'].nunique()} losses, {df.groupby(['loss', 'impl']).ngroups} "
        "loss x implementation pairs.")
    parts += ["", _md_table(
        ["run", "device", "commit", "torch", "triton", "started (UTC)", "rows"],
        [[rid, r.device, r.commit or "", r.torch, r.triton or "",
          pd.Timestamp(r.start).strftime("%Y-%m-%d %H:%M"), r.rows]
         for rid, r in runs.iterrows()])]

    fastest = fastest_table(df)
    parts += ["", "## Fastest implementation per loss", "",
              "At each loss's largest timed size, fwd+bwd median time (forward only where "
              "no input takes a gradient). `vs reference` and `vs torch` are speedups of "
              "the fastest implementation over the reference and over the torch built-in "
              "in the same run; `peak / ref` is its peak memory over the reference's; "
              "`bw` is the fraction of the device's measured copy bandwidth it reached.",
              ""]
    if fastest.empty:
        parts.append("No throughput rows with status ok.")
    else:
        many = fastest["device_name"].nunique() > 1
        problems = _problems(df)
        bad = problems.groupby("loss").size()
        header = ["loss", "family"] + (["device"] if many else []) + [
            "dtype", "size", "fastest", "ms", "vs reference", "vs torch", "peak / ref", "bw",
            "checks not ok"]
        rows = []
        for r in fastest.sort_values(["family", "loss", "device_name", "dtype"]).itertuples():
            rows.append([f"`{r.loss}`", r.family] + ([r.device_name] if many else []) + [
                r.dtype, f"{r.x_name}={r.n}", f"`{r.fastest}`", _fmt(r.time_ms, ".4g"),
                _fmt(r.vs_reference, ".2f", "x"), _fmt(r.vs_torch, ".2f", "x"),
                _fmt(r.peak_vs_reference, ".3g"), _fmt(r.bw_fraction, ".1%"),
                str(int(bad.get(r.loss, 0)))])
        parts.append(_md_table(header, rows))

    parts += _kernel_section(df)

    untimed = sorted(set(df["loss"]) - set(fastest["loss"] if len(fastest) else []))
    if untimed:
        parts += ["", "Not timed in these results (checks only, or every timing skipped): "
                  + ", ".join(f"`{x}`" for x in untimed) + "."]

    problems = _problems(df)
    parts += ["", "## Checks that did not pass", ""]
    if problems.empty:
        checked = df[df["check"].isin(["correctness", "gradient"])]
        parts.append(f"None: all {int((checked['status'] == 'ok').sum())} correctness and "
                     "gradient rows are ok (skipped rows say why in `message`).")
    else:
        parts.append(_md_table(
            ["loss", "impl", "dtype", "n", "check", "mode", "status", "message"],
            [[r.loss, r.impl, r.dtype, r.n, r.check, r.mode, r.status,
              (r.message or "")[:300]] for r in problems.itertuples()]))

    skipped = df[df["status"] == "skipped"]
    if len(skipped):
        reasons = skipped.groupby("message").size().sort_values(ascending=False)
        parts += ["", "## Skipped", "", _md_table(
            ["rows", "reason"], [[int(k), str(m)] for m, k in reasons.items()])]

    if plots:
        parts += ["", "## Plots", ""]
        for p in plots:
            rel = os.path.relpath(p, base_dir)
            parts.append(f"![{Path(p).stem}]({Path(rel).as_posix()})")
            parts.append("")
    return "\n".join(parts).rstrip() + "\n"


def write_report(df: pd.DataFrame, out: str | Path, results: str | Path | None = None) -> Path:
    """Write the Markdown report to ``out``. Plots: the run's own plots under
    ``RESULTS/plots/_<run_id>/`` when the set is one run that has them, else new ones
    in ``_<report name>_plots/`` beside the report (the ``_`` keeps Parquet readers
    off them)."""
    from .plots import plot_run
    from .results import write_text_atomic

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    df = _latest_runs(df)
    plots: list[Path] = []
    run_ids = df["run_id"].unique()
    if results is not None and len(run_ids) == 1:
        root = Path(results) if Path(results).is_dir() else Path(results).parent
        own = root / "plots" / f"_{run_ids[0]}"
        plots = sorted(own.glob("*.png"),
                       key=lambda p: ["time", "speedup", "memory", "bandwidth"].index(p.stem)
                       if p.stem in ("time", "speedup", "memory", "bandwidth") else 9)
    if not plots:
        plots = plot_run(df, out.parent / f"_{out.stem}_plots")
    write_text_atomic(render(df, plots, out.parent), out)
    return out
