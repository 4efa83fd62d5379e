"""The ``lossreg`` command line. Bad input exits 2 with one line on stderr."""

from __future__ import annotations

import json
import sys
from functools import wraps
from pathlib import Path

import click

DEVICES = ("auto", "cpu", "cuda")


class Bad(Exception):
    """A user error: printed as one line, exit status 2."""


def _friendly(fn):
    """Turn the errors users cause into one line and exit 2, never a traceback."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        from .planning import HarnessError
        from .measure import DeviceError
        from .registry import PluginError, UnknownLossError

        try:
            return fn(*args, **kwargs)
        except (Bad, HarnessError, DeviceError, PluginError, UnknownLossError) as exc:
            _die(str(exc).splitlines()[0])

    return wrapper


def _die(message: str, code: int = 2):
    click.echo(f"lossreg: error: {message}", err=True)
    sys.exit(code)


def _registry():
    from .registry import default_registry

    return default_registry()


def _table(df, cols) -> str:
    import pandas as pd

    with pd.option_context("display.width", 200, "display.max_columns", 30,
                           "display.max_colwidth", 80):
        return df[cols].to_string(index=False)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lossreg")
def main():
    """lossreg: loss functions, their reference and optimized implementations, and proof
    that each computes the same loss and gradients, with timings."""


@main.command("list")
@click.option("--family", help="only losses of this family")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@_friendly
def list_cmd(family, as_json):
    """List registered losses."""
    specs = _registry().list(family)
    if family and not specs:
        families = sorted({s.family for s in _registry().list()})
        raise Bad(f"no family {family!r}; known: {', '.join(families)}")
    if as_json:
        click.echo(json.dumps([
            {"name": s.name, "family": s.family, "title": s.title, "plugin": s.plugin,
             "implementations": list(s.implementations)} for s in specs], indent=2))
        return
    for s in specs:
        click.echo(f"{s.name:<28} {s.family:<20} {', '.join(s.implementations)}")


@main.command()
@click.argument("name")
@_friendly
def show(name):
    """Formula, options, implementations and citation of one loss."""
    s = _registry().get(name)
    click.echo(f"{s.name} — {s.title}")
    click.echo(f"family:    {s.family} (plugin {s.plugin})")
    click.echo(f"formula:   {s.formula}")
    if s.description:
        click.echo(f"about:     {s.description}")
    click.echo(f"options:   {json.dumps(s.options)}")
    click.echo("sizes:     " + "; ".join(f"{k}={v}" for k, v in s.sizes.items())
               + f" ({s.x_name})")
    if s.citation:
        click.echo(f"citation:  {s.citation}")
    click.echo("implementations:")
    for impl in s.implementations.values():
        flags = ", ".join(filter(None, [impl.kind, impl.backend, "/".join(impl.devices),
                                        "grad in forward" if impl.grad_in_forward else ""]))
        missing = impl.missing_requirements()
        note = f"  [unavailable: needs {', '.join(missing)}]" if missing else ""
        click.echo(f"  {impl.name:<14} {flags}{note}"
                   + (f" — {impl.description}" if impl.description else ""))


@main.command()
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@_friendly
def plugins(as_json):
    """Plugins found through the `lossreg` entry points, and what each registered."""
    infos = list(_registry().plugins.values())
    if as_json:
        click.echo(json.dumps([i.as_dict() for i in infos], indent=2))
        return
    if not infos:
        click.echo("no plugins loaded")
    for i in infos:
        dist = f"{i.dist} {i.version}".strip() or "-"
        click.echo(f"{i.name:<22} {i.status:<7} {dist:<24} {i.value}")
        if i.error:
            click.echo(f"    error: {i.error}")
        for w in i.warnings:
            click.echo(f"    warning: {w}")
        if i.losses:
            click.echo(f"    losses: {', '.join(i.losses)}")
        if i.implementations:
            click.echo(f"    implementations: {', '.join(i.implementations)}")


def _common(f):
    f = click.option("--impl", "impls", multiple=True, help="implementation(s) to run")(f)
    f = click.option("--dtype", "dtypes", multiple=True,
                     help="float32, bfloat16, float16, float64 (repeatable)")(f)
    f = click.option("--device", default="auto", show_default=True,
                     help="auto (CUDA when visible, else CPU), cpu or cuda")(f)
    f = click.option("--case-timeout", type=float, default=None, metavar="SECONDS",
                     help="time limit per loss x impl x dtype x size case (its checks and "
                          "timing, in a worker process); past it the case is an error row "
                          "and the run goes on. Default: scaled from the loss's cost model; "
                          "0: no limit")(f)
    return f


def _run(fn, *args, **kwargs):
    """Run check/bench: Ctrl-C or SIGTERM -> one line saying where the rows are, exit
    130/143; results that cannot be written -> one line, exit 2."""
    from .results import ResultsWriteError
    from .runner import Interrupted

    try:
        return fn(*args, **kwargs)
    except Interrupted as exc:
        where = f" during {exc.case} (case {exc.done + 1} of {exc.total})"
        click.echo(f"\nlossreg: {'terminated' if exc.signum == 15 else 'interrupted'}{where}; "
                   f"{exc.rows} rows of the finished cases are in {exc.location}", err=True)
        sys.exit(128 + int(exc.signum))
    except ResultsWriteError as exc:
        _die(str(exc).splitlines()[0])


def _progress(total: int):
    """The run's display: a bar on a terminal, a line per finished case elsewhere."""
    from .progress import Progress

    return Progress(total, stream=sys.stderr)


@main.command()
@click.argument("names", nargs=-1)
@_common
@click.option("--sizes", default="quick", show_default=True, help="quick, default or large")
@click.option("--out", type=click.Path(file_okay=False), help="also write the rows here")
@click.option("--world-size", type=click.IntRange(min=1), default=None,
              help="check distributed losses over this many gloo ranks spawned here "
                   "(under torchrun: the job's ranks, NCCL on GPUs)")
@_friendly
def check(names, device, dtypes, impls, sizes, out, case_timeout, world_size):
    """Correctness and gradients against the float64 reference. Exit status: 0 all
    rows ok or skipped, 1 any fail or error, 2 bad input, 130/143 on Ctrl-C/SIGTERM."""
    from .api import check as run_check
    from .api import failed, status_counts

    if world_size is not None or _torchrun() is not None:
        from .distributed_runs import check_command

        df = _run(check_command, names, world_size, device, dtypes, impls, sizes, out,
                  case_timeout, progress=_progress)
        if df is None:  # a rank other than 0: rank 0 reports
            sys.exit(0)
    else:
        df = _run(run_check, list(names) or None, device=device, dtypes=dtypes or None,
                  impls=impls or None, sizes=sizes, out=out, progress=_progress,
                  case_timeout=case_timeout)
    bad = df[df["status"].isin(["fail", "error"])]
    if len(bad):
        click.echo(_table(bad, ["loss", "impl", "dtype", "n", "check", "status", "message"]))
    click.echo(f"{len(df)} rows: {status_counts(df)}")
    sys.exit(1 if failed(df) else 0)


def _torchrun():
    from .sharding import current

    return current()


@main.command()
@click.argument("names", nargs=-1)
@_common
@click.option("--sizes", default=None,
              help="quick, default or large: every size of that preset, --rounds times "
                   "[default: plan against --budget]")
@click.option("--budget", default=None, metavar="DURATION",
              help="plan the run to fit this long (90s, 10m, 1h): checks at the quick "
                   "sizes, timings at each loss's representative size, as many rounds as "
                   "fit  [default: 10m when no --sizes is given]")
@click.option("--out", default="runs", show_default=True, type=click.Path(file_okay=False))
@click.option("--no-plots", is_flag=True, help="skip the PNG plots")
@click.option("--rounds", type=click.IntRange(min=1),
              help="timing rounds per case, spread over the run so that drift of the "
                   "machine's speed averages out; each round after the first runs in a "
                   "fresh worker process  [default: 5 with --sizes, else what fits]")
@click.option("--allow-failures", is_flag=True,
              help="exit 0 even when some rows are fail or error (bad input and signals "
                   "still exit 2 and 130/143)")
@click.option("--world-size", "world_sizes", type=click.IntRange(min=1), multiple=True,
              help="measure distributed losses over this many gloo ranks spawned here "
                   "(repeatable: 1 is the single-device loss; under torchrun: the job's "
                   "ranks): time, peak memory and bytes communicated per step")
@_friendly
def bench(names, device, dtypes, impls, sizes, budget, out, no_plots, case_timeout, rounds,
          allow_failures, world_sizes):
    """Checks plus forward/backward/full timings and memory, written as Parquet. Exit
    status: 0 all rows ok or skipped, 1 any fail or error (0 with --allow-failures),
    2 bad input or unwritable results, 130/143 on Ctrl-C/SIGTERM."""
    from .api import bench as run_bench
    from .api import failed

    info = _torchrun()
    if world_sizes:
        df = _bench_distributed(names, world_sizes, device, dtypes, impls, sizes, budget,
                                out, case_timeout, rounds)
    elif info is not None:  # torchrun: this rank runs its share, rank 0 merges
        from .sharding import run_sharded

        df = _run(run_sharded, run_bench, out=out, plots=not no_plots,
                  names=list(names) or None, device=device, dtypes=dtypes or None,
                  impls=impls or None, sizes=sizes, budget=budget, rounds=rounds,
                  case_timeout=case_timeout)
        if info.rank != 0:
            sys.exit(0)
        from .api import status_counts, summary

        click.echo(summary(df))
        click.echo(f"\n{len(df)} rows from {info.world_size} ranks ({status_counts(df)}) -> "
                   f"{df.attrs.get('location')}")
    else:
        df = _run(run_bench, list(names) or None, device=device, dtypes=dtypes or None,
                  impls=impls or None, sizes=sizes, budget=budget, out=out,
                  plots=not no_plots, progress=_progress, case_timeout=case_timeout,
                  rounds=rounds, echo=click.echo)
    sys.exit(1 if failed(df) and not allow_failures else 0)


def _bench_distributed(names, world_sizes, device, dtypes, impls, sizes, budget, out,
                       case_timeout, rounds):
    from .distributed_bench import summarize
    from .distributed_runs import bench_command

    if budget or rounds:
        raise Bad("--budget and --rounds plan a single-process bench; with --world-size "
                  "give --sizes (default quick)")
    df = _run(bench_command, names, world_sizes, device, dtypes, impls, sizes, out,
              case_timeout, progress=_progress)
    if df is None:  # a rank other than 0: rank 0 reports
        sys.exit(0)
    from .api import status_counts

    click.echo(summarize(df))
    bad = df[df["status"].isin(["fail", "error"])]
    if len(bad):
        click.echo(_table(bad, ["loss", "impl", "dtype", "n", "world_size", "rank", "message"]))
    click.echo(f"\n{len(df)} rows ({status_counts(df)}) -> {df.attrs.get('location')}")
    return df


def _load(path: str):
    from .results import load_results

    try:
        df = load_results(path)
    except (FileNotFoundError, OSError) as exc:
        raise Bad(f"cannot read results at {path!r}: {exc}") from None
    if df.empty:
        raise Bad(f"no results rows found under {path!r}")
    return df


@main.command()
@click.argument("results", default="results")
@click.option("--out", type=click.Path(file_okay=False),
              help="folder for the PNGs (default: RESULTS/plots/_all)")
@_friendly
def plot(results, out):
    """Plot a results set (all its runs)."""
    from .plots import plot_run

    df = _load(results)
    out = out or str(Path(results) / "plots" / "_all")
    written = plot_run(df, out)
    if not written:
        raise Bad(f"no throughput rows with status ok under {results!r} to plot")
    for p in written:
        click.echo(f"plot: {p}")


@main.command()
@click.argument("base")
@click.argument("new")
@click.option("--threshold", default="5%", show_default=True,
              help="slowdown that counts as a regression, e.g. 5% or 0.05")
@click.option("--format", "fmt", default="text", show_default=True,
              help="text or markdown")
@click.option("--normalize", is_flag=True,
              help="divide NEW by the run-wide median ratio first, for a machine whose "
                   "overall speed differs between the runs (hides a change that slowed "
                   "most rows alike)")
@_friendly
def compare(base, new, threshold, fmt, normalize):
    """Ratio of median times NEW/BASE per loss/impl/dtype/n/mode/device; exit 1 on a
    regression past the threshold (outside the p20-p80 noise band)."""
    from .compare import compare as do_compare
    from .compare import describe_runs, format_table, parse_threshold

    if fmt not in ("text", "markdown"):
        raise Bad(f"unknown format {fmt!r}: expected text or markdown")
    try:
        thr = parse_threshold(threshold)
    except ValueError as exc:
        raise Bad(str(exc)) from None
    base_df, new_df = _load(base), _load(new)
    try:
        table = do_compare(base_df, new_df, thr, normalize=normalize)
    except ValueError as exc:
        raise Bad(str(exc)) from None
    if table.empty:
        raise Bad(f"{base!r} and {new!r} have no timed row in common (same loss, impl, "
                  "dtype, n, mode and device): nothing to compare")
    if fmt == "text":
        for side, df in (("base", base_df), ("new", new_df)):
            click.echo("\n".join(f"{side}: {line}" for line in describe_runs(df).splitlines()))
    click.echo(format_table(table, fmt))
    shift = table.attrs["shift"]
    if fmt == "text" and not normalize and abs(shift - 1) > thr:
        click.echo(f"note: the rows moved together (median ratio {shift:.3f}); if the machine "
                   "was busier in one run, --normalize judges rows against that shift")
    sys.exit(1 if (table["verdict"] == "regression").any() else 0)


@main.command()
@click.argument("results", default="results")
@click.option("--out", type=click.Path(dir_okay=False),
              help="the Markdown file to write  [default: RESULTS-report.md beside RESULTS]")
@_friendly
def report(results, out):
    """Markdown report: fastest implementation per loss, speedups, memory, bandwidth,
    failed checks, plots."""
    from .report import write_report

    df = _load(results)
    if out is None:  # beside the input, never inside a folder Parquet readers read
        source = Path(results)
        out = str(source.with_name(f"{source.stem if source.is_file() else source.name}"
                                   "-report.md"))
    if Path(out).suffix.lower() not in (".md", ".markdown"):
        raise Bad(f"--out {out!r}: expected a Markdown file name ending in .md")
    try:
        path = write_report(df, out, results)
    except OSError as exc:
        raise Bad(f"cannot write the report to {out!r}: {exc.strerror}") from None
    click.echo(f"report: {path}")


if __name__ == "__main__":
    main()
