"""MoE top-2 (GShard / Mixtral style), compute-matched to configs/dense.py.

Every block's feed-forward is 8 experts, each with hidden size d_ff / 2, and each token
goes to its top 2: the same matmul FLOPs per token as the dense MLP (plus a router), with
4x its feed-forward parameters.

  python -m chimera.main --config=configs/moe_top2.py          # CPU default preset
  python -m chimera.main --config=configs/moe_top2.py:tiny     # seconds, smoke test
  python -m chimera.main --config=configs/moe_top2.py --config.model.num_experts=16

Expect: a lower validation loss than configs/dense.py at the same steps and tokens.
"""

from chimera import presets


def get_config(arg=None):
  c = presets.base("moe_top2", arg)
  c.model.num_experts = 8
  c.model.top_k = 2
  c.model.expert_d_ff = c.model.d_ff // 2
  return presets.finish(c)
