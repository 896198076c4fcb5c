"""nanoGPT's checkpoint scored as `python -m chimera.evaluate` scores ours: the whole
validation split cut into consecutive windows of the context (+1 token, overlapping by
one), every token but the first predicted once; mean nats per token.

  /tmp/torchvenv/bin/python results/nanogpt_cpu/nanogpt_split_loss.py NANOGPT_DIR CKPT_DIR

NANOGPT_DIR: a nanoGPT checkout (its model.py and data/shakespeare_char/val.bin, made by its
prepare.py from the same tinyshakespeare.txt); CKPT_DIR: the run's out_dir (ckpt.pt).
"""

import sys
from pathlib import Path

import numpy as np
import torch

nanogpt, out_dir = Path(sys.argv[1]), Path(sys.argv[2])
sys.path.insert(0, str(nanogpt))
from model import GPT, GPTConfig  # noqa: E402  (nanoGPT's own model code, imported from its checkout)

checkpoint = torch.load(out_dir / "ckpt.pt", map_location="cpu")
model = GPT(GPTConfig(**checkpoint["model_args"]))
state = {k.removeprefix("_orig_mod."): v for k, v in checkpoint["model"].items()}
model.load_state_dict(state)
model.eval()
context = checkpoint["model_args"]["block_size"]
val = np.fromfile(nanogpt / "data" / "shakespeare_char" / "val.bin", dtype=np.uint16).astype(np.int64)
count = (len(val) - 1) // context
rows = torch.from_numpy(val[np.arange(count)[:, None] * context + np.arange(context + 1)])
total = 0.0
with torch.no_grad():
  for start in range(0, count, 64):
    batch = rows[start:start + 64]
    logits, _ = model(batch[:, :-1].contiguous(), batch[:, 1:].contiguous())  # targets given: logits at every position
    total += torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1), reduction="sum").item()
print(f"{out_dir}, iter {checkpoint['iter_num']}: validation split {total / (count * context):.4f} "
      f"nats per token ({count * context:,} tokens in {count:,} windows)")
