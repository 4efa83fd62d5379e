"""Sequence-level preference losses of the ``rl`` family beyond DPO: ``orpo``, ``cpo``,
``simpo`` (pairs of chosen/rejected log-probs) and ``kto`` (unpaired sequences labelled
desirable or undesirable).

Each loss has a plain reference written from the paper's formula, a torch version
on built-in ops (16-bit log-probs taken to float32 first, as trainers keep them) and a
Triton version on the pointwise template (:mod:`lossreg.kernels.preference`). What is a
constant of the loss gets no gradient: KTO's reference log-probs and reference point
z0 = max(0, KL estimate), which is detached as the paper prescribes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lossreg import Impl, LossSpec, hookimpl
from lossreg.kernels.traffic import streamed
from lossreg.kernels import preference as kernels
from lossreg.validate import (
    check_float,
    check_number,
    check_reduction,
    check_shape,
)

from ._common import acc_dtype, pointwise_flops, reduce_loss, reductions
from .preference_kto import kto_spec, kto_torch, kto_triton
from .rl import PAIR_SIZES


def _wide(t):
    return acc_dtype(t.dtype)


# ---------------------------------------------------------------- pairwise validation
def _validate_pair(loss, chosen, rejected, reduction, **numbers):
    check_float(loss, policy_chosen_logps=chosen, policy_rejected_logps=rejected)
    check_shape(loss, "policy_rejected_logps", rejected, chosen.shape,
                "the shape of policy_chosen_logps")
    for name, (value, low, high, open_low) in numbers.items():
        check_number(loss, name, value, low=low, high=high, low_open=open_low)
    check_reduction(loss, reduction)


def _log_odds(a):
    """log(p / (1 - p)) of p = e^a: a - log(1 - e^a), with 1 - e^a as -expm1(a)."""
    return a - torch.log(-torch.expm1(a))


# ---------------------------------------------------------------- orpo
def _validate_orpo(pc, pr, beta, reduction):
    _validate_pair("orpo", pc, pr, reduction, beta=(beta, 0.0, None, False))


def orpo_reference(policy_chosen_logps, policy_rejected_logps, beta=0.1, reduction="mean"):
    """-log P(y_w) - beta log sigma(log odds(y_w) - log odds(y_l)) per pair, with P the
    per-token average log-prob (ORPO's length-normalized likelihood)."""
    _validate_orpo(policy_chosen_logps, policy_rejected_logps, beta, reduction)
    pc, pr = policy_chosen_logps, policy_rejected_logps
    ratio = _log_odds(pc) - _log_odds(pr)
    return reduce_loss(-pc - beta * F.logsigmoid(ratio), reduction)


def orpo_torch(policy_chosen_logps, policy_rejected_logps, beta=0.1, reduction="mean"):
    _validate_orpo(policy_chosen_logps, policy_rejected_logps, beta, reduction)
    dtype = policy_chosen_logps.dtype
    pc, pr = (t.to(_wide(t)) for t in (policy_chosen_logps, policy_rejected_logps))
    ratio = (pc - pr) - (torch.log(-torch.expm1(pc)) - torch.log(-torch.expm1(pr)))
    # logsigmoid, not BCE-with-logits: its gradient sigma(u) - 1 cancels at large log
    # odds, and 1 / (1 - P) multiplies that error by up to 1e4 near P = 1
    return reduce_loss(-beta * F.logsigmoid(ratio) - pc, reduction).to(dtype)


def orpo_triton(policy_chosen_logps, policy_rejected_logps, beta=0.1, reduction="mean"):
    _validate_orpo(policy_chosen_logps, policy_rejected_logps, beta, reduction)
    return kernels.ORPO(policy_chosen_logps, policy_rejected_logps, reduction, p0=float(beta))


def average_logp_inputs(case, n=None):
    """Per-token average log-probs in [-3, -0.05]; the chosen response a little likelier."""
    n = case.n if n is None else n
    rejected = -(0.05 + 2.5 * case.rand(n))
    chosen = torch.clamp(rejected + 0.4 * case.randn(n) + 0.2, min=-3.0, max=-0.05)
    return {"policy_chosen_logps": chosen, "policy_rejected_logps": rejected}


def _pair_edge_cases(make, far):
    """one pair, a block plus one, margins of +-``far`` (in the loss's own units), ties."""

    def margins(case):
        inputs = make(case, 300)
        pc, pr = inputs["policy_chosen_logps"], inputs["policy_rejected_logps"]
        pr[::2] = pc[::2] - far
        pr[1::2] = pc[1::2] + far
        return inputs

    def ties(case):
        inputs = make(case, 77)
        return {**inputs, "policy_rejected_logps": inputs["policy_chosen_logps"].clone()}

    return {"one_pair": lambda case: make(case, 1),
            "block_plus_one": lambda case: make(case, 4097),
            "large_margins": margins, "ties": ties}


def _orpo_near_zero(case):
    """Log-probs of -1e-4 (p near 1): the log odds are large and 1 - p cancels."""
    inputs = average_logp_inputs(case, 64)
    inputs["policy_chosen_logps"][::2] = -1e-4
    return inputs


# ---------------------------------------------------------------- cpo
def _validate_cpo(pc, pr, beta, alpha, reduction):
    _validate_pair("cpo", pc, pr, reduction, beta=(beta, 0.0, None, True),
                   alpha=(alpha, 0.0, None, False))


def cpo_reference(policy_chosen_logps, policy_rejected_logps, beta=0.1, alpha=1.0,
                  reduction="mean"):
    """-log sigma(beta log pi(y_w) - beta log pi(y_l)) - alpha log pi(y_w) per pair."""
    _validate_cpo(policy_chosen_logps, policy_rejected_logps, beta, alpha, reduction)
    pc, pr = policy_chosen_logps, policy_rejected_logps
    return reduce_loss(-F.logsigmoid(beta * pc - beta * pr) - alpha * pc, reduction)


def cpo_torch(policy_chosen_logps, policy_rejected_logps, beta=0.1, alpha=1.0,
              reduction="mean"):
    _validate_cpo(policy_chosen_logps, policy_rejected_logps, beta, alpha, reduction)
    dtype = policy_chosen_logps.dtype
    pc, pr = (t.to(_wide(t)) for t in (policy_chosen_logps, policy_rejected_logps))
    # logsigmoid, not BCE-with-logits: the latter is NaN at an infinite log-prob, where
    # the formula is 0 or inf
    return reduce_loss(-F.logsigmoid(beta * (pc - pr)) - alpha * pc, reduction).to(dtype)


def cpo_triton(policy_chosen_logps, policy_rejected_logps, beta=0.1, alpha=1.0,
               reduction="mean"):
    _validate_cpo(policy_chosen_logps, policy_rejected_logps, beta, alpha, reduction)
    return kernels.CPO(policy_chosen_logps, policy_rejected_logps, reduction, p0=float(beta),
                       p1=float(alpha))


def sum_logp_inputs(case, n=None):
    """Sequence log-probs (sums over ~100 tokens: tens to hundreds of nats, all < 0)."""
    n = case.n if n is None else n
    rejected = -(20 + 200 * case.rand(n))
    chosen = torch.clamp(rejected + 10 * case.randn(n) + 5, max=-0.5)
    return {"policy_chosen_logps": chosen, "policy_rejected_logps": rejected}


# ---------------------------------------------------------------- simpo
def _validate_simpo(pc, pr, beta, gamma, reduction):
    _validate_pair("simpo", pc, pr, reduction, beta=(beta, 0.0, None, True),
                   gamma=(gamma, None, None, False))


def simpo_reference(policy_chosen_logps, policy_rejected_logps, beta=2.0, gamma=0.5,
                    reduction="mean"):
    """-log sigma(beta/|y_w| log pi(y_w) - beta/|y_l| log pi(y_l) - gamma) per pair; the
    inputs are the length-normalized log-probs (1/|y|) log pi(y)."""
    _validate_simpo(policy_chosen_logps, policy_rejected_logps, beta, gamma, reduction)
    pc, pr = policy_chosen_logps, policy_rejected_logps
    return reduce_loss(-F.logsigmoid(beta * pc - beta * pr - gamma), reduction)


def simpo_torch(policy_chosen_logps, policy_rejected_logps, beta=2.0, gamma=0.5,
                reduction="mean"):
    _validate_simpo(policy_chosen_logps, policy_rejected_logps, beta, gamma, reduction)
    dtype = policy_chosen_logps.dtype
    pc, pr = (t.to(_wide(t)) for t in (policy_chosen_logps, policy_rejected_logps))
    return reduce_loss(-F.logsigmoid(beta * (pc - pr) - gamma), reduction).to(dtype)


def simpo_triton(policy_chosen_logps, policy_rejected_logps, beta=2.0, gamma=0.5,
                 reduction="mean"):
    _validate_simpo(policy_chosen_logps, policy_rejected_logps, beta, gamma, reduction)
    return kernels.SIMPO(policy_chosen_logps, policy_rejected_logps, reduction,
                         p0=float(beta), p1=float(gamma))


# ---------------------------------------------------------------- registration
PAIR_GRADS = ("policy_chosen_logps", "policy_rejected_logps")


def _pair_spec(name, title, formula, description, citation, reference, make, options,
               extra_checks, edge_cases, flops):
    return LossSpec(
        name=name, family="rl", title=title, formula=formula, description=description,
        citation=citation, reference=reference, make_inputs=make, options=options,
        check_options=reductions() + extra_checks, grad_inputs=PAIR_GRADS, sizes=PAIR_SIZES,
        x_name="pairs", flops=pointwise_flops(*flops, key="policy_chosen_logps"),
        edge_cases=edge_cases)


def specs():
    yield _pair_spec(
        "orpo", "Odds-ratio preference optimization",
        (r"\frac{1}{n}\sum_i -\log P^c_i - \lambda\log\sigma\left(\log\frac{P^c_i}{1-P^c_i}"
         r" - \log\frac{P^r_i}{1-P^r_i}\right),\ \log P = \frac{1}{|y|}\sum_t "
         r"\log\pi(y_t|x,y_{<t})"),
        ("ORPO on the per-token average log-probs log P (<= 0) of the chosen and rejected "
         "responses: the chosen response's NLL plus lambda (option beta, as TRL names it; "
         "0.1 in the paper) times the odds-ratio term. 1 - P is formed as -expm1(log P), "
         "exact near P = 1; log P = 0 has infinite odds."),
        "Hong, Lee & Thorne (2024), ORPO: Monolithic Preference Optimization without "
        "Reference Model; TRL ORPOTrainer",
        orpo_reference, lambda case, n=None: average_logp_inputs(case, n),
        {"beta": 0.1, "reduction": "mean"},
        [{"beta": 0.5}, {"beta": 1.0, "reduction": "none"}],
        {**_pair_edge_cases(average_logp_inputs, 25.0), "near_zero_logps": _orpo_near_zero},
        (24, 8))
    yield _pair_spec(
        "cpo", "Contrastive preference optimization",
        (r"\frac{1}{n}\sum_i -\log\sigma\left(\beta\log\pi(y^w_i|x_i)-\beta\log\pi(y^l_i|x_i)"
         r"\right) - \alpha\log\pi(y^w_i|x_i)"),
        ("CPO on sequence log-probs of the chosen (y_w) and rejected (y_l) responses: the "
         "reference-free preference term plus alpha times the chosen NLL (the paper's "
         "behaviour-cloning regulariser, weight 1; TRL's cpo_alpha). beta 0.1 as in the "
         "paper."),
        "Xu et al. (2024), Contrastive Preference Optimization: Pushing the Boundaries of LLM "
        "Performance in Machine Translation; TRL CPOTrainer",
        cpo_reference, lambda case, n=None: sum_logp_inputs(case, n),
        {"beta": 0.1, "alpha": 1.0, "reduction": "mean"},
        [{"beta": 0.5, "alpha": 0.0}, {"alpha": 0.3, "reduction": "none"}],
        _pair_edge_cases(sum_logp_inputs, 500.0), (10, 6))
    yield _pair_spec(
        "simpo", "Simple preference optimization",
        (r"\frac{1}{n}\sum_i -\log\sigma\left(\frac{\beta}{|y^w_i|}\log\pi(y^w_i|x_i) - "
         r"\frac{\beta}{|y^l_i|}\log\pi(y^l_i|x_i) - \gamma\right)"),
        ("SimPO on length-normalized (per-token average) log-probs of the chosen and "
         "rejected responses, with the target reward margin gamma; no reference model. "
         "Defaults beta = 2.0, gamma = 0.5 (gamma / beta = 0.25, the paper's default "
         "setting)."),
        "Meng, Xia & Chen (2024), SimPO: Simple Preference Optimization with a "
        "Reference-Free Reward",
        simpo_reference, lambda case, n=None: average_logp_inputs(case, n),
        {"beta": 2.0, "gamma": 0.5, "reduction": "mean"},
        [{"beta": 2.5, "gamma": 1.6}, {"gamma": 0.0, "reduction": "none"}],
        _pair_edge_cases(average_logp_inputs, 25.0), (10, 6))
    yield kto_spec()

@hookimpl
def register_losses(register):
    for spec in specs():
        register(spec)


@hookimpl
def register_implementations(register):
    triton_kw = {"backend": "triton", "devices": ("cuda",), "grad_in_forward": True,
                 "requires": ("triton",)}
    for name, torch_fn, triton_fn, what in (
            ("orpo", orpo_torch, orpo_triton, "-expm1 and logsigmoid"),
            ("cpo", cpo_torch, cpo_triton, "logsigmoid"),
            ("simpo", simpo_torch, simpo_triton, "logsigmoid"),
            ("kto", kto_torch, kto_triton, "sigmoid of the signed margin")):
        register(name, Impl("torch", torch_fn, kind="baseline", backend="torch",
                            description=f"torch built-ins ({what}), float32 for 16-bit"))
        register(name, Impl("triton", triton_fn, **triton_kw,
                            bytes_model=streamed("policy_chosen_logps",
                                                 "policy_rejected_logps", "policy_logps"),
                            description="pointwise template, one launch, gradient in the "
                                        "forward"))
