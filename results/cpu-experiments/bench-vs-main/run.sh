#!/usr/bin/env bash
# The bench's training tokens/s against chimera.main's train_tokens_per_second (issue 11:
# within 5%), for dense and moe_top2 at the default preset, on whatever machine runs it.
# Writes into OUT (default results/cpu-experiments/bench-vs-main/run1): bench.json,
# main_<config>.json (each run's summary.json), the logs and machine.txt; compare.py prints
# the table into compare.txt. Run from the repository root:
#   bash results/cpu-experiments/bench-vs-main/run.sh [OUT]
set -euo pipefail
here=${1:-results/cpu-experiments/bench-vs-main/run1}
mkdir -p $here
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
{ date -u +%FT%TZ; nproc; grep -m1 "model name" /proc/cpuinfo; git rev-parse --short HEAD; } > $here/machine.txt
python -m chimera.bench --configs=configs/dense.py,configs/moe_top2.py --repeats=3 --steps=5 \
    --decode_batches= --nomoe_split --json=$here/bench.json > $here/bench.log 2>&1
for config in dense moe_top2; do
  python -m chimera.main --config=configs/$config.py --workdir=$work/$config \
      --config.train.steps=60 --config.train.log_every=10 --config.train.eval_every=60 \
      --config.train.eval_batches=2 --config.train.checkpoint_every=60 \
      --config.train.warmup_steps=10 > $here/main_$config.log 2>&1
  cp $work/$config/summary.json $here/main_$config.json
done
python results/cpu-experiments/bench-vs-main/compare.py $here | tee $here/compare.txt
