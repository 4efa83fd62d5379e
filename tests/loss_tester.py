"""The shared tester of every loss: a test class per loss, in the test module of the
plugin that registers it (``tests/plugins/test_<plugin>.py``)::

    class TestMSE(LossTester):
        loss = "mse"

inherits the standard tests, parametrized over the loss's implementations, dtypes and
input makers:

* the spec is complete and its reference differentiable;
* the harness (`lossreg.check`, in its worker processes) passes every implementation
  that runs on a CPU in float32: every option set, seed and edge case, at the smallest
  quick size (every quick size with ``LOSSREG_DEEP_TESTS=1``). The check runs once for
  all the losses of the plugin (one worker start), shared across xdist workers;
* the same verdict code in float64, bfloat16 and float16: the smallest quick size, one
  seed, every option set and the edge cases;
* every implementation (but ``compile``) in float64 against the loss's independent
  oracle (``tests/oracles.py``): forward at every option set, gradients against finite
  differences of the oracle, the edge cases. A loss without an oracle says where its
  independent formulas are tested instead (``no_oracle``);
* every input maker and edge case builds its tensors on ``case.device``
  (``tests/meta_device.py``).

``tests/plugins/test_coverage.py`` asserts that every built-in loss has such a class.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch

import lossreg
import oracle_check
from lossreg import verify
from lossreg.planning import runnable
from lossreg.spec import DTYPES, Case, UnsupportedOption
from meta_device import TARGET, makers, misplaced
from oracles import ORACLES

DEEP = os.environ.get("LOSSREG_DEEP_TESTS") == "1"
#: `lossreg check` covers these dtypes by default on a CPU besides float32; each runs a
#: cheaper pass through the same verdict code (one size, one seed).
EXTRA_DTYPES = ("float64", "bfloat16", "float16")


#: 16-bit rows still failing for a reason inherent to the loss, open in issue 18 and
#: explained in docs/numerics.md ("Still failing"); each runs, and shows as XPASS once
#: fixed so that the entry can go.
OPEN_LOWPREC: dict[tuple[str, str], str] = {
}


def _smallest_quick(tasks):
    return [t for t in tasks if t.n == min(t.spec.sizes["quick"])]


def _run_check(names: list[str]):
    return lossreg.check(names, device="cpu", dtypes=["float32"],
                         select=None if DEEP else _smallest_quick)


def plugin_check_rows(plugin: str, factory) -> "pandas.DataFrame":  # noqa: F821
    """`lossreg check` of every loss of ``plugin`` in float32, run once per test session:
    under xdist the first worker to ask runs it and leaves the rows for the others
    (a file lock in the session's shared temporary folder)."""
    names = sorted(s.name for s in lossreg.losses() if s.plugin == plugin)
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    cache = _LOCAL
    if worker is None:
        if plugin not in cache:
            cache[plugin] = _run_check(names)
        return cache[plugin]
    from filelock import FileLock

    root = Path(factory.getbasetemp()).parent / "lossreg-check"
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{plugin}.pkl"
    with FileLock(str(path) + ".lock"):
        if path.exists():
            return pickle.loads(path.read_bytes())
        df = _run_check(names)
        path.write_bytes(pickle.dumps(df))
        return df


_LOCAL: dict = {}


def _params(pairs):
    return [pytest.param(v, id=i) for i, v in pairs]


class LossTester:
    """Subclass per loss and set ``loss``; see the module's docstring."""

    #: the registered name of the loss under test
    loss: str = ""
    #: where the loss's formulas are tested independently when tests/oracles.py has none
    no_oracle: str | None = None

    # ------------------------------------------------------------ parametrization
    def pytest_generate_tests(self, metafunc):
        if not self.loss:
            return
        spec = lossreg.get(self.loss)
        names = metafunc.fixturenames
        if "impl_name" in names:
            impls = [i.name for i in spec.implementations.values()
                     if i.backend != "compile" and runnable(i, "cpu", "float64") is None]
            metafunc.parametrize("impl_name", impls)
        if "dtype" in names:
            metafunc.parametrize("dtype", [
                pytest.param(d, marks=pytest.mark.xfail(reason=OPEN_LOWPREC[self.loss, d]))
                if (self.loss, d) in OPEN_LOWPREC else d for d in EXTRA_DTYPES])
        if "maker" in names:
            metafunc.parametrize("maker", _params(
                (ident, (make, args)) for ident, make, args in makers(spec)))

    @property
    def spec(self):
        return lossreg.get(self.loss)

    # ------------------------------------------------------------ the spec
    def test_spec_is_complete(self):
        spec = self.spec
        assert spec.formula.strip() and spec.family and spec.plugin
        assert "reference" in spec.implementations and "compile" in spec.implementations
        inputs = spec.make_inputs(Case(n=min(spec.sizes["quick"]), seed=3))
        assert inputs and all(k for k in inputs)
        assert spec.grad_names(inputs), "at least one input should take a gradient"
        assert spec.model("bytes", inputs, "full") > 0

    def test_reference_is_differentiable(self):
        spec = self.spec
        inputs = spec.make_inputs(Case(n=min(spec.sizes["quick"]), dtype=torch.float64, seed=4))
        names = spec.grad_names(inputs)
        leaves = {k: v.requires_grad_(True) if k in names else v for k, v in inputs.items()}
        out = spec.reference(**leaves, **spec.options)
        grads = torch.autograd.grad(out.sum(), [leaves[k] for k in names], allow_unused=True)
        assert any(g is not None and torch.isfinite(g).all() for g in grads)

    # ------------------------------------------------------------ the harness
    def test_harness_check_passes_in_float32(self, tmp_path_factory):
        spec = self.spec
        df = plugin_check_rows(spec.plugin, tmp_path_factory)
        df = df[df.loss == self.loss]
        bad = df[df.status.isin(["fail", "error"])]
        assert bad.empty, bad[["impl", "check", "n", "params", "message"]].to_string()
        ran = set(df[df.status == "ok"].impl)
        expected = {i.name for i in spec.implementations.values()
                    if i.backend != "compile" and runnable(i, "cpu", "float32") is None}
        assert ran == expected
        # every option set and every edge case reached the verdict code
        # a row's params hold the preset's input parameters besides the options
        preset_keys = {k for params in spec.input_params.values() for k in params}
        seen = [{k: v for k, v in json.loads(p).items() if k not in preset_keys or k in
                 spec.options} for p in df.params]
        edges = {p.pop("edge_case") for p in seen if "edge_case" in p}
        assert edges == set(spec.edge_cases)
        assert not [s for s in spec.option_sets() if s not in seen], "option sets not checked"

    def test_other_dtypes_pass_the_verdict_code(self, dtype):
        spec = self.spec
        n, dt, tol = min(spec.sizes["quick"]), DTYPES[dtype], spec.tolerance(dtype)
        cases = [(f"{opts}", opts, spec.make_inputs(Case(n, dt, "cpu", seed=0, params=(
            spec.case_params("quick", opts))))) for opts in spec.option_sets()]
        cases += [(f"edge {name}", dict(spec.options), make(Case(1, dt, "cpu", seed=11, params=(
            spec.case_params("quick", spec.options))))) for name, make in spec.edge_cases.items()]
        failures, ran = [], 0
        for impl in spec.implementations.values():
            if impl.backend == "compile" or runnable(impl, "cpu", dtype) is not None:
                continue
            ran += 1
            for label, opts, inputs in cases:
                try:
                    verdicts = (verify.check_forward(spec, impl, inputs, opts, tol),
                                verify.check_gradient(spec, impl, inputs, opts, tol, 1))
                except UnsupportedOption:
                    continue
                failures += [f"{impl.name} {label}: {v.message}" for v in verdicts if not v.ok]
        assert ran, f"no implementation runs {dtype} on a CPU"
        assert not failures, "\n".join(failures)

    # ------------------------------------------------------------ the oracle
    def _oracle(self):
        oracle = ORACLES.get(self.loss)
        if oracle is None:
            assert self.no_oracle, (
                f"{self.loss} has no oracle in tests/oracles.py: write one, or set "
                "no_oracle to where its formulas are tested independently")
            pytest.skip(f"no oracle: independent formulas in {self.no_oracle}")
        return oracle

    def test_forward_and_gradient_against_the_oracle(self, impl_name):
        oracle = self._oracle()
        spec = self.spec
        oracle_check.forward_and_gradient(spec, spec.implementations[impl_name], oracle)

    def test_edge_cases_against_the_oracle(self, impl_name):
        oracle = self._oracle()
        spec = self.spec
        oracle_check.edge_cases(spec, spec.implementations[impl_name], oracle)

    # ------------------------------------------------------------ devices
    def test_inputs_land_on_the_case_device(self, maker):
        make, case_args = maker
        bad = misplaced(make, case_args)
        assert not bad, f"built off case.device ({TARGET}): {'; '.join(bad)}"
