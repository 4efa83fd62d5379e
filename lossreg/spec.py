"""What a plugin registers: `LossSpec` (the loss), `Impl` (one way to compute it), and
`Case` (one concrete problem the harness hands to `make_inputs`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

from . import fields as F
from .fields import NAME_RE  # noqa: F401 - public since the first release
from .tolerances import DEFAULT_TOLERANCES  # noqa: F401 - the one table, re-exported

DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

IMPL_KINDS = ("reference", "optimized", "baseline")
BACKENDS_BUILTIN = ("torch", "triton", "compile")
assert tuple(DTYPES) == F.DTYPE_NAMES


class SpecError(ValueError):
    """A plugin registered something malformed."""


#: Impl field -> its rule (lossreg.fields): one line per field.
IMPL_FIELDS: dict[str, F.Rule] = {
    "name": F.name,
    "fn": F.function,
    "kind": F.one_of(*IMPL_KINDS),
    "backend": F.token,
    "devices": F.names_of(F.one_of(*F.DEVICE_TYPES), f"device types among {list(F.DEVICE_TYPES)}"),
    "dtypes": F.optional(F.names_of(F.one_of(*F.DTYPE_NAMES), f"dtypes among {list(DTYPES)}")),
    "grad_in_forward": F.boolean,
    "requires": F.names_of(F.token, "module names"),
    "uses_triton": F.optional(F.boolean),
    "description": F.text,
    "bytes_model": F.optional(F.function),
    "plugin": F.text,
}

#: LossSpec field -> its rule (lossreg.fields): one line per field.
LOSSSPEC_FIELDS: dict[str, F.Rule] = {
    "name": F.name,
    "family": F.name,
    "formula": F.nonempty_text,
    "reference": F.function,
    "make_inputs": F.function,
    "title": F.text,
    "description": F.text,
    "citation": F.text,
    "options": F.options,
    "grad_inputs": F.optional(F.names_of(F.identifier, "input names")),
    "sizes": F.sizes,
    "x_name": F.identifier,
    "input_params": F.input_params,
    "bytes_moved": F.optional(F.function),
    "flops": F.optional(F.function),
    "tolerances": F.tolerances,
    "edge_cases": F.edge_cases,
    "check_options": F.option_sets,
    "mean_count": F.optional(F.function),
    "pinned_reference": F.optional(F.function),
    "input_domains": F.input_domains,
    "plugin": F.text,
}


class UnsupportedOption(ValueError):
    """Raised by an implementation for an option set it cannot express (a peer
    library without ``reduction='none'``, say). Still a ValueError for callers; the
    harness reports such a case as ``skipped`` with the message, not as an error."""


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass
class Case:
    """One problem instance: `make_inputs(case)` turns it into keyword tensors."""

    n: int
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    seed: int = 0
    params: dict[str, Any] = field(default_factory=dict)
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        if self.generator is None:
            self.generator = torch.Generator(device=self.device).manual_seed(self.seed)

    def randn(self, *shape: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        return torch.randn(
            *shape, dtype=dtype or self.dtype, device=self.device, generator=self.generator
        )

    def rand(self, *shape: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        return torch.rand(
            *shape, dtype=dtype or self.dtype, device=self.device, generator=self.generator
        )

    def randint(self, low: int, high: int, *shape: int) -> torch.Tensor:
        return torch.randint(low, high, shape, device=self.device, generator=self.generator)


@dataclass
class Impl:
    """One implementation of a loss. `fn` has the reference's signature."""

    name: str
    fn: Callable[..., torch.Tensor]
    kind: str = "optimized"
    backend: str = "torch"
    devices: tuple[str, ...] = ("cpu", "cuda")
    dtypes: tuple[str, ...] | None = None
    grad_in_forward: bool = False
    requires: tuple[str, ...] = ()
    #: Runs Triton kernels (default: backend == "triton"). On a CPU these run only
    #: under the interpreter: checked, never timed. Set it for a library's kernels;
    #: those run there only if ``devices`` lists "cpu" (built-in "triton" ones always).
    uses_triton: bool | None = None
    description: str = ""
    #: inputs -> the minimum HBM traffic (bytes) this implementation must move, as a
    #: number (fwd+bwd) or a dict with keys among forward/backward/full; judged as
    #: ``model_bytes`` / ``bw_fraction``. None: the loss's ``bytes_moved`` model.
    bytes_model: Callable[[Mapping[str, Any]], Any] | None = None
    #: Filled in by the registry: which plugin registered this implementation.
    plugin: str = ""

    def __post_init__(self) -> None:
        self.validate()
        if self.uses_triton is None:
            self.uses_triton = self.backend == "triton"

    def validate(self) -> None:
        """Check every field against `IMPL_FIELDS` (the registry calls it again at
        registration); SpecError naming the field, what came and what was expected.
        ``devices``, ``dtypes`` and ``requires`` take a tuple, or one lone string."""
        F.validate(self, IMPL_FIELDS, f"implementation {getattr(self, 'name', '?')!r}",
                   SpecError)

    def missing_requirements(self) -> list[str]:
        """Modules in `requires` that do not import (the implementation is then unavailable)."""
        import importlib.util

        missing = []
        for mod in self.requires:
            try:
                if importlib.util.find_spec(mod) is None:
                    missing.append(mod)
            except (ImportError, ValueError):
                missing.append(mod)
        return missing

    def supports(self, device_type: str, dtype: str) -> str | None:
        """None when this implementation can run the case, else the reason it cannot."""
        missing = self.missing_requirements()
        if missing:
            return f"requires {', '.join(missing)} (not installed)"
        if device_type not in self.devices:
            return f"runs on {', '.join(self.devices)}, not {device_type}"
        if self.dtypes is not None and dtype not in self.dtypes:
            return f"supports dtypes {', '.join(self.dtypes)}, not {dtype}"
        return None


def _default_bytes_moved(inputs: Mapping[str, Any], grad_inputs: Sequence[str]) -> dict:
    read = sum(t.numel() * t.element_size() for t in inputs.values() if torch.is_tensor(t))
    write = sum(
        inputs[k].numel() * inputs[k].element_size() for k in grad_inputs if k in inputs
    )
    return {"forward": read, "backward": read + write, "full": read + write}


@dataclass
class LossSpec:
    """A loss: its formula, reference implementation and how to make inputs for it.

    `bytes_moved(inputs)` and `flops(inputs)` return a number (taken as the full
    fwd+bwd figure) or a dict with keys among forward/backward/full. The default
    bytes model is the minimum a fused implementation must move: every input read
    once (forward), plus every gradient written once (backward, full).
    """

    name: str
    family: str
    formula: str
    reference: Callable[..., torch.Tensor]
    make_inputs: Callable[[Case], dict[str, Any]]
    title: str = ""
    description: str = ""
    citation: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    grad_inputs: tuple[str, ...] | None = None
    sizes: dict[str, list[int]] = field(
        default_factory=lambda: {
            "quick": [1000, 4099],
            "default": [2**12, 2**16, 2**20],
            "large": [2**20, 2**24, 2**26],
        }
    )
    x_name: str = "n"
    #: preset -> parameters for `make_inputs` (in `case.params`, never passed to the
    #: implementations), e.g. {"quick": {"vocab": 257}, "large": {"vocab": 131072}}.
    input_params: dict[str, dict[str, Any]] = field(default_factory=dict)
    bytes_moved: Callable[[Mapping[str, Any]], Any] | None = None
    flops: Callable[[Mapping[str, Any]], Any] | None = None
    tolerances: dict[str, tuple[float, float]] = field(default_factory=dict)
    #: name -> make_inputs-like callable: extra inputs the correctness check must pass on.
    edge_cases: dict[str, Callable[[Case], dict[str, Any]]] = field(default_factory=dict)
    #: option sets (besides `options`) the checks also run, e.g. each reduction.
    check_options: list[dict[str, Any]] = field(default_factory=list)
    #: (inputs, options) -> the divisor of ``reduction="mean"``: ``mean`` equals the
    #: ``sum`` divided by it. None: the number of elements of the ``none`` output.
    #: Losses that exclude ignored tokens or weight samples say so here; it returns
    #: None for options under which the mean is no sum / count (mean of means).
    mean_count: Callable[[Mapping[str, Any], Mapping[str, Any]], float] | None = None
    #: input name -> the values it may hold, for the generated bad-input tests (the forms are
    #: in `lossreg.validate.DOMAIN_KINDS`), e.g. {"target": ("index", lambda inputs: 10)}.
    input_domains: dict[str, tuple] = field(default_factory=dict)
    #: (inputs, options) -> a function with the reference's signature that evaluates the
    #: loss at the discrete choices (a mined pair, an argmax, a hinge's active set) a
    #: correct computation in the inputs' own dtype makes. `lossreg.verify` judges 16-bit
    #: results against it (run on the float64 copies of the inputs) instead of
    #: `reference`: rounding flips choices between candidates tied within the dtype's
    #: precision, and a flip moves the gradient to other rows, which no tolerance should
    #: absorb. Say in `description` how the choices are made. None: `reference`.
    pinned_reference: Callable[[Mapping[str, Any], Mapping[str, Any]], Callable] | None = None
    #: Filled in by the registry.
    plugin: str = ""
    implementations: dict[str, Impl] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # name and family are lower snake case: neither ever reaches a file path today,
        # and the rule keeps it that way for any future per-loss or per-family output
        self.validate()
        self.title = self.title or self.name.replace("_", " ")
        self.implementations = {
            "reference": Impl("reference", self.reference, kind="reference", plugin=self.plugin)
        }

    def validate(self) -> None:
        """Check every field against `LOSSSPEC_FIELDS` (the registry calls it again at
        registration); SpecError naming the field, what came and what was expected."""
        F.validate(self, LOSSSPEC_FIELDS, f"loss {getattr(self, 'name', '?')!r}", SpecError)

    def case_params(self, preset: str, options: Mapping[str, Any]) -> dict[str, Any]:
        """What `make_inputs` sees as `case.params`: the preset's input parameters
        and the options of the call."""
        return {**self.input_params.get(preset, {}), **options}

    def mean_divisor(self, inputs: Mapping[str, Any], options: Mapping[str, Any],
                     per_sample: torch.Tensor) -> float | None:
        """What ``mean`` divides ``sum`` by (see `mean_count`); None where the mean is
        not a sum over a count for these options (a mean of per-sequence means)."""
        if self.mean_count is not None:
            value = self.mean_count(inputs, options)
            return None if value is None else float(value)
        return float(per_sample.numel())

    def option_sets(self) -> list[dict[str, Any]]:
        """``options`` and each of ``check_options`` merged over it, without repeats:
        the option sets the checks run."""
        sets = [dict(self.options)]
        for extra in self.check_options:
            merged = {**self.options, **extra}
            if merged not in sets:
                sets.append(merged)
        return sets

    def tolerance(self, dtype: str) -> tuple[float, float]:
        return tuple(self.tolerances.get(dtype, DEFAULT_TOLERANCES[dtype]))

    def grad_names(self, inputs: Mapping[str, Any]) -> list[str]:
        if self.grad_inputs is not None:
            return [k for k in self.grad_inputs if k in inputs]
        return [k for k, v in inputs.items() if torch.is_tensor(v) and v.is_floating_point()]

    def model(self, which: str, inputs: Mapping[str, Any], mode: str) -> float | None:
        """bytes or flops for `mode` from the spec's model (None when not modelled)."""
        fn = self.bytes_moved if which == "bytes" else self.flops
        if fn is None:
            if which != "bytes":
                return None
            value = _default_bytes_moved(inputs, self.grad_names(inputs))
        else:
            value = fn(inputs)
        if isinstance(value, Mapping):
            value = value.get(mode)
        elif mode != "full":
            return None
        return None if value is None else float(value)
