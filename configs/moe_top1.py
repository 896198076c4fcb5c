"""MoE top-1 (Switch style), compute-matched to configs/dense.py.

Every block's feed-forward is 8 experts of the dense MLP's size (hidden d_ff), and each
token goes to its single best expert: the same matmul FLOPs per token as the dense MLP
(plus a router), with 8x its feed-forward parameters.

  python -m chimera.main --config=configs/moe_top1.py          # CPU default preset
  python -m chimera.main --config=configs/moe_top1.py:tiny     # seconds, smoke test

Expect: a lower validation loss than configs/dense.py at the same steps and tokens.
"""

from chimera import presets


def get_config(arg=None):
  c = presets.base("moe_top1", arg)
  c.model.num_experts = 8
  c.model.top_k = 1
  c.model.expert_d_ff = c.model.d_ff
  return presets.finish(c)
