#!/usr/bin/env bash
# The committed CPU reference runs (results/), one `lossreg bench` per group so each
# run has its own plots. Default sizes; float32; Triton rows are correctness-only on a
# CPU (interpreter). Run from the repository root with the venv's lossreg on PATH.
set -u
OUT=${OUT:-results}
run() { echo "== $*"; lossreg bench "$@" --device cpu --out "$OUT" | tail -n 60; }
# issue 2: mse against F.mse_loss and torch.compile of the reference
run mse --impl reference --impl torch --impl compile --impl triton
# the classic families (issues 3 and 4) against their torch built-ins
run bce bce_with_logits hinge squared_hinge multiclass_hinge margin_ranking mae huber \
    quantile exponential samme
run gini_impurity entropy_impurity soft_split_gini forest_gini split_variance \
    cosine_embedding triplet batch_hard_triplet nll gaussian_nll
# families 10-16 (issues 5 and 6)
run cross_entropy perplexity wcss soft_kmeans pca_reconstruction eps_separation
run reconstruction masked_reconstruction reward_bt dpo ppo_clip q_td gaussian_kl neg_elbo
# issue 7's memory/time targets: the rewrites against the reference
run fused_linear_cross_entropy mlm info_nce fused_linear_distillation \
    --impl reference --impl chunked --impl selected
