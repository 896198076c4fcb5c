"""Decoder building blocks: norms, rotary positions, causal attention with a KV cache, MLP.

Shape letters: B batch, L length (queries), T length (keys), M model dim, N heads,
D head dim, F hidden dim.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from chimera.config import ModelConfig


def compute_dtype(config: ModelConfig):
  return jnp.bfloat16 if config.dtype == "bfloat16" else jnp.float32


def dense_init(config: ModelConfig, residual: bool = False):
  """Normal(0, init_std); projections back into the residual stream are scaled down by
  sqrt(2 * num_layers), as in GPT-2, so the stream's variance does not grow with depth."""
  std = config.init_std / math.sqrt(2 * config.num_layers) if residual else config.init_std
  return nn.initializers.normal(std)


def make_norm(config: ModelConfig, name: str) -> nn.Module:
  if config.norm == "rmsnorm":
    return nn.RMSNorm(dtype=jnp.float32, name=name)
  return nn.LayerNorm(use_bias=config.use_bias, dtype=jnp.float32, name=name)


def apply_rotary(x: jax.Array, positions: jax.Array) -> jax.Array:
  """Rotary position embedding (RoFormer), rotating channel pairs (i, i + D/2).

  x: [..., L, D]; positions: [L] integer. Returns x rotated, in x's dtype.
  """
  half = x.shape[-1] // 2
  inv_freq = 1.0 / (10_000 ** (jnp.arange(half, dtype=jnp.float32) / half))
  angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]  # [L, D/2]
  sin, cos = jnp.sin(angles), jnp.cos(angles)  # [L, D/2], broadcast over leading axes
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x.dtype)


class CausalSelfAttention(nn.Module):
  """Multi-head causal self-attention.

  With `decode=True` it keeps a static-shape key/value cache of `max_len` positions in
  the "cache" collection: initialise it by calling once with an input of the full
  decode shape, then feed tokens a few at a time.
  """

  config: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array, *, deterministic: bool, decode: bool = False) -> jax.Array:
    # x: [B, L, M]
    cfg = self.config
    dtype = compute_dtype(cfg)
    batch, length, _ = x.shape
    # Projections act on [B*L, M]: XLA:CPU runs 2-D matmuls (and their gradients) faster.
    qkv = nn.Dense(3 * cfg.d_model, use_bias=cfg.use_bias, dtype=dtype,
                   kernel_init=dense_init(cfg), name="qkv")(x.reshape(-1, cfg.d_model))
    qkv = qkv.reshape(batch, length, 3, cfg.num_heads, cfg.head_dim).transpose(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]  # each [B, N, L, D]: heads before positions, so that
    # the score and mix einsums below read the cache without transposing it

    start = jnp.zeros((), jnp.int32)
    if decode:
      cache_ready = self.has_variable("cache", "key")
      cache_shape = (batch, cfg.num_heads, cfg.max_len, cfg.head_dim)
      cached_key = self.variable("cache", "key", jnp.zeros, cache_shape, dtype)
      cached_value = self.variable("cache", "value", jnp.zeros, cache_shape, dtype)
      index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
      if cache_ready:
        start = index.value
    positions = start + jnp.arange(length)  # [L]
    if cfg.positions == "rotary":
      q, k = apply_rotary(q, positions), apply_rotary(k, positions)

    if decode and cache_ready:
      k = jax.lax.dynamic_update_slice(cached_key.value, k.astype(dtype), (0, 0, start, 0))
      v = jax.lax.dynamic_update_slice(cached_value.value, v.astype(dtype), (0, 0, start, 0))
      cached_key.value, cached_value.value = k, v
      index.value = start + length
    key_positions = jnp.arange(k.shape[2])  # [T]
    mask = key_positions[None, :] <= positions[:, None]  # [L, T]

    logits = jnp.einsum("bnld,bntd->bnlt", q, k).astype(jnp.float32) / math.sqrt(cfg.head_dim)
    logits = jnp.where(mask[None, None], logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(dtype)
    weights = nn.Dropout(cfg.dropout)(weights, deterministic=deterministic)
    out = jnp.einsum("bnlt,bntd->blnd", weights, v).reshape(-1, cfg.d_model)  # [B*L, N*D]
    out = nn.Dense(cfg.d_model, use_bias=cfg.use_bias, dtype=dtype,
                   kernel_init=dense_init(cfg, residual=True), name="out")(out)
    return out.reshape(batch, length, cfg.d_model)


class Mlp(nn.Module):
  """The dense feed-forward sublayer: GELU MLP or SwiGLU. x: [B, L, M] -> [B, L, M]."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    dense = lambda features, name, residual=False: nn.Dense(
        features, use_bias=cfg.use_bias, dtype=compute_dtype(cfg),
        kernel_init=dense_init(cfg, residual), name=name)
    shape = x.shape
    x = x.reshape(-1, shape[-1])  # [B*L, M]: 2-D matmuls are faster on XLA:CPU
    if cfg.activation == "swiglu":
      h = nn.silu(dense(cfg.d_ff, "wi_gate")(x)) * dense(cfg.d_ff, "wi_up")(x)
    else:
      h = nn.gelu(dense(cfg.d_ff, "wi")(x))
    return dense(cfg.d_model, "wo", residual=True)(h).reshape(shape)
