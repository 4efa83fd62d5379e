"""Devices, timing, peak memory and copy bandwidth."""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import signal
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch


class DeviceError(ValueError):
    """The requested device is not usable here."""


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu'; validate the others."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return "cpu"
    if device == "cuda" or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {device}: no CUDA GPU is visible to torch")
        return device
    raise DeviceError(f"unknown device {device!r}: expected auto, cpu or cuda")


def device_type(device: str) -> str:
    return torch.device(device).type


def device_name(device: str) -> str:
    if device_type(device) == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def synchronize(device: str) -> None:
    if device_type(device) == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    repeats: int
    samples: list[float] = field(default_factory=list, repr=False)

    @classmethod
    def of(cls, samples: list[float]) -> "Timing":
        """Median and p20/p80 of the samples (milliseconds)."""
        return cls(statistics.median(samples), _quantile(samples, 0.2),
                   _quantile(samples, 0.8), len(samples), list(samples))


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def time_calls(
    device: str,
    run: Callable[[int], Callable[[], object]],
    budget_s: float = 0.2,
    min_repeats: int = 5,
    max_repeats: int = 200,
    warmup: int = 2,
    repeats: int | None = None,
    cheap_min: tuple[int, float] | None = None,
) -> Timing:
    """Time ``run(i)()`` for rotating i: ``run(i)`` does untimed set-up (e.g. a forward
    pass before timing a backward) and returns the callable to time.

    CUDA events on a GPU, a synchronized ``perf_counter`` around each call on a CPU. The number of
    repeats fills ``budget_s`` after warm-up, within [min_repeats, max_repeats], unless
    ``repeats`` fixes it (a later timing round of a case repeats the first round's count).
    ``cheap_min = (k, seconds)`` raises the floor towards k repeats as far as they fit
    in ``seconds`` (a call of a third of ``seconds`` or less gets k): a p20-p80 band
    of a handful of samples is mostly chance, and short calls make more samples cheap.
    """
    cuda = device_type(device) == "cuda"
    for i in range(warmup):
        run(i)()
    synchronize(device)

    def once(i: int) -> float:
        fn = run(i)
        synchronize(device)
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    if repeats is None:
        first = once(0)
        if first > 1e3:  # calls over a second: three samples give a median, and save minutes
            min_repeats = min(min_repeats, 3)
        if cheap_min is not None:
            k, seconds = cheap_min
            min_repeats = max(min_repeats, min(k, int(seconds * 1e3 / max(first, 1e-3))))
        repeats = int(min(max_repeats, max(min_repeats, budget_s * 1e3 / max(first, 1e-3))))
    elif repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    if cuda:
        # Like triton.testing.do_bench: no host sync between repeats, so the host
        # queues work ahead and the events time the GPU, not Python's launch overhead
        # (unless the implementation is launch-bound, which then shows).
        pairs = []
        for i in range(1, repeats + 1):
            fn = run(i)
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            pairs.append((start, end))
        synchronize(device)
        samples = [s.elapsed_time(e) for s, e in pairs]
    else:
        samples = [once(i) for i in range(1, repeats + 1)]
    return Timing.of(samples)


# glibc's mallopt parameters (malloc.h) and its defaults
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
_MMAP_THRESHOLD_MAX = 32 << 20  # the largest threshold glibc accepts on 64-bit
_DEFAULT_MMAP_MAX = 65536


@functools.cache  # looked up once: heap_only runs around every timed block
def _glibc():
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.mallopt, libc.malloc_trim  # noqa: B018 - both must exist
        return libc
    except (OSError, AttributeError):
        return None


def steady_cpu_allocator() -> bool:
    """Fix glibc's mmap threshold at its 32 MiB maximum for the rest of the process.
    True if it was set (glibc only).

    Why: glibc moves the line between blocks served from its heap and blocks given a
    fresh mmap from the sizes the process freed before, so the same case would be
    timed with or without page faults in different runs (docs/measurement.md)."""
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and \
        bool(libc.mallopt(_M_TRIM_THRESHOLD, 8 * _MMAP_THRESHOLD_MAX))


@contextlib.contextmanager
def heap_only():
    """While timing on a CPU: every block from glibc's heap, none from a fresh mmap;
    afterwards mmaps are allowed again and the freed heap pages go back to the system.

    Why: blocks over 32 MiB always get a fresh mmap, and faulting their pages in costs
    a different amount in each process on a VM. Only around the timed calls, which
    allocate the same sizes again and again: a whole run served from the heap keeps
    every freed block (docs/measurement.md)."""
    libc = _glibc()
    if libc is None:
        yield
        return
    libc.mallopt(_M_MMAP_MAX, 0)
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
        libc.malloc_trim(0)


@contextlib.contextmanager
def _quiet_stderr():
    """The profiler's native side prints start/stop lines on fd 2; keep them off the terminal."""
    try:
        fd = os.dup(2)
    except OSError:
        yield
        return
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(fd, 2)
            os.close(fd)


@contextlib.contextmanager
def _signals_held(*signums: int):
    """Hold these signals until the block ends, then deliver them to their handlers.

    Why: torch's profiler does not survive an exception raised inside it by a signal
    handler (Ctrl-C's KeyboardInterrupt, SIGALRM): it segfaults or hangs
    (docs/measurement.md). The block is one call of a loss, so the wait is short."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = {n: signal.signal(n, lambda signum, frame: pending.append(signum))
                for n in signums}
    try:
        yield
    finally:
        for n, handler in previous.items():
            signal.signal(n, handler)
    for n in dict.fromkeys(pending):
        handler = previous[n]
        if callable(handler):
            handler(n, None)
        elif handler == signal.SIG_DFL and n == signal.SIGINT:
            raise KeyboardInterrupt


def cpu_peak_bytes(fn: Callable[[], object]) -> int:
    """Peak rise of live CPU tensor memory while `fn` runs.

    The profiler's memory events record every allocation and free of torch's CPU
    allocator with its size; the running sum of those deltas, in time order, peaks at
    the answer. Memory freed during `fn` that was allocated before it counts as a
    negative delta and never raises the peak.
    """
    from torch.profiler import ProfilerActivity, profile

    with _signals_held(signal.SIGINT, signal.SIGALRM), _quiet_stderr(), \
            profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    ]
    current = peak = 0
    for _, nbytes in sorted(events, key=lambda ev: ev[0]):
        current += nbytes
        peak = max(peak, current)
    return int(peak)


def peak_bytes(device: str, fn: Callable[[], object]) -> int:
    """Rise of peak allocated memory above the pre-call baseline while `fn` runs."""
    if device_type(device) == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - base)
    return cpu_peak_bytes(fn)


def copy_bandwidth_gbps(device: str, nbytes: int | None = None) -> float:
    """Measured device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    cuda = device_type(device) == "cuda"
    nbytes = nbytes or (1 << 30 if cuda else 1 << 26)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = time_calls(device, lambda i: (lambda: dst.copy_(src)), budget_s=0.2, min_repeats=5,
                   max_repeats=50)
    best = t.p20_ms
    return 2 * nbytes / (best * 1e-3) / 1e9
