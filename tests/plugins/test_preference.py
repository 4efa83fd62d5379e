"""orpo, cpo, simpo, kto (plugins/preference*.py): the references against the papers'
formulas written here in numpy on tiny hand-made batches (values and analytic
gradients), and every implementation through the harness's check in bfloat16 (the
`LossTester`s run float32), Triton under the interpreter."""

import os

import numpy as np
import pytest
import torch

import lossreg
from loss_tester import LossTester

PC = np.array([-0.31, -1.2, -0.05, -2.5, -0.7])
PR = np.array([-0.9, -0.4, -0.05, -0.001, -3.0])


def logsig(u):
    return -np.logaddexp(0.0, -u)


def sig(u):
    return 1.0 / (1.0 + np.exp(-u))


def run(name, reduction="none", grads=True, **inputs):
    """The reference in float64 on numpy inputs: (loss, {input: gradient of the sum})."""
    spec = lossreg.get(name)
    ts = {k: (torch.tensor(v, dtype=torch.float64, requires_grad=grads)
              if isinstance(v, np.ndarray) and v.dtype.kind == "f" else
              torch.as_tensor(v) if isinstance(v, np.ndarray) else v)
          for k, v in inputs.items()}
    opts = {k: v for k, v in inputs.items() if not isinstance(v, np.ndarray)}
    out = spec.reference(**{k: v for k, v in ts.items() if k not in opts},
                         **opts, reduction=reduction)
    gs = {}
    if grads:
        leaves = [k for k, v in ts.items() if torch.is_tensor(v) and v.requires_grad]
        got = torch.autograd.grad(out.sum(), [ts[k] for k in leaves], allow_unused=True)
        gs = {k: (np.zeros(ts[k].shape) if g is None else g.numpy()) for k, g in zip(leaves, got)}
    return out.detach().numpy(), gs


def test_orpo_reference_is_the_papers_formula():
    beta = 0.25
    # log odds of p = e^a: log(p / (1 - p)), written from p, not from the plugin's helper
    p_c, p_r = np.exp(PC), np.exp(PR)
    u = np.log(p_c / (1 - p_c)) - np.log(p_r / (1 - p_r))
    out, g = run("orpo", policy_chosen_logps=PC, policy_rejected_logps=PR, beta=beta)
    np.testing.assert_allclose(out, -PC - beta * logsig(u), rtol=1e-12)
    # d/da log odds(e^a) = 1 / (1 - e^a)
    np.testing.assert_allclose(g["policy_chosen_logps"],
                               -1 - beta * sig(-u) / (1 - p_c), rtol=1e-10)
    np.testing.assert_allclose(g["policy_rejected_logps"], beta * sig(-u) / (1 - p_r),
                               rtol=1e-10)
    mean, _ = run("orpo", "mean", False, policy_chosen_logps=PC, policy_rejected_logps=PR,
                  beta=beta)
    np.testing.assert_allclose(mean, np.mean(-PC - beta * logsig(u)), rtol=1e-12)


def test_cpo_reference_is_the_papers_formula():
    pc, pr = PC * 100, PR * 100  # sequence log-probs
    beta, alpha = 0.1, 0.7
    out, g = run("cpo", policy_chosen_logps=pc, policy_rejected_logps=pr, beta=beta,
                 alpha=alpha)
    u = beta * pc - beta * pr
    np.testing.assert_allclose(out, -logsig(u) - alpha * pc, rtol=1e-12)
    np.testing.assert_allclose(g["policy_chosen_logps"], -beta * sig(-u) - alpha, rtol=1e-10)
    np.testing.assert_allclose(g["policy_rejected_logps"], beta * sig(-u), rtol=1e-10)


def test_simpo_reference_is_the_papers_formula():
    # SimPO's inputs are length-normalized: (1/|y|) log pi(y) from sums and lengths
    sums_c, len_c = np.array([-30.0, -12.0, -80.0]), np.array([10, 40, 16])
    sums_r, len_r = np.array([-45.0, -9.0, -80.0]), np.array([9, 30, 16])
    beta, gamma = 2.0, 0.5
    out, g = run("simpo", "sum", policy_chosen_logps=sums_c / len_c,
                 policy_rejected_logps=sums_r / len_r, beta=beta, gamma=gamma)
    u = beta / len_c * sums_c - beta / len_r * sums_r - gamma
    np.testing.assert_allclose(out, np.sum(-logsig(u)), rtol=1e-12)
    np.testing.assert_allclose(g["policy_chosen_logps"], -beta * sig(-u), rtol=1e-10)


@pytest.mark.parametrize("with_kl", [True, False])
def test_kto_reference_is_the_papers_formula(with_kl):
    pol = np.array([-50.0, -61.0, -20.0, -33.0, -70.0])
    ref = np.array([-52.0, -60.0, -20.5, -30.0, -75.0])
    desirable = np.array([True, False, True, False, False])
    pkl, rkl = np.array([-40.0, -41.0, -39.0]), np.array([-41.0, -41.5, -41.0])
    beta, wd, wu = 0.5, 1.3, 0.8
    kw = {"policy_kl_logps": pkl, "reference_kl_logps": rkl} if with_kl else {}
    out, g = run("kto", policy_logps=pol, reference_logps=ref, desirable=desirable,
                 beta=beta, desirable_weight=wd, undesirable_weight=wu, **kw)
    z0 = max(0.0, float(np.mean(pkl - rkl))) if with_kl else 0.0
    r = pol - ref
    expected = np.where(desirable, wd * (1 - sig(beta * (r - z0))),
                        wu * (1 - sig(beta * (z0 - r))))
    np.testing.assert_allclose(out, expected, rtol=1e-12)
    dz = np.where(desirable, -wd * beta, wu * beta) * sig(beta * (r - z0)) * sig(-beta * (r - z0))
    np.testing.assert_allclose(g["policy_logps"], dz, rtol=1e-10)
    # z0 is detached: neither the reference nor the KL batch gets a gradient
    assert not g["reference_logps"].any()
    if with_kl:
        assert not g["policy_kl_logps"].any()


def test_kto_reference_point_clamps_a_negative_kl():
    pol, ref = np.array([-10.0, -12.0]), np.array([-11.0, -11.0])
    kw = dict(policy_logps=pol, reference_logps=ref, desirable=np.array([True, False]))
    clamped, _ = run("kto", grads=False, policy_kl_logps=np.array([-30.0]),
                     reference_kl_logps=np.array([-20.0]), **kw)
    without, _ = run("kto", grads=False, **kw)
    np.testing.assert_array_equal(clamped, without)


@pytest.mark.parametrize("name", ["orpo", "cpo", "simpo", "kto"])
def test_implementations_agree_at_large_margins_and_ties(name):
    """Margins of +-50 in the sigmoid's argument and exact ties, every implementation,
    float32, against the float64 reference."""
    spec = lossreg.get(name)
    if name == "kto":
        inputs = {"policy_logps": torch.tensor([-100.0, -600.0, -80.0, -80.0]),
                  "reference_logps": torch.tensor([-600.0, -100.0, -80.0, -80.0]),
                  "desirable": torch.tensor([True, False, True, False])}
        opts = {"beta": 0.1}
    else:
        scale = {"orpo": 1.0, "cpo": 500.0, "simpo": 25.0}[name]
        base = -torch.tensor([0.5, 2.0, 1.0, 1.0])
        inputs = {"policy_chosen_logps": base * (scale if name == "cpo" else 1.0),
                  "policy_rejected_logps": base.clone() * (scale if name == "cpo" else 1.0)}
        inputs["policy_rejected_logps"][0] -= scale if name != "orpo" else 40.0
        inputs["policy_rejected_logps"][1] += min(scale, 1.9)
        opts = {}
    ref = spec.reference(**{k: v.double() if v.is_floating_point() else v
                            for k, v in inputs.items()}, **opts, reduction="none")
    for impl in spec.implementations.values():
        if impl.name not in ("reference", "torch", "triton"):
            continue  # compile, and peers (tests/test_peers.py)
        out = impl.fn(**inputs, **opts, reduction="none")
        assert torch.isfinite(out).all(), impl.name
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6, msg=impl.name)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("LOSSREG_DEEP_TESTS") != "1",
                    reason="minutes of harness checks: LOSSREG_DEEP_TESTS=1")
def test_every_implementation_passes_check_in_bfloat16():
    df = lossreg.check(["orpo", "cpo", "simpo", "kto"], device="cpu", dtypes=["bfloat16"],
                       case_timeout=0,
                       impls=["torch", "triton"])
    bad = df[df.status.isin(["fail", "error"])]
    assert bad.empty, bad[["loss", "impl", "check", "n", "params", "message"]].to_string()
    assert set(df[df.status == "ok"].impl) == {"torch", "triton"}


# ---------------------------------------------------------------- the shared tester
class TestCpo(LossTester):
    loss = "cpo"
    no_oracle = "tests/plugins/test_preference.py"


class TestKto(LossTester):
    loss = "kto"
    no_oracle = "tests/plugins/test_preference.py"


class TestOrpo(LossTester):
    loss = "orpo"
    no_oracle = "tests/plugins/test_preference.py"


class TestSimpo(LossTester):
    loss = "simpo"
    no_oracle = "tests/plugins/test_preference.py"
