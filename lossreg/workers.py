"""The execution layer's worker processes and their supervision.

Every case runs in a worker process that this module starts and watches; the parent
never runs an implementation (nor initialises CUDA). A worker is started once and runs
case after case, so its start-up (Python, torch, the plugins' modules) is paid once
per worker, not per case. When a worker dies by a signal (a segfault, an abort, the
kernel's out-of-memory killer), exits, or outlives the job's time limit, the job gets a
failure that names what happened (``killed by SIGSEGV``, ``exceeded 120 s``), the
worker is gone, and the next job starts a fresh one.

How a worker is started: ``python -m lossreg.workers FD``, a fresh interpreter (no
fork: a forked child of a process whose OpenMP threads have run, as a test process's
have, hangs in its first parallel region), talking to the parent over a socket pair
with `multiprocessing.connection`. The parent sends the worker ``sys.path`` and then,
pickled with cloudpickle, its set-up (``init``, its arguments and the job ``handler``):
so the losses of a registry built in the parent process (a notebook's, a test's) reach
the worker without being importable from an entry point.

Why not a pool library: pebble's ProcessPool (per-task timeouts) reports a worker
that dies with exit status 0 as nothing at all, leaving its task waiting forever when
there is no time limit, and it keeps three manager threads in the parent that wake
every 0.1 s while we time; loky's executor has no per-task time limit and treats a
dead worker as a broken executor. What we need is small: one worker at a time (timings
want a quiet machine), a job at a time, its messages as they come, and the exact cause
when it ends badly.
"""

from __future__ import annotations

import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from multiprocessing.connection import Connection, wait
from typing import Any, Callable

#: seconds a worker may take to start (import torch and the plugins' modules)
START_TIMEOUT_S = float(os.environ.get("LOSSREG_WORKER_START_TIMEOUT", "600"))


class WorkerStartError(RuntimeError):
    """A worker could not start (its set-up raised, or it died while starting)."""


def describe_exit(code: int | None) -> str:
    """``killed by SIGSEGV``, ``exited with status 3``: what ended a worker."""
    if code is None:
        return "stopped"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (the kernel's out-of-memory killer sends it)" if name == "SIGKILL" else ""
        return f"killed by {name}{hint}"
    return f"exited with status {code}"


class Worker:
    """One worker process; `run` sends it a job and waits for the outcome."""

    def __init__(self, init: Callable, init_args: tuple, handler: Callable):
        import cloudpickle

        self.setup = cloudpickle.dumps((init, init_args, handler))
        self.proc: subprocess.Popen | None = None
        self.conn: Connection | None = None
        self.info: Any = None
        self._pidfd: int | None = None

    def start(self) -> Any:
        """Start the process and wait until its set-up is done; returns what ``init``
        said about it (``info``)."""
        ours, theirs = socket.socketpair()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "lossreg.workers", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL)
        finally:
            theirs.close()
        self.conn = Connection(ours.detach())
        try:
            self._pidfd = os.pidfd_open(self.proc.pid)
        except (AttributeError, OSError):
            self._pidfd = None
        self.conn.send(list(sys.path))
        self.conn.send_bytes(self.setup)
        kind, payload = self._receive(START_TIMEOUT_S, None)
        if kind != "ready":
            self.stop()
            raise WorkerStartError(f"a worker process could not start: {payload}")
        self.info = payload
        return payload

    def run(self, job: Any, timeout: float | None,
            on_message: Callable[[Any], None]) -> tuple[Any, str | None]:
        """``(result, None)``, or ``(None, failure)`` when the job raised outside the
        handler's own error handling, the worker died or it ran past ``timeout``
        seconds (the worker is then gone)."""
        self.conn.send(job)
        kind, payload = self._receive(timeout, on_message)
        if kind == "done":
            return payload, None
        if kind == "raised":
            return None, payload
        return None, payload  # died or timed out: _receive stopped the worker

    def _receive(self, timeout: float | None, on_message) -> tuple[str, Any]:
        deadline = None if not timeout else time.monotonic() + timeout
        watch = [self.conn] + ([self._pidfd] if self._pidfd is not None else [])
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                self.stop()
                return "failed", f"exceeded {timeout:g} s"
            ready = wait(watch, left if self._pidfd is not None else min(left or 1.0, 1.0))
            if self.conn in ready or self.conn.poll():
                try:
                    kind, payload = self.conn.recv()
                except (EOFError, OSError):
                    return "failed", self._died()
                if kind == "msg":
                    if on_message is not None:
                        on_message(payload)
                    continue
                return kind, payload
            if ready or self.proc.poll() is not None:
                return "failed", self._died()

    def _died(self) -> str:
        code = self.proc.wait()
        self.stop()
        return describe_exit(code)

    def stop(self) -> None:
        """End the process (kill it if it still runs) and release its handles."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait()
        if self.conn is not None:
            self.conn.close()
        if self._pidfd is not None:
            os.close(self._pidfd)
        self.proc = self.conn = self._pidfd = None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class Pool:
    """Supervised workers, one at a time: `run` starts one when none is running, and a
    worker that failed a job is replaced by a fresh one at the next job. `fresh` asks
    for a new process for the next job (a later timing round)."""

    def __init__(self, init: Callable, init_args: tuple, handler: Callable):
        self.init, self.init_args, self.handler = init, init_args, handler
        self.worker: Worker | None = None
        self.started = 0  # worker processes started so far
        self.start_seconds = 0.0  # their start-up time, all together

    def run(self, job: Any, timeout: float | None = None,
            on_message: Callable[[Any], None] | None = None) -> tuple[Any, str | None]:
        if self.worker is None or not self.worker.alive:
            self.start()
        result, failure = self.worker.run(job, timeout, on_message)
        if failure is not None and not self.worker.alive:
            self.worker = None
        return result, failure

    def start(self) -> Any:
        self.close()
        t0 = time.monotonic()
        worker = Worker(self.init, self.init_args, self.handler)
        info = worker.start()
        self.worker = worker
        self.started += 1
        self.start_seconds += time.monotonic() - t0
        return info

    def fresh(self) -> None:
        self.close()

    def close(self) -> None:
        if self.worker is not None:
            self.worker.stop()
            self.worker = None


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when the parent dies (a SIGKILLed bench leaves no
    worker running on)."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _serve(conn: Connection) -> int:
    sys.path[:] = conn.recv()
    try:
        init, init_args, handler = pickle.loads(conn.recv_bytes())
        state, info = init(*init_args)
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which says so
        conn.send(("failed", f"{type(exc).__name__}: {exc}"))
        return 1
    conn.send(("ready", info))
    while True:
        try:
            job = conn.recv()
        except EOFError:  # the parent closed the connection: no more work
            return 0
        try:
            result = handler(state, job, lambda message: conn.send(("msg", message)))
        except Exception as exc:  # noqa: BLE001 - the job fails, the worker serves on
            conn.send(("raised", f"{type(exc).__name__}: {exc}"))
            continue
        conn.send(("done", result))


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not argv[0].isdigit():
        print("usage: python -m lossreg.workers FD (started by lossreg's harness)",
              file=sys.stderr)
        return 2
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    return _serve(Connection(int(argv[0])))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
