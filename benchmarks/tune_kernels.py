"""Sweep launch configurations of the template kernels on a GPU (not part of the suite).

    python3 benchmarks/tune_kernels.py [--write]

Times full fwd+bwd of the pointwise template (mse, n = 2^26 float32) and of the
cross-entropy kernel (N = 16384, V = 131072 bfloat16) under several
(BLOCK, num_warps) settings, with the same timer the harness uses, and prints GB/s
against the device's copy bandwidth. The module constants it changes are the ones
the kernels read at launch. ``--write`` puts the fastest setting of each family for
this GPU's architecture into the committed table (lossreg/kernels/tuning.json, read by
lossreg.kernels.tuning), replacing that arch's rows.
"""

import argparse
import itertools
import json

import torch

from lossreg import measure
from lossreg.kernels import pointwise, softmax, tuning


def _full(fn, make, grads):
    sets = [make(i) for i in range(2)]

    def run(i):
        inp = sets[i % 2]
        return lambda: torch.autograd.grad(fn(**inp), [inp[k] for k in grads])

    return measure.time_calls("cuda", run, budget_s=0.3, warmup=3)


def write_table(best: dict, arch: str, path=tuning.TABLE) -> dict:
    """Replace ``arch``'s rows of each family in ``best`` ({family: (size bound,
    block, warps)}) and write the table back."""
    table = json.loads(path.read_text())
    for family, (bound, block, warps) in best.items():
        rows = [r for r in table.get(family, []) if r["arch"] != arch]
        table[family] = [{"arch": arch, "max_size": bound, "block": block,
                          "num_warps": warps}] + rows
    path.write_text(json.dumps(table, indent=2) + "\n")
    tuning.load.cache_clear()
    return table


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--write", action="store_true", help="update lossreg/kernels/tuning.json")
    args = ap.parse_args()
    timings = {"pointwise": {}, "cross_entropy": {}}
    bw = measure.copy_bandwidth_gbps("cuda")
    print(f"copy bandwidth {bw:.0f} GB/s on {torch.cuda.get_device_name()}")
    n = 1 << 26
    g = torch.Generator("cuda").manual_seed(0)

    def mse_inputs(i):
        return {"input": torch.randn(n, device="cuda", generator=g).requires_grad_(True),
                "target": torch.randn(n, device="cuda", generator=g).requires_grad_(True)}

    import lossreg

    mse = lossreg.get("mse").implementations["triton"].fn
    for block, warps in [(1024, 4), (2048, 4), (2048, 8), (4096, 4), (4096, 8), (8192, 8),
                         (8192, 16)]:
        pointwise.BLOCK, pointwise.NUM_WARPS = block, warps
        t = _full(mse, mse_inputs, ["input", "target"])
        timings["pointwise"][(block, warps)] = t.median_ms
        gbps = 4 * n * 4 / (t.median_ms * 1e-3) / 1e9
        print(f"pointwise mse BLOCK={block:<5} warps={warps:<2} {t.median_ms:.4f} ms "
              f"{gbps:.0f} GB/s {gbps / bw:.0%}")
    pointwise.BLOCK, pointwise.NUM_WARPS = 4096, 8

    N, V = 16384, 131072

    def ce_inputs(i):
        return {"input": (torch.randn(N, V, device="cuda", generator=g) * 2).to(
            torch.bfloat16).requires_grad_(True),
            "target": torch.randint(0, V, (N,), device="cuda", generator=g)}

    ce = lossreg.get("cross_entropy").implementations
    base = _full(ce["torch"].fn, ce_inputs, ["input"])
    print(f"F.cross_entropy {base.median_ms:.3f} ms")
    for (block, warps), name in itertools.product(
            [(4096, 4), (4096, 8), (8192, 8), (8192, 16), (16384, 16), (32768, 32)],
            ["triton"]):
        softmax.BLOCK_MAX, softmax.NUM_WARPS = block, warps
        t = _full(ce[name].fn, ce_inputs, ["input"])
        timings["cross_entropy"][(block, warps)] = t.median_ms
        gbps = 2 * N * V * 2 / (t.median_ms * 1e-3) / 1e9
        print(f"cross_entropy {name} BLOCK={block:<5} warps={warps:<2} {t.median_ms:.3f} ms "
              f"{gbps:.0f} GB/s {gbps / bw:.0%}  {base.median_ms / t.median_ms:.2f}x torch")
    softmax.BLOCK_MAX, softmax.NUM_WARPS = 4096, 8
    if args.write:
        cc = tuning.arch_name(torch.cuda.get_device_capability())
        best = {fam: (None, *min(t, key=t.get)) for fam, t in timings.items() if t}
        write_table(best, cc)
        print(f"wrote {tuning.TABLE} rows for {cc}: {best}")


if __name__ == "__main__":
    main()
