"""The kmeans plugin (wcss, soft_kmeans) and the pairwise weighted-sum template: edge
cases, gradients and validation, for every implementation (Triton under the interpreter
on a CPU), against float64 values computed here independently of the plugin's references
(explicit differences, not the Gram form; hand-written gradients or autograd of the
formula as written); the standard per-loss tests are its `LossTester`s.
"""

import pytest
import torch
from tolerances import assert_close64
import lossreg
from lossreg.kernels import interpreting
from lossreg.measure import cpu_peak_bytes
from clustering_cases import (
    DEVICE,
    F32,
    F64,
    TRITON_OK,
    _pts,
    clustered,
    cotangent_like,
    explicit_sq,
    fn,
    gen,
    impl_params,
    leaf,
    reduce,
)
from loss_tester import LossTester


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


class TestSoftKmeans(LossTester):
    loss = "soft_kmeans"


class TestWcss(LossTester):
    loss = "wcss"
