"""Checking that every input maker and edge case builds its tensors on ``case.device``.

A maker that forgets ``device=case.device`` (``torch.tensor([...])``, ``torch.arange(n)``)
works on a CPU and fails only on a GPU, where its CPU tensor meets the kernel's CUDA
ones. Here ``case.device`` is ``"meta"`` instead, so such a slip fails on any machine.

`loss_tester.LossTester` runs `misplaced` on every maker of its loss; the detector
itself is tested in ``tests/test_meta_device.py``.

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

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.weak import WeakIdKeyDictionary

from lossreg.spec import Case

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


def misplaced(make, case_args):
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


def makers(spec):
    """(id, make, case arguments) for each input maker of ``spec``: make_inputs at every
    preset that has input parameters, and each edge case."""
    n = min(spec.sizes["quick"])
    out = []
    for preset in ["quick", *sorted(set(spec.input_params) - {"quick"})]:
        out.append((preset, spec.make_inputs, dict(
            n=n, dtype=torch.float32, seed=3, params=spec.case_params(preset, spec.options))))
    for name, make in spec.edge_cases.items():
        out.append((f"edge-{name}", make, dict(
            n=1, dtype=torch.float32, seed=11, params=spec.case_params("quick", spec.options))))
    return out
