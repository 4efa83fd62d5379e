"""Running one function on every rank of a process group, for the distributed checks
and benchmarks: `spawn` starts ``world`` gloo ranks on this machine (fresh
interpreters, rendezvous on a TCP store this process holds on a free port) and
`in_job` runs this process as the rank torchrun made it (NCCL on GPUs).

The function, ``work(tasks, context, rank, world, group, device, send)``, goes through
the cases in the same order on every rank and calls ``send(i, rows)`` after case i.
A spawned rank appends each ``(i, rows)`` to its own file, so a rank that dies loses
only the case it was in; a rank that dies stops the others at once (they would wait
for it in their next collective), one that hangs is killed at ``timeout``, and the
cases they did not finish become ``error`` rows naming the rank and what happened.
"""

from __future__ import annotations

import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist

from . import stopping
from .planning import Task
from .rows import base_row
from .workers import describe_exit

Work = Callable[..., None]


class RanksInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM while ranks ran: they were stopped. ``rows`` holds what each
    rank had finished; ``done`` of ``total`` cases were finished on every rank."""

    def __init__(self, rows: list[dict], done: int, total: int, signum: int):
        super().__init__(f"interrupted after {done} of {total} cases")
        self.rows, self.done, self.total, self.signum = rows, done, total, signum


def rank_entry(argv: list[str]) -> None:
    """A spawned rank: ``payload rank world host port pg_timeout results``; appends
    ``(case index, rows)`` to its results file after every case, ``(None, None)`` last."""
    import cloudpickle

    path, rank, world, host, port, pg_timeout, results = argv
    rank, world, port, pg_timeout = int(rank), int(world), int(port), float(pg_timeout)
    with open(path, "rb") as f:
        work, tasks, context, device = cloudpickle.load(f)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    store = dist.TCPStore(host, port, world + 1, False, timeout=timedelta(seconds=pg_timeout))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                            timeout=timedelta(seconds=pg_timeout))
    with open(results, "ab") as out:
        def send(i, rows):
            pickle.dump((i, rows), out)
            out.flush()

        try:
            work(tasks, context, rank, world, dist.group.WORLD, device, send)
        finally:
            send(None, None)
    dist.destroy_process_group()


def _ordered(got: dict) -> list[dict]:
    """The rows of ``{(rank, case): rows}`` in (case, rank) order."""
    return [row for key in sorted(got, key=lambda k: (k[1], k[0])) for row in got[key]]


def _read(path: str) -> list[tuple]:
    records = []
    try:
        with open(path, "rb") as f:
            while True:
                records.append(pickle.load(f))
    except (EOFError, pickle.UnpicklingError, OSError):
        pass  # the end, or a record cut short by a dying rank
    return records


def missing_rows(tasks: list[Task], context: dict, got: dict, world: int, why: dict,
                 check: str = "correctness", mode: str = "forward") -> list[dict]:
    """An ``error`` row per (rank, case) that never reported, saying why."""
    rows = []
    for r in range(world):
        for i, task in enumerate(tasks):
            if (r, i) in got:
                continue
            row = base_row(context, task, dict(task.spec.options))
            row.update(check=check, mode=mode, status="error",
                       message=f"rank {r} of {world} {why.get(r, 'did not report')} before "
                               "finishing this case", world_size=world, rank=r)
            rows.append(row)
    return rows


class _Watch:
    """Tells a progress display (`lossreg.progress.Progress`) each case that every rank
    has finished, from the ranks' results files (re-read only when one grew)."""

    def __init__(self, shown, tasks: list[Task], results: list[str], world: int):
        self.shown, self.tasks, self.results, self.world = shown, tasks, results, world
        self.sizes, self.done = [0] * world, 0
        if shown is not None and tasks:
            shown.case_started(self._name(0))

    def _name(self, i: int) -> str:
        t = self.tasks[i]
        return f"{t.spec.name} {t.impl.name} {t.dtype} {t.spec.x_name}={t.n} x{self.world} ranks"

    def poll(self) -> None:
        sizes = [os.path.getsize(p) if os.path.exists(p) else 0 for p in self.results]
        if self.shown is None or sizes == self.sizes:
            return
        self.sizes = sizes
        got = {(r, i): rows for r in range(self.world) for i, rows in _read(self.results[r])}
        while self.done < len(self.tasks) and all((r, self.done) in got
                                                  for r in range(self.world)):
            statuses = {row.get("status") for r in range(self.world)
                        for row in got[(r, self.done)]}
            self.shown.case_done(self._name(self.done), next(
                (s for s in ("error", "fail", "ok") if s in statuses), "skipped"))
            self.done += 1
            if self.done < len(self.tasks):
                self.shown.case_started(self._name(self.done))


def spawn(work: Work, tasks: list[Task], context: dict, world: int, device: str,
          timeout: float, shown=None) -> tuple[dict, dict]:
    """Run ``work`` on ``world`` gloo ranks spawned here. Returns ``({(rank, i): rows},
    {rank: why it stopped early})``; ``timeout`` bounds the whole run. Ctrl-C or
    SIGTERM stops the ranks and raises `RanksInterrupted` with the finished rows.
    ``shown``: a progress display told of each case every rank has finished."""
    import cloudpickle

    host = "127.0.0.1"
    pg_timeout = max(5.0, min(timeout, 60.0))
    store = dist.TCPStore(host, 0, world + 1, True, timeout=timedelta(seconds=pg_timeout),
                          wait_for_workers=False)
    tmp = tempfile.mkdtemp(prefix="lossreg-ranks-")
    payload = os.path.join(tmp, "payload.pickle")
    with open(payload, "wb") as f:
        cloudpickle.dump((work, tasks, context, device), f)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    code = "import sys; from lossreg.ranks import rank_entry; rank_entry(sys.argv[1:])"
    results = [os.path.join(tmp, f"rank-{r}.pickle") for r in range(world)]
    procs = [subprocess.Popen([sys.executable, "-c", code, payload, str(r), str(world), host,
                               str(store.port), str(pg_timeout), results[r]], env=env)
             for r in range(world)]
    deadline = time.monotonic() + timeout
    why: dict[int, str] = {}
    stopped_by = None
    watch = _Watch(shown, tasks, results, world)
    previous = stopping.on_sigterm()
    try:
        while time.monotonic() < deadline and any(p.poll() is None for p in procs):
            dead = [r for r, p in enumerate(procs) if p.poll() not in (None, 0)]
            if dead:  # the others would wait for it in their next collective
                for r, p in enumerate(procs):
                    if p.poll() is None:
                        why[r] = (f"was stopped: rank {dead[0]} "
                                  f"{describe_exit(procs[dead[0]].returncode)}")
                break
            watch.poll()
            time.sleep(0.2)
        watch.poll()
    except KeyboardInterrupt as exc:  # the ranks go with this run, what they wrote stays
        stopped_by = getattr(exc, "signum", signal.SIGINT)
    finally:
        stopping.restore_sigterm(previous)
        for r, p in enumerate(procs):
            if p.poll() is None:
                why.setdefault(r, f"hung: still running after the {timeout:g} s timeout")
                p.kill()
            p.wait()
            if p.returncode != 0 and r not in why:
                why[r] = describe_exit(p.returncode)
        del store
    got = {(r, i): rows for r in range(world) for i, rows in _read(results[r])
           if i is not None}
    shutil.rmtree(tmp, ignore_errors=True)
    if stopped_by is not None:
        done = sum(all((r, i) in got for r in range(world)) for i in range(len(tasks)))
        raise RanksInterrupted(_ordered(got), done, len(tasks), stopped_by)
    return got, why


def in_job(work: Work, tasks: list[Task], context: dict, rank: int, device: str) -> list[dict]:
    """Run ``work`` as this rank of a torchrun job; rank 0 gets every rank's rows, the
    others their own."""
    if device.startswith("cuda"):  # NCCL's own buffers and gather_object use this device
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    world = dist.get_world_size()
    mine: list[dict] = []
    work(tasks, context, rank, world, dist.group.WORLD, device,
         lambda i, rows: mine.extend(rows))
    parts = [None] * world if rank == 0 else None
    dist.gather_object(mine, parts, dst=0)
    if rank != 0:
        return mine
    # one run: rank 0's id and start time on every row (each rank drew its own)
    return [{**r, "run_id": context["run_id"], "timestamp": context["timestamp"]}
            for p in parts for r in p]


def spawned_rows(work: Work, tasks: list[Task], context: dict, world: int, device: str,
                 timeout: float, check: str = "correctness", mode: str = "forward",
                 shown=None):
    """`spawn`, then every row in (case, rank) order plus the missing ones."""
    got, why = spawn(work, tasks, context, world, device, timeout, shown)
    return _ordered(got) + missing_rows(tasks, context, got, world, why, check, mode)
