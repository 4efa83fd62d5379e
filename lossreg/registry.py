"""Plugin discovery (entry-point group ``lossreg``) and the registry of losses.

Built-in plugins (entry points of the ``lossreg`` distribution) load first and their
names are reserved. Each plugin's import and each of its hooks run under a time limit
(``LOSSREG_PLUGIN_TIMEOUT`` seconds, default 30; 0: none) in a daemon thread, against
a staging area: a plugin whose import or hook fails or overruns contributes nothing,
gets one warning on stderr naming it and why, and is listed as failed; the rest load.

Names are never replaced: a third-party entry point named like a built-in one (or like
another distribution's), a loss name already registered, or an implementation name a
loss already has is rejected with a warning naming both distributions, and what was
there stays. ``LOSSREG_STRICT_PLUGINS=1`` turns every such warning into an error;
``LOSSREG_LOAD_PLUGINS=a,b`` loads only those entry points (set but empty: none).
"""

from __future__ import annotations

import difflib
import os
import sys
import threading
import traceback
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from types import MappingProxyType
from typing import Any

import pluggy

from . import hookspecs
from .spec import Impl, LossSpec, SpecError
from .timelimit import DEFAULT_TIMEOUT, TIMEOUT_ENV, PluginTimeout, run_limited

GROUP = "lossreg"
#: the distribution whose entry points are the built-in plugins
BUILTIN_DIST = "lossreg"


class UnknownLossError(KeyError):
    """No loss of that name; the message suggests the closest names."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class PluginError(RuntimeError):
    """A plugin failed or was rejected while LOSSREG_STRICT_PLUGINS=1, or the plugin
    settings are malformed."""


@dataclass
class PluginInfo:
    name: str
    value: str
    dist: str = ""
    version: str = ""
    builtin: bool = False
    status: str = "loaded"  # loaded | failed | rejected
    error: str = ""
    warnings: list[str] = field(default_factory=list)
    losses: list[str] = field(default_factory=list)
    implementations: list[str] = field(default_factory=list)  # "loss:impl"
    rejected_losses: list[str] = field(default_factory=list)  # names another plugin had

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @property
    def who(self) -> str:
        """``plugin 'x' (distribution 'd')`` for messages."""
        return f"plugin {self.name!r} ({_dist_label(self.dist)})"


def _dist_label(dist: str) -> str:
    return f"distribution {dist!r}" if dist else "no distribution"


def _strict() -> bool:
    return os.environ.get("LOSSREG_STRICT_PLUGINS", "") not in ("", "0")


def plugin_timeout() -> float:
    """Seconds each plugin import or hook may take (0 or less: no limit)."""
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_TIMEOUT
    try:
        return float(raw)
    except ValueError:
        raise PluginError(f"{TIMEOUT_ENV} must be a number of seconds (0: no limit), "
                          f"got {raw!r}") from None


class _CompiledReference:
    """torch.compile of a reference, compiled on first call. Pickles without the
    compiled function (dynamo's objects do not pickle; a worker compiles its own)."""

    __name__ = "compile"

    def __init__(self, reference):
        self.reference = reference
        self.compiled = None

    def __getstate__(self):
        return {"reference": self.reference, "compiled": None}

    def __call__(self, *args, **kwargs):
        if self.compiled is None:
            import torch
            import torch._dynamo

            # The harness calls with and without grad, per dtype, size and option set:
            # past dynamo's default limit of 8 recompiles it silently runs eager, and
            # the `compile` rows would time the reference.
            for knob in ("recompile_limit", "cache_size_limit"):
                if hasattr(torch._dynamo.config, knob):
                    setattr(torch._dynamo.config, knob,
                            max(getattr(torch._dynamo.config, knob), 256))
            self.compiled = torch.compile(self.reference, dynamic=False)
        return self.compiled(*args, **kwargs)


def _compile_impl(spec: LossSpec) -> Impl:
    """torch.compile of the reference, compiled on first call."""
    return Impl("compile", _CompiledReference(spec.reference), kind="baseline",
                backend="compile", plugin="lossreg",
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
        timeout = plugin_timeout()

        dists: dict[int, tuple[str, str]] = {}  # each METADATA parsed once, not per access

        def dist_of(ep) -> tuple[str, str]:
            if ep.dist is None:
                return "", ""
            if id(ep.dist) not in dists:
                meta = ep.dist.metadata
                dists[id(ep.dist)] = (meta["Name"] or "", meta["Version"] or "")
            return dists[id(ep.dist)]

        def order(ep):
            dist = dist_of(ep)[0]
            return (dist != BUILTIN_DIST, dist, ep.name)

        eps = list(entry_points(group=GROUP))
        modules = []
        for ep in sorted(eps, key=order):
            if only is not None and ep.name not in only:
                continue
            info = PluginInfo(ep.name, ep.value)
            info.dist, info.version = dist_of(ep)
            info.builtin = info.dist == BUILTIN_DIST
            taken = self.plugins.get(ep.name)
            if taken is not None:
                if taken.dist == info.dist:  # the same distribution seen twice on sys.path
                    continue
                self._reject(info, f"{info.who} has the entry-point name of "
                                   f"{'built-in ' if taken.builtin else ''}{taken.who}; "
                                   "not loaded (choose another name)")
                continue
            self.plugins[ep.name] = info
            try:
                module = run_limited(ep.load, timeout, f"import of {ep.value}")
            except Exception as exc:  # noqa: BLE001 - any plugin failure is contained
                self._fail(info, "failed to load", exc)
                continue
            if self._register_module(info, module):
                modules.append((info, module))
        self._run_hooks(modules, timeout)
        return self

    def register_plugin(self, module: Any, name: str, dist: str = "") -> "Registry":
        """Register an already-imported module as a plugin (tests, notebooks)."""
        info = PluginInfo(name, getattr(module, "__name__", repr(module)), dist=dist)
        if name in self.plugins:
            self._reject(info, f"{info.who} has the name of {self.plugins[name].who}; "
                               "not registered")
            return self
        self.plugins[name] = info
        if self._register_module(info, module):
            self._run_hooks([(info, module)], plugin_timeout())
        return self

    def _register_module(self, info: PluginInfo, module: Any) -> bool:
        try:
            self.pm.register(module, name=info.name)
            self.pm.check_pending()
        except Exception as exc:  # noqa: BLE001 - a malformed hookimpl fails its plugin
            if self.pm.is_registered(module):
                self.pm.unregister(module)
            self._fail(info, "failed to load", exc)
            return False
        return True

    def _run_hooks(self, modules: list[tuple[PluginInfo, Any]], timeout: float) -> None:
        for info, module in modules:
            self._call(info, module, "register_losses", timeout)
        for info, module in modules:
            if info.status == "loaded":
                self._call(info, module, "register_implementations", timeout)

    def _call(self, info: PluginInfo, module: Any, hook: str, timeout: float) -> None:
        impls = [h for h in getattr(self.pm.hook, hook).get_hookimpls() if h.plugin is module]
        staged_losses: list[LossSpec] = []
        staged_impls: list[tuple[str, Impl]] = []
        closed = threading.Event()  # set when the hook overran: late calls change nothing

        def register_loss(spec):
            if closed.is_set():
                raise PluginTimeout(f"{info.who}: register() called after its time limit")
            if not isinstance(spec, LossSpec):
                raise SpecError(f"register() takes a LossSpec, got {type(spec).__name__}")
            spec.validate()
            if any(s.name == spec.name for s in staged_losses):
                raise SpecError(f"{info.who} registers loss {spec.name!r} twice")
            staged_losses.append(spec)

        def register_impl(loss, impl):
            if closed.is_set():
                raise PluginTimeout(f"{info.who}: register() called after its time limit")
            if not isinstance(loss, str):
                raise SpecError(f"register(loss, impl) takes a loss name (str) first, "
                                f"got {type(loss).__name__}")
            if not isinstance(impl, Impl):
                raise SpecError(f"register(loss, impl) takes an Impl, got {type(impl).__name__}")
            impl.validate()
            staged_impls.append((loss, impl))

        args = {"register": register_loss if hook == "register_losses" else register_impl,
                "losses": MappingProxyType(dict(self.losses))}

        def call_all():
            for h in impls:
                h.function(**{k: v for k, v in args.items() if k in h.argnames})

        try:
            run_limited(call_all, timeout, f"hook {hook}")
        except Exception as exc:  # noqa: BLE001
            closed.set()
            self._fail(info, f"hook {hook} raised" if not isinstance(exc, PluginTimeout)
                       else "timed out", exc)
            return
        closed.set()
        for spec in staged_losses:
            other = self.losses.get(spec.name)
            if other is not None:
                self._warn(info, f"{info.who} registers loss {spec.name!r}, already "
                                 f"registered by {self._owner(other.plugin)}; rejected, "
                                 "the existing one is kept")
                info.rejected_losses.append(spec.name)
                continue
            spec.plugin = info.name
            spec.implementations["reference"].plugin = info.name
            spec.implementations["compile"] = _compile_impl(spec)
            self.losses[spec.name] = spec
            info.losses.append(spec.name)
        for loss, impl in staged_impls:
            self._add_impl(info, loss, impl)

    def _add_impl(self, info: PluginInfo, loss: str, impl: Impl) -> None:
        spec = self.losses.get(loss)
        if loss in info.rejected_losses:
            self._warn(info, f"{info.who}: implementation {impl.name!r} of its rejected "
                             f"loss {loss!r} is not attached to the existing {loss!r}")
            return
        if spec is None:
            self._warn(info, f"{info.who} registered implementation {impl.name!r} for "
                             f"unknown loss {loss!r}{_suggest(loss, self.losses)}",
                       rejection=False)
            return
        existing = spec.implementations.get(impl.name)
        if existing is not None:
            self._warn(info, f"{info.who}: loss {loss!r} already has an implementation "
                             f"named {impl.name!r} from {self._owner(existing.plugin)}; "
                             "rejected, the existing one is kept (register an alternative "
                             "under a new name)")
            return
        impl.plugin = info.name
        spec.implementations[impl.name] = impl
        info.implementations.append(f"{loss}:{impl.name}")

    def _owner(self, plugin: str) -> str:
        """Who registered something, for messages: the plugin and its distribution."""
        if plugin in self.plugins:
            return self.plugins[plugin].who
        if plugin == BUILTIN_DIST:  # the `compile` implementation every loss gets
            return f"lossreg itself ({_dist_label(BUILTIN_DIST)})"
        return f"plugin {plugin!r}"

    def _warn(self, info: PluginInfo, msg: str, rejection: bool = True) -> None:
        """A rejected registration: a warning (strict mode: PluginError)."""
        if rejection and _strict():
            raise PluginError(msg)
        info.warnings.append(msg)
        print(f"lossreg: warning: {msg}", file=sys.stderr)

    def _reject(self, info: PluginInfo, msg: str) -> None:
        """A rejected entry point: listed (status ``rejected``) under a key of its own."""
        if _strict():
            raise PluginError(msg)
        info.status, info.error = "rejected", msg
        self.plugins[f"{info.name} ({info.dist or '?'})"] = info
        print(f"lossreg: warning: {msg}", file=sys.stderr)

    def _fail(self, info: PluginInfo, what: str, exc: BaseException) -> None:
        info.status = "failed"
        info.error = f"{type(exc).__name__}: {exc}"
        msg = f"{info.who} ({info.value}) {what}: {info.error}"
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
