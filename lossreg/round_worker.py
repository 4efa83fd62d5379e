"""One later timing round of a `lossreg bench` run, in a process of its own.

``python -m lossreg.round_worker PAYLOAD`` reads a pickled payload written by
`harness.run_rounds` (device, case timeout, and the cases to time: loss, implementation,
dtype, n, case seed and params, options, repeats and warm-up calls per mode), looks each
loss up in the registry the entry points give, times it with `harness.retime`, and
prints one line per case on stdout: `PREFIX` followed by JSON, either
``{"i": k, "samples": {mode: [ms, ...]}}`` or ``{"i": k, "error": "..."}``.

Why a fresh process: a process keeps its memory layout (where the heap put each block,
which pages back it) for its whole life, and on a shared CPU two processes running the
same case can differ by 1.5x in every round. Rounds in fresh processes put that
difference inside each case's p20-p80 band, where `lossreg compare` can see it, instead
of between two runs.
"""

from __future__ import annotations

import json
import pickle
import sys

PREFIX = "\x1elossreg-round "


def run(payload: dict, emit=print) -> None:
    """Time every case of ``payload``; ``emit`` gets one result line per case."""
    from . import harness, measure
    from .registry import default_registry
    from .spec import DTYPES, Case

    device = payload["device"]
    if measure.device_type(device) == "cpu":
        measure.steady_cpu_allocator()
    registry = default_registry()
    state = harness.RunState({}, device, None, case_timeout=payload.get("case_timeout"))
    for k, c in enumerate(payload["cases"]):
        state.start_case()
        try:
            spec = registry.get(c["loss"])
            if c["impl"] not in spec.implementations:
                raise KeyError(f"loss {c['loss']!r} has no implementation {c['impl']!r} in a "
                               "fresh process (registered outside an entry point?)")
            case = Case(c["n"], DTYPES[c["dtype"]], device, seed=c["seed"], params=c["params"])
            with state.limit():
                samples = harness.retime(spec, spec.implementations[c["impl"]], case,
                                         c["options"], c["repeats"], c["warmup"])
            line = {"i": k, "samples": samples}
        except Exception as exc:  # noqa: BLE001 - one failing case, the round goes on
            line = {"i": k, "error": harness.error_message(exc)}
            harness.recover_memory(exc)
        emit(PREFIX + json.dumps(line))
        sys.stdout.flush()


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m lossreg.round_worker PAYLOAD.pickle", file=sys.stderr)
        return 2
    with open(argv[0], "rb") as f:
        payload = pickle.load(f)
    run(payload)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
