"""The harness: verdicts, error isolation, throughput rows, triton skipped on CPU, the
row columns (case_seconds, world_size/rank, model_bytes), and the shape of lossreg/
itself (module size, no import cycle)."""

import ast
from pathlib import Path

import pandas as pd
import pytest
import torch

import lossreg
from lossreg.runner import execute
from lossreg.verify import compare_tensors as compare
from lossreg.registry import Registry
from lossreg.results import COLUMNS
from lossreg.spec import Impl, LossSpec


def _spec(**impls):
    def ref(input, target, reduction="mean"):
        t = (input - target) ** 2
        return t if reduction == "none" else (t.mean() if reduction == "mean" else t.sum())

    spec = LossSpec(name="sq", family="t", formula="x^2", reference=ref,
                    make_inputs=lambda c: {"input": c.randn(c.n), "target": c.randn(c.n)},
                    sizes={"quick": [64, 130], "default": [256, 1024], "large": [4096]},
                    check_options=[{"reduction": "none"}])
    reg = Registry()
    reg.losses["sq"] = spec
    for name, fn in impls.items():
        spec.implementations[name] = Impl(name, fn, plugin="test")
    return reg


def _good(input, target, reduction="mean"):
    return torch.nn.functional.mse_loss(input, target, reduction=reduction)


def test_compare_verdicts():
    ref = torch.tensor([1.0, 2.0, float("nan")], dtype=torch.float64)
    assert compare(torch.tensor([1.0, 2.0, float("nan")]), ref, 1e-5, 1e-5).ok
    assert not compare(torch.tensor([1.0, 2.0, 3.0]), ref, 1e-5, 1e-5).ok  # lost a NaN
    assert not compare(torch.tensor([1.0, float("nan"), float("nan")]), ref, 1e-5, 1e-5).ok
    assert not compare(torch.tensor([1.0, 2.1, float("nan")]), ref, 1e-5, 1e-5).ok
    assert "shape" in compare(torch.ones(2), ref, 1e-5, 1e-5).message
    assert not compare(torch.tensor(float("inf")), torch.tensor(float("-inf"),
                                                                dtype=torch.float64), 1, 1).ok


def test_failures_become_rows_and_the_run_goes_on():
    def raises(input, target, reduction="mean"):
        raise RuntimeError("kernel exploded")

    def wrong_shape(input, target, reduction="mean"):
        return _good(input, target, "none")[:3]

    def nan(input, target, reduction="mean"):
        return _good(input, target, reduction) * float("nan")

    def bad_grad(input, target, reduction="mean"):
        return _good(input.detach(), target.detach(), reduction) + 0 * input.sum()

    reg = _spec(good=_good, raises=raises, wrong_shape=wrong_shape, nan=nan, bad_grad=bad_grad)
    df, _ = execute(["sq"], device="cpu", registry=reg)
    status = df.groupby("impl")["status"].agg(set)
    assert status["good"] == {"ok"} and status["reference"] == {"ok"}
    assert status["raises"] == {"error"}
    assert df[df.impl == "raises"]["message"].str.contains("kernel exploded").all()
    assert "fail" in status["wrong_shape"] and "fail" in status["nan"]
    bg = df[df.impl == "bad_grad"].set_index("check")["status"]
    assert set(bg["correctness"]) == {"ok"} and "fail" in set(bg["gradient"])
    assert list(df.columns) == COLUMNS


def test_bench_rows(tmp_path):
    reg = _spec(good=_good)
    df, writer = execute(["sq"], device="cpu", registry=reg, sizes="default", throughput=True,
                         out=tmp_path)
    t = df[df.check == "throughput"]
    assert set(t["mode"]) == {"forward", "backward", "full"}
    assert (t.status == "ok").all()
    assert (t.time_ms_p20 <= t.time_ms).all() and (t.time_ms <= t.time_ms_p80).all()
    assert (t[t.impl == "reference"].speedup == 1.0).all()
    assert t.speedup.notna().all() and (t.bw_fraction > 0).all() and (t.peak_gbps > 0).all()
    assert (t.gbps > 0).all() and (t.repeats >= 5).all()
    full = t[(t["mode"] == "full") & (t.n == 1024)]
    assert (full.peak_bytes > 0).all()
    # one gradcheck row for the reference
    gc = df[df.message.fillna("").str.contains("gradcheck")]
    assert len(gc) == 1 and gc.status.item() == "ok"
    on_disk = pd.read_parquet(tmp_path)
    assert len(on_disk) == len(df) and writer.final.exists()
    assert (df.world_size == 1).all() and (df["rank"] == 0).all()
    assert (df[df.status == "ok"].case_seconds > 0).all()
    # every row of one check of a case carries the same figure
    per = df[df.check != "throughput"].groupby(["impl", "n", "check"]).case_seconds.nunique()
    assert (per == 1).all()
    assert (t.model_bytes > 0).all()


def test_triton_throughput_is_skipped_on_cpu():
    df = lossreg.check(["mse"], device="cpu", impls=["triton"], dtypes=["float32"])
    assert (df[df.impl == "triton"].status == "ok").all()
    b = lossreg.bench(["mse"], device="cpu", impls=["triton"], sizes="quick", rounds=1,
                      out="/tmp/lossreg-test-skip", plots=False)
    t = b[(b.check == "throughput")]
    assert set(t.status) == {"skipped"} and t.message.str.contains("interpreter").all()


def test_edge_cases_are_rows():
    df = lossreg.check(["mse"], device="cpu", impls=["reference"], dtypes=["float32"])
    edges = df[df.params.str.contains("edge_case")]
    assert len(edges) == len(lossreg.get("mse").edge_cases) and (edges.status == "ok").all()
    assert 4097 in set(edges.n)


@pytest.mark.slow
def test_compile_implementation_on_cpu():
    df = lossreg.check(["mse"], device="cpu", impls=["compile"], dtypes=["float32"])
    assert len(df) and (df.status == "ok").all(), df[df.status != "ok"].message.tolist()


def test_unsupported_option_is_a_skipped_row_not_an_error():
    from lossreg import UnsupportedOption

    def no_none(input, target, reduction="mean"):
        if reduction == "none":
            raise UnsupportedOption("sq: the no_none implementation cannot express "
                                    "reduction='none'")
        return _good(input, target, reduction)

    df, _ = execute(["sq"], device="cpu", registry=_spec(no_none=no_none))
    rows = df[df.impl == "no_none"]
    params = rows.params.str.contains('"none"')
    assert set(rows[params].status) == {"skipped"}
    assert rows[params].message.str.contains("cannot express").all()
    assert set(rows[~params].status) == {"ok"}


def test_unsupported_inputs_at_timing_are_a_skipped_row_not_an_error(tmp_path):
    """The timed inputs (their own seed) can hold what an implementation cannot express
    although the checked ones did not: that throughput row is skipped, with the reason."""
    import dataclasses

    from lossreg import UnsupportedOption

    def picky(input, target, reduction="mean"):
        raise UnsupportedOption("sq: the picky implementation cannot express these inputs")

    def timing_only(tasks):
        return [dataclasses.replace(t, checks=("throughput",)) for t in tasks
                if t.impl.name == "picky" and t.n == 64]

    df, _ = execute(["sq"], device="cpu", registry=_spec(picky=picky), throughput=True,
                    out=tmp_path, select=timing_only)
    assert len(df) == 1 and df.iloc[0].check == "throughput"
    assert df.iloc[0].status == "skipped" and "cannot express" in df.iloc[0].message


def test_library_triton_kernels_are_checked_not_timed_on_cpu(tmp_path):
    reg = _spec()
    spec = reg.losses["sq"]
    spec.implementations["lib"] = Impl("lib", _good, kind="baseline", backend="somelib",
                                       uses_triton=True, plugin="t")
    spec.implementations["gpu_only"] = Impl("gpu_only", _good, kind="baseline",
                                            backend="somelib", uses_triton=True,
                                            devices=("cuda",), plugin="t")
    df, _ = execute(["sq"], device="cpu", registry=reg)
    assert set(df[df.impl == "lib"].status) == {"ok"}
    gpu = df[df.impl == "gpu_only"]
    assert set(gpu.status) == {"skipped"} and gpu.message.str.contains("cuda only").all()
    df, _ = execute(["sq"], device="cpu", registry=reg, throughput=True, out=tmp_path)
    timed = df[(df.impl == "lib") & (df.check == "throughput")]
    assert set(timed.status) == {"skipped"} and timed.message.str.contains("interpreter").all()


def _traffic(inputs):
    return {"forward": 7, "full": 1000}


def test_model_bytes_from_the_implementation_and_the_bandwidth_it_reached(tmp_path):
    reg = _spec(good=_good)
    reg.losses["sq"].implementations["good"].bytes_model = _traffic
    df, _ = execute(["sq"], device="cpu", registry=reg, throughput=True, sizes="quick",
                    row_extra={"world_size": 4, "rank": 2}, run_id="fixed-run")
    t = df[(df.check == "throughput") & (df.impl == "good")].set_index(["n", "mode"])
    assert (df.run_id == "fixed-run").all() and (df.world_size == 4).all()
    assert (df["rank"] == 2).all()
    for n in (64, 130):
        assert t.loc[(n, "forward"), "model_bytes"] == 7
        assert pd.isna(t.loc[(n, "backward"), "model_bytes"])
        full = t.loc[(n, "full")]
        assert full.model_bytes == 1000
        assert full.bw_fraction == pytest.approx(1000 / (full.time_ms * 1e-3) / 1e9
                                                 / full.peak_gbps)
    # the reference has no bytes model of its own: the loss's (the default one here)
    from lossreg.spec import Case

    spec = reg.losses["sq"]
    ref = df[(df.check == "throughput") & (df.impl == "reference")]
    for r in ref.itertuples():
        inputs = spec.make_inputs(Case(r.n, params=spec.case_params("quick", spec.options)))
        assert r.model_bytes == spec.model("bytes", inputs, r.mode) > 0


def test_select_runs_the_chosen_tasks_only():
    df, _ = execute(["sq"], device="cpu", registry=_spec(good=_good),
                    select=lambda tasks: [t for t in tasks if t.n == 130])
    assert set(df[df.impl == "good"].n) == {130}


LOSSREG = Path(lossreg.__file__).parent


def _imports(path: Path) -> set[str]:
    """The lossreg modules ``path`` imports, at any depth (inside functions too)."""
    package = "lossreg" + "".join(f".{p}" for p in path.relative_to(LOSSREG).parent.parts)
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("lossreg.")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                mod = f"{base}.{node.module}" if node.module else base
                found |= {mod} if node.module else {f"{base}.{a.name}" for a in node.names}
            elif node.module and node.module.startswith("lossreg"):
                found.add(node.module)
    return found


def _module(path: Path) -> str:
    parts = path.relative_to(LOSSREG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_module_over_400_lines_and_no_import_cycle():
    files = sorted(LOSSREG.rglob("*.py"))
    long = {str(f.relative_to(LOSSREG)): n for f in files
            if (n := len(f.read_text().splitlines())) > 400}
    assert not long, f"modules over 400 lines: {long}"
    modules = {_module(f): f for f in files}
    graph = {m: {i for i in _imports(f) if i in modules and i != m} for m, f in modules.items()}
    # lossreg/__init__ re-exports lazily; a submodule importing the package is not a cycle
    graph = {m: deps - {"lossreg"} for m, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(d):] + [d]))
            if d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_the_cycle_finder_sees_imports_inside_functions(tmp_path):
    f = LOSSREG / "runner.py"
    assert "lossreg.planning" in _imports(f) and "lossreg.workers" in _imports(f)
    assert "lossreg.api" in _imports(LOSSREG / "cli.py")  # imported inside the commands
