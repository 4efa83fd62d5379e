"""PNG plots of one results set: time vs n, speedup, peak memory, bandwidth fraction.

Each figure holds every loss (one panel per loss, or one bar group per loss), so a
run of forty losses still makes four files.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

PLOTS = ("time", "speedup", "memory", "bandwidth")


def _throughput(df: pd.DataFrame) -> pd.DataFrame:
    t = df[(df["check"] == "throughput") & (df["status"] == "ok") & (df["mode"] == "full")]
    if t.empty:  # losses whose inputs take no gradient have forward rows only
        t = df[(df["check"] == "throughput") & (df["status"] == "ok") & (df["mode"] == "forward")]
    return t.copy()


def _grid(k: int) -> tuple[int, int]:
    cols = min(4, max(1, k))
    return math.ceil(k / cols), cols


def _label(row_impl: str, dtype: str, many_dtypes: bool) -> str:
    return f"{row_impl} ({dtype})" if many_dtypes else row_impl


def _largest(t: pd.DataFrame) -> pd.DataFrame:
    idx = t.groupby(["loss", "dtype"])["n"].transform("max") == t["n"]
    return t[idx]


def _bars(ax, data: pd.DataFrame, value: str, ylabel: str, title: str, log: bool = False):
    pivot = data.pivot_table(index="loss", columns="series", values=value, aggfunc="median")
    pivot.plot.bar(ax=ax, logy=log, width=0.8)
    ax.set_ylabel(ylabel)
    ax.set_xlabel("loss")
    ax.set_title(title)
    ax.legend(title="implementation", fontsize=8)
    ax.tick_params(axis="x", rotation=30)
    ax.grid(axis="y", alpha=0.3)


def plot_run(df: pd.DataFrame, out: str | Path) -> list[Path]:
    """Write the plots for `df` under `out`; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    t = _throughput(df)
    if t.empty:
        return []
    out.mkdir(parents=True, exist_ok=True)
    many = t["dtype"].nunique() > 1
    t["series"] = [_label(i, d, many) for i, d in zip(t["impl"], t["dtype"])]
    device = ", ".join(sorted(t["device_name"].dropna().unique())) or "unknown device"
    mode = t["mode"].iloc[0]
    written = []

    # 1. time against n, log-log, one panel per loss
    losses = sorted(t["loss"].unique())
    rows, cols = _grid(len(losses))
    fig, axes = plt.subplots(rows, cols, figsize=(max(6.0, 4.2 * cols), 3.4 * rows + 0.6),
                             squeeze=False)
    for ax, loss in zip(axes.flat, losses):
        sub = t[t["loss"] == loss]
        for series, g in sub.groupby("series"):
            g = g.sort_values("n")
            ax.plot(g["n"], g["time_ms"], marker="o", label=series)
            ax.fill_between(g["n"], g["time_ms_p20"], g["time_ms_p80"], alpha=0.2)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(loss)
        ax.set_xlabel(sub["x_name"].iloc[0])
        ax.set_ylabel(f"{mode} time (ms)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(losses):]:
        ax.axis("off")
    what = "fwd+bwd" if mode == "full" else mode
    fig.suptitle(f"{what} time per call (median, p20-p80 band)\n{device}", fontsize=10)
    fig.tight_layout()
    written.append(_save(fig, out / "time.png"))

    largest = _largest(t)
    specs = [
        ("speedup", "speedup", "speedup over reference (x)",
         "Speedup over the reference at the largest n", False),
        ("memory", "peak_mib", "peak memory rise (MiB)",
         "Peak memory above the baseline at the largest n", False),
        ("bandwidth", "bw_fraction", "fraction of measured copy bandwidth",
         "Achieved bandwidth / device copy bandwidth at the largest n", False),
    ]
    largest = largest.assign(peak_mib=largest["peak_bytes"] / 2**20)
    for name, value, ylabel, title, log in specs:
        data = largest.dropna(subset=[value])
        if data.empty:
            continue
        fig, ax = plt.subplots(figsize=(max(6, 1.2 * data["loss"].nunique() + 4), 4.2))
        _bars(ax, data, value, ylabel, f"{title} ({mode})\n{device}", log=log)
        for container in ax.containers:
            ax.bar_label(container, fmt="%.3g", fontsize=7)
        if name == "speedup":
            ax.axhline(1.0, color="black", lw=0.8, ls="--")
        if name == "bandwidth":
            ax.axhline(1.0, color="black", lw=0.8, ls="--")
        fig.tight_layout()
        written.append(_save(fig, out / f"{name}.png"))
    return written


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(path)
    return path
