"""Parameter and FLOP counts: by hand on small configs, and against Decoder.init's params."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from chimera.accounting import count
from chimera.config import ModelConfig
from chimera.decoder import Decoder

# vocab 11, d_model 8, 2 heads, d_ff 32, max_len 16, 2 layers, learned positions,
# layernorm without bias, GELU, no biases.
DENSE = ModelConfig(vocab_size=11, num_layers=2, num_heads=2, d_model=8, d_ff=32, max_len=16)
# Block 1 is MoE: 4 experts of hidden size 16, top-2; block 0 stays dense. Group of 8
# tokens, capacity max(1, ceil(2 * 1.25 * 8 / 4)) = 5.
MOE = dataclasses.replace(DENSE, num_experts=4, top_k=2, expert_d_ff=16, moe_every=2,
                          first_moe_layer=1, group_size=8, capacity_factor=1.25,
                          min_capacity=1)


def init_param_count(cfg: ModelConfig) -> int:
  """The number of parameters Decoder.init creates (shapes only, nothing allocated)."""
  tokens = jax.ShapeDtypeStruct((2, 8), jnp.int32)
  params = jax.eval_shape(Decoder(cfg).init, jax.random.key(0), tokens)["params"]
  return int(sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(params)))


def test_dense_counts_by_hand():
  embed = 11 * 8  # tied with the output head, counted once
  positions = 16 * 8
  attention = 8 * 3 * 8 + 8 * 8  # qkv [M, 3 * N * D] and out [N * D, M]: 256
  norms = 8 + 8  # two layernorm scales per block
  mlp = 8 * 32 + 32 * 8  # wi, wo: 512
  final_norm = 8
  total = embed + positions + 2 * (attention + norms + mlp) + final_norm
  assert total == 1792
  accounting = count(DENSE, context=16)
  assert accounting.params_total == accounting.params_active == total
  assert init_param_count(DENSE) == total
  # 6 * (tied head 88 + 2 * (attention 256 + mlp 512)) + 12 * layers 2 * context 16 * M 8.
  assert accounting.flops_per_token == 6 * (88 + 2 * (256 + 512)) + 12 * 2 * 16 * 8 == 12816
  assert accounting.dispatch_flops_per_token == 0


def test_moe_counts_by_hand():
  embed, positions, final_norm = 11 * 8, 16 * 8, 8
  attention, norms = 256, 16
  dense_block = attention + norms + 2 * 8 * 32  # 784
  router = 8 * 4
  expert = 8 * 16 + 16 * 8  # wi [M, H], wo [H, M]: 256
  moe_block = attention + norms + router + 4 * expert  # 1328
  total = embed + positions + dense_block + moe_block + final_norm
  active = embed + positions + dense_block + (attention + norms + router + 2 * expert) \
      + final_norm
  assert (total, active) == (2336, 1824)
  accounting = count(MOE, context=16)
  assert accounting.params_total == total
  assert accounting.params_active == active
  assert init_param_count(MOE) == total
  # Matmul params of one token: head 88, attention 2 * 256, mlp 512, router 32, 2 experts.
  assert accounting.flops_per_token == 6 * (88 + 2 * 256 + 512 + 32 + 2 * 256) \
      + 12 * 2 * 16 * 8
  # One MoE layer: 3 * 2 einsums * 2 * E 4 * C 5 * M 8.
  assert accounting.dispatch_flops_per_token == 3 * 2 * 2 * 4 * 5 * 8 == 1920


@pytest.mark.parametrize("changes", [
    dict(),
    dict(positions="rotary", norm="rmsnorm", activation="swiglu", use_bias=True),
    dict(use_bias=True),
    dict(positions="rotary", activation="swiglu"),
    dict(norm="rmsnorm", use_bias=True, num_layers=3),
    dict(num_experts=4, num_layers=4, moe_every=2, first_moe_layer=1, use_bias=True),
    dict(num_experts=3, top_k=1, positions="rotary", norm="rmsnorm", activation="swiglu"),
    dict(num_experts=4, num_layers=3, moe_every=2, activation="swiglu", use_bias=True,
         norm="layernorm", expert_d_ff=24),
], ids=lambda changes: ",".join(f"{k}={v}" for k, v in changes.items()) or "default")
def test_count_matches_init(changes):
  cfg = dataclasses.replace(DENSE, **changes)
  assert count(cfg, context=16).params_total == init_param_count(cfg)
