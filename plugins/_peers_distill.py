"""Peer adapters for the distillation divergences: Liger-Kernel's JSD, KL-div, TVD and
fused linear JSD kernels (``kl_distillation``, ``fused_linear_distillation``, ``jsd``,
``tvd``). Registered by :mod:`lossreg_plugins.peers`; no hooks here.

Our kl_distillation multiplies the divergence by T^2; Liger's does not, so the adapters
do (jsd and tvd have no T^2 factor). Liger's means divide by the rows; ``sum``
multiplies that back."""

from __future__ import annotations

import torch

from ._peers_common import _scale_reduced, _unsupported, _upcast

# ---------------------------------------------------------------- distillation
#: Liger's generalized-JSD beta for each of our directions (None: our beta).
_JSD_BETA = {"forward": 0.0, "reverse": 1.0, "jsd": None}


def _liger_beta(direction, beta):
    b = _JSD_BETA[direction]
    return float(beta) if b is None else b


def kl_liger(student, teacher, temperature=1.0, direction="forward", beta=0.5,
             reduction="mean"):
    """Liger's JSD kernel on log-softmax(x / T): beta 0 / 1 are the KL directions."""
    from lossreg_plugins.transformers.distill import validate_kl

    validate_kl("kl_distillation", student, teacher, temperature, direction, beta, reduction)
    if reduction == "none":
        raise _unsupported("kl_distillation", "liger", "reduction='none'",
                           "Liger's JSD returns only the mean over rows")
    from liger_kernel.transformers.functional import liger_jsd

    logq = torch.log_softmax(_upcast(student) / temperature, dim=-1)
    logp = torch.log_softmax(_upcast(teacher.detach()) / temperature, dim=-1)
    out = liger_jsd(logq, logp, beta=_liger_beta(direction, beta)) * temperature**2
    return _scale_reduced(out, reduction, student.shape[0], "kl_distillation",
                          "liger").to(student.dtype)


def kl_liger_kl_div(student, teacher, temperature=1.0, direction="forward", beta=0.5,
                    reduction="mean"):
    """Liger's KL-div kernel: KL(target || input) with the gradient to the input only."""
    from lossreg_plugins.transformers.distill import validate_kl

    validate_kl("kl_distillation", student, teacher, temperature, direction, beta, reduction)
    if direction != "forward":
        raise _unsupported("kl_distillation", "liger_kl_div", f"direction={direction!r}",
                           "Liger's KL-div differentiates its input (the student) only in "
                           "KL(teacher || student); use the liger implementation")
    from liger_kernel.transformers.functional import liger_kl_div

    logq = torch.log_softmax(_upcast(student) / temperature, dim=-1)
    logp = torch.log_softmax(_upcast(teacher.detach()) / temperature, dim=-1)
    out = liger_kl_div(logq, logp, log_target=True,
                       reduction={"mean": "batchmean"}.get(reduction, reduction))
    if reduction == "none":
        out = out.sum(-1)  # Liger's 'none' is per element (N, V); ours per row
    return (out * temperature**2).to(student.dtype)


def _validate_fld(hs, ws, ht, wt, temperature, direction, beta, reduction):
    from lossreg_plugins.transformers.distill import validate_fld

    validate_fld(hs, ws, ht, wt, temperature, direction, beta, reduction)


def fld_liger(student_hidden, student_weight, teacher_hidden, teacher_weight, temperature=1.0,
              direction="forward", beta=0.5, reduction="mean"):
    _validate_fld(student_hidden, student_weight, teacher_hidden, teacher_weight, temperature,
                  direction, beta, reduction)
    if reduction == "none":
        raise _unsupported("fused_linear_distillation", "liger", "reduction='none'",
                           "Liger's fused linear JSD returns only the mean over rows")
    from liger_kernel.transformers.functional import liger_fused_linear_jsd

    out = liger_fused_linear_jsd(student_hidden, student_weight, teacher_hidden.detach(),
                                 teacher_weight.detach(), jsd_beta=_liger_beta(direction, beta),
                                 temperature=float(temperature))
    out = _scale_reduced(out * temperature**2, reduction, student_hidden.shape[0],
                         "fused_linear_distillation", "liger")
    return out.to(student_hidden.dtype)


def fld_liger_chunked(student_hidden, student_weight, teacher_hidden, teacher_weight,
                      temperature=1.0, direction="forward", beta=0.5, reduction="mean"):
    """Liger's chunked (plain PyTorch) fused linear JSD, soft loss only, eager
    (``compiled=False``): no hard labels, so every row counts.

    Registered for float32 only. Liger computes the logits, the log-softmax, the
    mixture's logsumexp and the KL terms in the input dtype (only its hard CE loss
    upcasts), so in 16 bits the divergence, a small difference of log-probabilities of
    about -log V, carries their rounding: against the float64 reference (CPU, 4 seeds,
    13-40 rows, vocab 300) bfloat16 is off 0.1-1.1% (forward KL), 0.3-6.6% (reverse,
    T=2; 31% at one row) and 7-8% (jsd, biased low by the rounded mixture), float16
    0.1-0.4%, 0.2-3.3% and 1%: 2-30x the dtype's tolerance. The same call on the same
    rounded values in float32 is as close as our reference run in float32 (rel <= 7e-6),
    and rounding only the log-probabilities to the dtype in a float64 KL reproduces the
    KL directions' errors: the formula is right, the arithmetic dtype is Liger's choice. Upcasting here would time a float32
    Liger under a 16-bit label, so the 16-bit rows say ``skipped`` with the reason."""
    _validate_fld(student_hidden, student_weight, teacher_hidden, teacher_weight, temperature,
                  direction, beta, reduction)
    if reduction == "none":
        raise _unsupported("fused_linear_distillation", "liger_chunked", "reduction='none'",
                           "Liger's chunked JSD returns only the mean over rows")
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    n = student_hidden.shape[0]
    loss_fn = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0,
                                      beta=_liger_beta(direction, beta),
                                      temperature=float(temperature), compiled=False)
    # labels only mask rows (none here) and feed the hard loss (weighted 0)
    labels = torch.zeros(n, dtype=torch.long, device=student_hidden.device)
    out = loss_fn(student_hidden, student_weight, teacher_hidden.detach(),
                  teacher_weight.detach(), labels)
    out = _scale_reduced(out * temperature**2, reduction, n, "fused_linear_distillation",
                         "liger_chunked")
    return out.to(student_hidden.dtype)


# ---------------------------------------------------------------- jsd, tvd
def jsd_liger(student, teacher, labels=None, beta=0.5, temperature=1.0, ignore_index=-100,
              reduction="mean"):
    """Liger's JSD kernel on the tempered log-softmaxes (it takes log-probabilities);
    its labels skip rows, its mean is over the kept rows."""
    from lossreg_plugins.transformers.divergences import validate

    validate("jsd", student, teacher, labels, temperature, beta, ignore_index, reduction)
    if reduction == "none":
        raise _unsupported("jsd", "liger", "reduction='none'",
                           "Liger's JSD returns only the mean over kept rows")
    keep = torch.ones(student.shape[0], dtype=torch.bool, device=student.device) \
        if labels is None else labels != ignore_index
    if not bool(keep.any()):  # Liger divides by zero kept rows; torch's mean: NaN
        return student.sum() * 0 + float("nan")
    from liger_kernel.transformers.functional import liger_jsd

    logq = torch.log_softmax(_upcast(student) / temperature, dim=-1)
    logp = torch.log_softmax(_upcast(teacher.detach()) / temperature, dim=-1)
    out = liger_jsd(logq, logp, shift_labels=None if labels is None else labels.long(),
                    beta=float(beta), ignore_index=int(ignore_index))
    return (out * keep.sum() if reduction == "sum" else out).to(student.dtype)


def tvd_liger(student, teacher, labels=None, temperature=1.0, ignore_index=-100,
              reduction="mean"):
    """Liger's TVD kernel on the tempered softmaxes (it takes probabilities); our mean is
    its ``batchmean`` (over kept rows), our ``none`` its per-element rows summed."""
    from lossreg_plugins.transformers.divergences import validate

    validate("tvd", student, teacher, labels, temperature, 0.5, ignore_index, reduction)
    keep = torch.ones(student.shape[0], dtype=torch.bool, device=student.device) \
        if labels is None else labels != ignore_index
    if reduction == "mean" and not bool(keep.any()):
        return student.sum() * 0 + float("nan")
    from liger_kernel.transformers.functional import liger_tvd

    q = torch.softmax(_upcast(student) / temperature, dim=-1)
    p = torch.softmax(_upcast(teacher.detach()) / temperature, dim=-1)
    out = liger_tvd(q, p, shift_labels=None if labels is None else labels.long(),
                    reduction={"mean": "batchmean"}.get(reduction, reduction),
                    ignore_index=int(ignore_index))
    if reduction == "none":
        out = out.sum(-1)  # Liger's 'none' is per element (N, V); ours per row
    return out.to(student.dtype)
