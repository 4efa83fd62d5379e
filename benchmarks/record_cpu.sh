#!/usr/bin/env bash
# The committed CPU reference run (results/cpu/): every built-in loss in ONE budgeted
# `lossreg bench` run (the same plan as `make bench`), so speedups and the report compare
# implementations measured together; then its report.
# Run from the repository root with the venv's lossreg on PATH. Triton rows are
# correctness-only on a CPU (the interpreter), `compile` is opt-in there.
set -euo pipefail
if compgen -G "results/cpu/*.parquet" > /dev/null; then
  git rm -q results/cpu/*.parquet || rm -f results/cpu/*.parquet
  rm -rf results/cpu/plots
fi
lossreg bench --device cpu --out results/cpu "$@" | tail -n 80
lossreg report results/cpu --out results/report.md
