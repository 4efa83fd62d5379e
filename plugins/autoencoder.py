"""Section 14, autoencoders: reconstruction error summed over features and averaged over
samples (``reconstruction``), and the masked-autoencoder loss over masked patches only
(``masked_reconstruction``).

Targets (the data) and masks are constants of these losses: ``grad_inputs`` is the
reconstruction alone. Every implementation still differentiates a target that requires
a gradient, as torch's built-ins do.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lossreg import Impl, LossSpec, hookimpl
from lossreg.kernels.traffic import streamed
from lossreg.kernels import jit, tl
from lossreg.kernels.aligned_rows import aligned_rows_loss
from lossreg.validate import check_choice, check_reduction

from . import _per_sample
from ._common import reduce_loss, reductions
from lossreg.validate import check_float, check_mask, check_shape, check_values

LOSS_TYPES = ("mse", "bce")


def _features(t: torch.Tensor) -> int:
    return math.prod(t.shape[1:])


# ---------------------------------------------------------------- reconstruction
def _validate_reconstruction(input, target, loss_type, reduction):
    check_float("reconstruction", input=input, target=target)
    if input.dim() < 2 or _features(input) == 0:
        raise ValueError("reconstruction: input must be (N, *features) with at least one "
                         f"feature (one reconstructed sample per row), got shape "
                         f"{tuple(input.shape)}")
    check_shape("reconstruction", "target", target, input.shape, "the shape of input")
    check_choice("reconstruction", "loss_type", loss_type, LOSS_TYPES)
    check_reduction("reconstruction", reduction)
    if loss_type == "bce":
        check_values("reconstruction", "input", input, 0.0, 1.0,
                     "probabilities, for loss_type='bce'")
        check_values("reconstruction", "target", target, 0.0, 1.0,
                     "intensities in [0, 1], for loss_type='bce'")


def _clamped_log(p: torch.Tensor) -> torch.Tensor:
    """max(log p, -100), torch's clamp. Where the clamp is active the gradient is 0; the
    inner where keeps log(0) = -inf from turning that 0 into 0 * inf = nan."""
    positive = p > 0
    log_p = torch.log(torch.where(positive, p, torch.ones_like(p)))
    return torch.where(positive, log_p, torch.full_like(p, -100.0)).clamp(min=-100.0)


def reconstruction_reference(input, target, loss_type="mse", reduction="mean"):
    """Per sample, the squared error (or binary cross-entropy) summed over its features."""
    _validate_reconstruction(input, target, loss_type, reduction)
    if loss_type == "mse":
        per_element = (input - target) ** 2
    else:
        per_element = -(target * _clamped_log(input) + (1 - target) * _clamped_log(1 - input))
    return reduce_loss(per_element.flatten(1).sum(dim=1), reduction)


def reconstruction_torch(input, target, loss_type="mse", reduction="mean"):
    """F.mse_loss / F.binary_cross_entropy summed, then divided by the number of samples."""
    _validate_reconstruction(input, target, loss_type, reduction)
    fn = F.mse_loss if loss_type == "mse" else F.binary_cross_entropy
    if reduction == "none":
        return fn(input, target, reduction="none").flatten(1).sum(dim=1)
    total = fn(input, target, reduction="sum")
    return total / input.shape[0] if reduction == "mean" else total


_RECONSTRUCTION_KERNELS = {"mse": _per_sample.squared_error, "bce": _per_sample.bce_probabilities}


def reconstruction_triton(input, target, loss_type="mse", reduction="mean"):
    _validate_reconstruction(input, target, loss_type, reduction)
    return _RECONSTRUCTION_KERNELS[loss_type](input, target, reduction)


def reconstruction_inputs(case, n=None, shape=None):
    """A reconstruction close to its target: Gaussian data for mse; for bce, intensities
    in [0, 1] (a third of them exactly 0 or 1, as in binarized images) and sigmoid outputs
    strictly inside (0, 1)."""
    n = case.n if n is None else n
    shape = (n, *(shape or (int(case.params.get("features", 96)),)))
    if case.params.get("loss_type", "mse") == "bce":
        x = case.rand(*shape)
        hard = case.rand(*shape) < 1 / 3
        x = torch.where(hard, (x > 0.5).to(x.dtype), x)
        p = 0.01 + 0.98 * torch.sigmoid(torch.logit(0.02 + 0.96 * x) + 0.5 * case.randn(*shape))
        return {"input": p, "target": x}
    x = case.randn(*shape)
    return {"input": x + 0.3 * case.randn(*shape), "target": x}


def _large_errors(case):
    """Errors of tens (per-sample sums within float16's range)."""
    inputs = reconstruction_inputs(case, 5, (13,))
    return {"input": inputs["input"] * 25, "target": inputs["target"]}


RECONSTRUCTION_EDGE_CASES = {
    "one_element": lambda case: reconstruction_inputs(case, 1, (1,)),
    "features_block_plus_one": lambda case: reconstruction_inputs(case, 1, (4097,)),
    "image_batch": lambda case: reconstruction_inputs(case, 5, (3, 7, 9)),
    "wide_rows": lambda case: reconstruction_inputs(case, 3, (4099,)),
    "large_errors": _large_errors,
}


# ---------------------------------------------------------------- masked_reconstruction
def _validate_masked(input, target, mask, reduction):
    check_float("masked_reconstruction", input=input, target=target)
    if input.dim() != 3 or input.shape[2] == 0:
        raise ValueError("masked_reconstruction: input must be (N, L, D): L patches of D >= 1 "
                         f"values per image, got shape {tuple(input.shape)}")
    check_shape("masked_reconstruction", "target", target, input.shape, "the shape of input")
    check_mask("masked_reconstruction", "mask", mask, input.shape[:2],
               "one 0/1 per patch, 1 = masked")
    if mask.device != input.device:
        raise ValueError(f"masked_reconstruction: mask must be on input's device "
                         f"{input.device}, got {mask.device}")
    check_reduction("masked_reconstruction", reduction)


def masked_reconstruction_reference(input, target, mask, reduction="mean"):
    """Per patch, the mean squared error over its D values, kept where the mask is 1;
    ``mean`` divides by the number of masked patches (NaN, with zero gradients, when
    there is none). Unmasked patches are never read into the loss (torch.where, not a
    product), so their values cannot leak a NaN."""
    _validate_masked(input, target, mask, reduction)
    keep = mask != 0
    diff = torch.where(keep[..., None], input - target, torch.zeros_like(input))
    per_patch = (diff * diff).mean(dim=-1)
    if reduction == "none":
        return per_patch
    total = per_patch.sum()
    if reduction == "sum":
        return total
    return total / keep.sum()


def masked_reconstruction_torch(input, target, mask, reduction="mean"):
    """MAE's formulation: F.mse_loss per element, mean over D, times the mask."""
    _validate_masked(input, target, mask, reduction)
    per_patch = F.mse_loss(input, target, reduction="none").mean(dim=-1) * mask.to(input.dtype)
    if reduction == "none":
        return per_patch
    return per_patch.sum() / mask.sum() if reduction == "mean" else per_patch.sum()


@jit
def _masked_sq_rows(a, b, c, valid, y, p0, p1, p2, p3):
    """Row loss y * sum (a - b)^2 / p0 / p1 (p0 = D, p1 = masked patches or 1); rows with
    y = 0 contribute exactly 0, whatever they hold."""
    keep = y != 0.0
    d = tl.where(keep[:, None], a - b, 0.0)
    w = tl.where(keep, 1.0, 0.0).to(y.dtype) / p0 / p1  # in the tile's precision
    grad = 2.0 * w[:, None] * d
    return w * tl.sum(d * d, axis=1), grad, -grad, grad


_masked_kernel = aligned_rows_loss(_masked_sq_rows, name="masked_reconstruction",
                                   operands=2, labels=True, aot_widths=(48, 768, 4096))


def masked_reconstruction_triton(input, target, mask, reduction="mean"):
    """Patches are the aligned-rows template's rows, the mask its row labels. For ``mean``
    the number of masked patches is read on the host (one sync) so that the gradient is
    final in the forward; the template's backward syncs to test the incoming gradient
    anyway."""
    _validate_masked(input, target, mask, reduction)
    n, length, dim = input.shape
    rows = n * length
    a, b = input.reshape(rows, dim), target.reshape(rows, dim)
    y = mask.reshape(rows).to(input.dtype)
    if reduction == "none":
        return _masked_kernel(a, b, y=y, reduction="none", p0=dim, p1=1.0).view(n, length)
    count = int(torch.count_nonzero(mask)) if reduction == "mean" else 1
    out = _masked_kernel(a, b, y=y, reduction="sum", p0=dim, p1=max(count, 1))
    # nothing masked: torch's mean of nothing, NaN, with the (zero) gradients unchanged
    return out + float("nan") if count == 0 else out


def masked_inputs(case, n=None, patches=None, dim=None, ratio=None):
    """Patches (N, L, D) and their reconstruction, and MAE's mask: exactly
    round(ratio * L) random patches of each image are masked (bool, 1 = masked)."""
    n = case.n if n is None else n
    patches = int(case.params.get("patches", 16)) if patches is None else patches
    dim = int(case.params.get("patch_dim", 48)) if dim is None else dim
    ratio = float(case.params.get("mask_ratio", 0.75)) if ratio is None else ratio
    target = case.randn(n, patches, dim)
    ranks = case.rand(n, patches, dtype=torch.float32).argsort(dim=1).argsort(dim=1)
    mask = ranks < max(round(ratio * patches), 1)
    return {"input": target + 0.5 * case.randn(n, patches, dim), "target": target,
            "mask": mask}


def _single_masked(case):
    inputs = masked_inputs(case, 3, 16, 48)
    mask = torch.zeros_like(inputs["mask"])
    mask[1, 7] = True
    return {**inputs, "mask": mask}


MASKED_EDGE_CASES = {
    "one_patch": lambda case: masked_inputs(case, 1, 1, 1, 1.0),
    "single_masked_patch": _single_masked,
    "odd_sizes": lambda case: masked_inputs(case, 5, 49, 37),
    "float_mask": lambda case: {**masked_inputs(case, 4, 9, 20),
                                "mask": masked_inputs(case, 4, 9, 20)["mask"].to(case.dtype)},
    "everything_masked": lambda case: masked_inputs(case, 2, 8, 16, 1.0),
}


# ---------------------------------------------------------------- registration
def _sample_flops(fwd, bwd):
    def model(inputs):
        n = inputs["input"].numel()
        return {"forward": fwd * n, "backward": bwd * n, "full": (fwd + bwd) * n}
    return model


def _masked_mean_count(inputs, options):
    """What ``mean`` divides by: the number of masked patches."""
    return float(torch.count_nonzero(inputs["mask"]))


@hookimpl
def register_losses(register):
    register(LossSpec(
        name="reconstruction",
        family="autoencoder",
        title="Autoencoder reconstruction error",
        formula=(r"\frac{1}{n}\sum_{i=1}^{n}\lVert x_i-\hat x_i\rVert_2^2;\ "
                 r"\mathrm{bce}:\ \frac{1}{n}\sum_{i=1}^{n}\sum_{j} -\left[x_{ij}"
                 r"\max(\log\hat x_{ij},-100) + (1-x_{ij})\max(\log(1-\hat x_{ij}),-100)\right]"),
        description=(
            "Reconstruction error of an autoencoder: per sample (the first axis of input "
            "(N, *features)), the squared error summed over all its features, averaged over "
            "samples for `mean` (unlike F.mse_loss, which averages over features too); "
            "`none` gives one loss per sample. loss_type='bce' is binary cross-entropy of "
            "probabilities (sigmoid outputs) against intensities in [0, 1], each log "
            "clamped at -100 as torch does. Gradients go to the reconstruction (`input`)."),
        citation="Hinton & Salakhutdinov (2006), Reducing the dimensionality of data with "
                 "neural networks; torch.nn.functional.mse_loss / binary_cross_entropy",
        reference=reconstruction_reference,
        make_inputs=reconstruction_inputs,
        options={"loss_type": "mse", "reduction": "mean"},
        check_options=reductions() + [{"loss_type": "bce"},
                                      {"loss_type": "bce", "reduction": "sum"},
                                      {"loss_type": "bce", "reduction": "none"}],
        grad_inputs=("input",),
        sizes={"quick": [8, 33], "default": [2**10, 2**13, 2**15],
               "large": [2**14, 2**16]},
        x_name="samples",
        input_params={"quick": {"features": 96}, "default": {"features": 784},
                      "large": {"features": 3072}},
        flops=_sample_flops(3, 2),
        edge_cases=RECONSTRUCTION_EDGE_CASES,
    ))
    register(LossSpec(
        name="masked_reconstruction",
        input_domains={"mask": ("values", (0, 1))},
        family="autoencoder",
        title="Masked-autoencoder reconstruction (MAE)",
        formula=(r"\frac{\sum_{i,l} m_{il}\,\frac{1}{D}\sum_{d=1}^{D}(\hat x_{ild}-x_{ild})^2}"
                 r"{\sum_{i,l} m_{il}}"),
        description=(
            "MAE's loss: patches (N, L, D) of images and their reconstruction, a mask "
            "(N, L) with 1 on the masked (hidden, reconstructed) patches. Per patch the "
            "mean squared error over its D values; only masked patches count, and `mean` "
            "divides by their number (NaN with zero gradients when none is masked, like "
            "torch's mean over nothing). `none` gives the (N, L) per-patch losses, 0 on "
            "visible patches; `sum` their sum. Visible patches never enter the loss, "
            "whatever they hold."),
        citation="He et al. (2022), Masked Autoencoders Are Scalable Vision Learners",
        reference=masked_reconstruction_reference,
        make_inputs=masked_inputs,
        options={"reduction": "mean"},
        check_options=reductions(),
        grad_inputs=("input",),
        sizes={"quick": [2, 5], "default": [64, 256], "large": [512, 1024]},
        x_name="images",
        input_params={"quick": {"patches": 16, "patch_dim": 48, "mask_ratio": 0.75},
                      "default": {"patches": 196, "patch_dim": 768, "mask_ratio": 0.75},
                      "large": {"patches": 196, "patch_dim": 768, "mask_ratio": 0.75}},
        flops=_sample_flops(3, 2),
        edge_cases=MASKED_EDGE_CASES,
        mean_count=_masked_mean_count,
    ))


@hookimpl
def register_implementations(register):
    triton_kw = {"backend": "triton", "devices": ("cuda",), "grad_in_forward": True,
                 "requires": ("triton",)}
    register("reconstruction", Impl(
        "torch", reconstruction_torch, kind="baseline", backend="torch",
        description="F.mse_loss / F.binary_cross_entropy (sum), divided by the samples"))
    register("reconstruction", Impl(
        "triton", reconstruction_triton, bytes_model=streamed("input"), **triton_kw,
        description="pointwise template (mean/sum: one pass, gradient in the forward); "
                    "aligned-rows template for per-sample losses"))
    register("masked_reconstruction", Impl(
        "torch", masked_reconstruction_torch, kind="baseline", backend="torch",
        description="MAE's formulation: F.mse_loss, mean over D, times the mask"))
    register("masked_reconstruction", Impl(
        "triton", masked_reconstruction_triton, bytes_model=streamed("input"), **triton_kw,
        description="aligned-rows template, patches as rows and the mask as row labels: "
                    "one pass, gradient in the forward"))
