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


def test_duplicate_loss_names_both_plugins(cubic_dist, capsys):
    dup = '''
from lossreg import LossSpec, hookimpl
@hookimpl
def register_losses(register):
    register(LossSpec(name="cubic", family="x", formula="x",
                      reference=lambda input: input.sum(),
                      make_inputs=lambda c: {"input": c.randn(c.n)}))
'''
    make_dist(cubic_dist, "dup-losses", {"dup_losses": dup}, {"dup_losses": "dup_losses"})
    reg = Registry().load_entry_points()
    err = capsys.readouterr().err
    assert "'cubic_losses'" in err and "'dup_losses'" in err
    assert reg.plugins["dup_losses"].status == "failed"
    assert reg.get("cubic").plugin == "cubic_losses"


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
        ({"formula": "''"}, "formula"),
        ({"reference": "3"}, "reference is not callable"),
        ({"name": "'Bad-Name'"}, "lower snake case"),
        ({"sizes": "{'quick': []}"}, "sizes"),
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
    df = lossreg.check(["cubic"], device="cpu")
    wrong = df[df.impl == "wrong"]
    assert set(wrong.status) == {"fail"}
    assert (wrong.rel_err > 5e-4).all()
    assert set(df[df.impl == "fast"].status) == {"ok"}
