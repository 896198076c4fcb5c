#!/usr/bin/env bash
# Time from launch to the first step's compile line, and the whole 200-step run, with the
# compilation cache cold and warm, alternated. Run from the repository root, with the
# project installed (README) and ../shared beside it:
#   bash results/nanogpt_cpu/startup.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
CORPUS=${CORPUS:-../shared/data/tinyshakespeare.txt}
export CHIMERA_CACHE=/tmp/startup-cache  # its own, so "cold" empties only its compiled steps
mkdir -p "$CHIMERA_CACHE"
cp -r ~/.cache/chimera/tokens "$CHIMERA_CACHE"/ 2>/dev/null || true  # the token cache, if any
for i in 1 2 3; do
  for mode in cold warm; do
    [[ $mode == cold ]] && rm -rf "$CHIMERA_CACHE/xla"
    rm -rf /tmp/su_run
    t0=$(date +%s.%N)
    python -m chimera.main --config=configs/dense.py:nanogpt_cpu --config.data.corpus="$CORPUS" \
        --workdir=/tmp/su_run --config.train.steps=200 --config.train.eval_every=200 2>&1 |
      while IFS= read -r l; do
        case "$l" in *"train step: compiled"*)
          echo "$mode $i first_step_ready $(echo "$(date +%s.%N) - $t0" | bc) :: $l";; esac
      done
    echo "$mode $i total $(echo "$(date +%s.%N) - $t0" | bc)"
  done
done
