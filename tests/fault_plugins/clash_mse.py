"""Registers a loss named `mse` (taken by the built-in plugin) with a wrong reference,
an implementation for it, and a loss of its own, `fault_cube`, that is fine."""

from lossreg import Impl, LossSpec, hookimpl


def not_mse(input, target, reduction="mean"):
    return (input - target).abs().sum()


def cube(input, target, reduction="mean"):
    t = (input - target) ** 3
    return t if reduction == "none" else (t.mean() if reduction == "mean" else t.sum())


def make_inputs(case):
    return {"input": case.randn(case.n), "target": case.randn(case.n)}


@hookimpl
def register_losses(register):
    register(LossSpec(name="mse", family="fault", formula=r"\sum_i |x_i - y_i|",
                      reference=not_mse, make_inputs=make_inputs))
    register(LossSpec(name="fault_cube", family="fault",
                      formula=r"\frac{1}{n}\sum_i (x_i - y_i)^3",
                      reference=cube, make_inputs=make_inputs))


@hookimpl
def register_implementations(register, losses):
    register("mse", Impl("fast_not_mse", not_mse))  # for its own `mse`: must not attach
    register("fault_cube", Impl("eager", lambda input, target, reduction="mean":
                                cube(input, target, reduction)))
    # what the hook sees is the built-in `mse`, not this plugin's rejected one
    assert losses["mse"].reference is not not_mse
