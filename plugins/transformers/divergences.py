"""Distillation divergences on logits with token masking: the generalized Jensen-Shannon
divergence (``jsd``) and the total variation distance (``tvd``).

With q = softmax(s / T) (student) and p = softmax(t / T) (teacher), per row:

* ``jsd``: beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q; at
  beta = 0 it is forward KL(p || q), at beta = 1 reverse KL(q || p) (the generalized
  JSD's limits are 0 there; Liger-Kernel defines these endpoints as the two KLs, and so
  do we). No T^2 factor (kl_distillation has one).
* ``tvd``: 1/2 sum_c |p_c - q_c| (subgradient 0 where p_c = q_c).

Rows whose ``labels`` equal ``ignore_index`` count for nothing; ``mean`` divides by the
kept rows (none kept: NaN with a zero gradient, torch's mean over nothing). The teacher
gets no gradient.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lossreg.kernels import acc_dtype
from lossreg.validate import check_reduction

from .distill import divergence_rows


def validate(loss, student, teacher, labels, temperature, beta, ignore_index, reduction):
    for name, x in (("student", student), ("teacher", teacher)):
        if not torch.is_tensor(x) or not x.is_floating_point() or x.dim() != 2:
            raise ValueError(f"{loss}: {name} must be floating-point (N, V) logits, got "
                             f"{getattr(x, 'shape', type(x).__name__)}")
    if student.shape != teacher.shape:
        raise ValueError(f"{loss}: student {tuple(student.shape)} and teacher "
                         f"{tuple(teacher.shape)} logits must have the same shape")
    if student.device != teacher.device:
        raise ValueError(f"{loss}: student and teacher must be on one device, got student "
                         f"on {student.device}, teacher on {teacher.device}")
    if labels is not None:
        if not torch.is_tensor(labels) or labels.dtype not in (torch.int64, torch.int32) \
                or labels.shape != student.shape[:1]:
            raise ValueError(f"{loss}: labels must be None or an integer tensor of shape "
                             f"({student.shape[0]},) (rows equal to ignore_index are "
                             f"skipped), got {getattr(labels, 'shape', type(labels).__name__)}")
        if labels.device != student.device:
            raise ValueError(f"{loss}: labels must be on the logits' device {student.device}, "
                             f"got {labels.device}")
        vocab = student.shape[-1]
        bad = labels[(labels != ignore_index) & ((labels < 0) | (labels >= vocab))]
        if bad.numel():
            raise ValueError(f"{loss}: labels must be token ids in [0, {vocab}) or "
                             f"ignore_index={ignore_index}, got {bad[0].item()}")
    if not float(temperature) > 0:
        raise ValueError(f"{loss}: temperature must be > 0, got {temperature}")
    if not 0.0 <= float(beta) <= 1.0:
        raise ValueError(f"{loss}: beta must be in [0, 1], got {beta}")
    if not isinstance(ignore_index, int):
        raise ValueError(f"{loss}: ignore_index must be an int, got {ignore_index!r}")
    check_reduction(loss, reduction)


def _keep(student, labels, ignore_index):
    if labels is None:
        return torch.ones(student.shape[0], dtype=torch.bool, device=student.device)
    return labels != ignore_index


def _reduce(rows, keep, reduction):
    rows = torch.where(keep, rows, torch.zeros_like(rows))
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    kept = keep.sum().to(rows.dtype)
    # NaN with a zero gradient when nothing is kept
    return rows.sum() / kept.clamp_min(1) + torch.where(
        kept > 0, torch.zeros_like(kept), torch.full_like(kept, float("nan")))


def _jsd_direction(beta):
    return "forward" if beta == 0.0 else "reverse" if beta == 1.0 else "jsd"


# ------------------------------------------------------------------ jsd
def jsd_reference(student, teacher, labels=None, beta=0.5, temperature=1.0, ignore_index=-100,
                  reduction="mean"):
    """The formula in log space: log m = logsumexp(log beta + log p, log(1-beta) + log q)."""
    validate("jsd", student, teacher, labels, temperature, beta, ignore_index, reduction)
    dtype = student.dtype
    s, t = student.to(acc_dtype(dtype)), teacher.detach().to(acc_dtype(dtype))
    rows = divergence_rows(s, t, temperature, _jsd_direction(float(beta)), float(beta))
    rows = rows / float(temperature) ** 2  # divergence_rows has the T^2 factor; jsd has not
    return _reduce(rows, _keep(student, labels, ignore_index), reduction).to(dtype)


def jsd_torch(student, teacher, labels=None, beta=0.5, temperature=1.0, ignore_index=-100,
              reduction="mean"):
    """F.kl_div (log-target) against the mixture m, as torch users compose it."""
    validate("jsd", student, teacher, labels, temperature, beta, ignore_index, reduction)
    acc = acc_dtype(student.dtype)
    logq = F.log_softmax(student.to(acc) / temperature, dim=-1)
    logp = F.log_softmax(teacher.detach().to(acc) / temperature, dim=-1)
    beta = float(beta)
    if beta == 0.0:
        rows = F.kl_div(logq, logp, reduction="none", log_target=True).sum(-1)
    elif beta == 1.0:
        rows = F.kl_div(logp, logq, reduction="none", log_target=True).sum(-1)
    else:
        logm = torch.logaddexp(math.log(beta) + logp, math.log1p(-beta) + logq)
        rows = (beta * F.kl_div(logm, logp, reduction="none", log_target=True).sum(-1)
                + (1 - beta) * F.kl_div(logm, logq, reduction="none", log_target=True).sum(-1))
    return _reduce(rows, _keep(student, labels, ignore_index), reduction).to(student.dtype)


def jsd_triton(student, teacher, labels=None, beta=0.5, temperature=1.0, ignore_index=-100,
               reduction="mean"):
    validate("jsd", student, teacher, labels, temperature, beta, ignore_index, reduction)
    from lossreg.kernels.divergence import divergence

    keep = None if labels is None else labels != ignore_index
    return divergence(student, teacher.detach(), "jsd", temperature, beta, reduction,
                      keep=keep, loss_scale=1.0)


# ------------------------------------------------------------------ tvd
def tvd_reference(student, teacher, labels=None, temperature=1.0, ignore_index=-100,
                  reduction="mean"):
    validate("tvd", student, teacher, labels, temperature, 0.5, ignore_index, reduction)
    dtype = student.dtype
    acc = acc_dtype(dtype)
    q = torch.softmax(student.to(acc) / temperature, dim=-1)
    p = torch.softmax(teacher.detach().to(acc) / temperature, dim=-1)
    rows = 0.5 * (q - p).abs().sum(-1)
    return _reduce(rows, _keep(student, labels, ignore_index), reduction).to(dtype)


def tvd_torch(student, teacher, labels=None, temperature=1.0, ignore_index=-100,
              reduction="mean"):
    """F.l1_loss of the two softmaxes, halved."""
    validate("tvd", student, teacher, labels, temperature, 0.5, ignore_index, reduction)
    acc = acc_dtype(student.dtype)
    q = F.softmax(student.to(acc) / temperature, dim=-1)
    p = F.softmax(teacher.detach().to(acc) / temperature, dim=-1)
    rows = 0.5 * F.l1_loss(q, p, reduction="none").sum(-1)
    return _reduce(rows, _keep(student, labels, ignore_index), reduction).to(student.dtype)


def tvd_triton(student, teacher, labels=None, temperature=1.0, ignore_index=-100,
               reduction="mean"):
    validate("tvd", student, teacher, labels, temperature, 0.5, ignore_index, reduction)
    from lossreg.kernels.divergence import divergence

    keep = None if labels is None else labels != ignore_index
    return divergence(student, teacher.detach(), "tvd", temperature, 0.5, reduction,
                      keep=keep, loss_scale=1.0)


# ------------------------------------------------------------------ inputs
def make_inputs(case):
    """A student near its teacher; ~10% of rows labelled ignore_index."""
    v = int(case.params.get("vocab", 1000))
    ignore = int(case.params.get("ignore_index", -100))
    teacher = case.randn(case.n, v) * 2.0
    student = teacher + case.randn(case.n, v)
    labels = case.randint(0, v, case.n)
    labels = torch.where(case.rand(case.n, dtype=torch.float32) < 0.1,
                         torch.full_like(labels, ignore), labels)
    return {"student": student, "teacher": teacher, "labels": labels}


#: |log q - log p| the tvd inputs keep between student and teacher probabilities: 100
#: times what float32 rounding of a softmax over logits of ~10 moves a log-probability
TVD_GAP = 1e-4


def make_tvd_inputs(case):
    """``make_inputs`` with no near-tie: where |log q_c - log p_c| < ``TVD_GAP`` the
    student logit moves away from the tie (by 2 T gap plus two of its dtype's spacings,
    so that the move survives rounding), about one element in 6000.

    |q - p| has a kink at q = p. Where q and p agree to within the accumulator's rounding
    (one element of 9000 did: q - p = -1.7e-10 with q = 2e-4, seven float32 ulps), a
    correct float32 kernel may see the other sign than the float64 reference; the
    subgradient +-1/2 then flips, and through the softmax's sum over the row
    (q (a - sum q a)) it shifts every gradient element of the row, 1.3e-3 relative.
    Either sign is a right answer at a tie; the check judges the smooth part. Exact ties
    (``student_equals_teacher``) keep their subgradient 0 in every implementation."""
    inputs = make_inputs(case)
    s, t = inputs["student"], inputs["teacher"]
    temp = float(case.params.get("temperature", 1.0))
    spacing = torch.finfo(s.dtype).eps
    lp = torch.log_softmax(t.double() / temp, dim=-1)
    for _ in range(2):  # a move shifts the row's logsumexp by ~q_c * step: check again
        d = torch.log_softmax(s.double() / temp, dim=-1) - lp
        step = 2 * TVD_GAP * temp + 2 * spacing * s.double().abs()
        moved = s.double() + torch.where(d < 0, -step, step)
        s = torch.where(d.abs() < TVD_GAP, moved, s.double()).to(s.dtype)
    return {**inputs, "student": s}


def kept_rows(inputs, options):
    labels = inputs.get("labels")
    if labels is None:
        return float(inputs["student"].shape[0])
    return float((labels != options.get("ignore_index", -100)).sum())
