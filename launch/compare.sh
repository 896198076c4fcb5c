#!/usr/bin/env bash
# Run the study (chimera.compare): dense vs MoE top-1/top-2 vs dense-wide, two seeds each,
# then the sweep over the number of experts; reports land in results/<preset>/ and
# results/<preset>-sweep-num_experts/.
#
#   launch/compare.sh            # PRESET=cpu: under an hour on a 2-core CPU
#   PRESET=gpu launch/compare.sh # one GPU
#
# What to edit: PRESET, SEEDS, SWEEP (any one config field and its values), and CORPUS
# (empty = the configs' default corpus; a path, glob or tfds:NAME otherwise). Finished
# runs in runs/compare/ are reused, so an interrupted study resumes.
set -euo pipefail
cd "$(dirname "$0")/.."

PRESET=${PRESET:-cpu}
SEEDS=${SEEDS:-0,1}
SWEEP=${SWEEP:-model.num_experts=4,8,16}
corpus=()
if [[ -n ${CORPUS:-} ]]; then corpus=(--corpus="$CORPUS"); fi

python -m chimera.compare --preset="$PRESET" --seeds="$SEEDS" "${corpus[@]}" "$@"
python -m chimera.compare --preset="$PRESET" --seeds="$SEEDS" --sweep="$SWEEP" "${corpus[@]}" "$@"
