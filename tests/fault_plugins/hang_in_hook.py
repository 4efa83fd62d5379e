"""A plugin that imports fine and then hangs inside its hook."""

import time

from lossreg import LossSpec, hookimpl


@hookimpl
def register_losses(register):
    register(LossSpec(name="never_registered", family="fault", formula="x",
                      reference=lambda input: input.sum(),
                      make_inputs=lambda case: {"input": case.randn(case.n)}))
    time.sleep(3600)
