import os
import sys
import textwrap
from pathlib import Path

# One compute thread per test process (and the harness workers it starts): xdist
# already runs a process per core, and OpenMP threads that outnumber the cores wait on
# each other's barriers (an 8x37 matmul took 100-200 ms instead of microseconds).
# Set before torch is imported; an explicit setting wins.
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import pytest  # noqa: E402

import lossreg.registry as registry_mod  # noqa: E402


def make_dist(root: Path, dist: str, modules: dict[str, str], entry_points: dict[str, str],
              version: str = "1.0") -> Path:
    """Lay out an installed distribution (what pip leaves in site-packages): its modules
    plus a .dist-info with METADATA and entry_points.txt, so importlib.metadata finds it."""
    root.mkdir(parents=True, exist_ok=True)
    for name, source in modules.items():
        (root / f"{name}.py").write_text(textwrap.dedent(source))
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    lines = "".join(f"{k} = {v}\n" for k, v in entry_points.items())
    (info / "entry_points.txt").write_text(f"[lossreg]\n{lines}")
    (info / "RECORD").write_text("")
    return root


CUBIC_PLUGIN = '''
import torch
from lossreg import Impl, LossSpec, hookimpl

def reference(input, target, reduction="mean"):
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be mean, sum or none, got {reduction!r}")
    t = (input - target).abs() ** 3
    return t if reduction == "none" else (t.mean() if reduction == "mean" else t.sum())

def fast(input, target, reduction="mean"):
    d = (input - target).abs()
    t = d * d * d
    return t if reduction == "none" else (t.mean() if reduction == "mean" else t.sum())

def slightly_wrong(input, target, reduction="mean"):
    return reference(input, target, reduction) * (1 + 1e-3)

def make_inputs(case):
    return {"input": case.randn(case.n), "target": case.randn(case.n)}

@hookimpl
def register_losses(register):
    register(LossSpec(name="cubic", family="third_party",
                      formula=r"\\frac{1}{n}\\sum_i |y_i-\\hat y_i|^3",
                      reference=reference, make_inputs=make_inputs,
                      sizes={"quick": [100, 333], "default": [1000, 5000],
                             "large": [10000]}))

@hookimpl
def register_implementations(register):
    register("cubic", Impl(name="fast", fn=fast, devices=("cpu", "cuda")))
    register("mse", Impl(name="cubic_team_mse", fn=lambda input, target, reduction="mean":
                         torch.nn.functional.mse_loss(input, target, reduction=reduction),
                         kind="baseline"))
'''

WRONG_PLUGIN = '''
from lossreg import Impl, hookimpl
from cubic_losses import slightly_wrong

@hookimpl
def register_implementations(register):
    register("cubic", Impl(name="wrong", fn=slightly_wrong))
'''


@pytest.fixture
def plugin_path(tmp_path, monkeypatch):
    """Add a directory of installed distributions to sys.path (and PYTHONPATH for
    subprocesses); the default registry is rebuilt before and after the test."""
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.delenv("LOSSREG_STRICT_PLUGINS", raising=False)
    monkeypatch.delenv("LOSSREG_LOAD_PLUGINS", raising=False)
    registry_mod._DEFAULT = None
    yield site
    for mod in [m for m in sys.modules if m.startswith(("cubic_", "broken_", "dup_", "bad_"))]:
        del sys.modules[mod]
    registry_mod._DEFAULT = None


@pytest.fixture
def cubic_dist(plugin_path):
    make_dist(plugin_path, "cubic-losses", {"cubic_losses": CUBIC_PLUGIN},
              {"cubic_losses": "cubic_losses"})
    return plugin_path
