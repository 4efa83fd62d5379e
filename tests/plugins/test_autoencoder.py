"""The autoencoder plugin (reconstruction, masked_reconstruction): per-sample sums and
means, per-patch loops, clamped probabilities, validation, for every implementation,
Triton included (under the interpreter on CPU), against float64 computations written
independently of the plugin's references; the standard per-loss tests are its
`LossTester`s.
"""

import math
import pytest
import torch
import lossreg
from lossreg.kernels.aligned_rows import MAX_D
from family_helpers import DEVICE, assert_close, gen, implementations, leaf, rand, randn, reduce
from generative_cases import BAD_INPUTS, per_row_scale
from loss_tester import LossTester


# ---------------------------------------------------------------- reconstruction
SHAPES = [(9, 40), (4, 3, 5, 7), (3, MAX_D + 3)]  # rows, images, rows wider than a tile


@pytest.mark.parametrize("name,impl", implementations("reconstruction"))
@pytest.mark.parametrize("shape", SHAPES, ids=["rows", "images", "wide"])
@pytest.mark.parametrize("loss_type", ["mse", "bce"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reconstruction_sums_features_and_averages_samples(name, impl, shape, loss_type,
                                                           reduction):
    g = gen(impl.name, shape, loss_type, reduction)
    n = shape[0]
    if loss_type == "mse":
        x = randn(g, *shape)
        x_hat = x + 0.5 * randn(g, *shape)
    else:
        x = rand(g, *shape)
        x[::2] = (x[::2] > 0.5).float()  # binarized samples next to grey ones
        x_hat = 0.02 + 0.96 * rand(g, *shape)
    xl = leaf(x_hat)
    out = impl.fn(input=xl, target=x, loss_type=loss_type, reduction=reduction)
    p, y = x_hat.double().cpu(), x.double().cpu()
    if loss_type == "mse":
        per_element, slope = (p - y) ** 2, 2 * (p - y)
    else:
        per_element = -(y * torch.log(p) + (1 - y) * torch.log(1 - p))
        slope = (p - y) / (p * (1 - p))
    per_sample = torch.stack([row.sum() for row in per_element])
    assert_close(out, reduce(per_sample, reduction), torch.float32, "loss")
    cot = rand(g, *out.shape) + 0.5
    (gx,) = torch.autograd.grad(out, (xl,), cot)
    assert_close(gx, slope * per_row_scale(cot, reduction, n, len(shape)), torch.float32,
                 "grad")


@pytest.mark.parametrize("name,impl", implementations("reconstruction"))
def test_reconstruction_bce_clamps_saturated_probabilities(name, impl):
    """p in {0, 1}: torch's clamp makes each log -100 (loss 100 where the target
    disagrees) and the formula's gradient 0 through a clamped log."""
    x_hat = torch.tensor([[0.0, 1.0, 0.0, 1.0, 0.3]], device=DEVICE)
    x = torch.tensor([[0.0, 1.0, 1.0, 0.0, 1.0]], device=DEVICE)
    out = impl.fn(input=x_hat, target=x, loss_type="bce", reduction="none")
    expected = 100.0 + 100.0 - math.log(0.3)
    torch.testing.assert_close(out.double().cpu(), torch.tensor([expected], dtype=torch.float64),
                               rtol=1e-6, atol=1e-5)


# ---------------------------------------------------------------- masked_reconstruction
def mae_expected(pred, target, mask):
    """Per masked patch, the mean over its values of the squared error; a loop."""
    n, length, _ = pred.shape
    per_patch = torch.zeros(n, length, dtype=torch.float64)
    for i in range(n):
        for j in range(length):
            if mask[i, j]:
                per_patch[i, j] = ((pred[i, j] - target[i, j]) ** 2).mean()
    return per_patch


@pytest.mark.parametrize("name,impl", implementations("masked_reconstruction"))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", [(3, 10, 48), (2, 7, 33)], ids=["mae", "odd"])
def test_masked_reconstruction_counts_masked_patches_only(name, impl, reduction, shape):
    g = gen(impl.name, reduction, shape)
    n, length, dim = shape
    target = randn(g, *shape)
    pred = target + randn(g, *shape)
    mask = rand(g, n, length) < 0.6
    mask[0, 0] = True
    if impl.name != "torch":  # MAE's formulation multiplies by the mask: NaN * 0 = NaN
        pred[~mask] = float("nan")  # visible patches are never read into the loss
    pl = leaf(pred)
    out = impl.fn(input=pl, target=target, mask=mask, reduction=reduction)
    p64, t64 = pred.double().cpu(), target.double().cpu()
    per_patch = mae_expected(p64, t64, mask.cpu())
    count = int(mask.sum())
    expected = {"none": per_patch, "sum": per_patch.sum(), "mean": per_patch.sum() / count}
    assert_close(out, expected[reduction], torch.float32, "loss")
    cot = rand(g, *out.shape) + 0.5
    (gp,) = torch.autograd.grad(out, (pl,), cot)
    c = cot.double().cpu()
    c = c[..., None] if reduction == "none" else c / (count if reduction == "mean" else 1)
    slope = torch.where(mask.cpu()[..., None], 2 * (p64 - t64) / dim, 0.0)
    assert_close(gp, slope * c, torch.float32, "grad")
    assert not gp[~mask].any(), "visible patches get exactly 0"


@pytest.mark.parametrize("name,impl", [p for p in implementations("masked_reconstruction")
                                       if p.id.endswith(("reference", "triton"))])
def test_masked_reconstruction_with_nothing_masked_is_nan_with_zero_gradient(name, impl):
    """torch's mean over nothing (as cross_entropy with every target ignored). MAE's own
    formulation, the torch baseline, backpropagates NaN there instead."""
    g = gen(impl.name, "empty")
    pred = leaf(randn(g, 2, 5, 8))
    out = impl.fn(input=pred, target=randn(g, 2, 5, 8),
                  mask=torch.zeros(2, 5, dtype=torch.bool, device=DEVICE))
    (gp,) = torch.autograd.grad(out, (pred,))
    assert out.isnan() and torch.equal(gp, torch.zeros_like(gp))


BAD = [b for b in BAD_INPUTS if lossreg.get(b[0]).plugin == "autoencoder"]


@pytest.mark.parametrize("name,make,exc,match", BAD,
                         ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_inputs_are_rejected_by_every_implementation(name, make, exc, match):
    for impl in lossreg.get(name).implementations.values():
        if impl.backend == "compile" or impl.missing_requirements():
            continue
        with pytest.raises(exc, match=match):
            impl.fn(**make(gen(name, match)))


class TestMaskedReconstruction(LossTester):
    loss = "masked_reconstruction"


class TestReconstruction(LossTester):
    loss = "reconstruction"
