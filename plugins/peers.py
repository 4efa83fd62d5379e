"""Peer libraries as baselines: Liger-Kernel and cut-cross-entropy (CCE).

This plugin registers no loss. Through ``register_implementations`` it adds the peers'
kernels to the losses other plugins own, so ``lossreg check`` proves them against our
float64 references and ``lossreg bench`` times them next to ours.

Each implementation names its library in ``requires``: without it the implementation
is unavailable (a ``skipped`` row saying so), never an import error, because every
adapter imports the peer inside its body. The adapters take our signature (the
reference's: argument names, ``reduction``, ``ignore_index``, ``temperature``...),
validate with the loss's own validation, and call the peer's public API with the
arguments that compute the same function. Options the peer cannot express raise a
``ValueError`` naming the option and why; they are never silently dropped.

What maps where (Liger-Kernel 0.8 API; cut-cross-entropy 25.1 API):

* ``cross_entropy`` ``liger``: ``liger_cross_entropy``. weight / ignore_index /
  label_smoothing / z_loss (Liger's ``lse_square_scale``) / reduction. Liger writes the
  logits gradient over the logits during the forward, as it does in training.
* ``fused_linear_cross_entropy`` ``liger``: ``liger_fused_linear_cross_entropy``
  (weight (V, H), bias, softcap, z_loss, label smoothing); ``cce``: CCE's
  ``linear_cross_entropy(e, c, targets)`` with ``c`` our (V, H) weight, ``shift=False``
  and ``filter_eps=None`` (CCE's default gradient filtering drops small gradient
  entries: not the same function's gradient). No bias, label smoothing or z-loss.
* ``kl_distillation`` ``liger``: Liger's generalized JSD kernel on the tempered
  log-softmaxes; beta 0 is forward KL, 1 reverse KL, else our ``jsd`` (beta weighs the
  teacher in both). ``liger_kl_div``: Liger's KL-div kernel (forward KL only).
* ``fused_linear_distillation`` ``liger``: Liger's fused linear JSD (Triton);
  ``liger_chunked``: ``LigerFusedLinearJSDLoss`` of its chunked losses (soft loss
  only). Both map the directions as above.
* ``jsd`` / ``tvd`` ``liger``: ``liger_jsd`` on the tempered log-softmaxes, ``liger_tvd``
  on the tempered softmaxes (CUDA only: it fails under Triton's interpreter).
* ``dpo``, ``orpo``, ``cpo``, ``simpo``, ``kto`` ``liger``: the preference losses Liger's
  chunked losses apply to sequence log-probs (``preference_loss_fn``), in
  :mod:`lossreg_plugins._peers_rl`.

Our temperature convention multiplies the divergence by T^2; Liger's does not, so the
adapters do. Liger's means divide by the rows; ``sum`` multiplies that back.
"""

from __future__ import annotations


import torch

from lossreg import Impl, hookimpl

from ._peers_common import (  # noqa: F401 - re-exported for the adapters' users
    CCE,
    HALF_AND_SINGLE,
    LIGER,
    UnsupportedOption,
    _interpreted,
    _nan_if_nothing_kept,
    _scale_reduced,
    _under_interpreter,
    _unsupported,
    _upcast,
)
from ._peers_rl import cpo_liger, dpo_liger, kto_liger, orpo_liger, simpo_liger


# ---------------------------------------------------------------- cross_entropy
def ce_liger(input, target, weight=None, ignore_index=-100, label_smoothing=0.0, z_loss=0.0,
             reduction="mean"):
    from lossreg_plugins.neural_networks import validate_ce

    validate_ce("cross_entropy", input, target, weight, ignore_index, label_smoothing, z_loss,
                reduction)
    if weight is not None and z_loss and reduction == "mean":
        raise _unsupported("cross_entropy", "liger", "z_loss with weight and reduction='mean'",
                           "Liger divides the z-loss term by the number of kept rows, ours "
                           "(like the rest of the loss) by the sum of their class weights")
    if weight is not None and _under_interpreter(input):
        raise _interpreted("cross_entropy", "weight")
    if input.dtype == torch.bfloat16 and _under_interpreter(input):
        raise _unsupported("cross_entropy", "liger", "bfloat16 on CPU",
                           "under Triton's interpreter Liger's backward (its in-place scaling "
                           "of the saved bfloat16 gradient by a non-unit grad_output) returns "
                           "wrong values; float32 and float16 pass there")
    from liger_kernel.transformers.functional import liger_cross_entropy

    out = liger_cross_entropy(input, target.long(), weight=weight, ignore_index=int(ignore_index),
                              reduction=reduction, label_smoothing=float(label_smoothing),
                              lse_square_scale=float(z_loss))
    if reduction == "mean":
        out = _nan_if_nothing_kept(out, target != ignore_index)
    return out


# ---------------------------------------------------------------- fused linear CE
def _validate_flce(hidden, weight, target, bias, ignore_index, label_smoothing, z_loss, softcap,
                   reduction, class_weight=None, shift=False, accum_dtype=None):
    from lossreg_plugins.transformers.linear_ce import validate_extras, validate_flce

    loss = "fused_linear_cross_entropy"
    validate_flce(loss, hidden, weight, bias, target, ignore_index, label_smoothing, z_loss,
                  softcap, reduction)
    return validate_extras(loss, hidden, weight, target, class_weight, shift, accum_dtype)


def _shifted(hidden, target, shift, reduction, impl):
    """``shift``: row i scored against target i+1 (the last row dropped), as CCE does."""
    if not shift:
        return hidden, target
    return hidden[:-1], target[1:]


def flce_liger(hidden, weight, target, bias=None, ignore_index=-100, label_smoothing=0.0,
               z_loss=0.0, softcap=None, reduction="mean", class_weight=None, shift=False,
               return_z_loss=False, return_lse=False, accum_dtype=None):
    accum = _validate_flce(hidden, weight, target, bias, ignore_index, label_smoothing,
                           z_loss, softcap, reduction, class_weight, shift, accum_dtype)
    loss = "fused_linear_cross_entropy"
    if torch.is_grad_enabled() and not hidden.requires_grad and (
            weight.requires_grad or (bias is not None and bias.requires_grad)):
        raise _unsupported(loss, "liger", "gradients of weight or bias without one of hidden",
                           "Liger computes every gradient only when hidden requires grad")
    if softcap and _under_interpreter(hidden):
        raise _interpreted(loss, "softcap")
    if class_weight is not None and _under_interpreter(hidden):
        raise _interpreted(loss, "class_weight")
    if return_lse:
        raise _unsupported(loss, "liger", "return_lse", "Liger returns no log-sum-exp")
    if return_z_loss and reduction == "none":
        raise _unsupported(loss, "liger", "return_z_loss with reduction='none'",
                           "Liger returns the z-loss summed, not per row")
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    hidden, target = _shifted(hidden, target, shift, reduction, "liger")
    out = liger_fused_linear_cross_entropy(
        hidden, weight, target, bias=bias, ce_weight=class_weight,
        ignore_index=int(ignore_index), lse_square_scale=float(z_loss),
        label_smoothing=float(label_smoothing), reduction=reduction,
        softcap=float(softcap) if softcap else None, return_z_loss=bool(return_z_loss),
        accum_dtype=accum if accum != weight.dtype else None)
    z = None
    if isinstance(out, tuple):
        out, z = out[0], out[1]
    if reduction == "mean":
        out = _nan_if_nothing_kept(out, target != ignore_index)
    out = out.to(hidden.dtype)  # Liger's loss is float32 whatever the inputs
    return (out, z.to(hidden.dtype)) if return_z_loss else out


def flce_cce(hidden, weight, target, bias=None, ignore_index=-100, label_smoothing=0.0,
             z_loss=0.0, softcap=None, reduction="mean", class_weight=None, shift=False,
             return_z_loss=False, return_lse=False, accum_dtype=None, _impl="cce"):
    _validate_flce(hidden, weight, target, bias, ignore_index, label_smoothing, z_loss, softcap,
                   reduction, class_weight, shift, accum_dtype)
    loss = "fused_linear_cross_entropy"
    name = "cce" if _impl == "cce" else "cce_compile"
    why = "cut-cross-entropy computes plain cross-entropy of e @ c.T"
    if bias is not None:
        raise _unsupported(loss, name, "bias", why + " (its classifier has no bias)")
    if label_smoothing:
        raise _unsupported(loss, name, f"label_smoothing={label_smoothing}", why)
    if z_loss or return_z_loss:
        raise _unsupported(loss, name, "z_loss", why)
    if class_weight is not None:
        raise _unsupported(loss, name, "class_weight", why)
    if return_lse:
        raise _unsupported(loss, name, "return_lse",
                           "cut-cross-entropy 25.1's linear_cross_entropy returns no lse")
    if accum_dtype is not None:
        raise _unsupported(loss, name, "accum_dtype",
                           "cut-cross-entropy chooses its own accumulation")
    kept = target[1:] if shift else target
    if reduction == "mean" and not bool((kept != ignore_index).any()):
        # CCE's mean over no kept row is NaN and its backward divides by zero; torch's
        # convention is NaN with a zero gradient (CCE syncs on the targets anyway).
        return (hidden.sum() + weight.sum()) * 0 + float("nan")
    from cut_cross_entropy import linear_cross_entropy

    extra = {"filter_eps": None} if _impl == "cce" else {}
    out = linear_cross_entropy(hidden, weight, target, ignore_index=int(ignore_index),
                               softcap=float(softcap) if softcap else None,
                               reduction=reduction, shift=bool(shift), impl=_impl, **extra)
    return out.to(hidden.dtype)  # CCE's loss is float32 whatever the inputs


def flce_cce_compile(hidden, weight, target, bias=None, ignore_index=-100,
                     label_smoothing=0.0, z_loss=0.0, softcap=None, reduction="mean",
                     class_weight=None, shift=False, return_z_loss=False, return_lse=False,
                     accum_dtype=None):
    """CCE's torch.compile path: the one that runs on a CPU."""
    return flce_cce(hidden, weight, target, bias, ignore_index, label_smoothing, z_loss,
                    softcap, reduction, class_weight, shift, return_z_loss, return_lse,
                    accum_dtype, _impl="torch_compile")


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
    (``compiled=False``): no hard labels, so every row counts."""
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


# ---------------------------------------------------------------- registration
def _impls():
    liger = {"kind": "baseline", "backend": LIGER, "requires": (LIGER,), "uses_triton": True}
    cce = {"kind": "baseline", "backend": CCE, "requires": (CCE,), "devices": ("cuda",),
           "uses_triton": True,
           "dtypes": HALF_AND_SINGLE}
    yield "cross_entropy", Impl(
        "liger", ce_liger, **liger, dtypes=HALF_AND_SINGLE, grad_in_forward=True,
        description="Liger-Kernel liger_cross_entropy: gradient written over the logits "
                    "in the forward")
    yield "fused_linear_cross_entropy", Impl(
        "liger", flce_liger, **liger, dtypes=HALF_AND_SINGLE, grad_in_forward=True,
        description="Liger-Kernel fused linear cross-entropy (row chunks, Triton CE)")
    yield "fused_linear_cross_entropy", Impl(
        "cce", flce_cce, **cce,
        description="cut-cross-entropy linear_cross_entropy (CCE kernel, filter_eps=None: "
                    "exact gradients); no bias, label smoothing or z-loss")
    yield "fused_linear_cross_entropy", Impl(
        "cce_compile", flce_cce_compile, **{**cce, "devices": ("cpu", "cuda"),
                                            "uses_triton": False},
        description="cut-cross-entropy linear_cross_entropy(impl='torch_compile'), its CPU "
                    "path (slow first call: torch.compile); no bias, label smoothing, "
                    "z-loss or class weights")
    yield "kl_distillation", Impl(
        "liger", kl_liger, **liger, dtypes=HALF_AND_SINGLE, grad_in_forward=True,
        description="Liger-Kernel generalized JSD kernel (beta 0 / 1: forward / reverse "
                    "KL) on tempered log-softmaxes; no reduction='none'")
    yield "kl_distillation", Impl(
        "liger_kl_div", kl_liger_kl_div, **{**liger, "devices": ("cuda",)},
        dtypes=HALF_AND_SINGLE,
        description="Liger-Kernel KL-div kernel on tempered log-softmaxes; forward KL only "
                    "(does not run under Triton's interpreter)")
    yield "fused_linear_distillation", Impl(
        "liger", fld_liger, **liger, dtypes=HALF_AND_SINGLE, grad_in_forward=True,
        description="Liger-Kernel fused linear JSD (Triton), all directions; no "
                    "reduction='none'")
    yield "fused_linear_distillation", Impl(
        "liger_chunked", fld_liger_chunked, **liger, dtypes=HALF_AND_SINGLE,
        grad_in_forward=True,
        description="Liger-Kernel chunked LigerFusedLinearJSDLoss (eager PyTorch, soft "
                    "loss only); no reduction='none'")
    yield "jsd", Impl(
        "liger", jsd_liger, **liger, dtypes=HALF_AND_SINGLE, grad_in_forward=True,
        description="Liger-Kernel liger_jsd on tempered log-softmaxes; no reduction='none'")
    yield "tvd", Impl(
        "liger", tvd_liger, **{**liger, "devices": ("cuda",)}, dtypes=HALF_AND_SINGLE,
        grad_in_forward=True,
        description="Liger-Kernel liger_tvd on tempered softmaxes (does not run under "
                    "Triton's interpreter: its kernel calls .to() on a Python float)")
    eager = {**liger, "uses_triton": False, "backend": LIGER}
    yield "orpo", Impl(
        "liger", orpo_liger, **eager,
        description="Liger-Kernel chunked ORPO's odds-ratio loss on sequence log-probs, "
                    "plus the chosen NLL; no reduction='none'")
    yield "cpo", Impl(
        "liger", cpo_liger, **eager,
        description="Liger-Kernel chunked CPO's preference loss plus alpha times the chosen "
                    "NLL; no reduction='none'")
    yield "simpo", Impl(
        "liger", simpo_liger, **eager,
        description="Liger-Kernel chunked SimPO's preference loss on length-normalized "
                    "log-probs; no reduction='none'")
    yield "kto", Impl(
        "liger", kto_liger, **eager,
        description="Liger-Kernel chunked KTO's loss with our reference point z0; no "
                    "class weights or reduction='none'")
    yield "dpo", Impl(
        "liger", dpo_liger, **liger,
        description="Liger-Kernel's DPO preference loss on sequence log-probs (sigmoid, "
                    "hinge); no ipo, label smoothing or reduction='none'")


@hookimpl
def register_implementations(register, losses):
    """Join only the losses present in this load (``losses``: the registered names), so
    a restricted load (LOSSREG_LOAD_PLUGINS) gives no unknown-loss warnings."""
    for loss, impl in _impls():
        if loss in losses:
            register(loss, impl)
