"""Plugins that hang, clash with built-in names or hand over malformed specs
(tests/fault_plugins/), installed as real distributions on a temporary sys.path entry."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lossreg.registry import PluginError, Registry

from conftest import make_dist

FAULTS = Path(__file__).parent / "fault_plugins"
#: a short plugin time limit, so the hanging plugins cost seconds, not the default 30
TIMEOUT = "2"


def install(site: Path, dist: str, module: str, entry_points: dict[str, str]) -> None:
    make_dist(site, dist, {module: (FAULTS / f"{module}.py").read_text()}, entry_points)


@pytest.fixture
def faults(plugin_path, monkeypatch):
    """hang_at_import, clash_gbm (entry point `gbm`), clash_mse and clash_mae_torch."""
    monkeypatch.setenv("LOSSREG_PLUGIN_TIMEOUT", TIMEOUT)
    install(plugin_path, "fault-hang", "hang_at_import", {"hang_at_import": "hang_at_import"})
    install(plugin_path, "fault-gbm", "clash_gbm", {"gbm": "clash_gbm"})
    install(plugin_path, "fault-mse", "clash_mse", {"clash_mse": "clash_mse"})
    install(plugin_path, "fault-mae-torch", "clash_mae_torch",
            {"clash_mae_torch": "clash_mae_torch"})
    yield plugin_path
    for mod in ("hang_at_import", "clash_gbm", "clash_mse", "clash_mae_torch", "malformed",
                "hang_in_hook"):
        sys.modules.pop(mod, None)


@pytest.fixture(scope="module")
def builtin():
    """The built-in losses and their implementations, loaded with no third party."""
    reg = Registry().load_entry_points()
    return {name: list(spec.implementations) for name, spec in reg.losses.items()}


def test_hang_and_clashes_leave_the_builtins_unchanged(builtin, faults, capsys):
    reg = Registry().load_entry_points()
    err = capsys.readouterr().err
    # the hanging import: failed by name, after the time limit, and the rest loaded
    hang = reg.plugins["hang_at_import"]
    assert hang.status == "failed" and "within 2 s" in hang.error
    assert "'hang_at_import'" in err and "LOSSREG_PLUGIN_TIMEOUT" in err
    # entry point `gbm` of another distribution: rejected, naming both distributions
    assert reg.plugins["gbm"].dist == "lossreg" and reg.plugins["gbm"].status == "loaded"
    rejected = reg.plugins["gbm (fault-gbm)"]
    assert rejected.status == "rejected"
    assert "'fault-gbm'" in rejected.error and "'lossreg'" in rejected.error
    # `mse` registered twice: the built-in stays, its own other loss is accepted
    clash = reg.plugins["clash_mse"]
    assert clash.status == "loaded" and clash.rejected_losses == ["mse"]
    assert clash.losses == ["fault_cube"]
    assert any("'fault-mse'" in w and "'lossreg'" in w and "'mse'" in w for w in clash.warnings)
    assert reg.get("mse").plugin == "linear_regression"
    assert "fast_not_mse" not in reg.get("mse").implementations
    assert set(reg.get("fault_cube").implementations) == {"reference", "compile", "eager"}
    # `mae:torch` registered twice: rejected, the built-in kept; a new name is accepted
    mae_torch = reg.get("mae").implementations["torch"]
    assert mae_torch.plugin == "gbm"
    warnings = reg.plugins["clash_mae_torch"].warnings
    assert any("'torch'" in w and "'fault-mae-torch'" in w and "'lossreg'" in w
               for w in warnings), warnings
    assert reg.plugins["clash_mae_torch"].implementations == ["mae:torch_alt"]
    # every built-in loss is there, with its implementations in the same order
    for name, impls in builtin.items():
        assert [i for i in reg.get(name).implementations if i != "torch_alt"] == impls, name
        assert reg.get(name).plugin != "" and reg.plugins[reg.get(name).plugin].builtin


def test_strict_mode_makes_a_clash_an_error(faults, monkeypatch):
    (faults / "hang_at_import.py").unlink()  # strict mode stops at the first problem
    monkeypatch.setenv("LOSSREG_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError, match=r"'fault-gbm'.*'lossreg'|'fault-mse'.*'lossreg'"):
        Registry().load_entry_points()


def test_strict_mode_makes_a_timeout_an_error(plugin_path, monkeypatch):
    monkeypatch.setenv("LOSSREG_PLUGIN_TIMEOUT", "1")
    monkeypatch.setenv("LOSSREG_STRICT_PLUGINS", "1")
    monkeypatch.setenv("LOSSREG_LOAD_PLUGINS", "hang_in_hook")
    install(plugin_path, "fault-hang-hook", "hang_in_hook", {"hang_in_hook": "hang_in_hook"})
    with pytest.raises(PluginError, match=r"'hang_in_hook'.*timed out.*within 1 s"):
        Registry().load_entry_points()
    sys.modules.pop("hang_in_hook", None)


def test_a_hook_that_hangs_contributes_nothing(plugin_path, monkeypatch, capsys):
    monkeypatch.setenv("LOSSREG_PLUGIN_TIMEOUT", "1")
    monkeypatch.setenv("LOSSREG_LOAD_PLUGINS", "hang_in_hook,linear_regression")
    install(plugin_path, "fault-hang-hook", "hang_in_hook", {"hang_in_hook": "hang_in_hook"})
    reg = Registry().load_entry_points()
    assert reg.plugins["hang_in_hook"].status == "failed"
    assert "never_registered" not in reg.losses and "mse" in reg.losses
    assert "'hang_in_hook'" in capsys.readouterr().err
    sys.modules.pop("hang_in_hook", None)


def test_timeout_setting_must_be_a_number(monkeypatch):
    monkeypatch.setenv("LOSSREG_PLUGIN_TIMEOUT", "soon")
    with pytest.raises(PluginError, match="LOSSREG_PLUGIN_TIMEOUT must be a number.*'soon'"):
        Registry().load_entry_points()


MALFORMED = {
    "BackendNotStr": "field 'backend' got 42 (int), expected a name",
    "UnknownDevice": "field 'devices' got ('cpu', 'tpu') (tuple), expected a tuple of device",
    "NegativeSize": "field 'sizes' got",
    "ToleranceNotPositive": "field 'tolerances' got",
    "EdgeCaseNotCallable": "field 'edge_cases' got",
    "MutatedAfterConstruction": "field 'check_options' got",
    "NotASpec": "takes a LossSpec, got dict",
}


@pytest.mark.parametrize("fault, message", sorted(MALFORMED.items()))
def test_malformed_specs_fail_their_plugin_by_name(plugin_path, monkeypatch, capsys,
                                                   fault, message):
    ep = f"malformed_{fault.lower()}"
    monkeypatch.setenv("LOSSREG_LOAD_PLUGINS", f"{ep},linear_regression")
    install(plugin_path, "fault-malformed", "malformed", {ep: f"malformed:{fault}"})
    reg = Registry().load_entry_points()
    info = reg.plugins[ep]
    assert info.status == "failed" and message in info.error, info.error
    err = capsys.readouterr().err
    assert f"plugin {ep!r} (distribution 'fault-malformed')" in err and message in err
    assert not [n for n in reg.losses if n.startswith("fault_")]
    assert set(reg.get("mse").implementations) == {"reference", "compile", "torch", "triton"}
    sys.modules.pop("malformed", None)


def test_lossreg_list_answers_with_the_faults_installed(builtin, faults):
    env = {**os.environ, "LOSSREG_PLUGIN_TIMEOUT": TIMEOUT}
    proc = subprocess.run([sys.executable, "-m", "lossreg.cli", "list", "--json"], env=env,
                          capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stderr
    listed = {row["name"]: row for row in json.loads(proc.stdout)}
    for name, impls in builtin.items():
        row = listed[name]
        assert row["plugin"] != "clash_mse" and row["family"] != "fault", name
        assert [i for i in row["implementations"] if i != "torch_alt"] == impls, name
    for who in ("'hang_at_import'", "'fault-gbm'", "'fault-mse'", "'fault-mae-torch'"):
        assert who in proc.stderr, who
    plugins = subprocess.run([sys.executable, "-m", "lossreg.cli", "plugins"], env=env,
                             capture_output=True, text=True, timeout=90)
    failed = [line for line in plugins.stdout.splitlines() if "failed" in line.split()]
    assert any(line.startswith("hang_at_import") for line in failed), plugins.stdout
    rejected = [line.split() for line in plugins.stdout.splitlines() if " rejected " in line]
    assert ["gbm", "rejected", "fault-gbm", "1.0", "clash_gbm"] in rejected, plugins.stdout


def test_time_limited_calls_share_a_thread_and_survive_a_timeout_and_a_fork():
    import threading
    import time

    from lossreg.timelimit import PluginTimeout, run_limited

    first = run_limited(threading.get_ident, 30, "first")
    assert run_limited(threading.get_ident, 30, "second") == first != threading.get_ident()
    with pytest.raises(PluginTimeout, match="slow did not finish within 0.2 s"):
        run_limited(lambda: time.sleep(5), 0.2, "slow")
    fresh = run_limited(threading.get_ident, 30, "after")
    assert fresh != first  # the stuck thread was abandoned, a new one serves
    with pytest.raises(ZeroDivisionError):
        run_limited(lambda: 1 / 0, 30, "raises")
    assert run_limited(lambda: 7, 0, "inline") == 7
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its parent's plugin thread did not survive the fork
        ok = False
        try:
            ok = run_limited(lambda: 42, 5, "in child") == 42
        finally:
            os.write(write, b"1" if ok else b"0")
            os._exit(0)
    os.close(write)
    assert os.read(read, 1) == b"1"
    os.waitpid(pid, 0)


def test_plugin_code_that_loads_plugins_does_not_wait_on_itself():
    from lossreg.timelimit import run_limited

    assert run_limited(lambda: run_limited(lambda: 5, 30, "inner"), 2, "outer") == 5
