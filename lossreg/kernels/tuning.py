"""Launch configurations per architecture and problem size, from a committed table.

``lossreg/kernels/tuning.json`` maps a kernel family to rows of
``{"arch": "sm_90", "max_size": 131072, "block": 4096, "num_warps": 8}``: for a
launch on compute capability ``cc`` with a problem dimension ``size`` (the vocabulary
for the cross-entropy family, elements for the pointwise template) the first row of
that arch, else of ``"default"``, whose ``max_size`` is at least ``size`` (``null``:
no bound) wins. ``benchmarks/tune_kernels.py --write`` regenerates the table on a GPU
by timing each candidate; a kernel reads it with :func:`config` and falls back to its
own constants when its family or arch has no row.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

TABLE = Path(__file__).with_name("tuning.json")
KEYS = ("block", "num_warps")


@functools.lru_cache(maxsize=None)
def load(path: str | None = None) -> dict:
    """The table (family -> rows), validated: a bad row names the family and what was
    expected."""
    data = json.loads(Path(path or TABLE).read_text())
    for family, rows in data.items():
        if family.startswith("_"):
            continue
        for row in rows:
            missing = [k for k in ("arch", "max_size", *KEYS) if k not in row]
            if missing:
                raise ValueError(f"tuning table {family!r}: row {row} lacks {missing}")
            if not all(isinstance(row[k], int) and row[k] > 0 for k in KEYS):
                raise ValueError(f"tuning table {family!r}: block and num_warps must be "
                                 f"positive ints, got {row}")
    return data


def arch_name(cc: int | tuple[int, int] | None) -> str:
    if cc is None:
        return "default"
    if isinstance(cc, tuple):
        cc = cc[0] * 10 + cc[1]
    return f"sm_{cc}"


def config(family: str, size: int, cc=None, path: str | None = None) -> dict | None:
    """{"block", "num_warps"} for ``family`` at ``size`` on ``cc`` (an int like 90 or
    a (major, minor) tuple), or None when the table has no row for it."""
    rows = load(path).get(family, [])
    for arch in (arch_name(cc), "default"):
        for row in rows:
            if row["arch"] == arch and (row["max_size"] is None or size <= row["max_size"]):
                return {k: row[k] for k in KEYS}
    return None


def current_cc(device) -> int | None:
    """Compute capability of a CUDA device as an int (90), None elsewhere."""
    import torch

    if getattr(device, "type", str(device)) != "cuda" or not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return major * 10 + minor


def max_registers(warps: int) -> int:
    """Register cap (``maxnreg``) that leaves room for two resident blocks per SM on
    sm_80 and sm_90 (65536 registers): 64 at 16 warps, 128 at 8. ptxas spills rather
    than exceed it; the ahead-of-time build checks that nothing spills."""
    return min(255, 65536 // (2 * 32 * warps))


def launch_options(warps: int) -> dict:
    """``num_warps`` and its :func:`max_registers` cap, as launch/compile options."""
    return {"num_warps": warps, "maxnreg": max_registers(warps)}
