"""Holding an implementation to its independent oracle (``tests/oracles.py``) in float64:
forward on fresh random inputs with every option set the spec declares and on the spec's
edge cases; gradients against central finite differences of the oracle (so neither
side's autograd is trusted). `loss_tester.LossTester` runs these for every loss.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch

from lossreg.spec import Case, UnsupportedOption

def _seed(*parts) -> int:
    return zlib.crc32(":".join(map(str, parts)).encode())


def _numpy(inputs: dict) -> dict:
    return {k: (v.detach().cpu().numpy() if torch.is_tensor(v) else v) for k, v in inputs.items()}


def _option_sets(spec) -> list[dict]:
    return [dict(spec.options)] + [{**spec.options, **extra} for extra in spec.check_options]


def _close(out, expected, what: str, rtol=1e-9, atol=1e-12):
    with np.errstate(all="ignore"):
        _compare(out, expected, what, rtol, atol)


def _compare(out, expected, what, rtol, atol):
    got = np.asarray(out.detach().cpu().numpy() if torch.is_tensor(out) else out, dtype=float)
    exp = np.asarray(expected, dtype=float)
    assert got.shape == exp.shape, f"{what}: shape {got.shape}, oracle {exp.shape}"
    nan = np.isnan(exp)
    assert (np.isnan(got) == nan).all(), f"{what}: NaN where the oracle has {exp[~nan][:3]}"
    inf = np.isinf(exp)
    assert (got[inf] == exp[inf]).all(), f"{what}: the oracle overflows to inf, got {got[inf][:3]}"
    g, e = got[~nan & ~inf], exp[~nan & ~inf]
    err = np.abs(g - e).max(initial=0.0)
    scale = np.linalg.norm(e)
    assert err <= atol or np.linalg.norm(g - e) <= rtol * scale, (
        f"{what}: max abs err {err:.3e}, rel {np.linalg.norm(g - e) / max(scale, 1e-300):.3e}")


def _finite_difference(fn, arrays: dict, name: str, idx, direction=None, rel_h=1e-6):
    """d/dt fn(arrays with arrays[name] moved by t along one coordinate or a direction)."""
    base = arrays[name]
    step = np.zeros_like(base)
    if direction is None:
        step.flat[idx] = 1.0
        h = rel_h * max(1.0, abs(base.flat[idx]))
    else:
        step = direction
        h = rel_h * max(1.0, np.abs(base).max())
    plus = fn({**arrays, name: base + h * step})
    minus = fn({**arrays, name: base - h * step})
    return (plus - minus) / (2 * h)


def _check_gradients(spec, impl, inputs: dict, options: dict, oracle, seed: int, what: str):
    names = [k for k in spec.grad_names(inputs)]
    if not names:
        return
    leaves = {k: (v.detach().clone().requires_grad_(True) if k in names else v)
              for k, v in inputs.items()}
    out = impl.fn(**leaves, **options)
    if not out.requires_grad:
        pytest.fail(f"{what}: output does not require grad")
    gen = torch.Generator().manual_seed(seed)
    cot = torch.rand(out.shape, generator=gen, dtype=out.dtype) + 0.5
    grads = torch.autograd.grad(out, [leaves[k] for k in names], cot, allow_unused=True)
    arrays = _numpy(inputs)
    cot_np = cot.numpy()

    def phi(a):
        return float(np.sum(cot_np * np.asarray(oracle(**a, **options))))

    rng = np.random.default_rng(seed)
    for k, g in zip(names, grads):
        g = np.zeros(arrays[k].shape) if g is None else g.detach().numpy()
        scale = max(np.abs(g).max(initial=0.0), 1e-8)
        coords = rng.choice(g.size, size=min(g.size, 8), replace=False)
        for i in coords:
            fd = _finite_difference(phi, arrays, k, int(i))
            assert abs(g.flat[i] - fd) <= 1e-5 * scale + 1e-7 * abs(fd), (
                f"{what}: d/d{k}[{i}] = {g.flat[i]:.10g}, finite difference {fd:.10g}")
        direction = rng.standard_normal(g.shape)
        fd = _finite_difference(phi, arrays, k, None, direction)
        dot = float((g * direction).sum())
        assert abs(dot - fd) <= 1e-5 * scale * np.abs(direction).sum() ** 0.5 * 4, (
            f"{what}: directional derivative along a random direction of {k}: {dot:.10g}, "
            f"finite difference {fd:.10g}")


def _small_inputs(spec, options, seed):
    """Inputs at a quarter of the smallest quick size (Triton's interpreter is slow), odd
    so that no block size divides it; the quick size where the spec needs more."""
    params = spec.case_params("quick", options)
    smallest = min(spec.sizes["quick"])
    for n in (max(1, smallest // 4) | 1, smallest):
        try:
            inputs = spec.make_inputs(Case(n, torch.float64, "cpu", seed=seed, params=params))
            spec.reference(**inputs, **options)
            return inputs
        except ValueError:
            continue
    raise AssertionError(f"{spec.name}: make_inputs gives no valid inputs at n={smallest}")


def forward_and_gradient(spec, impl, oracle):
    """Every option set: forward against the oracle; gradients at the first set and at
    every ``reduction="none"`` set."""
    for j, options in enumerate(_option_sets(spec)):
        seed = _seed(spec.name, j)
        inputs = _small_inputs(spec, options, seed)
        what = f"{spec.name}:{impl.name} {options}"
        try:
            out = impl.fn(**inputs, **options)
        except UnsupportedOption:
            continue  # the harness records these as skipped, with the reason
        _close(out, oracle(**_numpy(inputs), **options), what)
        if j == 0 or options.get("reduction") == "none":
            _check_gradients(spec, impl, inputs, options, oracle, seed, what)


def edge_cases(spec, impl, oracle):
    options = dict(spec.options)
    for name, make in spec.edge_cases.items():
        inputs = make(Case(1, torch.float64, "cpu", seed=_seed(spec.name, name),
                           params=spec.case_params("quick", options)))
        try:
            out = impl.fn(**inputs, **options)
        except UnsupportedOption:
            continue
        with np.errstate(all="ignore"):
            expected = oracle(**_numpy(inputs), **options)
        _close(out, expected, f"{spec.name}:{impl.name} edge case {name}")
