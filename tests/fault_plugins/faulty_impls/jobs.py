"""Jobs for the worker-supervision tests (`tests/test_faults.py`): `init` and `handle`
as `lossreg.workers.Pool` runs them, each job doing one thing a case can do to its
worker process."""

from __future__ import annotations

import ctypes
import os
import signal
import time


def init(tag):
    return {"tag": tag, "jobs": 0}, {"pid": os.getpid(), "tag": tag}


def handle(state, job, send):
    state["jobs"] += 1
    what = job["do"]
    if what == "echo":
        for i in range(job.get("messages", 0)):
            send(("progress", i))
        return {"pid": os.getpid(), "jobs": state["jobs"], "value": job.get("value")}
    if what == "segfault":
        ctypes.string_at(0)
    if what == "abort":
        os.abort()
    if what == "exit":
        os._exit(job.get("status", 0))
    if what == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if what == "sleep":
        send(("progress", "sleeping"))
        time.sleep(job["seconds"])
        return "woke"
    if what == "raise":
        raise ValueError("bad job")
    raise AssertionError(f"unknown job {what!r}")


def failing_init(tag):
    raise RuntimeError(f"cannot start {tag}")
