#!/usr/bin/env bash
# The committed CPU reference run (results/cpu/): every built-in loss at default sizes
# in ONE run, so speedups and the report compare implementations measured together;
# then its report, and a second run of a subset on the same commit for `lossreg
# compare` (kept in results/_rerun/, hidden from load_results and pandas).
# Run from the repository root with the venv's lossreg on PATH. Triton rows are
# correctness-only on a CPU (the interpreter), `compile` is opt-in there.
set -euo pipefail
lossreg bench --device cpu --sizes default --out results/cpu | tail -n 80
lossreg report results/cpu --out results/report.md
lossreg bench mse bce bce_with_logits hinge huber mae nll cross_entropy wcss dpo \
    --device cpu --sizes default --out results/_rerun --no-plots | tail -n 3
lossreg compare results/cpu results/_rerun --threshold 10% | tail -n 3 || true
