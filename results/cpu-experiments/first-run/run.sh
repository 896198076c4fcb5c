#!/bin/bash
# README's first command, timed: `python -m chimera.main --config=configs/moe_top2.py`
# (the default preset, 1000 steps), in a fresh workdir, with the corpus already in the
# cache and nothing else running. Prints the wall time, the trainer's own figures and the
# machine. usage: bash results/cpu-experiments/first-run/run.sh [WORKDIR]
set -u
workdir=$(realpath -m "${1:-/tmp/first-run}")  # absolute: the script changes folder
rm -rf "$workdir"
cd "$(dirname "$0")/../../.."
start=$(date +%s.%N)
python -m chimera.main --config=configs/moe_top2.py --workdir="$workdir" > "$workdir.log" 2>&1
rc=$?
end=$(date +%s.%N)
echo "rc=$rc wall_seconds=$(python -c "print(round($end - $start, 1))")"
python -c "import json, sys; s = json.load(open(sys.argv[1])); print({k: s[k] for k in ('steps', 'tokens_seen', 'wall_seconds', 'train_tokens_per_second', 'final_val_loss', 'device')})" "$workdir/summary.json"
echo "nproc=$(nproc) $(lscpu | grep 'Model name' | sed 's/  */ /g')"
uptime
