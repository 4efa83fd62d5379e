"""Read one compiled kernel: its cubin (resources, SASS) and its TTGIR (tile accesses).

Everything here looks at a single kernel's own artifacts, never at a log shared by a
run, so a kernel reads the same whatever else is compiled with it or before it. The
AOT cache (:mod:`lossreg.kernels.aot_cache`) keys its records on this file's text: a
change to how a kernel is read invalidates them.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

REGS_PER_SM = 65536
WARPS_PER_SM = 64
MAX_BLOCKS_PER_SM = 32
SHARED_PER_SM = {80: 164 * 1024, 90: 228 * 1024}


def _tool(name: str) -> str | None:
    """Triton's bundled CUDA binary ``name`` (cuobjdump, nvdisasm), else one on PATH."""
    try:
        import triton

        path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
        if path.exists():
            return str(path)
    except ImportError:
        pass
    return shutil.which(name)


def _cuobjdump(cubin: bytes, flag: str) -> str:
    tool = _tool("cuobjdump")
    if tool is None:
        raise RuntimeError("cuobjdump not found (Triton's nvidia backend ships one)")
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "k.cubin"
        path.write_bytes(cubin)
        out = subprocess.run([tool, flag, str(path)], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"cuobjdump {flag} failed: {out.stderr.strip()[:300]}")
    return out.stdout


def resource_usage(cubin: bytes) -> dict:
    """Registers, stack and local memory of the one function in ``cubin``."""
    text = _cuobjdump(cubin, "--dump-resource-usage")
    rows = re.findall(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", text)
    if len(rows) != 1:
        raise RuntimeError(f"expected one function's resource usage, got {len(rows)}: {text}")
    regs, stack, shared, local = map(int, rows[0])
    return {"registers": regs, "stack_bytes": stack, "local_bytes": local,
            "static_shared": shared}


_MEM = re.compile(r"\b(LDG|STG)((?:\.[A-Z0-9_]+)*)")
_ADDR = re.compile(r"/\*([0-9a-f]{4,})\*/")
_BRA = re.compile(r"\bBRA\b[^;]*?(0x[0-9a-f]+|\.L_x_\d+)")
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")


def _width(mods: str) -> int:
    parts = set(mods.strip(".").split("."))
    for bits in (128, 64):
        if str(bits) in parts:
            return bits
    if parts & {"U16", "S16"}:
        return 16
    if parts & {"U8", "S8"}:
        return 8
    return 32


def memory_widths(sass: str) -> dict:
    """Widest global load/store in the main loop of a SASS listing (see module doc)."""
    ops, labels, branches, pending = [], {}, [], []
    for line in sass.splitlines():
        m = _LABEL.match(line)
        if m:  # a label names the address of the instruction after it
            pending.append(m.group(1))
            continue
        a = _ADDR.search(line)
        if not a:
            continue
        pos = int(a.group(1), 16)
        labels.update((name, pos) for name in pending)
        pending.clear()
        mem = _MEM.search(line.split("/*", 2)[1])
        # .STRONG.GPU accesses read other programs' results (a last-program reduction
        # of partials), not the streamed data: they do not make a main loop
        if mem and "STRONG" not in mem.group(2):
            ops.append((pos, mem.group(1), _width(mem.group(2))))
        b = _BRA.search(line.split("/*", 2)[1])
        if b:
            t = b.group(1)
            branches.append((pos, int(t, 16) if t.startswith("0x") else labels.get(t)))
    # a backward branch closes a loop (a branch to itself is the trap at the end)
    loops = [(t, at) for at, t in branches if t is not None and t < at]
    loops = [(lo, hi) for lo, hi in loops
             if any(k == "LDG" and lo <= p <= hi for p, k, _ in ops)]
    def loads_in(lo, hi):
        return sum(k == "LDG" and lo <= p <= hi for p, k, _ in ops)

    body = [(k, w) for _, k, w in ops]
    if loops:  # the innermost of the loops that load the most
        most = max(loads_in(lo, hi) for lo, hi in loops)
        lo, hi = min((r for r in loops if loads_in(*r) == most), key=lambda r: r[1] - r[0])
        outside = sum(k == "LDG" for _, k, _ in ops) - most
        if most >= outside:  # else the data is loaded straight-line (a loop only finishes)
            body = [(k, w) for p, k, w in ops if lo <= p <= hi]
        else:
            loops = []
    loads = [w for k, w in body if k == "LDG"]
    stores = [w for k, w in body if k == "STG"]
    return {"in_loop": bool(loops), "load_bits": max(loads, default=0),
            "store_bits": max(stores, default=0), "loads": len(loads), "stores": len(stores)}


def blocks_per_sm(registers: int, num_warps: int, shared: int, cc: int) -> int:
    """Resident blocks per SM allowed by registers (allocated per warp in units of 256),
    warps and shared memory."""
    per_warp = -(-max(registers, 1) * 32 // 256) * 256
    by_regs = REGS_PER_SM // (per_warp * num_warps)
    by_warps = WARPS_PER_SM // num_warps
    by_shared = SHARED_PER_SM.get(cc, SHARED_PER_SM[80]) // (shared + 1024) if shared else 99
    return min(by_regs, by_warps, by_shared, MAX_BLOCKS_PER_SM)


#: MLIR element type of each report dtype
ELEMENT = {"fp32": "f32", "bf16": "bf16", "fp16": "f16", "fp64": "f64"}
_ACCESS = re.compile(r"\b(tt\.load|tt\.store|ttg\.async_copy_global_to_local)\b.*"
                     r"tensor<((?:\d+x)+)!tt\.ptr<(\w+)>")


def tile_accesses(ttgir: str, dtype: str) -> dict:
    """Global loads and stores of whole tiles of ``dtype`` in a kernel's TTGIR.

    The tile is the largest tensor of pointers any access uses; ``tile_loads`` and
    ``tile_stores`` count the accesses of that many ``dtype`` elements. A kernel that
    reads no tile of its inputs (nll's backward only gathers a label, a weight and the
    incoming gradient per row: its loss term never reads the scores) has no data
    stream whose loads could be 128-bit; one that writes a value per row has no
    per-element output."""
    accesses = []
    for line in ttgir.splitlines():
        m = _ACCESS.search(line)
        if m:
            n = 1
            for dim in m.group(2).rstrip("x").split("x"):
                n *= int(dim)
            accesses.append(("store" if m.group(1) == "tt.store" else "load", n,
                             m.group(3)))
    tile = max((n for _, n, _ in accesses), default=0)
    elem = ELEMENT.get(dtype, dtype)
    count = lambda kind: sum(k == kind and n == tile and t == elem  # noqa: E731
                             for k, n, t in accesses)
    return {"tile_elements": tile, "tile_loads": count("load"),
            "tile_stores": count("store")}


def describe(compiled, cc: int, dtype: str) -> dict:
    """What the AOT report lists, from ``compiled``'s own cubin and TTGIR."""
    cubin = compiled.asm["cubin"]
    res = resource_usage(cubin)
    warps = compiled.metadata.num_warps
    shared = max(compiled.metadata.shared, res["static_shared"])
    return {**res, "spill_bytes": res["local_bytes"], "num_warps": warps, "shared": shared,
            "blocks_per_sm": blocks_per_sm(res["registers"], warps, shared, cc),
            **memory_widths(_cuobjdump(cubin, "-sass")),
            **tile_accesses(compiled.asm["ttgir"], dtype),
            "ptx_bytes": len(compiled.asm["ptx"]), "cubin_bytes": len(cubin)}
