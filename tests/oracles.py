"""Independent oracles: every built-in loss written again with code lossreg did not write
(numpy from the textbook formula, scipy.special, scipy.stats, scipy.spatial, torch.distributions),
on float64 numpy arrays. ``tests/oracle_check.py`` holds every implementation to them
(run by each loss's `loss_tester.LossTester`).

Each oracle takes the inputs (numpy arrays, named as the spec names them) and the options,
and returns the loss under the options' ``reduction``. Unknown options raise, so a new
option a spec declares cannot pass unchecked.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import special, stats
from scipy.spatial.distance import cdist
from torch.distributions import Bernoulli, Normal, kl_divergence

ORACLES: dict = {}


def oracle(*names):
    def deco(fn):
        for name in names:
            ORACLES[name] = fn
        return fn
    return deco


def _take(opts: dict, **defaults):
    """The options an oracle knows, with their defaults; anything else is an error."""
    unknown = set(opts) - set(defaults)
    if unknown:
        raise NotImplementedError(f"oracle has no formula for options {sorted(unknown)}")
    return [opts.get(k, v) for k, v in defaults.items()]


def _reduce(per, reduction, count=None):
    if reduction == "none":
        return per
    total = np.sum(per)
    if reduction == "sum":
        return total
    return total / (per.size if count is None else count)


# ------------------------------------------------------------------ pointwise regression
@oracle("mse")
def mse(input, target, **o):
    (red,) = _take(o, reduction="mean")
    return _reduce((input - target) ** 2, red)


@oracle("mae")
def mae(input, target, **o):
    (red,) = _take(o, reduction="mean")
    return _reduce(np.abs(target - input), red)


@oracle("huber")
def huber(input, target, **o):
    red, delta = _take(o, reduction="mean", delta=1.0)
    return _reduce(special.huber(delta, target - input), red)


@oracle("quantile")
def quantile(input, target, **o):
    red, tau = _take(o, reduction="mean", tau=0.5)
    r = target - input
    return _reduce(np.where(r >= 0, tau * r, (tau - 1) * r), red)


# ------------------------------------------------------------------ margins and exponentials
@oracle("exponential")
def exponential(input, target, **o):
    (red,) = _take(o, reduction="mean")
    return _reduce(np.exp(-target * input), red)


@oracle("samme")
def samme(input, target, **o):
    (red,) = _take(o, reduction="mean")
    k = input.shape[1]
    code = np.full(input.shape, -1.0 / (k - 1))
    code[np.arange(len(target)), target] = 1.0
    return _reduce(np.exp(-np.einsum("ik,ik->i", code, input) / k), red)


@oracle("hinge")
def hinge(input, target, **o):
    red, m = _take(o, reduction="mean", margin=1.0)
    return _reduce(np.maximum(0.0, m - target * input), red)


@oracle("squared_hinge")
def squared_hinge(input, target, **o):
    red, m = _take(o, reduction="mean", margin=1.0)
    return _reduce(np.maximum(0.0, m - target * input) ** 2, red)


@oracle("margin_ranking")
def margin_ranking(input1, input2, target, **o):
    red, m = _take(o, reduction="mean", margin=0.0)
    return _reduce(np.maximum(0.0, m - target * (input1 - input2)), red)


@oracle("multiclass_hinge")
def multiclass_hinge(input, target, weight=None, **o):
    red, m, p = _take(o, reduction="mean", margin=1.0, p=1)
    rows = np.arange(len(target))
    viol = np.maximum(0.0, m - input[rows, target][:, None] + input) ** p
    viol[rows, target] = 0.0
    per = viol.sum(1) / input.shape[1]
    if weight is not None:
        per = per * weight[target]
    return _reduce(per, red)


# ------------------------------------------------------------------ binary likelihoods
def _bernoulli_nll(p, y):
    """-(y log p + (1-y) log(1-p)), each log clamped at -100 (torch's convention)."""
    with np.errstate(divide="ignore"):
        return -(y * np.maximum(np.log(p), -100.0) + (1 - y) * np.maximum(np.log1p(-p), -100.0))


@oracle("bce")
def bce(input, target, weight=None, **o):
    (red,) = _take(o, reduction="mean")
    per = _bernoulli_nll(input, target)
    return _reduce(per if weight is None else per * weight, red)


@oracle("bce_with_logits")
def bce_with_logits(input, target, weight=None, pos_weight=None, **o):
    red, pw_opt = _take(o, reduction="mean", pos_weight=None)
    pw = pos_weight if pos_weight is not None else (1.0 if pw_opt is None else pw_opt)
    per = -(pw * target * special.log_expit(input) + (1 - target) * special.log_expit(-input))
    return _reduce(per if weight is None else per * weight, red)


@oracle("reward_bt")
def reward_bt(chosen, rejected, margin=None, **o):
    red, m = _take(o, reduction="mean", margin=0.0)
    m = margin if margin is not None else m
    return _reduce(-special.log_expit(chosen - rejected - m), red)


@oracle("dpo")
def dpo(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
        reference_rejected_logps, **o):
    red, beta, ls, kind = _take(o, reduction="mean", beta=0.1, label_smoothing=0.0,
                                loss_type="sigmoid")
    h = ((policy_chosen_logps - reference_chosen_logps)
         - (policy_rejected_logps - reference_rejected_logps))
    if kind == "sigmoid":
        per = -(1 - ls) * special.log_expit(beta * h) - ls * special.log_expit(-beta * h)
    elif kind == "ipo":
        per = (h - 1 / (2 * beta)) ** 2
    else:
        per = np.maximum(0.0, 1 - beta * h)
    return _reduce(per, red)


# ------------------------------------------------------------------ Gaussian likelihoods
def _t(a):
    return torch.from_numpy(np.asarray(a, dtype=np.float64))


@oracle("gaussian_nll")
def gaussian_nll(input, target, var, **o):
    red, full, eps = _take(o, reduction="mean", full=False, eps=1e-6)
    var = np.broadcast_to(var.reshape(var.shape + (1,) * (input.ndim - var.ndim))
                          if var.ndim < input.ndim else var, input.shape)
    v = np.maximum(var, eps)
    per = -stats.norm.logpdf(target, loc=input, scale=np.sqrt(v))
    if not full:
        per = per - 0.5 * math.log(2 * math.pi)
    return _reduce(per, red)


def _kl_std_normal(mu, logvar):
    post = Normal(_t(mu), torch.exp(0.5 * _t(logvar)))
    prior = Normal(torch.zeros(mu.shape, dtype=torch.float64), 1.0)
    return kl_divergence(post, prior).numpy().reshape(mu.shape[0], -1).sum(1)


@oracle("gaussian_kl")
def gaussian_kl(mu, logvar, **o):
    (red,) = _take(o, reduction="mean")
    return _reduce(_kl_std_normal(mu, logvar), red)


@oracle("neg_elbo")
def neg_elbo(recon, target, mu, logvar, **o):
    red, beta, lik = _take(o, reduction="mean", beta=1.0, likelihood="gaussian")
    if lik == "gaussian":
        nll = -Normal(_t(recon), 1.0).log_prob(_t(target)).numpy()
    else:
        nll = -Bernoulli(logits=_t(recon), validate_args=False).log_prob(_t(target)).numpy()
    per = nll.reshape(recon.shape[0], -1).sum(1) + beta * _kl_std_normal(mu, logvar)
    return _reduce(per, red)


@oracle("reconstruction")
def reconstruction(input, target, **o):
    red, kind = _take(o, reduction="mean", loss_type="mse")
    per = (input - target) ** 2 if kind == "mse" else _bernoulli_nll(input, target)
    return _reduce(per.reshape(input.shape[0], -1).sum(1), red)


@oracle("masked_reconstruction")
def masked_reconstruction(input, target, mask, **o):
    (red,) = _take(o, reduction="mean")
    keep = mask != 0
    per = np.where(keep, ((input - target) ** 2).mean(-1), 0.0)
    return _reduce(per, red, count=keep.sum())


# ------------------------------------------------------------------ impurities and splits
@oracle("gini_impurity")
def gini(input, **o):
    (red,) = _take(o, reduction="mean")
    return _reduce(1.0 - (input**2).sum(1), red)


@oracle("entropy_impurity")
def entropy(input, **o):
    (red,) = _take(o, reduction="mean")
    return _reduce(special.entr(input).sum(1), red)


def _split_gini(s, target, classes):
    """w_L G(p_L) + w_R G(p_R) per row of s (T, n), from class histograms."""
    onehot = np.eye(classes)[target]
    out = []
    for row in np.atleast_2d(s):
        total = 0.0
        for w in (row, 1.0 - row):
            mass = w @ onehot
            m = mass.sum()
            if m > 0:
                total += m / len(row) * (1.0 - ((mass / m) ** 2).sum())
        out.append(total)
    return np.array(out)


@oracle("soft_split_gini")
def soft_split_gini(s, target, **o):
    (k,) = _take(o, num_classes=None)
    return _split_gini(s, target, k or int(target.max()) + 1)[0]


@oracle("forest_gini")
def forest_gini(s, target, **o):
    red, k = _take(o, reduction="mean", num_classes=None)
    return _reduce(_split_gini(s, target, k or int(target.max()) + 1), red)


@oracle("split_variance")
def split_variance(s, target, **o):
    _take(o)
    total = 0.0
    for w in (s, 1.0 - s):
        if w.sum() > 0:
            total += w.sum() * np.cov(target, aweights=w, bias=True)
    return total / len(s)


# ------------------------------------------------------------------ distances
@oracle("wcss")
def wcss(x, centroids, **o):
    (red,) = _take(o, reduction="sum")
    return _reduce(cdist(x, centroids, "sqeuclidean").min(1), red)


@oracle("soft_kmeans")
def soft_kmeans(x, centroids, **o):
    red, tau = _take(o, reduction="mean", tau=1.0)
    d = cdist(x, centroids, "sqeuclidean")
    return _reduce((special.softmax(-d / tau, axis=1) * d).sum(1), red)


@oracle("batch_hard_triplet")
def batch_hard_triplet(input, target, **o):
    red, m, soft, eps = _take(o, reduction="mean", margin=1.0, soft_margin=False, eps=1e-12)
    d = np.sqrt(cdist(input, input, "sqeuclidean") + eps)
    same = target[:, None] == target[None, :]
    pos = np.where(same & ~np.eye(len(target), dtype=bool), d, -np.inf).max(1)
    neg = np.where(same, np.inf, d).min(1)
    z = m + pos - neg
    return _reduce(np.logaddexp(0.0, z) if soft else np.maximum(0.0, z), red)


def _cos(a, b, eps):
    return (a * b).sum(1) / np.sqrt(((a * a).sum(1) + eps) * ((b * b).sum(1) + eps))


@oracle("cosine_embedding")
def cosine_embedding(input1, input2, target, **o):
    red, m = _take(o, reduction="mean", margin=0.0)
    c = _cos(input1, input2, 1e-12)
    return _reduce(np.where(target == 1, 1.0 - c, np.maximum(0.0, c - m)), red)


@oracle("triplet")
def triplet(anchor, positive, negative, **o):
    red, m, p, eps, swap, dist = _take(o, reduction="mean", margin=1.0, p=2.0, eps=1e-6,
                                       swap=False, distance="euclidean")

    def d(a, b):
        if dist == "euclidean":  # torch.pairwise_distance: ||a - b + eps||_p
            return (np.abs(a - b + eps) ** p).sum(1) ** (1 / p)
        na = np.maximum(np.linalg.norm(a, axis=1), 1e-8)
        nb = np.maximum(np.linalg.norm(b, axis=1), 1e-8)
        return 1.0 - (a * b).sum(1) / (na * nb)

    dn = d(anchor, negative)
    if swap:
        dn = np.minimum(dn, d(positive, negative))
    return _reduce(np.maximum(0.0, m + d(anchor, positive) - dn), red)


@oracle("pca_reconstruction")
def pca(x, weight, **o):
    red, center = _take(o, reduction="mean", center=False)
    if center:
        x = x - x.mean(0)
    return _reduce(((x - x @ weight @ weight.T) ** 2).sum(1), red)


@oracle("eps_separation")
def eps_separation(x, labels, **o):
    eps, m = _take(o, eps=0.5, margin=1.0)
    d = cdist(x, x)
    off = ~np.eye(len(x), dtype=bool)
    same = (labels[:, None] == labels[None, :]) & (labels >= 0)[:, None]
    pos, neg = same & off, off & ~same
    pull = np.maximum(0.0, d - eps) ** 2
    push = np.maximum(0.0, eps + m - d) ** 2
    return ((pull[pos].sum() / max(pos.sum(), 1)) + (push[neg].sum() / max(neg.sum(), 1)))


# ------------------------------------------------------------------ softmax family
def _ce_rows(logits, target, weight=None, ignore_index=-100, label_smoothing=0.0, z_loss=0.0):
    """Per-row CE with torch's weight / ignore_index / label-smoothing rules, and the
    weight each row carries in the mean."""
    c = logits.shape[1]
    logp = special.log_softmax(logits, axis=1)
    keep = target != ignore_index
    y = np.where(keep, target, 0)
    w = np.ones(c) if weight is None else weight
    wy = w[y] * keep
    nll = -logp[np.arange(len(y)), y] * wy
    smooth = -(logp * w).sum(1) * keep
    per = (1 - label_smoothing) * nll + label_smoothing / c * smooth
    per = per + z_loss * special.logsumexp(logits, axis=1) ** 2 * keep
    return per, wy


def _ce(logits, target, red, **kw):
    per, wy = _ce_rows(logits, target, **kw)
    if red == "mean":
        return per.sum() / wy.sum() if wy.sum() != 0 else np.nan
    return _reduce(per, red)


@oracle("cross_entropy")
def cross_entropy(input, target, weight=None, **o):
    red, ii, ls, z, cap, shift, rz, rl = _take(
        o, reduction="mean", ignore_index=-100, label_smoothing=0.0, z_loss=0.0, softcap=None,
        shift=False, return_z_loss=False, return_lse=False)
    if rz or rl:  # the extras are checked against F.cross_entropy in test_ce_options.py
        raise NotImplementedError("oracle returns the loss alone")
    if shift:  # row i against target i + 1
        input, target = input[:-1], target[1:]
    if cap:
        input = cap * np.tanh(input / cap)
    return _ce(input, target, red, weight=weight, ignore_index=ii, label_smoothing=ls, z_loss=z)


@oracle("nll")
def nll(input, target, weight=None, **o):
    red, ii = _take(o, reduction="mean", ignore_index=-100)
    keep = target != ii
    y = np.where(keep, target, 0)
    w = (np.ones(input.shape[1]) if weight is None else weight)[y] * keep
    per = -input[np.arange(len(y)), y] * w
    if red == "mean":
        return per.sum() / w.sum() if w.sum() != 0 else np.nan
    return _reduce(per, red)


@oracle("perplexity")
def perplexity(input, target, **o):
    (ii,) = _take(o, ignore_index=-100)
    return np.exp(_ce(input, target, "mean", ignore_index=ii))


@oracle("causal_lm")
def causal_lm(logits, input_ids, weight=None, **o):
    red, ii, ls, z, cap, rz, rl = _take(
        o, reduction="mean", ignore_index=-100, label_smoothing=0.0, z_loss=0.0, softcap=None,
        return_z_loss=False, return_lse=False)
    if rz or rl:  # the extras are checked against F.cross_entropy in test_ce_options.py
        raise NotImplementedError("oracle returns the loss alone")
    b, t, v = logits.shape
    if cap:
        logits = cap * np.tanh(logits / cap)
    out = _ce(logits[:, :-1].reshape(-1, v), input_ids[:, 1:].reshape(-1), red, weight=weight,
              ignore_index=ii, label_smoothing=ls, z_loss=z)
    return out.reshape(b, t - 1) if red == "none" else out


@oracle("seq2seq")
def seq2seq(logits, target, mask, **o):
    red, ls, norm = _take(o, reduction="mean", label_smoothing=0.0, normalize="token")
    b, t, v = logits.shape
    tgt = np.where(mask != 0, target, -100).reshape(-1)
    tokens = _ce_rows(logits.reshape(-1, v), tgt, label_smoothing=ls)[0].reshape(b, t)
    if red != "mean":
        return _reduce(tokens, red)
    m = (mask != 0).astype(float)
    if norm == "token":
        return tokens.sum() / m.sum()
    return (tokens.sum(1) / np.maximum(m.sum(1), 1)).mean()


@oracle("mlm")
def mlm(hidden, weight, labels, **o):
    (red,) = _take(o, reduction="mean")
    return _ce(hidden @ weight.T, labels, red)


@oracle("fused_linear_cross_entropy")
def fused_linear_ce(hidden, weight, target, bias=None, class_weight=None, **o):
    red, ii, ls, z, cap, shift, rz, rl, _accum = _take(
        o, reduction="mean", ignore_index=-100, label_smoothing=0.0, z_loss=0.0, softcap=None,
        shift=False, return_z_loss=False, return_lse=False, accum_dtype=None)
    if rz or rl:  # the extras are checked against F.cross_entropy in test_ce_options.py
        raise NotImplementedError("oracle returns the loss alone")
    if shift:  # row i against target i + 1
        hidden, target = hidden[:-1], target[1:]
    logits = hidden @ weight.T + (0.0 if bias is None else bias)
    if cap:
        logits = cap * np.tanh(logits / cap)
    return _ce(logits, target, red, weight=class_weight, ignore_index=ii, label_smoothing=ls,
               z_loss=z)


def _divergence(student, teacher, temperature, direction, beta):
    """T^2 KL (or generalized JSD) per row, in log space so that a probability that
    underflows to 0 still contributes its (finite) log-ratio."""
    logp = special.log_softmax(teacher / temperature, axis=-1)
    logq = special.log_softmax(student / temperature, axis=-1)
    if direction == "forward":
        rows = (np.exp(logp) * (logp - logq)).sum(-1)
    elif direction == "reverse":
        rows = (np.exp(logq) * (logq - logp)).sum(-1)
    else:
        logm = np.logaddexp(math.log(beta) + logp, math.log(1 - beta) + logq)
        rows = (beta * (np.exp(logp) * (logp - logm)).sum(-1)
                + (1 - beta) * (np.exp(logq) * (logq - logm)).sum(-1))
    return rows * temperature**2


@oracle("kl_distillation")
def kl_distillation(student, teacher, **o):
    red, t, direction, beta = _take(o, reduction="mean", temperature=1.0, direction="forward",
                                    beta=0.5)
    return _reduce(_divergence(student, teacher, t, direction, beta), red)


@oracle("fused_linear_distillation")
def fused_linear_distillation(student_hidden, student_weight, teacher_hidden, teacher_weight,
                              **o):
    red, t, direction, beta = _take(o, reduction="mean", temperature=1.0, direction="forward",
                                    beta=0.5)
    return _reduce(_divergence(student_hidden @ student_weight.T,
                               teacher_hidden @ teacher_weight.T, t, direction, beta), red)


@oracle("info_nce")
def info_nce(u, v, **o):
    red, t, symmetric = _take(o, reduction="mean", temperature=0.1, symmetric=True)
    sim = (1.0 - cdist(u, v, "cosine")) / t
    diag = np.diag(sim)
    row = special.logsumexp(sim, axis=1) - diag
    per = (row + special.logsumexp(sim, axis=0) - diag) / 2 if symmetric else row
    return _reduce(per, red)


# ------------------------------------------------------------------ reinforcement learning
@oracle("ppo_clip")
def ppo_clip(log_probs, old_log_probs, advantages, mask, **o):
    red, eps = _take(o, reduction="mean", clip_eps=0.2)
    keep = mask != 0
    adv = advantages if advantages.ndim == 2 else advantages[:, None]
    rho = np.exp(np.where(keep, log_probs - old_log_probs, 0.0))
    tok = -np.minimum(rho * adv, np.clip(rho, 1 - eps, 1 + eps) * adv)
    per = np.where(keep, tok, 0.0).sum(1) / keep.sum(1)
    return _reduce(per, red)


@oracle("q_td")
def q_td(q, actions, rewards, dones, target_q, **o):
    red, gamma, delta = _take(o, reduction="mean", gamma=0.99, delta=1.0)
    target = rewards + gamma * (1 - dones.astype(float)) * target_q.max(1)
    r = q[np.arange(len(actions)), actions.astype(int)] - target
    return _reduce(special.huber(delta, r), red)
