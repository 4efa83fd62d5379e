#!/usr/bin/env bash
# The committed CPU reference run (results/cpu/): every built-in loss at default sizes
# in ONE run, so speedups and the report compare implementations measured together;
# then its report, and two runs of a subset on the same commit for `lossreg
# compare` (results/_rerun_<x>/, hidden from load_results and pandas; give the pair's
# two new folder names as arguments).
# Run from the repository root with the venv's lossreg on PATH. Triton rows are
# correctness-only on a CPU (the interpreter), `compile` is opt-in there.
set -euo pipefail
pair_a="results/_rerun_${1:?usage: benchmarks/record_cpu.sh SUFFIX_A SUFFIX_B (new _rerun_ folders)}"
pair_b="results/_rerun_${2:?usage: benchmarks/record_cpu.sh SUFFIX_A SUFFIX_B (new _rerun_ folders)}"
lossreg bench --device cpu --sizes default --out results/cpu | tail -n 80
lossreg report results/cpu --out results/report.md
# two runs of a subset on the same commit: `lossreg compare` between them is the noise
benchmarks/noise_pair.sh "$pair_a" "$pair_b" || true
