"""Distributed losses over gloo ranks on this machine, the checker's fault handling,
and the split of a sharded benchmark run (issue 19)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from lossreg import Impl, LossSpec
from lossreg.collectives import Sharding, rank_and_size
from lossreg.distributed import check_distributed
from lossreg.planning import HarnessError
from lossreg.sharding import RankInfo, current, device_for, select
from lossreg_plugins.distributed.vocab_ce import SumOverRanks
from loss_tester import LossTester

LOSSES = ("vocab_parallel_cross_entropy", "vocab_parallel_linear_cross_entropy",
          "gathered_info_nce")
VOCAB_PARALLEL = LOSSES[:2]


@pytest.fixture(scope="module")
def two_rank_rows():
    return check_distributed(list(LOSSES), 2, dtypes=["float64", "float32"], timeout=600)


def test_two_ranks_pass_every_check(two_rank_rows):
    rows = two_rank_rows
    bad = [(r["loss"], r["impl"], r["dtype"], r["rank"], r["params"], r["message"])
           for r in rows if r["status"] != "ok"]
    assert not bad, bad[:5]
    for loss in LOSSES:
        mine = [r for r in rows if r["loss"] == loss]
        assert {r["rank"] for r in mine} == {0, 1}
        assert {r["world_size"] for r in mine} == {2}
        assert {r["impl"] for r in mine} == {"torch", "fused"}
        assert {r["check"] for r in mine} == {"correctness", "gradient"}
        # every edge case ran on both ranks
        edges = {(r["rank"], r["params"]) for r in mine if "edge_case" in r["params"]}
        assert len(edges) == 2 * len(__import__("lossreg").get(loss).edge_cases)


def test_vocab_parallel_communication_is_o_tokens(two_rank_rows):
    """Bytes per step (forward + backward) of the vocab-parallel losses at the default
    options: at most 16 x tokens per rank in float32 (twice that in float64), so at most
    16 x tokens x world size over the group; never anything like tokens x vocab."""
    checked = 0
    for r in two_rank_rows:
        if r["loss"] not in VOCAB_PARALLEL or r["check"] != "gradient" or '"edge_case"' in \
                r["params"] or '"label_smoothing": 0.0' not in r["params"] or \
                '"reduction": "mean"' not in r["params"]:
            continue
        per_token = 16 if r["dtype"] == "float32" else 32
        assert 0 < r["comm_bytes"] <= per_token * r["n"], r
        checked += 1
    assert checked == 2 * 2 * 2 * 2 * 2  # losses x impls x dtypes x sizes x ranks
    nce = [r["comm_bytes"] for r in two_rank_rows if r["loss"] == "gathered_info_nce"
           and r["check"] == "gradient"]
    assert nce and all(b > 0 for b in nce)


# ---------------------------------------------------------------- a toy loss, and faults
def toy_reference(x, reduction="sum"):
    if reduction != "sum":
        raise ValueError(f"toy: reduction must be 'sum', got {reduction!r}")
    return (x * x).sum()


def toy_right(x, reduction="sum"):
    return SumOverRanks.apply((x * x).sum(), None)


def toy_local_only(x, reduction="sum"):
    return (x * x).sum()  # forgets the other ranks: every rank's value is wrong


def toy_dies(x, reduction="sum"):
    if rank_and_size()[0] == 1:
        os._exit(3)
    return toy_right(x)


def toy_hangs(x, reduction="sum"):
    if rank_and_size()[0] == 1:
        time.sleep(3600)
    return toy_right(x)


def toy_inputs(case):
    return {"x": case.randn(case.n)}


def toy_spec() -> LossSpec:
    spec = LossSpec(name="toy_sum_squares", family="test", formula=r"\sum_i x_i^2",
                    reference=toy_reference, make_inputs=toy_inputs,
                    options={"reduction": "sum"},
                    sizes={"quick": [7], "default": [7], "large": [7]})
    spec.sharding = Sharding(inputs={"x": "split:0"}, output="replicate")
    for fn in (toy_right, toy_local_only, toy_dies, toy_hangs):
        name = fn.__name__.removeprefix("toy_")
        spec.implementations[name] = Impl(name=name, fn=fn)
    return spec


def test_checker_fails_a_wrong_implementation_and_passes_a_right_one():
    rows = check_distributed([toy_spec()], 2, dtypes=["float64"], impls=["right", "local_only"],
                             timeout=300)
    status = {(r["impl"], r["rank"], r["check"]): r["status"] for r in rows}
    assert status[("right", 0, "gradient")] == status[("right", 1, "gradient")] == "ok"
    assert status[("local_only", 0, "correctness")] == "fail"
    assert status[("local_only", 1, "correctness")] == "fail"


# the dying rank ends on its own, so its limit only needs to outlast a slow start-up;
# the hung one is waited for until its limit, so that one is short
@pytest.mark.parametrize("impl,words,limit", [("dies", "exited with status 3", 300.0),
                                              ("hangs", "hung", 12.0)])
def test_a_dead_or_hung_rank_becomes_error_rows(impl, words, limit):
    start = time.monotonic()
    rows = check_distributed([toy_spec()], 2, dtypes=["float64"], impls=[impl], timeout=limit)
    assert time.monotonic() - start < limit + 60  # the run ended: killed, not waited for
    rank1 = [r for r in rows if r["rank"] == 1]
    assert rank1 and all(r["status"] == "error" for r in rank1)
    assert any(words in r["message"] for r in rank1), [r["message"] for r in rank1]
    assert all(r["world_size"] == 2 for r in rows)


def test_bad_arguments_are_clear():
    with pytest.raises(HarnessError, match="not a distributed loss"):
        check_distributed(["mse"], 2)
    with pytest.raises(HarnessError, match="world_size"):
        check_distributed(list(LOSSES), 0)
    with pytest.raises(HarnessError, match="torchrun"):
        check_distributed(list(LOSSES), 2, device="cuda")


def fused_linear_small_chunks(*args, **kwargs):
    """The fused linear CE with chunks of ~400 logits: several chunks per rank, and
    vocabulary slices of 12 and 11 rows that alone would pick different steps."""
    from lossreg_plugins.distributed import linear_ce
    linear_ce.CHUNK_ELEMS = 400
    return linear_ce.fused(*args, **kwargs)


def test_fused_linear_chunks_agree_over_uneven_vocabulary_slices():
    """Each chunk is a collective: ranks that chunked their tokens differently sent
    buffers of different lengths (gloo aborted: 516 vs 512 bytes, vocabulary 16385 over
    2 ranks at the default sizes)."""
    import dataclasses

    import lossreg
    spec = lossreg.get("vocab_parallel_linear_cross_entropy")
    assert spec.input_params["quick"].get("vocab", 23) % 2 == 1  # uneven over 2 ranks
    spec, whole = dataclasses.replace(spec, implementations={}), spec
    spec.sharding = whole.sharding
    spec.implementations["small_chunks"] = Impl("small_chunks", fused_linear_small_chunks)
    rows = check_distributed([spec], 2, dtypes=["float64"], timeout=300)
    bad = [(r["check"], r["rank"], r["message"]) for r in rows if r["status"] != "ok"]
    assert rows and not bad, bad[:3]


# ---------------------------------------------------------------- sharded runs
def _tasks():
    tasks = []
    for li, loss in enumerate(("a", "b", "c", "d")):
        spec = SimpleNamespace(name=loss, input_params={"quick": {"vocab": 10 + li}})
        for n in (3, 50, 700, 9001):
            for impl in ("reference", "fast", "faster"):
                tasks.append(SimpleNamespace(spec=spec, impl=SimpleNamespace(name=impl),
                                             dtype="float32", n=n, preset="quick"))
    return tasks


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_select_covers_every_task_once_and_balances(world):
    tasks = _tasks()
    cost = lambda t: t.n * t.spec.input_params["quick"]["vocab"]  # noqa: E731
    shares = [select(tasks, cost, RankInfo(r, world, r, world)) for r in range(world)]
    ids = [id(t) for share in shares for t in share]
    assert sorted(ids) == sorted(id(t) for t in tasks)  # every task exactly once
    for share in shares:  # a loss's implementations at one size stay together
        keys = {(t.spec.name, t.n) for t in share}
        assert all(sum(1 for t in share if (t.spec.name, t.n) == k) == 3 for k in keys)
        assert share == [t for t in tasks if t in share]  # planned order kept
    loads = [sum(cost(t) for t in share) for share in shares]
    biggest_group = max(3 * cost(t) for t in tasks)
    assert max(loads) - min(loads) <= biggest_group  # the greedy's guarantee
    again = [select(tasks, cost, RankInfo(r, world, r, world)) for r in range(world)]
    assert again == shares  # the same answer on every rank


def test_current_reads_torchrun_environment():
    assert current({}) is None
    info = current({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"})
    assert info == RankInfo(3, 8, 1, 4)
    assert device_for(info, "cuda") == "cuda:1" and device_for(info, "cpu") == "cpu"
    with pytest.raises(ValueError, match="inconsistent"):
        current({"RANK": "8", "WORLD_SIZE": "8"})


TORCHRUN = shutil.which("torchrun", path=os.path.dirname(sys.executable))
DRIVER = """
import sys
import lossreg.api as api
from lossreg import sharding
sharding.run_sharded(api.bench, out=sys.argv[1], names=["mse", "bce", "huber", "hinge"],
                     device="cpu", sizes="quick", rounds=1)
"""


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("LOSSREG_DEEP_TESTS") != "1" or TORCHRUN is None,
                    reason="the torchrun bench takes minutes here: LOSSREG_DEEP_TESTS=1")
def test_torchrun_bench_writes_one_run(tmp_path):
    """What `torchrun --nproc-per-node 2 --no-python lossreg bench ...` runs per rank."""
    import lossreg

    out = tmp_path / "res"
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    cmd = [TORCHRUN, "--standalone", "--nproc-per-node", "2", str(driver), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list(out.glob("run-*.parquet"))) == 1
    assert not list(out.glob("_rank-*"))  # the ranks' folders went into the run
    df = lossreg.load_results(out)
    assert set(df["rank"]) == {0, 1} and set(df["world_size"]) == {2}
    key = ["loss", "impl", "dtype", "n", "check", "mode", "params"]
    assert not df.duplicated(key).any()
    timed = df[df["check"] == "throughput"]
    assert (timed.groupby(["loss", "impl", "dtype", "n"])["rank"].nunique() == 1).all()
    assert set(timed["loss"]) == {"mse", "bce", "huber", "hinge"}


# ---------------------------------------------------------------- the shared tester
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_gathered_info_nce_16bit_logits_in_float32(dtype):
    """In one process: the 16-bit verdicts reject the logits formed in the embeddings'
    dtype (logit_scale's gradient, a cancelling sum, 5-7% off in bfloat16) and a 1%-wrong
    implementation, and pass every implementation (logits in float32, rounded once),
    their worst error within a factor 10 of the (narrowed) tolerance."""
    import lossreg
    from lossreg_plugins.distributed.info_nce import _reduce, _symmetric
    from test_lowprec import _rows, one_percent_wrong
    spec = lossreg.get("gathered_info_nce")
    rtol = spec.tolerance(dtype)[0]

    def in_dtype(image, text, logit_scale, local_loss=False, reduction="mean"):
        logits = logit_scale.reshape(()).exp() * image @ text.T
        return _reduce(_symmetric(logits), image.shape[0], reduction)

    assert rtol < 1e-2, "a 1% error must fail on the norm"
    from lossreg import verify
    from lossreg.spec import DTYPES, Case
    sharp = spec.edge_cases["sharp_temperature"](Case(1, DTYPES[dtype], "cpu", seed=11))
    in_dtype_rows = [verify.check_gradient(spec, Impl("in_dtype", in_dtype), sharp,
                                           spec.options, spec.tolerance(dtype), 1)]
    in_dtype_rows += [v for o in spec.option_sets()
                      for v in _rows(spec, Impl("in_dtype", in_dtype), dtype, o)]
    assert not all(v.ok for v in in_dtype_rows)
    assert not all(v.ok for v in _rows(spec, one_percent_wrong(spec), dtype, spec.options))
    worst = 0.0
    for name, impl in spec.implementations.items():
        if name == "compile":
            continue
        for opts in spec.option_sets():
            rows = _rows(spec, impl, dtype, opts)
            assert all(v.ok for v in rows), (name, opts, [v.message for v in rows])
            worst = max([worst] + [v.rel for v in rows if v.rel is not None])
    assert worst > rtol / 10, f"worst rel {worst:.3g}, tolerance {rtol:g}"


class TestGatheredInfoNce(LossTester):
    loss = "gathered_info_nce"
    no_oracle = "tests/plugins/test_distributed.py"


class TestVocabParallelCrossEntropy(LossTester):
    loss = "vocab_parallel_cross_entropy"
    no_oracle = "tests/plugins/test_distributed.py"


class TestVocabParallelLinearCrossEntropy(LossTester):
    loss = "vocab_parallel_linear_cross_entropy"
    no_oracle = "tests/plugins/test_distributed.py"
