"""Every input maker and edge case builds its tensors on ``case.device``.

A maker that forgets ``device=case.device`` (``torch.tensor([...])``, ``torch.arange(n)``)
works on a CPU and fails only on a GPU, where its CPU tensor meets the kernel's CUDA
ones. Here ``case.device`` is ``"meta"`` instead, so such a slip fails on any machine.

How (two steps per maker):

1. Real meta tensors. The maker runs with ``Case(device="meta")`` and a CPU generator
   (meta has none; ``randn(device="meta", generator=cpu)`` is allowed). Every tensor it
   returns must be on meta. A CPU tensor mixed into a meta computation raises torch's
   "same device" error: that is a failure too.
2. Makers that compute on their values (sort, unique, ``.item()``, loops until a
   condition holds) cannot run on meta, which has no data. Those run again under
   `VirtualDevice`, a torch function mode that computes on the CPU but keeps, for every
   tensor, the device it would be on: a factory call's ``device=`` (``"meta"`` is run
   on the CPU and remembered as meta), the device of the tensors an operation takes
   (meta if any of them is), ``.to(...)``/``.cpu()``'s target, and the CPU (the default
   device) for a tensor built from Python data with no ``device=``. It answers
   ``t.device`` with that remembered device, so ``device=other.device`` follows along.
   Every returned tensor must be remembered as meta.
"""

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.weak import WeakIdKeyDictionary

import lossreg
from lossreg.spec import Case

SPECS = lossreg.losses()
TARGET = "meta"
DEVICE_GETTER = torch.Tensor.device.__get__
#: messages of torch errors that mean "this needs values", not "wrong device"
NEEDS_DATA = ("meta tensor", "meta device", "no data", "data-dependent", "not implemented",
              "meta", "item()")


def _device_name(d) -> str | None:
    if isinstance(d, (str, torch.device)):
        return torch.device(d).type
    return None


class VirtualDevice(TorchFunctionMode):
    """Compute on the CPU, remember which device each tensor would be on (see above)."""

    def __init__(self):
        super().__init__()
        self.where = WeakIdKeyDictionary()

    def device_of(self, t: torch.Tensor) -> str:
        return self.where.get(t, "cpu")  # made outside the mode: a real CPU tensor

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func == DEVICE_GETTER:
            return torch.device(self.device_of(args[0]))
        name = getattr(func, "__name__", "")
        target = None
        if kwargs.get("device") is not None:
            target = _device_name(kwargs["device"])
            kwargs["device"] = "cpu"
        elif name == "to" and len(args) > 1:
            if _device_name(args[1]) is not None:
                target = _device_name(args[1])
                args = (args[0], "cpu", *args[2:])
            elif torch.is_tensor(args[1]):
                target = self.device_of(args[1])
        elif name in ("cpu", "cuda"):
            target = name
            func, args, kwargs = torch.Tensor.clone, args[:1], {}
        if target is None:
            tensors = [t for t in tree_flatten((args, kwargs))[0] if torch.is_tensor(t)]
            where = {self.device_of(t) for t in tensors}
            target = TARGET if TARGET in where else (where.pop() if where else "cpu")
        out = func(*args, **kwargs)

        def tag(t):
            if torch.is_tensor(t):
                self.where[t] = target
            return t

        tree_map(tag, out)
        return out


def _tensors(inputs):
    return [(k, v) for k, v in inputs.items() if torch.is_tensor(v)]


def _misplaced(make, case_args):
    """Names and devices of the tensors ``make`` returns off the target device."""
    def case():
        return Case(**case_args, device=TARGET, generator=torch.Generator().manual_seed(
            case_args["seed"]))

    try:
        inputs = make(case())
        return [f"{k} on {v.device}" for k, v in _tensors(inputs) if v.device.type != TARGET]
    except (RuntimeError, NotImplementedError, ValueError, TypeError) as exc:
        msg = str(exc)
        if "device" in msg and not any(s in msg for s in NEEDS_DATA[:2]):
            return [f"raised {type(exc).__name__}: {msg}"]
    mode = VirtualDevice()
    with mode:
        inputs = make(case())
    return [f"{k} on {mode.device_of(v)}" for k, v in _tensors(inputs)
            if mode.device_of(v) != TARGET]


def _makers():
    for spec in SPECS:
        n = min(spec.sizes["quick"])
        for preset in ["quick", *sorted(set(spec.input_params) - {"quick"})]:
            yield pytest.param(spec.make_inputs, dict(
                n=n, dtype=torch.float32, seed=3, params=spec.case_params(preset, spec.options)),
                id=f"{spec.name}-{preset}")
        for name, make in spec.edge_cases.items():
            yield pytest.param(make, dict(
                n=1, dtype=torch.float32, seed=11, params=spec.case_params("quick", spec.options)),
                id=f"{spec.name}-edge-{name}")


@pytest.mark.parametrize("make,case_args", list(_makers()))
def test_inputs_land_on_the_case_device(make, case_args):
    bad = _misplaced(make, case_args)
    assert not bad, f"built off case.device ({TARGET}): {'; '.join(bad)}"


# ---------------------------------------------------------------- the detector itself
def _good(case):
    x = case.randn(5)
    return {"input": x, "target": torch.tensor([1.0, 2.0], device=x.device),
            "idx": torch.arange(3, device=case.device).sort().values}


def _needs_values_good(case):
    x = case.randn(6)
    k = int((x > 0).sum().item())  # data-dependent: meta cannot run this
    return {"input": x, "index": torch.arange(k + 1, device=case.device)}


def _needs_values_bad(case):
    x = case.randn(6)
    k = int((x > 0).sum().item())
    return {"input": x, "index": torch.arange(k + 1)}


def _moved_later(case):
    x = case.randn(4)
    return {"input": x, "target": torch.tensor([0, 1, 0, 1]).to(x.device)}


def _forgot_device(case):
    return {"input": case.randn(4), "target": torch.zeros(4)}


def _forgot_device_mixed(case):
    x = case.randn(4)
    return {"input": x, "target": x.detach() * 0 + torch.ones(4)}


@pytest.mark.parametrize("make,bad", [
    (_good, False), (_needs_values_good, False), (_moved_later, False),
    (_needs_values_bad, True), (_forgot_device, True), (_forgot_device_mixed, True),
])
def test_detector_finds_tensors_off_the_device(make, bad):
    found = _misplaced(make, dict(n=4, dtype=torch.float32, seed=0, params={}))
    assert bool(found) == bad, found
