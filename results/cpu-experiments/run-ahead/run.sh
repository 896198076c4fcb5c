#!/bin/bash
# A record of how the table was measured, not a script to rerun as it is: it needs the
# temporary TMP_MAX_AHEAD hook (not kept; chimera/train.py's MAX_AHEAD is a constant) and a
# worktree of 4b57314 at /tmp/oldtree. CORPUS: nanoGPT's tinyshakespeare.txt.
cd "$(dirname "$0")/../../.."  # the repository root; the project's environment active
CORPUS=${CORPUS:-$PWD/../shared/data/tinyshakespeare.txt}
for round in 1 2 3; do
  for tree in a1 a2 a4 old; do
    dir=$PWD; [ $tree = old ] && dir=/tmp/oldtree
    export TMP_MAX_AHEAD=${tree#a}
    rm -rf /tmp/ra_$tree
    (cd $dir && python -m chimera.main --config=configs/dense.py:nanogpt_cpu \
      --config.data.corpus="$CORPUS" --config.train.steps=600 \
      --config.train.eval_every=600 --workdir=/tmp/ra_$tree > /tmp/ra_$tree.log 2>&1)
    python -c "import json; s=json.load(open('/tmp/ra_$tree/summary.json')); print('$round $tree', round(s['train_tokens_per_second']), s['final_val_loss'])"
  done
done
