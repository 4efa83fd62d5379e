"""A git-ignored cache of AOT report entries, one small JSON file per compiled kernel.

Compiling a kernel and disassembling its cubin costs seconds on a CPU; reading a
record costs a millisecond. A record is keyed on everything that decides the cubin
and how it is read:

* Triton's own hash of the source (``ASTSource.hash``: the kernel's and every called
  ``@jit`` function's text, constexpr values, signature, divisibility attributes);
* the compile options (``num_warps``, ``maxnreg``, ...), the target and Triton's
  version and cache-invalidating environment variables;
* the text of :mod:`lossreg.kernels.aot_sass` (how a kernel is read) and the dtype.

So a record never describes another kernel's cubin (a different register cap or arch
is a different key), and any edit to a kernel or to the reader recompiles. Failures are
not cached. The folder is ``build/aot-cache`` at the repository root (``build/`` is
git-ignored; ``~/.cache/lossreg/aot`` outside a checkout), or ``LOSSREG_AOT_CACHE``;
``LOSSREG_AOT_CACHE=0`` turns it off.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

_READER = Path(__file__).with_name("aot_sass.py")


def cache_dir() -> Path | None:
    env = os.environ.get("LOSSREG_AOT_CACHE")
    if env is not None:
        return None if env in ("", "0") else Path(env)
    root = Path(__file__).resolve().parents[2]
    if (root / "pyproject.toml").exists():  # a checkout (editable install)
        return root / "build" / "aot-cache"
    return Path.home() / ".cache" / "lossreg" / "aot"


def _env_key() -> str:
    try:
        from triton.compiler.compiler import get_cache_invalidating_env_vars

        return json.dumps(get_cache_invalidating_env_vars(), sort_keys=True, default=str)
    except ImportError:  # pragma: no cover - older Triton
        return ""


def key(source, options: dict, cc: int, dtype: str) -> str:
    """The record's name for ``source`` (a Triton ``ASTSource``) compiled with
    ``options`` for ``sm_{cc}`` (see the module docstring)."""
    import triton

    parts = [source.hash(), json.dumps(options, sort_keys=True, default=str), str(cc),
             dtype, triton.__version__, _env_key(),
             hashlib.sha256(_READER.read_bytes()).hexdigest()]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def load(name: str) -> dict | None:
    folder = cache_dir()
    if folder is None:
        return None
    try:
        return json.loads((folder / f"{name}.json").read_text())
    except (OSError, ValueError):
        return None


def store(name: str, record: dict) -> None:
    folder = cache_dir()
    if folder is None:
        return
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f"{name}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(record, sort_keys=True))
    tmp.replace(folder / f"{name}.json")  # atomic: two workers may write one key
