"""Ahead-of-time proof of the memory-bound kernels, read from their own cubins (no GPU).

For sm_80 and sm_90 and float32/bfloat16 inputs: each kernel compiles, spills nothing,
leaves room for at least two resident blocks per SM (registers x warps), and a
memory-bound kernel's main loop moves its data with 128-bit global loads and stores.
By default every (template instance, kernel) is checked once per arch and dtype
(``--each``, cached in build/aot-cache); the whole matrix is ``slow``
(LOSSREG_DEEP_TESTS=1)."""

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
        need = (aot.vector_rule(e) or "").split("+")
        if "loads" in need and e["load_bits"] < 128:
            bad.append(f"{name}: main loop loads {e['load_bits']}-bit, not 128")
        if "stores" in need and e["store_bits"] < 128:
            bad.append(f"{name}: main loop stores {e['store_bits']}-bit, not 128")
    return bad


TTGIR_NLL_BWD = """
    %label_24 = tt.load %label_23, %row_ok_8, %cst_2 : tensor<4x!tt.ptr<i64>, #ttg.slice<{dim = 1, parent = #blocked}>> loc(#loc72)
    %w_29 = tt.load %w_28, %row_ok_8, %cst : tensor<4x!tt.ptr<bf16>, #ttg.slice<{dim = 1, parent = #blocked}>> loc(#loc78)
    tt.store %2, %6, %valid_14 : tensor<4x1024x!tt.ptr<bf16>, #blocked> loc(#loc30)
    %x = tt.load %p : !tt.ptr<f32> loc(#loc1)
"""


def test_tile_accesses_count_whole_tiles_of_the_dtype():
    t = aot.tile_accesses(TTGIR_NLL_BWD, "bf16")
    assert t == {"tile_elements": 4096, "tile_loads": 0, "tile_stores": 1}
    streamed = TTGIR_NLL_BWD.replace("tensor<4x!tt.ptr<bf16>", "tensor<4x1024x!tt.ptr<bf16>")
    assert aot.tile_accesses(streamed, "bf16")["tile_loads"] == 1
    assert aot.tile_accesses(streamed, "fp32")["tile_loads"] == 0  # not that dtype's tile


@pytest.mark.parametrize("loads,stores,rule", [(1, 1, "loads+stores"), (0, 1, "stores"),
                                               (2, 0, "loads"), (0, 0, None)])
def test_vector_rule_judges_only_what_the_kernel_streams(loads, stores, rule):
    e = {"kernel": "_rowwise_bwd", "dtype": "bf16", "tile_loads": loads, "tile_stores": stores}
    assert aot.vector_rule(e) == rule
    assert aot.vector_rule({**e, "dtype": "fp16"}) is None
    assert aot.vector_rule({**e, "kernel": "_pairwise_reduce"}) is None
    bad = {**e, "ok": True, "instance": "x", "arch": "sm_90", "variant": "", "spill_bytes": 0,
           "blocks_per_sm": 2, "load_bits": 64, "store_bits": 64}
    assert bool(violations([bad])) == (rule is not None)


class _Source:
    def __init__(self, text):
        self.text = text

    def hash(self):
        return self.text


def test_cache_key_separates_what_decides_the_cubin(tmp_path, monkeypatch):
    pytest.importorskip("triton")
    from lossreg.kernels import aot_cache

    k = aot_cache.key(_Source("a"), {"num_warps": 8, "maxnreg": 128}, 90, "fp32")
    assert k == aot_cache.key(_Source("a"), {"maxnreg": 128, "num_warps": 8}, 90, "fp32")
    others = [aot_cache.key(_Source("b"), {"num_warps": 8, "maxnreg": 128}, 90, "fp32"),
              aot_cache.key(_Source("a"), {"num_warps": 8}, 90, "fp32"),
              aot_cache.key(_Source("a"), {"num_warps": 8, "maxnreg": 128}, 80, "fp32"),
              aot_cache.key(_Source("a"), {"num_warps": 8, "maxnreg": 128}, 90, "bf16")]
    assert len({k, *others}) == 5
    monkeypatch.setenv("LOSSREG_AOT_CACHE", str(tmp_path))
    assert aot_cache.load(k) is None
    aot_cache.store(k, {"registers": 40})
    assert aot_cache.load(k) == {"registers": 40}
    monkeypatch.setenv("LOSSREG_AOT_CACHE", "0")
    assert aot_cache.cache_dir() is None and aot_cache.load(k) is None


def test_each_kernel_takes_the_variants_in_turn():
    picks = {(d, cc): aot.each_kernel(["v0", "v1", "v2"], d, cc)
             for d in ("fp32", "bf16") for cc in (80, 90)}
    assert sorted(set(picks.values())) == ["v0", "v1", "v2"]
    assert aot.each_kernel(["only"], "bf16", 90) == "only"


def _compile(args, timeout=1800):
    # TRITON_INTERPRET=0 here, so the module does not start itself again: a timeout
    # kills the process that compiles, not a parent that would leave it running
    out = subprocess.run([sys.executable, "-m", "lossreg.kernels.aot", "--json", *args],
                         capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, "TRITON_INTERPRET": "0"})
    assert out.stdout.strip(), out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1]), out.returncode


needs_triton = pytest.mark.skipif(not HAVE_TRITON, reason="needs triton")
DEEP = os.environ.get("LOSSREG_DEEP_TESTS") == "1"


def _check(report, rc):
    assert {e["arch"] for e in report} == {"sm_80", "sm_90"}
    assert not violations(report), "\n".join(violations(report))
    # each listed violation still happens (else take it off aot.KNOWN_VIOLATIONS)
    listed = [e for e in report if e["ok"] and aot.known_violation(e)]
    assert all(violations([e], known=True) for e in listed), "a listed violation is gone"
    assert rc == 0


@needs_triton
@pytest.mark.timeout(1800)  # a cold cache on a busy 2-core machine
def test_every_kernel_passes_in_one_slot_and_templates_in_all():
    """Every (template instance, kernel), one specialization, in one (dtype, arch) slot
    of float32/bfloat16 x sm_80/sm_90 fixed by a hash of its names (``--each
    --spread``): ~100 compiles, under a minute on a cold cache here. The templates' many
    instances fill all four slots; the whole matrix is the deep test below."""
    report, rc = _compile(["--each", "--spread", "--jobs", "2",
                           "--dtype", "fp32", "--dtype", "bf16"])
    slots = {}
    for e in report:
        slots.setdefault((e["instance"], e["kernel"]), []).append((e["dtype"], e["arch"]))
    assert all(len(s) == 1 for s in slots.values()), slots
    for (i, k), s in slots.items():
        dtype, cc = aot.spread_slot(i, k, ("fp32", "bf16"), (80, 90))
        assert s == [(dtype, f"sm_{cc}")], (i, k, s)
    want = {(d, a) for d in ("fp32", "bf16") for a in ("sm_80", "sm_90")}
    for kernel in ("_pointwise_fwd", "_pointwise_bwd", "_aligned_fwd", "_aligned_bwd"):
        assert {s[0] for (_, k), s in slots.items() if k == kernel} == want, kernel
    kinds = {k for _, k in slots}
    assert kinds >= {"_pointwise_fwd", "_rowwise_bwd", "_aligned_bwd", "_project_rows",
                     "_ce_rows", "_histogram_fwd", "_pairwise_reduce", "_td_fwd",
                     "_tokens_fwd", "_grpo_kernel"}
    _check(report, rc)


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
def test_nll_backward_and_row_projection_pass():
    """The two the full matrix failed on: nll's backward (reads no tile of scores: only
    its stores are judged, 128-bit) and the row projection (a defaulted constexpr)."""
    report, rc = _compile(["--instance", "nll", "--instance", "row_projection",
                           "--kernel", "_rowwise_bwd", "--kernel", "_project_rows",
                           "--dtype", "fp32", "--dtype", "bf16", "--jobs", "2"])
    assert {e["kernel"] for e in report} == {"_rowwise_bwd", "_project_rows"}
    bwd = [e for e in report if e["kernel"] == "_rowwise_bwd"]
    assert bwd and all(e["tile_loads"] == 0 and e["store_bits"] == 128 for e in bwd)
    _check(report, rc)


@needs_triton
def test_rowwise_compiles_for_a_single_class():
    """Rows of one class: the launcher makes C == 1 a constexpr (C is specialized)."""
    code = ("import triton.language as tl\n"
            "from lossreg.kernels import aot, template_instances\n"
            "from lossreg.registry import default_registry\n"
            "default_registry()\n"
            "inst = next(i for i in template_instances() if i.name == 'nll')\n"
            "k, sig, ce, opt = inst.aot_sources('fp32')[2]\n"
            "sig = {n: t for n, t in sig.items() if n != 'C'}\n"
            "c = aot.compile_one(k, sig, {**ce, 'C': 1}, opt, 90)\n"
            "print(aot.resource_usage(c.asm['cubin'])['registers'])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "TRITON_INTERPRET": "0"}, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.split()[-1]) > 0


@needs_triton
@pytest.mark.slow
@pytest.mark.skipif(not DEEP, reason="the whole matrix: LOSSREG_DEEP_TESTS=1")
@pytest.mark.timeout(4 * 3600)
def test_every_template_kernel_passes():
    report, rc = _compile(["--jobs", "2", "--dtype", "fp32", "--dtype", "bf16"],
                          timeout=4 * 3600)
    assert len({e["instance"] for e in report}) > 40
    _check(report, rc)


FIELDS = ("registers", "spill_bytes", "local_bytes", "load_bits", "store_bits",
          "blocks_per_sm", "tile_loads", "tile_stores")


@needs_triton
def test_the_same_kernel_reads_the_same_with_any_selection():
    """The issue's case: triplet_lp's ``_aligned_fwd`` float32 on sm_90 read 128
    registers and spills with the default dtypes, 161-169 and none alone. Compiled
    fresh (no cache) alone and among the other dtypes in two processes, and read back
    from the cache, its figures are the same."""
    args = ["--arch", "90", "--instance", "triplet_lp", "--kernel", "_aligned_fwd",
            "--variant", "BLOCK_D=4096,BLOCK_M=1,HAS_C=True,HAS_Y=False,RBLOCK=1024,REDUCE=True"]
    runs = [_compile([*args, "--dtype", "fp32", "--no-cache"])[0],
            _compile([*args, "--dtype", "fp16", "--dtype", "bf16", "--dtype", "fp32",
                      "--no-cache", "--jobs", "2"])[0],
            _compile([*args, "--dtype", "fp32"])[0]]
    key = lambda e: (e["kernel"], e["dtype"], e["variant"])  # noqa: E731
    seen = [{key(e): [e[f] for f in FIELDS] for e in r if e["dtype"] == "fp32"}
            for r in runs]
    assert len(seen[0]) == 1 and all(s == seen[0] for s in seen), seen
    assert len(runs[1]) == 3 and not any(e["cached"] for r in runs[:2] for e in r)
    assert all(e["registers"] <= 128 for e in runs[0])  # the template's register cap


def test_hints_skip_what_the_kernel_does_not_specialize():
    """A launch gives ``do_not_specialize`` arguments no divisibility hint: neither
    does the AOT build (with one, the row-wise kernels read 128-bit that at a launch
    moved 32-bit)."""
    from types import SimpleNamespace as NS

    params = [NS(name=n, do_not_specialize=n == "T", do_not_specialize_on_alignment=False)
              for n in ("X", "T", "N", "BLOCK")]
    kernel = NS(params=params, arg_names=[p.name for p in params])
    attrs = aot._attrs(kernel, {"X": "*fp32", "T": "i32", "N": "i64", "BLOCK": "constexpr"})
    assert set(attrs) == {(0,), (2,)}


@pytest.mark.parametrize("listing,arch,ok", [(" Function _k:\n  REG:30", 90, True),
                                             (" Function _k:\n Function _j:", 90, False),
                                             (" Function _j:\n  REG:30", 90, False),
                                             (" Function _k:\n  REG:30", 80, False)])
def test_a_report_must_be_the_compiled_kernels_own(monkeypatch, listing, arch, ok):
    from types import SimpleNamespace as NS

    from lossreg.kernels import aot_sass

    monkeypatch.setattr(aot_sass, "_cuobjdump", lambda cubin, flag: listing)
    compiled = NS(asm={"cubin": b""}, metadata=NS(name="_k", target=NS(arch=90)))
    if ok:
        aot._attributed(compiled, arch)
    else:
        with pytest.raises(RuntimeError):
            aot._attributed(compiled, arch)
