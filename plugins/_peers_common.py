"""Helpers shared by the peer adapters (:mod:`lossreg_plugins.peers`,
:mod:`lossreg_plugins._peers_rl`): library names, the unsupported-option error and the
small conversions every adapter needs."""

from __future__ import annotations

import os

import torch

import lossreg
# Before any peer imports Triton: sets TRITON_INTERPRET=1 on a machine without CUDA. A
# Triton imported first defines triton.language's own @jit helpers (tl.max, tl.sum...)
# as compiled functions, which an interpreted kernel cannot call ("Cannot call
# @triton.jit'd outside of the scope of a kernel").
import lossreg.kernels  # noqa: F401,E402

LIGER = "liger_kernel"
CCE = "cut_cross_entropy"

#: Liger's Triton kernels compute in float32 whatever the input dtype.
HALF_AND_SINGLE = ("float32", "bfloat16", "float16")


class UnsupportedOption(ValueError):
    """An option set the peer cannot express. A ValueError, as the contract asks; the
    core's own class of that name is used where it has one (so the harness can report
    such cases as skipped rather than as errors)."""


UnsupportedOption = getattr(lossreg, "UnsupportedOption", UnsupportedOption)


def _unsupported(loss: str, impl: str, option: str, why: str) -> ValueError:
    return UnsupportedOption(f"{loss}: the {impl} implementation cannot express {option}: "
                             f"{why}")


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """Half precision to float32 before a softmax, as our references do."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _nan_if_nothing_kept(out: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """torch's convention for ``mean`` over no kept target: NaN (with a zero gradient).
    Liger returns 0 there; this needs no host sync."""
    return torch.where(keep.any(), out, torch.full_like(out, float("nan")))


def _under_interpreter(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def _interpreted(loss: str, option: str) -> ValueError:
    return _unsupported(loss, "liger", f"{option} on CPU",
                        f"Liger's kernel with {option} calls .to() on a Python float argument, "
                        "which compiles for a GPU but fails under Triton's interpreter")


def _scale_reduced(out: torch.Tensor, reduction: str, rows: int, loss: str, impl: str):
    """``out`` is the peer's mean over ``rows`` rows: ``sum`` is that times the rows;
    ``none`` is not expressible (the peer returns one scalar)."""
    if reduction == "none":
        raise _unsupported(loss, impl, "reduction='none'",
                           "the peer returns only the mean over rows, no per-row losses")
    return out * rows if reduction == "sum" else out
