"""Numerics and validation of the rl family (reward_bt, dpo, ppo_clip, q_td), for every
implementation of each loss, Triton included (under the interpreter on CPU); the
standard per-loss tests are its `LossTester`s (``tests/loss_tester.py``).

Expected values are float64 computations written here, independently of the plugin's
references: the trainers' formulas (TRL's DPO variants, Llama 2's margin), per-row
loops, and analytic gradients.
"""

import math

import pytest
import torch

from lossreg.spec import UnsupportedOption

import lossreg
from loss_tester import LossTester

from family_helpers import (  # noqa: F401
    DEVICE,
    TOL,
    assert_close,
    gen,
    implementations,
    leaf,
    neg_log_sigmoid,
    rand,
    randn,
    reduce,
)



def sigmoid(u):
    return torch.where(u >= 0, 1 / (1 + torch.exp(-u)), torch.exp(u) / (1 + torch.exp(u)))


# ---------------------------------------------------------------- reward_bt
@pytest.mark.parametrize("name,impl", implementations("reward_bt"))
@pytest.mark.parametrize("margin", [None, "float", "tensor"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reward_bt_matches_bradley_terry_at_any_reward(name, impl, margin, reduction):
    g = gen(impl.name, margin, reduction)
    n = 777
    chosen, rejected = randn(g, n, scale=3), randn(g, n, scale=3)
    chosen[::5] = 1e4  # a pair ranked right by far (loss 0, gradient 0) ...
    rejected[1::5] = 1e4  # ... and wrong by far (loss 1e4, gradient -1)
    m = {None: None, "float": 0.75, "tensor": rand(g, n) * 2}[margin]
    kwargs = {} if m is None else {"margin": m}
    c, r = leaf(chosen), leaf(rejected)
    out = impl.fn(chosen=c, rejected=r, reduction=reduction, **kwargs)

    m64 = 0.0 if m is None else (torch.as_tensor(m, dtype=torch.float64, device=DEVICE))
    h = chosen.double() - rejected.double() - m64
    assert_close(out, reduce(neg_log_sigmoid(h), reduction), torch.float32, "loss")
    cot = rand(g, *out.shape) + 0.5
    gc, gr = torch.autograd.grad(out, (c, r), cot)
    scale = cot.double() / (n if reduction == "mean" else 1)
    expected = -sigmoid(-h) * scale  # d/dr_c of -log sigma(h)
    assert_close(gc, expected, torch.float32, "grad chosen")
    assert_close(gr, -expected, torch.float32, "grad rejected")
    assert torch.isfinite(out).all() and torch.isfinite(gc).all()


@pytest.mark.parametrize("name,impl", implementations("reward_bt"))
def test_reward_bt_margin_gets_no_gradient(name, impl):
    g = gen(impl.name, "margin_grad")
    c, r, m = leaf(randn(g, 50)), leaf(randn(g, 50)), leaf(rand(g, 50))
    out = impl.fn(chosen=c, rejected=r, margin=m)
    grads = torch.autograd.grad(out, (c, m), allow_unused=True)
    assert grads[1] is None or not grads[1].any()


# ---------------------------------------------------------------- dpo
def dpo_expected(pc, pr, rc, rr, beta, ls, loss_type):
    """TRL's DPOTrainer.dpo_loss for each loss_type, in float64."""
    logits = (pc - pr) - (rc - rr)
    if loss_type == "sigmoid":
        return (1 - ls) * neg_log_sigmoid(beta * logits) + ls * neg_log_sigmoid(-beta * logits)
    if loss_type == "ipo":
        return (logits - 1 / (2 * beta)) ** 2
    return torch.clamp(1 - beta * logits, min=0)


def dpo_dlogits(pc, pr, rc, rr, beta, ls, loss_type):
    logits = (pc - pr) - (rc - rr)
    if loss_type == "sigmoid":
        u = beta * logits
        return beta * (-(1 - ls) * sigmoid(-u) + ls * sigmoid(u))
    if loss_type == "ipo":
        return 2 * (logits - 1 / (2 * beta))
    return torch.where(1 - beta * logits > 0, -beta, 0.0).to(logits.dtype)


def dpo_batch(g, n, dtype=torch.float32):
    ref_c = -(20 + 200 * rand(g, n, dtype=torch.float64))
    ref_r = -(20 + 200 * rand(g, n, dtype=torch.float64))
    pol_c = torch.clamp(ref_c + 6 * randn(g, n, dtype=torch.float64), max=-0.01)
    pol_r = torch.clamp(ref_r + 6 * randn(g, n, dtype=torch.float64), max=-0.01)
    return [t.to(dtype) for t in (pol_c, pol_r, ref_c, ref_r)]


DPO_VARIANTS = [("sigmoid", 0.1, 0.0), ("sigmoid", 0.3, 0.2), ("ipo", 0.1, 0.0),
                ("ipo", 0.7, 0.0), ("hinge", 0.1, 0.0), ("hinge", 0.03, 0.0)]


@pytest.mark.parametrize("name,impl", implementations("dpo"))
@pytest.mark.parametrize("loss_type,beta,ls", DPO_VARIANTS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_dpo_matches_trl_formulas(name, impl, loss_type, beta, ls, reduction):
    g = gen(impl.name, loss_type, beta, ls, reduction)
    pc, pr, rc, rr = dpo_batch(g, 513)
    lc, lr, lrc, lrr = leaf(pc), leaf(pr), leaf(rc), leaf(rr)
    try:
        out = impl.fn(policy_chosen_logps=lc, policy_rejected_logps=lr,
                      reference_chosen_logps=lrc, reference_rejected_logps=lrr, beta=beta,
                      label_smoothing=ls, loss_type=loss_type, reduction=reduction)
    except UnsupportedOption as exc:  # a peer that cannot express it says so
        pytest.skip(str(exc))
    args64 = [t.double() for t in (pc, pr, rc, rr)]
    assert_close(out, reduce(dpo_expected(*args64, beta, ls, loss_type), reduction),
                 torch.float32, "loss")
    cot = rand(g, *out.shape) + 0.5
    grads = torch.autograd.grad(out, (lc, lr, lrc, lrr), cot, allow_unused=True)
    dh = dpo_dlogits(*args64, beta, ls, loss_type) * cot.double() / (
        513 if reduction == "mean" else 1)
    assert_close(grads[0], dh, torch.float32, "grad policy chosen")
    assert_close(grads[1], -dh, torch.float32, "grad policy rejected")
    # the reference model is frozen: its log-probs never get a gradient
    for grad in grads[2:]:
        assert grad is None or not grad.any()


@pytest.mark.parametrize("name,impl", implementations("dpo"))
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_dpo_is_finite_at_extreme_log_ratios(name, impl, loss_type):
    g = gen(impl.name, loss_type, "extreme")
    pc, pr, rc, rr = dpo_batch(g, 120)
    pc[::3] = -1e5  # beta h ~ -1e4: the policy prefers the rejected answer by far
    pr[1::3] = -1e5  # beta h ~ +1e4
    lc, lr = leaf(pc), leaf(pr)
    try:
        out = impl.fn(policy_chosen_logps=lc, policy_rejected_logps=lr,
                      reference_chosen_logps=rc, reference_rejected_logps=rr, beta=0.1,
                      loss_type=loss_type, reduction="sum")
    except UnsupportedOption as exc:  # a peer that cannot express it says so
        pytest.skip(str(exc))
    gc, gr = torch.autograd.grad(out, (lc, lr))
    assert torch.isfinite(out) and torch.isfinite(gc).all() and torch.isfinite(gr).all()
    args64 = [t.double() for t in (pc, pr, rc, rr)]
    assert_close(out, dpo_expected(*args64, 0.1, 0.0, loss_type).sum(), torch.float32, "loss")
    assert_close(gc, dpo_dlogits(*args64, 0.1, 0.0, loss_type), torch.float32, "grad")
    if loss_type == "sigmoid":  # saturated: gradient -beta where far wrong, 0 where far right
        assert torch.allclose(gc[::3].double(), torch.full_like(gc[::3].double(), -0.1))
        assert not gc[1::3].any()


@pytest.mark.parametrize("name,impl", implementations("dpo"))
def test_dpo_bfloat16_log_probs(name, impl):
    """Sequence log-probs of hundreds of nats in bfloat16: the loss of those (rounded)
    values within bfloat16's tolerance."""
    g = gen(impl.name, "bf16")
    pc, pr, rc, rr = dpo_batch(g, 300, torch.bfloat16)
    try:
        out = impl.fn(policy_chosen_logps=pc, policy_rejected_logps=pr,
                      reference_chosen_logps=rc, reference_rejected_logps=rr, loss_type="ipo",
                      reduction="none")
    except UnsupportedOption as exc:  # a peer that cannot express it says so
        pytest.skip(str(exc))
    assert out.dtype == torch.bfloat16
    expected = dpo_expected(*[t.double() for t in (pc, pr, rc, rr)], 0.1, 0.0, "ipo")
    assert_close(out, expected, torch.bfloat16, "ipo loss")


# ---------------------------------------------------------------- ppo_clip
def rollout(g, n, t, per_sequence=False, dtype=torch.float32):
    old = -3 * rand(g, n, t, dtype=torch.float64) - 0.01
    new = old + 0.25 * randn(g, n, t, dtype=torch.float64)
    start = (rand(g, n, dtype=torch.float64) * t * 0.5).long()
    length = 1 + (rand(g, n, dtype=torch.float64) * (t - start)).long()
    pos = torch.arange(t, device=DEVICE)
    mask = (pos >= start[:, None]) & (pos < (start + length)[:, None])
    adv = randn(g, n, dtype=torch.float64) if per_sequence else randn(g, n, t,
                                                                       dtype=torch.float64)
    return new.to(dtype), old.to(dtype), adv.to(dtype), mask


def ppo_expected(lp, old, adv, mask, eps):
    """Per row, a loop over its masked tokens of -min(rho A, clip(rho) A), averaged."""
    rows = []
    for i in range(lp.shape[0]):
        total, count = lp.new_zeros(()), 0
        for t in range(lp.shape[1]):
            if mask[i, t]:
                a = adv[i] if adv.dim() == 1 else adv[i, t]
                rho = torch.exp(lp[i, t] - old[i, t])
                total = total - torch.minimum(rho * a, rho.clamp(1 - eps, 1 + eps) * a)
                count += 1
        rows.append(total / count)
    return torch.stack(rows)


@pytest.mark.parametrize("name,impl", implementations("ppo_clip"))
@pytest.mark.parametrize("per_sequence", [False, True])
@pytest.mark.parametrize("reduction,eps", [("mean", 0.2), ("sum", 0.1), ("none", 0.3)])
def test_ppo_clip_matches_per_token_loop(name, impl, per_sequence, reduction, eps):
    g = gen(impl.name, per_sequence, reduction)
    lp, old, adv, mask = rollout(g, 7, 45, per_sequence)
    x = leaf(lp)
    out = impl.fn(log_probs=x, old_log_probs=old, advantages=adv, mask=mask, clip_eps=eps,
                  reduction=reduction)
    x64 = leaf(lp.double())
    expected = reduce(ppo_expected(x64, old.double(), adv.double(), mask, eps), reduction)
    assert_close(out, expected, torch.float32, "loss")
    cot = rand(g, *out.shape) + 0.5
    (gx,) = torch.autograd.grad(out, (x,), cot)
    (ex,) = torch.autograd.grad(expected, (x64,), cot.double())
    assert_close(gx, ex, torch.float32, "grad")
    assert not gx[~mask].any(), "masked-out tokens must get exactly 0"


@pytest.mark.parametrize("name,impl", implementations("ppo_clip"))
def test_ppo_clip_gradient_is_zero_where_the_clip_is_active(name, impl):
    """Ratios e^{+-3}, far outside [0.8, 1.2]: the clipped term is the minimum (zero
    gradient) for rho > 1+eps with A > 0 and rho < 1-eps with A < 0; the unclipped one
    otherwise (gradient -rho A / count)."""
    g = gen(impl.name, "clip")
    n, t = 4, 40
    old = -2 * rand(g, n, t) - 0.1
    up = rand(g, n, t) < 0.5
    lp = old + torch.where(up, 3.0, -3.0)
    adv = torch.where(rand(g, n, t) < 0.5, 1.0, -1.0) * (rand(g, n, t) + 0.5)
    mask = torch.ones(n, t, dtype=torch.bool, device=DEVICE)
    x = leaf(lp)
    out = impl.fn(log_probs=x, old_log_probs=old, advantages=adv, mask=mask, reduction="sum")
    (gx,) = torch.autograd.grad(out, (x,))
    clipped = (up & (adv > 0)) | (~up & (adv < 0))
    assert torch.equal(gx[clipped], torch.zeros_like(gx[clipped]))
    rho = torch.exp(lp.double() - old.double())
    expected = -rho * adv.double() / t
    torch.testing.assert_close(gx[~clipped].double(), expected[~clipped], rtol=1e-5, atol=0)
    # the clipped loss is the clipped value: -(1 + eps) A or -(1 - eps) A
    rho_c = torch.where(up, 1.2, 0.8).double()
    per_tok = torch.where(clipped, -rho_c * adv.double(), -rho * adv.double())
    assert_close(out, (per_tok.sum(1) / t).sum(), torch.float32, "loss")


@pytest.mark.parametrize("name,impl", implementations("ppo_clip"))
def test_ppo_clip_ignores_whatever_padding_holds(name, impl):
    g = gen(impl.name, "padding")
    lp, old, adv, mask = rollout(g, 6, 33)
    mask[:, :] = False
    mask[torch.arange(6), torch.tensor([0, 5, 32, 17, 9, 30])] = True  # one token per row
    pad = ~mask
    x = leaf(lp.masked_fill(pad, float("-inf")))
    out = impl.fn(log_probs=x, old_log_probs=old.masked_fill(pad, float("nan")),
                  advantages=adv.masked_fill(pad, float("inf")), mask=mask, reduction="none")
    clean = ppo_expected(lp.double(), old.double(), adv.double(), mask, 0.2)
    assert_close(out, clean, torch.float32, "loss")
    (gx,) = torch.autograd.grad(out.sum(), (x,))
    assert torch.isfinite(gx).all() and not gx[pad].any()


# ---------------------------------------------------------------- q_td
def td_batch(g, n, n_act, dtype=torch.float32):
    q = randn(g, n, n_act, scale=2, dtype=dtype)
    actions = torch.randint(0, n_act, (n,), generator=g).to(DEVICE)
    rewards = randn(g, n, dtype=dtype)
    dones = (rand(g, n) < 0.2).to(dtype)
    target_q = q + randn(g, n, n_act, dtype=dtype)
    return q, actions, rewards, dones, target_q


def td_expected(q, actions, rewards, dones, target_q, gamma, delta):
    """Huber of the TD error, row by row, float64; and d loss_i / d Q[i, a_i]."""
    losses, slopes = [], []
    for i in range(q.shape[0]):
        y = rewards[i] + gamma * (1 - dones[i]) * max(target_q[i].tolist())
        u = float(q[i, actions[i]]) - float(y)
        inside = abs(u) <= delta
        losses.append(0.5 * u * u if inside else delta * (abs(u) - 0.5 * delta))
        slopes.append(u if inside else math.copysign(delta, u))
    return torch.tensor(losses, dtype=torch.float64), torch.tensor(slopes, dtype=torch.float64)


@pytest.mark.parametrize("name,impl", implementations("q_td"))
@pytest.mark.parametrize("reduction,gamma,delta,n_act", [
    ("mean", 0.99, 1.0, 6), ("sum", 0.5, 0.25, 18), ("none", 0.0, 2.0, 5),
    ("none", 0.9, 1.0, 1500)])
def test_q_td_matches_dqn_target_and_detaches_it(name, impl, reduction, gamma, delta, n_act):
    g = gen(impl.name, reduction, n_act)
    n = 37
    q, actions, rewards, dones, target_q = td_batch(g, n, n_act)
    lq, lt, lr = leaf(q), leaf(target_q), leaf(rewards)
    out = impl.fn(q=lq, actions=actions, rewards=lr, dones=dones, target_q=lt, gamma=gamma,
                  delta=delta, reduction=reduction)
    losses, slopes = td_expected(q.double().cpu(), actions.cpu(), rewards.double().cpu(),
                                 dones.double().cpu(), target_q.double().cpu(), gamma, delta)
    assert_close(out, reduce(losses, reduction), torch.float32, "loss")
    cot = rand(g, *out.shape) + 0.5
    gq, gt, gr = torch.autograd.grad(out, (lq, lt, lr), cot, allow_unused=True)
    expected = torch.zeros(n, n_act, dtype=torch.float64)
    expected[torch.arange(n), actions.cpu()] = slopes * cot.double().cpu() / (
        n if reduction == "mean" else 1)
    assert_close(gq, expected, torch.float32, "grad q")
    off_action = torch.ones(n, n_act, dtype=torch.bool)
    off_action[torch.arange(n), actions.cpu()] = False
    assert not gq.cpu()[off_action].any(), "only Q(s, a) of the action taken gets a gradient"
    # the target is a constant: no gradient to target_q or rewards, ever
    for grad in (gt, gr):
        assert grad is None or not grad.any()


# ---------------------------------------------------------------- validation
def _ppo_args(g):
    lp, old, adv, mask = rollout(g, 3, 8)
    return {"log_probs": lp, "old_log_probs": old, "advantages": adv, "mask": mask}


def _td_args(g):
    q, a, r, d, t = td_batch(g, 5, 4)
    return {"q": q, "actions": a, "rewards": r, "dones": d, "target_q": t}


def _dpo_args(g):
    return dict(zip(("policy_chosen_logps", "policy_rejected_logps", "reference_chosen_logps",
                     "reference_rejected_logps"), dpo_batch(g, 6)))


BAD_INPUTS = [
    ("reward_bt", lambda g: {"chosen": randn(g, 5), "rejected": randn(g, 4)}, ValueError,
     r"reward_bt: rejected must have shape \(5,\)"),
    ("reward_bt", lambda g: {"chosen": randn(g, 5), "rejected": randn(g, 5),
                             "margin": randn(g, 3)}, ValueError, r"margin of shape \(3,\)"),
    ("reward_bt", lambda g: {"chosen": randn(g, 5), "rejected": randn(g, 5), "margin": "1"},
     TypeError, "margin must be a number"),
    ("reward_bt", lambda g: {"chosen": torch.arange(5), "rejected": randn(g, 5)}, TypeError,
     "chosen must be a floating-point tensor"),
    ("dpo", lambda g: {**_dpo_args(g), "beta": 0.0}, ValueError, r"beta must lie in \(0, inf\)"),
    ("dpo", lambda g: {**_dpo_args(g), "loss_type": "kto"}, ValueError,
     "loss_type must be one of"),
    ("dpo", lambda g: {**_dpo_args(g), "label_smoothing": 0.7}, ValueError,
     r"label_smoothing must lie in \[0, 0.5\]"),
    ("dpo", lambda g: {**_dpo_args(g), "loss_type": "ipo", "label_smoothing": 0.1},
     ValueError, "label_smoothing .* applies to loss_type='sigmoid' only"),
    ("dpo", lambda g: {**_dpo_args(g), "reference_rejected_logps": randn(g, 7)}, ValueError,
     "reference_rejected_logps must have shape"),
    ("ppo_clip", lambda g: {**_ppo_args(g), "mask": torch.zeros(3, 8, device=DEVICE)},
     ValueError, "mask must have at least one 1 in every row.*row 0"),
    ("ppo_clip", lambda g: {**_ppo_args(g), "mask": torch.full((3, 8), 0.5, device=DEVICE)},
     ValueError, "mask must hold only 0 and 1, got 0.5"),
    ("ppo_clip", lambda g: {**_ppo_args(g), "advantages": randn(g, 8)}, ValueError,
     r"advantages must have shape \(3, 8\) .* or \(3,\)"),
    ("ppo_clip", lambda g: {**_ppo_args(g), "clip_eps": 1.5}, ValueError,
     r"clip_eps must lie in \(0, 1\)"),
    ("ppo_clip", lambda g: {**_ppo_args(g), "log_probs": randn(g, 24)}, ValueError,
     r"log_probs must be \(N, T\)"),
    ("q_td", lambda g: {**_td_args(g), "actions": torch.tensor([0, 1, 4, 2, 3])}, ValueError,
     r"actions must hold indices in \[0, 3\], got 4"),
    ("q_td", lambda g: {**_td_args(g), "actions": randn(g, 5)}, TypeError,
     "actions must hold integer indices"),
    ("q_td", lambda g: {**_td_args(g), "dones": torch.full((5,), 2.0)}, ValueError,
     "dones must hold only 0 and 1"),
    ("q_td", lambda g: {**_td_args(g), "gamma": 1.5}, ValueError, r"gamma must lie in \[0, 1\]"),
    ("q_td", lambda g: {**_td_args(g), "delta": 0.0}, ValueError, "delta must lie in"),
    ("q_td", lambda g: {**_td_args(g), "target_q": randn(g, 5, 3)}, ValueError,
     r"target_q must have shape \(5, 4\)"),
    ("q_td", lambda g: {**_td_args(g), "reduction": "avg"}, ValueError,
     "q_td: reduction must be one of"),
]


@pytest.mark.parametrize("name,make,exc,match", BAD_INPUTS,
                         ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD_INPUTS)])
def test_bad_inputs_are_rejected_by_every_implementation(name, make, exc, match):
    for impl in lossreg.get(name).implementations.values():
        if impl.backend == "compile" or impl.missing_requirements():
            continue
        with pytest.raises(exc, match=match):
            impl.fn(**make(gen(name, match)))


# ---------------------------------------------------------------- the shared tester
class TestDpo(LossTester):
    loss = "dpo"


class TestPpoClip(LossTester):
    loss = "ppo_clip"


class TestQTd(LossTester):
    loss = "q_td"


class TestRewardBt(LossTester):
    loss = "reward_bt"
