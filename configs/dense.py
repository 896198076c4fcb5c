"""Dense GPT baseline: every block's feed-forward is a GELU MLP with d_ff = 4 * d_model.

  python -m chimera.main --config=configs/dense.py             # CPU default preset
  python -m chimera.main --config=configs/dense.py:tiny        # seconds, smoke test
  python -m chimera.main --config=configs/dense.py:gpu         # one GPU, GPT-2 BPE, bf16
  python -m chimera.main --config=configs/dense.py:nanogpt_cpu \
      --config.data.corpus=path/to/tinyshakespeare.txt   # nanoGPT's CPU quick run

The nanogpt_cpu preset, scored on the whole validation split, ended at 1.8870 ± 0.0069
against nanoGPT's quick run at 1.8979 ± 0.0033 (mean ± SD, n=4 seeds each; seed 0 read
1.8909 on the preset's 20 evaluation batches, nanoGPT's own 1.8740):
results/nanogpt_cpu/side_by_side.md.
"""

from chimera import presets


def get_config(arg=None):
  return presets.finish(presets.base("dense", arg))
