"""grpo and fused_linear_grpo (plugins/grpo.py): the loss-type normalizations, clipping
and the k3 KL term against a per-token numpy loop written from DeepSeekMath / Dr. GRPO /
DAPO, analytic gradients, and the chunked fused form against numpy log-softmax."""

import os

import numpy as np
import pytest
import torch

import lossreg
from lossreg.spec import Case
from lossreg_plugins import _fused_linear as fl

LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo"]


def np_grpo(lp, old, ref, rewards, mask, g, beta, el, eh, loss_type, max_len=None,
            num_tokens=None, scale=True):
    """A loop over sequences and tokens, in float64. Returns (loss, d loss / d lp)."""
    n, t = lp.shape
    adv = np.zeros(n)
    for k in range(0, n, g):
        r = rewards[k:k + g]
        adv[k:k + g] = (r - r.mean()) / (r.std(ddof=1) + 1e-4) if scale else r - r.mean()
    seq_loss, grad = np.zeros(n), np.zeros_like(lp)
    for i in range(n):
        for j in range(t):
            if not mask[i, j]:
                continue
            rho = np.exp(lp[i, j] - old[i, j])
            a = adv[i]
            clipped = min(max(rho, 1 - el), 1 + eh)
            unclipped_wins = rho * a <= clipped * a
            loss = -min(rho * a, clipped * a)
            d = -rho * a if unclipped_wins or clipped == rho else 0.0
            if beta:
                delta = ref[i, j] - lp[i, j]
                loss += beta * (np.exp(delta) - delta - 1)
                d += beta * (1 - np.exp(delta))
            seq_loss[i] += loss
            grad[i, j] = d
    count = mask.sum(1)
    if loss_type == "grpo":
        return np.mean(seq_loss / np.maximum(count, 1)), grad / np.maximum(count, 1)[:, None] / n
    div = {"bnpo": mask.sum(), "dr_grpo": n * (max_len or t),
           "dapo": num_tokens or mask.sum()}[loss_type]
    return seq_loss.sum() / div, grad / div


def make(n=2, tokens=13, dtype=torch.float64, seed=0, **params):
    spec = lossreg.get("grpo")
    return spec.make_inputs(Case(n, dtype, "cpu", seed=seed,
                                 params={**spec.case_params("quick", spec.options),
                                         "tokens": tokens, **params}))


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("beta,scale", [(0.04, True), (0.0, False)])
def test_reference_matches_a_token_loop(loss_type, beta, scale):
    x = make(seed=LOSS_TYPES.index(loss_type))
    # some tokens far outside the clip range on both sides
    x["log_probs"][:, ::3] = x["old_log_probs"][:, ::3] + 0.7
    x["log_probs"][:, 1::4] = x["old_log_probs"][:, 1::4] - 0.7
    eps_high = 0.28 if loss_type == "dapo" else 0.2
    opts = dict(group_size=4, beta=beta, epsilon_low=0.2, epsilon_high=eps_high,
                loss_type=loss_type, scale_rewards=scale,
                max_completion_length=20 if loss_type == "dr_grpo" else None,
                num_tokens=500 if loss_type == "dapo" else None)
    lp = x["log_probs"].clone().requires_grad_(True)
    out = lossreg.get("grpo").reference(**{**x, "log_probs": lp}, **opts)
    (g,) = torch.autograd.grad(out, lp)
    n = {k: v.numpy() for k, v in x.items()}
    want, dwant = np_grpo(n["log_probs"], n["old_log_probs"], n["ref_log_probs"],
                          n["rewards"], n["mask"], 4, beta, 0.2, eps_high, loss_type,
                          opts["max_completion_length"], opts["num_tokens"], scale)
    np.testing.assert_allclose(out.item(), want, rtol=1e-12)
    np.testing.assert_allclose(g.numpy(), dwant, rtol=1e-9, atol=1e-15)


def test_reductions_share_the_normalizer():
    x = make(n=3)
    ref = lossreg.get("grpo").reference
    for loss_type in LOSS_TYPES:
        none = ref(**x, loss_type=loss_type, reduction="none")
        total = ref(**x, loss_type=loss_type, reduction="sum")
        mean = ref(**x, loss_type=loss_type)
        assert none.shape == (12,)
        torch.testing.assert_close(none.sum(), total)
        spec = lossreg.get("grpo")
        div = spec.mean_count(x, {**spec.options, "loss_type": loss_type})
        torch.testing.assert_close(mean, total / div)


def test_rejects_incomplete_groups_and_missing_reference():
    x = make()
    ref = lossreg.get("grpo").reference
    with pytest.raises(ValueError, match="group_size"):
        ref(**{k: v[:-1] for k, v in x.items()})
    with pytest.raises(ValueError, match="ref_log_probs"):
        ref(**{k: v for k, v in x.items() if k != "ref_log_probs"}, beta=0.1)
    with pytest.raises(ValueError, match="max_completion_length"):
        ref(**x, loss_type="dr_grpo", max_completion_length=3)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_fused_chunked_matches_numpy(loss_type, monkeypatch):
    """fused_linear_grpo's chunked form (one sequence per chunk): log-probs from numpy's
    log-softmax of h W^T, then the token loop; gradients against the float64 reference."""
    monkeypatch.setattr(fl, "CHUNK_BYTES", 1)
    spec = lossreg.get("fused_linear_grpo")
    x = spec.make_inputs(Case(2, torch.float32, "cpu", seed=7,
                              params=spec.case_params("quick", spec.options)))
    opts = {"loss_type": loss_type, "epsilon_high": 0.28}
    leaves = {k: v.clone().requires_grad_(k in ("hidden", "weight")) for k, v in x.items()}
    out = spec.implementations["chunked"].fn(**leaves, **opts)
    h, w, y = (x[k].double().numpy() if k != "target" else x[k].numpy()
               for k in ("hidden", "weight", "target"))
    logits = h @ w.T
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    keep = y != -100
    lp = np.where(keep, np.take_along_axis(logp, np.where(keep, y, 0)[..., None], -1)[..., 0],
                  0.0)
    want, _ = np_grpo(lp, x["old_log_probs"].double().numpy(),
                      x["ref_log_probs"].double().numpy(), x["rewards"].double().numpy(),
                      keep, 4, 0.04, 0.2, 0.28, loss_type)
    np.testing.assert_allclose(out.item(), want, rtol=2e-5)
    x64 = {k: v.double().requires_grad_(k in ("hidden", "weight")) if v.is_floating_point()
           else v for k, v in x.items()}
    ref = spec.reference(**x64, **opts)
    g = torch.autograd.grad(out, [leaves["hidden"], leaves["weight"]])
    g64 = torch.autograd.grad(ref, [x64["hidden"], x64["weight"]])
    for a, b in zip(g, g64):
        assert float((a.double() - b).norm() / b.norm()) < 1e-5


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("LOSSREG_DEEP_TESTS") != "1",
                    reason="minutes of harness checks: LOSSREG_DEEP_TESTS=1")
def test_every_implementation_passes_check_in_bfloat16():
    df = lossreg.check(["grpo", "fused_linear_grpo"], device="cpu", dtypes=["bfloat16"],
                       case_timeout=0,
                       impls=["reference", "eager", "chunked"])
    bad = df[df.status.isin(["fail", "error"])]
    assert bad.empty, bad[["loss", "impl", "check", "n", "params", "message"]].to_string()
    assert set(df.loss) == {"grpo", "fused_linear_grpo"}


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_torch_and_triton_match_the_token_loop(impl, dtype):
    """Every loss type and reduction, beta on and off, clipped tokens on both sides; the
    ``none`` backward with a random incoming gradient; float64 to the last bits, float32
    to its rounding (the group's terms cancel: compared relative to the terms' scale)."""
    fn = lossreg.get("grpo").implementations[impl].fn
    x = make(n=3, tokens=45, seed=11)  # 45 tokens: no multiple of the kernel's blocks
    x["log_probs"][:, ::3] = x["old_log_probs"][:, ::3] + 0.7
    x["log_probs"][:, 1::4] = x["old_log_probs"][:, 1::4] - 0.7
    x["mask"][0, 5:9] = True
    n = {k: v.numpy() for k, v in x.items()}
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    gen = torch.Generator().manual_seed(3)
    for loss_type in LOSS_TYPES:
        for beta in (0.04, 0.0):
            want, dwant = np_grpo(n["log_probs"], n["old_log_probs"], n["ref_log_probs"],
                                  n["rewards"], n["mask"], 4, beta, 0.2, 0.28, loss_type)
            for reduction in ("mean", "sum", "none"):
                lp = x["log_probs"].to(dtype).requires_grad_(True)
                out = fn(**{**{k: v.to(dtype) if v.is_floating_point() else v
                               for k, v in x.items()}, "log_probs": lp},
                         beta=beta, epsilon_high=0.28, loss_type=loss_type,
                         reduction=reduction)
                g = (torch.randn(out.shape, generator=gen, dtype=torch.float64)
                     if reduction == "none" else torch.tensor(1.5, dtype=torch.float64))
                (grad,) = torch.autograd.grad(out, lp, g.to(dtype))
                div = {"grpo": 12, "bnpo": n["mask"].sum(), "dapo": n["mask"].sum(),
                       "dr_grpo": 12 * 45}[loss_type]
                total = out.double().sum().item() if reduction == "none" else out.item()
                np.testing.assert_allclose(total, want * (1 if reduction == "mean" else div),
                                           rtol=tol * 20)
                # d(each sequence's share) = d(mean) * div, times its incoming gradient
                rows = g.numpy()[:, None] if reduction == "none" else g.item()
                dw = dwant * (1 if reduction == "mean" else div) * rows
                err = np.abs(grad.double().numpy() - dw).max() / np.abs(dw).max()
                assert err < tol, (loss_type, beta, reduction, err)
                assert not grad[~x["mask"]].any()  # masked tokens: exactly 0
