"""The prepared check for a lent GPU machine (``make gpu-check``).

Runs the plan below (correctness, gradient and throughput of every registered loss on
CUDA, float32 and bfloat16; torch.compile left out: its compile time per shape and
dtype would not fit the machine's few minutes), writes the Parquet and plots
under ``--out`` and prints, per Triton implementation, how it compares with the torch
built-in and the device's copy bandwidth at its largest size.

``python -m lossreg.gpu_check --plan [--json]`` prints the plan of that run on any
machine, GPU or not (`gpu_plan`): every loss x implementation that runs on CUDA
(peers where installed) x float32/bfloat16 timed at the large sizes, plus correctness
and gradient checks at the quick sizes, fitted by the cost model (`lossreg.costmodel`,
from the committed H200 rows in results/gpu where they exist) to `GPU_BUDGET_S` of
H200 time, set-up included, so that a 15-minute loan leaves time for a rerun.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

GPU_BUDGET_S = 480.0  # of a 15-minute loan: 8 minutes for the run, the rest for a rerun
#: installing lossreg and the carried wheels, starting Python and torch, plots and report
GPU_SETUP_S = 45.0
GPU_DTYPES = ("float32", "bfloat16")


def gpu_plan(names=None, dtypes=None, registry=None, budget_s: float = GPU_BUDGET_S):
    """The plan of `make gpu-check` (device type cuda; no GPU needed to make it)."""
    from .planning import plan_budget
    from .registry import default_registry

    reg = registry or default_registry()
    specs = [reg.get(n) for n in names] if names else reg.list()
    impls = sorted({i.name for s in specs for i in s.implementations.values()
                    if i.backend != "compile"})
    plan = plan_budget(reg, names, "cuda", list(dtypes or GPU_DTYPES), impls,
                       budget_s - GPU_SETUP_S, timing_sizes="large")
    plan.budget_s = budget_s
    plan.breakdown["fixed"] = plan.breakdown.get("fixed", 0.0) + GPU_SETUP_S
    plan.estimated_seconds += GPU_SETUP_S
    return plan


def print_plan(plan, as_json: bool = False, stream=None) -> None:
    stream = stream or sys.stdout
    if as_json:
        stream.write(json.dumps(plan.to_json()) + "\n")
    else:
        stream.write(plan.describe() + "\n")


def targets(df):
    """Per loss/dtype with a Triton impl: full-mode time vs the torch baseline and bw."""
    t = df[(df["check"] == "throughput") & (df["status"] == "ok") & (df["mode"] == "full")]
    lines = []
    for (loss, dtype), g in t.groupby(["loss", "dtype"]):
        g = g[g["n"] == g["n"].max()]
        tri = g[g["backend"] == "triton"]
        base = g[(g["impl_kind"] == "baseline") & (g["backend"] == "torch")]
        for _, r in tri.iterrows():
            vs = (f"{base['time_ms'].min() / r['time_ms']:.2f}x vs torch built-in"
                  if len(base) else "no torch built-in")
            lines.append(f"{loss:<24} {dtype:<9} n={r['n']:<10} {r['impl']:<8} "
                         f"{r['time_ms']:.4g} ms  {vs}  {r['gbps']:.0f} GB/s  "
                         f"{r['bw_fraction']:.0%} of copy bandwidth ({r['peak_gbps']:.0f} GB/s)")
    return "\n".join(lines) or "(no Triton throughput rows)"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/gpu")
    ap.add_argument("--sizes", default=None,
                    help="quick, default or large: the whole matrix at that preset instead "
                         "of the budgeted plan (`--plan` shows it)")
    ap.add_argument("--loss", action="append", help="only these losses")
    ap.add_argument("--dtype", action="append")
    ap.add_argument("--max-check-gb", type=float,
                    help="run correctness/gradient only where float64 inputs stay under this")
    ap.add_argument("--plan", action="store_true",
                    help="print the plan and its expected duration, run nothing (any machine)")
    ap.add_argument("--json", action="store_true", help="with --plan: the plan as one JSON object")
    args = ap.parse_args(argv)
    if args.json and not args.plan:
        ap.error("--json goes with --plan")
    if args.plan:
        from .planning import HarnessError

        try:
            print_plan(gpu_plan(args.loss, args.dtype), as_json=args.json)
        except (HarnessError, KeyError) as exc:
            print(f"gpu-check: {exc}", file=sys.stderr)
            return 2
        return 0

    from .api import bench
    from .measure import DeviceError
    from .planning import HarnessError
    from .progress import Progress

    t0 = time.time()
    # the device (cuda) is validated by bench, in one place for every caller
    try:
        plan = None if args.sizes else gpu_plan(args.loss, args.dtype)
        df = bench(args.loss, device="cuda", dtypes=args.dtype or list(GPU_DTYPES),
                   sizes=args.sizes, out=args.out, echo=print, plan=plan,
                   rounds=None if plan is not None else 1,
                   check_bytes_max=None if args.max_check_gb is None
                   else int(args.max_check_gb * 2**30),
                   progress=lambda total: Progress(total, stream=sys.stdout))
    except (DeviceError, HarnessError) as exc:
        print(f"gpu-check: {exc}", file=sys.stderr)
        return 2
    print("\nTriton against the torch built-in and copy bandwidth (full fwd+bwd, largest n):")
    print(targets(df))
    bad = df[df["status"].isin(["fail", "error"])]
    if len(bad):
        print("\nFailures:")
        print(bad[["loss", "impl", "dtype", "n", "check", "mode", "status", "message"]]
              .to_string(index=False))
    print(f"\n{len(df)} rows in {time.time() - t0:.0f} s -> {df.attrs['location']}")
    return 1 if len(bad) else 0


if __name__ == "__main__":
    sys.exit(main())
