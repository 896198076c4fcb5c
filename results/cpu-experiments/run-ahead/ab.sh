#!/bin/bash
# A record of how the table was measured, not a script to rerun as it is: it needs the
# temporary TMP_MAX_AHEAD hook (not kept; chimera/train.py's MAX_AHEAD is a constant) and a
# worktree of 4b57314 at /tmp/oldtree. CORPUS: nanoGPT's tinyshakespeare.txt.
# This checkout's bound (MAX_AHEAD: 2 when ab_2_vs_none.txt was measured, 4 now) against no bound (a worktree of 4b57314
# at /tmp/oldtree: `git worktree add /tmp/oldtree 4b57314`), nanogpt_cpu, 600 steps,
# alternated, ROUNDS rounds (default 5). Prints train_tokens_per_second per run.
. .venv/bin/activate  # from the repository root
CORPUS=${CORPUS:-$PWD/../shared/data/tinyshakespeare.txt}
for round in $(seq 1 "${ROUNDS:-5}"); do
  for tree in bound none; do
    dir=$PWD; [ $tree = none ] && dir=/tmp/oldtree
    rm -rf /tmp/ab_$tree
    (cd "$dir" && python -m chimera.main --config=configs/dense.py:nanogpt_cpu \
      --config.data.corpus="$CORPUS" --config.train.steps=600 \
      --config.train.eval_every=600 --workdir=/tmp/ab_$tree > /tmp/ab_$tree.log 2>&1)
    python -c "import json; s = json.load(open('/tmp/ab_$tree/summary.json')); print('$round $tree', round(s['train_tokens_per_second']), s['final_val_loss'])"
  done
done
