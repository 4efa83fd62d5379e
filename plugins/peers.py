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
  chunked losses apply to sequence log-probs (``preference_loss_fn``), and ``grpo``
  ``liger``: its GRPO ``ppo_loss_fn`` on per-token log-probs, in
  :mod:`lossreg_plugins._peers_rl`.
* ``fused_linear_dpo`` / ``_orpo`` / ``_cpo`` / ``_simpo`` / ``_kto`` / ``_grpo``
  ``liger``: Liger's chunked ``LigerFusedLinear*Loss`` modules (eager), in
  :mod:`lossreg_plugins._peers_chunked`, which documents the conventions mapped.

Our temperature convention multiplies the divergence by T^2; Liger's does not, so the
adapters do. Liger's means divide by the rows; ``sum`` multiplies that back.
"""

from __future__ import annotations

import os

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
from ._peers_distill import (
    fld_liger,
    fld_liger_chunked,
    jsd_liger,
    kl_liger,
    kl_liger_kl_div,
    tvd_liger,
)
from ._peers_rl import cpo_liger, dpo_liger, grpo_liger, kto_liger, orpo_liger, simpo_liger

FUSED_PREFERENCE = ("dpo", "orpo", "cpo", "simpo", "kto")


# ---------------------------------------------------------------- cross_entropy
def ce_liger(input, target, weight=None, ignore_index=-100, label_smoothing=0.0, z_loss=0.0,
             reduction="mean", softcap=None, shift=False, return_z_loss=False,
             return_lse=False):
    from lossreg_plugins.neural_networks import validate_ce, validate_ce_extras

    loss = "cross_entropy"
    validate_ce(loss, input, target, weight, ignore_index, label_smoothing, z_loss, reduction)
    validate_ce_extras(loss, input, softcap, shift, return_z_loss, return_lse)
    if weight is not None and z_loss and reduction == "mean":
        raise _unsupported(loss, "liger", "z_loss with weight and reduction='mean'",
                           "Liger divides the z-loss term by the number of kept rows, ours "
                           "(like the rest of the loss) by the sum of their class weights")
    if weight is not None and _under_interpreter(input):
        raise _interpreted(loss, "weight")
    if softcap and _under_interpreter(input):
        raise _interpreted(loss, "softcap")
    if input.dtype == torch.bfloat16 and _under_interpreter(input):
        raise _unsupported(loss, "liger", "bfloat16 on CPU",
                           "under Triton's interpreter Liger's backward (its in-place scaling "
                           "of the saved bfloat16 gradient by a non-unit grad_output) returns "
                           "wrong values; float32 and float16 pass there")
    if return_lse:
        raise _unsupported(loss, "liger", "return_lse", "Liger returns no log-sum-exp")
    if return_z_loss and reduction == "none":
        raise _unsupported(loss, "liger", "return_z_loss with reduction='none'",
                           "Liger returns the z-loss reduced, not per row")
    from liger_kernel.transformers.functional import liger_cross_entropy

    if shift:  # row views, no copy of the logits
        input, target = input[:-1], target[1:]
    out = liger_cross_entropy(input, target.long(), weight=weight, ignore_index=int(ignore_index),
                              reduction=reduction, label_smoothing=float(label_smoothing),
                              lse_square_scale=float(z_loss),
                              softcap=float(softcap) if softcap else None,
                              return_z_loss=bool(return_z_loss))
    z = None
    if return_z_loss:  # a CrossEntropyOutput (Liger 0.8) or a (loss, z) tuple
        out, z = (out.loss, out.z_loss) if hasattr(out, "z_loss") else (out[0], out[1])
    if reduction == "mean":
        out = _nan_if_nothing_kept(out, target != ignore_index)
    return (out, z.to(out.dtype).detach()) if return_z_loss else out


# ---------------------------------------------------------------- fused linear CE
def _validate_flce(hidden, weight, target, bias, ignore_index, label_smoothing, z_loss, softcap,
                   reduction, class_weight=None, shift=False, accum_dtype=None):
    from lossreg_plugins.transformers.linear_ce import validate_extras, validate_flce

    loss = "fused_linear_cross_entropy"
    validate_flce(loss, hidden, weight, bias, target, ignore_index, label_smoothing, z_loss,
                  softcap, reduction)
    return validate_extras(loss, hidden, weight, target, class_weight, shift, accum_dtype)


def _shifted(hidden, target, shift):
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

    hidden, target = _shifted(hidden, target, shift)
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
    if os.environ.get("LOSSREG_CCE_CPU") == "1":  # opt-in: minutes of torch.compile
        yield "fused_linear_cross_entropy", Impl(
            "cce_compile", flce_cce_compile, **{**cce, "devices": ("cpu", "cuda"),
                                                "uses_triton": False},
            description="cut-cross-entropy linear_cross_entropy(impl='torch_compile'), its "
                        "CPU path (first call compiles for minutes, so registered only with "
                        "LOSSREG_CCE_CPU=1); no bias, label smoothing, z-loss or class "
                        "weights")
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
        "liger_chunked", fld_liger_chunked, **liger, dtypes=("float32",),
        grad_in_forward=True,
        description="Liger-Kernel chunked LigerFusedLinearJSDLoss (eager PyTorch, soft "
                    "loss only); no reduction='none'. float32 only: it takes the "
                    "log-softmax and divergence in the input dtype, 2-30x the bfloat16 "
                    "and float16 tolerances (see fld_liger_chunked)")
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
    yield "grpo", Impl(
        "liger", grpo_liger, **eager,
        description="Liger-Kernel chunked GRPO's per-token loss (ppo_loss_fn) on our "
                    "per-token log-probs and advantages; no reduction='none'")
    yield from _chunked_impls({**eager, "grad_in_forward": True})


def _chunked_impls(common):
    """Liger's chunked losses (eager, compiled=False) for our fused-linear losses, float32
    only: they form the logits in the inputs' dtype (float16 gradients ~3e-3 off, past
    its tolerance; GRPO's bfloat16 logits move tokens across the clip's kinks) and sum
    the weight gradient over their chunks in the weight's dtype (bfloat16: 3-4% off at
    504 pairs in `lossreg check`)."""
    from . import _peers_chunked as pc

    common = {**common, "dtypes": ("float32",)}
    why = {"dpo": "sigmoid, hinge; no ipo, label smoothing", "orpo": "equal chosen lengths "
           "only (Liger's NLL is a token mean over the batch)", "cpo": "its NLL weight "
           "rescaled to ours", "simpo": "length-normalized", "kto": "no desirable / undesirable weights"}
    for name in FUSED_PREFERENCE:
        cls = {"simpo": "SimPO"}.get(name, name.upper())
        yield f"fused_linear_{name}", Impl(
            "liger", getattr(pc, f"{name}_liger"), **common,
            description=f"Liger-Kernel chunked LigerFusedLinear{cls}Loss (eager "
                        f"PyTorch, a pair at a time); {why[name]}; no reduction='none'")
    yield "fused_linear_grpo", Impl(
        "liger", pc.grpo_liger, **common,
        description="Liger-Kernel chunked LigerFusedLinearGRPOLoss (eager PyTorch, a "
                    "sequence at a time, our advantages and log-probs); no reduction='none'")


@hookimpl
def register_implementations(register, losses):
    """Join only the losses present in this load (``losses``: the registered names), so
    a restricted load (LOSSREG_LOAD_PLUGINS) gives no unknown-loss warnings."""
    for loss, impl in _impls():
        if loss in losses:
            register(loss, impl)
