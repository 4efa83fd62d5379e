"""Peer adapters for the fused-linear preference losses and ``fused_linear_grpo``:
Liger-Kernel's chunked losses (``liger_kernel.chunked_loss``: plain PyTorch, one chunk
of sequences at a time through ``torch.func``, gradients in the forward). Registered by
:mod:`lossreg_plugins.peers`; no hooks here.

Every adapter runs Liger eagerly (``compiled=False``: torch.compile costs minutes on a
CPU and computes the same function) with its default chunk of one pair (or sequence)
and maps the conventions (Liger 0.8):

* Inputs: Liger takes ours as they are, chosen rows first, then rejected, and an
  lm-head weight (V, H); the reference model's states and weight as ``ref_input`` /
  ``ref_weight``.
* Sequence log-probs: Liger sums them (``average_log_prob=False``) for DPO, CPO and
  KTO and averages them per token for ORPO and SimPO, as our heads do.
* Means: Liger divides the summed pair losses by the pairs (KTO: the sequences, GRPO:
  what its ``loss_type`` says), as ours; ``sum`` multiplies that back and
  ``reduction='none'`` is refused (Liger returns one scalar).
* NLL terms: Liger adds ``alpha`` x the chosen tokens' NLL summed over the batch and
  divided by their number. CPO's NLL is the chosen sequence log-prob averaged over
  pairs, so Liger's alpha is ours x tokens / pairs. ORPO's is the per-token average of
  each chosen sequence averaged over pairs: the same as Liger's only when every chosen
  response has as many tokens, so other batches are refused.
* KTO's reference point: ours max(0, kl), detached, passed as Liger's ``kl``.
"""

from __future__ import annotations

import torch

from ._peers_common import _unsupported

IMPL = "liger"


def _chunked(cls: str):
    import liger_kernel.chunked_loss as chunked

    return getattr(chunked, cls)


def _validated(loss: str, a: dict) -> None:
    """Our checks of a call's inputs and options (the reference's)."""
    from . import _fused_linear as fl
    from .fused_preference import HEADS, _check_kto_aux

    head, defaults = HEADS[loss]
    h, t = a["hidden"], a["target"]
    aux = {k: a[k] for k in ("desirable", "kl") if k in a}
    fl.validate(head, h, a["weight"], t, a.get("ref_hidden"), a.get("ref_weight"),
                a["ignore_index"], a["reduction"], **aux)
    if aux:
        _check_kto_aux(loss, h, aux["desirable"], aux["kl"])
    # the per-unit loss checks the options: run it on no units
    none = h.new_zeros(head.groups, 0, t.shape[1], dtype=fl.acc_dtype(h.dtype))
    head.unit_loss(none, none, none.bool(), {k: v[:0] if torch.is_tensor(v) and v.dim() else v
                                             for k, v in aux.items()},
                   {k: a[k] for k in defaults})


def _reduced(out, reduction: str, divisor, dtype):
    """Liger's mean (its output's first item) in our reduction and dtype."""
    out = out[0] if isinstance(out, tuple) else out
    return (out * divisor if reduction == "sum" else out).to(dtype)


def no_rows(reduction: str, divisor, dtype, *tensors):
    """No rows: torch's convention (sum 0, mean 0 / our divisor: NaN, or 0 where that is
    a clamped count) with a zero gradient, without calling Liger (its chunking needs a
    row)."""
    zero = sum(t.sum() for t in tensors) * 0
    return (zero / divisor if reduction == "mean" else zero).to(dtype)


def _no_none(loss: str, reduction: str) -> None:
    if reduction == "none":
        raise _unsupported(loss, IMPL, "reduction='none'",
                           "Liger's chunked losses return only the reduced loss")


def _run(loss: str, a: dict, cls: str, **liger):
    """The shared template: validate, refuse 'none', call Liger's loss module on our
    tensors (its own keyword names), reduce. ``liger``: the module's options."""
    _no_none(loss, a["reduction"])
    h, t = a["hidden"], a["target"]
    extra = {}
    if "ref_hidden" in a:
        extra = {"ref_input": a["ref_hidden"].detach(), "ref_weight": a["ref_weight"].detach()}
    if "desirable" in a:  # KTO: its labels and our reference point z0 = max(0, kl)
        kl = a["kl"]
        extra.update(preference_labels=a["desirable"] != 0,
                     kl=None if kl is None else kl.detach().float().clamp(min=0))
    units = t.shape[0] // (1 if "desirable" in a else 2)
    if not units:
        return no_rows(a["reduction"], units, h.dtype, h, a["weight"])
    fn = _chunked(cls)(ignore_index=int(a["ignore_index"]), compiled=False, **liger)
    out = fn(_input=h, lin_weight=a["weight"], target=t.long(), **extra)
    return _reduced(out, a["reduction"], units, h.dtype)


# ---------------------------------------------------------------- preference
def dpo_liger(hidden, weight, target, ref_hidden, ref_weight, beta=0.1, label_smoothing=0.0,
              loss_type="sigmoid", ignore_index=-100, reduction="mean"):
    a = locals()
    _validated(loss := "fused_linear_dpo", a)
    if loss_type == "ipo":
        raise _unsupported(loss, IMPL, "loss_type='ipo'",
                           "Liger's chunked DPO does not implement IPO")
    if label_smoothing:
        raise _unsupported(loss, IMPL, f"label_smoothing={label_smoothing}",
                           "Liger's sigmoid loss has no conservative-DPO smoothing (its "
                           "'robust' loss is a different, debiased formula)")
    return _run(loss, a, "LigerFusedLinearDPOLoss", beta=float(beta), loss_type=loss_type,
                use_ref_model=True, average_log_prob=False, compute_nll_loss=False)


def orpo_liger(hidden, weight, target, beta=0.1, ignore_index=-100, reduction="mean"):
    a = locals()
    _validated(loss := "fused_linear_orpo", a)
    chosen = (target[: target.shape[0] // 2] != ignore_index).sum(-1)
    if chosen.numel() and bool((chosen != chosen[0]).any()):
        raise _unsupported(loss, IMPL, "chosen responses of different lengths",
                           "Liger's NLL term is the mean over all chosen tokens of the "
                           "batch, ours (ORPO's) the mean over pairs of each response's "
                           "per-token average: equal only for equal lengths")
    return _run(loss, a, "LigerFusedLinearORPOLoss", beta=float(beta), compute_nll_loss=True)


def cpo_liger(hidden, weight, target, beta=0.1, alpha=1.0, ignore_index=-100,
              reduction="mean"):
    a = locals()
    _validated(loss := "fused_linear_cpo", a)
    pairs = target.shape[0] // 2
    tokens = int((target[:pairs] != ignore_index).sum())
    # Liger: alpha' x (chosen NLL summed) / tokens; ours: alpha x (the same sum) / pairs
    return _run(loss, a, "LigerFusedLinearCPOLoss", beta=float(beta),
                alpha=float(alpha) * tokens / max(pairs, 1), compute_nll_loss=bool(alpha),
                average_log_prob=False)


def simpo_liger(hidden, weight, target, beta=2.0, gamma=0.5, ignore_index=-100,
                reduction="mean"):
    a = locals()
    _validated(loss := "fused_linear_simpo", a)
    return _run(loss, a, "LigerFusedLinearSimPOLoss", beta=float(beta), gamma=float(gamma),
                compute_nll_loss=False)


def kto_liger(hidden, weight, target, ref_hidden, ref_weight, desirable, kl=None, beta=0.1,
              desirable_weight=1.0, undesirable_weight=1.0, ignore_index=-100,
              reduction="mean"):
    a = locals()
    _validated(loss := "fused_linear_kto", a)
    if float(desirable_weight) != 1.0 or float(undesirable_weight) != 1.0:
        raise _unsupported(loss, IMPL, "desirable_weight / undesirable_weight other than 1",
                           "Liger's KTO loss weighs every sequence alike")
    return _run(loss, a, "LigerFusedLinearKTOLoss", beta=float(beta), use_ref_model=True,
                average_log_prob=False)


# ---------------------------------------------------------------- grpo
def grpo_options(o: dict, keep: torch.Tensor) -> dict:
    """Liger's GRPO options for ours ``o`` (its loss types of the same names, token-level
    importance sampling, no delta clamp); ``keep`` (N, T) the completion tokens."""
    return dict(beta=float(o["beta"]), epsilon_low=float(o["epsilon_low"]),
                epsilon_high=float(o["epsilon_high"]), loss_type=o["loss_type"],
                max_completion_length=o["max_completion_length"] or keep.shape[-1],
                importance_sampling_level="token")


def grpo_liger(hidden, weight, target, old_log_probs, rewards, ref_log_probs=None,
               group_size=4, beta=0.04, epsilon_low=0.2, epsilon_high=0.2, loss_type="grpo",
               max_completion_length=None, num_tokens=None, scale_rewards=True,
               ignore_index=-100, reduction="mean"):
    """Liger's LigerFusedLinearGRPOLoss with our group-normalized advantages, the given
    rollout (``old``) and reference per-token log-probs, and our ``num_tokens`` as its
    ``num_items_in_batch`` (dapo)."""
    from .grpo import _options, advantages, divisor, validate_fused

    loss = "fused_linear_grpo"
    o = _options(group_size, beta, epsilon_low, epsilon_high, loss_type,
                 max_completion_length, num_tokens, scale_rewards)
    validate_fused(hidden, weight, target, old_log_probs, rewards, ref_log_probs, o,
                   ignore_index, reduction)
    _no_none(loss, reduction)
    keep = target != ignore_index
    if not keep.shape[0]:
        return no_rows(reduction, divisor(keep, o), hidden.dtype, hidden, weight)
    use_ref = bool(beta) and ref_log_probs is not None
    fn = _chunked("LigerFusedLinearGRPOLoss")(compiled=False, use_ref_model=use_ref,
                                              **grpo_options(o, keep))
    out = fn(_input=hidden, lin_weight=weight, selected_token_ids=torch.where(keep, target, 0).long(),
             attention_mask=keep.float(),
             advantages=advantages(rewards.float(), group_size, scale_rewards),
             ref_per_token_logps=ref_log_probs.detach().float() if use_ref else None,
             old_per_token_logps=old_log_probs.detach().float(),
             num_items_in_batch=num_tokens if loss_type == "dapo" else None)
    return _reduced(out, reduction, divisor(keep, o), hidden.dtype)
