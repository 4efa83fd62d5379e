#!/usr/bin/env bash
# The committed CPU reference run (results/cpu/): every built-in loss at default sizes
# in ONE run, so speedups and the report compare implementations measured together;
# then its report, and two runs of a subset on the same commit for `lossreg
# compare` (results/_rerun_a|b/, hidden from load_results and pandas).
# Run from the repository root with the venv's lossreg on PATH. Triton rows are
# correctness-only on a CPU (the interpreter), `compile` is opt-in there.
set -euo pipefail
lossreg bench --device cpu --sizes default --out results/cpu | tail -n 80
lossreg report results/cpu --out results/report.md
# two runs of a subset on the same commit: `lossreg compare` between them is the noise
for i in a b; do
  lossreg bench mse bce bce_with_logits hinge squared_hinge huber mae quantile nll dpo \
      cross_entropy --device cpu --sizes default --out "results/_rerun_$i" --no-plots | tail -n 3
done
lossreg compare results/_rerun_a results/_rerun_b --threshold 10% | tail -n 3 || true
