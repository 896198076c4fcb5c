#!/bin/bash
# nanoGPT's CPU quick run and ours (nanogpt_cpu) at more seeds, both scored on the whole
# validation split. usage: seeds.sh S1 S2 ...   (ours: train.seed = data.seed = S;
# nanoGPT: torch.manual_seed(1337 + S), its own seed being 1337, i.e. S = 0)
# nanoGPT hard-codes its seed, so a copy of its train.py (train_seeded.py, in its checkout,
# not in this repo) takes it from a `seed` setting; it also saves its checkpoint at the
# last evaluation (--always_save_checkpoint=True), so the whole split scores iteration 2000.
# Runs one after the other, each waiting on busy.sh like run_one.sh; logs in /tmp/sbs/seeds.
set -u
# Paths (environment, defaults as measured): ROOT this checkout, CORPUS nanoGPT's
# tinyshakespeare.txt, NANOGPT its checkout (3adf61e), TORCH_PY a python with torch.
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
CORPUS=${CORPUS:-$ROOT/../shared/data/tinyshakespeare.txt}
NANOGPT=${NANOGPT:-/tmp/nanogpt}; TORCH_PY=${TORCH_PY:-/tmp/torchvenv/bin/python}
out=/tmp/sbs/seeds; mkdir -p $out
here=$(cd "$(dirname "$0")" && pwd)
sed -e 's/^torch.manual_seed(1337 + seed_offset)$/torch.manual_seed(seed + seed_offset)/' \
    -e 's/^config_keys = \[/seed = 1337\nconfig_keys = [/' "$NANOGPT/train.py" > "$NANOGPT/train_seeded.py"
grep -q "torch.manual_seed(seed + seed_offset)" "$NANOGPT/train_seeded.py" || { echo "seed patch failed"; exit 1; }
wait_idle() { for i in $(seq 1 60); do b=$(bash $here/busy.sh); [ "${b%.*}" -lt 15 ] && break; sleep 2; done; }
for s in "$@"; do
  wait_idle
  cd "$NANOGPT"
  t0=$(date +%s.%N)
  "$TORCH_PY" train_seeded.py config/train_shakespeare_char.py --device=cpu --compile=False \
    --eval_iters=20 --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 \
    --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0 --eval_interval=500 --always_save_checkpoint=True \
    --seed=$((1337 + s)) --out_dir=$out/nanogpt_$s > $out/nanogpt_$s.log 2>&1
  t1=$(date +%s.%N)
  echo "nanogpt seed $s wall $(echo "$t1 - $t0" | bc)" | tee -a $out/walls.txt
  "$TORCH_PY" $here/nanogpt_split_loss.py "$NANOGPT" $out/nanogpt_$s > $out/nanogpt_$s.split 2>&1
  wait_idle
  cd "$ROOT"  # with the project's environment active
  t0=$(date +%s.%N)
  python -m chimera.main --config=configs/dense.py:nanogpt_cpu --config.data.corpus="$CORPUS" \
    --config.train.seed=$s --config.data.seed=$s --workdir=$out/ours_$s > $out/ours_$s.log 2>&1
  t1=$(date +%s.%N)
  echo "ours seed $s wall $(echo "$t1 - $t0" | bc)" | tee -a $out/walls.txt
  python -m chimera.evaluate --workdir=$out/ours_$s > $out/ours_$s.split 2>&1
done
