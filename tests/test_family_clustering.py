"""K-means and DBSCAN losses (wcss, soft_kmeans, eps_separation) and the pairwise
weighted-sum template: edge cases, gradients and validation, for every implementation
(Triton under the interpreter on a CPU), against float64 values computed here
independently of the plugins' references (explicit differences, not the Gram form;
hand-written gradients or autograd of the formula as written).

The registry-wide contract (every loss's `check` passes) is tests/test_conformance.py.
"""

import pytest
import torch
from tolerances import assert_close64

import lossreg
from lossreg.kernels import HAVE_TRITON, interpreting
from lossreg.measure import cpu_peak_bytes

TRITON_OK = HAVE_TRITON and (interpreting() or torch.cuda.is_available())
DEVICE = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"
F64 = torch.float64
F32 = torch.float32


def impls(name):
    out = []
    for impl in lossreg.get(name).implementations.values():
        if impl.backend == "compile" or impl.missing_requirements():
            continue
        if impl.backend == "triton" and not TRITON_OK:
            continue
        out.append(impl)
    return out


def impl_params(*names):
    return [pytest.param(n, i.name, id=f"{n}-{i.name}") for n in names for i in impls(n)]


def fn(name, impl):
    return lossreg.get(name).implementations[impl].fn


def gen(seed):
    return torch.Generator().manual_seed(seed)


def leaf(t, dtype=F32):
    return t.detach().clone().to(DEVICE, dtype).requires_grad_(True)


def clustered(g, n, k, d, spread=0.5):
    """Points around k centres (distances O(1)), centroids near the centres, float64."""
    centres = torch.randn(k, d, generator=g, dtype=F64) / d ** 0.5
    assign = torch.randint(0, k, (n,), generator=g)
    x = centres[assign] + spread * torch.randn(n, d, generator=g, dtype=F64) / d ** 0.5
    mu = centres + 0.1 * torch.randn(k, d, generator=g, dtype=F64) / d ** 0.5
    return x, mu


def explicit_sq(x, y):
    """|x_i - y_j|^2 from explicit differences (n, m, d): no Gram-form cancellation."""
    return ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)


def reduce(per, reduction):
    return {"none": per, "sum": per.sum(), "mean": per.mean()}[reduction]


def cotangent_like(out, g):
    return torch.rand(out.shape, generator=g, dtype=F64) + 0.5


# ---------------------------------------------------------------- wcss
def brute_wcss(x, mu, cot, reduction):
    """Per point, by a loop over centroids, the first centroid at the minimum distance;
    value and hand-written gradients 2 g (x_i - mu_k) / -sum of them."""
    d2 = explicit_sq(x, mu)
    best = torch.zeros(len(x), dtype=torch.int64)
    for k in range(1, mu.shape[0]):
        best = torch.where(d2[:, k] < d2[torch.arange(len(x)), best], k, best)
    per = d2[torch.arange(len(x)), best]
    g = {"none": cot, "sum": cot.expand(len(x)), "mean": cot.expand(len(x)) / len(x)}[reduction]
    gx = 2 * g[:, None] * (x - mu[best])
    gmu = torch.zeros_like(mu).index_add_(0, best, -gx)
    return reduce(per, reduction), gx, gmu, best


@pytest.mark.parametrize("name, impl", impl_params("wcss"))
@pytest.mark.parametrize("n, k, d", [(67, 65, 33), (130, 3, 70)])
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_wcss_value_and_gradients_match_brute_force(name, impl, n, k, d, reduction):
    g = gen(n + k)
    x64, mu64 = clustered(g, n, k, d)
    x, mu = leaf(x64), leaf(mu64)
    out = fn(name, impl)(x, mu, reduction=reduction)
    cot = cotangent_like(out, g)
    expected, gx, gmu, _ = brute_wcss(x64, mu64, cot, reduction)
    assert_close64(out.cpu(), expected, F32, "wcss")
    dx, dmu = torch.autograd.grad(out, (x, mu), cot.to(DEVICE, F32))
    assert_close64(dx.cpu(), gx, F32, "grad x")
    assert_close64(dmu.cpu(), gmu, F32, "grad centroids")


def integer_points(g, n, d):
    return torch.randint(-2, 3, (n, d), generator=g).to(F64)


@pytest.mark.parametrize("name, impl", impl_params("wcss"))
def test_wcss_ties_go_to_the_first_centroid(name, impl):
    """Integer coordinates: every distance is exact in float32, so ties are exact; copies
    of a centroid and equidistant distinct centroids must both resolve to the lowest
    index, and later copies get exactly no gradient."""
    g = gen(3)
    distinct = integer_points(g, 4, 5)
    distinct[1] = distinct[0] + 1
    mu64 = distinct[[2, 0, 1, 0, 3, 2, 1]]  # 0 and 5, 1 and 3, 2 and 6 are copies
    x64 = integer_points(g, 200, 5)
    x, mu = leaf(x64), leaf(mu64)
    out = fn(name, impl)(x, mu, reduction="none")
    cot = cotangent_like(out, g)
    expected, gx, gmu, _ = brute_wcss(x64, mu64, cot, "none")
    assert torch.equal(out.detach().cpu().double(), expected)
    d2 = explicit_sq(x64, mu64)
    assert int((d2 == d2.min(1, keepdim=True).values).sum(1).gt(1).sum()) > 20  # real ties
    dx, dmu = torch.autograd.grad(out, (x, mu), cot.to(DEVICE, F32))
    assert_close64(dmu.cpu(), gmu, F32, "grad centroids")
    assert torch.equal(dmu[[3, 5, 6]].cpu(), torch.zeros(3, 5))  # later copies: nothing
    assert_close64(dx.cpu(), gx, F32, "grad x")


@pytest.mark.parametrize("name, impl", impl_params("wcss"))
def test_wcss_one_centroid_and_identical_points_on_it(name, impl):
    g = gen(4)
    x64, mu64 = clustered(g, 90, 1, 16)
    x64[::3] = mu64[0]  # a cluster of identical points exactly on the centroid
    x, mu = leaf(x64), leaf(mu64)
    out = fn(name, impl)(x, mu, reduction="none")
    expected = ((x64 - mu64[0]) ** 2).sum(1)
    assert_close64(out.cpu(), expected, F32, "wcss")
    assert torch.equal(out[::3].detach().cpu(), torch.zeros(30))
    dx, dmu = torch.autograd.grad(out.sum(), (x, mu))
    assert torch.isfinite(dx).all() and torch.equal(dx[::3].cpu(), torch.zeros(30, 16))
    assert_close64(dmu.cpu(), -2 * (x64 - mu64[0]).sum(0, keepdim=True), F32, "grad mu")


@pytest.mark.parametrize("name, impl", impl_params("wcss", "soft_kmeans"))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kmeans_half_precision_inputs_give_half_outputs(name, impl, dtype):
    if impl == "triton" and dtype == torch.bfloat16 and interpreting():
        pytest.skip("Triton 3.9's interpreter computes tl.dot of bfloat16 tiles wrongly "
                    "(float16 and float32 are right)")
    g = gen(5)
    x64, mu64 = clustered(g, 70, 5, 8)
    x, mu = leaf(x64, dtype), leaf(mu64, dtype)
    out = fn(name, impl)(x, mu, reduction="none")
    assert out.dtype == dtype
    dx, dmu = torch.autograd.grad(out.sum(), (x, mu))
    assert dx.dtype == dmu.dtype == dtype
    ref = fn(name, "reference")(x.detach().double(), mu.detach().double(), reduction="none")
    assert_close64(out.cpu(), ref.cpu(), dtype, str(dtype))


def test_chunked_kmeans_memory_is_a_fraction_of_the_reference(monkeypatch):
    """The chunked rewrites never hold n x K: fwd+bwd peak far below the reference's."""
    from lossreg_plugins import kmeans

    monkeypatch.setattr(kmeans, "CHUNK_ELEMENTS", 1 << 16)
    x64, mu64 = clustered(gen(6), 4096, 512, 8)

    def full(f, **kw):
        x, mu = leaf(x64), leaf(mu64)
        return lambda: torch.autograd.grad(f(x, mu, **kw), (x, mu))

    for ref, chunked in ((kmeans.wcss_reference, kmeans.wcss_chunked),
                         (kmeans.soft_kmeans_reference, kmeans.soft_kmeans_chunked)):
        ref_peak = cpu_peak_bytes(full(ref))
        chunked_peak = cpu_peak_bytes(full(chunked))
        assert chunked_peak < ref_peak / 8, (chunked.__name__, chunked_peak, ref_peak)


# ---------------------------------------------------------------- soft_kmeans
def independent_soft_kmeans(x, mu, tau, reduction):
    """The formula as written, with weights exp(-D/tau - logsumexp(-D/tau))."""
    d2 = explicit_sq(x, mu)
    logits = -d2 / tau
    a = torch.exp(logits - torch.logsumexp(logits, dim=1, keepdim=True))
    return reduce((a * d2).sum(1), reduction)


@pytest.mark.parametrize("name, impl", impl_params("soft_kmeans"))
@pytest.mark.parametrize("tau, reduction, n, k, d", [
    (1.0, "mean", 67, 65, 33), (0.1, "none", 130, 7, 70), (1e-3, "sum", 90, 9, 16),
    (1e3, "mean", 90, 9, 16)])
def test_soft_kmeans_matches_autograd_of_the_formula(name, impl, tau, reduction, n, k, d):
    g = gen(n * k)
    x64, mu64 = clustered(g, n, k, d)
    x, mu = leaf(x64), leaf(mu64)
    out = fn(name, impl)(x, mu, tau=tau, reduction=reduction)
    cot = cotangent_like(out, g)
    rx, rmu = x64.clone().requires_grad_(True), mu64.clone().requires_grad_(True)
    expected = independent_soft_kmeans(rx, rmu, tau, reduction)
    assert_close64(out.cpu(), expected, F32, "soft_kmeans")
    gx, gmu = torch.autograd.grad(expected, (rx, rmu), cot)
    dx, dmu = torch.autograd.grad(out, (x, mu), cot.to(DEVICE, F32))
    assert_close64(dx.cpu(), gx, F32, "grad x")
    assert_close64(dmu.cpu(), gmu, F32, "grad centroids")


@pytest.mark.parametrize("name, impl", impl_params("soft_kmeans"))
def test_soft_kmeans_limits_of_tau(name, impl):
    """tau -> 0: each point's nearest distance (wcss / n); tau -> inf: the mean over
    centroids; duplicate centroids share the weight (no tie-breaking)."""
    g = gen(7)
    x64, mu64 = clustered(g, 80, 6, 12)
    d2 = explicit_sq(x64, mu64)
    f = fn(name, impl)
    cold = f(leaf(x64), leaf(mu64), tau=1e-4, reduction="none")
    assert_close64(cold.cpu(), d2.min(1).values, F32, "tau -> 0")
    hot = f(leaf(x64), leaf(mu64), tau=1e6, reduction="none")
    assert_close64(hot.cpu(), d2.mean(1), F32, "tau -> inf")
    dup = mu64[[0, 1, 0, 2]]
    x, mu = leaf(x64), leaf(dup)
    (dmu,) = torch.autograd.grad(f(x, mu, tau=0.5), mu)
    assert_close64(dmu[0].cpu(), dmu[2].cpu().double(), F32, "copies share")


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


# ---------------------------------------------------------------- validation
def _pts(n=6, d=3, dtype=F32):
    return torch.randn(n, d, dtype=dtype, device=DEVICE)


KMEANS_BAD = [
    ({"x": [[1.0]], "centroids": _pts(2, 1)}, TypeError, r"x must be a torch.Tensor"),
    ({"x": torch.ones(4, 3, dtype=torch.int64, device=DEVICE), "centroids": _pts(2)},
     TypeError, r"x must be a floating-point tensor"),
    ({"x": _pts(6, 3).flatten(), "centroids": _pts(2)}, ValueError,
     r"x must be a matrix \(n, d\) of points, got shape \(18,\)"),
    ({"x": _pts(), "centroids": _pts(2, 4)}, ValueError,
     r"centroids must have d = 3 columns .*got shape \(2, 4\)"),
    ({"x": _pts(), "centroids": _pts(0, 3)}, ValueError, r"centroids must hold K >= 1"),
    ({"x": _pts(), "centroids": _pts(2, 3, F64)}, TypeError, r"expected inputs of one"),
    ({"x": _pts(), "centroids": _pts(2), "reduction": "avg"}, ValueError,
     r"reduction must be one of"),
]


@pytest.mark.parametrize("name, impl", impl_params("wcss", "soft_kmeans"))
def test_kmeans_validation_messages(name, impl):
    f = fn(name, impl)
    for kwargs, exc, pattern in KMEANS_BAD:
        with pytest.raises(exc, match=f"^{name}: {pattern}"):
            f(**kwargs)


@pytest.mark.parametrize("name, impl", impl_params("soft_kmeans"))
def test_soft_kmeans_rejects_bad_tau(name, impl):
    f = fn(name, impl)
    for tau, exc, pattern in ((0.0, ValueError, r"tau must lie in \(0, inf\]"),
                              (-1.0, ValueError, r"tau must lie in \(0"),
                              (float("inf"), ValueError, r"tau must be a finite number"),
                              ("1", TypeError, r"tau must be a number")):
        with pytest.raises(exc, match=f"^soft_kmeans: {pattern}"):
            f(_pts(), _pts(2), tau=tau)


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


# ---------------------------------------------------------------- the template
@pytest.mark.skipif(not TRITON_OK, reason="needs triton (interpreter on CPU)")
@pytest.mark.parametrize("M, N, D", [(70, 67, 33), (5, 130, 70), (9, 0, 4)])
def test_pairwise_weighted_sum_rows_and_columns(M, N, D):
    from lossreg.kernels import jit, tl
    from lossreg.kernels.pairwise_grad import pairwise_weighted_sum

    @jit
    def weight(dot, sq_r, sq_c, lab_r, lab_c, row, col, r0, r1, r2, r3, p0, p1, p2, p3):
        d2 = tl.maximum(sq_r + sq_c - 2.0 * dot, 0.0)
        w = tl.exp(-(d2 - r0) / p0) * r1
        return w, tl.where(lab_r == lab_c, w * d2, p1)

    kernel = pairwise_weighted_sum(weight, "test_weighted", sides=("rows", "cols"),
                                   row_stats=2, labels=True)
    g = gen(M + N)
    x = torch.randn(M, D, generator=g, dtype=F64)
    y = torch.randn(N, D, generator=g, dtype=F64)
    lr, lc = torch.randint(0, 3, (M,), generator=g), torch.randint(0, 3, (N,), generator=g)
    stats = torch.rand(M, 2, generator=g, dtype=F64) + 0.5
    d2 = explicit_sq(x, y)
    w = torch.exp(-(d2 - stats[:, :1]) / 2.0) * stats[:, 1:]
    u = torch.where(lr[:, None] == lc[None, :], w * d2, 0.25)
    for side, dim in (("rows", 1), ("cols", 0)):
        vec, s0, s1 = kernel(x.float().to(DEVICE), y.float().to(DEVICE), side=side,
                             row_stats=stats.float().to(DEVICE), row_labels=lr.to(DEVICE),
                             col_labels=lc.to(DEVICE), params=(2.0, 0.25))
        expected_vec = w @ y if side == "rows" else w.T @ x
        assert vec.shape == expected_vec.shape and s0.shape == expected_vec.shape[:1]
        if N == 0:  # no pairs: empty sums
            assert not vec.count_nonzero() and not s0.count_nonzero()
            continue
        assert_close64(vec.cpu(), expected_vec, F32, f"{side} vec")
        assert_close64(s0.cpu(), w.sum(dim), F32, f"{side} s0")
        assert_close64(s1.cpu(), u.sum(dim), F32, f"{side} s1")


def test_clustering_losses_are_registered_with_their_families():
    for name, family in (("wcss", "kmeans"), ("soft_kmeans", "kmeans"),
                         ("eps_separation", "dbscan")):
        spec = lossreg.get(name)
        assert spec.family == family and spec.citation and spec.formula
        assert spec.implementations["triton"].backend == "triton"
    for name in ("wcss", "soft_kmeans"):
        spec = lossreg.get(name)
        assert spec.implementations["chunked"].devices == ("cpu", "cuda")
        assert spec.input_params["default"] == {"clusters": 1024, "dim": 64}
        assert 65536 in spec.sizes["default"]
    assert lossreg.get("wcss").options == {"reduction": "sum"}
