"""Knowledge distillation over the vocabulary: KL (forward / reverse) and generalized
JSD between softened teacher and student distributions, from logits or, fused, from
hidden states and LM heads.

With q = softmax(s / T) (student) and p = softmax(t / T) (teacher), per row:

* ``forward``: T^2 KL(p || q);  ``reverse``: T^2 KL(q || p);
* ``jsd``: T^2 [beta KL(p || m) + (1 - beta) KL(q || m)], m = beta p + (1 - beta) q.

The teacher never receives a gradient.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lossreg.kernels import acc_dtype
from lossreg.validate import check_reduction

from .linear_ce import chunk_rows

DIRECTIONS = ("forward", "reverse", "jsd")


def validate_kl(loss, student, teacher, temperature, direction, beta, reduction):
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
    _validate_options(loss, temperature, direction, beta, reduction)


def _validate_options(loss, temperature, direction, beta, reduction):
    if not float(temperature) > 0:
        raise ValueError(f"{loss}: temperature must be > 0, got {temperature}")
    if direction not in DIRECTIONS:
        raise ValueError(f"{loss}: direction must be one of {DIRECTIONS}, got {direction!r}")
    if direction == "jsd" and not 0.0 < float(beta) < 1.0:
        raise ValueError(f"{loss}: beta must be in (0, 1) for jsd, got {beta}")
    check_reduction(loss, reduction)


def divergence_rows(student, teacher, temperature, direction, beta):
    """Per-row T^2-scaled divergence, from log-softmaxes (finite where p or q underflow)."""
    logq = F.log_softmax(student / temperature, dim=-1)
    logp = F.log_softmax(teacher / temperature, dim=-1)
    if direction == "forward":
        rows = (logp.exp() * (logp - logq)).sum(-1)
    elif direction == "reverse":
        rows = (logq.exp() * (logq - logp)).sum(-1)
    else:
        logm = torch.logsumexp(torch.stack([math.log(beta) + logp,
                                            math.log(1 - beta) + logq]), dim=0)
        rows = (beta * (logp.exp() * (logp - logm)).sum(-1)
                + (1 - beta) * (logq.exp() * (logq - logm)).sum(-1))
    return rows * temperature**2


def _reduce(rows, reduction):
    if reduction == "none":
        return rows
    return rows.sum() if reduction == "sum" else rows.mean()


def kl_reference(student, teacher, temperature=1.0, direction="forward", beta=0.5,
                 reduction="mean"):
    validate_kl("kl_distillation", student, teacher, temperature, direction, beta, reduction)
    dtype = student.dtype
    if dtype in (torch.float16, torch.bfloat16):
        student, teacher = student.float(), teacher.float()
    rows = divergence_rows(student, teacher.detach(), temperature, direction, beta)
    return _reduce(rows, reduction).to(dtype)


def kl_torch(student, teacher, temperature=1.0, direction="forward", beta=0.5,
             reduction="mean"):
    """F.kl_div for the KL directions (log-target form); JSD composed from two of them."""
    validate_kl("kl_distillation", student, teacher, temperature, direction, beta, reduction)
    acc = acc_dtype(student.dtype)  # half precision in float32, float64 as is
    logq = F.log_softmax(student.to(acc) / temperature, dim=-1)
    logp = F.log_softmax(teacher.detach().to(acc) / temperature, dim=-1)
    if direction == "forward":
        rows = F.kl_div(logq, logp, reduction="none", log_target=True).sum(-1)
    elif direction == "reverse":
        rows = F.kl_div(logp, logq, reduction="none", log_target=True).sum(-1)
    else:
        logm = torch.logsumexp(torch.stack([math.log(beta) + logp,
                                            math.log(1 - beta) + logq]), dim=0)
        rows = (beta * F.kl_div(logm, logp, reduction="none", log_target=True).sum(-1)
                + (1 - beta) * F.kl_div(logm, logq, reduction="none", log_target=True).sum(-1))
    return _reduce(rows * temperature**2, reduction).to(student.dtype)


def kl_triton(student, teacher, temperature=1.0, direction="forward", beta=0.5,
              reduction="mean"):
    validate_kl("kl_distillation", student, teacher, temperature, direction, beta, reduction)
    from lossreg.kernels.divergence import divergence

    return divergence(student, teacher.detach(), direction, temperature, beta, reduction)


def make_kl_inputs(case):
    v = int(case.params.get("vocab", 1000))
    teacher = case.randn(case.n, v) * 2.0
    student = teacher + case.randn(case.n, v)  # a student near its teacher
    return {"student": student, "teacher": teacher}


# ------------------------------------------------------------------ fused linear
def validate_fld(hs, ws, ht, wt, temperature, direction, beta, reduction):
    loss = "fused_linear_distillation"
    for name, x in (("student_hidden", hs), ("student_weight", ws), ("teacher_hidden", ht),
                    ("teacher_weight", wt)):
        if not torch.is_tensor(x) or not x.is_floating_point() or x.dim() != 2:
            raise ValueError(f"{loss}: {name} must be a 2-D floating-point tensor, got "
                             f"{getattr(x, 'shape', type(x).__name__)}")
    if hs.shape[1] != ws.shape[1] or ht.shape[1] != wt.shape[1]:
        raise ValueError(f"{loss}: hidden sizes disagree: student {tuple(hs.shape)} x "
                         f"{tuple(ws.shape)}, teacher {tuple(ht.shape)} x {tuple(wt.shape)}")
    if hs.shape[0] != ht.shape[0]:
        raise ValueError(f"{loss}: student_hidden and teacher_hidden must have the same rows "
                         f"N, got {hs.shape[0]} and {ht.shape[0]}")
    if ws.shape[0] != wt.shape[0]:
        raise ValueError(f"{loss}: student_weight and teacher_weight must have the same "
                         f"vocabulary V (rows), got {ws.shape[0]} and {wt.shape[0]}")
    devices = {"student_hidden": hs.device, "student_weight": ws.device,
               "teacher_hidden": ht.device, "teacher_weight": wt.device}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{k} on {d}" for k, d in devices.items())
        raise ValueError(f"{loss}: all inputs must be on one device, got {listed}")
    _validate_options(loss, temperature, direction, beta, reduction)


def fld_reference(student_hidden, student_weight, teacher_hidden, teacher_weight,
                  temperature=1.0, direction="forward", beta=0.5, reduction="mean"):
    """Both logit matrices in full, then the divergence."""
    validate_fld(student_hidden, student_weight, teacher_hidden, teacher_weight, temperature,
                 direction, beta, reduction)
    with torch.no_grad():
        teacher = teacher_hidden @ teacher_weight.T
    return kl_reference(student_hidden @ student_weight.T, teacher, temperature, direction,
                        beta, reduction)


def _rows_torch(student, teacher, temperature, direction, beta, scale):
    """Eager per-row divergence of a chunk and its gradient w.r.t. the student logits."""
    acc = acc_dtype(student.dtype)
    s = student.detach().to(acc).requires_grad_(True)
    with torch.enable_grad():
        rows = divergence_rows(s, teacher.to(acc), temperature, direction, beta)
        (grad,) = torch.autograd.grad(rows, s, scale.to(acc))
    return rows.detach(), grad


def _rows_triton(student, teacher, temperature, direction, beta, scale):
    from lossreg.kernels.divergence import div_rows_inplace

    grad = torch.empty_like(student)
    rows = div_rows_inplace(student.contiguous(), teacher.contiguous(), temperature, direction,
                           beta, scale, grad_out=grad)
    return rows, grad


ROWS = {"torch": _rows_torch, "triton": _rows_triton}


class _FusedDistill(torch.autograd.Function):
    """Chunks of rows: both logit blocks, the divergence and its student gradient, then
    dh_s = dS W_s and dW_s += dS^T h_s; teacher blocks are computed without autograd."""

    @staticmethod
    def forward(ctx, hs, ws, ht, wt, temperature, direction, beta, reduction, engine):
        n = hs.shape[0]
        # max(n, 1): no rows gives torch's empty mean (0 / 0 = nan below), not an error
        scale = torch.full((n,), 1.0 / max(n, 1) if reduction == "mean" else 1.0,
                           dtype=acc_dtype(hs.dtype), device=hs.device)
        rows, dh, dw = _fld_chunks(hs, ws, ht, wt, temperature, direction, beta, scale, engine,
                                   want_grads=reduction != "none")
        ctx.meta = (temperature, direction, beta, reduction, engine)
        if reduction == "none":
            ctx.save_for_backward(hs, ws, ht, wt)
            return rows.to(hs.dtype)
        ctx.save_for_backward(dh, dw)
        total = rows.sum()
        return (total / n if reduction == "mean" else total).to(hs.dtype)

    @staticmethod
    def backward(ctx, grad):
        temperature, direction, beta, reduction, engine = ctx.meta
        if reduction == "none":
            hs, ws, ht, wt = ctx.saved_tensors
            _, dh, dw = _fld_chunks(hs, ws, ht, wt, temperature, direction, beta, grad, engine)
        else:
            dh, dw = ctx.saved_tensors
            dh, dw = dh * grad, dw * grad
        return dh, dw, None, None, None, None, None, None, None


def _fld_chunks(hs, ws, ht, wt, temperature, direction, beta, scale, engine, want_grads=True):
    n, v = hs.shape[0], ws.shape[0]
    rows = torch.empty(n, dtype=acc_dtype(hs.dtype), device=hs.device)
    dh = torch.empty_like(hs) if want_grads else None
    dw = torch.zeros_like(ws) if want_grads else None
    step = max(1, chunk_rows(n, v) // 2)  # two logit blocks live at once
    for start in range(0, n, step):
        stop = min(n, start + step)
        with torch.no_grad():
            student = hs[start:stop] @ ws.T
            teacher = ht[start:stop] @ wt.T
        r, ds = ROWS[engine](student, teacher, temperature, direction, beta,
                             scale[start:stop])
        rows[start:stop] = r
        del student, teacher
        if want_grads:
            ds = ds.to(hs.dtype)
            torch.mm(ds, ws, out=dh[start:stop])
            dw.addmm_(ds.T, hs[start:stop])
    return rows, dh, dw


def _fld(engine):
    def fn(student_hidden, student_weight, teacher_hidden, teacher_weight, temperature=1.0,
           direction="forward", beta=0.5, reduction="mean"):
        validate_fld(student_hidden, student_weight, teacher_hidden, teacher_weight,
                     temperature, direction, beta, reduction)
        return _FusedDistill.apply(student_hidden, student_weight, teacher_hidden.detach(),
                                   teacher_weight.detach(), float(temperature), direction,
                                   float(beta), reduction, engine)

    fn.__name__ = f"fld_{engine}"
    return fn


fld_chunked = _fld("torch")
fld_triton = _fld("triton")


def make_fld_inputs(case):
    h = int(case.params.get("hidden", 48))
    v = int(case.params.get("vocab", 1000))
    ws = case.randn(v, h) * (1.5 / h**0.5)
    wt = ws + case.randn(v, h) * (0.5 / h**0.5)
    hs = case.randn(case.n, h)
    return {"student_hidden": hs, "student_weight": ws,
            "teacher_hidden": hs + 0.3 * case.randn(case.n, h), "teacher_weight": wt}
