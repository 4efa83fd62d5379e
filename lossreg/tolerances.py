"""The one table of default tolerances against the float64 reference.

``spec.LossSpec.tolerance`` starts from it (a spec may override a dtype, with the reason
in its description) and the tests import it too, so a tolerance changed for a reason
changes everywhere.

Each entry is ``(rtol, atol)``: a result passes when ``||out-ref|| / ||ref|| <= rtol``
or ``max |out-ref| <= atol``. The relative ones are DESIGN.md's; the absolute floors are
a few units in the last place of 1.0 in each dtype (float32: 4 eps), so that they only
rescue results whose reference is (nearly) zero and never wave through a small wrong
gradient.
"""

from __future__ import annotations

import torch

DEFAULT_TOLERANCES: dict[str, tuple[float, float]] = {
    "float64": (1e-10, 1e-14),
    "float32": (1e-5, 5e-7),
    "bfloat16": (2e-2, 4e-3),
    "float16": (2e-3, 5e-4),
}


def default_tolerance(dtype: str | torch.dtype) -> tuple[float, float]:
    """``(rtol, atol)`` for a dtype given by name (``"bfloat16"``) or as a torch dtype."""
    name = dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
    try:
        return DEFAULT_TOLERANCES[name]
    except KeyError:
        raise ValueError(f"no tolerance for dtype {dtype!r}: expected one of "
                         f"{', '.join(DEFAULT_TOLERANCES)}") from None
