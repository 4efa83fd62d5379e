"""Malformed specs and implementations, one hook module per fault: each entry point
``malformed_<fault>`` points at one attribute namespace below (``malformed:<Fault>``),
a class whose static methods are the hookimpls."""

import torch

from lossreg import Impl, LossSpec, hookimpl


def ref(input, target, reduction="mean"):
    return (input - target).abs().mean()


def make_inputs(case):
    return {"input": case.randn(case.n), "target": case.randn(case.n)}


def spec(**override):
    fields = dict(name="fault_ok", family="fault", formula="x", reference=ref,
                  make_inputs=make_inputs)
    fields.update(override)
    return LossSpec(**fields)


class BackendNotStr:
    @staticmethod
    @hookimpl
    def register_implementations(register):
        register("mse", Impl("fault_backend", ref, backend=42))


class UnknownDevice:
    @staticmethod
    @hookimpl
    def register_implementations(register):
        register("mse", Impl("fault_device", ref, devices=("cpu", "tpu")))


class NegativeSize:
    @staticmethod
    @hookimpl
    def register_losses(register):
        register(spec(name="fault_negative", sizes={"quick": [-5], "default": [10],
                                                    "large": [100]}))


class ToleranceNotPositive:
    @staticmethod
    @hookimpl
    def register_losses(register):
        register(spec(name="fault_tolerance", tolerances={"float32": (0.0, "tiny")}))


class EdgeCaseNotCallable:
    @staticmethod
    @hookimpl
    def register_losses(register):
        register(spec(name="fault_edge", edge_cases={"zeros": torch.zeros(3)}))


class MutatedAfterConstruction:
    """Valid when built, then broken before being handed over: caught at registration."""

    @staticmethod
    @hookimpl
    def register_losses(register):
        s = spec(name="fault_mutated")
        s.check_options = [{"reduction": "sum"}, "none"]
        register(s)


class NotASpec:
    @staticmethod
    @hookimpl
    def register_losses(register):
        register({"name": "fault_dict"})
