"""Budgeted plans, the cost model behind them, case limits and default dtypes.

Plans only: nothing is executed. The registry is the real one; the budget tests use a
few losses so that the cost model's input models stay quick to build."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from lossreg import costmodel, planning
from lossreg.planning import CHECKS, TIMING, HarnessError, Task, parse_budget, plan_budget
from lossreg.registry import default_registry

NAMES = ["mse", "cross_entropy", "wcss"]


@pytest.fixture(scope="module")
def reg():
    return default_registry()


@pytest.fixture(scope="module")
def empty():
    return costmodel.History()


@pytest.mark.parametrize("text,seconds", [("90s", 90), ("10m", 600), ("1h", 3600),
                                          ("600", 600), ("1.5m", 90), (" 2M ", 120), (45, 45)])
def test_parse_budget(text, seconds):
    assert parse_budget(text) == seconds


@pytest.mark.parametrize("text", ["", "10 minutes", "-5m", "0", "m", "1d", "5%", True])
def test_bad_budget_is_rejected_with_the_forms(text):
    with pytest.raises(HarnessError, match="budget"):
        parse_budget(text)


def test_budget_plan_covers_every_loss_impl_and_fits(reg, empty):
    plan = plan_budget(reg, NAMES, "cpu", None, None, "10m", history=empty)
    assert plan.estimated_seconds <= 600
    assert plan.estimated_seconds == pytest.approx(sum(plan.breakdown.values()))
    assert 1 <= plan.rounds <= planning.MAX_ROUNDS
    for name in NAMES:
        spec = reg.get(name)
        for impl in spec.implementations.values():
            if impl.backend == "compile":  # opt-in on a CPU
                continue
            checked = [t for t in plan.tasks if t.spec.name == name and t.impl.name == impl.name
                       and t.checks == CHECKS]
            skipped = [r for t, r in plan.skipped if t.spec.name == name
                       and t.impl.name == impl.name and t.checks == CHECKS]
            assert checked or skipped, f"{name}/{impl.name} neither checked nor skipped"
            assert all(t.n in spec.sizes["quick"] for t in checked)
            timed = [t for t in plan.tasks if t.spec.name == name and t.impl.name == impl.name
                     and t.checks == TIMING]
            if impl.uses_triton:  # the interpreter is never timed
                assert not timed
            elif checked:
                assert len(timed) == 1
    assert all(t.seconds is not None and t.seconds > 0 for t in plan.tasks)


def test_budget_plan_gives_fewer_rounds_or_sizes_to_a_smaller_budget(reg, empty):
    big = plan_budget(reg, NAMES, "cpu", None, None, "1h", history=empty)
    small = plan_budget(reg, NAMES, "cpu", None, None, "40s", history=empty)
    assert big.rounds == planning.MAX_ROUNDS and big.estimated_seconds <= 3600
    assert small.estimated_seconds < big.estimated_seconds
    assert small.rounds < big.rounds or small.notes
    fixed = plan_budget(reg, NAMES, "cpu", None, None, "1h", rounds=2, history=empty)
    assert fixed.rounds == 2


def test_representative_size_is_the_middle_default_size(reg):
    assert planning.representative_size(reg.get("mse")) == sorted(
        reg.get("mse").sizes["default"])[len(reg.get("mse").sizes["default"]) // 2]
    plan = plan_budget(reg, ["mse"], "cpu", None, None, "1h", history=costmodel.History())
    timed = {t.n for t in plan.tasks if t.checks == TIMING}
    assert timed == {planning.representative_size(reg.get("mse"))}


def _history(n, check_s=None, time_ms=None, case_s=None, rounds=1):
    rows = []
    base = dict(run_id="r1", device_type="cpu", loss="mse", impl="torch", dtype="float32",
                n=n, status="ok", rounds=rounds)
    if check_s is not None:
        rows += [dict(base, check="correctness", mode="forward", time_ms=None,
                      case_seconds=check_s / 2),
                 dict(base, check="gradient", mode="backward", time_ms=None,
                      case_seconds=check_s / 2)]
    if time_ms is not None:
        rows += [dict(base, check="throughput", mode=m, time_ms=time_ms, case_seconds=case_s)
                 for m in ("forward", "backward", "full")]
    return costmodel.History.from_frame(pd.DataFrame(rows))


def test_cost_model_uses_history_when_present_and_the_estimate_otherwise(reg):
    spec = reg.get("mse")
    impl = spec.implementations["torch"]
    quick = Task(spec, impl, "float32", min(spec.sizes["quick"]), "quick", CHECKS)
    bare = costmodel.CostModel("cpu", costmodel.History())
    estimate = bare.check_seconds(quick)
    assert bare.source(quick, "correctness") == "estimate" and estimate > 0
    known = costmodel.CostModel("cpu", _history(quick.n, check_s=estimate * 7 + 1.0))
    assert known.check_seconds(quick) == pytest.approx(estimate * 7 + 1.0)
    assert known.source(quick, "correctness") == "history"
    # another device type's history does not count
    assert costmodel.CostModel("cuda", _history(quick.n, check_s=99.0)).check_seconds(
        quick) != 99.0

    n = planning.representative_size(spec)
    timed = Task(spec, impl, "float32", n, "default", TIMING)
    slow = costmodel.CostModel("cpu", _history(n, time_ms=500.0))  # per-call times only
    assert slow.call_ms(timed, "full") == 500.0
    assert slow.timing_seconds(timed, 1) > 3 * bare.timing_seconds(timed, 1)
    # case_seconds wins over per-call times, scaled between round counts
    whole = costmodel.CostModel("cpu", _history(n, time_ms=500.0, case_s=40.0, rounds=5))
    assert whole.timing_seconds(timed, 5) == pytest.approx(40.0)
    assert whole.timing_seconds(timed, 1) < 40.0
    # a neighbouring size of the same case is scaled by the estimate's ratio
    near = costmodel.CostModel("cpu", _history(n // 4, time_ms=2.0))
    assert near.call_ms(timed, "full") > 2.0 and near.source(timed, "throughput") == "history"


def test_history_reads_results_folders(tmp_path):
    from lossreg.results import SCHEMA

    df = pd.DataFrame([dict(run_id="r", device_type="cpu", loss="mse", impl="torch",
                            dtype="float32", n=7, check="throughput", mode="full",
                            status="ok", time_ms=3.5)])
    for c in SCHEMA.names:
        if c not in df.columns:
            df[c] = None
    (tmp_path / "run").mkdir()
    df.to_parquet(tmp_path / "run" / "run-x.parquet")
    (tmp_path / "README.md").write_text("not parquet")
    (tmp_path / "_skip").mkdir()
    (tmp_path / "_skip" / "bad.parquet").write_text("not parquet either")
    h = costmodel.load_history([tmp_path])
    assert h.call_ms[("cpu", "mse", "torch", "float32", 7)]["full"] == 3.5


def test_case_timeout_is_generous_and_scales_with_the_estimate(reg):
    spec = reg.get("mse")
    impl = spec.implementations["torch"]
    small = Task(spec, impl, "float32", min(spec.sizes["quick"]), "quick", CHECKS)
    assert planning.case_timeout(small, "cpu") == planning.TIMEOUT_FLOOR_S["cpu"]
    assert planning.case_timeout(small, "cuda") == planning.TIMEOUT_FLOOR_S["cuda"]
    huge = Task(spec, impl, "float32", max(spec.sizes["large"]) * 64, "large", TIMING)
    model = costmodel.cost_model("cpu")
    assert planning.case_timeout(huge, "cpu") == pytest.approx(
        planning.TIMEOUT_FACTOR * model.timing_seconds(huge, 1))
    assert planning.case_timeout(huge, "cpu") > planning.TIMEOUT_FLOOR_S["cpu"]


def test_default_dtypes_by_command_and_device():
    assert planning.default_dtypes("cpu", "bench") == ["float32"]
    assert planning.default_dtypes("cuda", "bench") == ["float32", "bfloat16"]
    assert planning.default_dtypes("cpu", "check") == ["float32", "float64", "bfloat16",
                                                       "float16"]
    assert planning.default_dtypes("cuda", "check") == ["float32", "bfloat16", "float16"]
    with pytest.raises(HarnessError, match="bench or check"):
        planning.default_dtypes("cpu", "plot")


def test_plan_describe_and_json(reg, empty):
    plan = plan_budget(reg, ["mse"], "cpu", None, None, "5m", history=empty)
    text = plan.describe()
    assert "plan: 1 losses" in text and "expected ~" in text and "5m00s budget" in text
    assert f"{plan.rounds} round" in text
    data = json.loads(json.dumps(plan.to_json()))
    assert data["losses"] == ["mse"]
    assert len(data["cases"]) == len(plan.tasks)
    assert data["estimated_seconds"] == pytest.approx(plan.estimated_seconds, abs=0.1)
    assert {c["source"] for c in data["cases"]} <= {"history", "estimate"}
    assert "took 1m00s" in plan.compare(60) and "x)" in plan.compare(60)


def test_make_plan_keeps_working_for_explicit_sizes(reg):
    plan = planning.make_plan(reg, ["mse"], "cpu", None, None, "default")
    assert {t.n for t in plan.tasks} == set(reg.get("mse").sizes["default"])
    assert all(t.checks is None for t in plan.tasks)
    with pytest.raises(HarnessError, match="unknown sizes"):
        planning.make_plan(reg, ["mse"], "cpu", None, None, "huge")
