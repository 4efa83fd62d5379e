"""Compile every template kernel ahead of time for NVIDIA targets and read the cubins.

    python -m lossreg.kernels.aot [--arch 80 --arch 90] [--dtype fp32] [--instance mse]
                                  [--kernel NAME] [--variant BLOCK_D=4096] [--json]

Kernels must be defined with ``TRITON_INTERPRET=0``; when it is not so, ``main``
starts itself again in a fresh interpreter with it. It loads every plugin, asks each
template instance for its kernels' signatures (``aot_sources``) and compiles each
(kernel, dtype, arch) on its own with ``triton.compile(ASTSource(...),
target=GPUTarget("cuda", cc, 32))``, no GPU needed.

The specialization compiled is the one Triton's launcher picks at the benchmark sizes:
every pointer 16-byte aligned (torch's allocations are) and every integer argument a
multiple of 16 (``tt.divisibility = 16``), which is what lets a masked block load four
float32 (eight bfloat16) elements per instruction.

Everything reported is read from that kernel's own cubin, so a kernel gives the same
figures in every run, from Triton's cache or not, whatever else is compiled with it:

* ``registers``, ``stack_bytes``, ``local_bytes`` (spills land in local memory):
  ``cuobjdump --dump-resource-usage``;
* ``blocks_per_sm``: resident blocks that registers x warps (and shared memory) allow,
  65536 registers and 64 warps per SM on sm_80 and sm_90;
* ``load_bits`` / ``store_bits``: the widest global load and store (``LDG``/``STG``)
  in the kernel's main loop (the innermost backward branch's body holding the most
  global loads; the whole kernel when it has no such loop or loads more outside it,
  as a one-block kernel whose last program sums partials in a loop), from
  ``cuobjdump -sass``.

Exit status 1 when any kernel fails to compile.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

DTYPES = ("fp32", "bf16", "fp16")
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


#: one instance of each template, compiled by the default test (the rest: slow)
REPRESENTATIVE = ("mse", "kmeans_nearest")

#: (instance, kernel, dtype, arch, variant substring) -> why it breaks a rule today.
#: The tests require the violations to be exactly these: a new one fails, and a fixed
#: one must be taken off the list.
KNOWN_VIOLATIONS: dict[tuple[str, str, str, str, str], str] = {}


def known_violation(entry: dict) -> str | None:
    for (inst, kernel, dtype, arch, part), why in KNOWN_VIOLATIONS.items():
        if (entry["instance"], entry["kernel"], entry["dtype"], entry["arch"]) == (
                inst, kernel, dtype, arch) and part in entry.get("variant", ""):
            return why
    return None

#: kernel -> what a memory-bound kernel's main loop must do with 128-bit accesses:
#: "loads+stores" (it streams inputs to per-element outputs), "loads" (it reduces its
#: inputs to a few values). Kernels not listed (tiled pairwise reductions, matrix
#: products) are compute- or latency-bound and only need no spills and 2 blocks/SM.
MEMORY_BOUND = {
    "_pointwise_fwd": "loads+stores",
    "_pointwise_bwd": "loads+stores",
    "_scale_unless_one": "loads+stores",
    "_aligned_fwd": "loads+stores",
    "_aligned_bwd": "loads+stores",
    "_rowwise_fwd": "loads+stores",
    "_rowwise_bwd": "loads+stores",
}


def vector_rule(entry: dict) -> str | None:
    """What :data:`MEMORY_BOUND` asks of a report entry; float16 shares bfloat16's code,
    float64 moves 128 bits as two elements and is not judged."""
    if entry.get("dtype") not in ("fp32", "bf16"):
        return None
    kernel, variant = entry.get("kernel"), entry.get("variant", "")
    rule = MEMORY_BOUND.get(kernel)
    # a row-wise forward without gradients writes one value per row, not per element
    if rule and kernel in ("_aligned_fwd", "_rowwise_fwd") and "REDUCE=False" in variant:
        return "loads"
    return rule


def _attrs(kernel, signature: dict) -> dict:
    """``tt.divisibility = 16`` on every pointer and integer argument (module doc)."""
    attrs = {}
    for name, ty in signature.items():
        if ty != "constexpr" and (ty.startswith("*") or ty[0] in "iu"):
            attrs[(kernel.arg_names.index(name),)] = [["tt.divisibility", 16]]
    return attrs


def compile_one(kernel, signature: dict, constexprs: dict, options: dict, cc: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = dict(signature)
    sig.update({k: "constexpr" for k in constexprs})
    source = ASTSource(fn=kernel, signature=sig, constexprs=constexprs,
                       attrs=_attrs(kernel, signature))
    return triton.compile(source, target=GPUTarget("cuda", cc, 32), options=options)


def describe(compiled, cc: int) -> dict:
    """What the module docstring lists, from ``compiled``'s own cubin."""
    cubin = compiled.asm["cubin"]
    res = resource_usage(cubin)
    warps = compiled.metadata.num_warps
    shared = max(compiled.metadata.shared, res["static_shared"])
    return {**res, "spill_bytes": res["local_bytes"], "num_warps": warps, "shared": shared,
            "blocks_per_sm": blocks_per_sm(res["registers"], warps, shared, cc),
            **memory_widths(_cuobjdump(cubin, "-sass")),
            "ptx_bytes": len(compiled.asm["ptx"]), "cubin_bytes": len(cubin)}


def compile_all(archs=(80, 90), dtypes=DTYPES, instances=None, kernels=None,
                variants=None) -> list[dict]:
    from lossreg.kernels import template_instances
    from lossreg.registry import default_registry

    default_registry()  # imports every plugin, which defines its kernels
    report = []
    for inst in template_instances():
        if instances and inst.name not in instances:
            continue
        for dtype in dtypes:
            for kernel, signature, constexprs, options in inst.aot_sources(dtype):
                if kernels and kernel.__name__ not in kernels:
                    continue
                variant = ",".join(f"{k}={v}" for k, v in sorted(constexprs.items())
                                   if isinstance(v, (bool, int)) and k.isupper())
                if variants and not any(v in variant for v in variants):
                    continue
                for cc in archs:
                    entry = {"instance": inst.name, "kernel": kernel.__name__, "dtype": dtype,
                             "arch": f"sm_{cc}", "variant": variant}
                    try:
                        compiled = compile_one(kernel, signature, constexprs, options, cc)
                        entry.update(ok=True, **describe(compiled, cc))
                    except Exception as exc:  # noqa: BLE001
                        entry.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:500])
                    report.append(entry)
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, action="append", help="compute capability, e.g. 90")
    ap.add_argument("--dtype", action="append", choices=DTYPES)
    ap.add_argument("--instance", action="append", help="only this template instance")
    ap.add_argument("--kernel", action="append", help="only this kernel (function name)")
    ap.add_argument("--variant", action="append",
                    help="only variants whose constexprs contain this, e.g. BLOCK_D=4096")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") != "0":
        env = {**os.environ, "TRITON_INTERPRET": "0"}
        argv = sys.argv[1:] if argv is None else list(argv)
        return subprocess.run([sys.executable, "-m", "lossreg.kernels.aot", *argv],
                              env=env).returncode
    report = compile_all(tuple(args.arch or (80, 90)), tuple(args.dtype or DTYPES),
                         args.instance, args.kernel, args.variant)
    if args.json:
        print(json.dumps(report))
    else:
        for e in report:
            extra = (f"regs={e['registers']} spills={e['spill_bytes']} "
                     f"blocks/SM={e['blocks_per_sm']} ld={e['load_bits']} "
                     f"st={e['store_bits']}" if e.get("ok") else e.get("error"))
            print(f"{'ok  ' if e.get('ok') else 'FAIL'} {e['arch']} {e['instance']}."
                  f"{e['kernel']}[{e['dtype']}] {e['variant']} {extra}")
    return 0 if report and all(e.get("ok") for e in report) else 1


if __name__ == "__main__":
    sys.exit(main())
