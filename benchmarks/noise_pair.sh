#!/usr/bin/env bash
# The noise floor of this machine for `lossreg compare`: two CPU runs of eleven losses
# on the same commit, back to back, then `lossreg compare` between them at 10%.
# Usage (repository root, the venv's lossreg on PATH): benchmarks/noise_pair.sh runs/pair_a runs/pair_b
# Both folders must be new, so that each holds exactly one run.
set -euo pipefail
a=${1:?usage: benchmarks/noise_pair.sh DIR_A DIR_B}
b=${2:?usage: benchmarks/noise_pair.sh DIR_A DIR_B}
for d in "$a" "$b"; do
  if [ -e "$d" ]; then echo "$d already exists: give two new folders" >&2; exit 2; fi
done
for d in "$a" "$b"; do
  lossreg bench mse bce bce_with_logits hinge squared_hinge huber mae quantile nll dpo \
      cross_entropy --device cpu --sizes default --out "$d" --no-plots | tail -n 3
done
lossreg compare "$a" "$b" --threshold 10% | tail -n 3
