"""jsd and tvd (issue 20.4): every implementation against formulas computed without
lossreg's code (torch.distributions' KL, numpy's textbook TVD), masking by labels, the
beta endpoints and the empty mean."""

import numpy as np
import pytest
import torch
from torch.distributions import Categorical, kl_divergence

import lossreg
from lossreg.planning import runnable
from loss_tester import LossTester


def _impls(loss):
    spec = lossreg.get(loss)
    return [n for n, i in spec.implementations.items()
            if n != "compile" and runnable(i, "cpu", "float32") is None]


def _logits(n=7, v=37, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(n, v, generator=g, dtype=dtype) * 2
    s = t + torch.randn(n, v, generator=g, dtype=dtype)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[[1, 4]] = -100
    return s, t, labels


def _tol(dtype):
    return 1e-10 if dtype == torch.float64 else 1e-5


def _jsd_oracle(s, t, beta, temperature):
    q = Categorical(logits=s / temperature)
    p = Categorical(logits=t / temperature)
    if beta == 0.0:
        return kl_divergence(p, q)
    if beta == 1.0:
        return kl_divergence(q, p)
    m = Categorical(probs=beta * p.probs + (1 - beta) * q.probs)
    return beta * kl_divergence(p, m) + (1 - beta) * kl_divergence(q, m)


@pytest.mark.parametrize("impl", _impls("jsd"))
@pytest.mark.parametrize("beta, temperature", [(0.5, 1.0), (0.0, 1.0), (1.0, 2.0), (0.9, 0.7)])
def test_jsd_matches_torch_distributions(impl, beta, temperature):
    fn = lossreg.get("jsd").implementations[impl].fn
    dtype = torch.float64 if runnable(lossreg.get("jsd").implementations[impl], "cpu",
                                      "float64") is None else torch.float32
    s, t, labels = _logits(dtype=dtype)
    rows = _jsd_oracle(s.double(), t.double(), beta, temperature)
    keep = labels != -100
    try:
        out = fn(s, t, labels, beta=beta, temperature=temperature)
    except lossreg.UnsupportedOption as exc:
        pytest.skip(str(exc))
    expected = rows[keep].mean()
    assert abs(float(out) - float(expected)) <= _tol(dtype) * float(expected)
    out_sum = fn(s, t, labels, beta=beta, temperature=temperature, reduction="sum")
    assert abs(float(out_sum) - float(rows[keep].sum())) <= _tol(dtype) * float(
        rows[keep].sum())


@pytest.mark.parametrize("impl", _impls("tvd"))
def test_tvd_matches_numpy(impl):
    fn = lossreg.get("tvd").implementations[impl].fn
    s, t, labels = _logits(seed=3)
    ps = np.exp(s.numpy() / 2.0)
    ps /= ps.sum(1, keepdims=True)
    pt = np.exp(t.numpy() / 2.0)
    pt /= pt.sum(1, keepdims=True)
    rows = 0.5 * np.abs(ps - pt).sum(1)
    keep = (labels != -100).numpy()
    out = fn(s, t, labels, temperature=2.0, reduction="none")
    np.testing.assert_allclose(out.numpy(), np.where(keep, rows, 0.0), rtol=1e-10, atol=1e-15)
    assert float(fn(s, t, labels, temperature=2.0)) == pytest.approx(rows[keep].mean(),
                                                                     rel=1e-10)


@pytest.mark.parametrize("loss", ["jsd", "tvd"])
def test_ignored_rows_get_no_gradient_and_empty_mean_is_nan(loss):
    for impl in _impls(loss):
        fn = lossreg.get(loss).implementations[impl].fn
        s, t, labels = _logits(seed=5, dtype=torch.float32)
        s.requires_grad_(True)
        try:
            out = fn(s, t, labels)
        except lossreg.UnsupportedOption:
            continue
        (g,) = torch.autograd.grad(out, s)
        assert torch.all(g[labels == -100] == 0) and torch.any(g[labels != -100] != 0), impl
        none = torch.full_like(labels, -100)
        out = fn(s, t, none)
        assert torch.isnan(out), impl
        (g,) = torch.autograd.grad(out, s)
        assert torch.all(g == 0), impl


def test_jsd_endpoints_are_the_two_kls():
    """beta 0 / 1 are forward / reverse KL (Liger's convention), equal to kl_distillation
    without its T^2 factor."""
    s, t, _ = _logits(seed=9)
    kl = lossreg.get("kl_distillation").reference
    jsd = lossreg.get("jsd").reference
    for beta, direction in ((0.0, "forward"), (1.0, "reverse")):
        got = jsd(s, t, beta=beta, temperature=2.0)
        want = kl(s, t, temperature=2.0, direction=direction) / 4.0
        assert float(got) == pytest.approx(float(want), rel=1e-12)


@pytest.mark.parametrize("loss, bad, match", [
    ("jsd", {"beta": 1.5}, "beta must be in"),
    ("jsd", {"temperature": 0.0}, "temperature must be > 0"),
    ("tvd", {"labels": torch.zeros(3, dtype=torch.long)}, "labels must be None or"),
])
def test_bad_options_are_named(loss, bad, match):
    s, t, labels = _logits()
    kwargs = {"labels": labels, **bad}
    for impl in _impls(loss):
        with pytest.raises(ValueError, match=match):
            lossreg.get(loss).implementations[impl].fn(s, t, **kwargs)


# ---------------------------------------------------------------- the shared tester
class TestJsd(LossTester):
    loss = "jsd"
    no_oracle = "tests/plugins/test_transformers_divergences.py"


class TestTvd(LossTester):
    loss = "tvd"
    no_oracle = "tests/plugins/test_transformers_divergences.py"
