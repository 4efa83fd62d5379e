"""The dbscan plugin (eps_separation): pairs by definition, noise, degenerate labellings
and validation, for every implementation (Triton under the interpreter on a CPU),
against float64 values computed here independently of the plugin's references (explicit
differences, not the Gram form; hand-written gradients or autograd of the formula as
written); the standard per-loss tests are its `LossTester`s.
"""

import pytest
import torch
from tolerances import assert_close64
from clustering_cases import DEVICE, F32, F64, _pts, clustered, fn, gen, impl_params, leaf
from loss_tester import LossTester


# ---------------------------------------------------------------- eps_separation
def independent_separation(x, labels, eps, margin):
    """Pair sets from their definition, by loops; distances from explicit differences
    (torch.linalg.vector_norm: gradient 0 at coincident points)."""
    n = len(labels)
    lab = labels.tolist()
    pos = torch.zeros(n, n, dtype=torch.bool)
    neg = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(n):
            if i != j:
                if lab[i] == lab[j] and lab[i] != -1:
                    pos[i, j] = True
                else:
                    neg[i, j] = True
    dist = torch.linalg.vector_norm(x[:, None, :] - x[None, :, :], dim=-1)
    pull = torch.clamp(dist - eps, min=0) ** 2
    push = torch.clamp(eps + margin - dist, min=0) ** 2
    total = (x * 0).sum()  # 0 with a (zero) gradient when there are no pairs
    if pos.any():
        total = total + pull[pos].mean()
    if neg.any():
        total = total + push[neg].mean()
    return total


def labelled(g, n, clusters, d, noise=0.15):
    x, _ = clustered(g, n, clusters, d)
    labels = torch.randint(0, clusters, (n,), generator=g)
    labels[torch.rand(n, generator=g) < noise] = -1
    return x, labels


def check_separation(name, impl, x64, labels, eps=0.5, margin=1.0):
    x = leaf(x64)
    out = fn(name, impl)(x, labels.to(DEVICE), eps=eps, margin=margin)
    rx = x64.clone().requires_grad_(True)
    expected = independent_separation(rx, labels, eps, margin)
    assert_close64(out.cpu(), expected, F32, "eps_separation")
    (dx,) = torch.autograd.grad(out, x, torch.tensor(1.7, device=DEVICE))
    (gx,) = torch.autograd.grad(expected, rx, torch.tensor(1.7, dtype=F64))
    assert torch.isfinite(dx).all()
    if float(gx.norm()) > 0:
        assert_close64(dx.cpu(), gx, F32, "grad x")
    else:
        assert torch.equal(dx.cpu(), torch.zeros_like(dx.cpu()))
    return out


@pytest.mark.parametrize("name, impl", impl_params("eps_separation"))
@pytest.mark.parametrize("n, d, eps, margin", [(67, 33, 0.5, 1.0), (70, 70, 0.0, 0.7),
                                               (40, 8, 0.3, 0.0)])
def test_eps_separation_matches_pairs_by_definition(name, impl, n, d, eps, margin):
    x64, labels = labelled(gen(n + d), n, 4, d)
    assert (labels == -1).sum() >= 2  # noise pairs with noise are negatives
    check_separation(name, impl, x64, labels, eps, margin)


@pytest.mark.parametrize("name, impl", impl_params("eps_separation"))
def test_eps_separation_noise_and_degenerate_labellings(name, impl):
    g = gen(8)
    x64, _ = clustered(g, 30, 3, 6)
    # all noise: no positives, every pair negative
    all_noise = torch.full((30,), -1)
    out = check_separation(name, impl, x64, all_noise)
    dist = torch.cdist(x64, x64)
    off = ~torch.eye(30, dtype=torch.bool)
    assert_close64(out.cpu(), (1.5 - dist[off]).clamp(min=0).pow(2).mean(), F32, "all noise")
    # one cluster, no noise: no negatives
    check_separation(name, impl, x64, torch.zeros(30, dtype=torch.int64))
    # a single point: no pairs at all, loss and gradient 0
    out = check_separation(name, impl, x64[:1], torch.tensor([2]))
    assert float(out.detach()) == 0.0
    # three points, two of them noise: only negative pairs, the noise pair included
    x3 = torch.tensor([[0.0, 0.0], [0.3, 0.0], [0.0, 0.4]], dtype=F64)
    out = check_separation(name, impl, x3, torch.tensor([-1, -1, 0]))
    d = torch.tensor([0.3, 0.4, 0.5], dtype=F64)
    assert_close64(out.cpu(), ((1.5 - d) ** 2).mean(), F32, "noise pair is negative")


@pytest.mark.parametrize("name, impl", impl_params("eps_separation"))
@pytest.mark.parametrize("eps", [0.5, 0.0])
def test_eps_separation_identical_points_have_no_nan(name, impl, eps):
    x64, labels = labelled(gen(9), 60, 3, 16, noise=0.0)
    x64[:20] = x64[0]
    labels[:20] = labels[0]
    check_separation(name, impl, x64, labels, eps=eps)


@pytest.mark.parametrize("name, impl", impl_params("eps_separation"))
def test_eps_separation_validation_messages(name, impl):
    f = fn(name, impl)
    lab = torch.tensor([0, 0, 1, -1, 1, 2], device=DEVICE)
    cases = [
        ({"labels": lab.float()}, TypeError, r"labels must hold integer class indices"),
        ({"labels": lab[:5]}, ValueError, r"labels must have shape \(6,\)"),
        ({"labels": torch.tensor([0, 0, -2, 1, -3, 1], device=DEVICE)}, ValueError,
         r"labels must be >= 0 \(a cluster\) or -1 \(noise\), got -2 \(and 1 more\)"),
        ({"eps": -0.1}, ValueError, r"eps must lie in \[0, inf\]"),
        ({"margin": -1.0}, ValueError, r"margin must lie in \[0, inf\]"),
        ({"eps": None}, TypeError, r"eps must be a number"),
        ({"x": _pts(6, 3)[None]}, ValueError, r"x must be a matrix \(n, d\)"),
    ]
    for extra, exc, pattern in cases:
        kwargs = {"x": _pts(), "labels": lab, **extra}
        with pytest.raises(exc, match=f"^eps_separation: {pattern}"):
            f(**kwargs)


class TestEpsSeparation(LossTester):
    loss = "eps_separation"
