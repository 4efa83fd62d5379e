"""Running plugin code under a time limit: a plugin's import or hook that does not
return within ``LOSSREG_PLUGIN_TIMEOUT`` seconds is abandoned, and loading goes on."""

from __future__ import annotations

import os
import queue
import threading
from typing import Any, Callable

TIMEOUT_ENV = "LOSSREG_PLUGIN_TIMEOUT"
DEFAULT_TIMEOUT = 30.0


class PluginTimeout(TimeoutError):
    """A plugin's import or hook did not finish within the time limit."""


class _Worker:
    """One daemon thread that runs plugin code handed to it, one call at a time, so
    loading pays for one thread, not one per import and hook. A call that overruns
    its limit is abandoned together with its thread (daemon: it does not keep the
    process alive), and the next call starts a fresh one."""

    def __init__(self) -> None:
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._serve, name="lossreg-plugins", daemon=True).start()

    def _serve(self) -> None:
        _INSIDE.active = True
        while True:
            fn, box, done = self.jobs.get()
            try:
                box["value"] = fn()
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                box["error"] = exc
            done.set()

    def run(self, fn: Callable[[], Any], timeout: float) -> tuple[bool, dict]:
        box: dict[str, Any] = {}
        done = threading.Event()
        self.jobs.put((fn, box, done))
        return done.wait(timeout), box


#: ``active`` on the plugin thread: plugin code that loads plugins in turn (a hook
#: calling ``lossreg.get``) runs that inline instead of waiting on its own thread
_INSIDE = threading.local()
_WORKER: _Worker | None = None
_WORKER_LOCK = threading.Lock()


def _forget_worker() -> None:
    """A forked child has no plugin thread (only the forking thread survives a fork):
    it starts its own on demand."""
    global _WORKER, _WORKER_LOCK
    _WORKER, _WORKER_LOCK = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_worker)


def run_limited(fn: Callable[[], Any], timeout: float, what: str) -> Any:
    """``fn()`` on the plugin thread, waited for `timeout` seconds: its result, its
    exception, or PluginTimeout when it is still running then (0 or less: no limit,
    run here)."""
    global _WORKER
    if timeout <= 0 or getattr(_INSIDE, "active", False):
        return fn()
    with _WORKER_LOCK:
        worker = _WORKER = _WORKER or _Worker()
        finished, box = worker.run(fn, timeout)
        if not finished:
            _WORKER = None  # stuck in `fn`: abandoned
    if not finished:
        raise PluginTimeout(f"{what} did not finish within {timeout:g} s ({TIMEOUT_ENV})")
    if "error" in box:
        raise box["error"]
    return box.get("value")
