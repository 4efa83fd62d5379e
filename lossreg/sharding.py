"""Sharded benchmark runs: under ``torchrun`` every rank benches its share of the case
matrix on its own device, and rank 0 merges the shares into ONE run.

- `current` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
  LOCAL_WORLD_SIZE); `device_for` gives each rank its device (``cuda:LOCAL_RANK``).
- `select` splits the tasks by cost, longest first onto the least loaded rank (the
  same answer on every rank, no communication). A loss's implementations at one
  dtype and size stay together, so each row's speedup has its reference beside it.
- `run_sharded` starts a gloo group (only small Python objects travel over it), agrees
  on a run id, runs the bench on each rank into ``<out>/_rank-R/`` (hidden from
  ``load_results(out)`` while the run goes), then rank 0 waits for the others, writes
  ``<out>/run-<run_id>.parquet`` with every case exactly once (``rank`` says who
  measured it, ``world_size`` how many shared the run), and plots it. A rank whose
  bench raised, or that never reported within ``barrier_timeout``, loses only its
  cases not yet written: they become ``error`` rows naming the rank.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Sequence

ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
#: seconds rank 0 waits for the other ranks after finishing its own share
BARRIER_TIMEOUT_S = float(os.environ.get("LOSSREG_SHARD_TIMEOUT", 6 * 3600))


@dataclass(frozen=True)
class RankInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int


def current(environ: dict | None = None) -> RankInfo | None:
    """This process's place in a torchrun job, or None when not started by one."""
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" not in env or "RANK" not in env:
        return None
    try:
        world, rank = int(env["WORLD_SIZE"]), int(env["RANK"])
        local = int(env.get("LOCAL_RANK", rank))
        local_world = int(env.get("LOCAL_WORLD_SIZE", world))
    except ValueError as exc:
        raise ValueError(f"torchrun environment is malformed ({exc}): RANK, WORLD_SIZE, "
                         "LOCAL_RANK and LOCAL_WORLD_SIZE must be whole numbers") from None
    if not 0 <= rank < world or not 0 <= local < local_world:
        raise ValueError(f"torchrun environment is inconsistent: RANK={rank} of "
                         f"WORLD_SIZE={world}, LOCAL_RANK={local} of {local_world}")
    return RankInfo(rank, world, local, local_world)


def device_for(info: RankInfo | None, device: str = "auto") -> str:
    """``cuda:LOCAL_RANK`` for GPU runs (``auto`` with a GPU visible), else ``cpu``."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and info is not None:
        return f"cuda:{info.local_rank}"
    return device


def group_key(task) -> tuple:
    return (task.spec.name, task.dtype, task.n)


def default_cost(task) -> float:
    """A case's relative cost: the cost model's (``planning.case_cost``) once it exists,
    else its size times the preset's numeric input parameters (vocab, hidden, ...)."""
    from . import planning

    model = getattr(planning, "case_cost", None)
    if model is not None:
        return float(model(task))
    work = float(task.n)
    for v in task.spec.input_params.get(task.preset, {}).values():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0:
            work *= v
    return 1e4 + work


def select(tasks: Sequence, cost: Callable[[Any], float] | None, info: RankInfo) -> list:
    """This rank's tasks: groups (a loss at one dtype and size, all its implementations)
    assigned longest first to the least loaded rank; deterministic, so every rank
    computes the same split and each task lands on exactly one rank. Order kept."""
    cost = cost or default_cost
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(tasks):
        groups.setdefault(group_key(t), []).append(i)
    weights = {k: sum(cost(tasks[i]) for i in idx) for k, idx in groups.items()}
    order = sorted(groups, key=lambda k: (-weights[k], groups[k][0]))
    load = [0.0] * info.world_size
    owner = {}
    for k in order:
        r = min(range(info.world_size), key=lambda j: (load[j], j))
        owner[k] = r
        load[r] += weights[k]
    return [t for t in tasks if owner[group_key(t)] == info.rank]


# ---------------------------------------------------------------- the run
#: what makes a row one row of a run: a loss x impl x dtype x size case's check and mode
#: with its params. Every rank runs the edge cases and gradcheck of the losses in its
#: share and writes the plan's skipped rows; the run keeps one of each.
DEDUP_KEY = ["loss", "impl", "dtype", "n", "check", "mode", "params"]


def _rank_dir(out: Path, rank: int) -> Path:
    return out / f"_rank-{rank}"


def _init_group(timeout: float):
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=timedelta(seconds=timeout))
    return dist


def run_sharded(bench_fn: Callable[..., Any], *, out: str | os.PathLike = "results",
                cost: Callable[[Any], float] | None = None, plots: bool = True,
                barrier_timeout: float | None = None, **kwargs):
    """Run ``bench_fn`` (``lossreg.api.bench``'s signature) as this torchrun rank's share,
    then (rank 0) consolidate every rank's rows into one run under ``out``. Returns
    rank 0's consolidated DataFrame (other ranks: their own rows). Without torchrun it
    is ``bench_fn(out=out, **kwargs)``."""
    info = current()
    if info is None:
        return bench_fn(out=out, plots=plots, **kwargs)
    from .rows import new_run_id

    out = Path(out)
    wait = BARRIER_TIMEOUT_S if barrier_timeout is None else barrier_timeout
    dist = _init_group(wait)
    box = [new_run_id() if info.rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    run_id = box[0]
    kwargs["device"] = device_for(info, kwargs.get("device", "auto"))
    seen: dict[str, list] = {}

    def pick(tasks):
        seen["all"] = list(tasks)
        return select(tasks, cost, info)

    mine = _rank_dir(out, info.rank)
    error = None
    df = None
    store = dist.distributed_c10d._get_default_store()
    try:
        df = bench_fn(out=mine, run_id=run_id, select=pick, consolidate=False, plots=False,
                      row_extra={"rank": info.rank, "world_size": info.world_size}, **kwargs)
        _write_final(df, mine, run_id)
    except KeyboardInterrupt as stop:  # Ctrl-C, or torchrun ending the job: a rank failed
        if info.rank == 0:
            sig = signal.Signals(getattr(stop, "signum", signal.SIGINT)).name
            merged = salvage(out, run_id, seen.get("all", []), info.world_size, store,
                             f"stopped by {sig}", cost)
            stop.rows, stop.location = len(merged), out / f"run-{run_id}.parquet"
        raise
    except Exception as exc:  # noqa: BLE001 - this rank's cases become error rows
        from .rows import error_message

        error = error_message(exc)
    store.set(_done_key(run_id, info.rank), error or "ok")
    if info.rank != 0:
        return df
    status = _wait_for(store, run_id, info.world_size, wait)
    merged = consolidate(out, run_id, seen.get("all", []), info.world_size, status, cost)
    if plots and len(merged):
        from .plots import plot_run

        plot_run(merged, out / "plots" / f"_{run_id}")
    merged.attrs.update(run_id=run_id, location=str(out / f"run-{run_id}.parquet"))
    return merged


def _write_final(df, folder: Path, run_id: str) -> None:
    """This rank's rows after all timing rounds (the part files hold the first round)."""
    from .results import to_table, write_atomic

    folder.mkdir(parents=True, exist_ok=True)
    rows = df.to_dict("records") if len(df) else []
    write_atomic(to_table([{k: (None if _isnull(v) else v) for k, v in r.items()}
                           for r in rows]), folder / f"final-{run_id}.parquet")


def _isnull(v) -> bool:
    import pandas as pd

    try:
        return bool(pd.isna(v))
    except (TypeError, ValueError):
        return False


def _done_key(run_id: str, rank: int) -> str:
    return f"lossreg/{run_id}/done/{rank}"


def _reported(store, run_id: str, rank: int) -> str | None:
    """What ``rank`` reported at the end of its share ('ok' or its error), or None."""
    key = _done_key(run_id, rank)
    return store.get(key).decode() if store.check([key]) else None


def _wait_for(store, run_id: str, world: int, timeout: float) -> dict[int, str]:
    """rank -> 'ok', the error its bench raised, or that it never reported."""
    status: dict[int, str] = {}
    end = time.monotonic() + timeout
    while len(status) < world and time.monotonic() < end:
        for r in range(world):
            if r not in status and (said := _reported(store, run_id, r)) is not None:
                status[r] = said
        time.sleep(0.2)
    for r in range(world):
        status.setdefault(r, f"did not report within {timeout:g} s")
    return status


def salvage(out: Path, run_id: str, tasks: Sequence, world: int, store, why: str,
            cost=None):
    """Rank 0 stopped mid-run (torchrun ends every rank when one fails, or Ctrl-C):
    one run anyway, from the rows every rank has written; the cases not written become
    error rows saying what stopped their rank."""
    status = {0: why}
    for r in range(1, world):
        try:
            status[r] = _reported(store, run_id, r)
        except Exception:  # noqa: BLE001 - the job's store may already be gone
            status[r] = None
        status[r] = status[r] or ("stopped before it finished: the job ended (torchrun "
                                  "stops every rank when one fails)")
    return consolidate(out, run_id, tasks, world, status, cost)


def _rank_rows(out: Path, rank: int, run_id: str):
    import pandas as pd

    from .results import load_results

    final = _rank_dir(out, rank) / f"final-{run_id}.parquet"
    if final.exists():
        return load_results(final)
    parts = _rank_dir(out, rank) / run_id
    if parts.exists() and any(parts.glob("part-*.parquet")):
        return load_results(parts)
    return pd.DataFrame()


def consolidate(out: Path, run_id: str, tasks: Sequence, world: int, status: dict[int, str],
                cost=None):
    """One run file from every rank's rows; error rows for the cases a failed rank
    never wrote. The rank folders go once the run file is in place."""
    import pandas as pd

    from .results import load_results, to_table, write_atomic
    from .rows import base_row, run_context

    frames = []
    for r in range(world):
        f = _rank_rows(out, r, run_id)
        if len(f):
            frames.append(f.assign(rank=r, world_size=world))
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if len(df):  # rows not tied to one case (edge cases, gradcheck, skipped) once
        df = df.drop_duplicates(DEDUP_KEY, keep="first").reset_index(drop=True)
    done = set()
    if len(df):
        done = set(zip(df["loss"], df["impl"], df["dtype"], df["n"]))
    missing = []
    context = None
    for r in range(world):
        if status.get(r) == "ok":
            continue
        share = select(tasks, cost, RankInfo(r, world, 0, 1))
        for t in share:
            if (t.spec.name, t.impl.name, t.dtype, t.n) in done:
                continue
            if context is None:
                first = df.iloc[0] if len(df) else None
                context = run_context(first["device_type"] if first is not None else "cpu",
                                      first["device_name"] if first is not None else None,
                                      run_id)
            row = base_row(context, t, dict(t.spec.options))
            row.update(check="throughput", mode="full", status="error", rank=r,
                       world_size=world, message=f"rank {r} of {world} lost this case: "
                                                 f"{status.get(r)}")
            missing.append(row)
    rows = df.to_dict("records") if len(df) else []
    rows = [{k: (None if _isnull(v) else v) for k, v in row.items()} for row in rows]
    final = out / f"run-{run_id}.parquet"
    write_atomic(to_table(rows + missing), final)
    for r in range(world):
        shutil.rmtree(_rank_dir(out, r), ignore_errors=True)
    return load_results(final)
