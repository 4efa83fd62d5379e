"""Peer adapters for the ``rl`` family's preference losses: Liger-Kernel's chunked
preference losses applied to sequence log-probabilities (``dpo``, ``orpo``, ``cpo``,
``simpo``, ``kto``). Registered by :mod:`lossreg_plugins.peers`; no hooks here.

Liger's fused ORPO / CPO add the chosen sequence's NLL from their own cross-entropy over
the hidden states; on sequence log-probs that term is ``-log P(y_w)``, added here."""

from __future__ import annotations

import torch

from ._peers_common import _unsupported, _upcast

# ---------------------------------------------------------------- dpo
def dpo_liger(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
              reference_rejected_logps, beta=0.1, label_smoothing=0.0, loss_type="sigmoid",
              reduction="mean"):
    """The loss Liger's chunked DPO applies to the sequence log-probs it computes."""
    from lossreg_plugins.rl import _validate_dpo

    _validate_dpo(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                  reference_rejected_logps, beta, label_smoothing, loss_type, reduction)
    if loss_type == "ipo":
        raise _unsupported("dpo", "liger", "loss_type='ipo'",
                           "Liger's DPO does not implement IPO")
    if label_smoothing:
        raise _unsupported("dpo", "liger", f"label_smoothing={label_smoothing}",
                           "Liger's sigmoid loss has no conservative-DPO smoothing (its "
                           "'robust' loss is a different, debiased formula)")
    if reduction == "none":
        raise _unsupported("dpo", "liger", "reduction='none'",
                           "Liger's DPO returns only the reduced loss")
    from liger_kernel.chunked_loss.dpo_loss import LigerFusedLinearDPOFunction

    dtype = policy_chosen_logps.dtype
    c, r, rc, rr = (_upcast(t).reshape(-1) for t in (
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps.detach(),
        reference_rejected_logps.detach()))
    # Liger divides the summed loss by len(full_target) // 2, the pairs of the whole
    # batch (its chunks see part of it): only the length is read, a meta tensor will do.
    pairs = c.numel() if reduction == "mean" else 1
    full_target = torch.empty(2 * pairs, device="meta")
    out = LigerFusedLinearDPOFunction.preference_loss_fn(
        c, r, full_target, rc, rr, beta=float(beta), loss_type=loss_type)
    loss = out[0] if isinstance(out, tuple) else out
    return loss.to(dtype)


# ---------------------------------------------------------------- preference losses
def _pair_loss(loss, pc, pr, reduction, fn, **kwargs):
    """Liger's chunked preference_loss_fn on sequence log-probs: it divides the summed
    loss by len(full_target) // 2 (the pairs), of which only the length is read."""
    if reduction == "none":
        raise _unsupported(loss, "liger", "reduction='none'",
                           "Liger's preference losses return only the reduced loss")
    c, r = _upcast(pc).reshape(-1), _upcast(pr).reshape(-1)
    pairs = c.numel() if reduction == "mean" else 1
    out = fn(c, r, torch.empty(2 * pairs, device="meta"), **kwargs)
    return out[0] if isinstance(out, tuple) else out


def orpo_liger(policy_chosen_logps, policy_rejected_logps, beta=0.1, reduction="mean"):
    """Liger's odds-ratio term plus the chosen NLL (-log P(y_w) = -avg log-prob), which
    Liger's fused ORPO adds from its own cross-entropy."""
    from lossreg_plugins.preference import _validate_orpo

    _validate_orpo(policy_chosen_logps, policy_rejected_logps, beta, reduction)
    from liger_kernel.chunked_loss.orpo_loss import LigerFusedLinearORPOFunction

    odds = _pair_loss("orpo", policy_chosen_logps, policy_rejected_logps, reduction,
                      LigerFusedLinearORPOFunction.preference_loss_fn, beta=float(beta))
    nll = -_upcast(policy_chosen_logps)
    nll = nll.mean() if reduction == "mean" else nll.sum()
    return (odds + nll).to(policy_chosen_logps.dtype)


def cpo_liger(policy_chosen_logps, policy_rejected_logps, beta=0.1, alpha=1.0,
              reduction="mean"):
    """Liger's CPO preference term plus alpha times the chosen NLL (Liger's fused CPO
    adds that from its own cross-entropy)."""
    from lossreg_plugins.preference import _validate_cpo

    _validate_cpo(policy_chosen_logps, policy_rejected_logps, beta, alpha, reduction)
    from liger_kernel.chunked_loss.cpo_loss import LigerFusedLinearCPOFunction

    pref = _pair_loss("cpo", policy_chosen_logps, policy_rejected_logps, reduction,
                      LigerFusedLinearCPOFunction.preference_loss_fn, beta=float(beta))
    nll = -_upcast(policy_chosen_logps)
    nll = nll.mean() if reduction == "mean" else nll.sum()
    return (pref + float(alpha) * nll).to(policy_chosen_logps.dtype)


def simpo_liger(policy_chosen_logps, policy_rejected_logps, beta=2.0, gamma=0.5,
                reduction="mean"):
    from lossreg_plugins.preference import _validate_simpo

    _validate_simpo(policy_chosen_logps, policy_rejected_logps, beta, gamma, reduction)
    from liger_kernel.chunked_loss.simpo_loss import LigerFusedLinearSimPOFunction

    out = _pair_loss("simpo", policy_chosen_logps, policy_rejected_logps, reduction,
                     LigerFusedLinearSimPOFunction.preference_loss_fn, beta=float(beta),
                     gamma=float(gamma))
    return out.to(policy_chosen_logps.dtype)


def kto_liger(policy_logps, reference_logps, desirable, policy_kl_logps=None,
              reference_kl_logps=None, beta=0.1, desirable_weight=1.0,
              undesirable_weight=1.0, reduction="mean"):
    """Liger's KTO loss on sequence log-probs, with our (detached) reference point z0 as
    its ``kl``; it has no desirable / undesirable weights."""
    from lossreg_plugins.preference_kto import _validate_kto, kto_reference_point

    _validate_kto(policy_logps, reference_logps, desirable, policy_kl_logps,
                  reference_kl_logps, beta, desirable_weight, undesirable_weight, reduction)
    if float(desirable_weight) != 1.0 or float(undesirable_weight) != 1.0:
        raise _unsupported("kto", "liger", "desirable_weight / undesirable_weight other "
                           "than 1", "Liger's KTO loss weighs every sequence alike")
    if reduction == "none":
        raise _unsupported("kto", "liger", "reduction='none'",
                           "Liger's KTO returns only the reduced loss")
    from liger_kernel.chunked_loss.kto_loss import LigerFusedLinearKTOFunction

    pol = _upcast(policy_logps)
    z0 = kto_reference_point(policy_kl_logps, reference_kl_logps, pol)
    n = pol.numel() if reduction == "mean" else 1
    out = LigerFusedLinearKTOFunction.preference_loss_fn(
        pol, desirable != 0, torch.empty(n, device="meta"),
        ref_log_prob_chunk=_upcast(reference_logps.detach()), beta=float(beta), kl=z0)
    loss = out[0] if isinstance(out, tuple) else out
    return loss.to(policy_logps.dtype)


# ---------------------------------------------------------------- grpo
def grpo_liger(log_probs, old_log_probs, rewards, mask, ref_log_probs=None, group_size=4,
               beta=0.04, epsilon_low=0.2, epsilon_high=0.2, loss_type="grpo",
               max_completion_length=None, num_tokens=None, scale_rewards=True,
               reduction="mean"):
    """The loss Liger's chunked GRPO applies to the per-token log-probs it computes
    (``ppo_loss_fn``), with our advantages; 16-bit inputs in float32 as our reference."""
    from lossreg_plugins.grpo import _options, _validate, advantages, divisor

    from ._peers_chunked import grpo_options, no_rows

    o = _options(group_size, beta, epsilon_low, epsilon_high, loss_type,
                 max_completion_length, num_tokens, scale_rewards)
    _validate(log_probs, old_log_probs, ref_log_probs, rewards, mask, o, reduction)
    if reduction == "none":
        raise _unsupported("grpo", "liger", "reduction='none'",
                           "Liger's GRPO returns only the reduced loss")
    from liger_kernel.chunked_loss.grpo_loss import LigerFusedLinearGRPOFunction

    keep = mask != 0
    if not keep.shape[0]:
        return no_rows(reduction, divisor(keep, o), log_probs.dtype, log_probs)
    lp = _upcast(log_probs)
    m = keep.to(lp.dtype)
    ref = _upcast(ref_log_probs.detach()) if beta and ref_log_probs is not None else None
    loss, _ = LigerFusedLinearGRPOFunction.ppo_loss_fn(
        lp, m, advantages(rewards.to(lp.dtype), group_size, scale_rewards), m,
        ref_per_token_logps=ref, old_per_token_logps=_upcast(old_log_probs.detach()),
        num_items_in_batch=num_tokens if loss_type == "dapo" else None,
        **grpo_options(o, keep))
    if reduction == "sum":
        loss = loss * divisor(keep, o)
    return loss.to(log_probs.dtype)
