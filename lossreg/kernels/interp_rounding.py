"""Round-to-nearest-even for float32 -> bfloat16 casts under the Triton interpreter.

On a GPU, ``x.to(tl.bfloat16)`` rounds to nearest even. The interpreter (triton 3.x,
``triton.runtime.interpreter._convert_float``) casts float32 to bfloat16 by dropping
the low 16 bits: round toward zero, so every bfloat16 value a kernel stores is biased
toward zero by half a unit roundoff on average (up to one). A mean-reduced gradient,
whose elements share one rounded scale, then comes out smaller than the truth by a
common factor (mae at n=4099: 2^-12 - 2^-20 where torch gives 2^-12), and rounding
it twice (the saved gradient, then times the incoming gradient) doubles it: the CPU
check would judge the interpreter, not the kernel. `install` makes the interpreter's
float32 -> bfloat16 conversion round as the GPU does (through torch's conversion,
which rounds to nearest even); other conversions are left as they are.
"""

from __future__ import annotations

import numpy as np
import torch

_INSTALLED = False


def _bf16_bits(data: np.ndarray) -> np.ndarray:
    """The bfloat16 bit patterns (uint16) of float32 values, rounded to nearest even."""
    t = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))
    return t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16).reshape(data.shape)


def install() -> None:
    """Patch the interpreter's float conversion once (no-op without the interpreter)."""
    global _INSTALLED
    if _INSTALLED:
        return
    from triton.runtime import interpreter  # only where Triton runs on the CPU
    import triton.language as tl

    original = interpreter._convert_float

    def convert(input, input_dtype, output_dtype, rounding_mode):
        if (input_dtype == tl.float32 and output_dtype == tl.bfloat16
                and rounding_mode != interpreter._ir.ROUNDING_MODE.RTZ):
            return _bf16_bits(np.asarray(input).view(np.float32))
        return original(input, input_dtype, output_dtype, rounding_mode)

    interpreter._convert_float = convert
    _INSTALLED = True
