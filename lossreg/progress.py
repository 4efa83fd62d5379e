"""Progress of a whole run, wherever its output goes.

Public API::

    Progress(total, *, stream=None, label="", clock=time.monotonic, heartbeat=30.0,
             ticker=True)
        .case_started(name)          optional: the case now running (shown, and named
                                     by the heartbeat line while it runs)
        .case_done(name, status)     one case finished with status ok/fail/error/skipped
        .close()                     end the bar or the ticker; safe to call twice
        .format_duration(seconds)    "45s", "3m07s", "1h02m" (module function too)

``total`` counts every step of the run, all timing rounds included, so the counter
never restarts. On a terminal (``stream.isatty()``) one tqdm bar shows done/total,
elapsed time, ETA and the last finished case. Anywhere else (a pipe, a log file, CI)
each finished case prints one line -- done/total, status, name, elapsed, ETA -- and a
background thread prints a heartbeat line whenever ``heartbeat`` seconds pass with no
line, naming the case still running, so a long case never leaves the log silent.
``clock`` is injectable (tests drive `tick` by hand with ``ticker=False``).
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Callable, TextIO

__all__ = ["Progress", "format_duration"]


def format_duration(seconds: float | None) -> str:
    """A short human duration: 45s, 3m07s, 1h02m; '?' when unknown."""
    if seconds is None or seconds != seconds or seconds < 0:
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


class Progress:
    """One progress display for a whole run (see the module docstring)."""

    def __init__(self, total: int, *, stream: TextIO | None = None, label: str = "",
                 clock: Callable[[], float] = time.monotonic, heartbeat: float = 30.0,
                 ticker: bool = True):
        if isinstance(total, bool) or not isinstance(total, int) or total < 0:
            raise ValueError(f"Progress total must be a whole number >= 0, got {total!r}")
        if not heartbeat > 0:
            raise ValueError(f"Progress heartbeat must be a positive number of seconds, "
                             f"got {heartbeat!r}")
        self.total = total
        self.done = 0
        self.stream = stream if stream is not None else sys.stderr
        self.label = label
        self.clock = clock
        self.heartbeat = float(heartbeat)
        self.start = clock()
        self.current: str | None = None
        self._current_since = self.start
        self._last_line = self.start
        self._lock = threading.Lock()
        self._closed = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._bar = None
        isatty = getattr(self.stream, "isatty", None)
        self.tty = bool(isatty()) if callable(isatty) else False
        if self.tty:
            from tqdm import tqdm

            self._bar = tqdm(total=total, file=self.stream, desc=f"{label}: " if label else None, unit="case",
                             dynamic_ncols=True, disable=False, leave=True,
                             bar_format="{desc}{percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} "
                                        "[{elapsed} elapsed, ETA {remaining}]{postfix}")
            self._bar._time = clock  # elapsed and ETA from the injected clock
            self._bar.reset(total)
        elif ticker:
            self._thread = threading.Thread(target=self._tick_loop, name="lossreg-progress",
                                            daemon=True)
            self._thread.start()

    # ------------------------------------------------------------ reporting
    def elapsed(self) -> float:
        return self.clock() - self.start

    def eta(self) -> float | None:
        """Seconds left at the mean pace of the steps done so far (None before the first)."""
        if self.done == 0:
            return None
        return self.elapsed() / self.done * max(self.total - self.done, 0)

    def case_started(self, name: str) -> None:
        with self._lock:
            self.current = name
            self._current_since = self.clock()
            if self._bar is not None:
                self._bar.set_postfix_str(f"running {name}", refresh=False)

    def case_done(self, name: str, status: str) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError("Progress.case_done after close()")
            self.done += 1
            if self.current == name:
                self.current = None
            if self._bar is not None:
                self._bar.set_postfix_str(f"{status} {name}", refresh=False)
                self._bar.update(1)
                return
            self._line(f"{status:<7} {name}")

    def tick(self) -> bool:
        """Print a heartbeat line if ``heartbeat`` seconds passed since the last line
        (pipe mode only); True if it printed. The ticker thread calls this."""
        with self._lock:
            if self._closed or self._bar is not None:
                return False
            now = self.clock()
            if now - self._last_line < self.heartbeat:
                return False
            what = (f"running {self.current} for "
                    f"{format_duration(now - self._current_since)}"
                    if self.current else "working")
            self._line(what)
            return True

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._bar is not None:
                self._bar.close()
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------ internals
    def _line(self, what: str) -> None:
        """One pipe-mode line (the caller holds the lock)."""
        prefix = f"{self.label}: " if self.label else ""
        width = len(str(self.total))
        self.stream.write(f"{prefix}[{self.done:>{width}}/{self.total}] {what}  "
                          f"elapsed {format_duration(self.elapsed())}  "
                          f"ETA {format_duration(self.eta())}\n")
        self.stream.flush()
        self._last_line = self.clock()

    def _tick_loop(self) -> None:
        # wake often enough that a heartbeat is at most a second late
        period = min(1.0, self.heartbeat / 4)
        while not self._stop.wait(period):
            try:
                self.tick()
            except (OSError, ValueError):  # the stream went away (closed pipe)
                return
