"""Fused-linear preference losses (``rl`` family): DPO, ORPO, CPO, SimPO and KTO from the
policy's hidden states and lm-head weight (and, for DPO and KTO, the frozen reference
model's), without the batch x sequence x vocabulary logits.

Each loss is one :class:`~lossreg_plugins._fused_linear.Head` whose per-unit loss is
the sequence-level reference of that loss applied to the per-sequence summed
log-probs (DPO, CPO, KTO: sequence log-probs, as the papers write them) or to their
per-token averages (ORPO, SimPO: length-normalized). The template gives each a
``reference`` (all logits, log_softmax), an ``eager`` baseline (all logits,
F.cross_entropy per token) and the ``chunked`` implementation (gradients in the
forward, one chunk of logits at a time).

Inputs: ``hidden`` (2B, T, H) with the B chosen sequences first and the B rejected ones
after them (KTO: (N, T, H), unpaired), ``weight`` (V, H), ``target`` (2B, T) token ids
where ``target[i, t]`` is the token predicted from ``hidden[i, t]`` (already shifted),
``ignore_index`` on prompt and padding positions.
"""

from __future__ import annotations

import inspect

import torch

from lossreg import Impl, LossSpec, hookimpl
from lossreg.validate import check_mask, check_tensor

from . import _fused_linear as fl
from .preference import cpo_reference, orpo_reference, simpo_reference
from .preference_kto import kto_reference
from .rl import dpo_reference


def _sums(lp, keep):
    return lp.sum(-1), keep.sum(-1).to(lp.dtype)


def _dpo_unit(lp, ref_lp, keep, aux, o):
    s, _ = _sums(lp, keep)
    r = ref_lp.sum(-1)
    return dpo_reference(s[0], s[1], r[0], r[1], beta=o["beta"],
                         label_smoothing=o["label_smoothing"], loss_type=o["loss_type"],
                         reduction="none")


def _orpo_unit(lp, ref_lp, keep, aux, o):
    s, c = _sums(lp, keep)
    return orpo_reference(s[0] / c[0], s[1] / c[1], beta=o["beta"], reduction="none")


def _cpo_unit(lp, ref_lp, keep, aux, o):
    s, _ = _sums(lp, keep)
    return cpo_reference(s[0], s[1], beta=o["beta"], alpha=o["alpha"], reduction="none")


def _simpo_unit(lp, ref_lp, keep, aux, o):
    s, c = _sums(lp, keep)
    return simpo_reference(s[0] / c[0], s[1] / c[1], beta=o["beta"], gamma=o["gamma"],
                           reduction="none")


def _kto_unit(lp, ref_lp, keep, aux, o):
    s, r = lp.sum(-1)[0], ref_lp.sum(-1)[0]
    kl = aux.get("kl")
    pkl = rkl = None
    if kl is not None:  # z0 = max(0, kl): the KL estimate against a zero reference
        pkl = kl.detach().to(s.dtype).reshape(1)
        rkl = torch.zeros_like(pkl)
    return kto_reference(s, r.to(s.dtype), aux["desirable"], pkl, rkl, beta=o["beta"],
                         desirable_weight=o["desirable_weight"],
                         undesirable_weight=o["undesirable_weight"], reduction="none")


def _units_divisor(keep, aux, opts):
    return keep.shape[1]


HEADS = {
    "fused_linear_dpo": (fl.Head("fused_linear_dpo", 2, _dpo_unit, _units_divisor, True),
                         {"beta": 0.1, "label_smoothing": 0.0, "loss_type": "sigmoid"}),
    "fused_linear_orpo": (fl.Head("fused_linear_orpo", 2, _orpo_unit, _units_divisor),
                          {"beta": 0.1}),
    "fused_linear_cpo": (fl.Head("fused_linear_cpo", 2, _cpo_unit, _units_divisor),
                         {"beta": 0.1, "alpha": 1.0}),
    "fused_linear_simpo": (fl.Head("fused_linear_simpo", 2, _simpo_unit, _units_divisor),
                           {"beta": 2.0, "gamma": 0.5}),
    "fused_linear_kto": (fl.Head("fused_linear_kto", 1, _kto_unit, _units_divisor, True),
                         {"beta": 0.1, "desirable_weight": 1.0, "undesirable_weight": 1.0}),
}


def _check_kto_aux(name, hidden, desirable, kl):
    check_tensor(name, desirable=desirable)
    if desirable.device != hidden.device:
        raise ValueError(f"{name}: desirable must be on hidden's device {hidden.device}, got "
                         f"{desirable.device}")
    check_mask(name, "desirable", desirable, hidden.shape[:1], "1 for a desirable sequence")
    if kl is not None:
        if not torch.is_tensor(kl) or not kl.is_floating_point() or kl.dim() != 0:
            raise TypeError(f"{name}: kl must be a 0-dim floating-point tensor (the KL "
                            f"estimate), got {getattr(kl, 'shape', type(kl).__name__)}")
        if kl.device != hidden.device:
            raise ValueError(f"{name}: kl must be on hidden's device {hidden.device}, got "
                             f"{kl.device}")


def make_impls(name, head, defaults, aux_names=()):
    """(reference, eager, chunked) with the loss's keyword signature."""

    def prepare(args):
        hidden, weight, target = args["hidden"], args["weight"], args["target"]
        ref_h, ref_w = args.get("ref_hidden"), args.get("ref_weight")
        aux = {k: args.get(k) for k in aux_names}
        fl.validate(head, hidden, weight, target, ref_h, ref_w, args["ignore_index"],
                    args["reduction"], **aux)
        if name == "fused_linear_kto":
            _check_kto_aux(name, hidden, aux["desirable"], aux["kl"])
        opts = {k: args[k] for k in defaults}
        # the per-unit loss validates the options: run it once on no units
        empty = hidden.new_zeros(head.groups, 0, target.shape[1], dtype=fl.acc_dtype(
            hidden.dtype))
        empty_aux = {k: (v[:0] if torch.is_tensor(v) and v.dim() else v)
                     for k, v in aux.items()}
        head.unit_loss(empty, empty if head.uses_reference_model else None,
                       empty.bool(), empty_aux, opts)
        return hidden, weight, target, ref_h, ref_w, aux, opts

    def reference(**args):
        h, w, t, rh, rw, aux, opts = prepare(args)
        return fl.materialized(head, fl.token_logps_reference, h, w, t, rh, rw, aux, opts,
                               args["ignore_index"], args["reduction"])

    def eager(**args):
        h, w, t, rh, rw, aux, opts = prepare(args)
        return fl.materialized(head, fl.token_logps_eager, h, w, t, rh, rw, aux, opts,
                               args["ignore_index"], args["reduction"])

    def chunked(**args):
        h, w, t, rh, rw, aux, opts = prepare(args)
        return fl.chunked(head, h, w, t, rh, rw, aux, opts, args["ignore_index"],
                          args["reduction"])

    params = [inspect.Parameter(k, inspect.Parameter.POSITIONAL_OR_KEYWORD)
              for k in ("hidden", "weight", "target")]
    if head.uses_reference_model:
        params += [inspect.Parameter(k, inspect.Parameter.POSITIONAL_OR_KEYWORD)
                   for k in ("ref_hidden", "ref_weight")]
    params += [inspect.Parameter(k, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                 default=None if k == "kl" else inspect.Parameter.empty)
               for k in aux_names]
    params += [inspect.Parameter(k, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=v)
               for k, v in {**defaults, "ignore_index": -100, "reduction": "mean"}.items()]
    sig = inspect.Signature(params)

    def wrap(fn, what):
        def impl(*args, **kwargs):
            bound = sig.bind(*args, **kwargs)
            bound.apply_defaults()
            return fn(**bound.arguments)

        impl.__name__ = f"{name}_{what}"
        impl.__signature__ = sig
        return impl

    return wrap(reference, "reference"), wrap(eager, "eager"), wrap(chunked, "chunked")


# ---------------------------------------------------------------- inputs
def _inputs(name):
    head, _ = HEADS[name]

    def make(case, n=None):
        n = case.n if n is None else n
        out = fl.token_inputs(case, head.groups * n, head.uses_reference_model)
        if name == "fused_linear_kto":
            out["desirable"] = case.rand(n, dtype=torch.float32) < 0.6
            out["kl"] = (case.rand(1)[0] * 2 - 0.5).to(case.dtype)
        return out

    return make


def _edge_cases(name):
    head, _ = HEADS[name]
    make = _inputs(name)

    def resized(n, **params):
        def edge(case):
            case.params = {**case.params, **params}
            return make(case, n)

        return edge

    def single_token(case):
        inputs = make(case, 1)
        t = inputs["target"]
        keep = torch.zeros_like(t, dtype=torch.bool)
        keep[:, t.shape[1] // 2] = True
        return {**inputs, "target": t.masked_fill(~keep, -100)}

    def far(case):
        """Sharp logits (the weight x 30): log-probs of hundreds of nats, margins far
        past the sigmoids' saturation."""
        inputs = make(case, 3)
        return {**inputs, "weight": inputs["weight"] * 30}

    cases = {"one_unit_one_token": single_token, "large_margins": far,
             "long_sequences": resized(2, seq=70, vocab=37)}
    if head.uses_reference_model:
        def at_reference(case):
            inputs = make(case, 3)
            return {**inputs, "ref_hidden": inputs["hidden"].clone(),
                    "ref_weight": inputs["weight"].clone()}

        cases["policy_equals_reference"] = at_reference
    if name == "fused_linear_kto":
        cases["no_kl"] = lambda case: {k: v for k, v in make(case, 4).items() if k != "kl"}
    return cases


# ---------------------------------------------------------------- registration
TEXT = {
    "fused_linear_dpo": (
        "Fused linear DPO",
        r"s = \sum_t \log\mathrm{softmax}(h_t W^\top)_{y_t};\ \frac{1}{B}\sum_i -\log\sigma"
        r"\left(\beta\left[(s^c_i - s^c_{\mathrm{ref},i}) - (s^r_i - s^r_{\mathrm{ref},i})"
        r"\right]\right)",
        "dpo's loss (sigmoid, ipo, hinge; label_smoothing) on sequence log-probs s formed "
        "from the policy's and the reference model's hidden states and lm heads.",
        "Rafailov et al. (2023), Direct Preference Optimization; Liger-Kernel "
        "(Hsu et al. 2024), chunked preference losses",
        [{"beta": 0.5, "label_smoothing": 0.1}, {"loss_type": "ipo", "reduction": "none"},
         {"loss_type": "hinge", "reduction": "sum"}]),
    "fused_linear_orpo": (
        "Fused linear ORPO",
        r"\bar s = \frac{1}{|y|}\sum_t \log\mathrm{softmax}(h_t W^\top)_{y_t};\ "
        r"\frac{1}{B}\sum_i -\bar s^c_i - \lambda\log\sigma\left(\log\frac{e^{\bar s^c_i}}"
        r"{1-e^{\bar s^c_i}} - \log\frac{e^{\bar s^r_i}}{1-e^{\bar s^r_i}}\right)",
        "orpo's loss on the per-token average log-probs of each sequence (no reference "
        "model).",
        "Hong, Lee & Thorne (2024), ORPO; Liger-Kernel chunked ORPO",
        [{"beta": 1.0, "reduction": "none"}]),
    "fused_linear_cpo": (
        "Fused linear CPO",
        r"s = \sum_t \log\mathrm{softmax}(h_t W^\top)_{y_t};\ \frac{1}{B}\sum_i "
        r"-\log\sigma\left(\beta s^c_i - \beta s^r_i\right) - \alpha s^c_i",
        "cpo's loss on sequence log-probs (sums over each response's tokens); the NLL "
        "term is the chosen sequence's, as the paper writes it.",
        "Xu et al. (2024), Contrastive Preference Optimization; Liger-Kernel chunked CPO",
        [{"beta": 0.5, "alpha": 0.0, "reduction": "none"}]),
    "fused_linear_simpo": (
        "Fused linear SimPO",
        r"\bar s = \frac{1}{|y|}\sum_t \log\mathrm{softmax}(h_t W^\top)_{y_t};\ "
        r"\frac{1}{B}\sum_i -\log\sigma\left(\beta\bar s^c_i - \beta\bar s^r_i - \gamma\right)",
        "simpo's loss on the per-token average log-probs of each sequence.",
        "Meng, Xia & Chen (2024), SimPO; Liger-Kernel chunked SimPO",
        [{"beta": 2.5, "gamma": 1.6, "reduction": "none"}]),
    "fused_linear_kto": (
        "Fused linear KTO",
        r"r_i = s_i - s_{\mathrm{ref},i},\ z_0 = \max(0, \mathrm{KL}),\ \frac{1}{N}\sum_i "
        r"\lambda_i\left(1-\sigma(\pm\beta(r_i - z_0))\right)",
        "kto's loss on sequence log-probs of unpaired sequences (hidden (N, T, H)), a "
        "desirable flag per sequence and kl, a 0-dim tensor: the KL estimate of the "
        "batch (e.g. from mismatched pairs), clamped at 0 and detached (None: z0 = 0).",
        "Ethayarajh et al. (2024), KTO; Liger-Kernel chunked KTO",
        [{"beta": 0.5, "desirable_weight": 1.33, "reduction": "none"}]),
}


def specs():
    for name, (head, defaults) in HEADS.items():
        title, formula, what, citation, extra = TEXT[name]
        reference, _, _ = IMPLS[name]
        domains = {"target": ("index", lambda inputs: inputs["weight"].shape[0], (-100,))}
        if name == "fused_linear_kto":
            domains["desirable"] = ("values", (0, 1))
        yield LossSpec(
            name=name, family="rl", title=title, formula=formula,
            description=(
                f"{what} Chunked over whole units (pairs or sequences), never the full "
                "logits; gradients in the forward; weight gradient accumulated in float32 "
                "for 16-bit weights. Gradients go to hidden and weight only."),
            citation=citation, reference=reference, make_inputs=_inputs(name),
            options={**defaults, "ignore_index": -100, "reduction": "mean"},
            check_options=[{"reduction": "sum"}, {"reduction": "none"}] + extra,
            grad_inputs=("hidden", "weight"), sizes=dict(fl.SIZES),
            input_params=dict(fl.SHAPES), x_name="pairs" if head.groups == 2 else "sequences",
            flops=fl.flops_model(head), edge_cases=_edge_cases(name), input_domains=domains)


IMPLS = {name: make_impls(name, head, defaults,
                          ("desirable", "kl") if name == "fused_linear_kto" else ())
         for name, (head, defaults) in HEADS.items()}


@hookimpl
def register_losses(register):
    for spec in specs():
        register(spec)


@hookimpl
def register_implementations(register):
    for name, (_, eager, chunked) in IMPLS.items():
        register(name, Impl("eager", eager, kind="baseline", backend="torch",
                            description="all logits at once, F.cross_entropy per token"))
        register(name, Impl("chunked", chunked, grad_in_forward=True, backend="torch",
                            description="fused-linear template: a chunk of units at a time, "
                                        "gradients in the forward"))
