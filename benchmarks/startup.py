"""Start-up time of the ``lossreg`` command line: each command in fresh processes.

    python benchmarks/startup.py [--repeats 3] [--json]

Every command runs ``--repeats`` times (default 3), each in a new Python process, and
the table gives the median wall-clock seconds (and min/max). The targets are those of
the README: ``lossreg --help`` under 0.5 s, ``lossreg list`` and ``lossreg show NAME``
under 2.5 s. Two floors are measured beside them so a reader can tell start-up that
lossreg adds from what the interpreter and torch cost on the machine at that moment:
``python -c pass`` and ``python -c "import torch"``.

On a busy machine the wall-clock figures grow with the load; the CPU seconds (user +
system of the process) grow far less, so the table gives both, and the load average
it ran under.

The commands run with this interpreter (``sys.executable``), so run the script with
the virtual environment's Python.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

#: (label, argv after the interpreter, target seconds or None)
COMMANDS = [
    ("python -c pass", ["-c", "pass"], None),
    ("import torch", ["-c", "import torch"], None),
    ("import lossreg", ["-c", "import lossreg"], None),
    ("lossreg --help", ["-m", "lossreg.cli", "--help"], 0.5),
    ("lossreg list", ["-m", "lossreg.cli", "list"], 2.5),
    ("lossreg show mse", ["-m", "lossreg.cli", "show", "mse"], 2.5),
    ("lossreg plugins", ["-m", "lossreg.cli", "plugins"], None),
]


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def time_once(argv: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one fresh process."""
    cpu0, start = _children_cpu(), time.perf_counter()
    proc = subprocess.run([sys.executable, *argv], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    elapsed, cpu = time.perf_counter() - start, _children_cpu() - cpu0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited {proc.returncode}: "
                         f"{proc.stderr.strip().splitlines()[-1:]}")
    return elapsed, cpu


def measure(repeats: int) -> list[dict]:
    rows = []
    for label, argv, target in COMMANDS:
        runs = [time_once(argv) for _ in range(repeats)]
        times = [wall for wall, _ in runs]
        median = statistics.median(times)
        rows.append({"command": label, "median_s": median, "min_s": min(times),
                     "max_s": max(times), "cpu_s": statistics.median(c for _, c in runs),
                     "target_s": target,
                     "meets": None if target is None else median < target})
    return rows


def table(rows: list[dict]) -> str:
    lines = [f"{'command':<20} {'median s':>9} {'min s':>7} {'max s':>7} {'cpu s':>7} "
             f"{'target':>7}  verdict"]
    for r in rows:
        target = "" if r["target_s"] is None else f"< {r['target_s']:g}"
        verdict = "" if r["meets"] is None else ("ok" if r["meets"] else "SLOW")
        lines.append(f"{r['command']:<20} {r['median_s']:>9.3f} {r['min_s']:>7.3f} "
                     f"{r['max_s']:>7.3f} {r['cpu_s']:>7.3f} {target:>7}  {verdict}")
    lines.append("load average (1, 5, 15 min): " + ", ".join(f"{x:.1f}" for x in os.getloadavg()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per command")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    rows = measure(args.repeats)
    print(json.dumps(rows, indent=1) if args.json else table(rows))
    return 0 if all(r["meets"] is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
