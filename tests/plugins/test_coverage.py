"""Every built-in loss has its `loss_tester.LossTester` subclass, in the test module of
the plugin that registers it (``tests/plugins/test_<plugin>*.py``), so none is left out
of the standard per-loss tests."""

import ast
import importlib.metadata
from pathlib import Path

import lossreg

HERE = Path(__file__).resolve().parent


def _testers() -> dict[str, list[str]]:
    """loss -> the modules (file names) holding a LossTester subclass for it."""
    found: dict[str, list[str]] = {}
    for path in sorted(HERE.glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ClassDef):
                continue
            if not any(isinstance(b, ast.Name) and b.id == "LossTester" for b in node.bases):
                continue
            for stmt in node.body:
                if (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1
                        and getattr(stmt.targets[0], "id", None) == "loss"
                        and isinstance(stmt.value, ast.Constant)):
                    found.setdefault(stmt.value.value, []).append(path.name)
    return found


def builtin_plugins() -> set[str]:
    return {e.name for e in importlib.metadata.distribution("lossreg").entry_points
            if e.group == "lossreg"}


def test_every_builtin_loss_has_one_tester_in_its_plugins_module():
    plugins = builtin_plugins()
    specs = [s for s in lossreg.losses() if s.plugin in plugins]
    assert len(specs) > 50  # the built-ins are registered
    found = _testers()
    missing = [s.name for s in specs if s.name not in found]
    assert not missing, f"no LossTester subclass in tests/plugins/ for {missing}"
    twice = {k: v for k, v in found.items() if len(v) > 1}
    assert not twice, f"more than one tester: {twice}"
    astray = {s.name: found[s.name][0] for s in specs
              if not found[s.name][0].startswith(f"test_{s.plugin}")}
    assert not astray, f"testers outside their plugin's module: {astray}"
    unknown = set(found) - {s.name for s in lossreg.losses()}
    assert not unknown, f"testers of losses nobody registers: {unknown}"


def test_the_scan_finds_testers_and_would_miss_a_loss():
    found = _testers()
    assert found["mse"] == ["test_linear_regression.py"]
    assert "no_such_loss" not in found
