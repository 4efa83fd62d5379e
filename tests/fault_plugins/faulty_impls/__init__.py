"""A fixture plugin for the fault tests: a simple loss, ``faulty_sq`` (squared error),
whose implementations each fail in one way a third-party kernel can: segfault, abort,
exit, be killed (as by the kernel's out-of-memory killer), hang, ask for more memory
than any machine has, raise, return NaN or the wrong shape. One that works (``good``)
shows the loss itself is fine. `tests/test_faults.py` benches them next to ``mse``.

Installed for a test as the entry point ``faulty_impls`` (see `tests/conftest.py`'s
``make_dist``), with this folder's parent on ``sys.path``.
"""

from __future__ import annotations

import ctypes
import os
import signal
import time

import torch

from lossreg import Impl, LossSpec, hookimpl

LOSS = "faulty_sq"


def reference(input, target, reduction="mean"):
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be mean, sum or none, got {reduction!r}")
    t = (input - target) ** 2
    return t if reduction == "none" else (t.mean() if reduction == "mean" else t.sum())


def good(input, target, reduction="mean"):
    return torch.nn.functional.mse_loss(input, target, reduction=reduction)


def segfault(input, target, reduction="mean"):
    ctypes.string_at(0)  # reads address 0: SIGSEGV
    return reference(input, target, reduction)


def abort(input, target, reduction="mean"):
    os.abort()  # SIGABRT, as a failed assertion in a C++ kernel


def exits(input, target, reduction="mean"):
    os._exit(0)  # a library that ends the process, and says all is well


def oom_killed(input, target, reduction="mean"):
    os.kill(os.getpid(), signal.SIGKILL)  # what the kernel's OOM killer does
    time.sleep(60)


def hangs(input, target, reduction="mean"):
    time.sleep(3600)


def greedy(input, target, reduction="mean"):
    torch.empty(1 << 60, dtype=torch.uint8)  # an exabyte: refused at once, nothing touched
    return reference(input, target, reduction)


def raises(input, target, reduction="mean"):
    raise RuntimeError("kernel exploded")


def nan(input, target, reduction="mean"):
    return reference(input, target, reduction) * float("nan")


def wrong_shape(input, target, reduction="mean"):
    return reference(input, target, "none")[:3]


FAULTS = {
    "segfault": (segfault, "killed by SIGSEGV"),
    "abort": (abort, "killed by SIGABRT"),
    "exits": (exits, "exited with status 0"),
    "oom_killed": (oom_killed, "killed by SIGKILL"),
    "hangs": (hangs, "exceeded"),
    "greedy": (greedy, "can't allocate memory"),
    "raises": (raises, "kernel exploded"),
    "nan": (nan, "NaN/inf differ"),
    "wrong_shape": (wrong_shape, "shape (3,), expected"),
}


def make_inputs(case):
    return {"input": case.randn(case.n), "target": case.randn(case.n)}


@hookimpl
def register_losses(register):
    register(LossSpec(name=LOSS, family="faults", formula=r"\frac{1}{n}\sum_i (x_i-y_i)^2",
                      reference=reference, make_inputs=make_inputs,
                      sizes={"quick": [67], "default": [67], "large": [67]}))


@hookimpl
def register_implementations(register):
    register(LOSS, Impl(name="good", fn=good))
    for name, (fn, _) in FAULTS.items():
        register(LOSS, Impl(name=name, fn=fn))
