"""Plugin discovery (entry-point group ``lossreg``) and the registry of losses.

Each plugin's hooks run on their own, against a staging area: a plugin whose import
or hook fails contributes nothing, gets one warning on stderr naming its entry point
and error, and is listed as failed; the rest load. ``LOSSREG_STRICT_PLUGINS=1``
turns the warning into an error; ``LOSSREG_LOAD_PLUGINS=a,b`` loads only those
entry points (set but empty: none).
"""

from __future__ import annotations

import difflib
import os
import sys
import traceback
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

import pluggy

from . import hookspecs
from .spec import Impl, LossSpec, SpecError

GROUP = "lossreg"


class UnknownLossError(KeyError):
    """No loss of that name; the message suggests the closest names."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class PluginError(RuntimeError):
    """A plugin failed to load while LOSSREG_STRICT_PLUGINS=1."""


@dataclass
class PluginInfo:
    name: str
    value: str
    dist: str = ""
    version: str = ""
    status: str = "loaded"  # loaded | failed
    error: str = ""
    warnings: list[str] = field(default_factory=list)
    losses: list[str] = field(default_factory=list)
    implementations: list[str] = field(default_factory=list)  # "loss:impl"

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _strict() -> bool:
    return os.environ.get("LOSSREG_STRICT_PLUGINS", "") not in ("", "0")


def _compile_impl(spec: LossSpec) -> Impl:
    """torch.compile of the reference, compiled on first call."""
    compiled = None

    def fn(*args, **kwargs):
        nonlocal compiled
        if compiled is None:
            import torch
            import torch._dynamo

            # The harness calls with and without grad, per dtype, size and option set:
            # past dynamo's default limit of 8 recompiles it silently runs eager, and
            # the `compile` rows would time the reference.
            for knob in ("recompile_limit", "cache_size_limit"):
                if hasattr(torch._dynamo.config, knob):
                    setattr(torch._dynamo.config, knob,
                            max(getattr(torch._dynamo.config, knob), 256))
            compiled = torch.compile(spec.reference, dynamic=False)
        return compiled(*args, **kwargs)

    return Impl("compile", fn, kind="baseline", backend="compile", plugin="lossreg",
                description="torch.compile of the reference")


class Registry:
    def __init__(self) -> None:
        self.losses: dict[str, LossSpec] = {}
        self.plugins: dict[str, PluginInfo] = {}
        self.pm = pluggy.PluginManager(GROUP)
        self.pm.add_hookspecs(hookspecs)

    # ----------------------------------------------------------------- loading
    def load_entry_points(self) -> "Registry":
        wanted = os.environ.get("LOSSREG_LOAD_PLUGINS")
        only = None if wanted is None else {w.strip() for w in wanted.split(",") if w.strip()}
        eps = sorted(entry_points(group=GROUP), key=lambda ep: ep.name)
        modules = []
        for ep in eps:
            if only is not None and ep.name not in only:
                continue
            if ep.name in self.plugins:  # the same distribution seen twice on sys.path
                continue
            info = PluginInfo(ep.name, ep.value)
            if ep.dist is not None:
                info.dist, info.version = ep.dist.name, ep.dist.version
            self.plugins[ep.name] = info
            module = None
            try:
                module = ep.load()
                self.pm.register(module, name=ep.name)
                self.pm.check_pending()
            except Exception as exc:  # noqa: BLE001 - any plugin failure is contained
                if module is not None and self.pm.is_registered(module):
                    self.pm.unregister(module)
                self._fail(info, "failed to load", exc)
                continue
            modules.append((info, module))
        self._run_hooks(modules)
        return self

    def register_plugin(self, module: Any, name: str) -> "Registry":
        """Register an already-imported module as a plugin (tests, notebooks)."""
        info = PluginInfo(name, getattr(module, "__name__", repr(module)))
        self.plugins[name] = info
        try:
            self.pm.register(module, name=name)
        except Exception as exc:  # noqa: BLE001
            self._fail(info, "failed to load", exc)
            return self
        self._run_hooks([(info, module)])
        return self

    def _run_hooks(self, modules: list[tuple[PluginInfo, Any]]) -> None:
        for info, module in modules:
            self._call(info, module, "register_losses")
        for info, module in modules:
            if info.status == "loaded":
                self._call(info, module, "register_implementations")

    def _call(self, info: PluginInfo, module: Any, hook: str) -> None:
        impls = [h for h in getattr(self.pm.hook, hook).get_hookimpls() if h.plugin is module]
        staged_losses: list[LossSpec] = []
        staged_impls: list[tuple[str, Impl]] = []

        def register_loss(spec):
            if not isinstance(spec, LossSpec):
                raise SpecError(f"register() takes a LossSpec, got {type(spec).__name__}")
            other = self.losses.get(spec.name)
            if other is not None:
                raise SpecError(
                    f"loss {spec.name!r} is registered by both plugin {other.plugin!r} "
                    f"and plugin {info.name!r}"
                )
            if any(s.name == spec.name for s in staged_losses):
                raise SpecError(f"plugin {info.name!r} registers loss {spec.name!r} twice")
            staged_losses.append(spec)

        def register_impl(loss, impl):
            if not isinstance(impl, Impl):
                raise SpecError(f"register(loss, impl) takes an Impl, got {type(impl).__name__}")
            staged_impls.append((loss, impl))

        # what implementations may attach to (a peer plugin registers only where
        # the loss exists, instead of tripping the unknown-loss warning)
        register_impl.losses = frozenset(self.losses)
        callback = register_loss if hook == "register_losses" else register_impl
        try:
            for h in impls:
                h.function(register=callback)
        except Exception as exc:  # noqa: BLE001
            self._fail(info, f"hook {hook} raised", exc)
            return
        for spec in staged_losses:
            spec.plugin = info.name
            spec.implementations["reference"].plugin = info.name
            spec.implementations["compile"] = _compile_impl(spec)
            self.losses[spec.name] = spec
            info.losses.append(spec.name)
        for loss, impl in staged_impls:
            spec = self.losses.get(loss)
            if spec is None:
                msg = (f"plugin {info.name!r} registered implementation {impl.name!r} "
                       f"for unknown loss {loss!r}{_suggest(loss, self.losses)}")
                info.warnings.append(msg)
                print(f"lossreg: warning: {msg}", file=sys.stderr)
                continue
            if impl.name in spec.implementations:
                msg = (f"plugin {info.name!r}: loss {loss!r} already has an implementation "
                       f"named {impl.name!r} (from plugin "
                       f"{spec.implementations[impl.name].plugin!r}); ignored")
                info.warnings.append(msg)
                print(f"lossreg: warning: {msg}", file=sys.stderr)
                continue
            impl.plugin = info.name
            spec.implementations[impl.name] = impl
            info.implementations.append(f"{loss}:{impl.name}")

    def _fail(self, info: PluginInfo, what: str, exc: BaseException) -> None:
        info.status = "failed"
        info.error = f"{type(exc).__name__}: {exc}"
        msg = f"plugin {info.name!r} ({info.value}) {what}: {info.error}"
        if _strict():
            raise PluginError(msg + "\n" + "".join(traceback.format_exception(exc))) from exc
        print(f"lossreg: warning: {msg}", file=sys.stderr)

    # ----------------------------------------------------------------- queries
    def get(self, name: str) -> LossSpec:
        try:
            return self.losses[name]
        except KeyError:
            raise UnknownLossError(
                f"unknown loss {name!r}{_suggest(name, self.losses)}"
            ) from None

    def list(self, family: str | None = None) -> list[LossSpec]:
        specs = sorted(self.losses.values(), key=lambda s: (s.family, s.name))
        return [s for s in specs if family is None or s.family == family]


def _suggest(name: str, choices) -> str:
    close = difflib.get_close_matches(str(name), list(choices), n=3, cutoff=0.5)
    return f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""


_DEFAULT: Registry | None = None


def default_registry() -> Registry:
    global _DEFAULT
    if _DEFAULT is None:
        from . import kernels  # noqa: F401 - sets TRITON_INTERPRET before kernels are defined

        _DEFAULT = Registry().load_entry_points()
    return _DEFAULT


def reload() -> Registry:
    """Forget the loaded plugins and discover them again."""
    global _DEFAULT
    _DEFAULT = None
    return default_registry()


def get(name: str) -> LossSpec:
    """The loss called `name`; KeyError with the closest names when there is none."""
    return default_registry().get(name)


def losses(family: str | None = None) -> list[LossSpec]:
    """Registered losses, optionally of one family."""
    return default_registry().list(family)
