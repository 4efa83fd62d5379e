"""Compile every template kernel ahead of time for NVIDIA targets, no GPU needed.

    python -m lossreg.kernels.aot [--arch 80 --arch 90] [--json]

Kernels must be defined with ``TRITON_INTERPRET=0``; when it is not so, ``main``
starts itself again in a fresh interpreter with it. It loads every
plugin, asks each template instance for its kernels' signatures (``aot_sources``),
compiles them with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))``
and reports registers and spills from ``ptxas -v`` where Triton ships ptxas.
Exit status 1 when any kernel fails to compile.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

DTYPES = ("fp32", "bf16", "fp16")


def _ptxas_candidates() -> list[str]:
    """Triton ships ptxas builds of different PTX versions; try each."""
    try:
        import triton

        bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
        found = [str(p) for p in sorted(bin_dir.glob("ptxas*"))]
    except ImportError:
        found = []
    system = shutil.which("ptxas")
    return found + ([system] if system else [])


def _parse_resources(text: str) -> dict:
    regs = re.findall(r"Used (\d+) registers", text)
    spills = re.findall(r"(\d+) bytes spill stores", text)
    return {"registers": max(map(int, regs)) if regs else None,
            "spill_bytes": max(map(int, spills)) if spills else None}


def _resources(ptx: str, cc: int) -> dict:
    """Registers and spills from our own ``ptxas -v`` run over the PTX."""
    arch = f"sm_{cc}a" if cc >= 90 else f"sm_{cc}"
    text = ""
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        for ptxas in _ptxas_candidates():
            out = subprocess.run([ptxas, "-v", f"--gpu-name={arch}", str(src), "-o",
                                  str(Path(d) / "k.cubin")], capture_output=True, text=True)
            if out.returncode == 0:
                text = out.stdout + out.stderr
                break
    return _parse_resources(text)


def _compile(triton, source, target, options) -> tuple[object, str]:
    """triton.compile, keeping the log of the ``ptxas -v`` that Triton runs to make the
    cubin (TRITON_DUMP_PTXAS_LOG prints it): reading registers and spills from it saves
    running ptxas a second time, a fifth of the whole compile time."""
    buf = io.StringIO()
    before = os.environ.get("TRITON_DUMP_PTXAS_LOG")
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    try:
        with contextlib.redirect_stdout(buf):
            compiled = triton.compile(source, target=target, options=options)
    finally:  # scoped: later compiles in this process do not print ptxas logs
        if before is None:
            del os.environ["TRITON_DUMP_PTXAS_LOG"]
        else:
            os.environ["TRITON_DUMP_PTXAS_LOG"] = before
    return compiled, buf.getvalue()


def compile_all(archs=(80, 90), dtypes=DTYPES) -> list[dict]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from lossreg.kernels import template_instances
    from lossreg.registry import default_registry

    default_registry()  # imports every plugin, which defines its kernels
    report = []
    for inst in template_instances():
        for dtype in dtypes:
            for kernel, signature, constexprs, options in inst.aot_sources(dtype):
                for cc in archs:
                    entry = {"instance": inst.name, "kernel": kernel.__name__, "dtype": dtype,
                             "arch": f"sm_{cc}"}
                    try:
                        sig = dict(signature)
                        sig.update({k: "constexpr" for k in constexprs})
                        compiled, log = _compile(
                            triton, ASTSource(fn=kernel, signature=sig, constexprs=constexprs),
                            GPUTarget("cuda", cc, 32), options,
                        )
                        resources = _parse_resources(log)
                        if resources["registers"] is None:  # from Triton's cache: no log
                            resources = _resources(compiled.asm["ptx"], cc)
                        entry.update(ok=True, ptx_bytes=len(compiled.asm["ptx"]),
                                     cubin_bytes=len(compiled.asm.get("cubin", b"")),
                                     shared=compiled.metadata.shared, **resources)
                    except Exception as exc:  # noqa: BLE001
                        entry.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:500])
                    report.append(entry)
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, action="append", help="compute capability, e.g. 90")
    ap.add_argument("--dtype", action="append", choices=DTYPES)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") != "0":
        env = {**os.environ, "TRITON_INTERPRET": "0"}
        argv = sys.argv[1:] if argv is None else list(argv)
        return subprocess.run([sys.executable, "-m", "lossreg.kernels.aot", *argv],
                              env=env).returncode
    report = compile_all(tuple(args.arch or (80, 90)), tuple(args.dtype or DTYPES))
    if args.json:
        print(json.dumps(report))
    else:
        for e in report:
            extra = (f"regs={e.get('registers')} spills={e.get('spill_bytes')}"
                     if e.get("ok") else e.get("error"))
            print(f"{'ok  ' if e.get('ok') else 'FAIL'} {e['arch']} {e['instance']}."
                  f"{e['kernel']}[{e['dtype']}] {extra}")
    return 0 if report and all(e.get("ok") for e in report) else 1


if __name__ == "__main__":
    sys.exit(main())
