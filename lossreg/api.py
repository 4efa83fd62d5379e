"""`check` and `bench`: the one path that the CLI, `lossreg.gpu_check` and the Python
API (``lossreg.check``, ``lossreg.bench``) all take. `bench` chains the run
(`runner.execute`), its plots and its summary."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Sequence

from .planning import DEFAULT_BUDGET
from .runner import DEFAULT_ROUNDS, execute

FAILED = ("fail", "error")


def check(names: Sequence[str] | None = None, *, sizes: str = "quick", **kwargs):
    """Correctness and gradient rows (no timing) as a DataFrame; ``out`` (optional)
    also writes them. Keyword arguments as `runner.execute`."""
    df, writer = execute(names, throughput=False, sizes=sizes, **kwargs)
    if writer is not None:
        df.attrs.update(run_id=writer.run_id, location=str(writer.location))
    return df


def bench(names: Sequence[str] | None = None, *, out: str | Path = "runs",
          plots: bool = True, sizes: str | None = None, budget=None, rounds: int | None = None,
          consolidate: bool = True, echo: Callable[[str], None] | None = None, **kwargs):
    """Correctness, gradient and throughput rows, written under ``out`` as the run goes,
    then (with ``consolidate``) the consolidated run, its plots and a summary.

    With no ``sizes`` the run is planned against ``budget`` (default `DEFAULT_BUDGET`,
    `planning.plan_budget`: checks at the quick sizes, timings at each loss's
    representative size, as many rounds as fit); ``sizes`` (quick, default, large) runs
    every size of that preset, ``rounds`` times (default `DEFAULT_ROUNDS`).

    Returns the rows as a DataFrame; ``df.attrs`` holds ``run_id``, ``location`` (the
    Parquet written), ``plots`` (PNG paths) and ``summary`` (the table ``echo``, when
    given, prints with the row counts and the plots). Other keyword arguments as
    `runner.execute` (``device``, ``dtypes``, ``impls``, ``case_timeout``, ``run_id``,
    ``select``, ``row_extra``, ``registry``, ``progress``, ...)."""
    if sizes is None:
        budget = DEFAULT_BUDGET if budget is None else budget
    elif rounds is None:
        rounds = DEFAULT_ROUNDS
    plans = []

    def on_plan(plan):
        plans.append(plan)
        if echo is not None and budget is not None:
            echo(plan.describe())

    t0 = time.monotonic()
    df, writer = execute(names, throughput=True, out=out, sizes=sizes or "default",
                         budget=budget, rounds=rounds, consolidate=consolidate,
                         on_plan=on_plan, **kwargs)
    real = time.monotonic() - t0
    written = []
    if plots and consolidate and len(df):
        from .plots import plot_run

        written = plot_run(df, Path(out) / "plots" / f"_{writer.run_id}")
    text = summary(df)
    df.attrs.update(run_id=writer.run_id, location=str(writer.location),
                    plots=[str(p) for p in written], summary=text, seconds=real)
    if echo is not None:
        echo(text)
        echo(f"\n{len(df)} rows ({status_counts(df)}) -> {writer.location}")
        for p in written:
            echo(f"plot: {p}")
        if budget is not None and plans:
            echo(plans[0].compare(real))
    return df


def failed(df) -> bool:
    """Whether any row is ``fail`` or ``error`` (`check` and `bench` then exit 1)."""
    return bool(len(df)) and bool(df["status"].isin(FAILED).any())


def status_counts(df) -> str:
    counts = df["status"].value_counts() if len(df) else {}
    return ", ".join(f"{counts.get(s, 0)} {s}" for s in ("ok", "fail", "error", "skipped"))


def summary(df) -> str:
    """One line per loss/impl/dtype at its largest n: full-mode throughput and check status."""
    import pandas as pd

    t = df[(df["check"] == "throughput") & (df["status"] == "ok")]
    t = t[t["mode"] == "full"] if (t["mode"] == "full").any() else t
    if t.empty:
        return "(no throughput rows)"
    t = t[t.groupby(["loss", "impl", "dtype"])["n"].transform("max") == t["n"]]
    checks = df[df["check"] != "throughput"].groupby(["loss", "impl", "dtype"])["status"].agg(
        lambda s: "ok" if (s == "ok").all() else ",".join(sorted(set(s) - {"ok"})))
    view = t.set_index(["loss", "impl", "dtype"]).join(checks.rename("checks")).reset_index()
    view = pd.DataFrame({
        "loss": view["loss"], "impl": view["impl"], "dtype": view["dtype"], "n": view["n"],
        "ms": view["time_ms"].map(lambda v: f"{v:.4g}"),
        "speedup": view["speedup"].map(lambda v: "" if pd.isna(v) else f"{v:.2f}x"),
        "GB/s": view["gbps"].map(lambda v: "" if pd.isna(v) else f"{v:.1f}"),
        "bw": view["bw_fraction"].map(lambda v: "" if pd.isna(v) else f"{v:.0%}"),
        "peak MiB": (view["peak_bytes"] / 2**20).map(lambda v: f"{v:.1f}"),
        "checks": view["checks"].fillna("-"),
    })
    return view.to_string(index=False)
