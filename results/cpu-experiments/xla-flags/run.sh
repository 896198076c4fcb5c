#!/usr/bin/env bash
# XLA:CPU options against the MoE/dense train-step ratio (issue 11's CPU target: <= 1.25x).
# Each line is one process of `chimera.bench` (dense and moe_top2 interleaved in it) with
# XLA_FLAGS set; the baseline (no flag) runs first and last. Run from the repository root,
# with nothing else running:  bash results/cpu-experiments/xla-flags/run.sh > out.txt
set -u
echo "# $(date -u '+%Y-%m-%d %H:%M UTC'), $(python -c 'import jax; print("jax", jax.__version__)'), $(nproc) cores"
for flags in "" \
    "--xla_cpu_experimental_onednn_fusion_type=dot" \
    "--xla_cpu_use_onednn=true" \
    "--xla_cpu_experimental_xnn_fusion_type=dot" \
    "--xla_cpu_enable_concurrency_optimized_scheduler=true" \
    "--xla_cpu_prefer_vector_width=512" \
    ""; do
  echo "== XLA_FLAGS='$flags'"
  XLA_FLAGS="$flags" python -m chimera.bench --configs=configs/dense.py,configs/moe_top2.py \
      --repeats=5 --steps=5 --decode_batches= --nomoe_split 2>&1 \
      | grep -E '^configs/|rror' | cut -d'|' -f1-3
done
