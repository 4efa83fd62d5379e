"""Compile every template kernel ahead of time for NVIDIA targets and read the cubins.

    python -m lossreg.kernels.aot [--arch 80 --arch 90] [--dtype fp32] [--instance mse]
                                  [--kernel NAME] [--variant BLOCK_D=4096] [--each]
                                  [--jobs 2] [--no-cache] [--json]

Kernels must be defined with ``TRITON_INTERPRET=0``; when it is not so, ``main``
starts itself again in a fresh interpreter with it. It loads every plugin, asks each
template instance for its kernels' signatures (``aot_sources``) and compiles each
(kernel, dtype, arch) on its own with ``triton.compile(ASTSource(...),
target=GPUTarget("cuda", cc, 32))``, no GPU needed. Constexpr parameters a source
leaves out take the kernel's defaults, as at a launch.

The specialization compiled is the one Triton's launcher picks at the benchmark sizes:
every pointer 16-byte aligned (torch's allocations are) and every integer argument a
multiple of 16 (``tt.divisibility = 16``), which is what lets a masked block load four
float32 (eight bfloat16) elements per instruction; an argument in the kernel's
``do_not_specialize`` gets no hint, as at a launch.

Everything reported is read from that kernel's own cubin and TTGIR
(:mod:`lossreg.kernels.aot_sass`), so a kernel gives the same figures in every run,
from a cache or not, whatever else is compiled with it:

* ``registers``, ``stack_bytes``, ``local_bytes`` (spills land in local memory):
  ``cuobjdump --dump-resource-usage``;
* ``blocks_per_sm``: resident blocks that registers x warps (and shared memory) allow,
  65536 registers and 64 warps per SM on sm_80 and sm_90;
* ``load_bits`` / ``store_bits``: the widest global load and store (``LDG``/``STG``)
  in the kernel's main loop (the innermost backward branch's body holding the most
  global loads; the whole kernel when it has no such loop or loads more outside it,
  as a one-block kernel whose last program sums partials in a loop), from
  ``cuobjdump -sass``;
* ``tile_loads`` / ``tile_stores``: the TTGIR's accesses of whole tiles of the dtype
  (:func:`aot_sass.tile_accesses`), which say whether a kernel streams its inputs or
  outputs at all.

Cost: a few seconds of CPU per (kernel, dtype, arch), mostly ``triton.compile`` and
the disassembler. So identical specializations (``_scale_unless_one`` is the same
kernel in every pointwise instance) compile once, ``--jobs`` compiles in parallel
processes, and each result is cached (:mod:`lossreg.kernels.aot_cache`); ``--each``
checks one specialization per (instance, kernel, dtype, arch) (:func:`each_kernel`).

Exit status 1 when any kernel fails to compile.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import zlib

from . import aot_cache
from .aot_sass import (  # noqa: F401  (the report's readers, re-exported)
    blocks_per_sm,
    describe,
    memory_widths,
    resource_usage,
    tile_accesses,
)

DTYPES = ("fp32", "bf16", "fp16")
ARCHS = (80, 90)

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
    """What :data:`MEMORY_BOUND` asks of a report entry: "loads+stores", "loads",
    "stores" or None. Only what the kernel streams is judged: the loads when its TTGIR
    loads whole tiles of the dtype, the stores when it stores them (a row-wise forward
    without gradients writes one value per row; nll's backward reads no scores, only a
    label, weight and incoming gradient per row). float16 shares bfloat16's code,
    float64 moves 128 bits as two elements and is not judged."""
    if entry.get("dtype") not in ("fp32", "bf16"):
        return None
    rule = MEMORY_BOUND.get(entry.get("kernel"))
    if rule is None:
        return None
    parts = [p for p in rule.split("+")
             if entry.get("tile_" + p, 1) > 0]  # entries without the count: judged
    return "+".join(parts) or None


def _attrs(kernel, signature: dict) -> dict:
    """``tt.divisibility = 16`` on every pointer and integer argument (module doc), but
    not on those the kernel keeps from specializing (``do_not_specialize``, or
    ``do_not_specialize_on_alignment``): their launches get no such hint either."""
    params = {p.name: p for p in kernel.params}
    attrs = {}
    for name, ty in signature.items():
        param = params[name]
        if param.do_not_specialize or param.do_not_specialize_on_alignment:
            continue
        if ty != "constexpr" and (ty.startswith("*") or ty[0] in "iu"):
            attrs[(kernel.arg_names.index(name),)] = [["tt.divisibility", 16]]
    return attrs


def source_of(kernel, signature: dict, constexprs: dict):
    """The ``ASTSource`` a launch would compile: ``constexprs`` plus the defaults of
    the constexpr parameters it leaves out (without them Triton compiles the parameter
    as None and fails deep in code generation: ``'NoneType' object has no attribute
    '_unflatten_ir'``)."""
    from triton.compiler import ASTSource

    constexprs = dict(constexprs)
    for param in kernel.params:
        if param.name in signature or param.name in constexprs:
            continue
        if param.is_constexpr and param.has_default:
            constexprs[param.name] = param.default
        else:
            raise TypeError(f"{kernel.__name__}: argument {param.name!r} is in neither "
                            "the signature nor the constexprs")
    sig = dict(signature)
    sig.update({k: "constexpr" for k in constexprs})
    return ASTSource(fn=kernel, signature=sig, constexprs=constexprs,
                     attrs=_attrs(kernel, signature))


def compile_one(kernel, signature: dict, constexprs: dict, options: dict, cc: int):
    import triton
    from triton.backends.compiler import GPUTarget

    return triton.compile(source_of(kernel, signature, constexprs),
                          target=GPUTarget("cuda", cc, 32), options=options)


def _variant(constexprs: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(constexprs.items())
                    if isinstance(v, (bool, int)) and k.isupper())


def each_kernel(variants: list, dtype: str, cc: int):
    """The one specialization of an (instance, kernel) checked for ``dtype`` on
    ``sm_{cc}`` by ``--each``: the four (dtype, arch) slots of float32/bfloat16 x
    sm_80/sm_90 take its variants in turn, so a kernel of two to four variants has each
    checked somewhere, and the choice does not depend on what else is selected."""
    slot = DTYPES.index(dtype) * len(ARCHS) + (ARCHS.index(cc) if cc in ARCHS else 0)
    return variants[slot % len(variants)]


def spread_slot(instance: str, kernel: str, dtypes=DTYPES, archs=ARCHS) -> tuple[str, int]:
    """The one (dtype, arch) of those selected that ``--spread`` checks an (instance,
    kernel) in: fixed by a hash of the two names, so that a template's many instances
    fill every slot."""
    slot = zlib.crc32(f"{instance}:{kernel}".encode()) % (len(dtypes) * len(archs))
    return dtypes[slot // len(archs)], archs[slot % len(archs)]


def plan(archs=ARCHS, dtypes=DTYPES, instances=None, kernels=None, variants=None,
         each=False, spread=False) -> list[dict]:
    """The selected (instance, kernel, dtype, arch, variant) compiles, as report entries
    with the source attached under ``"_src"``; ``spread`` keeps each (instance, kernel)
    in its :func:`spread_slot` only."""
    from lossreg.kernels import template_instances
    from lossreg.registry import default_registry

    default_registry()  # imports every plugin, which defines its kernels
    tasks = []
    for inst in template_instances():
        if instances and inst.name not in instances:
            continue
        for dtype in dtypes:
            by_kernel: dict[str, list] = {}
            for kernel, signature, constexprs, options in inst.aot_sources(dtype):
                if kernels and kernel.__name__ not in kernels:
                    continue
                variant = _variant(constexprs)
                if variants and not any(v in variant for v in variants):
                    continue
                by_kernel.setdefault(kernel.__name__, []).append(
                    (variant, (kernel, signature, constexprs, options)))
            for name, found in by_kernel.items():
                for cc in archs:
                    if spread and spread_slot(inst.name, name, dtypes, archs) != (dtype, cc):
                        continue
                    for variant, src in ([each_kernel(found, dtype, cc)] if each else found):
                        tasks.append({"instance": inst.name, "kernel": name, "dtype": dtype,
                                      "arch": f"sm_{cc}", "variant": variant,
                                      "_src": (*src, cc)})
    return tasks


_TODO: list = []  # the sources a forked worker compiles, by index


def _attributed(compiled, cc: int) -> None:
    """Raise unless the cubin read is this compile's: one function, the kernel's name,
    for ``sm_{cc}`` (a report is never another kernel's or another arch's)."""
    import re

    from .aot_sass import _cuobjdump

    names = re.findall(r"Function (\S+):", _cuobjdump(compiled.asm["cubin"],
                                                      "--dump-resource-usage"))
    target = compiled.metadata.target
    if names != [compiled.metadata.name] or getattr(target, "arch", cc) != cc:
        raise RuntimeError(f"the cubin holds {names} for {target}, not "
                           f"{compiled.metadata.name} for sm_{cc}")


def _build(i: int) -> dict:
    kernel, signature, constexprs, options, cc, dtype = _TODO[i]
    try:
        compiled = compile_one(kernel, signature, constexprs, options, cc)
        _attributed(compiled, cc)
        return {"ok": True, **describe(compiled, cc, dtype)}
    except Exception as exc:  # noqa: BLE001
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:500]}


def _run(todo: list, jobs: int):
    """Yield each of ``todo``'s records in order, as they are ready."""
    _TODO[:] = todo
    if jobs <= 1 or len(todo) <= 1:
        yield from map(_build, range(len(todo)))
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(min(jobs, len(todo)),
                             mp_context=multiprocessing.get_context("fork")) as pool:
        yield from pool.map(_build, range(len(todo)), chunksize=1)


def compile_all(archs=ARCHS, dtypes=DTYPES, instances=None, kernels=None, variants=None,
                each=False, jobs=1, cache=True, spread=False) -> list[dict]:
    """The report: one entry per :func:`plan` task. Each distinct (source, options,
    arch, dtype) is compiled once, in ``jobs`` processes, unless ``cache`` has it;
    ``cached`` says which entries were read from the cache."""
    tasks = plan(archs, dtypes, instances, kernels, variants, each, spread)
    keys, todo, records = [], {}, {}
    for t in tasks:
        kernel, signature, constexprs, options, cc = t.pop("_src")
        try:
            name = aot_cache.key(source_of(kernel, signature, constexprs), options, cc,
                                 t["dtype"])
        except Exception as exc:  # noqa: BLE001
            name = None
            t.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:500])
        keys.append(name)
        if name is None or name in todo or name in records:
            continue
        hit = aot_cache.load(name) if cache else None
        if hit is not None:
            records[name] = {**hit, "cached": True}
        else:
            todo[name] = (kernel, signature, constexprs, options, cc, t["dtype"])
    hits = len(records)
    for i, (name, record) in enumerate(zip(todo, _run(list(todo.values()), jobs)), 1):
        if cache and record["ok"]:  # as each arrives: an interrupted run keeps them
            aot_cache.store(name, record)
        if i % 50 == 0 or i == len(todo):
            print(f"aot: compiled {i}/{len(todo)} ({hits} read from the cache)", file=sys.stderr)
        records[name] = {**record, "cached": False}
    for t, name in zip(tasks, keys):
        if name is not None:
            t.update(records[name])
    return tasks


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, action="append", help="compute capability, e.g. 90")
    ap.add_argument("--dtype", action="append", choices=DTYPES)
    ap.add_argument("--instance", action="append", help="only this template instance")
    ap.add_argument("--kernel", action="append", help="only this kernel (function name)")
    ap.add_argument("--variant", action="append",
                    help="only variants whose constexprs contain this, e.g. BLOCK_D=4096")
    ap.add_argument("--each", action="store_true",
                    help="one specialization per (instance, kernel, dtype, arch)")
    ap.add_argument("--spread", action="store_true",
                    help="each (instance, kernel) in one (dtype, arch) slot only, fixed by "
                         "a hash of its names (with --each: one specialization in all)")
    ap.add_argument("--jobs", type=int, default=1, help="compile in this many processes")
    ap.add_argument("--no-cache", action="store_true",
                    help="compile everything; neither read nor write build/aot-cache")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") != "0":
        env = {**os.environ, "TRITON_INTERPRET": "0"}
        argv = sys.argv[1:] if argv is None else list(argv)
        return subprocess.run([sys.executable, "-m", "lossreg.kernels.aot", *argv],
                              env=env).returncode
    report = compile_all(tuple(args.arch or ARCHS), tuple(args.dtype or DTYPES),
                         args.instance, args.kernel, args.variant, args.each,
                         max(args.jobs, 1), not args.no_cache, args.spread)
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
