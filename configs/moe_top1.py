"""MoE top-1 (Switch style), compute-matched to configs/dense.py.

Every block's feed-forward is 8 experts and each token goes to its single best expert.
The expert width is left to the config (resolved to d_ff for top_k=1): the same matmul
FLOPs per token as the dense MLP (plus a router), with 8x its feed-forward parameters.

  python -m chimera.main --config=configs/moe_top1.py          # CPU default preset
  python -m chimera.main --config=configs/moe_top1.py:tiny     # seconds, smoke test

What it reaches against dense is measured by `python -m chimera.compare` (results/).
"""

from chimera import presets


def get_config(arg=None):
  c = presets.base("moe_top1", arg)
  c.model.num_experts = 8
  c.model.top_k = 1
  return presets.finish(c)
