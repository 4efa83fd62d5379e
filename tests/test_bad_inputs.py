"""A bad-input matrix generated from each spec (DESIGN.md: every loss validates its inputs
with a ValueError that says what was expected, and all implementations share it).

For every registered loss and every implementation that runs on the CPU (Triton ones
under the interpreter; of the ``compile`` ones only mse's, since compiling is slow), the
valid inputs of ``make_inputs`` at a tiny n are turned into bad ones:

- shape: an input loses its last dim, gains a trailing dim of 2, or loses a row, where
  that breaks a shape relation of the valid inputs (two sizes, or two shapes, that are
  equal at two different n);
- dtype: int64 or complex64 for a floating input, float32 or complex64 for integer
  labels, complex64 for a mask or a {-1, +1} label;
- device: one input on the ``meta`` device, the others on the CPU;
- value: labels out of the range their spec declares (``LossSpec.input_domains``);
- option: an unknown string for every string option (reduction="bogus", ...).

Each must raise ValueError or TypeError whose message names the argument and says what
was expected. Inputs whose answer is the reference's are checked against the float64
reference instead (both raise, or both return the same numbers, NaN/inf included):
NaN and +inf in a float input; empty inputs (no rows: torch's reductions define mean as
NaN and sum as 0, and the losses follow torch where the reference accepts them); shape
changes that keep every relation (e.g. gaussian_nll's homoscedastic ``var``).

``python tests/test_bad_inputs.py`` prints how many bad inputs the matrix tries.
"""

from __future__ import annotations

import collections
import re
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

import lossreg
from lossreg.planning import runnable
from lossreg.verify import compare_tensors as compare
from lossreg.spec import Case, LossSpec

SEED = 3
#: compile implementations take ~15 s each to build: only this loss's is tried
COMPILE_LOSSES = ("mse",)
#: kinds whose cases must be rejected with ValueError/TypeError
BAD_KINDS = ("shape", "dtype", "device", "value", "option")
#: kinds whose cases must behave as the float64 reference does
AS_REFERENCE_KINDS = ("nonfinite", "empty", "same_shape")
GROUPS = BAD_KINDS + ("nonfinite", "empty")
#: ways of saying what was expected
EXPECTED_RE = re.compile(r"must|expected|expects|should|needs?\b|one of|only|at least",
                         re.IGNORECASE)


@dataclass
class BadCase:
    kind: str
    label: str
    inputs: dict[str, Any]
    options: dict[str, Any]
    #: names any of which the message must mention
    names: tuple[str, ...]
    expect: str = "raise"  # or "as_reference"
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------- inputs and relations
def sizes(spec: LossSpec) -> tuple[int, int]:
    """Two tiny sizes (the second to tell the dims that grow with n from fixed ones)."""
    n = min(min(spec.sizes["quick"]), 6)
    return n, n + 2


def valid_inputs(spec: LossSpec, n: int) -> dict[str, Any]:
    params = spec.case_params("quick", spec.options)
    return spec.make_inputs(Case(n, torch.float32, "cpu", SEED, params=params))


def tensors(inputs):
    return {k: v for k, v in inputs.items() if torch.is_tensor(v)}


def _positions(shape):
    """Each dim addressed from the front and from the back."""
    nd = len(shape)
    return [("f", i) for i in range(nd)] + [("b", i - nd) for i in range(nd)]


def _size_at(shape, pos):
    _, i = pos
    if -len(shape) <= i < len(shape):
        return shape[i]
    return None


def relations(a: dict, b: dict) -> list[tuple]:
    """Shape relations among the tensor inputs that hold at both sizes:
    ("shape", t, u) equal shapes; ("dim", t, p, u, q) equal sizes at positions p, q."""
    ta, tb = tensors(a), tensors(b)
    names = list(ta)
    out = []
    for t in names:
        for u in names:
            if t == u:
                continue
            sa_t, sa_u, sb_t, sb_u = ta[t].shape, ta[u].shape, tb[t].shape, tb[u].shape
            if t < u and sa_t == sa_u and sb_t == sb_u:
                out.append(("shape", t, u))
            for p in _positions(sa_t):
                for q in _positions(sa_u):
                    if (_size_at(sa_t, p) == _size_at(sa_u, q)
                            and _size_at(sb_t, p) == _size_at(sb_u, q)):
                        out.append(("dim", t, p, u, q))
    return out


def broken(rels, shapes: dict[str, tuple]) -> set[str]:
    """Names of the inputs whose relation to another input no longer holds."""
    names = set()
    for r in rels:
        if r[0] == "shape":
            _, t, u = r
            if shapes[t] != shapes[u]:
                names |= {t, u}
        else:
            _, t, p, u, q = r
            st, su = _size_at(shapes[t], p), _size_at(shapes[u], q)
            if st is None or su is None or st != su:
                names |= {t, u}
    return names


def batch_dims(a: dict, b: dict) -> dict[str, list[int]]:
    """Per tensor input, the dims that grow with n."""
    ta, tb = tensors(a), tensors(b)
    return {k: [d for d in range(ta[k].dim()) if ta[k].shape[d] != tb[k].shape[d]] for k in ta}


def _set_last(t: torch.Tensor, value) -> torch.Tensor:
    t = t.clone().contiguous()
    t.view(-1)[-1] = value
    return t


def _set_mid(t: torch.Tensor, value) -> torch.Tensor:
    t = t.clone().contiguous()
    t.view(-1)[t.numel() // 2] = value
    return t


#: shape changes a loss accepts by design (they keep no relation, but are not wrong)
ACCEPTED_SHAPES = {
    ("gaussian_nll", "var", "drop_last"): "homoscedastic var: input's shape without its "
                                          "last dim, as torch's gaussian_nll_loss",
    ("ppo_clip", "advantages", "drop_last"): "one advantage per sequence (N,), documented",
}


def _bad_values(spec: LossSpec, name: str, t: torch.Tensor, inputs, options) -> list:
    """(label, tensor) pairs holding a value outside the input's declared domain."""
    dom = spec.input_domains.get(name)
    if dom is None:
        return []
    kind = dom[0]
    out = []
    if kind == "index":
        high = dom[1](inputs) if callable(dom[1]) else dom[1]
        allowed = set(dom[2] if len(dom) > 2 else ())
        if options.get("ignore_index") is not None:
            allowed.add(options["ignore_index"])
        neg = -1
        while neg in allowed:
            neg -= 1
        values = ([high, 10**9] if high is not None else []) + [neg]
        out = [(f"{name}={v}", _set_last(t, v)) for v in values]
    elif kind == "values":
        allowed = tuple(dom[1])
        lo, hi = min(allowed), max(allowed)
        base = t.to(torch.int64) if t.dtype == torch.bool else t
        values = [hi + 1, lo - 1]
        mid = (lo + hi) / 2
        if mid not in allowed and (base.is_floating_point() or float(mid).is_integer()):
            values.append(int(mid) if float(mid).is_integer() else mid)
        out = [(f"{name}={v}", _set_last(base, v)) for v in values]
    elif kind == "range":
        _, lo, hi = dom
        values = [v for v in (lo - 0.5, hi + 0.5) if abs(v) != float("inf")]
        out = [(f"{name}={v}", _set_last(t, v)) for v in values]
    elif kind != "integers":
        raise AssertionError(f"{spec.name}: unknown domain kind {kind!r} for {name}")
    return out


def bad_cases(spec: LossSpec, group: str) -> list[BadCase]:
    n1, n2 = sizes(spec)
    a, b = valid_inputs(spec, n1), valid_inputs(spec, n2)
    opts = dict(spec.options)
    ts = tensors(a)
    out: list[BadCase] = []
    if group == "shape":
        rels = relations(a, b)
        shapes = {k: tuple(v.shape) for k, v in ts.items()}
        for name, t in ts.items():
            muts = {}
            if t.dim() >= 1:
                muts["drop_last"] = t.select(-1, 0).clone()
            muts["add_dim"] = t.unsqueeze(-1).expand(*t.shape, 2).clone()
            if t.dim() >= 1 and t.shape[0] > 1:
                muts["shrink_first"] = t[1:].clone()
            for how, m in muts.items():
                who = broken(rels, {**shapes, name: tuple(m.shape)})
                label = f"{name}:{how}{tuple(m.shape)}"
                kw = {**a, name: m}
                if who and (spec.name, name, how) not in ACCEPTED_SHAPES:
                    out.append(BadCase("shape", label, kw, opts, tuple(sorted(who))))
                else:
                    out.append(BadCase("same_shape", label, kw, opts, tuple(ts),
                                       expect="as_reference"))
    elif group == "dtype":
        for name, t in ts.items():
            dom = spec.input_domains.get(name, ("",))[0]
            casts = [torch.complex64]
            if t.is_floating_point() and dom != "values":
                casts.insert(0, torch.int64)
            elif not t.is_floating_point() and t.dtype != torch.bool and dom in (
                    "index", "integers"):
                casts.insert(0, torch.float32)
            for dt in casts:
                out.append(BadCase("dtype", f"{name}:{dt}", {**a, name: t.to(dt)}, opts,
                                   (name,)))
    elif group == "device":
        if len(ts) > 1:
            for name, t in ts.items():
                out.append(BadCase("device", f"{name}:meta", {**a, name: t.to("meta")},
                                   opts, (name,)))
    elif group == "value":
        for name, t in ts.items():
            for label, m in _bad_values(spec, name, t, a, opts):
                out.append(BadCase("value", label, {**a, name: m}, opts, (name,)))
    elif group == "option":
        for key, value in spec.options.items():
            if isinstance(value, str):
                out.append(BadCase("option", f"{key}=bogus", a, {**opts, key: "bogus"},
                                   (key,)))
    elif group == "nonfinite":
        option_sets = [opts] + ([{**opts, "reduction": "none"}]
                                if opts.get("reduction") not in (None, "none") else [])
        for name, t in ts.items():
            if not t.is_floating_point():
                continue
            for v in (float("nan"), float("inf")):
                for o in option_sets:
                    red = f",reduction={o['reduction']}" if "reduction" in o else ""
                    out.append(BadCase("nonfinite", f"{name}={v}{red}",
                                       {**a, name: _set_mid(t, v)}, o, tuple(ts),
                                       expect="as_reference"))
    elif group == "empty":
        dims = batch_dims(a, b)
        if any(dims.values()):
            kw = dict(a)
            for name, ds in dims.items():
                for d in ds:
                    kw[name] = kw[name].narrow(d, 0, 0)
            sets = [opts] + [{**opts, "reduction": r} for r in ("sum", "none")
                             if "reduction" in opts and opts["reduction"] != r]
            for o in sets:
                red = f"reduction={o['reduction']}" if "reduction" in o else "default"
                out.append(BadCase("empty", red, kw, o, tuple(ts), expect="as_reference"))
    return out


# ---------------------------------------------------------------- running one case
def _names_re(names) -> re.Pattern:
    alts = "|".join(re.escape(n) for n in names)
    return re.compile(rf"(?<![A-Za-z0-9_])({alts})(?![A-Za-z0-9_])")


def _call(fn, inputs, options):
    try:
        with torch.no_grad():
            return fn(**inputs, **options), None
    except Exception as exc:  # noqa: BLE001 - the kind of exception is what is checked
        return None, exc


def _check_raised(exc, names) -> str | None:
    if exc is None:
        return "returned a value instead of raising"
    if not isinstance(exc, (ValueError, TypeError)):
        return f"raised {type(exc).__name__} (not ValueError/TypeError): {exc}"
    msg = str(exc)
    if not _names_re(names).search(msg):
        return f"message does not name {'/'.join(names)}: {msg!r}"
    if not EXPECTED_RE.search(msg):
        return f"message does not say what was expected: {msg!r}"
    return None


def _to64(inputs):
    return {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v
            for k, v in inputs.items()}


def run_case(spec: LossSpec, impl, case: BadCase) -> str | None:
    """None when ``impl`` handles ``case`` as it must, else what went wrong."""
    if case.expect == "raise":
        out, exc = _call(impl.fn, case.inputs, case.options)
        return _check_raised(exc, case.names)
    ref, ref_exc = _call(spec.reference, _to64(case.inputs), case.options)
    out, exc = _call(impl.fn, case.inputs, case.options)
    if ref_exc is not None:
        if not isinstance(ref_exc, (ValueError, TypeError)):
            return f"the reference raised {type(ref_exc).__name__}: {ref_exc}"
        why = _check_raised(exc, case.names)
        return None if why is None else f"the reference raises ({ref_exc}), this {why}"
    if exc is not None:
        if isinstance(exc, ValueError) and type(exc).__name__ == "UnsupportedOption":
            return None  # a peer that declares it cannot express these options
        return f"raised {type(exc).__name__} where the reference returns: {exc}"
    v = compare(out, ref, *spec.tolerance("float32"))
    return None if v.ok else v.message


# ---------------------------------------------------------------- parametrization
def cpu_impls(spec: LossSpec):
    for impl in spec.implementations.values():
        if impl.backend == "compile" and spec.name not in COMPILE_LOSSES:
            continue
        if runnable(impl, "cpu", "float32") is None:
            yield impl


#: (loss, impl, group) -> why it cannot pass yet (strict: it must fail). All are numerics
#: of NaN/inf (or of an empty batch), not validation: the reference's value is quoted.
XFAIL: dict[tuple[str, str, str], str] = {
    ("bce_with_logits", "torch", "nonfinite"): "+inf logit: reference nan, torch's "
                                               "built-in inf",
    ("gaussian_nll", "torch", "nonfinite"): "var=+inf: reference nan, torch's built-in inf",
    # inherent: the projected form is the optimization, and it cannot tell inf from NaN
    ("pca_reconstruction", "projected", "nonfinite"): (
        "+inf in weight: reference inf (every residual entry x - W W^T x is +-inf), "
        "projected nan: ||x||^2 - 2||z||^2 + z^T G z subtracts infinite terms (inf - inf); "
        "telling inf from NaN needs the n x d reconstruction this form avoids (inherent)"),
    ("pca_reconstruction", "triton", "nonfinite"): (
        "+inf in weight: reference inf, kernel nan: the same projected form "
        "||x||^2 - 2||z||^2 + z^T G z, inf - inf (inherent, see projected)"),
    ("reward_bt", "torch", "nonfinite"): "chosen=+inf: reference finite, torch nan",
    ("multiclass_hinge", "torch", "nonfinite"): "NaN score: reference nan, torch's "
                                                "multi_margin_loss finite",
    ("dpo", "torch", "nonfinite"): "+inf log-prob: reference inf, torch nan",
    ("dpo", "liger", "nonfinite"): "+inf log-prob: NaN/inf differ from the reference's",
    ("jsd", "liger", "empty"): "no rows, sum: Liger gives NaN where the reference gives 0",
    ("cpo", "liger", "nonfinite"): "+inf log-prob: NaN/inf differ from the reference's",
    ("simpo", "liger", "nonfinite"): "+inf log-prob: NaN/inf differ from the reference's",
    ("fused_linear_cross_entropy", "torch", "nonfinite"): "+inf in weight: reference nan in "
                                                          "every row, torch in some",
    # rows with a +inf logit are NaN in all three (as torch's); the rest is the reference's
    # own 0 * inf, which torch's F.cross_entropy does not have either
    ("fused_linear_cross_entropy", "chunked", "nonfinite"): (
        "+inf in weight: reference nan in every row, chunked in the rows with a +inf logit "
        "only: a -inf logit (inf weight x negative hidden) makes the reference's "
        "label-smoothing term label_smoothing/C * sum(-log p) = 0 * inf = nan even at "
        "label_smoothing=0; the fused forms skip that term at 0 (its sum of the logits would "
        "be an extra pass over each chunk), so the row keeps torch's finite loss"),
    ("fused_linear_cross_entropy", "triton", "nonfinite"): (
        "+inf in weight: reference nan in every row, kernel in the rows with a +inf logit "
        "only: the reference's 0 * inf label-smoothing term at label_smoothing=0 (see "
        "chunked); the kernel skips the term at 0, as torch's F.cross_entropy"),
    ("fused_linear_cross_entropy", "liger", "nonfinite"): "+inf in weight: reference nan "
                                                          "in every row, Liger in some",
    # by design: skipping the unlabelled rows is the optimization
    ("mlm", "selected", "nonfinite"): (
        "NaN/inf in an unlabelled row of hidden (or in weight): reference nan there (it "
        "projects every row, and its 0-weighted CE of a NaN row is 0 * nan), selected gives "
        "0: it never projects unlabelled rows, by design (that is the optimization); with "
        "inf in weight, labelled rows also differ as fused_linear_cross_entropy's (0 * inf)"),
    ("mlm", "triton", "nonfinite"): (
        "NaN/inf in an unlabelled row of hidden (or in weight): reference nan there, the "
        "kernel gives 0: it never projects unlabelled rows, by design (see selected)"),
    ("cross_entropy", "liger", "empty"): "Liger's kernel fails on no rows (max() of empty)",
    ("fused_linear_cross_entropy", "liger", "empty"): "Liger fails on no rows "
                                                      "(ZeroDivisionError)",
    ("fused_linear_distillation", "liger", "empty"): "Liger fails on no rows "
                                                     "(ZeroDivisionError)",
    ("fused_linear_distillation", "liger_chunked", "empty"): "no rows: reference nan, "
                                                             "Liger 0",
    ("kl_distillation", "liger", "empty"): "no rows: reference nan, Liger 0",
    **{(loss, "liger", "nonfinite"): "NaN/inf at an ignored (prompt, padding) position: "
       "the reference ignores it, Liger masks by multiplying (NaN x 0 = NaN)"
       for loss in ("fused_linear_dpo", "fused_linear_cpo", "fused_linear_simpo",
                    "fused_linear_kto", "fused_linear_grpo", "grpo")},
}


def _params():
    out = []
    for spec in lossreg.losses():
        for impl in cpu_impls(spec):
            for group in GROUPS:
                marks = ()
                reason = XFAIL.get((spec.name, impl.name, group))
                if reason:
                    marks = (pytest.mark.xfail(reason=reason, strict=True),)
                out.append(pytest.param(spec.name, impl.name, group, marks=marks,
                                        id=f"{spec.name}-{impl.name}-{group}"))
    return out


@pytest.mark.parametrize("loss,impl_name,group", _params())
def test_bad_inputs(loss, impl_name, group):
    spec = lossreg.get(loss)
    impl = spec.implementations[impl_name]
    failures = []
    for case in bad_cases(spec, group):
        why = run_case(spec, impl, case)
        if why:
            failures.append(f"[{case.kind}] {case.label}: {why}")
    assert not failures, f"{loss}/{impl_name}: " + "\n  ".join(failures)


@pytest.mark.parametrize("spec", lossreg.losses(), ids=lambda s: s.name)
def test_spec_declares_label_domains(spec):
    """Integer and bool inputs are labels or masks: their spec says what they may hold, and
    the valid inputs hold only that (so the derived bad values are the only bad ones)."""
    inputs = valid_inputs(spec, sizes(spec)[0])
    for name, t in tensors(inputs).items():
        if not t.is_floating_point():
            assert name in spec.input_domains, f"{spec.name}: no input_domains[{name!r}]"
    for name in spec.input_domains:
        assert name in inputs, f"{spec.name}: input_domains names unknown input {name!r}"
    _, exc = _call(spec.reference, inputs, spec.options)
    assert exc is None, f"{spec.name}: the reference rejects the valid inputs: {exc}"


def matrix_counts() -> dict[str, int]:
    """How many bad (and as-the-reference) inputs the matrix tries, per kind, summed over
    losses x CPU implementations."""
    counts: collections.Counter = collections.Counter()
    for spec in lossreg.losses():
        k = len(list(cpu_impls(spec)))
        for group in GROUPS:
            for case in bad_cases(spec, group):
                counts[case.kind] += k
    return dict(counts)


def test_matrix_counts(capsys):
    counts = matrix_counts()
    bad = sum(counts[k] for k in BAD_KINDS if k in counts)
    with capsys.disabled():
        print(f"\nbad inputs tried (losses x impls x bad kinds): {bad}; per kind: "
              + ", ".join(f"{k} {counts.get(k, 0)}" for k in BAD_KINDS + AS_REFERENCE_KINDS))
    assert all(counts.get(k, 0) > 0 for k in BAD_KINDS)


if __name__ == "__main__":
    c = matrix_counts()
    print("bad inputs tried:", sum(c.get(k, 0) for k in BAD_KINDS))
    for k in BAD_KINDS + AS_REFERENCE_KINDS:
        print(f"  {k}: {c.get(k, 0)}")
