"""GRPO (``rl`` family): the token-level clipped policy-gradient loss with group-normalized
advantages and a KL penalty to a reference policy, from per-token log-probs (``grpo``)
or from the policy's hidden states and lm head (``fused_linear_grpo``, on the
fused-linear template of :mod:`lossreg_plugins._fused_linear`).

Per token, with ratio rho = exp(log pi - log pi_old) and the advantage A_i of its
sequence (the group's rewards standardized: (r - mean) / (std + 1e-4), std unbiased as
TRL's; ``scale_rewards=False`` keeps r - mean, as Dr. GRPO prescribes):

    l_it = -min(rho A_i, clip(rho, 1 - eps_low, 1 + eps_high) A_i) + beta k3_it,
    k3_it = exp(log pi_ref - log pi) - (log pi_ref - log pi) - 1

and ``loss_type`` says how masked tokens are averaged:

* ``grpo``: each sequence's mean over its tokens, then the mean over sequences;
* ``bnpo``: the sum over the batch's tokens / their count;
* ``dr_grpo``: the sum / (sequences x max_completion_length) (a constant normalizer);
* ``dapo``: the sum / the global batch's token count ``num_tokens`` (the tokens of all
  processes and accumulation steps; this batch's count when not given: then as bnpo).

``reduction='none'`` gives each sequence's share before the batch normalizer (its
token mean for ``grpo``, its token sum otherwise), ``sum`` their sum, ``mean`` the loss.
Constants get no gradient: old and reference log-probs, rewards, advantages.
"""

from __future__ import annotations

import torch

from lossreg import Impl, LossSpec, hookimpl
from lossreg.kernels import grpo as grpo_kernel
from lossreg.kernels.traffic import streamed
from lossreg.validate import (check_choice, check_float, check_mask, check_number,
                              check_reduction, check_shape, check_tensor)

from . import _fused_linear as fl
from ._common import acc_dtype

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
OPTIONS = {"group_size": 4, "beta": 0.04, "epsilon_low": 0.2, "epsilon_high": 0.2,
           "loss_type": "grpo", "max_completion_length": None, "num_tokens": None,
           "scale_rewards": True}


def check_options(loss, o, reduction, seq_len):
    gs = o["group_size"]
    if isinstance(gs, bool) or not isinstance(gs, int) or gs < 2:
        raise ValueError(f"{loss}: group_size must be an int >= 2 (completions per prompt), "
                         f"got {gs!r}")
    check_number(loss, "beta", o["beta"], low=0.0)
    check_number(loss, "epsilon_low", o["epsilon_low"], low=0.0, high=1.0, open_interval=True)
    check_number(loss, "epsilon_high", o["epsilon_high"], low=0.0, high=None, low_open=True)
    check_choice(loss, "loss_type", o["loss_type"], LOSS_TYPES)
    for name in ("max_completion_length", "num_tokens"):
        v = o[name]
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{loss}: {name} must be None or an int >= 1, got {v!r}")
    if o["max_completion_length"] is not None and o["max_completion_length"] < seq_len:
        raise ValueError(f"{loss}: max_completion_length must be at least the {seq_len} "
                         f"positions of the completions, got {o['max_completion_length']}")
    if not isinstance(o["scale_rewards"], bool):
        raise TypeError(f"{loss}: scale_rewards must be a bool, got {o['scale_rewards']!r}")
    check_reduction(loss, reduction)


def advantages(rewards, group_size, scale_rewards):
    """(r - group mean) / (group std + 1e-4), or r - group mean; detached."""
    r = rewards.detach().view(-1, group_size)
    adv = r - r.mean(dim=1, keepdim=True)
    if scale_rewards and r.numel():
        adv = adv / (r.std(dim=1, keepdim=True) + 1e-4)
    return adv.reshape(-1)


def per_sequence(lp, old, ref, adv, keep, o):
    """Each sequence's share of the loss (before the batch normalizer), (N,)."""
    ratio = torch.exp(lp - old.detach())
    clipped = torch.clamp(ratio, 1 - o["epsilon_low"], 1 + o["epsilon_high"])
    a = adv.detach()[:, None]
    tok = -torch.min(ratio * a, clipped * a)
    if o["beta"]:
        d = ref.detach() - lp
        tok = tok + o["beta"] * (torch.exp(d) - d - 1)
    tok = torch.where(keep, tok, torch.zeros_like(tok))
    total = tok.sum(dim=1)
    if o["loss_type"] == "grpo":
        return total / keep.sum(dim=1).clamp(min=1).to(total.dtype)
    return total


def divisor(keep, o):
    """What ``mean`` divides the sum of :func:`per_sequence` by."""
    n, seq = keep.shape[-2], keep.shape[-1]
    kind, tokens = o["loss_type"], o["num_tokens"]
    if kind in ("grpo", "dr_grpo"):
        return n if kind == "grpo" else n * (o["max_completion_length"] or seq)
    return tokens if kind == "dapo" and tokens is not None else keep.sum().clamp(min=1)


def _reduce(per_seq, div, reduction):
    total = per_seq.sum()
    return per_seq if reduction == "none" else total / div if reduction == "mean" else total


# ---------------------------------------------------------------- grpo
def _validate(log_probs, old_log_probs, ref_log_probs, rewards, mask, o, reduction):
    check_float("grpo", log_probs=log_probs, old_log_probs=old_log_probs, rewards=rewards)
    if log_probs.dim() != 2:
        raise ValueError(f"grpo: log_probs must be (N, T): per-token log-probs of N "
                         f"completions, got shape {tuple(log_probs.shape)}")
    check_shape("grpo", "old_log_probs", old_log_probs, log_probs.shape, "the shape of "
                "log_probs")
    if ref_log_probs is not None:
        check_float("grpo", log_probs=log_probs, ref_log_probs=ref_log_probs)
        check_shape("grpo", "ref_log_probs", ref_log_probs, log_probs.shape,
                    "the shape of log_probs")
    elif o["beta"]:
        raise ValueError(f"grpo: ref_log_probs must be given when beta > 0, got beta="
                         f"{o['beta']!r} and no ref_log_probs")
    check_shape("grpo", "rewards", rewards, log_probs.shape[:1], "one reward per completion")
    check_tensor("grpo", mask=mask)
    if mask.device != log_probs.device:
        raise ValueError(f"grpo: mask must be on log_probs's device {log_probs.device}, got "
                         f"{mask.device}")
    check_mask("grpo", "mask", mask, log_probs.shape, "1 on the completion tokens")
    check_options("grpo", o, reduction, log_probs.shape[1])
    if log_probs.shape[0] % o["group_size"]:
        raise ValueError(f"grpo: log_probs must hold whole groups: {log_probs.shape[0]} "
                         f"completions is no multiple of group_size={o['group_size']}")


def _options(group_size, beta, epsilon_low, epsilon_high, loss_type, max_completion_length,
             num_tokens, scale_rewards):
    return dict(group_size=group_size, beta=beta, epsilon_low=epsilon_low,
                epsilon_high=epsilon_high, loss_type=loss_type,
                max_completion_length=max_completion_length, num_tokens=num_tokens,
                scale_rewards=scale_rewards)


def _grpo(wide_of):
    def fn(log_probs, old_log_probs, rewards, mask, ref_log_probs=None, group_size=4,
           beta=0.04, epsilon_low=0.2, epsilon_high=0.2, loss_type="grpo",
           max_completion_length=None, num_tokens=None, scale_rewards=True,
           reduction="mean"):
        o = _options(group_size, beta, epsilon_low, epsilon_high, loss_type,
                     max_completion_length, num_tokens, scale_rewards)
        _validate(log_probs, old_log_probs, ref_log_probs, rewards, mask, o, reduction)
        dtype = log_probs.dtype
        wide = wide_of(dtype)
        keep = mask != 0
        adv = advantages(rewards.to(wide), group_size, scale_rewards)
        ref = None if ref_log_probs is None else ref_log_probs.to(wide)
        per_seq = per_sequence(log_probs.to(wide), old_log_probs.to(wide), ref, adv, keep, o)
        div = divisor(keep, o)
        return _reduce(per_seq, div, reduction).to(dtype)

    return fn


def grpo_torch(log_probs, old_log_probs, rewards, mask, ref_log_probs=None, group_size=4,
               beta=0.04, epsilon_low=0.2, epsilon_high=0.2, loss_type="grpo",
               max_completion_length=None, num_tokens=None, scale_rewards=True,
               reduction="mean"):
    """Torch built-ins in float32 (float64 for float64); masked tokens zeroed before
    any exp, the clipped branch detached (0 gradient where it wins), k3 = expm1(d) - d."""
    o = _options(group_size, beta, epsilon_low, epsilon_high, loss_type,
                 max_completion_length, num_tokens, scale_rewards)
    _validate(log_probs, old_log_probs, ref_log_probs, rewards, mask, o, reduction)
    dtype = log_probs.dtype
    wide = acc_dtype(dtype)
    keep = mask != 0
    lp = log_probs.to(wide).masked_fill(~keep, 0.0)
    old = old_log_probs.detach().to(wide).masked_fill(~keep, 0.0)
    adv = advantages(rewards.to(wide), group_size, scale_rewards)[:, None]
    ratio = torch.exp(lp - old)
    un = ratio * adv
    cl = ratio.detach().clamp(1 - epsilon_low, 1 + epsilon_high) * adv
    tok = -torch.where(un <= cl, un, cl)
    if beta:
        d = ref_log_probs.detach().to(wide).masked_fill(~keep, 0.0) - lp
        tok = tok + beta * (torch.expm1(d) - d)
    per_seq = tok.masked_fill(~keep, 0.0).sum(dim=1)
    if loss_type == "grpo":
        per_seq = per_seq / keep.sum(dim=1).clamp(min=1).to(wide)
    return _reduce(per_seq, divisor(keep, o), reduction).to(dtype)


def grpo_triton(log_probs, old_log_probs, rewards, mask, ref_log_probs=None, group_size=4,
                beta=0.04, epsilon_low=0.2, epsilon_high=0.2, loss_type="grpo",
                max_completion_length=None, num_tokens=None, scale_rewards=True,
                reduction="mean"):
    o = _options(group_size, beta, epsilon_low, epsilon_high, loss_type,
                 max_completion_length, num_tokens, scale_rewards)
    _validate(log_probs, old_log_probs, ref_log_probs, rewards, mask, o, reduction)
    wide = acc_dtype(log_probs.dtype)
    adv = advantages(rewards.to(wide), group_size, scale_rewards)
    div = divisor(mask != 0, o) if reduction == "mean" else 1
    return grpo_kernel.GRPO(log_probs, old_log_probs, ref_log_probs if beta else None, adv,
                            mask, beta=float(beta), low=1 - epsilon_low,
                            high=1 + epsilon_high, div=div,
                            per_seq_mean=loss_type == "grpo", reduction=reduction)


#: the formula as written, in the inputs' dtype (float32 for 16-bit: rounding rho to 8
#: bits would move tokens across the clip's kinks)
grpo_reference = _grpo(lambda d: torch.float32 if d in (torch.float16, torch.bfloat16) else d)
grpo_reference.__name__ = "grpo_reference"


def grpo_inputs(case, n=None, tokens=None):
    """n groups of ``group_size`` completions of T tokens: a prompt (mask 0), a completion
    of at least one token, padding; the policy a little off the rollout policy (some
    ratios outside the clip range) and off the reference; integer-ish rewards."""
    n = case.n if n is None else n
    g = int(case.params.get("group_size", 4))
    rows = n * g
    tokens = int(case.params.get("tokens", 37)) if tokens is None else tokens
    old = -3.0 * case.rand(rows, tokens) - 0.01
    new = torch.clamp(old + 0.2 * case.randn(rows, tokens), max=0.0)
    ref = torch.clamp(old + 0.3 * case.randn(rows, tokens), max=0.0)
    start = (case.rand(rows, dtype=torch.float32) * tokens * 0.5).long()
    length = 1 + (case.rand(rows, dtype=torch.float32) * (tokens - start)).long()
    pos = torch.arange(tokens, device=case.device)
    mask = (pos >= start[:, None]) & (pos < (start + length)[:, None])
    rewards = torch.round(case.rand(rows) * 4) / 2 + 0.1 * case.randn(rows)
    return {"log_probs": new, "old_log_probs": old, "ref_log_probs": ref, "rewards": rewards,
            "mask": mask}


# ---------------------------------------------------------------- fused_linear_grpo
def _unit(lp, ref_lp, keep, aux, o):
    return per_sequence(lp[0], aux["old"], aux["ref"], aux["adv"], keep[0], o)


HEAD = fl.Head("fused_linear_grpo", 1, _unit, lambda keep, aux, o: divisor(keep[0], o))


def validate_fused(hidden, weight, target, old_log_probs, rewards, ref_log_probs, o,
                   ignore_index, reduction):
    fl.validate(HEAD, hidden, weight, target, None, None, ignore_index, reduction)
    check_float(name := HEAD.name, hidden=hidden, old_log_probs=old_log_probs, rewards=rewards)
    check_shape(name, "old_log_probs", old_log_probs, target.shape, "the shape of target")
    check_shape(name, "rewards", rewards, target.shape[:1], "one reward per completion")
    if ref_log_probs is not None:
        check_float(name, hidden=hidden, ref_log_probs=ref_log_probs)
        check_shape(name, "ref_log_probs", ref_log_probs, target.shape, "the shape of target")
    elif o["beta"]:
        raise ValueError(f"{name}: ref_log_probs must be given when beta > 0, got {o['beta']}")
    check_options(name, o, reduction, target.shape[1])
    if target.shape[0] % o["group_size"]:
        raise ValueError(f"{name}: hidden must hold whole groups: {target.shape[0]} "
                         f"completions is no multiple of group_size={o['group_size']}")


def _fused(mode):
    def fn(hidden, weight, target, old_log_probs, rewards, ref_log_probs=None, group_size=4,
           beta=0.04, epsilon_low=0.2, epsilon_high=0.2, loss_type="grpo",
           max_completion_length=None, num_tokens=None, scale_rewards=True,
           ignore_index=-100, reduction="mean"):
        o = _options(group_size, beta, epsilon_low, epsilon_high, loss_type,
                     max_completion_length, num_tokens, scale_rewards)
        validate_fused(hidden, weight, target, old_log_probs, rewards, ref_log_probs, o,
                       ignore_index, reduction)
        acc = fl.acc_dtype(hidden.dtype)
        aux = {"old": old_log_probs.detach().to(acc),
               "ref": None if ref_log_probs is None else ref_log_probs.detach().to(acc),
               "adv": advantages(rewards.to(acc), group_size, scale_rewards)}
        if mode == "chunked":
            return fl.chunked(HEAD, hidden, weight, target, None, None, aux, o, ignore_index,
                              reduction)
        engine = fl.token_logps_reference if mode == "reference" else fl.token_logps_eager
        return fl.materialized(HEAD, engine, hidden, weight, target, None, None, aux, o,
                               ignore_index, reduction)

    fn.__name__ = f"fused_linear_grpo_{mode}"
    return fn


fused_grpo_reference, fused_grpo_eager, fused_grpo_chunked = (
    _fused(m) for m in ("reference", "eager", "chunked"))


def fused_grpo_inputs(case):
    """groups x group_size completions: hidden states, lm head and completion tokens
    (prompt and padding at ignore_index) from the template; the rollout and reference
    policies' per-token log-probs near the policy's own; rewards."""
    g = int(case.params.get("group_size", 4))
    out = fl.token_inputs(case, case.n * g, False)
    with torch.no_grad():
        lp, keep = fl.token_logps_reference(out["hidden"].double(), out["weight"].double(),
                                            out["target"], -100)
    shape = out["target"].shape
    out["old_log_probs"] = torch.clamp(lp.to(case.dtype) + 0.2 * case.randn(*shape), max=0.0)
    out["ref_log_probs"] = torch.clamp(lp.to(case.dtype) + 0.3 * case.randn(*shape), max=0.0)
    out["rewards"] = torch.round(case.rand(case.n * g) * 4) / 2 + 0.1 * case.randn(case.n * g)
    return out


# ---------------------------------------------------------------- registration
def _mean_count(inputs, options):
    o = {**OPTIONS, **options}
    keep = (inputs["mask"] != 0) if "mask" in inputs else (
        inputs["target"] != options.get("ignore_index", -100))
    return float(divisor(keep, o))


GRPO_FORMULA = (
    r"\rho_{it}=e^{\log\pi_{it}-\log\pi^{old}_{it}},\ \hat A_i=\frac{r_i-\mathrm{mean}"
    r"(r_G)}{\mathrm{std}(r_G)+10^{-4}},\ \ell_{it}=-\min(\rho_{it}\hat A_i,\mathrm{clip}"
    r"(\rho_{it},1-\epsilon_l,1+\epsilon_h)\hat A_i)+\beta\left(e^{\delta_{it}}-\delta_{it}"
    r"-1\right),\ \delta_{it}=\log\pi^{ref}_{it}-\log\pi_{it};\ \mathrm{grpo}: \frac{1}{N}"
    r"\sum_i\frac{\sum_t m_{it}\ell_{it}}{\sum_t m_{it}}")
CITATION = ("Shao et al. (2024), DeepSeekMath (GRPO); Liu et al. (2025), Understanding "
            "R1-Zero-Like Training: A Critical Perspective (Dr. GRPO); Yu et al. (2025), DAPO; "
            "TRL GRPOTrainer (bnpo)")
CHECKS = [{"reduction": "sum"}, {"reduction": "none"}, {"loss_type": "bnpo"},
          {"loss_type": "dr_grpo", "scale_rewards": False, "reduction": "none"},
          {"loss_type": "dapo", "epsilon_high": 0.28, "beta": 0.0},
          {"loss_type": "dapo", "num_tokens": 1000}]  # num_tokens acts on mean only


TOL = {"float32": (5e-5, 5e-7)}
TOL_WHY = (" Float32 rtol 5e-5: the advantages of a group sum to zero, so the terms of "
           "its tokens cancel and the formula as written in float32 is up to ~3e-5 "
           "(relative) off its float64 value.")


def _far_off(case):
    inputs = grpo_inputs(case, 2)
    sign = torch.where(case.rand(*inputs["log_probs"].shape) < 0.5, 3.0, -3.0).to(case.dtype)
    return {**inputs, "log_probs": inputs["old_log_probs"] + sign}


def _on_policy_ties(case):
    """The first step: policy = rollout policy (rho = 1), equal rewards (A = 0)."""
    inputs = grpo_inputs(case, 2)
    return {**inputs, "log_probs": inputs["old_log_probs"].clone(),
            "rewards": torch.ones_like(inputs["rewards"])}


@hookimpl
def register_losses(register):
    register(LossSpec(
        name="grpo", family="rl", title="Group relative policy optimization",
        formula=GRPO_FORMULA,
        description=__doc__.split("\n\n", 1)[1].replace("\n", " ") + TOL_WHY,
        tolerances=TOL,
        citation=CITATION, reference=grpo_reference, make_inputs=grpo_inputs,
        options={**OPTIONS, "reduction": "mean"}, check_options=CHECKS,
        grad_inputs=("log_probs",), x_name="groups",
        sizes={"quick": [1, 3], "default": [16, 64, 256], "large": [256, 1024]},
        input_params={"quick": {"tokens": 37}, "default": {"tokens": 1024},
                      "large": {"tokens": 4096}},
        input_domains={"mask": ("values", (0, 1))}, mean_count=_mean_count,
        edge_cases={"one_group_one_token": lambda case: grpo_inputs(case, 1, 1),
                    "far_outside_clip": _far_off, "on_policy_equal_rewards": _on_policy_ties,
                    "long_completions": lambda case: grpo_inputs(case, 1, 2500)}))
    register(LossSpec(
        name="fused_linear_grpo", family="rl", title="Fused linear GRPO",
        formula=r"\log\pi_{it} = \log\mathrm{softmax}(h_{it}W^\top)_{y_{it}};\ " + GRPO_FORMULA,
        description=(
            "grpo's loss with the policy's per-token log-probs formed from hidden (N, T, H) "
            "and the lm head weight (V, H) at the completion tokens target (N, T) "
            "(ignore_index elsewhere: the completion mask), chunked over sequences, never "
            "the full logits, gradients in the forward. The rollout and reference policies' "
            "log-probs (N, T) are given, as trainers keep them." + TOL_WHY),
        tolerances=TOL,
        citation=CITATION, reference=fused_grpo_reference, make_inputs=fused_grpo_inputs,
        options={**OPTIONS, "ignore_index": -100, "reduction": "mean"},
        check_options=CHECKS[:3] + [CHECKS[3], CHECKS[4]],
        grad_inputs=("hidden", "weight"), x_name="groups",
        sizes={"quick": [1, 2], "default": [4], "large": [4]}, input_params=dict(fl.SHAPES),
        input_domains={"target": ("index", lambda inputs: inputs["weight"].shape[0], (-100,))},
        mean_count=_mean_count, flops=fl.flops_model(HEAD),
        edge_cases={"one_group_one_token": lambda case: {
            **(x := fused_grpo_inputs(case)),
            "target": x["target"].masked_fill(
                torch.arange(x["target"].shape[1], device=x["target"].device)
                != x["target"].shape[1] // 2, -100)}}))


@hookimpl
def register_implementations(register):
    register("grpo", Impl("torch", grpo_torch, kind="baseline", description="torch built-ins"))
    register("grpo", Impl(
        "triton", grpo_triton, backend="triton", devices=("cuda",), grad_in_forward=True,
        requires=("triton",), bytes_model=streamed("log_probs"),
        description="one pass over the tokens (a mask count first for loss_type grpo), "
                    "gradient in the forward"))
    register("fused_linear_grpo", Impl("eager", fused_grpo_eager, kind="baseline",
                                       description="all logits at once, F.cross_entropy"))
    register("fused_linear_grpo", Impl(
        "chunked", fused_grpo_chunked, grad_in_forward=True,
        description="fused-linear template: a chunk of sequences at a time, gradients in "
                    "the forward"))
