#!/usr/bin/env bash
# A real full disk under a checkpoint save, then the same command once there is room.
# Needs root (it mounts a 3 MB tmpfs). Prints what stderr held and how the resume went.
# Run from the repository root with the project's environment active:
#   bash results/cpu-experiments/full-disk/run.sh /path/to/tinyshakespeare.txt
set -u
corpus="${1:?the corpus file}"
disk="$(mktemp -d)"; logs="$(mktemp -d)"  # stderr kept off the small disk
mount -t tmpfs -o size=3M tmpfs "$disk" || { echo "cannot mount a tmpfs here (root?)"; exit 1; }
trap 'umount "$disk"; rmdir "$disk"; rm -r "$logs"' EXIT
export CHIMERA_CACHE="${CHIMERA_CACHE:-$(mktemp -d)}"
run() {
  python -m chimera.main --config=configs/moe_top2.py:tiny --config.data.corpus="$corpus" \
      --workdir="$disk/run" --config.train.steps=40 --config.train.checkpoint_every=2 \
      --config.train.keep_checkpoints=100 >/dev/null 2>"$logs/stderr.$1"
  echo "exit status $?"
}
echo "== 3 MB free: $(run full)"
echo "stderr: $(wc -l < "$logs/stderr.full") lines; those not a step or an eval line:"
grep -v "^step\|^eval" "$logs/stderr.full"
mount -o remount,size=40M "$disk"
echo "== 40 MB, the same command: $(run resumed)"
grep -v "^step\|^eval" "$logs/stderr.resumed"
echo "checkpoints: $(ls "$disk/run/checkpoints" | sort -n | tr '\n' ' ')"
# A log the disk refuses: 60 kB, room for the claim files and a few hundred log rows.
umount "$disk" && mount -t tmpfs -o size=60k tmpfs "$disk"
python -m chimera.main --config=configs/moe_top2.py:tiny --config.data.corpus="$corpus" \
    --workdir="$disk/run" --config.train.steps=3000 --config.train.checkpoint_every=3000 \
    --config.train.eval_every=3000 --config.train.log_every=1 >/dev/null 2>"$logs/stderr.log"
echo "== 60 kB free, a log row every step: exit status $?"
echo "stderr: $(wc -l < "$logs/stderr.log") lines; those not a step line:"
grep -v "^step" "$logs/stderr.log"
