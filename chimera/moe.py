"""Mixture-of-Experts feed-forward layer in the Switch / GShard style.

`MoeLayer` runs in named steps: cut the tokens into routing groups, compute the router
logits, route (a router of `chimera.routers`, chosen by `config.router`), run the experts
and combine. Two ways to run the experts (`config.dispatch`):
- "einsum": static shapes. Each expert has C slots per group; one-hot dispatch/combine
  einsums move the tokens in and out, and choices beyond C are dropped (Switch
  Transformer, Fedus et al., 2021; GShard, Lepikhin et al., 2020).
- "dropless": no capacity and no drops. The token-expert choices are sorted by expert and
  the experts run as one grouped FFN in a block layout (`chimera.grouped_matmul`).
Shared experts (`num_shared_experts`, DeepSeekMoE) see every token with gate 1.

One FFN function, `ffn`, is the feed-forward math of every path: batched over E for the
einsum experts, grouped for dropless, plain for the shared experts.

Shape letters: B batch, L length, G groups, S tokens per group, E experts, C capacity,
K choices per token, M model dim, H expert hidden dim, T tokens (G*S), R sorted rows (T*K).
"""

import functools
from typing import Callable, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from chimera import expert_parallel, sharding
from chimera.config import ModelConfig
from chimera.grouped_matmul import (blocks_matmul, default_block_size, from_blocks, move_rows,
                                    sort_by_group, to_blocks)
from chimera.layers import compute_dtype, dense_init
from chimera.routers import Routing, expert_capacity, route, update_router_bias

__all__ = ["MoeLayer", "ROUTED_EXPERT_PARAMS", "Routing", "dropless_experts", "expert_capacity",
           "ffn", "route", "update_router_bias"]

Weights = dict[str, jax.Array]


def ffn(x: jax.Array, weights: Weights, activation: Literal["gelu", "swiglu"],
        matmul: Callable[[jax.Array, jax.Array], jax.Array] = jnp.matmul) -> jax.Array:
  """The feed-forward: gelu(x wi) wo, or (silu(x wi_gate) * (x wi_up)) wo for SwiGLU.

  `matmul(rows, w)` multiplies by one weight: jnp.matmul serves x [T, M] with w [M, H]
  (the dense MLP, the shared experts) and x [E, C, M] with w [E, M, H] (experts batched
  over E); a grouped matmul serves the dropless path.
  """
  return matmul(ffn_hidden(x, weights, activation, matmul), weights["wo"])


def ffn_hidden(x: jax.Array, weights: Weights, activation: Literal["gelu", "swiglu"],
               matmul: Callable[[jax.Array, jax.Array], jax.Array] = jnp.matmul) -> jax.Array:
  """The feed-forward's hidden activations, before `wo` (see `ffn`)."""
  if activation == "swiglu":
    return nn.silu(matmul(x, weights["wi_gate"])) * matmul(x, weights["wi_up"])
  return nn.gelu(matmul(x, weights["wi"]))


def dropless_experts(x: jax.Array, gate: jax.Array, expert_index: jax.Array,
                     weights: Weights, activation: Literal["gelu", "swiglu"],
                     skip_experts: bool = False, block_size: int | None = None) -> jax.Array:
  """y_t = sum_r gate[t, r] * expert_{expert_index[t, r]}(x_t), as one grouped FFN.

  The T*K choices are sorted by expert, so that each expert's rows are contiguous, then
  laid out in blocks of one expert each (`chimera.grouped_matmul.to_blocks`); the whole
  FFN runs in that layout, each block with its expert's weights. Nothing is dropped.
  Every move of rows is a gather whose gradient is a gather too (no scatter-add).

  Args:
    x: [T, M] tokens, in the compute dtype.
    gate: [T, K] gate weights; expert_index: [T, K] int32 chosen experts.
    weights: "wi" (or "wi_gate" and "wi_up") [E, M, H] and "wo" [E, H, M].
    skip_experts: benchmarks only; each expert returns its input rows unchanged (the sort,
      the block layout and the row moves still run: what dispatch and combine cost).
    block_size: rows per block; None: `chimera.grouped_matmul.default_block_size`.

  Returns:
    y: [T, M].
  """
  num_tokens, k = expert_index.shape
  num_experts = weights["wo"].shape[0]
  # order [R]: choice ids (a = t * K + r) by expert, in token order within an expert;
  # position [R]: each choice's sorted row; group_sizes [E].
  order, position, group_sizes = sort_by_group(expert_index.reshape(-1), num_experts)
  rows = _choice_rows(x, order, position, k)  # [R, M]
  block_size = block_size or default_block_size(rows.shape[0], num_experts)
  blocks, layout = to_blocks(rows, group_sizes, block_size)  # [N, b, M]
  if not skip_experts:  # the layout's row moves are dispatch: they stay when timing it
    blocks = ffn(blocks, weights, activation,
                 matmul=functools.partial(blocks_matmul, block_group=layout.block_group))
  rows = from_blocks(blocks, layout)  # [R, M]
  out = move_rows(rows, position, order).reshape(num_tokens, k, -1)  # [T, K, M], token order
  return jnp.einsum("tkm,tk->tm", out, gate.astype(out.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _choice_rows(x: jax.Array, order: jax.Array, position: jax.Array, k: int) -> jax.Array:
  """x [T, M] -> [R, M], row i = x[order[i] // k]: each token once per choice, sorted.
  The gradient gathers each token's K rows and sums them (no scatter-add)."""
  return x[order // k]


def _choice_rows_fwd(x, order, position, k):
  return _choice_rows(x, order, position, k), (order, position)


def _choice_rows_bwd(k, residuals, cotangent):
  order, position = residuals
  grad = cotangent[position].reshape(-1, k, cotangent.shape[-1]).sum(axis=1)  # [T, M]
  return grad, None, None


_choice_rows.defvjp(_choice_rows_fwd, _choice_rows_bwd)


def decode_experts(x: jax.Array, gate: jax.Array, expert_index: jax.Array, weights: Weights,
                   activation: Literal["gelu", "swiglu"]) -> jax.Array:
  """The experts on a few tokens (one new token per sequence), without capacity.

  x: [T, M]; gate, expert_index: [T, K]. Returns y [T, M].

  With T*K < E, each choice gathers its expert's weights: T*K weight reads. Otherwise
  every expert runs on all T tokens: E weight reads, the fewest possible (the grouped
  matmul would read the same weights and on XLA:CPU is itself a masked matmul over all E).
  There the gates scale each expert's hidden activations, zero for the experts a token did
  not choose, and one matmul over (expert, hidden) both projects down and sums the
  experts: no [E, T, M] outputs to combine afterwards. The tokens are broadcast over the
  experts so that the first matmul is batched over E, with the weights [E, M, H] in their
  own layout: x [T, M] times w [E, M, H] as one matmul of [T, M] by [M, E*H] made XLA
  (jax 0.11.2, H200) transpose the weights at every decoded token (profiled before the
  change, not after; results/gpu/h200/decode).
  """
  num_tokens, k = expert_index.shape
  num_experts = weights["wo"].shape[0]
  if num_tokens * k < num_experts:
    chosen = {name: w[expert_index.reshape(-1)] for name, w in weights.items()}  # [T*K, ...]
    token_in = jnp.repeat(x, k, axis=0)[:, None, :]  # [T*K, 1, M]
    out = ffn(token_in, chosen, activation).reshape(num_tokens, k, -1)  # [T, K, M]
    return jnp.einsum("tkm,tk->tm", out, gate.astype(out.dtype))
  x = jnp.broadcast_to(x, (num_experts, *x.shape))  # [E, T, M]
  hidden = ffn_hidden(x, weights, activation)  # [E, T, M] x [E, M, H] -> [E, T, H]
  expert_gate = jnp.einsum("tk,tke->et", gate,
                           jax.nn.one_hot(expert_index, num_experts, dtype=gate.dtype))
  hidden = hidden * expert_gate[:, :, None].astype(hidden.dtype)
  return jnp.einsum("eth,ehm->tm", hidden, weights["wo"])


def _multiply_sum(x: jax.Array, kernel: jax.Array, dimension_numbers, precision=None,
                  preferred_element_type=None) -> jax.Array:
  """x [..., M] times kernel [M, N] as a multiply and a sum over M: the `dot_general` of an
  nn.Dense, for products too small to be worth a GEMM kernel (see `_router_logits`). It
  ignores `precision`, and each product rounds to the inputs' dtype: meant for float32."""
  if dimension_numbers != (((x.ndim - 1,), (0,)), ((), ())):
    raise ValueError(f"_multiply_sum contracts x's last axis with kernel's first, not "
                     f"{dimension_numbers}")
  return jnp.sum(x[..., :, None] * kernel, axis=-2, dtype=preferred_element_type)


# The routed experts' parameter names in a MoeLayer (the shared experts' carry "shared_").
ROUTED_EXPERT_PARAMS = ("wi", "wi_gate", "wi_up", "wo")


class MoeLayer(nn.Module):
  """The MoE feed-forward sublayer: x [B, L, M] -> (y [B, L, M], Routing or None).

  Tokens are cut into groups of `config.group_size` consecutive tokens of the flattened
  [B*L] batch (None: one sequence per group); the token count must be a multiple of it
  (a ValueError otherwise, except in `init`).
  Training uses `capacity_factor`, evaluation (`deterministic=True`)
  `eval_capacity_factor`.

  Decoding (`decode=True`) never drops a token: each sequence is one group with
  capacity S, and a single new token per sequence skips the dispatch tensors (and the
  sort) altogether, see `decode_experts`. Then the returned Routing is None.

  With `router_bias_rate > 0` the layer reads a per-expert bias [E] from the
  "router_bias" collection (zeros at init), which only chooses experts; the training
  step moves it with `update_router_bias`.
  """

  config: ModelConfig
  # Benchmarks only: time routing, dispatch and combine alone (no routed or shared expert).
  skip_experts: bool = False

  def _groups(self, x: jax.Array, decode: bool) -> jax.Array:
    """x [B, L, M] -> [G, S, M]. Decoding routes each sequence as one group; `init` (whose
    output is thrown away) may use any dummy batch, so there a short one is one group."""
    cfg = self.config
    batch, length, d_model = x.shape
    group_size = length if decode or cfg.group_size is None else cfg.group_size
    if self.is_initializing() and (batch * length) % group_size:
      group_size = batch * length
    if (batch * length) % group_size:
      raise ValueError(f"model.group_size={group_size} does not divide the {batch * length} "
                       f"tokens of this batch ({batch} x {length}); routing groups must tile "
                       f"the batch")
    return x.reshape(-1, group_size, d_model)

  def _router_logits(self, x: jax.Array, deterministic: bool, one_token: bool) -> jax.Array:
    """x [G, S, M] -> router logits [G, S, E], float32.

    `one_token` (decoding one token per sequence): the product is a multiply and a sum
    over M, elementwise work XLA can fuse, instead of a float32 dot. The dot was a GEMM
    kernel of its own, 4 µs in every MoE layer at every decoded token (jax 0.11.2, H200).
    MoE decoding at batch 8 ran at 0.81-0.84x dense's tokens per second with this change
    (n=3) and 0.79-0.81x without it (n=4, results/gpu/h200/decode): the ranges overlap.
    The sum may round differently from the dot (which may use TF32 on a GPU).
    """
    cfg = self.config
    router_input = x.astype(jnp.float32)
    if not deterministic and cfg.router_jitter > 0:
      router_input *= jax.random.uniform(self.make_rng("dropout"), router_input.shape,
                                         minval=1.0 - cfg.router_jitter,
                                         maxval=1.0 + cfg.router_jitter)
    # Not the experts' initializer: the router kernel [M, E] has no leading expert axis.
    router_init = nn.initializers.variance_scaling(cfg.expert_init_scale, "fan_in",
                                                   "truncated_normal")
    return nn.Dense(cfg.num_experts, use_bias=False, dtype=jnp.float32,
                    kernel_init=router_init, name="router",
                    dot_general=_multiply_sum if one_token else None)(router_input)

  def _router_bias(self) -> jax.Array | None:
    if self.config.router_bias_rate <= 0:
      return None
    return self.variable("router_bias", "bias",
                         lambda: jnp.zeros((self.config.num_experts,), jnp.float32)).value

  def _choice_offset(self, router_logits: jax.Array, deterministic: bool,
                     decode: bool) -> jax.Array | None:
    """What is added to the router logits [G, S, E] to choose experts, and only to choose
    them: the balancing bias [E] (router_bias_rate), plus, in training, router_noise times
    Gumbel noise [G, S, E], which makes the choice a draw of k experts without replacement
    from softmax(logits / router_noise). None when neither is on."""
    cfg = self.config
    offset = self._router_bias()
    if cfg.router_noise > 0 and not deterministic and not decode:
      noise = cfg.router_noise * jax.random.gumbel(self.make_rng("dropout"),
                                                   router_logits.shape, jnp.float32)
      offset = noise if offset is None else offset + noise
    return offset

  def _expert_weights(self, d_model: int, count: int, prefix: str = "") -> Weights:
    """`count` experts' weights, each with a leading expert axis, in the compute dtype.

    "switch" init: truncated normal of variance expert_init_scale / fan_in. "dense": the
    dense MLP's, normal(init_std), the output projection scaled by 1/sqrt(2 * layers).
    """
    cfg = self.config
    if cfg.expert_init == "dense":
      init_in, init_out = dense_init(cfg), dense_init(cfg, residual=True)
    else:
      init_in = init_out = nn.initializers.variance_scaling(
          cfg.expert_init_scale, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1,
          batch_axis=(0,))
    names = ("wi_gate", "wi_up") if cfg.activation == "swiglu" else ("wi",)
    weights = {name: self.param(prefix + name, init_in, (count, d_model, cfg.expert_d_ff))
               for name in names}
    weights["wo"] = self.param(prefix + "wo", init_out, (count, cfg.expert_d_ff, d_model))
    return {name: w.astype(compute_dtype(cfg)) for name, w in weights.items()}

  def _einsum_experts(self, x: jax.Array, routing: Routing, weights: Weights) -> jax.Array:
    """Dispatch x [G, S, M] into [E, G, C, M] buffers, run the experts, combine: [G, S, M].

    Expert parallelism, through GSPMD rather than shard_map: the shapes are static, so
    sharding constraints are enough. The groups G, their routing and the einsums that
    build and read the buffers stay split over every device (`sharding.BATCH`); only the
    buffers move, resharded from split-by-group to split-by-expert (G over `data`) and
    back, which XLA turns into all-to-alls over the expert axis, forward and backward.
    Left to itself, GSPMD all-gathers the masks and the output gradient over the global
    batch instead. On one device the constraints are no-ops.
    """
    dtype = compute_dtype(self.config)
    by_group = lambda buffers: sharding.constrain(buffers, None, sharding.BATCH)
    by_expert = lambda buffers: sharding.constrain(buffers, sharding.EXPERT, sharding.DATA)
    dispatch = sharding.constrain(routing.dispatch.astype(dtype), sharding.BATCH)
    combine = sharding.constrain(routing.combine.astype(dtype), sharding.BATCH)
    expert_in = by_expert(by_group(jnp.einsum("gsec,gsm->egcm", dispatch, x.astype(dtype))))
    num_experts, _, _, d_model = expert_in.shape
    expert_out = expert_in.reshape(num_experts, -1, d_model)  # [E, G*C, M]
    if not self.skip_experts:
      expert_out = ffn(expert_out, weights, self.config.activation)
    expert_out = by_group(by_expert(expert_out.reshape(expert_in.shape)))
    y = jnp.einsum("egcm,gsec->gsm", expert_out, combine)
    return sharding.constrain(y, sharding.BATCH)

  def _shared_experts(self, x: jax.Array) -> jax.Array:
    """The always-on experts, gate 1, as one FFN of width num_shared * H: [T, M] -> [T, M].

    sum_j ffn_j(x) equals one FFN over the concatenated hidden units.
    """
    cfg = self.config
    weights = self._expert_weights(x.shape[-1], cfg.num_shared_experts, prefix="shared_")
    wide = {name: (w.transpose(1, 0, 2).reshape(w.shape[1], -1) if name != "wo"
                   else w.reshape(-1, w.shape[-1])) for name, w in weights.items()}
    return ffn(x.astype(compute_dtype(cfg)), wide, cfg.activation)

  @nn.compact
  def __call__(self, x: jax.Array, *, deterministic: bool,
               decode: bool = False) -> tuple[jax.Array, Routing | None]:
    cfg = self.config
    dtype = compute_dtype(cfg)
    batch, length, d_model = x.shape
    x = sharding.constrain(self._groups(x, decode), sharding.BATCH)  # [G, S, M]
    groups, group_size, _ = x.shape
    router_logits = self._router_logits(x, deterministic,
                                        one_token=decode and length == 1)  # [G, S, E]
    bias = self._choice_offset(router_logits, deterministic, decode)
    weights = self._expert_weights(d_model, cfg.num_experts)
    tokens = x.reshape(-1, d_model).astype(dtype)  # [T, M]

    if decode and length == 1:
      routing = route(router_logits, cfg, capacity=None, bias=bias)
      y = decode_experts(tokens, routing.gate.reshape(-1, cfg.top_k),
                         routing.expert_index.reshape(-1, cfg.top_k), weights, cfg.activation)
      routing = None  # nothing to balance
    elif cfg.dispatch == "dropless":
      # Not GSPMD, unlike the einsum path: the sort is data-dependent, and GSPMD would run
      # it over the global batch. shard_map sorts per device and writes out the all-to-alls.
      routing = route(router_logits, cfg, capacity=None, bias=bias)
      experts = functools.partial(dropless_experts, activation=cfg.activation,
                                  skip_experts=self.skip_experts)
      y = expert_parallel.dropless(experts, tokens, routing.gate.reshape(-1, cfg.top_k),
                                   routing.expert_index.reshape(-1, cfg.top_k),
                                   weights)  # [T, M]
    else:
      capacity = group_size if decode else expert_capacity(cfg, group_size,
                                                            deterministic=deterministic)
      routing = route(router_logits, cfg, capacity=capacity, bias=bias)
      y = self._einsum_experts(x, routing, weights).reshape(-1, d_model)  # [T, M]

    if cfg.num_shared_experts and not self.skip_experts:
      y = y + self._shared_experts(tokens)
    return y.reshape(batch, length, d_model), routing
