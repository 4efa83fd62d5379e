"""Throughput: forward, backward and fwd+bwd timings of one case (on `measure`), the
later timing rounds of it, and the columns a throughput row derives from its samples.

Why rounds, why so many samples and why the CPU allocator is pinned while timing:
docs/measurement.md."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from typing import Any

import torch

from . import measure
from .spec import Case, Impl, LossSpec

#: samples per timed mode over all rounds, wherever they fit in the case's time budget
MIN_SAMPLES = 15
#: bytes of inputs to rotate between, so that caches do not flatter small sizes
ROTATION_BYTES = {"cpu": 64 << 20, "cuda": 256 << 20}
#: seconds of timing per mode and case, split over the rounds
BUDGET_S = {"cpu": 0.3, "cuda": 0.15}
MODES = ("forward", "backward", "full")


def n_input_sets(inputs: dict, device: str) -> int:
    size = sum(t.numel() * t.element_size() for t in inputs.values() if torch.is_tensor(t))
    target = ROTATION_BYTES[measure.device_type(device)]
    return int(min(8, max(2, math.ceil(target / max(size, 1)))))


def throughput_runs(spec: LossSpec, impl: Impl, case: Case, options: dict):
    """``(first inputs, {mode: run})`` for timing one case: several input sets to rotate
    between, and ``run(i)`` that does call i's untimed set-up (the forward pass, before
    timing a backward) and returns the callable to time. backward and full exist only
    where some input takes a gradient. The pytest-benchmark suite builds its cases with
    this too."""
    device = case.device
    first = spec.make_inputs(case)
    sets = [first] + [
        spec.make_inputs(Case(case.n, case.dtype, device, seed=case.seed + 1 + i,
                              params=case.params))
        for i in range(n_input_sets(first, device) - 1)
    ]
    names = spec.grad_names(first)
    leaves = [{k: (v.detach().requires_grad_(True) if k in names else v) for k, v in s.items()}
              for s in sets]

    def call(i):
        return impl.fn(**leaves[i % len(leaves)], **options)

    def grads(out, i):
        return torch.autograd.grad(out, [leaves[i % len(leaves)][k] for k in names],
                                   torch.ones_like(out))

    def fwd(i):
        return lambda: call(i)

    def bwd(i):
        out = call(i)
        return lambda: grads(out, i)

    def full(i):
        return lambda: grads(call(i), i)

    return first, ({"forward": fwd, "backward": bwd, "full": full} if names
                   else {"forward": fwd})


def model_bytes(spec: LossSpec, impl: Impl, inputs: Mapping[str, Any], mode: str):
    """The implementation's minimum traffic for ``mode``: its own ``bytes_model`` (a
    number is the fwd+bwd figure, a dict is by mode) where it has one, else the loss's."""
    if impl.bytes_model is None:
        return spec.model("bytes", inputs, mode)
    value = impl.bytes_model(inputs)
    if isinstance(value, Mapping):
        value = value.get(mode)
    elif mode != "full":
        return None
    return None if value is None else float(value)


def allocator(device: str):
    """`measure.heap_only` on a CPU, nothing on a GPU."""
    return measure.heap_only() if measure.device_type(device) == "cpu" else \
        contextlib.nullcontext()


def first_round(spec: LossSpec, impl: Impl, case: Case, options: dict,
                rounds: int = 1) -> dict[str, dict]:
    """The first timing round of a case: per mode its samples (ms), peak memory and the
    bytes, flops and implementation-bytes models. The time budget per mode is split over
    ``rounds``; `later_round` repeats the first round's count, so each round weighs the
    same in the median."""
    device = case.device
    first, runs = throughput_runs(spec, impl, case, options)
    budget = BUDGET_S[measure.device_type(device)] / rounds
    warmup = 3 if impl.backend in ("compile", "triton") else 2
    results: dict[str, dict] = {}
    for mode, run in runs.items():
        with allocator(device):
            t = measure.time_calls(device, run, budget_s=budget, warmup=warmup,
                                   min_repeats=max(1, math.ceil(5 / rounds)),
                                   cheap_min=(math.ceil(MIN_SAMPLES / rounds),
                                              budget * rounds))
        results[mode] = {
            # run(0) does backward's forward before peak_bytes starts: only the timed call counts
            "samples": t.samples, "peak_bytes": measure.peak_bytes(device, run(0)),
            "bytes": spec.model("bytes", first, mode), "flops": spec.model("flops", first, mode),
            "model_bytes": model_bytes(spec, impl, first, mode),
        }
    return results


def later_round(spec: LossSpec, impl: Impl, case: Case, options: dict,
                repeats: dict[str, int], warmup: dict[str, int]) -> dict[str, list[float]]:
    """A later timing round of a case: fresh inputs, ``warmup[mode]`` untimed calls,
    then ``repeats[mode]`` samples per mode."""
    _, runs = throughput_runs(spec, impl, case, options)
    samples = {}
    for mode, n in repeats.items():
        with allocator(case.device):
            samples[mode] = measure.time_calls(case.device, runs[mode], warmup=warmup[mode],
                                               repeats=n).samples
    return samples


_LOSS_MODEL = object()  # model_bytes not given: the loss's bytes model


def timing_columns(samples: list[float], model: tuple, reference_ms: float | None = None,
                   peak_gbps: float | None = None, model_bytes=_LOSS_MODEL) -> dict:
    """A throughput row's time columns from its samples (ms), and what derives from them:
    GB/s and TFLOP/s from the loss's (bytes, flops) models, speedup over the reference's
    median, and the fraction of the device's copy bandwidth that ``model_bytes`` (the
    implementation's minimum traffic, `model_bytes`; the loss's bytes model when not
    given; None: not modelled for this mode) reached."""
    t = measure.Timing.of(samples)
    ms = t.median_ms
    nbytes, flops = model
    moved = nbytes if model_bytes is _LOSS_MODEL else model_bytes
    gbps = nbytes / (ms * 1e-3) / 1e9 if nbytes and ms > 0 else None
    achieved = moved / (ms * 1e-3) / 1e9 if moved and ms > 0 else None
    return dict(
        time_ms=ms, time_ms_p20=t.p20_ms, time_ms_p80=t.p80_ms, repeats=t.repeats, gbps=gbps,
        tflops=flops / (ms * 1e-3) / 1e12 if flops and ms > 0 else None,
        speedup=reference_ms / ms if reference_ms and ms > 0 else None,
        bw_fraction=achieved / peak_gbps if achieved and peak_gbps else None,
        model_bytes=None if moved is None else int(moved),
    )
