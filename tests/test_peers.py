"""The `peers` plugin: Liger-Kernel and cut-cross-entropy implementations.

The libraries are normally absent: then the implementations must be registered yet
unavailable (skipped rows naming the module, never errors). The adapters' argument
mapping is tested against fake peer modules put in ``sys.modules``: plain-torch
functions with the peers' documented semantics (their quirks included: Liger's mean
over no kept row is 0, its divergences lack the T^2 factor, its losses come back in
float32...), which record how they were called. A last test runs the real library
where it is importable.
"""

from __future__ import annotations

import importlib.machinery
import math
import os
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from lossreg_plugins import peers

import lossreg
from lossreg.planning import runnable
from lossreg.registry import Registry, default_registry
from lossreg.runner import execute
from lossreg.spec import Case
from lossreg.verify import compare_tensors, to64

PEER_IMPLS = {
    ("cross_entropy", "liger"): "liger_kernel",
    ("fused_linear_cross_entropy", "liger"): "liger_kernel",
    ("fused_linear_cross_entropy", "cce"): "cut_cross_entropy",
    ("kl_distillation", "liger"): "liger_kernel",
    ("kl_distillation", "liger_kl_div"): "liger_kernel",
    ("fused_linear_distillation", "liger"): "liger_kernel",
    ("fused_linear_distillation", "liger_chunked"): "liger_kernel",
    ("dpo", "liger"): "liger_kernel",
    ("jsd", "liger"): "liger_kernel",
    ("tvd", "liger"): "liger_kernel",
    ("orpo", "liger"): "liger_kernel",
    ("cpo", "liger"): "liger_kernel",
    ("simpo", "liger"): "liger_kernel",
    ("kto", "liger"): "liger_kernel",
    ("grpo", "liger"): "liger_kernel",
    **{(f"fused_linear_{name}", "liger"): "liger_kernel"
       for name in ("dpo", "orpo", "cpo", "simpo", "kto", "grpo")},
}
BACKEND = {"liger_kernel": "liger_kernel", "cut_cross_entropy": "cut_cross_entropy"}
PEER_MODULES = ("liger_kernel", "cut_cross_entropy")


# ------------------------------------------------------------------ fakes
def _acc(x):
    return x if x.dtype == torch.float64 else x.float()


def _jsd_rows(logq, logp, beta):
    """Liger's generalized JSD per row: X = log q (input), Y = log p (target)."""
    q, p = logq.exp(), logp.exp()
    if beta == 0.0:
        return (p * (logp - logq)).sum(-1)
    if beta == 1.0:
        return (q * (logq - logp)).sum(-1)
    logm = torch.log(beta * p + (1 - beta) * q)
    return (beta * p * (logp - logm) + (1 - beta) * q * (logq - logm)).sum(-1)


def _liger_ce_rows(x, target, weight, ignore_index, label_smoothing, z, reduction):
    """Liger's CE kernel: the weighted part of the mean divided by the kept weights, the
    z-loss by the kept count; ignored rows give 0, so nothing kept gives 0 (not NaN)."""
    x = _acc(x)
    n_cls = x.shape[1]
    keep = target != ignore_index
    y = torch.where(keep, target, torch.zeros_like(target))
    w = _acc(weight) if weight is not None else torch.ones(n_cls, dtype=x.dtype)
    lse = torch.logsumexp(x, 1)
    nll = (lse - x.gather(1, y[:, None]).squeeze(1)) * w[y]
    smooth = (w * (lse[:, None] - x)).sum(1) * label_smoothing / n_cls
    main, zl = (1 - label_smoothing) * nll + smooth, z * lse**2
    if reduction == "mean":
        kept_w = (w[y] * keep).sum()
        main = main / torch.where(kept_w == 0, torch.ones_like(kept_w), kept_w)
        zl = zl / keep.sum().clamp_min(1)
    rows = torch.where(keep, main + zl, torch.zeros_like(main))
    return rows if reduction == "none" else rows.sum()


class Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, name, *args, **kwargs):
        self.calls.append((name, args, kwargs))

    def last(self, name):
        found = [c for c in self.calls if c[0] == name]
        assert found, f"{name} was not called"
        return found[-1]


def _module(name, **attrs):
    mod = types.ModuleType(name)
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None)  # find_spec sees it
    mod.__path__ = []  # a package, so submodules import
    for k, v in attrs.items():
        setattr(mod, k, v)
    return mod


def install_fake_peers(monkeypatch) -> Recorder:
    rec = Recorder()

    def liger_cross_entropy(input, target, weight=None, size_average=None, ignore_index=-100,
                            reduce=None, reduction="mean", label_smoothing=0.0,
                            lse_square_scale=0.0, softcap=None, return_z_loss=False):
        rec("liger_cross_entropy", input, target, weight=weight, ignore_index=ignore_index,
            reduction=reduction, label_smoothing=label_smoothing,
            lse_square_scale=lse_square_scale)
        return _liger_ce_rows(input, target, weight, ignore_index, label_smoothing,
                              lse_square_scale, reduction).to(input.dtype)

    def liger_fused_linear_cross_entropy(input, weight, target, bias=None, ce_weight=None,
                                         ignore_index=-100, lse_square_scale=0.0,
                                         label_smoothing=0.0, reduction="mean", softcap=None,
                                         return_z_loss=False, accum_dtype=None):
        rec("liger_fused_linear_cross_entropy", input, weight, target, bias=bias,
            ignore_index=ignore_index, lse_square_scale=lse_square_scale,
            label_smoothing=label_smoothing, reduction=reduction, softcap=softcap)
        logits = input @ weight.t() + (bias if bias is not None else 0)
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        return _liger_ce_rows(logits, target, ce_weight, ignore_index, label_smoothing,
                              lse_square_scale, reduction).to(torch.float32)

    def liger_jsd(input, target, shift_labels=None, beta=0.5, ignore_index=-100):
        rec("liger_jsd", input, target, beta=beta)
        return (_jsd_rows(input, target, beta).sum() / input.shape[0]).to(input.dtype)

    def liger_kl_div(input, target, size_average=True, reduce=True, reduction="mean",
                     log_target=False, eps=1e-10):
        rec("liger_kl_div", input, target, reduction=reduction, log_target=log_target)
        elem = (target.exp() * (target - input) if log_target
                else target * (torch.log(target.clamp_min(eps)) - input))
        out = {"none": elem, "sum": elem.sum(), "batchmean": elem.sum() / elem.shape[0],
               "mean": elem.mean()}[reduction]
        return out.to(torch.float32)

    def liger_fused_linear_jsd(student_input, student_weight, teacher_input, teacher_weight,
                               shift_labels=None, jsd_beta=0.5, ignore_index=-100,
                               temperature=1.0, accum_dtype=None):
        rec("liger_fused_linear_jsd", student_input, student_weight, teacher_input,
            teacher_weight, jsd_beta=jsd_beta, temperature=temperature)
        logq = torch.log_softmax(_acc(student_input @ student_weight.t()) / temperature, -1)
        logp = torch.log_softmax(_acc(teacher_input @ teacher_weight.t()) / temperature, -1)
        return (_jsd_rows(logq, logp, jsd_beta).sum() / student_input.shape[0]).float()

    class LigerFusedLinearJSDLoss(torch.nn.Module):
        def __init__(self, weight_hard_loss=0.5, weight_soft_loss=0.5, beta=0.5,
                     ignore_index=-100, temperature=1.0, compiled=True, chunk_size=1024,
                     return_soft_hard_loss=False):
            super().__init__()
            rec("LigerFusedLinearJSDLoss", weight_hard_loss=weight_hard_loss,
                weight_soft_loss=weight_soft_loss, beta=beta, temperature=temperature,
                compiled=compiled)
            self.wh, self.ws, self.beta = weight_hard_loss, weight_soft_loss, beta
            self.ignore_index, self.temperature = ignore_index, temperature

        def forward(self, student_input, student_weight, teacher_input, teacher_weight,
                    true_labels, student_bias=None, teacher_bias=None):
            rec("LigerFusedLinearJSDLoss.forward", student_input, student_weight,
                teacher_input, teacher_weight, true_labels)
            s = _acc(student_input @ student_weight.t())
            t = _acc(teacher_input @ teacher_weight.t())
            keep = true_labels != self.ignore_index
            valid = keep.sum().clamp_min(1)
            hard = F.cross_entropy(s, true_labels, ignore_index=self.ignore_index,
                                   reduction="sum") / valid
            rows = _jsd_rows(torch.log_softmax(s / self.temperature, -1),
                             torch.log_softmax(t / self.temperature, -1), self.beta)
            soft = (rows * keep).sum() / valid
            return (self.wh * hard + self.ws * soft).float()

    class LigerFusedLinearDPOFunction:
        @staticmethod
        def preference_loss_fn(chosen_logps, rejected_logps, full_target,
                               ref_chosen_logps=None, ref_rejected_logps=None, beta=0.1,
                               loss_type="sigmoid", label_smoothing=0.0, discopop_tau=0.05):
            rec("preference_loss_fn", chosen_logps, rejected_logps, full_target,
                ref_chosen_logps, ref_rejected_logps, beta=beta, loss_type=loss_type)
            n_pairs = full_target.shape[0] // 2
            d = beta * ((chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps))
            if loss_type == "sigmoid":
                loss = -F.logsigmoid(d).sum() / n_pairs
            elif loss_type == "hinge":
                loss = torch.relu(1 - d).sum() / n_pairs
            else:
                raise NotImplementedError(loss_type)
            return loss, beta * chosen_logps, beta * rejected_logps

    def linear_cross_entropy(e, c, targets, ignore_index=-100, softcap=None, reduction="mean",
                             shift=False, filter_eps="high", impl="cce"):
        rec("linear_cross_entropy", e, c, targets, ignore_index=ignore_index, softcap=softcap,
            reduction=reduction, shift=shift, filter_eps=filter_eps)
        assert e.shape[:-1] == targets.shape and e.shape[-1] == c.shape[1]
        if reduction == "mean" and not bool((targets != ignore_index).any()):
            raise ZeroDivisionError("CCE's mean backward divides by the kept rows")
        logits = e @ c.T
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        return F.cross_entropy(_acc(logits), targets, ignore_index=ignore_index,
                               reduction=reduction).float()

    functional = _module("liger_kernel.transformers.functional",
                         liger_cross_entropy=liger_cross_entropy,
                         liger_fused_linear_cross_entropy=liger_fused_linear_cross_entropy,
                         liger_jsd=liger_jsd, liger_kl_div=liger_kl_div,
                         liger_fused_linear_jsd=liger_fused_linear_jsd)
    dpo_loss = _module("liger_kernel.chunked_loss.dpo_loss",
                       LigerFusedLinearDPOFunction=LigerFusedLinearDPOFunction)
    chunked = _module("liger_kernel.chunked_loss",
                      LigerFusedLinearJSDLoss=LigerFusedLinearJSDLoss, dpo_loss=dpo_loss)
    transformers = _module("liger_kernel.transformers", functional=functional)
    fakes = [_module("liger_kernel", transformers=transformers, chunked_loss=chunked),
             transformers, functional, chunked, dpo_loss,
             _module("cut_cross_entropy", linear_cross_entropy=linear_cross_entropy)]
    for mod in fakes:
        monkeypatch.setitem(sys.modules, mod.__name__, mod)
    return rec


def hide_peers(monkeypatch):
    """The normal case, whatever this machine has installed: the peers do not import."""
    for name in list(sys.modules):
        if name.split(".")[0] in PEER_MODULES:
            monkeypatch.delitem(sys.modules, name)
    for name in PEER_MODULES:
        monkeypatch.setitem(sys.modules, name, None)


@pytest.fixture
def fake(monkeypatch):
    hide_peers(monkeypatch)
    return install_fake_peers(monkeypatch)


# ------------------------------------------------------------------ registration
def test_plugin_loads_and_registers_baselines():
    reg = default_registry()
    info = reg.plugins["peers"]
    assert info.status == "loaded", info.error
    assert not info.warnings
    assert info.value == "lossreg_plugins.peers"
    assert sorted(info.implementations) == sorted(f"{loss}:{i}" for loss, i in PEER_IMPLS)
    for (loss, name), module in PEER_IMPLS.items():
        impl = reg.get(loss).implementations[name]
        assert impl.kind == "baseline" and impl.plugin == "peers"
        assert impl.backend == BACKEND[module] and module in impl.requires
    assert reg.get("fused_linear_cross_entropy").implementations["cce"].devices == ("cuda",)


def test_plugins_command_lists_peers():
    from click.testing import CliRunner

    from lossreg.cli import main

    res = CliRunner().invoke(main, ["plugins", "--json"])
    assert res.exit_code == 0, res.output
    import json

    rows = {p["name"]: p for p in json.loads(res.output)}
    assert rows["peers"]["status"] == "loaded"
    assert "cross_entropy:liger" in rows["peers"]["implementations"]


@pytest.mark.parametrize("only, expected", [
    ("peers", []),
    ("peers,rl", ["dpo:liger"]),
])
def test_registers_only_where_the_loss_exists(monkeypatch, capsys, only, expected):
    monkeypatch.setenv("LOSSREG_LOAD_PLUGINS", only)
    reg = Registry().load_entry_points()
    info = reg.plugins["peers"]
    assert info.status == "loaded" and not info.warnings
    assert info.implementations == expected
    assert "unknown loss" not in capsys.readouterr().err


def test_losses_argument_is_honoured():
    """Only losses present in the load get an adapter; an absent one (an rl loss not yet
    registered, say) is skipped without a word."""
    seen = []

    def register(loss, impl):
        seen.append(loss)

    peers.register_implementations(register, {"dpo", "jsd", "no_such_loss"})
    assert seen == ["jsd", "dpo"]


def test_missing_library_makes_impls_unavailable(monkeypatch):
    hide_peers(monkeypatch)
    reg = default_registry()
    for (loss, name), module in PEER_IMPLS.items():
        impl = reg.get(loss).implementations[name]
        assert impl.missing_requirements() == [module]
        assert impl.supports("cpu", "float32") == f"requires {module} (not installed)"


def test_planner_skips_peers_when_absent(monkeypatch):
    """What the harness records for a peer whose library is absent: skipped, with the
    module named (the check runs in worker processes, so it is asked here directly)."""
    hide_peers(monkeypatch)
    reg = default_registry()
    for (loss, name), module in PEER_IMPLS.items():
        impl = reg.get(loss).implementations[name]
        assert runnable(impl, "cpu", "float32") == f"requires {module} (not installed)"


# ------------------------------------------------------------------ adapters in process
def _unsupported_only(df):
    """The rows the peer refused: skipped with the reason; nothing failed or errored."""
    bad = df[df["status"].isin(["fail", "error"])]
    assert bad.empty, bad[["impl", "params", "message"]].to_string()
    return df[(df["status"] == "skipped") & df["message"].str.contains("cannot express",
                                                                        na=False)]


def _check_in_process(loss, impl_name, dtype=torch.float32, edge_cases=True, inputs_of=None):
    """Every option set of the loss (and its edge cases under the default options) at
    the quick size, through the adapter, against the float64 reference: forward and
    gradients at the dtype's tolerance. Returns the messages of the refused option
    sets (UnsupportedOption); any other error or a mismatch fails the test.
    ``inputs_of`` maps each case's inputs to the ones checked."""
    spec = lossreg.get(loss)
    impl = spec.implementations[impl_name]
    rtol, atol = spec.tolerance(str(dtype).removeprefix("torch."))
    refused, checked = [], 0
    base = dict(spec.options)
    for oi, opts in enumerate([base] + [{**base, **o} for o in spec.check_options]):
        params = spec.case_params("quick", opts)
        cases = [spec.make_inputs(Case(n=spec.sizes["quick"][0], dtype=dtype, seed=oi,
                                       params=params))]
        if edge_cases and oi == 0:
            cases += [make(Case(n=spec.sizes["quick"][0], dtype=dtype, seed=7, params=params))
                      for name, make in spec.edge_cases.items() if "multi_block" not in name
                      and "split" not in name]
        for inputs in cases:
            inputs = inputs_of(inputs) if inputs_of else inputs
            names = spec.grad_names(inputs)
            leaves = {k: v.detach().clone().requires_grad_(True) if k in names else v
                      for k, v in inputs.items()}
            l64 = {k: v.detach().double().requires_grad_(True) if k in names else v
                   for k, v in to64(inputs).items()}
            try:
                out = impl.fn(**leaves, **opts)
            except lossreg.UnsupportedOption as exc:
                refused.append(str(exc))
                continue
            ref = spec.reference(**l64, **opts)
            v = compare_tensors(out, ref, rtol, atol)
            assert v.ok, f"{loss}/{impl_name} {opts}: {v.message}"
            checked += 1
            if not names or not torch.isfinite(ref).all():
                continue
            cot = torch.rand(ref.shape, dtype=torch.float64) + 0.5
            grads = torch.autograd.grad(out, [leaves[k] for k in names], cot.to(out.dtype),
                                        allow_unused=True)
            grads64 = torch.autograd.grad(ref, [l64[k] for k in names], cot,
                                          allow_unused=True)
            for k, g, g64 in zip(names, grads, grads64):
                g64 = torch.zeros_like(l64[k]) if g64 is None else g64
                g = torch.zeros_like(leaves[k]) if g is None else g
                v = compare_tensors(g, g64, rtol, atol, what=f"grad of {k}")
                assert v.ok, f"{loss}/{impl_name} {opts}: {v.message}"
    assert checked >= 2, f"{loss}/{impl_name}: only {checked} cases ran ({refused})"
    return refused


@pytest.mark.parametrize("loss, impl, unsupported", [
    ("cross_entropy", "liger", {"weight on CPU"}),
    ("fused_linear_cross_entropy", "liger", {"softcap on CPU"}),
    ("kl_distillation", "liger", {"reduction='none'"}),
    ("fused_linear_distillation", "liger", {"reduction='none'"}),
    ("fused_linear_distillation", "liger_chunked", {"reduction='none'"}),
    ("dpo", "liger", {"reduction='none'", "loss_type='ipo'", "label_smoothing"}),
])
def test_adapter_through_fake_peer(fake, loss, impl, unsupported):
    """Every option set and edge case of the loss, through the adapter and the fake
    peer: all pass against the float64 reference but the declared unsupported ones."""
    refused = _check_in_process(loss, impl)
    assert {u for u in unsupported for m in refused if u in m} == unsupported
    assert fake.calls  # the fake peer did the computing


def _ce_inputs(n=7, v=11, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, v, generator=g, dtype=dtype) * 2
    y = torch.randint(0, v, (n,), generator=g)
    y[1] = -100
    return x, y


def test_ce_maps_options_and_reductions(fake):
    from lossreg_plugins.neural_networks import ce_reference

    x, y = _ce_inputs()
    for opts in ({"label_smoothing": 0.2, "z_loss": 1e-2, "reduction": "none"},
                 {"reduction": "sum"}, {"z_loss": 0.1}):
        out = peers.ce_liger(x, y.int(), **opts)
        torch.testing.assert_close(out, ce_reference(x, y, **opts))
        _, (inp, tgt), kw = fake.last("liger_cross_entropy")
        assert inp is x and tgt.dtype == torch.int64
        assert kw["lse_square_scale"] == opts.get("z_loss", 0.0)
        assert kw["label_smoothing"] == opts.get("label_smoothing", 0.0)
        assert kw["reduction"] == opts.get("reduction", "mean")


def test_ce_empty_mean_is_nan_with_zero_grad(fake):
    x, y = _ce_inputs()
    x.requires_grad_(True)
    out = peers.ce_liger(x, torch.full_like(y, -100))
    assert math.isnan(out.item())  # the fake, like Liger, says 0
    (g,) = torch.autograd.grad(out, x)
    assert torch.equal(g, torch.zeros_like(x))


def test_ce_weight_with_z_loss_mean_is_refused(fake):
    x, y = _ce_inputs()
    with pytest.raises(ValueError, match="z_loss with weight"):
        peers.ce_liger(x, y, weight=torch.ones(11, dtype=x.dtype), z_loss=0.1)


def _flce_inputs(n=9, h=5, v=13, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=dtype)
    weight = torch.randn(v, h, generator=g, dtype=dtype) * 0.5
    target = torch.randint(0, v, (n,), generator=g)
    target[2] = -100
    return hidden, weight, target


def test_flce_liger_passes_layout_and_casts_back(fake, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # softcap is refused under the interpreter
    from lossreg_plugins.transformers.linear_ce import flce_reference

    hidden, weight, target = _flce_inputs(dtype=torch.float64)
    bias = torch.randn(13, dtype=torch.float64)
    opts = {"softcap": 3.0, "z_loss": 1e-3, "label_smoothing": 0.1, "reduction": "sum"}
    out = peers.flce_liger(hidden, weight, target, bias=bias, **opts)
    _, (h_, w_, t_), kw = fake.last("liger_fused_linear_cross_entropy")
    assert h_ is hidden and w_ is weight and t_ is target and kw["bias"] is bias
    assert kw["softcap"] == 3.0 and kw["lse_square_scale"] == 1e-3
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, flce_reference(hidden, weight, target, bias=bias, **opts)
                               .float().double(), rtol=1e-6, atol=1e-6)
    low = peers.flce_liger(*(t.bfloat16() if t.is_floating_point() else t
                             for t in _flce_inputs()))
    assert low.dtype == torch.bfloat16


def test_cce_gets_classifier_as_v_by_h_and_exact_gradients(fake):
    from lossreg_plugins.transformers.linear_ce import flce_reference

    hidden, weight, target = _flce_inputs()
    for reduction in ("mean", "sum", "none"):
        out = peers.flce_cce(hidden, weight, target, softcap=4.0, reduction=reduction)
        _, (e, c, t), kw = fake.last("linear_cross_entropy")
        assert e is hidden and c is weight and c.shape == (13, 5) and t is target
        assert kw["shift"] is False and kw["filter_eps"] is None and kw["softcap"] == 4.0
        assert kw["reduction"] == reduction and kw["ignore_index"] == -100
        ref = flce_reference(hidden.double(), weight.double(), target, softcap=4.0,
                             reduction=reduction)
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)


def test_cce_refuses_what_it_cannot_express_and_guards_empty_mean(fake):
    hidden, weight, target = _flce_inputs()
    for kwargs, word in (({"bias": torch.zeros(13)}, "bias"),
                         ({"label_smoothing": 0.1}, "label_smoothing"),
                         ({"z_loss": 1e-3}, "z_loss")):
        with pytest.raises(ValueError, match=word):
            peers.flce_cce(hidden, weight, target, **kwargs)
    n_calls = len(fake.calls)
    h = hidden.clone().requires_grad_(True)
    out = peers.flce_cce(h, weight, torch.full_like(target, -100))
    assert math.isnan(out.item()) and len(fake.calls) == n_calls
    (g,) = torch.autograd.grad(out, h)
    assert torch.equal(g, torch.zeros_like(h))


@pytest.mark.parametrize("direction, beta, liger_beta", [
    ("forward", 0.5, 0.0), ("reverse", 0.5, 1.0), ("jsd", 0.3, 0.3)])
def test_kl_direction_and_temperature_mapping(fake, direction, beta, liger_beta):
    from lossreg_plugins.transformers.distill import kl_reference

    s, _ = _ce_inputs(seed=3)
    t, _ = _ce_inputs(seed=4)
    for reduction in ("mean", "sum"):
        out = peers.kl_liger(s, t, temperature=2.0, direction=direction, beta=beta,
                             reduction=reduction)
        _, (logq, logp), kw = fake.last("liger_jsd")
        assert kw["beta"] == liger_beta
        torch.testing.assert_close(logq, torch.log_softmax(s / 2.0, -1))
        torch.testing.assert_close(logp, torch.log_softmax(t / 2.0, -1))
        torch.testing.assert_close(out, kl_reference(s, t, 2.0, direction, beta, reduction))
    with pytest.raises(ValueError, match="reduction='none'"):
        peers.kl_liger(s, t, direction=direction, beta=beta, reduction="none")


def test_kl_div_reduction_mapping(fake):
    from lossreg_plugins.transformers.distill import kl_reference

    s, _ = _ce_inputs(seed=5)
    t, _ = _ce_inputs(seed=6)
    for ours, theirs in (("mean", "batchmean"), ("sum", "sum"), ("none", "none")):
        out = peers.kl_liger_kl_div(s, t, temperature=1.5, reduction=ours)
        assert fake.last("liger_kl_div")[2] == {"reduction": theirs, "log_target": True}
        torch.testing.assert_close(out, kl_reference(s, t, 1.5, "forward", 0.5, ours),
                                   rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="direction='reverse'"):
        peers.kl_liger_kl_div(s, t, direction="reverse")


def test_fused_linear_distillation_mappings(fake):
    from lossreg_plugins.transformers.distill import fld_reference

    g = torch.Generator().manual_seed(7)
    hs, ws, ht, wt = (torch.randn(*shape, generator=g, dtype=torch.float64)
                      for shape in ((6, 4), (9, 4), (6, 3), (9, 3)))
    ref = fld_reference(hs, ws, ht, wt, 2.0, "reverse", 0.5, "sum")
    out = peers.fld_liger(hs, ws, ht, wt, temperature=2.0, direction="reverse", reduction="sum")
    _, args, kw = fake.last("liger_fused_linear_jsd")
    assert args[0] is hs and args[1] is ws and kw == {"jsd_beta": 1.0, "temperature": 2.0}
    torch.testing.assert_close(out, ref.float().double(), rtol=1e-6, atol=1e-6)

    out = peers.fld_liger_chunked(hs, ws, ht, wt, temperature=2.0, direction="reverse",
                                  reduction="sum")
    kw = fake.last("LigerFusedLinearJSDLoss")[2]
    assert kw == {"weight_hard_loss": 0.0, "weight_soft_loss": 1.0, "beta": 1.0,
                  "temperature": 2.0, "compiled": False}
    labels = fake.last("LigerFusedLinearJSDLoss.forward")[1][4]
    assert labels.shape == (6,) and (labels != -100).all()
    torch.testing.assert_close(out, ref.float().double(), rtol=1e-6, atol=1e-6)


def test_dpo_divisor_and_loss_type(fake):
    from lossreg_plugins.rl import dpo_reference

    g = torch.Generator().manual_seed(8)
    pc, pr, rc, rr = (-50 * torch.rand(5, generator=g, dtype=torch.float64) for _ in range(4))
    for loss_type in ("sigmoid", "hinge"):
        for reduction, pairs in (("mean", 5), ("sum", 1)):
            out = peers.dpo_liger(pc, pr, rc, rr, beta=0.2, loss_type=loss_type,
                                  reduction=reduction)
            _, args, kw = fake.last("preference_loss_fn")
            assert args[2].shape == (2 * pairs,) and kw == {"beta": 0.2, "loss_type": loss_type}
            torch.testing.assert_close(out, dpo_reference(pc, pr, rc, rr, 0.2, 0.0, loss_type,
                                                          reduction))
    for kwargs, word in (({"loss_type": "ipo"}, "ipo"), ({"label_smoothing": 0.1},
                         "label_smoothing"), ({"reduction": "none"}, "none")):
        with pytest.raises(ValueError, match=word):
            peers.dpo_liger(pc, pr, rc, rr, **kwargs)


# ------------------------------------------------------------------ gpu-check
def test_gpu_check_includes_the_peer_impls(monkeypatch):
    """`make gpu-check` runs every registered implementation but torch.compile: the
    peers' too (skipped rows when their wheels were not carried)."""
    from lossreg import api, gpu_check

    seen = {}

    class Stop(Exception):
        pass

    def fake_execute(names, **kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(api, "bench", fake_execute)
    with pytest.raises(Stop):
        gpu_check.main(["--out", "unused"])
    impls = {t.impl.name for t in seen["plan"].tasks}
    assert {"liger", "liger_kl_div", "liger_chunked"} <= impls
    assert "compile" not in impls


# ------------------------------------------------------------------ the real library
#: (loss, impl) -> what the real peer refuses on CPU (UnsupportedOption messages).
REAL_REFUSALS = {
    ("cross_entropy", "liger"): {"weight on CPU", "softcap on CPU"},
    ("fused_linear_cross_entropy", "liger"): {"softcap on CPU"},
    ("kl_distillation", "liger"): {"reduction='none'"},
    ("fused_linear_distillation", "liger"): {"reduction='none'"},
    ("fused_linear_distillation", "liger_chunked"): {"reduction='none'"},
    ("dpo", "liger"): {"reduction='none'", "loss_type='ipo'", "label_smoothing"},
    ("jsd", "liger"): {"reduction='none'"},
    ("orpo", "liger"): {"reduction='none'"},
    ("cpo", "liger"): {"reduction='none'"},
    ("simpo", "liger"): {"reduction='none'"},
    ("kto", "liger"): {"reduction='none'", "desirable_weight"},
    ("fused_linear_dpo", "liger"): {"reduction='none'", "loss_type='ipo'", "label_smoothing"},
    ("fused_linear_orpo", "liger"): {"reduction='none'"},
    ("fused_linear_cpo", "liger"): {"reduction='none'"},
    ("fused_linear_simpo", "liger"): {"reduction='none'"},
    ("fused_linear_kto", "liger"): {"reduction='none'", "desirable_weight"},
    ("fused_linear_grpo", "liger"): {"reduction='none'"},
    ("grpo", "liger"): {"reduction='none'"},
}


def _equal_lengths(inputs):
    """Every sequence with the first one's prompt and padding (ignore_index) positions."""
    t = inputs["target"]
    keep = (t[:1] != -100).expand_as(t)
    return {**inputs, "target": torch.where(keep, t.clamp(min=0), -100)}


#: Inputs a peer is checked on where it computes our function only on some: Liger's ORPO
#: NLL is a token mean over the batch, ours a mean of per-response means.
REAL_INPUTS = {("fused_linear_orpo", "liger"): _equal_lengths}
#: Run only on a GPU: the peer's kernel fails under Triton's interpreter (or is compiled).
GPU_ONLY = {("kl_distillation", "liger_kl_div"), ("tvd", "liger"),
            ("fused_linear_cross_entropy", "cce")}
DEEP = os.environ.get("LOSSREG_DEEP_TESTS") == "1"


def _registered():
    return {spec.name for spec in lossreg.losses()}


def test_every_peer_impl_is_checked_somewhere():
    assert set(REAL_REFUSALS) | GPU_ONLY >= set(PEER_IMPLS)


def test_cce_cpu_path_is_opt_in(monkeypatch):
    """CCE's torch.compile path runs on a CPU but compiles for minutes: registered only
    with LOSSREG_CCE_CPU=1, and then checked at quick sizes under LOSSREG_DEEP_TESTS=1."""
    names = {(loss, impl.name) for loss, impl in peers._impls()}
    assert ("fused_linear_cross_entropy", "cce_compile") not in names
    monkeypatch.setenv("LOSSREG_CCE_CPU", "1")
    impls = {(loss, impl.name): impl for loss, impl in peers._impls()}
    impl = impls[("fused_linear_cross_entropy", "cce_compile")]
    assert "cpu" in impl.devices and impl.requires == ("cut_cross_entropy",)
    if not DEEP:
        return
    pytest.importorskip("cut_cross_entropy")
    spec = lossreg.get("fused_linear_cross_entropy")
    spec.implementations["cce_compile"] = impl
    try:
        refused = _check_in_process("fused_linear_cross_entropy", "cce_compile",
                                    edge_cases=False)
    finally:
        del spec.implementations["cce_compile"]
    assert all("cce_compile cannot express" in m for m in refused)


@pytest.mark.parametrize("loss, impl", sorted(REAL_REFUSALS))
def test_real_peer_matches_the_reference(loss, impl):
    """The installed library (a dev dependency) through its adapter on CPU, Triton under
    the interpreter: every option set passes at float32 but the refused ones."""
    pytest.importorskip(PEER_IMPLS[(loss, impl)])
    if loss not in _registered():
        pytest.skip(f"{loss} is not registered in this build")
    refused = _check_in_process(loss, impl, edge_cases=DEEP,
                                inputs_of=REAL_INPUTS.get((loss, impl)))
    expected = REAL_REFUSALS[(loss, impl)]
    assert {u for u in expected for m in refused if u in m} <= expected
    assert all(any(u in m for u in expected) for m in refused), refused


def _fused_inputs(loss, seed=3, dtype=torch.float64):
    spec = lossreg.get(loss)
    return spec.make_inputs(Case(n=3, dtype=dtype, seed=seed,
                                 params=spec.case_params("quick", dict(spec.options))))


def test_orpo_peer_refuses_unequal_lengths_before_calling_liger(monkeypatch):
    """Refused from the targets alone: no Liger import needed (hidden here)."""
    from lossreg_plugins import _peers_chunked as pc

    hide_peers(monkeypatch)
    inputs = _fused_inputs("fused_linear_orpo")
    chosen = (inputs["target"][:3] != -100).sum(-1)
    assert len(set(chosen.tolist())) > 1
    with pytest.raises(lossreg.UnsupportedOption, match="different lengths"):
        pc.orpo_liger(**inputs)


@pytest.mark.parametrize("loss, cls, kwargs", [
    ("fused_linear_cpo", "LigerFusedLinearCPOLoss", {"beta": 0.1, "alpha": 1.0}),
    ("fused_linear_orpo", "LigerFusedLinearORPOLoss", {"beta": 0.1}),
])
def test_liger_nll_convention_differs_from_ours(loss, cls, kwargs):
    """Why the adapters rescale (CPO) or refuse (ORPO): Liger's NLL term as it comes
    (alpha x the chosen tokens' mean NLL over the batch) is not our loss on sequences of
    different lengths; the CPO adapter's alpha' = alpha x tokens / pairs is."""
    pytest.importorskip("liger_kernel")
    from liger_kernel import chunked_loss
    from lossreg_plugins import _peers_chunked as pc

    inputs = _fused_inputs(loss)
    ref = lossreg.get(loss).reference(**inputs)
    raw = getattr(chunked_loss, cls)(compiled=False, **kwargs)(
        inputs["weight"], inputs["hidden"], inputs["target"])[0]
    assert not torch.allclose(raw.double(), ref, rtol=1e-3)
    if loss == "fused_linear_cpo":
        torch.testing.assert_close(pc.cpo_liger(**inputs, **kwargs), ref, rtol=1e-5, atol=1e-6)


def test_liger_triton_kernels_run_whatever_the_import_order():
    """The former open failure: a test importing liger_kernel (hence Triton) before
    lossreg's kernels package set TRITON_INTERPRET=1 left triton.language's own @jit
    helpers (tl.max...) compiled, and Liger's interpreted CE kernel stopped at its
    first tl.max: "Cannot call @triton.jit'd outside of the scope of a kernel". The
    peers plugin now sets the interpreter up on import, before any peer imports Triton."""
    pytest.importorskip("liger_kernel")
    if torch.cuda.is_available():
        pytest.skip("the interpreter is for machines without a GPU")
    import subprocess

    code = ("from lossreg_plugins import peers\n"
            "import liger_kernel.transformers.functional, torch\n"
            "x = torch.randn(5, 7, requires_grad=True)\n"
            "peers.ce_liger(x, torch.arange(5)).backward()\n"
            "print('ok', x.grad.isfinite().all().item())\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0 and "ok True" in res.stdout, res.stderr[-2000:]


@pytest.mark.skipif(not DEEP, reason="the harness run of a peer: LOSSREG_DEEP_TESTS=1")
@pytest.mark.parametrize("loss, impl", sorted(REAL_REFUSALS))
def test_real_peer_passes_the_harness_check(loss, impl):
    pytest.importorskip(PEER_IMPLS[(loss, impl)])
    df, _ = execute([loss], device="cpu", impls=[impl], sizes="quick")
    # a peer checked on some inputs only (REAL_INPUTS) refuses most of the harness's
    assert (df["status"] == "ok").sum() >= (1 if (loss, impl) in REAL_INPUTS else 4)
    _unsupported_only(df)


def test_real_liger_passes_the_harness_check():
    """One cheap loss through the whole harness (worker processes, rows): ok rows, and
    the refused option sets recorded as skipped with the reason."""
    pytest.importorskip("liger_kernel")
    df, _ = execute(["simpo" if "simpo" in _registered() else "dpo"], device="cpu",
                    impls=["liger"], sizes="quick", dtypes=["float32"])
    assert (df["status"] == "ok").sum() >= 4
    assert not _unsupported_only(df).empty


def test_real_cce_passes_the_harness_check():
    pytest.importorskip("cut_cross_entropy")
    if not torch.cuda.is_available():
        pytest.skip("cut-cross-entropy's kernels need a GPU (not Triton's interpreter)")
    df, _ = execute(["fused_linear_cross_entropy"], device="cuda", impls=["cce"],
                    dtypes=["float32", "bfloat16"], sizes="quick")
    assert (df["status"] == "ok").sum() >= 4
    _unsupported_only(df)
