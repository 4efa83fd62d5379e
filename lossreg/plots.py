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
    cols = min(4 if k <= 16 else 6, max(1, k))
    return math.ceil(k / cols), cols


def _label(row_impl: str, dtype: str, many_dtypes: bool) -> str:
    return f"{row_impl} ({dtype})" if many_dtypes else row_impl


def _largest(t: pd.DataFrame) -> pd.DataFrame:
    idx = t.groupby(["loss", "dtype"])["n"].transform("max") == t["n"]
    return t[idx]


#: one colour per implementation name in every plot of every run
_COLOURS = {"reference": "0.55", "torch": "C0", "compile": "C1", "triton": "C3",
            "triton_inplace": "C6", "chunked": "C2", "projected": "C4", "selected": "C5",
            "liger": "C9", "liger_chunked": "C8", "liger_kl_div": "C7", "cce": "olive"}


def _colour(series: str) -> str:
    impl = series.split(" (")[0]
    if impl in _COLOURS:
        return _COLOURS[impl]
    return f"C{sum(map(ord, impl)) % 10}"  # stable across runs, unlike hash()


def _hbars(plt, data: pd.DataFrame, value: str, xlabel: str, title: str, log: bool):
    """One horizontal bar per (loss, implementation), grouped by loss.

    Horizontal because a full run has forty-odd losses: their names stay readable and a
    figure grows in height, not into a 5000-pixel-wide strip. Colour names the
    implementation, so a grouped pivot with mostly empty slots is avoided.
    """
    bars = (data.groupby(["loss", "series"], as_index=False)[value].median()
            .sort_values(["loss", "series"], ascending=False, ignore_index=True))
    series = sorted(bars["series"].unique())
    colour = {s: _colour(s) for s in series}
    fig, ax = plt.subplots(figsize=(10.0, 0.2 * len(bars) + 1.8))
    ypos = list(range(len(bars)))
    drawn = ax.barh(ypos, bars[value], color=[colour[s] for s in bars["series"]], height=0.75)
    ax.bar_label(drawn, fmt="%.3g", fontsize=6, padding=2)
    ax.set_yticks(ypos, [f"{loss}  {s}" for loss, s in zip(bars["loss"], bars["series"])],
                  fontsize=6)
    # shade every other loss so a loss's bars read as one group
    starts = bars.index[bars["loss"] != bars["loss"].shift()].tolist() + [len(bars)]
    for k, (a, b) in enumerate(zip(starts, starts[1:])):
        if k % 2:
            ax.axhspan(a - 0.5, b - 0.5, color="0.93", zorder=0)
    ax.set_ylim(-0.5, len(bars) - 0.5)
    if log:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=9)
    ax.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=colour[s]) for s in series],
              labels=series, title="implementation", fontsize=7, loc="lower right")
    ax.grid(axis="x", alpha=0.3, which="both")
    return fig, ax


def plot_run(df: pd.DataFrame, out: str | Path) -> list[Path]:
    """Write the plots for `df` under `out`; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

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
    fig, axes = plt.subplots(rows, cols, figsize=(max(6.0, 3.5 * cols), 2.9 * rows + 0.6),
                             squeeze=False)
    for ax, loss in zip(axes.flat, losses):
        sub = t[t["loss"] == loss]
        for series, g in sub.groupby("series"):
            g = g.sort_values("n")
            ax.plot(g["n"], g["time_ms"], marker="o", label=series, color=_colour(series))
            ax.fill_between(g["n"], g["time_ms_p20"], g["time_ms_p80"], alpha=0.2,
                            color=_colour(series))
        ax.set_xscale("log")
        ax.set_yscale("log")
        # minor-tick labels of a short log axis run into each other ("3x10^3 4x10^3")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(loss)
        ax.set_xlabel(sub["x_name"].iloc[0])
        ax.set_ylabel(f"{mode} time (ms)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(losses):]:
        ax.axis("off")
    what = "fwd+bwd" if mode == "full" else mode
    fig.suptitle(f"{what} time per call (median, p20-p80 band)\n{device}", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / fig.get_figheight()))
    written.append(_save(fig, out / "time.png"))

    largest = _largest(t)
    specs = [
        ("speedup", "speedup", "speedup over reference (x)",
         "Speedup over the reference at the largest n", True),
        ("memory", "peak_mib", "peak memory rise (MiB)",
         "Peak memory above the baseline at the largest n", True),
        ("bandwidth", "bw_fraction", "fraction of measured copy bandwidth",
         "Achieved bandwidth / device copy bandwidth at the largest n", False),
    ]
    largest = largest.assign(peak_mib=largest["peak_bytes"] / 2**20)
    for name, value, ylabel, title, log in specs:
        data = largest.dropna(subset=[value])
        if name == "speedup":  # the reference's own bar is 1 by definition
            data = data[data["impl"] != "reference"]
        if data.empty:
            continue
        fig, ax = _hbars(plt, data, value, ylabel, f"{title} ({mode})\n{device}", log=log)
        if name in ("speedup", "bandwidth"):
            ax.axvline(1.0, color="black", lw=0.8, ls="--")
        fig.tight_layout()
        written.append(_save(fig, out / f"{name}.png"))
    return written


def _save(fig, path: Path) -> Path:
    """Write `fig` as a 256-colour PNG (a third of the RGBA size, same look for line and
    bar plots), atomically: a crash never leaves half a PNG under the final name."""
    import io

    import matplotlib.pyplot as plt
    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, dpi=90, format="png", bbox_inches="tight")
    plt.close(fig)
    buf.seek(0)
    image = Image.open(buf).convert("RGB").quantize(colors=256)
    tmp = path.with_name(f".{path.name}.tmp.png")
    image.save(tmp, optimize=True)
    tmp.replace(path)
    return path
