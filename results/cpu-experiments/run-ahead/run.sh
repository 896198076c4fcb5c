#!/bin/bash
. /work/main/.venv/bin/activate
for round in 1 2 3; do
  for tree in a1 a2 a4 old; do
    dir=/work/main; [ $tree = old ] && dir=/tmp/oldtree
    export TMP_MAX_AHEAD=${tree#a}
    rm -rf /tmp/ra_$tree
    (cd $dir && python -m chimera.main --config=configs/dense.py:nanogpt_cpu \
      --config.data.corpus=/work/shared/data/tinyshakespeare.txt --config.train.steps=600 \
      --config.train.eval_every=600 --workdir=/tmp/ra_$tree > /tmp/ra_$tree.log 2>&1)
    python -c "import json; s=json.load(open('/tmp/ra_$tree/summary.json')); print('$round $tree', round(s['train_tokens_per_second']), s['final_val_loss'])"
  done
done
