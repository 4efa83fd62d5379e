"""Result rows: the run's context columns, a row's identifying columns, and the
message an exception becomes."""

from __future__ import annotations

import datetime as _dt
import json
import platform
import socket
import subprocess
import traceback
import uuid
from pathlib import Path
from typing import Any, Iterable

from .planning import Task

#: (check, mode) of the rows a case gets when it is skipped
CHECK_MODES = {"correctness": "forward", "gradient": "backward", "throughput": "full"}


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True,
                             text=True, timeout=5, cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def new_run_id() -> str:
    now = _dt.datetime.now(_dt.timezone.utc)
    return now.strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def run_context(device_type: str, device_name: str, run_id: str | None = None) -> dict[str, Any]:
    """The columns every row of a run shares. ``device_name`` comes from a worker: this
    process never initialises CUDA."""
    import torch

    return {
        "run_id": run_id or new_run_id(),
        "timestamp": _dt.datetime.now(_dt.timezone.utc),
        "lossreg_version": _version("lossreg"),
        "git_commit": _git_commit(),
        "hostname": socket.gethostname(),
        "device_type": device_type,
        "device_name": device_name,
        "torch_version": torch.__version__,
        "triton_version": _version("triton"),
        "python_version": platform.python_version(),
    }


def base_row(context: dict, task: Task, params: dict) -> dict:
    """A result row's identifying columns: the run's context, the loss, implementation,
    dtype, size and the params it ran with (the pytest-benchmark suite builds its rows
    with this too)."""
    spec, impl = task.spec, task.impl
    params = {**spec.input_params.get(task.preset, {}), **params}
    return {
        "world_size": 1, "rank": 0,
        **context,
        "loss": spec.name, "family": spec.family, "impl": impl.name, "impl_kind": impl.kind,
        "backend": impl.backend, "plugin": impl.plugin or spec.plugin, "dtype": task.dtype,
        "x_name": spec.x_name, "n": task.n, "params": json.dumps(params, sort_keys=True,
                                                                  default=str),
    }


def error_message(exc: BaseException) -> str:
    tb = traceback.extract_tb(exc.__traceback__)
    where = f" (at {Path(tb[-1].filename).name}:{tb[-1].lineno})" if tb else ""
    return f"{type(exc).__name__}: {exc}"[:2000] + where


def skipped_rows(context: dict, task: Task, reason: str, checks: Iterable[str]) -> list[dict]:
    rows = []
    for check in checks:
        row = base_row(context, task, dict(task.spec.options))
        row.update(check=check, mode=CHECK_MODES[check], status="skipped", message=reason)
        rows.append(row)
    return rows
