"""Planning: which loss x implementation x dtype x size cases a run holds, and
which are skipped (with the reason) on this device."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from . import measure
from .registry import Registry
from .spec import DTYPES, Impl, LossSpec


class HarnessError(ValueError):
    """Bad arguments to check/bench (unknown loss, impl, dtype...)."""


@dataclass
class Task:
    spec: LossSpec
    impl: Impl
    dtype: str
    n: int
    preset: str = "quick"


@dataclass
class Plan:
    device: str
    tasks: list[Task] = field(default_factory=list)
    skipped: list[tuple[Task, str]] = field(default_factory=list)


def default_dtypes(device: str) -> list[str]:
    return ["float32", "bfloat16"] if measure.device_type(device) == "cuda" else ["float32"]


def make_plan(
    registry: Registry, names: Sequence[str] | None, device: str, dtypes: Sequence[str] | None,
    impls: Sequence[str] | None, sizes: str,
) -> Plan:
    specs = [registry.get(n) for n in names] if names else registry.list()
    dtypes = list(dtypes) if dtypes else default_dtypes(device)
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
    if sizes not in ("quick", "default", "large"):
        raise HarnessError(f"unknown sizes {sizes!r}: expected quick, default or large")
    dev_type = measure.device_type(device)
    plan = Plan(device)
    for spec in specs:
        chosen = [i for i in spec.implementations.values() if not impls or i.name in impls]
        if impls is None or not impls:
            # torch.compile takes ~15 s per loss on a CPU: opt-in there.
            chosen = [i for i in chosen if not (i.backend == "compile" and dev_type == "cpu")]
        chosen.sort(key=lambda i: i.kind != "reference")  # reference first: speedups need it
        for impl in chosen:
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
