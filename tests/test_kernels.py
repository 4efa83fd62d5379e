"""The pointwise Triton template under the interpreter, the bytes models and float64
kernels (the ahead-of-time proof is tests/test_aot.py)."""


import pytest
import torch

from lossreg.kernels import HAVE_TRITON, interpreting, jit, pointwise_loss, tl

from tolerances import assert_close64

pytestmark = pytest.mark.skipif(
    not HAVE_TRITON or (not interpreting() and not torch.cuda.is_available()),
    reason="needs triton (interpreter on CPU)")
DEVICE = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"


@jit
def _logcosh_term(x, y, p0, p1):
    # a loss with scalar parameters: p0 * log(cosh(p1 * (x - y))), stable form
    d = p1 * (x - y)
    a = tl.abs(d)
    loss = p0 * (a + tl.log(1.0 + tl.exp(-2.0 * a)) - 0.6931471805599453)
    e = tl.exp(-2.0 * a)
    t = (1.0 - e) / (1.0 + e)
    g = p0 * p1 * tl.where(d >= 0, t, -t)
    return loss, g, -g


logcosh = pointwise_loss(_logcosh_term, name="test_logcosh")


def logcosh_ref(x, y, reduction, scale, sharp):
    d = sharp * (x - y)
    t = scale * (d.abs() + torch.log1p(torch.exp(-2 * d.abs())) - torch.log(torch.tensor(2.0,
                 dtype=x.dtype)))
    return t if reduction == "none" else (t.mean() if reduction == "mean" else t.sum())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("n", [1, 4095, 4097, 10001])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_template_matches_float64(dtype, n, reduction):
    g = torch.Generator().manual_seed(n)
    x = (torch.randn(n, generator=g) * 3).to(dtype).to(DEVICE)
    y = torch.randn(n, generator=g).to(dtype).to(DEVICE)
    x.requires_grad_(True)
    y.requires_grad_(True)
    out = logcosh(x, y, reduction, 0.7, 1.3)
    x64 = x.detach().double().requires_grad_(True)
    y64 = y.detach().double().requires_grad_(True)
    ref = logcosh_ref(x64, y64, reduction, 0.7, 1.3)
    assert out.dtype == dtype and out.shape == ref.shape
    assert_close64(out, ref, dtype, "loss")
    cot = torch.rand(ref.shape, generator=g, dtype=torch.float64) + 0.5
    gx, gy = torch.autograd.grad(out, (x, y), cot.to(dtype).to(DEVICE))
    rx, ry = torch.autograd.grad(ref, (x64, y64), cot.to(dtype).double().to(DEVICE))
    assert gx.dtype == dtype and gy.dtype == dtype
    assert_close64(gx, rx, dtype, "grad x")
    assert_close64(gy, ry, dtype, "grad y")


@pytest.mark.parametrize("needs", [(True, False), (False, True)])
def test_only_required_gradients_are_written(needs):
    x = torch.randn(5000, device=DEVICE, requires_grad=needs[0])
    y = torch.randn(5000, device=DEVICE, requires_grad=needs[1])
    out = logcosh(x, y, "mean", 1.0, 1.0)
    out.backward()
    assert (x.grad is not None) == needs[0] and (y.grad is not None) == needs[1]
    leaf = x if needs[0] else y
    ref_leaf = leaf.detach().double().requires_grad_(True)
    other = (y if needs[0] else x).detach().double()
    ref = logcosh_ref(ref_leaf, other, "mean", 1.0, 1.0) if needs[0] else logcosh_ref(
        other, ref_leaf, "mean", 1.0, 1.0)
    ref.backward()
    assert_close64(leaf.grad, ref_leaf.grad, torch.float32)


def test_second_backward_scales_saved_gradient():
    x = torch.randn(3000, device=DEVICE, requires_grad=True)
    y = torch.randn(3000, device=DEVICE)
    (logcosh(x, y, "sum", 1.0, 2.0) * 3.0).backward()
    x64 = x.detach().double().requires_grad_(True)
    (logcosh_ref(x64, y.double(), "sum", 1.0, 2.0) * 3.0).backward()
    assert_close64(x.grad, x64.grad, torch.float32)


def test_template_validates():
    x = torch.randn(10, device=DEVICE)
    with pytest.raises(ValueError, match="reduction must be one of"):
        logcosh(x, x, "avg")
    with pytest.raises(ValueError, match="same shape"):
        logcosh(x, x[:5])


def test_empty_input_follows_torch():
    e = torch.empty(0, device=DEVICE)
    assert torch.isnan(logcosh(e, e, "mean"))
    assert logcosh(e, e, "sum").item() == 0
    assert logcosh(e, e, "none").shape == (0,)


def _quick_inputs(spec):
    from lossreg.spec import Case

    options = dict(spec.options)
    return spec.make_inputs(Case(spec.sizes["quick"][-1],
                                 params=spec.case_params("quick", options)))


def test_every_triton_impl_declares_a_bytes_model():
    from lossreg.registry import default_registry

    checked = 0
    for spec in default_registry().list():
        for impl in spec.implementations.values():
            if impl.backend != "triton":
                continue
            assert impl.bytes_model is not None, f"{spec.name}/{impl.name}: no bytes_model"
            inputs = _quick_inputs(spec)
            model = impl.bytes_model(inputs)
            assert set(model) == {"forward", "backward", "full"}, (spec.name, model)
            for mode, value in model.items():
                assert isinstance(value, int) and value > 0, (spec.name, impl.name, mode)
            # the gradients it writes are the ones the loss differentiates
            grads = set(spec.grad_names(inputs))
            assert grads <= set(impl.bytes_model.grads), (spec.name, impl.name, grads)
            read = sum(t.numel() * t.element_size() for t in inputs.values()
                       if torch.is_tensor(t))
            written = sum(inputs[k].numel() * inputs[k].element_size() for k in grads)
            assert model["full"] == read + written, (spec.name, impl.name)
            checked += 1
    assert checked >= 40


FLOAT64_CASES = [
    ("mae", {"reduction": "mean"}),
    ("quantile", {"reduction": "mean", "tau": 0.9}),
    ("dpo", {"beta": 0.05, "label_smoothing": 0.0, "loss_type": "hinge", "reduction": "sum"}),
    ("dpo", {"beta": 0.1, "label_smoothing": 0.1, "loss_type": "sigmoid",
             "reduction": "mean"}),
    ("q_td", {"gamma": 0.5, "delta": 0.3, "reduction": "mean"}),
    ("pca_reconstruction", {"reduction": "none", "center": True}),
]


def _loss_and_grads(spec, impl, inputs, options):
    names = spec.grad_names(inputs)
    leaves = {k: (v.detach().clone().requires_grad_(True) if k in names else v)
              for k, v in inputs.items()}
    out = spec.implementations[impl].fn(**leaves, **options)
    grads = torch.autograd.grad(out, [leaves[k] for k in names], torch.ones_like(out))
    return [out.detach(), *grads]


def _rel(a, b):
    return ((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


@pytest.mark.parametrize("name,options", FLOAT64_CASES,
                         ids=[f"{n}-{i}" for i, (n, _) in enumerate(FLOAT64_CASES)])
def test_float64_triton_kernels_compute_in_float64(name, options):
    # 1e-10 against the float64 reference, on inputs where the same loss computed in
    # float32 (parameters, the 1/n scale or the accumulation) is off by more than that
    from lossreg.registry import default_registry
    from lossreg.spec import Case

    spec = default_registry().get(name)
    case = Case(1003, dtype=torch.float64, device=DEVICE, seed=7,
                params=spec.case_params("quick", options))
    inputs = spec.make_inputs(case)
    ref = _loss_and_grads(spec, "reference", inputs, options)
    got = _loss_and_grads(spec, "triton", inputs, options)
    assert all(g.dtype == torch.float64 for g in got)
    errors = [_rel(g, r) for g, r in zip(got, ref)]
    assert max(errors) < 1e-10, errors
    narrow = {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v)
              for k, v in inputs.items()}
    as_float32 = _loss_and_grads(spec, "reference", narrow, options)
    assert max(_rel(g, r) for g, r in zip(as_float32, ref)) > 1e-9  # the check can fail


def test_tuning_table_picks_arch_then_size_then_default(tmp_path):
    import json as _json

    from lossreg.kernels import tuning

    table = {"ce": [{"arch": "sm_90", "max_size": 4096, "block": 1024, "num_warps": 4},
                    {"arch": "sm_90", "max_size": None, "block": 8192, "num_warps": 16},
                    {"arch": "default", "max_size": None, "block": 4096, "num_warps": 8}]}
    path = tmp_path / "t.json"
    path.write_text(_json.dumps(table))
    p = str(path)
    assert tuning.config("ce", 4096, 90, p) == {"block": 1024, "num_warps": 4}
    assert tuning.config("ce", 4097, (9, 0), p) == {"block": 8192, "num_warps": 16}
    assert tuning.config("ce", 10, 80, p) == {"block": 4096, "num_warps": 8}
    assert tuning.config("other", 10, 90, p) is None
    # the committed table loads and covers the cross-entropy family on every arch
    assert tuning.config("cross_entropy", 131072, 90)["num_warps"] > 0
    assert tuning.config("cross_entropy", 257, 80) is not None
    bad = tmp_path / "bad.json"
    bad.write_text(_json.dumps({"ce": [{"arch": "sm_90", "max_size": None, "block": 0,
                                        "num_warps": 4}]}))
    with pytest.raises(ValueError, match="positive ints"):
        tuning.config("ce", 1, 90, str(bad))
