"""Quiet launches for the histogram, pairwise and aligned-rows templates.

:func:`lossreg.kernels.launch_guard` silences numpy's floating-point warnings under the
interpreter (IEEE results a GPU gives silently). These templates also reduce tiles in
which every lane is excluded (an argmax over an all ``-inf`` tile of the pairwise
template), where numpy raises "All-NaN slice" RuntimeWarnings through ``warnings``
rather than ``errstate``; :func:`quiet` silences those too, under the interpreter only.
"""

from __future__ import annotations

import contextlib
import warnings

from . import interpreting, launch_guard


@contextlib.contextmanager
def quiet():
    with launch_guard(), warnings.catch_warnings():
        if interpreting():
            warnings.simplefilter("ignore", RuntimeWarning)
        yield


def guarded_call(launcher, *args, **kwargs):
    """``launcher(*args, **kwargs)`` (a ``kernel[grid]``) inside :func:`quiet`."""
    with quiet():
        return launcher(*args, **kwargs)
