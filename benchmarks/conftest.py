"""pytest-benchmark suite generated from the lossreg registry: options, the plan of
cases, machine info and the Parquet export. The timing itself is in test_losses.py.

Not collected by the default `pytest` run (testpaths = tests); run it as

    pytest benchmarks [--lossreg-loss NAME]... [--lossreg-impl I]... [--lossreg-dtype D]...
                      [--lossreg-sizes quick|default|large] [--lossreg-device auto|cpu|cuda]
                      [--lossreg-mode forward|backward|full]... [--lossreg-out DIR]

The cases are `lossreg bench`'s: `lossreg.planning.make_plan` chooses them (so
`compile` on a CPU is opt-in, as there) and `lossreg.planning.runnable` says why a case
cannot run; such cases, and Triton on a CPU (the interpreter times nothing), are
skipped with that reason, never errors. `--lossreg-out DIR` writes the measurements
as throughput rows of `lossreg.results.SCHEMA`, readable by `lossreg.load_results(DIR)`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from lossreg import measure, planning, runner, timing
from lossreg.registry import default_registry
from lossreg.results import ResultWriter
from lossreg.rows import base_row, error_message, run_context
from lossreg.spec import DTYPES

MODES = ("forward", "backward", "full")
SIZE_PRESETS = ("quick", "default", "large")


def pytest_addoption(parser):
    group = parser.getgroup("lossreg", "lossreg benchmarks (benchmarks/ suite)")
    group.addoption("--lossreg-loss", action="append", default=[], metavar="NAME",
                    help="loss to benchmark (repeatable, or comma separated); default: all")
    group.addoption("--lossreg-impl", action="append", default=[], metavar="IMPL",
                    help="implementation to benchmark (repeatable, or comma separated); "
                         "default: all (torch.compile only when named, on a CPU)")
    group.addoption("--lossreg-dtype", action="append", default=[], metavar="DTYPE",
                    help=f"dtype (repeatable): {', '.join(DTYPES)}; default: float32 on a "
                         "CPU, float32 and bfloat16 on CUDA")
    group.addoption("--lossreg-sizes", default="quick", choices=SIZE_PRESETS,
                    help="size preset of each loss (default: quick)")
    group.addoption("--lossreg-device", default="auto", metavar="auto|cpu|cuda",
                    help="device (default: auto, CUDA when visible)")
    group.addoption("--lossreg-mode", action="append", default=[], choices=MODES,
                    help="forward, backward (gradients only) or full (fwd+bwd); repeatable; "
                         "default: all three")
    group.addoption("--lossreg-out", default=None, metavar="DIR",
                    help="at the end, write the measurements as lossreg Parquet rows "
                         "(the schema of `lossreg bench`) under DIR")


def _names(values: list[str]) -> list[str]:
    return [v.strip() for value in values for v in value.split(",") if v.strip()]


@dataclass
class BenchCase:
    """One parametrized benchmark: a harness task in one mode, or why it cannot run."""

    task: planning.Task
    mode: str
    skip: str | None = None

    @property
    def id(self) -> str:
        t = self.task
        return f"{t.spec.name}-{t.impl.name}-{t.dtype}-{t.n}-{self.mode}"


@dataclass
class LossregSession:
    device: str
    context: dict
    cases: list[BenchCase]
    out: Path | None
    rows: list[dict] = field(default_factory=list)
    #: each timed row with its samples (ms) and the spec's (bytes, flops) models
    timed: list[tuple[dict, list[float], tuple]] = field(default_factory=list)
    written: Path | None = None

    @classmethod
    def from_config(cls, config) -> LossregSession:
        opt = config.getoption
        try:
            device = measure.resolve_device(opt("lossreg_device"))
            plan = planning.make_plan(default_registry(), _names(opt("lossreg_loss")), device,
                                     _names(opt("lossreg_dtype")), _names(opt("lossreg_impl")),
                                     opt("lossreg_sizes"))
        except measure.DeviceError as exc:
            raise pytest.UsageError(str(exc).replace("--device", "--lossreg-device", 1)) from None
        except (ValueError, KeyError) as exc:  # HarnessError, UnknownLossError
            raise pytest.UsageError(str(exc)) from None
        out = opt("lossreg_out")
        if out and (opt("dist", "no") != "no" or os.environ.get("PYTEST_XDIST_WORKER")):
            raise pytest.UsageError(
                "--lossreg-out needs a serial run: pytest-benchmark times nothing under "
                "xdist (add -p no:xdist or -n 0)")
        modes = [m for m in MODES if m in opt("lossreg_mode")] or list(MODES)
        cpu = measure.device_type(device) == "cpu"
        if cpu:  # as `lossreg bench`: the same allocator path in every session
            measure.steady_cpu_allocator()
        tasks = [(t, runner.INTERPRETER_BENCH_SKIP if cpu and t.impl.backend == "triton"
                  else None) for t in plan.tasks] + plan.skipped
        order = {name: i for i, name in enumerate(dict.fromkeys(t.spec.name for t, _ in tasks))}
        tasks.sort(key=lambda ts: order[ts[0].spec.name])  # stable: plan order within a loss
        cases = [BenchCase(t, mode, reason) for t, reason in tasks for mode in modes]
        context = run_context(measure.device_type(device), measure.device_name(device))
        return cls(device, context, cases, Path(out) if out else None)

    # ------------------------------------------------------------ rows
    def _row(self, case: BenchCase, **values) -> dict:
        row = base_row(self.context, case.task, dict(case.task.spec.options))
        row.update(check="throughput", mode=case.mode, **values)
        return row

    def record_skip(self, case: BenchCase, reason: str) -> None:
        self.rows.append(self._row(case, status="skipped", message=reason))

    def record_error(self, case: BenchCase, exc: BaseException) -> None:
        self.rows.append(self._row(case, status="error", message=error_message(exc)))

    def record(self, case: BenchCase, seconds: list[float], inputs: dict,
               peak_bytes: int | None) -> None:
        """One throughput row from a benchmark's round times (seconds, one call each)."""
        spec, impl = case.task.spec, case.task.impl
        samples = [s * 1e3 for s in seconds]
        model = (spec.model("bytes", inputs, case.mode), spec.model("flops", inputs, case.mode))
        row = self._row(
            case, status="ok",
            message="gradient computed in the forward" if (impl.grad_in_forward
                                                            and case.mode == "backward") else None,
            peak_bytes=peak_bytes, **timing.timing_columns(samples, model))
        self.rows.append(row)
        self.timed.append((row, samples, model))

    def finish(self) -> Path | None:
        """Speedups against the reference of this session, bandwidth, then the Parquet."""
        if self.out is None or not self.rows:
            return None

        def key(r):
            return r["loss"], r["dtype"], r["n"], r["mode"]

        ref = {key(r): r["time_ms"] for r, _, _ in self.timed if r["impl_kind"] == "reference"}
        peak = measure.copy_bandwidth_gbps(self.device) if self.timed else None
        for row, samples, model in self.timed:
            row.update(timing.timing_columns(samples, model, ref.get(key(row)), peak),
                       peak_gbps=peak)
        writer = ResultWriter(self.out, self.context["run_id"])
        try:
            writer.write(self.rows)
        finally:
            self.written = writer.finish()
        return self.written


_SESSION = pytest.StashKey[LossregSession]()


def pytest_configure(config):
    config.stash[_SESSION] = LossregSession.from_config(config)


def pytest_generate_tests(metafunc):
    if "lossreg_case" in metafunc.fixturenames:
        cases = metafunc.config.stash[_SESSION].cases
        metafunc.parametrize("lossreg_case", cases, ids=[c.id for c in cases])


@pytest.fixture(scope="session")
def lossreg_session(pytestconfig) -> LossregSession:
    return pytestconfig.stash[_SESSION]


def pytest_sessionfinish(session, exitstatus):
    state = session.config.stash.get(_SESSION, None)
    if state is not None:
        state.finish()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    state = config.stash.get(_SESSION, None)
    if state is not None and state.written is not None:
        terminalreporter.write_line(
            f"lossreg: {len(state.rows)} rows written to {state.written}")


# ---------------------------------------------------------------- pytest-benchmark hooks
@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_machine_info(config, machine_info):
    """The device the cases ran on and the versions that shape its timings. lossreg's
    version and commit go to commit_info: in machine_info they would make
    `--benchmark-compare` warn "machine_info is different" across every commit."""
    state = config.stash.get(_SESSION, None)
    if state is None:
        return
    ctx = state.context
    info = {
        "device": state.device,
        "device_type": ctx["device_type"],
        "device_name": ctx["device_name"],
        "torch_version": ctx["torch_version"],
        "triton_version": ctx["triton_version"],
        "cuda_version": torch.version.cuda,
        "torch_num_threads": torch.get_num_threads(),
    }
    if ctx["device_type"] == "cuda":
        info["cuda_capability"] = ".".join(map(str, torch.cuda.get_device_capability(
            torch.device(state.device))))
    machine_info.update(info)


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_commit_info(config, commit_info):
    state = config.stash.get(_SESSION, None)
    if state is not None:
        commit_info["lossreg_version"] = state.context["lossreg_version"]
        commit_info["lossreg_git_commit"] = state.context["git_commit"]
        commit_info["lossreg_run_id"] = state.context["run_id"]
