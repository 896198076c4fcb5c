"""Parameter and FLOP counts: by hand on small configs, and against Decoder.init's params."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from chimera.accounting import count, count_run
from chimera.config import Config, MeshConfig, ModelConfig, TrainConfig
from chimera.decoder import Decoder
from chimera.grouped_matmul import default_block_size, to_blocks

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
  # One MoE layer: (3 combine + 2 dispatch passes) * 2 * E 4 * C 5 * M 8, and building
  # their masks: 3 * 2 * K 2 * E 4 * C 5 and 2 * 2 * K 2 * E 4.
  assert accounting.dispatch_flops_per_token == 5 * 2 * 4 * 5 * 8 + 3 * 2 * 2 * 4 * 5 \
      + 2 * 2 * 2 * 4 == 1872
  # Executed: the experts run on E * C / S = 4 * 5 / 8 = 2.5 slots per token, not 2, so
  # 0.5 * 6 * 256 more, plus the dispatch and combine einsums.
  assert accounting.executed_flops_per_token == accounting.flops_per_token + 768 + 1872


def test_dense_executes_its_model_flops():
  accounting = count(DENSE, context=16)
  assert accounting.executed_flops_per_token == accounting.flops_per_token


def test_dropless_without_a_batch_counts_its_model_flops():
  accounting = count(dataclasses.replace(MOE, dispatch="dropless"), context=16)
  assert accounting.flops_per_token == count(MOE, context=16).flops_per_token
  assert accounting.dispatch_flops_per_token == 0
  assert accounting.executed_flops_per_token == accounting.flops_per_token


def test_dropless_counts_the_block_layout_it_computes():
  # 512 tokens per call, top-2: R = 1024 routed rows over E = 4 experts. The layout is read
  # from chimera.grouped_matmul itself: N blocks of b rows, all computed.
  tokens, moe = 512, dataclasses.replace(MOE, dispatch="dropless")
  rows = jnp.zeros((tokens * 2, 8))
  group_sizes = jnp.array([1024, 0, 0, 0], jnp.int32)
  block = default_block_size(1024, 4)
  blocks, _ = to_blocks(rows, group_sizes, block)
  num_blocks = blocks.shape[0]
  assert (block, num_blocks) == (64, 20)  # 1024 / 64 + 4: 1.25x the routed rows
  plain, padded = count(moe, context=16), count(moe, context=16, tokens_per_call=tokens)
  expert_matmul = 2 * 8 * 16  # wi, wo of one expert
  # One MoE layer: 0.25 * 2 routed rows of padding per token, and the one-hot matmul
  # that picks each block's weights, 2 * N * E * M * H per matrix, forward and for the
  # weights' gradient (times 2: the one-hot is a constant); and the gate-weighted sum of
  # the K 2 outputs, 2 * K * M forward and twice backward.
  dispatch = 4 * num_blocks * 4 * expert_matmul / tokens + 3 * 2 * 2 * 8
  assert padded.dispatch_flops_per_token == round(dispatch) == 160 + 96
  assert padded.executed_flops_per_token == plain.flops_per_token + 6 * 0.25 * 2 * expert_matmul \
      + 256
  assert padded.flops_per_token == plain.flops_per_token  # model FLOPs do not change


def test_a_run_counts_one_device_of_its_mesh():
  """count_run: the micro-batch split over the mesh's devices, each laying out its own rows;
  with experts split over X devices, dropless computes the X * T_d * min(k, E_d) rows a
  device receives in chimera.expert_parallel's buffers, over its E_d local experts."""
  moe = dataclasses.replace(MOE, dispatch="dropless")
  expert_matmul = 2 * 8 * 16
  base = Config(model=moe, train=TrainConfig(batch_size=64, context=16),
                mesh=MeshConfig(data=1))  # 1024 tokens on one device
  one = count_run(base)
  assert one == count(moe, context=16, tokens_per_call=1024)
  # 8 data devices: T_d = 128 tokens, R = 256 rows, b = 64 (E * b * 4 <= R fails down to
  # the smallest block), N = 256 // 64 + 4 = 8 blocks: 2x the routed rows, not 1.25x.
  data8 = count_run(dataclasses.replace(base, mesh=MeshConfig(data=8)))
  plain = count(moe, context=16).flops_per_token
  gate_sum = 3 * 2 * 2 * 8  # the gate-weighted sum of the K outputs
  assert data8.executed_flops_per_token == plain + round(
      6 * (2 - 1) * 2 * expert_matmul + 4 * 8 * 4 * expert_matmul / 128) + gate_sum
  assert data8.executed_flops_per_token > one.executed_flops_per_token
  # 2 data x 2 expert devices: T_d = 256, each device receives X * T_d * min(k, E_d) =
  # 2 * 256 * 2 = 1024 rows over E_d = 2 experts: b = 128, N = 1024 // 128 + 2 = 10, so
  # 1280 rows for 512 routed rows (2.5x), and the one-hot over its 2 experts; each of the
  # X * min(k, E_d) = 4 rows per token it receives is summed with a gate of 1 (2 * 2 * M).
  expert2 = count_run(dataclasses.replace(base, mesh=MeshConfig(data=2, expert=2)))
  assert expert2.executed_flops_per_token == plain + round(
      6 * (1280 / 512 - 1) * 2 * expert_matmul + 4 * 10 * 2 * expert_matmul / 256) \
      + gate_sum + 4 * 2 * 2 * 8
  assert expert2.flops_per_token == one.flops_per_token  # model FLOPs do not change
  # A mesh whose data axis is still unset (resolved when the run starts) has no count.
  with pytest.raises(ValueError, match="mesh.data is unset"):
    count_run(dataclasses.replace(base, mesh=MeshConfig()))


def test_shared_experts_count_as_active():
  # One shared expert of hidden size 16 in the MoE block: 256 more parameters, all active.
  plain, shared = count(MOE, context=16), count(
      dataclasses.replace(MOE, num_shared_experts=1), context=16)
  assert shared.params_total - plain.params_total == 256
  assert shared.params_active - plain.params_active == 256
  assert shared.flops_per_token - plain.flops_per_token == 6 * 256
  assert init_param_count(dataclasses.replace(MOE, num_shared_experts=1)) == shared.params_total


@pytest.mark.parametrize("top_k,num_shared", [(2, 0), (8, 0), (7, 1), (6, 2)])
def test_resolved_expert_width_is_compute_matched(top_k, num_shared):
  # expert_d_ff resolves to d_ff / (k + shared): every MoE model's FLOPs are dense's plus
  # only its router's 6 * M * E per MoE layer.
  dense = dataclasses.replace(DENSE, d_ff=64)
  # expert_d_ff=None: replace() would otherwise keep the width DENSE resolved for top_k=2.
  moe = dataclasses.replace(dense, num_experts=16, top_k=top_k, num_shared_experts=num_shared,
                            group_size=16, expert_d_ff=None)
  assert moe.expert_d_ff == 64 // (top_k + num_shared)
  router_flops = 6 * 8 * 16 * dense.num_layers
  assert count(moe, 16).flops_per_token == count(dense, 16).flops_per_token + router_flops


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
    dict(num_experts=4, top_k=1, num_shared_experts=2, activation="swiglu"),
], ids=lambda changes: ",".join(f"{k}={v}" for k, v in changes.items()) or "default")
def test_count_matches_init(changes):
  cfg = dataclasses.replace(DENSE, **changes)
  assert count(cfg, context=16).params_total == init_param_count(cfg)


def _dot_flops(jaxpr) -> int:
  """FLOPs of every dot_general in a jaxpr and the jaxprs inside it (2 per multiply-add)."""
  flops = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
      (_, rhs_contract), (_, rhs_batch) = eqn.params["dimension_numbers"]
      rhs_free = [n for i, n in enumerate(rhs) if i not in (*rhs_contract, *rhs_batch)]
      flops += 2 * int(np.prod(lhs)) * int(np.prod(rhs_free))
    trips = eqn.params["length"] if eqn.primitive.name == "scan" else 1
    for value in eqn.params.values():
      for sub in value if isinstance(value, (list, tuple)) else [value]:
        sub = sub.jaxpr if isinstance(sub, jax.extend.core.ClosedJaxpr) else sub
        if isinstance(sub, jax.extend.core.Jaxpr):
          inner = _dot_flops(sub)
          assert not (inner and eqn.primitive.name == "while"), "a loop of unknown trips"
          flops += trips * inner
  return flops


@pytest.mark.parametrize("cfg", [DENSE, MOE, dataclasses.replace(MOE, num_shared_experts=1),
                                 dataclasses.replace(MOE, top_k=1),
                                 dataclasses.replace(MOE, dispatch="dropless"),
                                 dataclasses.replace(MOE, dispatch="dropless", top_k=3)],
                         ids=["dense", "einsum", "shared", "top1", "dropless", "dropless-top3"])
def test_executed_flops_are_the_training_steps_matmuls(cfg):
  """executed_flops_per_token equals the matmul FLOPs of the traced forward and backward
  of a training loss, per token: every dot the step runs is counted, and nothing else."""
  from chimera.layers import cross_entropy
  batch, context = 4, 16
  model = Decoder(cfg)
  tokens = jnp.zeros((batch, context), jnp.int32)
  params = jax.eval_shape(model.init, jax.random.key(0), tokens)

  def loss(params):
    logits, _ = model.apply(params, tokens, deterministic=False,
                            rngs={"dropout": jax.random.key(1)})
    return cross_entropy(logits, tokens).mean()

  traced = _dot_flops(jax.make_jaxpr(jax.grad(loss))(params).jaxpr)
  counted = count(cfg, context, tokens_per_call=batch * context)
  assert traced / (batch * context) == counted.executed_flops_per_token
