"""Verification: an implementation's output and gradients against the float64
reference, as verdicts (ok or not, max abs and relative error, a message).

Named for what it does so that it is not confused with ``lossreg compare`` (which
compares the timings of two result sets)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .lowprec import UNIT_ROUNDOFF, systematic_error
from .spec import Case, Impl, LossSpec


def to64(inputs: dict[str, Any]) -> dict[str, Any]:
    """The floating-point inputs in float64 (detached), the others as they are."""
    return {k: v.detach().double() if torch.is_tensor(v) and v.is_floating_point() else v
            for k, v in inputs.items()}


@dataclass
class Verdict:
    ok: bool
    max_abs: float | None
    rel: float | None
    message: str = ""


def compare_tensors(out: Any, ref: torch.Tensor, rtol: float, atol: float,
                    what: str = "output") -> Verdict:
    """Pass when ||out-ref||/||ref|| <= rtol, or when max|out-ref| <= atol.

    ``atol`` is an absolute floor near the dtype's rounding noise (float32 1e-7), not
    the relative tolerance reused as an absolute one: a gradient of 1e-5 per element
    must be right to 1e-5 relative, not merely within 1e-5 of the truth. NaN/inf must
    sit exactly where the reference has them (a NaN the reference lacks never passes).

    Like with like: the expected value is the float64 reference rounded to ``out``'s
    dtype where that rounding overflows. A float16 mean of 3e7 is inf when correctly
    rounded (float16's largest value is 65504), so there ``out`` must be the inf of the
    same sign, and a finite value (or the other inf) fails; everywhere else the float64
    reference itself is the expected value."""
    if not torch.is_tensor(out):
        return Verdict(False, None, None, f"{what}: returned {type(out).__name__}, not a tensor")
    if out.shape != ref.shape:
        return Verdict(False, None, None,
                       f"{what}: shape {tuple(out.shape)}, expected {tuple(ref.shape)}")
    o = out.detach().to(device=ref.device, dtype=torch.float64)
    r = rounded_overflow(ref.detach(), out.dtype)
    nonfinite_o, nonfinite_r = ~torch.isfinite(o), ~torch.isfinite(r)
    if not torch.equal(nonfinite_o, nonfinite_r) or not torch.equal(
        torch.where(nonfinite_o, o, 0).nan_to_num(0.0, 1.0, -1.0),
        torch.where(nonfinite_r, r, 0).nan_to_num(0.0, 1.0, -1.0),
    ):
        bad = int((nonfinite_o != nonfinite_r).sum())
        return Verdict(False, math.inf, math.inf,
                       f"{what}: NaN/inf differ from the reference at {bad} positions")
    fo, fr = o[~nonfinite_o], r[~nonfinite_r]
    if fo.numel() == 0:
        return Verdict(True, 0.0, 0.0)
    diff = (fo - fr).abs()
    max_abs = float(diff.max())
    err, denom = float(diff.norm()), float(fr.norm())
    rel = err / denom if denom > 0 else (0.0 if err == 0 else math.inf)
    ok = rel <= rtol or max_abs <= atol
    msg = "" if ok else (f"{what}: rel_err {rel:.3g} > rtol {rtol:g} and max_abs "
                         f"{max_abs:.3g} > atol {atol:g}")
    if ok:  # a 16-bit rtol of 1% or more must not hide a common factor (lossreg.lowprec)
        msg = systematic_error(out.dtype, fo, fr, rtol, what, by_rtol=rel <= rtol)
    return Verdict(not msg, max_abs, rel, msg)


def rounded_overflow(ref: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``ref`` with the finite values that overflow ``dtype`` replaced by that dtype's
    rounding of them (+-inf, same sign); ``ref`` itself when none does."""
    if not dtype.is_floating_point or not ref.is_floating_point():
        return ref
    rounded = ref.to(dtype)
    over = torch.isfinite(ref) & ~torch.isfinite(rounded)
    if not bool(over.any()):
        return ref
    return torch.where(over, rounded.to(ref.dtype), ref)


def worst(verdicts: list[tuple[str, Verdict]]) -> tuple[str, float | None, float | None, str]:
    """(status, largest max abs, largest relative error, the failures' messages)."""
    status = "ok" if all(v.ok for _, v in verdicts) else "fail"
    maxes = [v.max_abs for _, v in verdicts if v.max_abs is not None]
    rels = [v.rel for _, v in verdicts if v.rel is not None]
    msgs = [f"[{label}] {v.message}" for label, v in verdicts if not v.ok]
    return status, max(maxes) if maxes else None, max(rels) if rels else None, "; ".join(msgs)


def fold(verdicts: list[tuple[str, Verdict]], tol) -> dict:
    """A row's verdict columns from several labelled verdicts (seeds, outputs, grads)."""
    status, max_abs, rel, msg = worst(verdicts)
    return {"status": status, "message": msg or None, "max_abs_err": max_abs, "rel_err": rel,
            "rtol": tol[0], "atol": tol[1]}


def verdict_row(v: Verdict, tol) -> dict:
    return {"status": "ok" if v.ok else "fail", "message": v.message or None,
            "max_abs_err": v.max_abs, "rel_err": v.rel, "rtol": tol[0], "atol": tol[1]}


def cotangent(out: torch.Tensor, seed: int) -> torch.Tensor:
    """Seed 0 backpropagates ones (the usual training path); others a random cotangent."""
    if seed == 0:
        return torch.ones_like(out)
    g = torch.Generator(device=out.device).manual_seed(1000 + seed)
    return torch.rand(out.shape, generator=g, device=out.device, dtype=out.dtype) + 0.5


def judge(spec: LossSpec, inputs: dict, options: dict):
    """What a result computed from ``inputs`` is judged against (on their float64
    copies): the spec's reference, or for 16-bit inputs its `pinned_reference`, which
    keeps the discrete choices (mined pairs, active sets) the 16-bit computation makes."""
    dtypes = {v.dtype for v in inputs.values() if torch.is_tensor(v) and v.is_floating_point()}
    if spec.pinned_reference is not None and dtypes & set(UNIT_ROUNDOFF):
        return spec.pinned_reference(inputs, options)
    return spec.reference


def check_forward(spec: LossSpec, impl: Impl, inputs: dict, options: dict, tol) -> Verdict:
    with torch.no_grad():
        out = impl.fn(**inputs, **options)
    ref = judge(spec, inputs, options)(**to64(inputs), **options)
    return compare_tensors(out, ref, *tol)


def check_gradient(spec: LossSpec, impl: Impl, inputs: dict, options: dict, tol,
                   seed: int) -> Verdict:
    names = spec.grad_names(inputs)
    if not names:
        return Verdict(True, None, None, "no inputs take gradients")
    leaves = {k: (v.detach().clone().requires_grad_(True) if k in names else v)
              for k, v in inputs.items()}
    leaves64 = {k: (v.detach().double().requires_grad_(True) if k in names else v)
                for k, v in to64(inputs).items()}
    out = impl.fn(**leaves, **options)
    ref = judge(spec, inputs, options)(**leaves64, **options)
    verdicts = [("output", compare_tensors(out, ref, *tol))]
    if not verdicts[0][1].ok:
        return verdicts[0][1]
    cot = cotangent(out, seed)
    grads = torch.autograd.grad(out, [leaves[k] for k in names], cot, allow_unused=True)
    grads64 = torch.autograd.grad(ref, [leaves64[k] for k in names], cot.double(),
                                  allow_unused=True)
    for k, g, g64 in zip(names, grads, grads64):
        g64 = torch.zeros_like(leaves64[k]) if g64 is None else g64
        if g is None:
            g = torch.zeros_like(leaves[k])
        verdicts.append((f"grad {k}", compare_tensors(g, g64, *tol, what=f"grad of {k}")))
    _, max_abs, rel, msg = worst(verdicts)
    return Verdict(all(v.ok for _, v in verdicts), max_abs, rel, msg)


def gradcheck_reference(spec: LossSpec, device: str) -> Verdict:
    """``torch.autograd.gradcheck`` of the reference itself, in float64 at a tiny size."""
    n = gradcheck_size(spec)
    inputs = to64(spec.make_inputs(Case(n=n, dtype=torch.float64, device=device, seed=7,
                                        params=spec.case_params("quick", spec.options))))
    names = spec.grad_names(inputs)
    if not names:
        return Verdict(True, None, None, "no inputs take gradients")
    opts = dict(spec.options)
    # scale the output to O(1) so finite differences of large losses (perplexity)
    # are judged by gradcheck's tolerances relative to the loss, not absolutely
    with torch.no_grad():
        magnitude = spec.reference(**inputs, **opts).abs().max().clamp_min(1.0)

    def f(*ts):
        return spec.reference(**{**inputs, **dict(zip(names, ts))}, **opts) / magnitude

    args = tuple(inputs[k].detach().requires_grad_(True) for k in names)
    # Full mode costs two reference calls per input element (16000 for a vocabulary of
    # 1000): past a few hundred elements, check random projections v^T J u instead.
    fast = sum(a.numel() for a in args) > GRADCHECK_FULL_MAX
    ok = torch.autograd.gradcheck(f, args, raise_exception=True, fast_mode=fast)
    mode = " (fast mode)" if fast else ""
    return Verdict(bool(ok), None, None, f"torch.autograd.gradcheck{mode} at {spec.x_name}={n}")


#: inputs up to this many elements are gradchecked element by element
GRADCHECK_FULL_MAX = 512


def gradcheck_size(spec: LossSpec) -> int:
    return min(8, min(spec.sizes["quick"]))
