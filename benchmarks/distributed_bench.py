"""The distributed losses measured as their users care (issue 19): per-rank peak memory
against the single-device loss on the whole problem, time per step and bytes
communicated per step, at world sizes 1, 2 and 4 (gloo ranks on this machine).

    python benchmarks/distributed_bench.py --out results/distributed --sizes quick default

A step is forward + backward of the loss (gradients of every input that takes one).
World size 1 runs each implementation with no process group, on the whole problem:
that is the single-device loss, and the ``reference`` rows (the plain formula on the
whole tensors) are the baseline a user would run without sharding. Rows go to one
Parquet run (``lossreg.load_results(out)``); ``summarize`` prints the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

LOSSES = ("vocab_parallel_cross_entropy", "vocab_parallel_linear_cross_entropy",
          "gathered_info_nce")
WORLD_SIZES = (1, 2, 4)
REPEATS = 5


def _step(spec, impl, mine, options):
    names = [k for k in spec.grad_names(mine)]
    leaves = {k: (v.detach().requires_grad_(True) if k in names else v) for k, v in mine.items()}

    def run():
        out = impl.fn(**leaves, **options)
        return torch.autograd.grad(out, [leaves[k] for k in names], torch.ones_like(out))

    return run


def measure_case(spec, impl_name, n, preset, dtype, rank, world, group) -> dict:
    """One rank's figures for one case: median/p20/p80 ms per step, peak bytes above
    the baseline during a step, bytes its collectives carried in a step."""
    from lossreg import collectives, measure
    from lossreg.spec import DTYPES, Case

    impl = spec.implementations[impl_name]
    options = dict(spec.options)
    whole = spec.make_inputs(Case(n, DTYPES[dtype], "cpu", seed=5,
                                  params=spec.case_params(preset, options)))
    mine = spec.sharding.shard(whole, rank, world, options) if world > 1 else whole
    mine = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in mine.items()}
    del whole
    run = _step(spec, impl, mine, options)
    with collectives.using(group):
        run()  # warm-up
        collectives.reset_comm()
        run()
        comm = collectives.comm_bytes()
        samples = []
        for _ in range(REPEATS):
            if group is not None:
                dist.barrier(group)
            t0 = time.perf_counter()
            run()
            samples.append((time.perf_counter() - t0) * 1e3)
        if group is not None:
            dist.barrier(group)
        peak = measure.peak_bytes("cpu", run)
    q = statistics.quantiles(samples, n=5) if len(samples) > 1 else samples * 4
    return {"time_ms": statistics.median(samples), "time_ms_p20": q[0], "time_ms_p80": q[3],
            "repeats": len(samples), "peak_bytes": int(peak), "comm_bytes": int(comm)}


def cases(sizes, losses=LOSSES):
    import lossreg

    for name in losses:
        spec = lossreg.get(name)
        for preset in sizes:
            for n in spec.sizes[preset]:
                yield spec, preset, n


def _rank(rank, world, store_path, sizes, losses, dtype, results):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    group = None
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank,
                                world_size=world, timeout=timedelta(seconds=600))
        group = dist.group.WORLD
    rows = []
    for spec, preset, n in cases(sizes, losses):
        impls = ["torch", "fused"] + (["reference"] if world == 1 else [])
        for impl in impls:
            row = {"loss": spec.name, "impl": impl, "n": n, "preset": preset, "dtype": dtype,
                   "world_size": world, "rank": rank}
            try:
                row.update(measure_case(spec, impl, n, preset, dtype, rank, world, group))
                row["status"] = "ok"
            except Exception as exc:  # noqa: BLE001
                row.update(status="error", message=f"{type(exc).__name__}: {exc}"[:500])
            rows.append(row)
    with open(results, "wb") as f:
        pickle.dump(rows, f)
    if group is not None:
        dist.destroy_process_group()


def run(sizes=("quick", "default"), world_sizes=WORLD_SIZES, losses=LOSSES,
        dtype="float32") -> list[dict]:
    """Every case at every world size; a list of per-rank measurement dicts."""
    import torch.multiprocessing as mp

    rows = []
    for world in world_sizes:
        tmp = tempfile.mkdtemp(prefix="lossreg-dbench-")
        results = [os.path.join(tmp, f"rank-{r}.pickle") for r in range(world)]
        procs = [mp.get_context("spawn").Process(
            target=_rank, args=(r, world, os.path.join(tmp, "store"), sizes, losses, dtype,
                                results[r])) for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        for r, path in enumerate(results):
            if os.path.exists(path):
                with open(path, "rb") as f:
                    rows += pickle.load(f)
            else:
                print(f"world {world}: rank {r} wrote nothing (exit {procs[r].exitcode})",
                      file=sys.stderr)
    return rows


def write(rows: list[dict], out: str | os.PathLike) -> Path:
    """One Parquet run of the results schema (check ``throughput``, mode ``full``)."""
    import lossreg
    from lossreg.planning import Task
    from lossreg.results import ResultWriter
    from lossreg.rows import base_row, run_context

    context = run_context("cpu", "cpu")
    table = []
    for m in rows:
        spec = lossreg.get(m["loss"])
        task = Task(spec, spec.implementations[m["impl"]], m["dtype"], m["n"], m["preset"])
        row = base_row(context, task, dict(spec.options))
        row.update({k: v for k, v in m.items() if k not in ("preset", "loss", "impl", "dtype",
                                                            "n")},
                   check="throughput", mode="full", rounds=1)
        table.append(row)
    writer = ResultWriter(out, context["run_id"])
    writer.write(table)
    return writer.finish()


def summarize(df) -> str:
    """Per loss, impl, size and world size: the largest per-rank peak against the same
    implementation's and the reference's single-device peak, time and bytes per step."""
    lines = ["loss | impl | n | world | max rank peak MiB | vs same impl ws1 | vs reference "
             "ws1 | ms/step | comm bytes/step (per rank) | bytes / token"]
    ok = df[df["status"] == "ok"]
    for (loss, n), g in ok.groupby(["loss", "n"]):
        single = g[g["world_size"] == 1].set_index("impl")["peak_bytes"]
        ref = single.get("reference")
        for (impl, world), h in g[g["impl"] != "reference"].groupby(["impl", "world_size"]):
            peak = h["peak_bytes"].max()
            own = single.get(impl)
            comm = h["comm_bytes"].max()
            lines.append(
                f"{loss} | {impl} | {n} | {world} | {peak / 2**20:.2f} | "
                f"{peak / own:.3f}x | {peak / ref:.3f}x | {h['time_ms'].max():.2f} | "
                f"{comm} | {comm / n:.1f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="results/distributed")
    p.add_argument("--sizes", nargs="+", default=["quick", "default"])
    p.add_argument("--world-sizes", nargs="+", type=int, default=list(WORLD_SIZES))
    p.add_argument("--losses", nargs="+", default=list(LOSSES))
    args = p.parse_args(argv)
    rows = run(args.sizes, args.world_sizes, args.losses)
    path = write(rows, args.out)
    import lossreg

    print(summarize(lossreg.load_results(path)))
    print(f"-> {path}")
    print(json.dumps({"rows": len(rows)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
