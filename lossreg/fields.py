"""Rules for the fields a plugin hands over in a `LossSpec` or an `Impl`.

A rule is a callable ``rule(value) -> value`` that returns the value (normalized: a
list becomes a tuple, a lone string a one-element tuple where the field says so) or
raises `FieldError` saying what it expected. `spec.py` keeps one table per class,
field name -> rule, so a new field is one line there; `validate` runs a table and
turns a `FieldError` into a `SpecError` naming the object, the field, what came and
what was expected (the registry adds the plugin's name).
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Mapping

from .validate import DOMAIN_KINDS

Rule = Callable[[Any], Any]

NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
#: a backend or module name: letters, digits, '_', '.', '-' (``liger_kernel``, ``torch``)
TOKEN_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")
#: an option or input name: a Python identifier (they are passed as keyword arguments)
IDENT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
#: device types an implementation may declare (torch.device(...).type)
DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")
DTYPE_NAMES = ("float64", "float32", "bfloat16", "float16")
PRESETS = ("quick", "default", "large")


class FieldError(ValueError):
    """One field's value is not what its rule expects; the message is the expectation."""


def show(value: Any) -> str:
    """What came, short: its repr (cut at 80 characters) and its type."""
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{text} ({type(value).__name__})"


def validate(obj: Any, table: Mapping[str, Rule], what: str, error: type) -> None:
    """Run every rule of `table` on `obj`'s fields, storing the normalized values."""
    for name, rule in table.items():
        value = getattr(obj, name)
        try:
            setattr(obj, name, rule(value))
        except FieldError as exc:
            raise error(f"{what}: field {name!r} got {show(value)}, expected {exc}") from None


# ------------------------------------------------------------------ scalar rules
def text(value: Any) -> str:
    if not isinstance(value, str):
        raise FieldError("a string")
    return value


def nonempty_text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise FieldError("a non-empty string")
    return value


def name(value: Any) -> str:
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise FieldError("lower snake case (letters, digits and '_', starting with a letter)")
    return value


def token(value: Any) -> str:
    if not isinstance(value, str) or not TOKEN_RE.match(value):
        raise FieldError("a name of letters, digits, '_', '.' or '-' (e.g. 'torch', 'triton')")
    return value


def identifier(value: Any) -> str:
    if not isinstance(value, str) or not IDENT_RE.match(value):
        raise FieldError("a Python identifier")
    return value


def boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise FieldError("True or False")
    return value


def function(value: Any) -> Callable:
    if not callable(value):
        raise FieldError("a callable")
    return value


def positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise FieldError("a positive int")
    return value


def one_of(*choices: str) -> Rule:
    def rule(value: Any) -> str:
        if not isinstance(value, str) or value not in choices:
            raise FieldError(f"one of {list(choices)}")
        return value
    return rule


def optional(inner: Rule) -> Rule:
    """None, or what `inner` accepts."""
    def rule(value: Any) -> Any:
        if value is None:
            return None
        try:
            return inner(value)
        except FieldError as exc:
            raise FieldError(f"None or {exc}") from None
    return rule


# ------------------------------------------------------------------ containers
def names_of(item: Rule, expected: str) -> Rule:
    """A tuple (or list) of items; a lone string counts as one item (``devices="cpu"``
    means ``("cpu",)``, never the characters c, p, u)."""
    def rule(value: Any) -> tuple:
        if isinstance(value, str):
            value = (value,)
        if not isinstance(value, (tuple, list)):
            raise FieldError(f"a tuple of {expected} (a lone string counts as one)")
        out = []
        for v in value:
            try:
                out.append(item(v))
            except FieldError:
                raise FieldError(f"a tuple of {expected}, and {show(v)} is not one") from None
        return tuple(out)
    return rule


def mapping(key: Rule, item: Rule, expected: str) -> Rule:
    """A dict; every key passes `key` and every value `item`."""
    def rule(value: Any) -> dict:
        if not isinstance(value, dict):
            raise FieldError(expected)
        out = {}
        for k, v in value.items():
            try:
                out[key(k)] = item(v)
            except FieldError as exc:
                raise FieldError(f"{expected}; at key {k!r}: {exc}") from None
        return out
    return rule


def anything(value: Any) -> Any:
    return value


def options(value: Any) -> dict:
    return mapping(identifier, anything, "a dict of option name (str) -> value")(value)


def option_sets(value: Any) -> list:
    if not isinstance(value, (list, tuple)):
        raise FieldError("a list of option dicts (str keys)")
    out = []
    for i, v in enumerate(value):
        try:
            out.append(options(v))
        except FieldError:
            raise FieldError(f"a list of option dicts (str keys); item {i} is {show(v)}") \
                from None
    return out


def sizes(value: Any) -> dict:
    """preset -> non-empty list of positive ints; every preset present."""
    def size_list(v: Any) -> list:
        if not isinstance(v, (list, tuple)) or not v:
            raise FieldError("a non-empty list of positive ints")
        return [positive_int(n) for n in v]

    out = mapping(one_of(*PRESETS), size_list,
                  f"a dict of preset {list(PRESETS)} -> non-empty list of positive ints")(value)
    missing = [p for p in PRESETS if p not in out]
    if missing:
        raise FieldError(f"sizes for every preset {list(PRESETS)} (missing {missing})")
    return out


def tolerance_pair(value: Any) -> tuple[float, float]:
    expected = "(rtol, atol): two positive finite floats"
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise FieldError(expected)
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 < v < math.inf):
            raise FieldError(expected)
    return (float(value[0]), float(value[1]))


def tolerances(value: Any) -> dict:
    return mapping(one_of(*DTYPE_NAMES), tolerance_pair,
                   f"a dict of dtype {list(DTYPE_NAMES)} -> (rtol, atol)")(value)


def input_params(value: Any) -> dict:
    return mapping(one_of(*PRESETS), options,
                   f"a dict of preset {list(PRESETS)} -> dict of parameters (str keys)")(value)


def edge_cases(value: Any) -> dict:
    return mapping(name, function, "a dict of edge-case name -> make_inputs-like callable")(value)


def domain(value: Any) -> tuple:
    if not isinstance(value, (tuple, list)) or not value or value[0] not in DOMAIN_KINDS:
        raise FieldError(f"a tuple (kind, ...) with kind one of {list(DOMAIN_KINDS)}")
    return tuple(value)


def input_domains(value: Any) -> dict:
    return mapping(identifier, domain, "a dict of input name -> (kind, ...)")(value)
