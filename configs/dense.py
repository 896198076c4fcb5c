"""Dense GPT baseline: every block's feed-forward is a GELU MLP with d_ff = 4 * d_model.

  python -m chimera.main --config=configs/dense.py             # CPU default preset
  python -m chimera.main --config=configs/dense.py:tiny        # seconds, smoke test
  python -m chimera.main --config=configs/dense.py:gpu         # one GPU, GPT-2 BPE, bf16
  python -m chimera.main --config=configs/dense.py:nanogpt_cpu \
      --config.data.corpus=../shared/data/tinyshakespeare.txt   # nanoGPT's CPU quick run

Expect: the nanogpt_cpu preset ends near nanoGPT's published validation loss of ~1.88.
"""

from chimera import presets


def get_config(arg=None):
  return presets.finish(presets.base("dense", arg))
