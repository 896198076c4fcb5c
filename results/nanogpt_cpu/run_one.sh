#!/bin/bash
# usage: run_one.sh nanogpt|ours N
# Paths (environment, defaults as measured): ROOT this checkout, CORPUS nanoGPT's
# tinyshakespeare.txt, NANOGPT its checkout (3adf61e), TORCH_PY a python with torch.
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
CORPUS=${CORPUS:-$ROOT/../shared/data/tinyshakespeare.txt}
NANOGPT=${NANOGPT:-/tmp/nanogpt}; TORCH_PY=${TORCH_PY:-/tmp/torchvenv/bin/python}
kind=$1; n=$2; mkdir -p /tmp/sbs; log=/tmp/sbs/${kind}_${n}
# gate: wait (up to 240 s) until other non-niced processes use < 15 % CPU
for i in $(seq 1 60); do b=$(bash "$ROOT/results/nanogpt_cpu/busy.sh"); [ "${b%.*}" -lt 15 ] && break; sleep 2; done
echo "gate: non-niced CPU% before start = $b (after $i checks)" > $log.gate
{ echo "=== $kind $n start $(date -Is)"; uptime; ps -eo pid,ni,pcpu,etime,args --sort=-pcpu | head -5 | cut -c1-150; } > $log.pre
if [ $kind = nanogpt ]; then
  cd "$NANOGPT"
  t0=$(date +%s.%N)
  /usr/bin/time -v "$TORCH_PY" train.py config/train_shakespeare_char.py --device=cpu --compile=False --eval_iters=20 --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0 --eval_interval=500 --out_dir=/tmp/sbs/out_nanogpt_$n > $log.out 2> $log.err
  rc=$?
  t1=$(date +%s.%N)
else
  cd "$ROOT"  # with the project's environment active
  t0=$(date +%s.%N)
  /usr/bin/time -v python -m chimera.main --config=configs/dense.py:nanogpt_cpu --config.data.corpus="$CORPUS" --workdir=/tmp/ours_$n > $log.out 2> $log.err
  rc=$?
  t1=$(date +%s.%N)
fi
{ echo "rc=$rc wall=$(echo "$t1 - $t0" | bc)"; uptime; } > $log.post
cat $log.gate $log.pre $log.post
