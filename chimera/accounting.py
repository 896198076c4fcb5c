"""Parameter and FLOP accounting from a ModelConfig alone (no arrays are built).

Conventions:
- `params_total` counts every parameter, each tied embedding once.
- `params_active` counts what one token uses: k of the E routed experts and every shared
  expert in each MoE layer, plus the router, attention, norms and embeddings.
- `flops_per_token` (model FLOPs) is training FLOPs per token, 6 * N_matmul +
  12 * num_layers * T * M: N_matmul is the active parameters that take part in matrix
  multiplies (attention, MLP or the k chosen and the shared experts, the router, and the
  tied output head; not norms, biases or position tables), 6 = 2 (multiply-add) *
  3 (forward + backward); the second term is the attention scores and weighted sum
  (QK^T and AV, 2 * 2 * T * M FLOPs per token per layer forward, times 3), with T the
  context. That is the full T x T square, as XLA's attention computes it and as the usual
  MFU convention counts it (PaLM, Chowdhery et al. 2022, appendix B); a causal
  flash-attention kernel (cuDNN's, on a GPU) may skip the masked blocks and compute less.
- `dispatch_flops_per_token` is the matmul work of routing, dispatch and combine, which
  is not model FLOPs. On the einsum path, per MoE layer and token: the dispatch and
  combine einsums, 2 * E * C * M per einsum pass, 5 passes (combine runs three times:
  forward, and backward to the experts' outputs and to the gate weights; dispatch twice:
  its mask is built from one-hots, a constant with no gradient), and the einsums that
  build those masks from the choices, 2 * K * E * C each (dispatch mask, combine mask,
  and the combine mask's gradient to the gates), plus 2 * K * min(E, C) twice (the gates
  times the smaller of the choice and slot one-hots, forward and backward). With C ~ k * cf * S / E the passes are
  10 * k * cf * S * M per MoE layer.
- `executed_flops_per_token` is what the einsum path computes: the experts run on all
  E * C / S slots per token (empty slots are computed too) instead of k, plus the
  dispatch work above. C comes from `chimera.routers.expert_capacity` at the training
  capacity factor. Under `dispatch="dropless"` with `tokens_per_call` given, it counts
  what the "blocks" layout (`chimera.grouped_matmul`) computes: R = tokens_per_call * k
  routed rows laid out as N = R // b + E blocks of b rows (b from
  `grouped_matmul.default_block_size`; the static layout computes all N * b rows, empty
  ones too), so the experts run N * b / R times the model's; plus the one-hot matmul that
  picks each block's weights, 2 * N * E * M * H per expert matrix, forward and once more
  for the weights' gradient (the one-hot itself is a constant: times 2, not 3), and the
  gate-weighted sum of the k outputs, 2 * K * M forward and twice backward (to the
  outputs and to the gates). The sort and the gathers do no matmul and are not counted.
  Without `tokens_per_call` (or on XLA:CPU's `ragged_dot`, a masked matmul over all
  E experts) dropless is counted at its model FLOPs.
- `count_run(config)` is `count` at a run's context and micro-batch, as one device runs
  it: on a mesh each device lays out its own share of the rows and b follows them; with
  experts split over X devices, dropless computes the X * T_d * min(k, E / X) rows each
  device receives in `chimera.expert_parallel`'s worst-case buffers, X * min(k, E / X) / k
  times the T_d * k routed rows of its own T_d tokens; each received row's output is
  summed with a constant gate of 1 before it is sent back, 2 * M forward and 2 * M
  backward per row.
"""

import dataclasses
from typing import NamedTuple

from chimera.config import Config, ModelConfig
from chimera.grouped_matmul import default_block_size, num_blocks
from chimera.routers import expert_capacity


class Accounting(NamedTuple):
  params_total: int
  params_active: int
  flops_per_token: int
  dispatch_flops_per_token: int
  executed_flops_per_token: int


def _ffn_matrices(config: ModelConfig) -> int:
  return 3 if config.activation == "swiglu" else 2


def expert_slots_per_token(config: ModelConfig) -> float:
  """Expert FFN evaluations per token on the einsum path, E * C / S (k when dropless)."""
  if config.dispatch == "dropless":
    return float(config.top_k)
  capacity = expert_capacity(config, config.group_size)
  return config.num_experts * capacity / config.group_size


def block_padding(config: ModelConfig, tokens_per_call: int,
                  expert_devices: int = 1) -> tuple[float, int]:
  """(N * b / (T * k), N) of the dropless "blocks" layout for one device's call on T =
  `tokens_per_call` tokens: the expert rows computed per routed row, and the number of
  blocks. With X = `expert_devices` > 1 (`chimera.expert_parallel`) the device lays out
  the X * T * min(k, E_d) rows it receives over its E_d = E / X experts."""
  local_experts = config.num_experts // expert_devices
  rows = tokens_per_call * (config.top_k if expert_devices == 1
                            else expert_devices * min(config.top_k, local_experts))
  block = default_block_size(rows, local_experts)
  blocks = num_blocks(rows, local_experts, block)
  return blocks * block / (tokens_per_call * config.top_k), blocks


def count(config: ModelConfig, context: int, tokens_per_call: int | None = None,
          expert_devices: int = 1) -> Accounting:
  """Parameters and training FLOPs per token of `config` at sequence length `context`.

  `config.group_size` None means one sequence of `context` tokens per routing group.
  tokens_per_call: the tokens one dropless layer call routes on one device (its share of
  the micro-batch); None leaves the dropless block padding out of the executed FLOPs.
  expert_devices: the mesh's expert axis, over which dropless trades padded rows.
  """
  if config.group_size is None:
    config = dataclasses.replace(config, group_size=context)
  m, bias = config.d_model, config.use_bias
  norm = m if config.norm == "rmsnorm" else m + (m if bias else 0)
  attention_matmul = 4 * m * m
  attention = attention_matmul + (4 * m if bias else 0) + 2 * norm  # qkv, out, 2 norms
  mlp_matmul = _ffn_matrices(config) * m * config.d_ff
  mlp_bias = ((_ffn_matrices(config) - 1) * config.d_ff + m) if bias else 0
  expert_matmul = _ffn_matrices(config) * m * config.expert_d_ff
  router = m * config.num_experts
  shared = config.num_shared_experts * expert_matmul

  embed = config.vocab_size * m
  positions = config.max_len * m if config.positions == "learned" else 0
  total = active = embed + positions + norm  # + final norm
  matmul = embed  # the tied output head
  dispatch = padding = 0
  for layer in range(config.num_layers):
    total += attention
    active += attention
    matmul += attention_matmul
    if config.is_moe_layer(layer):
      total += router + config.num_experts * expert_matmul + shared
      active += router + config.top_k * expert_matmul + shared
      matmul += router + config.top_k * expert_matmul + shared
      k, experts = config.top_k, config.num_experts
      if config.dispatch == "einsum":
        capacity = expert_capacity(config, config.group_size)
        dispatch += (3 + 2) * 2 * experts * capacity * m  # combine, dispatch
        # The masks: the gates multiply the smaller of the choice and slot one-hots.
        dispatch += 3 * 2 * k * experts * capacity + 2 * 2 * k * min(experts, capacity)
        padding += 6 * (expert_slots_per_token(config) - k) * expert_matmul
      elif tokens_per_call is not None:
        rows_ratio, blocks = block_padding(config, tokens_per_call, expert_devices)
        padding += 6 * (rows_ratio - 1) * k * expert_matmul
        local_experts = experts // expert_devices
        dispatch += 4 * blocks * local_experts * expert_matmul / tokens_per_call
        dispatch += 3 * 2 * k * m  # the gate-weighted sum of the k outputs
        if expert_devices > 1:  # each received row, summed with a gate of 1
          dispatch += 2 * 2 * m * expert_devices * min(k, local_experts)
    else:
      total += mlp_matmul + mlp_bias
      active += mlp_matmul + mlp_bias
      matmul += mlp_matmul
  flops = 6 * matmul + 12 * config.num_layers * context * m
  return Accounting(total, active, flops, round(dispatch), round(flops + padding + dispatch))


def count_run(config: Config) -> Accounting:
  """`count` of a run's model at its context and micro-batch, as one device of its mesh
  runs it: the micro-batch split over data x expert devices, and dropless's rows traded
  over the expert axis."""
  t, mesh = config.train, config.mesh
  if mesh.data is None:
    raise ValueError("count_run: config.mesh.data is unset; resolve it first "
                     "(chimera.sharding.resolve_mesh)")
  tokens = t.batch_size // t.grad_accum * t.context // (mesh.data * mesh.expert)
  return count(config.model, t.context, tokens_per_call=tokens, expert_devices=mesh.expert)
