"""The Triton implementation of the pseudo-Huber loss, on lossreg's pointwise template.

The template (`lossreg.kernels.pointwise`) owns the launch, the reduction, the float32
(or float64) accumulation, the masking of the tail and the autograd Function; the
plugin writes only the per-element term, a ``@jit`` function of (x, y, p0, p1)
returning (loss, dloss/dx, dloss/dy). ``p0`` carries the option ``delta``.
"""

from lossreg.kernels import jit, pointwise_loss, tl


@jit
def _pseudo_huber_term(x, y, p0, p1):
    r = x - y
    s = tl.sqrt(1.0 + (r / p0) * (r / p0))
    loss = p0 * p0 * (s - 1.0)
    dx = r / s
    return loss, dx, -dx


pseudo_huber = pointwise_loss(_pseudo_huber_term, name="pseudo_huber")
