"""`python -m lossreg.gpu_check --plan --json`: the GPU run's plan on any machine."""

from __future__ import annotations

import json

import pytest

from lossreg import gpu_check
from lossreg.registry import default_registry


def test_plan_json_covers_every_loss_within_the_gpu_budget(capsys):
    assert gpu_check.main(["--plan", "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1, "one JSON object on one line"
    plan = json.loads(out[0])
    names = {s.name for s in default_registry().list()}
    assert set(plan["losses"]) == names
    assert 0 < plan["estimated_seconds"] <= gpu_check.GPU_BUDGET_S == 480
    assert plan["device_type"] == "cuda"
    assert set(plan["dtypes"]) == {"float32", "bfloat16"}
    timed = [c for c in plan["cases"] if c["checks"] == ["throughput"]]
    checked = [c for c in plan["cases"] if c["checks"] == ["correctness", "gradient"]]
    assert timed and checked
    assert sum(c["preset"] == "large" for c in timed) >= len(timed) / 2
    # a loss timed below the large sizes is named in the plan's notes
    below = {c["loss"] for c in timed if c["preset"] != "large"}
    assert all(f"{name} (" in " ".join(plan["notes"]) for name in below)
    assert all(c["preset"] == "quick" for c in checked)
    assert not any(c["impl"] == "compile" for c in plan["cases"])
    # every loss is timed, and every timed loss x impl x dtype is checked too
    assert {c["loss"] for c in timed} == names
    assert {(c["loss"], c["impl"], c["dtype"]) for c in timed} <= {
        (c["loss"], c["impl"], c["dtype"]) for c in checked}
    triton = {c["loss"] for c in timed if c["impl"].startswith("triton")}
    assert triton, "Triton kernels are timed on the GPU"


def test_json_needs_plan():
    with pytest.raises(SystemExit):
        gpu_check.main(["--json"])
