"""Three bfloat16 faults of the Triton interpreter (triton 3.x), patched so that a CPU
check judges the kernel as a GPU runs it, not the interpreter.

1. Rounding. 
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

2. ``tl.dot`` of bfloat16 tiles. The interpreter keeps bfloat16 values as their uint16
bit patterns and its ``create_dot`` multiplies those integers (``np.matmul`` on the
bits): every bfloat16 ``tl.dot`` returned garbage (wcss, soft_kmeans, eps_separation,
rel 1-9 against the reference). A GPU multiplies the values, each product exact in the
float32 accumulator; `install` widens bfloat16 operands to float32 (exact) first.

3. float64 <-> bfloat16 casts (``cast_impl``) convert the value to uint16 as an
integer (0.004 -> 0): split_variance's Triton gradient, accumulated in float64 and
stored as bfloat16, came out all zeros. `install` rounds float64 to bfloat16 once, to
nearest even (as a GPU's cvt), and widens bfloat16 to float64 exactly.
"""

from __future__ import annotations

import numpy as np
import torch
import triton.language as tl
from triton.runtime import interpreter

_INSTALLED = False


def _bf16_bits(data: np.ndarray) -> np.ndarray:
    """The bfloat16 bit patterns (uint16) of float32 values, rounded to nearest even."""
    t = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))
    return t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16).reshape(data.shape)


def _widen(t) -> np.ndarray:
    """A handle's values as float32 (bfloat16 bits shifted into place; exact)."""
    if t.dtype.scalar == tl.bfloat16:
        return (t.data.astype(np.uint32) << 16).view(np.float32)
    return t.data.astype(np.float32)


def install() -> None:
    """Patch the interpreter's bfloat16 rounding and dot, once (imported only where
    Triton runs under the interpreter)."""
    global _INSTALLED
    if _INSTALLED:
        return
    original = interpreter._convert_float

    def convert(input, input_dtype, output_dtype, rounding_mode):
        if (input_dtype == tl.float32 and output_dtype == tl.bfloat16
                and rounding_mode != interpreter._ir.ROUNDING_MODE.RTZ):
            return _bf16_bits(np.asarray(input).view(np.float32))
        return original(input, input_dtype, output_dtype, rounding_mode)

    interpreter._convert_float = convert

    builder = interpreter.InterpreterBuilder
    original_dot = builder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype.scalar == tl.bfloat16 or b.dtype.scalar == tl.bfloat16:
            a, b = (interpreter.TensorHandle(_widen(t), tl.float32) for t in (a, b))
        return original_dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    builder.create_dot = create_dot
    original_cast = builder.cast_impl

    def cast_impl(self, src, dst_type):
        # float64 <-> bfloat16: the interpreter casts the value to uint16 as an integer
        # (0.004 -> 0); round once to nearest even, as a GPU's cvt does
        if src.dtype.scalar == tl.float64 and dst_type.scalar == tl.bfloat16:
            t = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float64))
            bits = t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
            return interpreter.TensorHandle(bits.reshape(np.shape(src.data)), tl.bfloat16)
        if src.dtype.scalar == tl.bfloat16 and dst_type.scalar == tl.float64:
            return interpreter.TensorHandle(_widen(src).astype(np.float64), tl.float64)
        return original_cast(self, src, dst_type)

    builder.cast_impl = cast_impl
    _INSTALLED = True
