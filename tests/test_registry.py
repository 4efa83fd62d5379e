"""The registry against real distributions laid out on sys.path (no mocked registry)."""

import pytest

import lossreg
from lossreg.registry import PluginError, Registry, UnknownLossError

from conftest import WRONG_PLUGIN, make_dist


def test_third_party_distribution_is_discovered(cubic_dist):
    reg = Registry().load_entry_points()
    info = reg.plugins["cubic_losses"]
    assert info.status == "loaded"
    assert (info.dist, info.version) == ("cubic-losses", "1.0")
    assert info.losses == ["cubic"]
    assert set(reg.get("cubic").implementations) == {"reference", "compile", "fast"}
    # implementations join losses registered by other plugins
    assert "cubic_team_mse" in reg.get("mse").implementations
    assert reg.get("mse").implementations["cubic_team_mse"].plugin == "cubic_losses"
    # builtins come through the same entry-point group
    assert reg.plugins["linear_regression"].dist == "lossreg"


def test_public_api_uses_entry_points(cubic_dist):
    assert lossreg.get("cubic").family == "third_party"
    assert [s.name for s in lossreg.losses(family="third_party")] == ["cubic"]


def test_unknown_loss_suggests_close_names(cubic_dist):
    with pytest.raises(KeyError, match=r"did you mean 'cubic'"):
        lossreg.get("cubik")
    with pytest.raises(UnknownLossError, match="unknown loss 'zzz'"):
        lossreg.get("zzz")


def test_broken_import_is_contained(plugin_path, capsys):
    make_dist(plugin_path, "broken-a", {"broken_a": "import not_a_module_anywhere\n"},
              {"broken_a": "broken_a"})
    reg = Registry().load_entry_points()
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "ModuleNotFoundError" in err
    assert "'broken_a'" in err
    assert reg.plugins["broken_a"].status == "failed"
    assert "not_a_module_anywhere" in reg.plugins["broken_a"].error
    assert reg.get("mse")  # the rest still works


def test_raising_hook_contributes_nothing(plugin_path, capsys):
    src = '''
from lossreg import LossSpec, hookimpl
import torch
@hookimpl
def register_losses(register):
    register(LossSpec(name="half_done", family="x", formula="x",
                      reference=lambda input: input.sum(),
                      make_inputs=lambda c: {"input": c.randn(c.n)}))
    raise RuntimeError("boom in hook")
'''
    make_dist(plugin_path, "broken-b", {"broken_b": src}, {"broken_b": "broken_b"})
    reg = Registry().load_entry_points()
    assert reg.plugins["broken_b"].status == "failed"
    assert "boom in hook" in capsys.readouterr().err
    assert "half_done" not in reg.losses  # staged registrations are dropped


def test_strict_mode_raises(plugin_path, monkeypatch):
    make_dist(plugin_path, "broken-a", {"broken_a": "raise ImportError('nope')\n"},
              {"broken_a": "broken_a"})
    monkeypatch.setenv("LOSSREG_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError, match="broken_a"):
        Registry().load_entry_points()


def test_load_plugins_filter(cubic_dist, monkeypatch):
    monkeypatch.setenv("LOSSREG_LOAD_PLUGINS", "cubic_losses")
    reg = Registry().load_entry_points()
    assert list(reg.plugins) == ["cubic_losses"]
    assert "mse" not in reg.losses
    monkeypatch.setenv("LOSSREG_LOAD_PLUGINS", "")
    assert Registry().load_entry_points().losses == {}


def test_duplicate_loss_name_is_rejected_naming_both_distributions(cubic_dist, capsys):
    dup = '''
from lossreg import Impl, LossSpec, hookimpl
@hookimpl
def register_losses(register):
    register(LossSpec(name="cubic", family="x", formula="x",
                      reference=lambda input: input.sum(),
                      make_inputs=lambda c: {"input": c.randn(c.n)}))
@hookimpl
def register_implementations(register):
    register("cubic", Impl("dup_fast", lambda input: input.sum()))
'''
    make_dist(cubic_dist, "dup-losses", {"dup_losses": dup}, {"dup_losses": "dup_losses"})
    reg = Registry().load_entry_points()
    err = capsys.readouterr().err
    assert "'cubic-losses'" in err and "'dup-losses'" in err and "'cubic'" in err
    info = reg.plugins["dup_losses"]
    assert info.rejected_losses == ["cubic"] and info.losses == []
    assert reg.get("cubic").plugin == "cubic_losses"
    # its implementation was for its own `cubic`: not attached to the other one
    assert "dup_fast" not in reg.get("cubic").implementations


def test_hook_receives_the_registered_losses_read_only(cubic_dist):
    src = '''
from lossreg import Impl, hookimpl
SEEN = {}
@hookimpl
def register_implementations(register, losses):
    SEEN["names"] = set(losses)
    SEEN["mse_family"] = losses["mse"].family
    try:
        losses["new"] = None
    except TypeError:
        SEEN["read_only"] = True
    SEEN["attached"] = hasattr(register, "losses")
    if "cubic" in losses:
        register("cubic", Impl("seen", lambda input, target, reduction="mean": input.sum()))
'''
    make_dist(cubic_dist, "dup-view", {"dup_view": src}, {"dup_view": "dup_view"})
    reg = Registry().load_entry_points()
    import dup_view

    assert dup_view.SEEN["names"] >= {"mse", "cubic", "mae"}
    assert dup_view.SEEN["mse_family"] == reg.get("mse").family
    assert dup_view.SEEN["read_only"] and not dup_view.SEEN["attached"]
    assert "seen" in reg.get("cubic").implementations


def test_every_field_has_a_rule():
    import dataclasses

    from lossreg.spec import IMPL_FIELDS, LOSSSPEC_FIELDS, Impl, LossSpec

    assert set(IMPL_FIELDS) == {f.name for f in dataclasses.fields(Impl)}
    assert set(LOSSSPEC_FIELDS) == {f.name for f in dataclasses.fields(LossSpec)} - {
        "implementations"}  # filled by the registry


@pytest.mark.parametrize("field, value, expected", [
    ("name", "Fast", "lower snake case"),
    ("fn", 3, "a callable"),
    ("kind", "fast", "one of ['reference', 'optimized', 'baseline']"),
    ("backend", 42, "a name of letters"),
    ("devices", ("cpu", "tpu"), "device types among"),
    ("devices", 7, "a tuple of device types"),
    ("dtypes", ("float32", "int8"), "dtypes among"),
    ("grad_in_forward", "yes", "True or False"),
    ("requires", (3,), "module names"),
    ("uses_triton", 1, "None or True or False"),
    ("description", None, "a string"),
    ("bytes_model", 5, "None or a callable"),
])
def test_impl_fields_are_checked(field, value, expected):
    from lossreg.spec import Impl, SpecError

    kwargs = {"name": "x", "fn": lambda input: input, field: value}
    with pytest.raises(SpecError) as info:
        Impl(**kwargs)
    message = str(info.value)
    assert f"field {field!r} got {value!r}" in message and expected in message


def test_lone_strings_are_one_item():
    from lossreg.spec import Impl

    impl = Impl("x", lambda input: input, devices="cpu", dtypes="float32", requires="numpy")
    assert (impl.devices, impl.dtypes, impl.requires) == (("cpu",), ("float32",), ("numpy",))
    assert impl.supports("cpu", "float32") is None
    assert "not cuda" in impl.supports("cuda", "float32")


@pytest.mark.parametrize("field, value, expected", [
    ("family", "Fault Family", "lower snake case"),
    ("formula", "  ", "a non-empty string"),
    ("make_inputs", None, "a callable"),
    ("title", 3, "a string"),
    ("options", {1: "mean"}, "option name (str)"),
    ("grad_inputs", ("input", 2), "input names"),
    ("sizes", {"quick": [10, 0], "default": [1], "large": [1]}, "positive int"),
    ("sizes", {"quick": [True], "default": [1], "large": [1]}, "positive int"),
    ("sizes", {"quick": [10]}, "missing ['default', 'large']"),
    ("x_name", "n rows", "a Python identifier"),
    ("input_params", {"quick": []}, "dict of parameters"),
    ("bytes_moved", "many", "None or a callable"),
    ("tolerances", {"float32": (1e-5,)}, "two positive finite floats"),
    ("tolerances", {"float32": (1e-5, -1.0)}, "two positive finite floats"),
    ("tolerances", {"int8": (1e-5, 1e-6)}, "a dict of dtype"),
    ("edge_cases", {"zeros": 0}, "a callable"),
    ("check_options", {"reduction": "sum"}, "a list of option dicts"),
    ("check_options", [{"reduction": "sum"}, "none"], "item 1"),
    ("mean_count", 4, "None or a callable"),
    ("input_domains", {"target": ("classes", 3)}, "kind one of"),
])
def test_spec_fields_are_checked(field, value, expected):
    from lossreg.spec import LossSpec, SpecError

    kwargs = {"name": "okname", "family": "x", "formula": "x", "reference": lambda input: input,
              "make_inputs": lambda c: {}, field: value}
    with pytest.raises(SpecError) as info:
        LossSpec(**kwargs)
    message = str(info.value)
    assert f"loss 'okname': field {field!r} got" in message and expected in message


def test_implementation_for_unknown_loss_warns(cubic_dist, capsys):
    src = '''
from lossreg import Impl, hookimpl
@hookimpl
def register_implementations(register):
    register("cubick", Impl("x", lambda input: input))
'''
    make_dist(cubic_dist, "bad-impl", {"bad_impl": src}, {"bad_impl": "bad_impl"})
    reg = Registry().load_entry_points()
    err = capsys.readouterr().err
    assert "'bad_impl'" in err and "unknown loss 'cubick'" in err and "did you mean 'cubic'" in err
    assert reg.plugins["bad_impl"].status == "loaded"
    assert reg.plugins["bad_impl"].warnings


@pytest.mark.parametrize(
    "override, message",
    [
        ({"formula": "''"}, "field 'formula' got '' (str), expected a non-empty string"),
        ({"reference": "3"}, "field 'reference' got 3 (int), expected a callable"),
        ({"name": "'Bad-Name'"}, "lower snake case"),
        ({"sizes": "{'quick': []}"}, "field 'sizes' got {'quick': []} (dict)"),
    ],
)
def test_spec_validation_names_the_plugin(plugin_path, capsys, override, message):
    fields = {"name": "'okname'", "family": "'x'", "formula": "'x'",
              "reference": "lambda input: input.sum()", "make_inputs": "lambda c: {}",
              **override}
    args = ", ".join(f"{k}={v}" for k, v in fields.items())
    src = f"""
from lossreg import LossSpec, hookimpl
@hookimpl
def register_losses(register):
    register(LossSpec({args}))
"""
    make_dist(plugin_path, "bad-spec", {"bad_spec": src}, {"bad_spec": "bad_spec"})
    reg = Registry().load_entry_points()
    err = capsys.readouterr().err
    assert "'bad_spec'" in err and message in err
    assert reg.plugins["bad_spec"].status == "failed"


def test_wrong_implementation_fails_check(cubic_dist):
    make_dist(cubic_dist, "cubic-wrong", {"cubic_wrong": WRONG_PLUGIN},
              {"cubic_wrong": "cubic_wrong"})
    # a 1e-3 relative error is inside the half-precision tolerances: the dtypes that see it
    df = lossreg.check(["cubic"], device="cpu", dtypes=["float32", "float64"])
    wrong = df[df.impl == "wrong"]
    assert set(wrong.status) == {"fail"}
    assert (wrong.rel_err > 5e-4).all()
    assert set(df[df.impl == "fast"].status) == {"ok"}


def test_import_is_light_and_plugins_pull_no_dataframe_or_plotting_stack():
    """`import lossreg` loads neither torch nor pandas (lazy attributes), and loading
    every plugin loads no pandas, matplotlib or scipy (start-up of `lossreg list`)."""
    import subprocess
    import sys

    code = """
import sys
HEAVY = ("torch", "pandas", "pyarrow", "matplotlib", "scipy", "triton")
def loaded():
    return sorted({m.split(".")[0] for m in sys.modules} & set(HEAVY))
import lossreg
print(",".join(loaded()))
assert lossreg.LossSpec and lossreg.hookimpl
print(",".join(loaded()))
lossreg.losses()
print(",".join(loaded()))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    bare, with_spec, with_plugins = proc.stdout.splitlines()[-3:]
    assert bare == ""
    assert with_spec == "torch"  # LossSpec needs torch, nothing else
    assert not {"pandas", "pyarrow", "matplotlib", "scipy"} & set(with_plugins.split(","))


def test_a_compile_implementation_called_in_process_still_reaches_workers():
    """After an in-process call holds dynamo's (unpicklable) compiled function, the spec
    still pickles for a worker, which compiles its own. (A lock stands in for dynamo's
    objects: compiling for real costs seconds and is tested in test_harness.)"""
    import threading

    import cloudpickle

    spec = lossreg.get("mse")
    fn = spec.implementations["compile"].fn
    fn.compiled = threading.Lock()
    with pytest.raises(TypeError):
        cloudpickle.dumps(fn.compiled)
    again = cloudpickle.loads(cloudpickle.dumps(spec)).implementations["compile"].fn
    assert again.compiled is None and again.reference is not None
    fn.compiled = None
