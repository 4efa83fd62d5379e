"""KTO (Kahneman-Tversky optimization) on unpaired sequence log-probs: the reference,
torch and Triton implementations and the spec; :mod:`lossreg_plugins.preference`
registers it with the pairwise preference losses (this module has no hooks)."""

from __future__ import annotations

import torch

from lossreg import LossSpec
from lossreg.kernels import preference as kernels
from lossreg.validate import (
    check_device,
    check_float,
    check_mask,
    check_number,
    check_reduction,
    check_shape,
    check_tensor,
)

from ._common import acc_dtype, pointwise_flops, reduce_loss, reductions
from .rl import PAIR_SIZES


def _wide(t):
    return acc_dtype(t.dtype)

def _validate_kto(pol, ref, desirable, pkl, rkl, beta, wd, wu, reduction):
    check_float("kto", policy_logps=pol, reference_logps=ref)
    check_shape("kto", "reference_logps", ref, pol.shape, "the shape of policy_logps")
    if pol.dim() != 1:
        raise ValueError(f"kto: policy_logps must be 1-D (one log-prob per sequence), got "
                         f"shape {tuple(pol.shape)}")
    if (pkl is None) != (rkl is None):
        raise ValueError("kto: policy_kl_logps and reference_kl_logps must be given together "
                         "(or both left out for z0 = 0)")
    if pkl is not None:
        check_float("kto", policy_logps=pol, policy_kl_logps=pkl, reference_kl_logps=rkl)
        if pkl.dim() != 1:
            raise ValueError(f"kto: policy_kl_logps must be 1-D (log-probs of mismatched "
                             f"completions), got shape {tuple(pkl.shape)}")
        check_shape("kto", "reference_kl_logps", rkl, pkl.shape, "the shape of policy_kl_logps")
    check_tensor("kto", desirable=desirable)
    check_device("kto", "policy_logps", pol, desirable=desirable)
    check_mask("kto", "desirable", desirable, pol.shape, "1 for a desirable sequence")
    check_number("kto", "beta", beta, low=0.0, high=None, low_open=True)
    check_number("kto", "desirable_weight", wd, low=0.0)
    check_number("kto", "undesirable_weight", wu, low=0.0)
    check_reduction("kto", reduction)


def kto_reference_point(policy_kl_logps, reference_kl_logps, like):
    """z0 = max(0, mean(log pi - log pi_ref) over mismatched pairs), detached; 0 without."""
    if policy_kl_logps is None:
        return torch.zeros((), dtype=like.dtype, device=like.device)
    kl = (policy_kl_logps.detach().to(like.dtype) - reference_kl_logps.detach().to(like.dtype))
    return kl.mean().clamp(min=0)


def kto_reference(policy_logps, reference_logps, desirable, policy_kl_logps=None,
                  reference_kl_logps=None, beta=0.1, desirable_weight=1.0,
                  undesirable_weight=1.0, reduction="mean"):
    """r = log pi - log pi_ref; desirable: lambda_D (1 - sigma(beta (r - z0))),
    undesirable: lambda_U (1 - sigma(beta (z0 - r)))."""
    _validate_kto(policy_logps, reference_logps, desirable, policy_kl_logps,
                  reference_kl_logps, beta, desirable_weight, undesirable_weight, reduction)
    z0 = kto_reference_point(policy_kl_logps, reference_kl_logps, policy_logps)
    r = policy_logps - reference_logps.detach()
    # 1 - sigma(v) written as sigma(-v): the same function, without the cancellation
    # that costs float64 its digits where sigma(v) is near 1
    good = desirable_weight * torch.sigmoid(-beta * (r - z0))
    bad = undesirable_weight * torch.sigmoid(-beta * (z0 - r))
    return reduce_loss(torch.where(desirable != 0, good, bad), reduction)


def kto_torch(policy_logps, reference_logps, desirable, policy_kl_logps=None,
              reference_kl_logps=None, beta=0.1, desirable_weight=1.0,
              undesirable_weight=1.0, reduction="mean"):
    """1 - sigma(v) as sigma(-v) (no cancellation where sigma(v) is near 1), the sign and
    the weight of each sequence as one signed factor."""
    _validate_kto(policy_logps, reference_logps, desirable, policy_kl_logps,
                  reference_kl_logps, beta, desirable_weight, undesirable_weight, reduction)
    dtype, wide = policy_logps.dtype, _wide(policy_logps)
    z0 = kto_reference_point(policy_kl_logps, reference_kl_logps,
                             policy_logps.detach().to(wide))
    r = policy_logps.to(wide) - reference_logps.detach().to(wide) - z0
    good = desirable != 0
    sign = torch.where(good, 1.0, -1.0).to(wide)
    # full_like: Python floats in torch.where would pass through float32 first
    weight = torch.where(good, torch.full_like(r, desirable_weight),
                         torch.full_like(r, undesirable_weight))
    return reduce_loss(weight * torch.sigmoid(-sign * beta * r), reduction).to(dtype)


def kto_triton(policy_logps, reference_logps, desirable, policy_kl_logps=None,
               reference_kl_logps=None, beta=0.1, desirable_weight=1.0,
               undesirable_weight=1.0, reduction="mean"):
    """The reference point is folded into the reference log-prob, the label and weight into
    one signed operand: a single pointwise launch, no host sync."""
    _validate_kto(policy_logps, reference_logps, desirable, policy_kl_logps,
                  reference_kl_logps, beta, desirable_weight, undesirable_weight, reduction)
    wide = _wide(policy_logps)
    z0 = kto_reference_point(policy_kl_logps, reference_kl_logps,
                             policy_logps.detach().to(wide))
    shifted = reference_logps.detach().to(wide) + z0
    good = desirable != 0
    signed = torch.where(good, torch.full_like(shifted, float(desirable_weight)),
                         torch.full_like(shifted, -float(undesirable_weight)))
    return kernels.KTO(policy_logps, shifted, reduction, p0=float(beta), z=signed)


def kto_inputs(case, n=None, kl=None):
    """Unpaired sequence log-probs of the policy and the reference, 60% desirable; the
    KL batch (mismatched prompt/completion pairs) has its own size."""
    n = case.n if n is None else n
    m = n // 2 + 1 if kl is None else kl
    ref = -(20 + 200 * case.rand(n))
    pol = torch.clamp(ref + 6 * case.randn(n), max=-0.01)
    ref_kl = -(20 + 200 * case.rand(m))
    pol_kl = torch.clamp(ref_kl + 3 * case.randn(m) + 1.0, max=-0.01)
    return {"policy_logps": pol, "reference_logps": ref,
            "desirable": case.rand(n, dtype=torch.float32) < 0.6,
            "policy_kl_logps": pol_kl, "reference_kl_logps": ref_kl}


def _kto_far(case):
    """|beta (r - z0)| of 50: the policy is 500 nats from the reference."""
    inputs = kto_inputs(case, 200)
    pol, ref = inputs["policy_logps"], inputs["reference_logps"]
    pol[::2], pol[1::2] = ref[::2] + 500, ref[1::2] - 500
    return inputs


def _kto_negative_kl(case):
    """The KL estimate is negative: z0 clamps to 0."""
    inputs = kto_inputs(case, 50)
    return {**inputs, "policy_kl_logps": inputs["reference_kl_logps"] - 5.0}


def _kto_no_kl(case):
    inputs = kto_inputs(case, 40)
    del inputs["policy_kl_logps"], inputs["reference_kl_logps"]
    return inputs


def _kto_all(value):
    def make(case):
        inputs = kto_inputs(case, 33)
        return {**inputs, "desirable": torch.full_like(inputs["desirable"], value)}

    return make


KTO_EDGE_CASES = {
    "one_sequence": lambda case: kto_inputs(case, 1, 1),
    "block_plus_one": lambda case: kto_inputs(case, 4097),
    "large_margins": _kto_far,
    "ties_policy_equals_reference": lambda case: {
        **(inputs := kto_inputs(case, 60)), "policy_logps": inputs["reference_logps"].clone()},
    "negative_kl": _kto_negative_kl,
    "no_kl_inputs": _kto_no_kl,
    "all_desirable": _kto_all(True),
    "all_undesirable": _kto_all(False),
    "float_labels": lambda case: {**(inputs := kto_inputs(case, 21)),
                                  "desirable": inputs["desirable"].to(case.dtype)},
}


def kto_spec():
    return LossSpec(
        name="kto", family="rl", title="Kahneman-Tversky optimization",
        formula=(r"r_i = \log\frac{\pi(y_i|x_i)}{\pi_{\mathrm{ref}}(y_i|x_i)},\ "
                 r"z_0 = \max\left(0, \frac{1}{m}\sum_j \log\frac{\pi(y'_j|x'_j)}"
                 r"{\pi_{\mathrm{ref}}(y'_j|x'_j)}\right),\ \frac{1}{n}\sum_i "
                 r"\lambda_i\left(1-\sigma(s_i\beta(r_i-z_0))\right),\ "
                 r"(s_i,\lambda_i) = (1,\lambda_D)\ \mathrm{desirable},\ (-1,\lambda_U)\ "
                 r"\mathrm{undesirable}"),
        description=(
            "KTO on unpaired sequence log-probs of the policy and the frozen reference, a "
            "desirable flag per sequence (bool or 0/1), and optionally the log-probs of a "
            "KL batch of mismatched prompt/completion pairs: the reference point z0 is "
            "their mean log-ratio clamped at 0 and detached (no KL batch: z0 = 0). "
            "Gradients go to policy_logps only. beta 0.1, lambda_D = lambda_U = 1."),
        citation="Ethayarajh et al. (2024), KTO: Model Alignment as Prospect Theoretic "
                 "Optimization; TRL KTOTrainer",
        reference=kto_reference, make_inputs=kto_inputs,
        options={"beta": 0.1, "desirable_weight": 1.0, "undesirable_weight": 1.0,
                 "reduction": "mean"},
        check_options=reductions() + [
            {"beta": 0.5, "desirable_weight": 1.33},
            {"undesirable_weight": 0.75, "reduction": "none"}],
        grad_inputs=("policy_logps",), sizes=PAIR_SIZES, x_name="sequences",
        input_domains={"desirable": ("values", (0, 1))},
        flops=pointwise_flops(12, 6, key="policy_logps"), edge_cases=KTO_EDGE_CASES)
