"""batch_hard_triplet: the chunked rewrite against the reference (not part of the suite).

    python benchmarks/batch_hard_memory.py [--batch 16384] [--dim 128] [--out FILE.json]

Full fwd+bwd on the CPU in float32: peak memory (lossreg.measure.cpu_peak_bytes, the
rise of live CPU tensor memory) and median time over a few repeats after one warm-up
(lossreg.measure.time_calls). Targets: the chunked peak at most 25% of the
reference's (it is O(B * CHUNK) against O(B^2)) and its time at most 1.5x. At B=16384
the reference holds several 1 GiB B x B matrices: give it ~8 GiB of free memory.
"""

import argparse
import json
import time

import torch
from lossreg_plugins import knn

from lossreg.measure import cpu_peak_bytes, time_calls
from lossreg.spec import Case


def measure(batch: int, dim: int, repeats: int = 3) -> dict:
    inputs = knn.batch_inputs(Case(batch, torch.float32, seed=100), batch, dim)
    x0, target = inputs["input"], inputs["target"]
    result = {"batch": batch, "dim": dim, "dtype": "float32", "chunk": knn.CHUNK,
              "threads": torch.get_num_threads()}

    def full(fn):
        def run(i):
            x = x0.clone().requires_grad_(True)
            return lambda: torch.autograd.grad(fn(x, target), x)
        return run

    for name, fn in (("chunked", knn.batch_hard_chunked),
                     ("reference", knn.batch_hard_reference)):
        start = time.perf_counter()
        peak = cpu_peak_bytes(full(fn)(0))
        t = time_calls("cpu", full(fn), budget_s=0.0, min_repeats=repeats,
                       max_repeats=repeats, warmup=1)
        result[name] = {"peak_bytes": peak, "full_ms": t.median_ms, "full_ms_p20": t.p20_ms,
                        "full_ms_p80": t.p80_ms, "repeats": t.repeats,
                        "wall_s": time.perf_counter() - start}
        print(name, result[name], flush=True)
    result["peak_ratio"] = result["chunked"]["peak_bytes"] / result["reference"]["peak_bytes"]
    result["time_ratio"] = result["chunked"]["full_ms"] / result["reference"]["full_ms"]
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16384)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="/tmp/batch_hard_memory.json")
    args = ap.parse_args()
    result = measure(args.batch, args.dim, args.repeats)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"peak memory chunked/reference: {result['peak_ratio']:.1%} (target <= 25%); "
          f"fwd+bwd time chunked/reference: {result['time_ratio']:.2f}x (target <= 1.5x); "
          f"written to {args.out}")


if __name__ == "__main__":
    main()
