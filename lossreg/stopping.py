"""SIGTERM (what `timeout`, schedulers and torchrun send) ends a run the way Ctrl-C does:
as a KeyboardInterrupt that says which signal it was, so the run can keep what it
finished and say where."""

from __future__ import annotations

import signal
import threading


class Terminated(KeyboardInterrupt):
    signum = signal.SIGTERM


def on_sigterm():
    """Raise `Terminated` on SIGTERM from now on (main thread only); returns the
    handler to give back to `restore_sigterm`, None where nothing was changed."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def raise_terminated(signum, frame):
        raise Terminated()

    return signal.signal(signal.SIGTERM, raise_terminated)


def restore_sigterm(previous) -> None:
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)
