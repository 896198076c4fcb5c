#!/usr/bin/env bash
# Screen (one seed): does Adam's b2 = 0.95 (instead of 0.99) let 32 experts beat 16 at moe_top2's k and expert size?
set -euo pipefail
cd "$(dirname "$0")/../../.."  # the repository root; the project's environment active
python -m chimera.compare --preset=cpu --bench_repeats=0 --seeds=0 --runs=runs/fml/study \
  --sweep=model.num_experts=16 --base_set=train.b2=0.95 --out=runs/b2/e16
python -m chimera.compare --preset=cpu --bench_repeats=0 --seeds=0 --runs=runs/fml/study \
  --sweep=model.num_experts=32 --base_set=train.b2=0.95 --base_set=train.expert_lr_scale=0.5 --out=runs/b2/e32
