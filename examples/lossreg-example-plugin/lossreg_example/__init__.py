"""An example third-party lossreg plugin: the pseudo-Huber loss.

    L = mean_i delta^2 (sqrt(1 + (r_i / delta)^2) - 1),   r_i = input_i - target_i

Quadratic near zero like Huber's loss, linear in the tails, but smooth everywhere.
The plugin registers the loss (its spec, reference and inputs) with
``register_losses`` and two implementations with ``register_implementations``:

* ``torch``: the same function written with ``torch.hypot`` (one fused elementwise op
  fewer than the reference; runs on every device);
* ``triton``: a kernel built on lossreg's pointwise template
  (``lossreg.kernels.pointwise_loss``), in `lossreg_example.kernels`. That module is
  imported on the first call, never at plugin import, so ``lossreg list`` does not
  pay for Triton.

Install it (``pip install -e examples/lossreg-example-plugin``), then
``lossreg show pseudo_huber`` and ``lossreg check pseudo_huber``.
"""

from __future__ import annotations

import torch

from lossreg import Impl, LossSpec, hookimpl

REDUCTIONS = ("mean", "sum", "none")


def validate(input, target, delta, reduction):
    """Shared by every implementation: bad input is a ValueError saying what was
    expected (the harness's bad-input checks rely on all implementations agreeing)."""
    if not (torch.is_tensor(input) and torch.is_tensor(target)):
        raise ValueError("pseudo_huber: input and target must be tensors")
    if not (input.is_floating_point() and target.is_floating_point()):
        raise ValueError(f"pseudo_huber: input and target must be floating point, got "
                         f"{input.dtype} and {target.dtype}")
    if input.shape != target.shape:
        raise ValueError(f"pseudo_huber: input and target must have the same shape, got "
                         f"{tuple(input.shape)} and {tuple(target.shape)}")
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not delta > 0:
        raise ValueError(f"pseudo_huber: delta must be a number > 0, got {delta!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"pseudo_huber: reduction must be one of {REDUCTIONS}, "
                         f"got {reduction!r}")


def reduce(loss, reduction):
    if reduction == "none":
        return loss
    return loss.mean() if reduction == "mean" else loss.sum()


def reference(input, target, delta=1.0, reduction="mean"):
    """The formula as written: the ground truth (the harness runs it in float64)."""
    validate(input, target, delta, reduction)
    r = (input - target) / delta
    return reduce(delta * delta * (torch.sqrt(1 + r * r) - 1), reduction)


def pseudo_huber_torch(input, target, delta=1.0, reduction="mean"):
    """delta * (hypot(delta, r) - delta): hypot does not overflow for huge residuals."""
    validate(input, target, delta, reduction)
    r = input - target
    return reduce(delta * (torch.hypot(r, torch.full_like(r, delta)) - delta), reduction)


def pseudo_huber_triton(input, target, delta=1.0, reduction="mean"):
    validate(input, target, delta, reduction)
    from . import kernels  # Triton and the template load on the first call only

    return kernels.pseudo_huber(input, target, reduction, p0=float(delta))


def make_inputs(case):
    """``case`` gives n, dtype, device, a seeded generator and the options (params)."""
    return {"input": case.randn(case.n), "target": case.randn(case.n)}


def huge_residuals(case):
    """An edge case: residuals of 1e4, where the naive sqrt(1 + r^2) form loses digits
    in low precision and the linear tail dominates."""
    return {"input": case.randn(1031) * 1e4, "target": case.randn(1031)}


@hookimpl
def register_losses(register):
    register(LossSpec(
        name="pseudo_huber",
        family="example",
        title="Pseudo-Huber loss",
        formula=(r"\frac{1}{n}\sum_{i=1}^{n} \delta^2\left(\sqrt{1 + (r_i/\delta)^2} - 1"
                 r"\right),\quad r_i = x_i - y_i"),
        description="A smooth Huber loss: quadratic near zero, linear in the tails. "
                    "Option `delta` (> 0) sets where one turns into the other.",
        citation="Charbonnier et al. (1994); Hartley & Zisserman, Multiple View "
                 "Geometry (2003), A6.8",
        reference=reference,
        make_inputs=make_inputs,
        options={"reduction": "mean", "delta": 1.0},
        check_options=[{"reduction": "sum"}, {"reduction": "none"}, {"delta": 0.25},
                       {"delta": 4.0, "reduction": "none"}],
        edge_cases={"huge_residuals": huge_residuals,
                    "one_element": lambda case: {"input": case.randn(1),
                                                 "target": case.randn(1)}},
        sizes={"quick": [1000, 4099], "default": [2**12, 2**16, 2**20],
               "large": [2**20, 2**24]},
        # elementwise: read input and target, write one gradient per input
        bytes_moved=lambda inputs: {
            "forward": 2 * inputs["input"].numel() * inputs["input"].element_size(),
            "full": 4 * inputs["input"].numel() * inputs["input"].element_size()},
        flops=lambda inputs: {"forward": 6 * inputs["input"].numel(),
                              "full": 10 * inputs["input"].numel()},
    ))


@hookimpl
def register_implementations(register, losses):
    register("pseudo_huber", Impl(
        "torch", pseudo_huber_torch, kind="optimized", backend="torch",
        description="delta * (hypot(r, delta) - delta)"))
    register("pseudo_huber", Impl(
        "triton", pseudo_huber_triton, backend="triton", devices=("cuda",),
        requires=("triton",), grad_in_forward=True,
        description="lossreg pointwise template: one pass, gradient in the forward"))
