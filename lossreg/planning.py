"""Planning: which loss x implementation x dtype x size cases a run holds, which are
skipped (with the reason) on this device, and how long the run should take.

Public API::

    Task(spec, impl, dtype, n, preset="quick", checks=None, seconds=None, source=None)
    Plan(device, tasks, skipped, rounds=1, budget_s=None, estimated_seconds=0.0, ...)
        .describe() -> str        the plan in a few lines, printed before a run
        .to_json() -> dict        the same as data (cases, losses, estimated_seconds...)
        .compare(real_s) -> str   one line: the real duration against the plan's
    make_plan(registry, names, device, dtypes, impls, sizes, command="bench") -> Plan
    plan_budget(registry, names, device, dtypes, impls, budget_s, rounds=None,
                history=None, *, timing_sizes="representative", command="bench") -> Plan
    parse_budget("90s" | "10m" | "1h" | "600") -> seconds;  representative_size(spec) -> n
    case_timeout(task, device, rounds=1) -> seconds
    default_dtypes(device, command="bench"), runnable(impl, dev_type, dtype), HarnessError
    DEFAULT_BUDGET = "10m", MAX_ROUNDS = 5

``Task.checks`` says which checks a task runs: None (a `make_plan` task) means the
run's usual ones -- correctness and gradient, plus throughput in `bench`; a budget plan
sets ``("correctness", "gradient")`` on its quick-size tasks (the edge cases and the
reference's gradcheck belong to these) and ``("throughput",)`` on its timed ones.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Sequence

from . import costmodel, measure
from .registry import Registry
from .spec import DTYPES, Impl, LossSpec

DEFAULT_BUDGET = "10m"  # a bench with no explicit sizes
MAX_ROUNDS = 5  # the most timing rounds a budget plan gives (bench's default count)
#: a loss's one-round timings may use this part of its equal share of what the checks
#: leave of the budget (the rest is for later rounds and the estimate's error)
TIMING_SHARE = 0.8
#: checks at both quick sizes only when they leave this part of the budget for timing
MIN_TIMING_PART = 0.6
CHECKS, TIMING = ("correctness", "gradient"), ("throughput",)  # Task.checks of a budget plan
INTERPRETER_TIMING_SKIP = ("Triton on CPU runs under the interpreter: checked at the quick "
                           "sizes, never timed")


class HarnessError(ValueError):
    """Bad arguments to check/bench (unknown loss, impl, dtype...)."""


@dataclass
class Task:
    spec: LossSpec
    impl: Impl
    dtype: str
    n: int
    preset: str = "quick"
    checks: tuple[str, ...] | None = None  # None: the run's usual checks
    seconds: float | None = None  # the cost model's estimate (budget plans)
    source: str | None = None  # "history" or "estimate"


@dataclass
class Plan:
    device: str
    tasks: list[Task] = field(default_factory=list)
    skipped: list[tuple[Task, str]] = field(default_factory=list)
    rounds: int = 1
    budget_s: float | None = None
    estimated_seconds: float = 0.0
    breakdown: dict[str, float] = field(default_factory=dict)  # checks/timing/fixed seconds
    notes: list[str] = field(default_factory=list)  # what was cut to fit the budget

    def losses(self) -> list[str]:
        return list(dict.fromkeys(t.spec.name for t in self.tasks))

    def describe(self) -> str:
        from .progress import format_duration as fmt

        checks = [t for t in self.tasks if t.checks != TIMING]
        timed = [t for t in self.tasks if t.checks == TIMING]
        impls = {(t.spec.name, t.impl.name) for t in self.tasks}
        dtypes = sorted({t.dtype for t in self.tasks}, key=list(DTYPES).index)
        b = self.breakdown
        lines = [f"plan: {len(self.losses())} losses, {len(impls)} implementations on "
                 f"{self.device} ({', '.join(dtypes) or 'no dtype'})",
                 f"  checks: {len(checks):>4} cases, correctness + gradient at the quick "
                 f"sizes   ~{fmt(b.get('checks', 0))}"]
        if timed:
            sizes = "each loss's representative size" if all(
                t.preset in ("default", "quick") for t in timed) else \
                f"the {timed[0].preset} sizes"
            lines.append(f"  timing: {len(timed):>4} cases at {sizes}, {self.rounds} "
                         f"round{'s' if self.rounds > 1 else ''}   ~{fmt(b.get('timing', 0))}")
        lines.append(f"  fixed:  worker start, copy bandwidth, round workers   "
                     f"~{fmt(b.get('fixed', 0))}")
        known = sum(t.source == "history" for t in self.tasks)
        budget = f" of a {fmt(self.budget_s)} budget" if self.budget_s else ""
        lines.append(f"  expected ~{fmt(self.estimated_seconds)}{budget} ({known} of "
                     f"{len(self.tasks)} cases from earlier runs' times, the rest estimated)")
        lines += [f"  skipped: {len(self.skipped)} (each row says why)"] * bool(self.skipped)
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {
            "device": self.device, "device_type": measure.device_type(self.device),
            "budget_s": self.budget_s, "rounds": self.rounds,
            "estimated_seconds": round(self.estimated_seconds, 1),
            "breakdown": {k: round(v, 1) for k, v in self.breakdown.items()},
            "losses": self.losses(),
            "dtypes": sorted({t.dtype for t in self.tasks}, key=list(DTYPES).index),
            "cases": [{"loss": t.spec.name, "impl": t.impl.name, "dtype": t.dtype, "n": t.n,
                       "preset": t.preset, "checks": list(t.checks or CHECKS + TIMING),
                       "seconds": None if t.seconds is None else round(t.seconds, 2),
                       "source": t.source} for t in self.tasks],
            "skipped": [{"loss": t.spec.name, "impl": t.impl.name, "dtype": t.dtype,
                         "n": t.n, "checks": list(t.checks or ()), "reason": r}
                        for t, r in self.skipped],
            "notes": list(self.notes),
        }

    def compare(self, real_seconds: float) -> str:
        from .progress import format_duration as fmt

        est = self.estimated_seconds
        return f"took {fmt(real_seconds)}" + (f"; the plan expected {fmt(est)} "
                                               f"({real_seconds / est:.2f}x)" if est else "")


def default_dtypes(device: str, command: str = "bench") -> list[str]:
    """The dtypes a run covers when none are given. bench: float32 on a CPU; float32
    and bfloat16 on CUDA. check: float32, float64, bfloat16 and float16 on a CPU (torch
    runs these losses' ops in float16 on a CPU, and at the quick sizes a dtype costs
    the same tenths of a second of Python per case); float32, bfloat16 and float16 on
    CUDA (float64 on request: slow on a GPU, and the CPU run covers it)."""
    if command not in ("bench", "check"):
        raise HarnessError(f"unknown command {command!r}: expected bench or check")
    cuda = measure.device_type(device) == "cuda"
    if command == "bench":
        return ["float32", "bfloat16"] if cuda else ["float32"]
    return ["float32", "bfloat16", "float16"] if cuda else \
        ["float32", "float64", "bfloat16", "float16"]


def _select(registry: Registry, names, device: str, dtypes, impls, command: str):
    """(specs, dtypes, implementations per spec) after validating the arguments."""
    specs = [registry.get(n) for n in names] if names else registry.list()
    dtypes = list(dtypes) if dtypes else default_dtypes(device, command)
    for d in dtypes:
        if d not in DTYPES:
            raise HarnessError(f"unknown dtype {d!r}: expected one of {', '.join(DTYPES)}")
    known = {name for s in specs for name in s.implementations}
    for name in impls or ():
        if name not in known:
            raise HarnessError(
                f"unknown implementation {name!r}: the selected losses have "
                f"{', '.join(sorted(known))}"
            )
    dev_type = measure.device_type(device)
    chosen = {}
    for spec in specs:
        mine = [i for i in spec.implementations.values() if not impls or i.name in impls]
        if not impls:
            # torch.compile takes ~15 s per loss and shape on a CPU: opt-in there
            mine = [i for i in mine if not (i.backend == "compile" and dev_type == "cpu")]
        mine.sort(key=lambda i: i.kind != "reference")  # reference first: speedups need it
        chosen[spec.name] = mine
    return specs, dtypes, chosen


def make_plan(
    registry: Registry, names: Sequence[str] | None, device: str, dtypes: Sequence[str] | None,
    impls: Sequence[str] | None, sizes: str, command: str = "bench",
) -> Plan:
    """Every size of the ``sizes`` preset (the exhaustive matrix)."""
    specs, dtypes, chosen = _select(registry, names, device, dtypes, impls, command)
    if sizes not in ("quick", "default", "large"):
        raise HarnessError(f"unknown sizes {sizes!r}: expected quick, default or large")
    dev_type = measure.device_type(device)
    plan = Plan(device)
    for spec in specs:
        for impl in chosen[spec.name]:
            for dtype in dtypes:
                for n in spec.sizes[sizes]:
                    task = Task(spec, impl, dtype, n, sizes)
                    reason = runnable(impl, dev_type, dtype)
                    if reason:
                        plan.skipped.append((task, reason))
                    else:
                        plan.tasks.append(task)
    return plan


def runnable(impl: Impl, dev_type: str, dtype: str) -> str | None:
    from .kernels import interpreting

    if impl.uses_triton and dev_type == "cpu":
        missing = impl.missing_requirements()
        if missing:
            return f"requires {', '.join(missing)} (not installed)"
        if not interpreting():
            return "Triton needs a CUDA GPU, or TRITON_INTERPRET=1 set before lossreg is imported"
        if impl.backend != "triton" and "cpu" not in impl.devices:
            # a library's kernels that do not run under the interpreter say so in devices
            return f"runs on {', '.join(impl.devices)} only (not under Triton's interpreter)"
        if impl.dtypes is not None and dtype not in impl.dtypes:
            return f"supports dtypes {', '.join(impl.dtypes)}, not {dtype}"
        return None
    return impl.supports(dev_type, dtype)


def parse_budget(text: str | float | int) -> float:
    """Seconds from ``90s``, ``10m``, ``1.5h`` or plain seconds (``600``)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([smh]?)\s*", str(text).lower())
        if not m:
            raise HarnessError(f"budget {text!r}: expected a duration such as 90s, 10m, 1h "
                               "or plain seconds (600)")
        seconds = float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]
    if not seconds > 0:
        raise HarnessError(f"budget {text!r}: must be more than zero seconds")
    return seconds


def representative_size(spec: LossSpec) -> int:
    """The one size a budget run times a loss at: the middle of its `default` sizes
    (the upper middle of an even count), where the per-call overhead no longer hides
    the work and one case still takes seconds on a 2-core CPU."""
    sizes = sorted(spec.sizes["default"])
    return sizes[len(sizes) // 2]


#: the least limit of a case; more under Triton's interpreter, whose cost flops predict
#: badly (eps_separation's kernel at 300 points: 55 s of CPU). A shared 2-core machine
#: ran checks up to 5x slower in wall time than their CPU time.
TIMEOUT_FLOOR_S = {"cpu": 180.0, "cuda": 60.0}
INTERPRETER_TIMEOUT_FLOOR_S = 600.0
TIMEOUT_FACTOR = 20.0


def case_timeout(task: Task, device: str, rounds: int = 1) -> float:
    """Seconds one case may run before the harness stops it: the larger of a floor
    (`TIMEOUT_FLOOR_S`: 180 s on a CPU, 60 s on CUDA; 600 s for Triton under the
    interpreter) and 20 x the cost model's estimate of the case -- its checks where it
    has any, its first timing round where it is or may be timed. Generous on purpose:
    it catches hangs, not slow machines."""
    dev = measure.device_type(device)
    model = costmodel.cost_model(dev)
    checks = task.checks
    est = 0.0
    if checks is None or "correctness" in checks or "gradient" in checks:
        est += model.check_seconds(task, first=True, gradcheck=task.impl.kind == "reference")
    if checks is None or "throughput" in checks:
        est += model.timing_seconds(task, 1) if rounds <= 1 else \
            model._policy_seconds(task, rounds)[0]
    floor = INTERPRETER_TIMEOUT_FLOOR_S if task.impl.uses_triton and dev == "cpu" \
        else TIMEOUT_FLOOR_S.get(dev, 60.0)
    return max(floor, TIMEOUT_FACTOR * est)


def plan_budget(
    registry: Registry, names: Sequence[str] | None, device: str,
    dtypes: Sequence[str] | None, impls: Sequence[str] | None, budget_s: float | str,
    rounds: int | None = None, history: "costmodel.History | None" = None, *,
    timing_sizes: str = "representative", command: str = "bench",
) -> Plan:
    """A run that fits ``budget_s``: correctness and gradient checks of every loss x
    implementation x dtype at the quick sizes (both, if they leave `MIN_TIMING_PART` of
    the budget, else the smallest), timings at each loss's `representative_size` (with
    ``timing_sizes="large"`` etc.: every size of that preset), as many rounds (up to
    `MAX_ROUNDS`) as fit unless ``rounds`` is given. When one round does not fit: checks
    at the smallest quick size; then one size per loss fitted to its share of the budget
    (representative: the smallest default size); past that the plan says it is over
    budget. Cuts are in ``Plan.notes``; each task carries its estimate. ``history``: a
    `costmodel.History` (default: the committed runs and ./runs)."""
    budget = parse_budget(budget_s)
    if rounds is not None and (isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1):
        raise HarnessError(f"rounds must be a whole number of at least 1, got {rounds!r}")
    if timing_sizes not in ("representative", "quick", "default", "large"):
        raise HarnessError(f"unknown timing sizes {timing_sizes!r}: expected representative, "
                           "quick, default or large")
    specs, dtypes, chosen = _select(registry, names, device, dtypes, impls, command)
    dev_type = measure.device_type(device)
    model = costmodel.cost_model(dev_type) if history is None else \
        costmodel.CostModel(dev_type, history)
    smaller: list[str] = []
    fitted: dict[str, tuple[list[int], str]] = {}

    def fitted_size(spec: LossSpec, share: float) -> tuple[list[int], str]:
        """The representative size (the largest of a named preset), or the largest
        smaller one (down through the smaller presets) whose one-round timing of every
        implementation x dtype fits ``share`` seconds; the smallest quick size if none."""
        if spec.name in fitted:
            return fitted[spec.name]
        rep = representative_size(spec) if timing_sizes == "representative" else None
        top = "default" if rep else timing_sizes
        candidates = [(n, top) for n in sorted(spec.sizes[top], reverse=True)
                      if rep is None or n <= rep]
        for preset in {"large": ("default", "quick"), "default": ("quick",)}.get(top, ()):
            candidates += [(n, preset) for n in sorted(spec.sizes[preset], reverse=True)]
        timeable = [(i, d) for i in chosen[spec.name] for d in dtypes
                    if runnable(i, dev_type, d) is None
                    and not (i.uses_triton and dev_type == "cpu")]
        def cost(n, preset):
            return sum(model.timing_seconds(Task(spec, i, d, n, preset, TIMING), 1)
                       for i, d in timeable)
        # where size barely moves the cost (a GPU's fixed time per case), take the largest
        floor = 1.25 * cost(*candidates[-1])
        for n, preset in candidates:
            if cost(n, preset) <= max(share, floor):
                break
        if (n, preset) != candidates[0]:
            smaller.append(f"{spec.name} ({spec.x_name}={n}, {preset})")
        fitted[spec.name] = ([n], preset)
        return fitted[spec.name]

    def build(check_sizes: str, timed_at: str) -> Plan:
        plan = Plan(device, budget_s=budget)
        for spec in specs:
            quick = sorted(spec.sizes["quick"])
            if check_sizes == "smallest":
                quick = quick[:1]
            if timed_at == "representative":
                timed, preset = fitted_size(spec, share)
            elif timed_at == "smallest-default":
                timed, preset = fitted_size(spec, share)
                if preset == "default":
                    timed = [min(spec.sizes["default"])]
            elif timed_at == "fitted":
                timed, preset = fitted_size(spec, share)
            elif timed_at == "none":
                timed, preset = [], "default"
            else:
                timed, preset = list(spec.sizes[timed_at]), timed_at
            later = []
            for impl in chosen[spec.name]:
                for dtype in dtypes:
                    reason = runnable(impl, dev_type, dtype)
                    for n in quick:
                        task = Task(spec, impl, dtype, n, "quick", CHECKS)
                        (plan.skipped.append((task, reason)) if reason
                         else plan.tasks.append(task))
                    for n in timed:
                        task = Task(spec, impl, dtype, n, preset, TIMING)
                        if reason is None and impl.uses_triton and dev_type == "cpu":
                            plan.skipped.append((task, INTERPRETER_TIMING_SKIP))
                        elif reason:
                            plan.skipped.append((task, reason))
                        else:
                            later.append(task)
            plan.tasks += later  # a loss's timings after its checks, references first
        return plan

    def estimate(plan: Plan, r: int) -> None:
        plan.rounds = r
        plan.breakdown = model.plan_seconds(plan.tasks, r, CHECKS)
        plan.estimated_seconds = sum(plan.breakdown.values())

    timed_at = timing_sizes
    share = 0.0
    notes: list[str] = []
    first_checks = "full"
    probe = build("full", "none")
    estimate(probe, 1)
    if probe.estimated_seconds > (1 - MIN_TIMING_PART) * budget:
        first_checks = "smallest"
        notes.append("checks at the smallest quick size only (both would leave less "
                     f"than {MIN_TIMING_PART:.0%} of the budget for timing)")
        probe = build("smallest", "none")
        estimate(probe, 1)
    share = max(budget - probe.estimated_seconds, 0.0) * TIMING_SHARE / max(len(specs), 1)
    steps = [(first_checks, timed_at, None),
             ("smallest", timed_at, None if first_checks == "smallest" else
              "checks at the smallest quick size only"),
             ("smallest", "fitted" if timed_at != "representative" else "smallest-default",
              "timing at one size per loss, the largest that fits its share"
              if timed_at != "representative" else "timing at the smallest default size")]
    for check_sizes, at, note in steps:
        if note:
            notes.append(note)
        plan = build(check_sizes, at)
        for r in ([rounds] if rounds else range(MAX_ROUNDS, 0, -1)):
            estimate(plan, r)
            if plan.estimated_seconds <= budget:
                break
        if plan.estimated_seconds <= budget:
            break
    if smaller and (timed_at == "representative" or "one size per loss" in " ".join(notes)):
        notes.insert(0, f"timed below the representative size to fit each loss's share of "
                        f"the budget ({share:.0f} s): {', '.join(smaller)}")
    if plan.estimated_seconds > budget:
        notes.append(f"over the budget even so: the estimate is "
                     f"{plan.estimated_seconds:.0f} s of {budget:.0f} s")
    plan.notes = notes
    return plan
