"""Section 15, reinforcement learning: the reward-model and preference losses of RLHF
(``reward_bt``, ``dpo``), PPO's clipped surrogate (``ppo_clip``) and DQN's TD loss
(``q_td``).

The formulas are the ones the large trainers use (TRL, OpenRLHF): Bradley-Terry
``-logsigmoid(r_c - r_r - m)`` (Llama 2's margin); DPO's ``sigmoid`` with conservative-DPO
label smoothing, ``ipo`` and ``hinge``; PPO's per-token clipped ratio averaged over each
sequence's response tokens, then over sequences; the DQN target
``r + gamma (1 - done) max_a' Q_target(s', a')`` under a Huber loss.

What is a constant of the loss gets no gradient in any implementation, whatever its
``requires_grad``: reference-model and old-policy log-probs, advantages, margins, target
Q-values, rewards, dones (the references detach them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lossreg import Impl, LossSpec, hookimpl
from lossreg.kernels.traffic import streamed
from lossreg.kernels import jit, libm, pointwise_loss, tl
from lossreg.kernels.masked_tokens import masked_tokens_loss
from lossreg.kernels.pointwise import PointwiseLoss
from lossreg.kernels.td import td_loss
from lossreg.validate import (
    check_broadcasts_to,
    check_choice,
    check_number,
    check_reduction,
    check_tensor,
)

from ._common import acc_dtype, pointwise_flops, reduce_loss, reductions
from lossreg.validate import check_device, check_float, check_index, check_mask, check_shape

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge")


@jit
def _softplus_neg(h):
    """(-log sigma(h), -sigma(-h)): the loss softplus(-h) and its derivative, stable at
    any |h| (no exp of a positive number, no cancellation)."""
    e = tl.exp(-tl.abs(h))
    loss = tl.maximum(-h, 0.0) + libm.log1p(e)
    inv = 1.0 / (1.0 + e)
    return loss, -tl.where(h >= 0, e * inv, inv)


# ---------------------------------------------------------------- reward_bt
def _validate_bt(chosen, rejected, margin, reduction):
    check_float("reward_bt", chosen=chosen, rejected=rejected)
    check_shape("reward_bt", "rejected", rejected, chosen.shape, "the shape of chosen")
    check_reduction("reward_bt", reduction)
    if torch.is_tensor(margin):
        check_float("reward_bt", chosen=chosen, margin=margin)
        check_broadcasts_to("reward_bt", "margin", margin, chosen.shape)
    else:
        check_number("reward_bt", "margin", margin)


def reward_bt_reference(chosen, rejected, margin=0.0, reduction="mean"):
    """-log sigma(r_c - r_r - m) per pair."""
    _validate_bt(chosen, rejected, margin, reduction)
    if torch.is_tensor(margin):
        margin = margin.detach()
    return reduce_loss(-F.logsigmoid(chosen - rejected - margin), reduction)


def reward_bt_torch(chosen, rejected, margin=0.0, reduction="mean"):
    """-log sigma(h) is binary cross-entropy of logit h against the label 1."""
    _validate_bt(chosen, rejected, margin, reduction)
    if torch.is_tensor(margin):
        margin = margin.detach()
    h = chosen - rejected - margin
    return F.binary_cross_entropy_with_logits(h, torch.ones_like(h), reduction=reduction)


@jit
def _bt_term(x, y, p0, p1):
    loss, dh = _softplus_neg(x - y - p0)  # p0: a scalar margin
    return loss, dh, -dh


@jit
def _bt_margin_term(x, y, z, p0, p1):
    loss, dh = _softplus_neg(x - y - z)  # z: the margin of each pair
    return loss, dh, -dh


_bt_kernel = pointwise_loss(_bt_term, name="reward_bt", num_warps=16)
_bt_margin_kernel = pointwise_loss(_bt_margin_term, name="reward_bt_margin", operands=3,
                                   num_warps=16)


def reward_bt_triton(chosen, rejected, margin=0.0, reduction="mean"):
    _validate_bt(chosen, rejected, margin, reduction)
    if torch.is_tensor(margin):
        return _bt_margin_kernel(chosen, rejected, reduction,
                                 z=margin.detach().to(chosen.dtype))
    return _bt_kernel(chosen, rejected, reduction, p0=float(margin))


def bt_inputs(case, n=None):
    """Rewards of chosen and rejected responses; the chosen one is better on average, so
    that both well- and badly-ranked pairs occur."""
    n = case.n if n is None else n
    rejected = case.randn(n) * 2
    return {"chosen": rejected + 1.0 + case.randn(n) * 2, "rejected": rejected}


def _bt_extreme(case):
    inputs = bt_inputs(case, 999)
    chosen = inputs["chosen"]
    chosen[::3] = 1e4
    chosen[1::3] = -1e4
    return {**inputs, "chosen": chosen}


BT_EDGE_CASES = {
    "one_pair": lambda case: bt_inputs(case, 1),
    "block_plus_one": lambda case: bt_inputs(case, 4097),
    "extreme_rewards": _bt_extreme,
    "margin_tensor": lambda case: {**bt_inputs(case, 501), "margin": case.rand(501) * 3},
    "margin_per_head": lambda case: {"chosen": case.randn(37, 3), "rejected": case.randn(37, 3),
                                     "margin": case.rand(3) * 2},
}


# ---------------------------------------------------------------- dpo
def _validate_dpo(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                  reference_rejected_logps, beta, label_smoothing, loss_type, reduction):
    check_float("dpo", policy_chosen_logps=policy_chosen_logps,
                policy_rejected_logps=policy_rejected_logps,
                reference_chosen_logps=reference_chosen_logps,
                reference_rejected_logps=reference_rejected_logps)
    shape = policy_chosen_logps.shape
    for name, t in (("policy_rejected_logps", policy_rejected_logps),
                    ("reference_chosen_logps", reference_chosen_logps),
                    ("reference_rejected_logps", reference_rejected_logps)):
        check_shape("dpo", name, t, shape, "the shape of policy_chosen_logps")
    check_number("dpo", "beta", beta, low=0.0, high=float("inf"), open_interval=True)
    check_choice("dpo", "loss_type", loss_type, DPO_LOSS_TYPES)
    check_number("dpo", "label_smoothing", label_smoothing, low=0.0, high=0.5)
    if loss_type != "sigmoid" and label_smoothing != 0:
        raise ValueError(f"dpo: label_smoothing (conservative DPO) applies to "
                         f"loss_type='sigmoid' only, got {label_smoothing!r} with "
                         f"loss_type={loss_type!r}")
    check_reduction("dpo", reduction)


def dpo_reference(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                  reference_rejected_logps, beta=0.1, label_smoothing=0.0,
                  loss_type="sigmoid", reduction="mean"):
    """h = (log pi_c - log pi_ref_c) - (log pi_r - log pi_ref_r); sigmoid:
    -(1-ls) logsigmoid(beta h) - ls logsigmoid(-beta h); ipo: (h - 1/(2 beta))^2;
    hinge: relu(1 - beta h)."""
    _validate_dpo(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                  reference_rejected_logps, beta, label_smoothing, loss_type, reduction)
    h = ((policy_chosen_logps - reference_chosen_logps.detach())
         - (policy_rejected_logps - reference_rejected_logps.detach()))
    if loss_type == "sigmoid":
        loss = (-(1 - label_smoothing) * F.logsigmoid(beta * h)
                - label_smoothing * F.logsigmoid(-beta * h))
    elif loss_type == "ipo":
        loss = (h - 1 / (2 * beta)) ** 2
    else:
        loss = torch.relu(1 - beta * h)
    return reduce_loss(loss, reduction)


def dpo_torch(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
              reference_rejected_logps, beta=0.1, label_smoothing=0.0, loss_type="sigmoid",
              reduction="mean"):
    """torch's built-in losses: cDPO is binary cross-entropy of the logit beta h against
    the soft label 1 - ls, IPO the squared error to 1/(2 beta); hinge is F.relu, as TRL
    writes it (F.margin_ranking_loss would pass a gradient at the kink, where relu has
    none, and bfloat16 log-probs land exactly on it often). Half-precision log-probs
    are taken to float32 first, as trainers keep them: h is a small difference of sums
    of hundreds of nats, which bfloat16 would round by whole nats."""
    _validate_dpo(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                  reference_rejected_logps, beta, label_smoothing, loss_type, reduction)
    dtype = policy_chosen_logps.dtype
    wide = acc_dtype(dtype)
    h = ((policy_chosen_logps.to(wide) - policy_rejected_logps.to(wide))
         - (reference_chosen_logps.to(wide) - reference_rejected_logps.to(wide)).detach())
    if loss_type == "sigmoid":
        loss = F.binary_cross_entropy_with_logits(
            beta * h, torch.full_like(h, 1 - label_smoothing), reduction=reduction)
    elif loss_type == "ipo":
        loss = F.mse_loss(h, torch.full_like(h, 1 / (2 * beta)), reduction=reduction)
    else:
        loss = reduce_loss(F.relu(1 - beta * h), reduction)
    return loss.to(dtype)


@jit
def _dpo_sigmoid_term(x, y, z, p0, p1):
    """p0 = beta, p1 = label smoothing; z = the reference log-ratio."""
    u = p0 * ((x - y) - z)
    sp_neg, d_neg = _softplus_neg(u)  # -log sigma(u) and its derivative
    sp_pos, d_pos = _softplus_neg(-u)  # -log sigma(-u) and its derivative in -u
    loss = (1.0 - p1) * sp_neg + p1 * sp_pos
    dh = p0 * ((1.0 - p1) * d_neg - p1 * d_pos)
    return loss, dh, -dh


@jit
def _dpo_ipo_term(x, y, z, p0, p1):
    t = (x - y) - z - 0.5 / p0
    return t * t, 2.0 * t, -2.0 * t


@jit
def _dpo_hinge_term(x, y, z, p0, p1):
    t = 1.0 - p0 * ((x - y) - z)
    dh = tl.where(t > 0.0, -p0, 0.0)  # relu: no gradient at the kink, as torch.relu
    return tl.maximum(t, 0.0), dh, -dh


class _RefRatioKernel(PointwiseLoss):
    """The pointwise template with the reference log-ratio as third operand, held in the
    accumulation dtype (float32, float64 for float64 inputs): sequence log-probs are
    hundreds of nats, and rounding their difference to bfloat16 would cost more than
    the tolerance. The ahead-of-time compile covers that operand dtype."""

    def aot_sources(self, dtype: str = "fp32"):
        z = "*fp64" if dtype == "fp64" else "*fp32"
        return [(kernel, {**sig, "Z": z} if "Z" in sig else sig, constexprs, options)
                for kernel, sig, constexprs, options in super().aot_sources(dtype)]


_DPO_KERNELS = {
    "sigmoid": _RefRatioKernel(_dpo_sigmoid_term, "dpo_sigmoid", operands=3, num_warps=16),
    "ipo": _RefRatioKernel(_dpo_ipo_term, "dpo_ipo", operands=3),
    "hinge": _RefRatioKernel(_dpo_hinge_term, "dpo_hinge", operands=3),
}


def dpo_triton(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
               reference_rejected_logps, beta=0.1, label_smoothing=0.0, loss_type="sigmoid",
               reduction="mean"):
    """One pointwise launch over the policy log-probs; the reference log-ratio, a
    constant, is formed first (one small elementwise op)."""
    _validate_dpo(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                  reference_rejected_logps, beta, label_smoothing, loss_type, reduction)
    acc = acc_dtype(policy_chosen_logps.dtype)
    ref_ratio = (reference_chosen_logps.detach().to(acc)
                 - reference_rejected_logps.detach().to(acc))
    return _DPO_KERNELS[loss_type](policy_chosen_logps, policy_rejected_logps, reduction,
                                   p0=float(beta), p1=float(label_smoothing), z=ref_ratio)


def dpo_inputs(case, n=None, scale=1.0):
    """Sequence log-probs (sums over ~100 response tokens, so tens to hundreds of nats,
    all <= 0); the policy drifted from the reference by a few nats."""
    n = case.n if n is None else n
    ref_c = -(20 + 200 * case.rand(n)) * scale
    ref_r = -(20 + 200 * case.rand(n)) * scale
    pol_c = torch.clamp(ref_c + 6 * case.randn(n) * scale, max=-0.01)
    pol_r = torch.clamp(ref_r + 6 * case.randn(n) * scale, max=-0.01)
    return {"policy_chosen_logps": pol_c, "policy_rejected_logps": pol_r,
            "reference_chosen_logps": ref_c, "reference_rejected_logps": ref_r}


def _dpo_extreme(case):
    """|beta h| of thousands: the policy prefers (or rejects) a pair by 1e5 nats, or by a
    quarter of the dtype's largest value where 1e5 is not representable (float16: 16376;
    -1e5 would round to -inf there and the float64 reference of the rounded input is nan)."""
    inputs = dpo_inputs(case, 301)
    pc, pr = inputs["policy_chosen_logps"], inputs["policy_rejected_logps"]
    big = min(1e5, torch.finfo(pc.dtype).max / 4)
    pc[::3] = -big
    pr[1::3] = -big
    return {**inputs, "policy_chosen_logps": pc, "policy_rejected_logps": pr}


def _dpo_at_reference(case):
    """The first step of training: the policy is the reference, h = 0."""
    inputs = dpo_inputs(case, 100)
    return {**inputs, "policy_chosen_logps": inputs["reference_chosen_logps"].clone(),
            "policy_rejected_logps": inputs["reference_rejected_logps"].clone()}


DPO_EDGE_CASES = {
    "one_pair": lambda case: dpo_inputs(case, 1),
    "block_plus_one": lambda case: dpo_inputs(case, 4097),
    "extreme_log_ratios": _dpo_extreme,
    "policy_equals_reference": _dpo_at_reference,
}


# ---------------------------------------------------------------- ppo_clip
def _validate_ppo(log_probs, old_log_probs, advantages, mask, clip_eps, reduction):
    check_float("ppo_clip", log_probs=log_probs, old_log_probs=old_log_probs,
                advantages=advantages)
    if log_probs.dim() != 2:
        raise ValueError("ppo_clip: log_probs must be (N, T): per-token log-probs of N "
                         f"sequences, got shape {tuple(log_probs.shape)}")
    check_shape("ppo_clip", "old_log_probs", old_log_probs, log_probs.shape,
                "the shape of log_probs")
    if advantages.shape not in (log_probs.shape, log_probs.shape[:1]):
        raise ValueError(f"ppo_clip: advantages must have shape {tuple(log_probs.shape)} "
                         f"(one per token) or ({log_probs.shape[0]},) (one per sequence), got "
                         f"{tuple(advantages.shape)}")
    check_tensor("ppo_clip", mask=mask)
    check_device("ppo_clip", "log_probs", log_probs, mask=mask)
    check_mask("ppo_clip", "mask", mask, log_probs.shape, "1 on the response tokens")
    if mask.numel() and not bool((mask != 0).any(dim=1).all()):
        empty = int((~(mask != 0).any(dim=1)).nonzero()[0, 0])
        raise ValueError(f"ppo_clip: mask must have at least one 1 in every row (a "
                         f"sequence with no token has no mean loss), row {empty} has none")
    check_number("ppo_clip", "clip_eps", clip_eps, low=0.0, high=1.0, open_interval=True)
    check_reduction("ppo_clip", reduction)


def ppo_clip_reference(log_probs, old_log_probs, advantages, mask, clip_eps=0.2,
                       reduction="mean"):
    """Per token -min(rho A, clip(rho, 1-eps, 1+eps) A), rho = exp(log pi - log pi_old);
    per sequence the mean over its masked tokens. Masked-out tokens never enter (where,
    not a product): whatever they hold, they add 0 and get a gradient of 0."""
    _validate_ppo(log_probs, old_log_probs, advantages, mask, clip_eps, reduction)
    # 16-bit inputs are computed in float32: rounding rho to 8 or 11 bits would move
    # tokens across the clip's kinks, changing their gradient from -rho A to 0
    dtype = log_probs.dtype
    wide = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    keep = mask != 0
    adv = advantages.detach().to(wide)
    adv = torch.where(keep, adv if adv.dim() == 2 else adv[:, None], 0.0)
    log_ratio = torch.where(keep, log_probs.to(wide) - old_log_probs.detach().to(wide), 0.0)
    ratio = torch.exp(log_ratio)
    per_token = -torch.min(ratio * adv, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * adv)
    per_token = torch.where(keep, per_token, 0.0)
    per_sequence = per_token.sum(dim=1) / keep.sum(dim=1)
    return reduce_loss(per_sequence, reduction).to(dtype)


@jit
def _ppo_term(x, y, z, p0, p1):
    """x: log pi, y: log pi_old, z: advantage, p0: clip epsilon. Where the clipped term is
    the minimum and the ratio lies outside the range, the loss is flat in x."""
    ratio = tl.exp(x - y)
    clipped = tl.minimum(tl.maximum(ratio, 1.0 - p0), 1.0 + p0)
    unclipped_adv = ratio * z
    clipped_adv = clipped * z
    loss = -tl.minimum(unclipped_adv, clipped_adv)
    # d(-rho A)/dx = -rho A where the unclipped term is the minimum (or equals it)
    dx = tl.where(unclipped_adv <= clipped_adv, -unclipped_adv, 0.0)
    return loss, dx


_ppo_kernel = masked_tokens_loss(_ppo_term, name="ppo_clip")


def ppo_clip_triton(log_probs, old_log_probs, advantages, mask, clip_eps=0.2,
                    reduction="mean"):
    _validate_ppo(log_probs, old_log_probs, advantages, mask, clip_eps, reduction)
    return _ppo_kernel(log_probs, old_log_probs.detach(), advantages.detach(), mask.detach(),
                       reduction, p0=float(clip_eps))


def ppo_inputs(case, n=None, tokens=None, per_sequence=False):
    """A rollout: N sequences of T tokens, each a prompt (mask 0) then a response of at
    least one token (mask 1) then padding (0); the policy moved a little from the old
    one (log-ratios ~ N(0, 0.2^2), so some ratios fall outside a 0.2 clip range)."""
    n = case.n if n is None else n
    tokens = int(case.params.get("tokens", 37)) if tokens is None else tokens
    old = -3.0 * case.rand(n, tokens) - 0.01
    new = torch.clamp(old + 0.2 * case.randn(n, tokens), max=0.0)
    start = (case.rand(n, dtype=torch.float32) * tokens * 0.5).long()
    length = 1 + (case.rand(n, dtype=torch.float32) * (tokens - start)).long()
    pos = torch.arange(tokens, device=case.device)
    mask = (pos >= start[:, None]) & (pos < (start + length)[:, None])
    adv = case.randn(n) if per_sequence else case.randn(n, tokens)
    return {"log_probs": new, "old_log_probs": old, "advantages": adv, "mask": mask}


def _ppo_far_outside(case):
    """Log-ratios of +-3 (ratios 20 and 0.05), every sign of advantage."""
    inputs = ppo_inputs(case, 6, 53)
    sign = torch.where(case.rand(6, 53) < 0.5, 3.0, -3.0).to(case.dtype)
    return {**inputs, "log_probs": inputs["old_log_probs"] + sign}


def _ppo_single_token(case):
    inputs = ppo_inputs(case, 5, 29)
    mask = torch.zeros_like(inputs["mask"])
    rows = torch.arange(5, device=case.device)
    mask[rows, torch.tensor([0, 7, 28, 13, 3], device=case.device)] = True
    return {**inputs, "mask": mask}


def _ppo_garbage_padding(case):
    """Padding holds what a batched forward leaves there: -inf log-probs, NaN advantages."""
    inputs = ppo_inputs(case, 7, 41)
    pad = ~inputs["mask"]
    return {**inputs,
            "log_probs": inputs["log_probs"].masked_fill(pad, float("-inf")),
            "old_log_probs": inputs["old_log_probs"].masked_fill(pad, float("-inf")),
            "advantages": inputs["advantages"].masked_fill(pad, float("nan"))}


def _ppo_float_mask(case):
    inputs = ppo_inputs(case, 4, 30)
    return {**inputs, "mask": inputs["mask"].to(case.dtype)}


PPO_EDGE_CASES = {
    "one_token": lambda case: ppo_inputs(case, 1, 1),
    "long_sequences": lambda case: ppo_inputs(case, 3, 2500),
    "far_outside_clip": _ppo_far_outside,
    "single_token_per_row": _ppo_single_token,
    "per_sequence_advantages": lambda case: ppo_inputs(case, 9, 37, per_sequence=True),
    "garbage_padding": _ppo_garbage_padding,
    "float_mask": _ppo_float_mask,
}


# ---------------------------------------------------------------- q_td
def _validate_td(q, actions, rewards, dones, target_q, gamma, delta, reduction):
    check_float("q_td", q=q, rewards=rewards, target_q=target_q)
    if q.dim() != 2 or q.shape[1] == 0:
        raise ValueError("q_td: q must be (N, A): Q-values of A >= 1 actions for N "
                         f"transitions, got shape {tuple(q.shape)}")
    check_shape("q_td", "target_q", target_q, q.shape, "the target network's Q(s', .) "
                "for each transition")
    # devices before the value checks of actions and dones (which read them)
    check_tensor("q_td", actions=actions, dones=dones)
    check_device("q_td", "q", q, actions=actions, dones=dones)
    check_index("q_td", "actions", actions, q.shape[0], q.shape[1])
    check_shape("q_td", "rewards", rewards, q.shape[:1], "one reward per transition")
    check_mask("q_td", "dones", dones, q.shape[:1], "1 where the episode ended")
    check_number("q_td", "gamma", gamma, low=0.0, high=1.0)
    check_number("q_td", "delta", delta, low=0.0, high=float("inf"), open_interval=True)
    check_reduction("q_td", reduction)


def _td_target(rewards, dones, target_q, gamma):
    """r + gamma (1 - d) max_a' Q_target(s', a'), a constant."""
    best = target_q.detach().max(dim=1).values
    return (rewards + gamma * (1 - dones.to(best.dtype)) * best).detach()


def q_td_reference(q, actions, rewards, dones, target_q, gamma=0.99, delta=1.0,
                   reduction="mean"):
    """Huber(Q(s, a) - target): r^2/2 for |r| <= delta, delta (|r| - delta/2) beyond."""
    _validate_td(q, actions, rewards, dones, target_q, gamma, delta, reduction)
    q_sa = q.gather(1, actions.long()[:, None]).squeeze(1)
    r = q_sa - _td_target(rewards, dones, target_q, gamma)
    a = r.abs()
    loss = torch.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))
    return reduce_loss(loss, reduction)


def q_td_torch(q, actions, rewards, dones, target_q, gamma=0.99, delta=1.0, reduction="mean"):
    _validate_td(q, actions, rewards, dones, target_q, gamma, delta, reduction)
    q_sa = q.gather(1, actions.long()[:, None]).squeeze(1)
    return F.huber_loss(q_sa, _td_target(rewards, dones, target_q, gamma), delta=delta,
                        reduction=reduction)


@jit
def _huber_term(d, p0, p1):
    a = tl.abs(d)  # p0: delta
    inside = a <= p0
    loss = tl.where(inside, 0.5 * d * d, p0 * (a - 0.5 * p0))
    # d - d: NaN where d is NaN or inf, as the reference's gradient (0 * d through the
    # unselected 0.5 d^2 branch of its torch.where)
    return loss, tl.where(inside, d, tl.where(d > 0.0, p0, -p0) + (d - d))


_td_kernel = td_loss(_huber_term, name="q_td")


def q_td_triton(q, actions, rewards, dones, target_q, gamma=0.99, delta=1.0, reduction="mean"):
    _validate_td(q, actions, rewards, dones, target_q, gamma, delta, reduction)
    return _td_kernel(q, actions, rewards.to(q.dtype), dones.to(q.dtype), target_q,
                      reduction, gamma=float(gamma), p0=float(delta))


def td_inputs(case, n=None, actions=None):
    """A replay batch: Q-values of the online and target networks, rewards, 10% terminal
    transitions; TD errors fall on both sides of delta = 1."""
    n = case.n if n is None else n
    n_act = int(case.params.get("actions", 6)) if actions is None else actions
    q = case.randn(n, n_act) * 2
    return {"q": q, "actions": case.randint(0, n_act, n), "rewards": case.randn(n),
            "dones": (case.rand(n) < 0.1).to(case.dtype),
            "target_q": q + case.randn(n, n_act)}


def _td_large_errors(case):
    inputs = td_inputs(case, 200)
    return {**inputs, "rewards": inputs["rewards"] * 1e3}


def _td_all_terminal(case):
    inputs = td_inputs(case, 50)
    return {**inputs, "dones": torch.ones_like(inputs["dones"])}


def _td_other_dtypes(case):
    """Bool dones and int32 actions, as replay buffers often store them."""
    inputs = td_inputs(case, 77, 18)
    return {**inputs, "dones": inputs["dones"] != 0, "actions": inputs["actions"].to(torch.int32)}


TD_EDGE_CASES = {
    "one_transition": lambda case: td_inputs(case, 1, 1),
    "many_actions": lambda case: td_inputs(case, 5, 1500),
    "all_terminal": _td_all_terminal,
    "large_td_errors": _td_large_errors,
    "bool_dones_int32_actions": _td_other_dtypes,
}


# ---------------------------------------------------------------- registration
def _ppo_flops(inputs):
    n = inputs["log_probs"].numel()
    return {"forward": 8 * n, "backward": 3 * n, "full": 11 * n}


def _td_flops(inputs):
    q = inputs["q"]
    return {"forward": q.numel() + 8 * q.shape[0], "backward": q.numel(),
            "full": 2 * q.numel() + 8 * q.shape[0]}


def _td_bytes(inputs):
    """target_q read once, q gathered (one entry per row), the gradient of q written."""
    q = inputs["q"]
    small = sum(inputs[k].numel() * inputs[k].element_size()
                for k in ("actions", "rewards", "dones"))
    fwd = q.numel() * q.element_size() + q.shape[0] * q.element_size() + small
    return {"forward": fwd, "backward": fwd + q.numel() * q.element_size(),
            "full": fwd + q.numel() * q.element_size()}


PAIR_SIZES = {"quick": [1000, 4099], "default": [2**10, 2**14, 2**18],
              "large": [2**20, 2**22, 2**24]}


@hookimpl
def register_losses(register):
    register(LossSpec(
        name="reward_bt",
        family="rl",
        title="Bradley-Terry reward-model loss",
        formula=r"\frac{1}{n}\sum_{i=1}^{n} -\log\sigma\left(r^c_i - r^r_i - m_i\right)",
        description=(
            "Pairwise loss of a reward model on the rewards of the chosen and rejected "
            "responses of each pair: -logsigmoid(r_c - r_r - m), computed stably at any "
            "reward. The margin m (Llama 2) is a float option or a tensor broadcast to the "
            "rewards' shape (one per pair, or per reward head); it gets no gradient."),
        citation="Bradley & Terry (1952); Ouyang et al. (2022), InstructGPT; Touvron et al. "
                 "(2023), Llama 2 (margin)",
        reference=reward_bt_reference,
        make_inputs=bt_inputs,
        options={"reduction": "mean"},
        check_options=reductions() + [{"margin": 0.5}, {"margin": -1.0, "reduction": "none"}],
        grad_inputs=("chosen", "rejected"),
        sizes=PAIR_SIZES,
        x_name="pairs",
        flops=pointwise_flops(6, 4, key="chosen"),
        edge_cases=BT_EDGE_CASES,
    ))
    register(LossSpec(
        name="dpo",
        family="rl",
        title="Direct preference optimization",
        formula=(r"h_i = (\log\pi^c_i-\log\pi^c_{\mathrm{ref},i})"
                 r"-(\log\pi^r_i-\log\pi^r_{\mathrm{ref},i});\ "
                 r"\mathrm{sigmoid}: \frac{1}{n}\sum_i -(1-\varepsilon)\log\sigma(\beta h_i)"
                 r" - \varepsilon\log\sigma(-\beta h_i);\ "
                 r"\mathrm{ipo}: \frac{1}{n}\sum_i \left(h_i-\frac{1}{2\beta}\right)^2;\ "
                 r"\mathrm{hinge}: \frac{1}{n}\sum_i \max(0, 1-\beta h_i)"),
        description=(
            "DPO on sequence log-probs (sums over each response's tokens) of the policy and "
            "the frozen reference model, as TRL computes it: loss_type 'sigmoid' (DPO; "
            "label_smoothing eps in [0, 0.5] is conservative DPO), 'ipo' (h - 1/(2 beta))^2, "
            "'hinge' (SLiC) relu(1 - beta h). Gradients go to the policy log-probs only; "
            "label_smoothing with ipo or hinge is rejected rather than ignored."),
        citation="Rafailov et al. (2023), Direct Preference Optimization; Mitchell (2023), "
                 "cDPO; Azar et al. (2023), IPO; Zhao et al. (2023), SLiC-HF; TRL DPOTrainer",
        reference=dpo_reference,
        make_inputs=dpo_inputs,
        options={"beta": 0.1, "label_smoothing": 0.0, "loss_type": "sigmoid",
                 "reduction": "mean"},
        check_options=reductions() + [
            {"label_smoothing": 0.1}, {"label_smoothing": 0.25, "reduction": "none"},
            {"loss_type": "ipo"}, {"loss_type": "ipo", "reduction": "none", "beta": 0.5},
            {"loss_type": "hinge"}, {"loss_type": "hinge", "reduction": "sum", "beta": 0.05}],
        grad_inputs=("policy_chosen_logps", "policy_rejected_logps"),
        sizes=PAIR_SIZES,
        x_name="pairs",
        flops=pointwise_flops(10, 6, key="policy_chosen_logps"),
        edge_cases=DPO_EDGE_CASES,
    ))
    register(LossSpec(
        name="ppo_clip",
        input_domains={"mask": ("values", (0, 1))},
        family="rl",
        title="PPO clipped surrogate",
        formula=(r"\frac{1}{n}\sum_{i=1}^{n}\frac{\sum_t m_{it}\,\ell_{it}}{\sum_t m_{it}},\ "
                 r"\ell_{it} = -\min\left(\rho_{it}A_{it},\ \mathrm{clip}(\rho_{it},1-\epsilon,"
                 r"1+\epsilon)A_{it}\right),\ \rho_{it}=e^{\log\pi_{it}-\log\pi^{old}_{it}}"),
        description=(
            "PPO's policy loss on per-token log-probs (N, T) of the current and the "
            "rollout policy, advantages per token (N, T) or per sequence (N,) (GRPO), and "
            "a 0/1 token mask (N, T) with at least one 1 per row: each sequence's loss is "
            "the mean over its masked tokens (OpenRLHF's per-sequence normalization), "
            "`none` gives one loss per sequence. Gradients go to log_probs only; where the "
            "clipped term is the minimum and the ratio lies outside [1-eps, 1+eps] the "
            "gradient is exactly 0. Masked-out tokens contribute nothing, whatever values "
            "(even inf or NaN) they hold."),
        citation="Schulman et al. (2017), Proximal Policy Optimization Algorithms; "
                 "Ouyang et al. (2022); OpenRLHF PolicyLoss",
        reference=ppo_clip_reference,
        make_inputs=ppo_inputs,
        options={"clip_eps": 0.2, "reduction": "mean"},
        check_options=reductions() + [{"clip_eps": 0.05}, {"clip_eps": 0.3, "reduction": "none"}],
        grad_inputs=("log_probs",),
        sizes={"quick": [4, 9], "default": [64, 256, 1024], "large": [1024, 4096]},
        x_name="sequences",
        input_params={"quick": {"tokens": 37}, "default": {"tokens": 1024},
                      "large": {"tokens": 4096}},
        flops=_ppo_flops,
        edge_cases=PPO_EDGE_CASES,
    ))
    register(LossSpec(
        name="q_td",
        input_domains={
            "actions": ("index", lambda inputs: inputs["q"].shape[1]),
            "dones": ("values", (0, 1)),
        },
        family="rl",
        title="Q-learning TD loss (DQN)",
        formula=(r"\frac{1}{n}\sum_{i=1}^{n} h_\delta\left(Q(s_i,a_i) - \left[r_i + \gamma"
                 r"(1-d_i)\max_{a'}Q_{\mathrm{tgt}}(s'_i,a')\right]\right),\ "
                 r"h_\delta(u)=\begin{cases}\frac12 u^2 & |u|\le\delta\\ "
                 r"\delta(|u|-\frac12\delta) & \text{else}\end{cases}"),
        description=(
            "DQN's loss on a replay batch: Q-values (N, A) of the online network, the "
            "actions taken (integer (N,)), rewards (N,), done flags (N,) (bool or 0/1) and "
            "the target network's Q-values (N, A) at the next states. The target is "
            "detached: only q gets a gradient, at the action taken. Huber with `delta` "
            "(delta = 1 is DQN's smooth L1); `gamma` the discount."),
        citation="Mnih et al. (2015), Human-level control through deep reinforcement "
                 "learning; torch.nn.functional.huber_loss",
        reference=q_td_reference,
        make_inputs=td_inputs,
        options={"gamma": 0.99, "delta": 1.0, "reduction": "mean"},
        check_options=reductions() + [{"gamma": 0.5, "delta": 0.3},
                                      {"gamma": 0.0, "reduction": "none"},
                                      {"delta": 5.0, "reduction": "sum"}],
        grad_inputs=("q",),
        sizes={"quick": [16, 67], "default": [2**10, 2**14, 2**17],
               "large": [2**18, 2**20]},
        x_name="transitions",
        input_params={"quick": {"actions": 6}, "default": {"actions": 18},
                      "large": {"actions": 18}},
        bytes_moved=_td_bytes,
        flops=_td_flops,
        edge_cases=TD_EDGE_CASES,
    ))


@hookimpl
def register_implementations(register):
    triton_kw = {"backend": "triton", "devices": ("cuda",), "grad_in_forward": True,
                 "requires": ("triton",)}
    register("reward_bt", Impl(
        "torch", reward_bt_torch, kind="baseline", backend="torch",
        description="F.binary_cross_entropy_with_logits(h, 1)"))
    register("reward_bt", Impl(
        "triton", reward_bt_triton, bytes_model=streamed("chosen", "rejected"), **triton_kw,
        description="pointwise template; a margin tensor is its third operand"))
    register("dpo", Impl(
        "torch", dpo_torch, kind="baseline", backend="torch",
        description="F.binary_cross_entropy_with_logits (sigmoid, cDPO), F.mse_loss (ipo), "
                    "F.relu (hinge), in float32 for 16-bit log-probs"))
    register("dpo", Impl(
        "triton", dpo_triton,
        bytes_model=streamed("policy_chosen_logps", "policy_rejected_logps"), **triton_kw,
        description="pointwise template, the reference log-ratio as third operand"))
    register("ppo_clip", Impl(
        "triton", ppo_clip_triton, bytes_model=streamed("log_probs"), **triton_kw,
        description="masked-tokens template: mask counted, then each token read once, "
                    "gradient in the forward"))
    register("q_td", Impl(
        "torch", q_td_torch, kind="baseline", backend="torch",
        description="gather, max over target_q, F.huber_loss"))
    register("q_td", Impl(
        "triton", q_td_triton, bytes_model=streamed("q"), **triton_kw,
        description="TD template: target_q read once (row max), q gathered, gradient of q "
                    "written once in the forward"))
