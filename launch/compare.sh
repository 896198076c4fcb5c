#!/usr/bin/env bash
# Run the study (chimera.compare): the number-of-experts sweep first (the main report reads
# it), then dense vs moe_top1 / moe_top2 / moe_fine vs dense_wide, then the named sweeps in
# SWEEPS below: six of chimera.study_sweeps.SWEEPS by default (`python -m chimera.compare
# --help` lists them all; experts_sqrt_lr and experts_best_lr are run by name).
# Reports land in results/<preset>/ and results/<preset>-sweep-<name>/.
#
#   launch/compare.sh                  # PRESET=cpu: 10M tokens per run (hours on 2 cores)
#   PRESET=gpu-small launch/compare.sh # one GPU, 21M tokens per run
#
# What to edit: PRESET, SWEEPS (named sweeps or section.field=v1,v2), and CORPUS (empty =
# the configs' default corpus; a path, folder, glob, tfds:NAME or hf:NAME otherwise).
# Seeds: 0, 1 and 2 for the number-of-experts sweep at every preset; the preset's for the
# study (cpu: 2, gpu-small: 1); the first of them for each other sweep (--seeds=0,1,2 gives
# every run three). Finished runs in runs/compare/ are reused, so an
# interrupted study resumes.
set -euo pipefail
cd "$(dirname "$0")/.."

PRESET=${PRESET:-cpu}
SWEEPS=${SWEEPS:-calibration granularity shared balancing capacity init}
corpus=()
if [[ -n ${CORPUS:-} ]]; then corpus=(--corpus="$CORPUS"); fi

# Three seeds: the number-of-experts target reads paired steps over at least two, and
# results/cpu-sweep-num_experts holds seeds 0, 1 and 2 (a later --seeds in "$@" wins).
python -m chimera.compare --preset="$PRESET" --sweep=model.num_experts=4,8,16,32 --seeds=0,1,2 \
    "${corpus[@]}" "$@"
python -m chimera.compare --preset="$PRESET" "${corpus[@]}" "$@"
for sweep in $SWEEPS; do
  python -m chimera.compare --preset="$PRESET" --sweep="$sweep" "${corpus[@]}" "$@"
done
