"""The hooks a lossreg plugin may implement (pluggy project ``lossreg``).

A plugin module implements either hook or both, marked with :data:`hookimpl`. A
hookimpl may declare a subset of a hook's parameters (pluggy passes only those it
names), so ``def register_implementations(register)`` keeps working beside the full
``def register_implementations(register, losses)``.

Every hook call runs under the plugin time limit (``LOSSREG_PLUGIN_TIMEOUT`` seconds,
default 30): a hook that does not return in time fails its plugin, which then
contributes nothing. Registrations are staged and take effect only when the hook
returns without raising.
"""

import pluggy

hookspec = pluggy.HookspecMarker("lossreg")
hookimpl = pluggy.HookimplMarker("lossreg")


@hookspec
def register_losses(register):
    """Register losses: call ``register(LossSpec(...))`` once per loss.

    Built-in plugins (those of the ``lossreg`` distribution) run first, so their loss
    names are taken before any third party's.

    :param register: callback taking one :class:`lossreg.LossSpec`. The spec's fields
        are validated again here (``SpecError`` naming the field, what came and what
        was expected: the plugin then fails). A loss name that is already registered
        is rejected with a warning naming both distributions and the existing loss is
        kept (``LOSSREG_STRICT_PLUGINS=1``: an error). Returns None.
    """


@hookspec
def register_implementations(register, losses):
    """Add implementations to any registered loss, whoever registered it.

    Runs after every plugin's :func:`register_losses`.

    :param register: callback ``register(loss_name, Impl(...))``. The implementation's
        fields are validated (``SpecError`` fails the plugin). A loss name that is not
        registered is a warning naming this plugin and the closest names, not an
        error. An implementation name the loss already has (``reference``,
        ``compile``, or another plugin's) is rejected with a warning naming both
        distributions and the existing one is kept (``LOSSREG_STRICT_PLUGINS=1``: an
        error): offer an alternative under a new name. Returns None.
    :param losses: read-only mapping of every loss name registered so far to its
        :class:`lossreg.LossSpec` (a snapshot: it does not change while the hook runs).
        Use it to offer implementations only for losses that are present, e.g.
        ``if "cross_entropy" in losses: register("cross_entropy", impl)``; do not
        modify the specs it holds.
    """
