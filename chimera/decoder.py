"""The GPT-style decoder: pre-norm blocks whose feed-forward is a dense MLP or an MoE layer.

Shape letters: B batch, L length, M model dim, V vocab, E experts, Y MoE layers.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from chimera.config import ModelConfig
from chimera.layers import CausalSelfAttention, Embed, Kernels, Mlp, compute_dtype, make_norm
from chimera.moe import MoeLayer, Routing


class Block(nn.Module):
  """x + attn(norm(x)), then x + ffn(norm(x)); ffn is the MoE layer when `use_moe`."""

  config: ModelConfig
  use_moe: bool
  kernels: Kernels = Kernels()

  @nn.compact
  def __call__(self, x: jax.Array, *, deterministic: bool,
               decode: bool) -> tuple[jax.Array, Routing | None]:
    cfg = self.config
    residual_dropout = nn.Dropout(cfg.dropout)
    h = CausalSelfAttention(cfg, self.kernels.attention, name="attn")(
        make_norm(cfg, "norm_attn")(x), deterministic=deterministic, decode=decode)
    x = x + residual_dropout(h, deterministic=deterministic)
    h = make_norm(cfg, "norm_ffn")(x)
    routing = None
    if self.use_moe:
      h, routing = MoeLayer(cfg, name="moe")(h, deterministic=deterministic, decode=decode)
    else:
      h = Mlp(cfg, name="mlp")(h)
    return x + residual_dropout(h, deterministic=deterministic), routing


def collect_moe_stats(routings: list[Routing], num_experts: int) -> dict[str, jax.Array]:
  """The MoE losses (averaged over MoE layers) and per-layer metrics, as a flat dict.

  A dense model gets zero losses and empty [0]-shaped metrics, so every model returns
  the same keys.
  """
  def stack(field: str, shape=()):
    values = [getattr(r, field) for r in routings]
    return jnp.stack(values) if values else jnp.zeros((0, *shape), jnp.float32)

  mean = lambda field: stack(field).mean() if routings else jnp.zeros((), jnp.float32)
  return {
      "load_balance_loss": mean("load_balance_loss"),
      "z_loss": mean("z_loss"),
      "dropped_fraction": stack("dropped_fraction"),  # [Y]
      "expert_load": stack("expert_load", (num_experts,)),  # [Y, E]
      "max_violation": stack("max_violation"),  # [Y] MaxVio: max load / mean load - 1
      "router_entropy": stack("router_entropy"),  # [Y]
      "router_confidence": stack("router_confidence"),  # [Y]
  }


class Decoder(nn.Module):
  """Token ids [B, L] -> (logits [B, L, V], MoE stats from `collect_moe_stats`).

  The logits are in the compute dtype (bfloat16 or float32): a [B, L, V] float32 copy is
  the largest tensor of a bf16 step, and `layers.cross_entropy` upcasts inside its
  reductions instead. The output head is the transposed token embedding (tied weights).
  With `decode=True`, positions continue from a counter kept in the "cache" collection
  (see `CausalSelfAttention`). `kernels` picks implementations, not math.
  """

  config: ModelConfig
  kernels: Kernels = Kernels()

  @nn.compact
  def __call__(self, tokens: jax.Array, *, deterministic: bool = True,
               decode: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
    cfg = self.config
    dtype = compute_dtype(cfg)
    embed = Embed(cfg.vocab_size, cfg.d_model, dtype=dtype,
                  embedding_init=nn.initializers.normal(cfg.init_std),
                  embed_grad=self.kernels.embed_grad, name="embed")
    x = embed(tokens)  # [B, L, M]
    if cfg.positions == "learned":
      start = jnp.zeros((), jnp.int32)
      if decode:
        cache_ready = self.has_variable("cache", "position")
        position = self.variable("cache", "position", lambda: jnp.zeros((), jnp.int32))
        if cache_ready:
          start = position.value
          position.value = start + tokens.shape[1]
      table = self.param("pos_embed", nn.initializers.normal(cfg.init_std),
                         (cfg.max_len, cfg.d_model))
      x = x + jax.lax.dynamic_slice_in_dim(table, start, tokens.shape[1]).astype(dtype)
    x = nn.Dropout(cfg.dropout)(x, deterministic=deterministic)

    routings = []
    for layer in range(cfg.num_layers):
      x, routing = Block(cfg, use_moe=cfg.is_moe_layer(layer), kernels=self.kernels,
                         name=f"block_{layer}")(x, deterministic=deterministic, decode=decode)
      if routing is not None:
        routings.append(routing)
    x = make_norm(cfg, "norm_final")(x)
    logits = embed.attend(x)  # [B, L, V] in the compute dtype
    return logits, collect_moe_stats(routings, cfg.num_experts)
