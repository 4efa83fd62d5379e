"""The prepared check for a lent GPU machine (``make gpu-check``).

Runs correctness, gradient and throughput of every registered loss on CUDA at the
`large` sizes (float32 and bfloat16; torch.compile left out: its compile time per
shape and dtype would not fit the machine's few minutes), writes the Parquet and plots
under ``--out`` and prints, per Triton implementation, how it compares with the torch
built-in and the device's copy bandwidth at its largest size.
"""

from __future__ import annotations

import argparse
import sys
import time


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
    ap.add_argument("--sizes", default="large")
    ap.add_argument("--loss", action="append", help="only these losses")
    ap.add_argument("--dtype", action="append")
    ap.add_argument("--max-check-gb", type=float,
                    help="run correctness/gradient only where float64 inputs stay under this")
    args = ap.parse_args(argv)

    from .api import bench
    from .measure import DeviceError
    from .planning import HarnessError
    from .registry import default_registry

    reg = default_registry()
    specs = [reg.get(n) for n in args.loss] if args.loss else reg.list()
    impls = sorted({i.name for s in specs for i in s.implementations.values()
                    if i.backend != "compile"})
    t0 = time.time()
    # the device (cuda) is validated by bench, in one place for every caller
    try:
        df = bench(args.loss, device="cuda", dtypes=args.dtype or ["float32", "bfloat16"],
                   impls=impls, sizes=args.sizes, out=args.out, echo=print, rounds=1,
                   check_bytes_max=None if args.max_check_gb is None
                   else int(args.max_check_gb * 2**30),
                   progress=lambda i, n, msg: print(f"[{i}/{n}] {msg}", flush=True))
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
