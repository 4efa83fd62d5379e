"""Ahead-of-time proof of the memory-bound kernels, read from their own cubins (no GPU).

For sm_80 and sm_90 and float32/bfloat16 inputs: each kernel compiles, spills nothing,
leaves room for at least two resident blocks per SM (registers x warps), and a
memory-bound kernel's main loop moves its data with 128-bit global loads and stores.
A representative kernel of each template runs by default; the whole matrix is
``slow`` (LOSSREG_DEEP_TESTS=1 or ``-m slow``)."""

import json
import os
import subprocess
import sys

import pytest

from lossreg.kernels import HAVE_TRITON, aot

SASS_LOOP = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;          /* 0x000 */
        /*0010*/                   LDG.E R2, [R4.64] ;             /* 0x000 */
.L_x_1:
        /*0020*/              @!P0 LDG.E.128 R8, [R6.64] ;         /* 0x000 */
        /*0030*/              @!P0 LDG.E.64 R12, [R10.64] ;        /* 0x000 */
        /*0040*/              @!P0 STG.E.128 [R14.64], R8 ;        /* 0x000 */
        /*0050*/              @P1 BRA `(.L_x_1) ;                   /* 0x000 */
        /*0060*/                   STG.E.U16 [R4.64], R2 ;         /* 0x000 */
        /*0064*/              @!P2 LDG.E.STRONG.GPU R3, [R6.64] ;  /* 0x000 */
        /*0068*/              @!P2 BRA 0x64 ;                       /* 0x000 */
        /*0070*/                   BRA 0x70;                       /* 0x000 */
"""

SASS_STRAIGHT = """
        /*0000*/              @!P0 LDG.E.128 R8, [R6.64] ;         /* 0x000 */
        /*0010*/              @!P0 LDG.E R9, [R6.64+0x10] ;        /* 0x000 */
        /*0020*/              @!P1 STG.E.64 [R14.64], R8 ;         /* 0x000 */
        /*0030*/                   BRA 0x30;                       /* 0x000 */
"""


def test_main_loop_widths_come_from_the_innermost_loading_loop():
    w = aot.memory_widths(SASS_LOOP)
    assert w["in_loop"] and w["load_bits"] == 128 and w["store_bits"] == 128
    assert w["loads"] == 2 and w["stores"] == 1  # the scalar load/store outside is not counted


def test_straight_line_kernel_is_read_whole_and_self_branch_is_no_loop():
    w = aot.memory_widths(SASS_STRAIGHT)
    assert not w["in_loop"]
    assert (w["load_bits"], w["store_bits"], w["loads"], w["stores"]) == (128, 64, 2, 1)
    assert aot.memory_widths(SASS_STRAIGHT.replace("LDG.E.128", "LDG.E"))["load_bits"] == 32


@pytest.mark.parametrize("regs,warps,blocks", [(32, 8, 8), (40, 8, 6), (64, 8, 4),
                                              (128, 8, 2), (129, 8, 1), (255, 4, 2),
                                              (168, 4, 3), (16, 4, 16)])
def test_blocks_per_sm_from_registers_and_warps(regs, warps, blocks):
    assert aot.blocks_per_sm(regs, warps, 0, 80) == blocks


def test_shared_memory_limits_blocks():
    assert aot.blocks_per_sm(32, 4, 80 * 1024, 80) == 2
    assert aot.blocks_per_sm(32, 4, 80 * 1024, 90) == 2
    assert aot.blocks_per_sm(32, 4, 120 * 1024, 80) == 1


def violations(report, known=False):
    """Each entry that breaks the module's rules, with why (``known``: only those
    listed in ``aot.KNOWN_VIOLATIONS``; else only those not listed)."""
    bad = []
    for e in report:
        if e.get("ok") and bool(aot.known_violation(e)) != known:
            continue
        name = f"{e['arch']} {e['instance']}.{e['kernel']}[{e['dtype']}] {e['variant']}"
        if not e["ok"]:
            bad.append(f"{name}: {e['error']}")
            continue
        if e["spill_bytes"]:
            bad.append(f"{name}: {e['spill_bytes']} bytes of local memory (spills)")
        if e["blocks_per_sm"] < 2:
            bad.append(f"{name}: {e['registers']} registers x {e['num_warps']} warps allow "
                       f"{e['blocks_per_sm']} block per SM")
        need = aot.vector_rule(e)
        if need and e["load_bits"] < 128:
            bad.append(f"{name}: main loop loads {e['load_bits']}-bit, not 128")
        if need == "loads+stores" and e["store_bits"] < 128:
            bad.append(f"{name}: main loop stores {e['store_bits']}-bit, not 128")
    return bad


def _compile(args):
    out = subprocess.run([sys.executable, "-m", "lossreg.kernels.aot", "--json", *args],
                         capture_output=True, text=True, timeout=1800)
    assert out.stdout.strip(), out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1]), out.returncode


needs_triton = pytest.mark.skipif(not HAVE_TRITON, reason="needs triton")
DEEP = os.environ.get("LOSSREG_DEEP_TESTS") == "1"


@needs_triton
def test_representative_kernels_pass_on_sm80_and_sm90():
    args = ["--dtype", "fp32", "--dtype", "bf16"]
    for name in aot.REPRESENTATIVE:
        args += ["--instance", name]
    report, rc = _compile(args)
    assert {e["instance"] for e in report} == set(aot.REPRESENTATIVE)
    assert {e["arch"] for e in report} == {"sm_80", "sm_90"}
    assert not violations(report), "\n".join(violations(report))
    # each listed violation still happens (else take it off aot.KNOWN_VIOLATIONS)
    listed = [e for e in report if e["ok"] and aot.known_violation(e)]
    assert all(violations([e], known=True) for e in listed), "a listed violation is gone"
    assert rc == 0


@needs_triton
def test_widest_and_bfloat16_aligned_rows_pass():
    """The aligned-rows template's two hard cases, its backward (the fullest kernel):
    three rows of 4096 per program (needs the register cap for 2 blocks/SM) and
    bfloat16 rows of 64 (needs 4 warps for 128-bit accesses)."""
    report, rc = _compile(["--instance", "triplet_lp", "--kernel", "_aligned_bwd",
                           "--variant", "BLOCK_D=4096", "--variant", "BLOCK_D=64,",
                           "--dtype", "bf16"])
    assert len(report) == 4 and {e["arch"] for e in report} == {"sm_80", "sm_90"}
    assert not violations(report), "\n".join(violations(report))
    assert all(aot.vector_rule(e) == "loads+stores" for e in report)
    assert rc == 0


@needs_triton
@pytest.mark.slow
@pytest.mark.skipif(not DEEP, reason="the whole matrix: LOSSREG_DEEP_TESTS=1")
@pytest.mark.parametrize("arch", [80, 90])
def test_every_template_kernel_passes(arch):
    report, rc = _compile(["--arch", str(arch), "--dtype", "fp32", "--dtype", "bf16"])
    assert {e["instance"] for e in report} >= set(aot.REPRESENTATIVE)
    assert not violations(report), "\n".join(violations(report))
    listed = [e for e in report if e["ok"] and aot.known_violation(e)]
    assert all(violations([e], known=True) for e in listed), "a listed violation is gone"
    assert rc == 0


def test_the_same_kernel_reads_the_same_with_any_selection():
    if not HAVE_TRITON:
        pytest.skip("needs triton")
    one, _ = _compile(["--arch", "90", "--dtype", "fp32", "--instance", "mse"])
    both, _ = _compile(["--arch", "90", "--dtype", "bf16", "--dtype", "fp32",
                        "--instance", "mse"])
    key = lambda e: (e["kernel"], e["dtype"], e["variant"])  # noqa: E731
    fields = ("registers", "spill_bytes", "load_bits", "store_bits", "blocks_per_sm")
    first = {key(e): [e[f] for f in fields] for e in one}
    again = {key(e): [e[f] for f in fields] for e in both if e["dtype"] == "fp32"}
    assert first == again
