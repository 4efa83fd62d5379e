"""The two hooks a lossreg plugin may implement. Each receives a `register` callback."""

import pluggy

hookspec = pluggy.HookspecMarker("lossreg")
hookimpl = pluggy.HookimplMarker("lossreg")


@hookspec
def register_losses(register):
    """Register losses: call ``register(LossSpec(...))`` once per loss.

    :param register: callback taking one :class:`lossreg.LossSpec`; a name already
        registered by another plugin is an error naming both plugins.
    """


@hookspec
def register_implementations(register):
    """Add implementations to any registered loss, whoever registered it.

    :param register: callback ``register(loss_name, Impl(...))``; an unknown loss name
        is a warning naming this plugin, not an error.
    """
