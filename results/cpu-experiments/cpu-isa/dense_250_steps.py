"""Dense, seed 0, at the cpu study's config (chimera.compare --preset=cpu): 250 steps of
its 2500 (stop_after), then the validation loss at step 250.

  python results/cpu-experiments/cpu-isa/dense_250_steps.py WORKDIR
"""
import json, sys, shutil, dataclasses
from pathlib import Path
from chimera import config as config_lib
from chimera.train import train
over = {"train.steps": 2500, "train.batch_size": 32, "train.context": 128, "train.eval_every": 250,
        "train.log_every": 50, "train.checkpoint_every": 250}
c = config_lib.load("configs/dense.py:small", over)
c = dataclasses.replace(c, train=dataclasses.replace(c.train, seed=0), data=dataclasses.replace(c.data, seed=0))
wd = Path(sys.argv[1]); shutil.rmtree(wd, ignore_errors=True)
train(c, wd, stop_after=250)
rows = [json.loads(l) for l in open(wd / "metrics.jsonl")]
print("VAL250", [r["val_loss"] for r in rows if "val_loss" in r])
