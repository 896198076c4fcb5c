#!/usr/bin/env bash
# moe_top2 at the cpu study's budget (its preset's settings, seed 0) with 16 and 32 experts,
# and 32 at half the experts' learning rate, every checkpoint kept; then how far each
# one's routing moved between checkpoints. Run from the repository root with the
# project's environment active; about 20-25 minutes a run on 2 idle cores.
#   bash results/cpu-experiments/routing-stability/run.sh [RUNS_DIR]
set -eu
runs="${1:-runs/stability}"
here="$(dirname "$0")"
common=(--config.train.steps=2500 --config.train.batch_size=32 --config.train.context=128
        --config.train.eval_every=250 --config.train.log_every=50
        --config.train.checkpoint_every=250 --config.train.keep_checkpoints=11
        --config.train.seed=0)
train() {  # name, overrides...
  local name="$1"; shift
  python -m chimera.main --config=configs/moe_top2.py:small "${common[@]}" "$@" \
      --workdir="$runs/$name" > "$runs/$name.log" 2>&1
}
mkdir -p "$runs"
train e16 --config.model.num_experts=16
train e32 --config.model.num_experts=32
train e32_lr0.5 --config.model.num_experts=32 --config.train.expert_lr_scale=0.5
for name in e16 e32 e32_lr0.5; do
  python -m chimera.routing_stability --workdir="$runs/$name" --json="$here/$name.json" \
      > "$here/$name.txt"
  tail -n 1 "$runs/$name.log"
done
