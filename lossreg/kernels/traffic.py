"""Bytes models of the Triton implementations: the minimum HBM traffic of each mode.

A Triton implementation declares ``Impl(..., bytes_model=streamed("input"))``: the
kernel must read every tensor input once and write the gradient of each named input
once, and nothing else reaches memory (no logits, no per-element intermediates, no
second pass). ``bench`` divides the model by the time and the measured copy bandwidth
(``bw_fraction``), so each kernel is judged against its own limit.

Per mode, as the harness times them (the inputs that take a gradient require it):

* ``forward``: every input read once; a kernel that forms the gradient in the forward
  (``fused=True``, the implementation's ``grad_in_forward``) also writes it there;
* ``backward``: what a backward on its own must move, the inputs read again and each
  gradient written (a fused kernel's backward moves nearly nothing: its row says
  "gradient computed in the forward" and its fraction is not a bandwidth figure);
* ``full`` (forward + backward): inputs read once, gradients written once. This is
  the figure that judges a fused one-pass design.

Scalars and the loss itself (a few bytes) are left out. Integer inputs (labels,
actions, masks) count as read.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch


def tensor_bytes(t: Any) -> int:
    return t.numel() * t.element_size() if torch.is_tensor(t) else 0


def streamed(*grads: str, fused: bool = True, skip: tuple[str, ...] = ()
             ) -> Callable[[Mapping[str, Any]], dict[str, int]]:
    """The model of a kernel that streams its inputs once (see the module docstring):
    ``grads`` names the inputs whose gradient it writes, ``skip`` inputs it never
    reads (an option passed as a tensor), ``fused`` whether the forward writes the
    gradient."""
    if not grads:
        raise ValueError("streamed: name the inputs whose gradient the kernel writes")

    def model(inputs: Mapping[str, Any]) -> dict[str, int]:
        read = sum(tensor_bytes(v) for k, v in inputs.items() if k not in skip)
        write = sum(tensor_bytes(inputs[k]) for k in grads if k in inputs)
        both = read + write
        return {"forward": both if fused else read, "backward": both, "full": both}

    model.grads = grads  # for the report and the tests
    return model
