"""The decoder: causality (and how rank priority breaks it), no retracing, KV-cache decoding,
full-size shapes through eval_shape, and rotary positions.

Shape letters as in chimera/decoder.py: B batch, L length, V vocab, M model dim.
"""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from chimera.accounting import count
from chimera.config import ModelConfig
from chimera.decoder import Decoder, collect_moe_stats
from chimera.layers import apply_rotary
from chimera.routers import ROUTERS, is_causal

VOCAB, LENGTH, BATCH = 11, 8, 2

DENSE = ModelConfig(vocab_size=VOCAB, num_layers=2, num_heads=2, d_model=16, d_ff=32,
                    max_len=16)
# group_size = L, so a routing group holds a whole sequence, future tokens included. The
# eval capacity max(1, ceil(2 * 0.5 * 8 / 4)) = 2 slots per expert, for 16 assignments,
# forces drops.
MOE = dataclasses.replace(DENSE, num_experts=4, top_k=2, expert_d_ff=16, group_size=LENGTH,
                          eval_capacity_factor=0.5, min_capacity=1)


@functools.cache
def init_params(cfg: ModelConfig):
  """Decoder params, shared by the tests (and priorities) that need the same shapes."""
  tokens = jnp.zeros((BATCH, LENGTH), jnp.int32)
  return jax.jit(Decoder(cfg).init)(jax.random.key(0), tokens)["params"]


def random_tokens(seed: int, shape=(BATCH, LENGTH)) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, VOCAB, shape).astype(np.int32)


def future_leaks(cfg: ModelConfig, seed: int) -> tuple[float, float, jax.Array]:
  """Changes token t+1 of a sequence to every other value, for every t.

  Returns the largest change of the logits at positions <= t, the smallest change at the
  edited position t+1 (to show every edit matters), and the forward's dropped_fraction [Y].
  """
  base = random_tokens(seed, (LENGTH,))
  variants, edited = [], []
  for t in range(LENGTH - 1):
    for delta in range(1, VOCAB):
      tokens = base.copy()
      tokens[t + 1] = (tokens[t + 1] + delta) % VOCAB
      variants.append(tokens)
      edited.append(t + 1)
  # Every row is its own routing group (group_size = L), so rows do not interact.
  tokens = jnp.asarray(np.stack([base] + variants))  # [1 + 7 * 10, L]
  forward = jax.jit(functools.partial(Decoder(cfg).apply, deterministic=True))
  params = init_params(dataclasses.replace(cfg, priority="token"))  # same for both priorities
  logits, stats = forward({"params": params}, tokens)
  change = np.abs(np.asarray(logits[1:] - logits[:1])).max(axis=-1)  # [N, L]
  past = max(change[i, :position].max() for i, position in enumerate(edited))
  present = min(change[i, position] for i, position in enumerate(edited))
  return past, present, stats["dropped_fraction"]


@pytest.mark.parametrize("name,cfg,leaks", [
    ("dense", DENSE, False),
    ("moe_token_priority", dataclasses.replace(MOE, priority="token"), False),
    # Under rank priority a later token's first choice can take the slot of an earlier
    # token's second choice, so the earlier token's output depends on the future.
    ("moe_rank_priority", dataclasses.replace(MOE, priority="rank"), True),
])
def test_decoder_causality(name, cfg, leaks):
  assert_causality(name, cfg, leaks)


@pytest.mark.parametrize("priority", ["token", "rank"])
@pytest.mark.parametrize("router", sorted(set(ROUTERS) - {MOE.router}))
def test_every_router_is_as_causal_in_the_decoder_as_it_claims(router, priority):
  """The other registered routers, through the whole model: leaks exactly when their
  causality flag (chimera.routers.is_causal) says they do."""
  cfg = dataclasses.replace(MOE, router=router, priority=priority)
  assert_causality(f"{router}, {priority} priority", cfg, not is_causal(cfg))


def assert_causality(name: str, cfg: ModelConfig, leaks: bool):
  past, present, dropped_fraction = future_leaks(cfg, seed=0)
  if cfg.num_experts:
    assert (np.asarray(dropped_fraction) > 0).all(), "the case must drop tokens"
  assert present > 1e-4  # the edits do reach the logits at the edited position
  if leaks:
    assert past > 1e-3, f"{name}: expected future tokens to leak into past logits"
  else:
    assert past <= 1e-6, f"{name}: a change at t+1 moved the logits at <= t by {past}"


def test_jitted_forward_does_not_retrace():
  chex.clear_trace_counter()
  model = Decoder(MOE)
  params = init_params(MOE)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def forward(params, tokens):
    return model.apply({"params": params}, tokens, deterministic=True)

  for seed in range(3):
    logits, stats = forward(params, jnp.asarray(random_tokens(seed)))
  chex.assert_shape(logits, (BATCH, LENGTH, VOCAB))
  chex.assert_shape(stats["expert_load"], (MOE.num_layers, MOE.num_experts))
  chex.assert_tree_all_finite(logits)
  # A new shape does retrace, and the counter catches it.
  with pytest.raises(AssertionError):
    forward(params, jnp.asarray(random_tokens(0, (BATCH, LENGTH // 2))))


@pytest.mark.parametrize("name,cfg", [
    ("dense_rotary_rmsnorm", dataclasses.replace(DENSE, positions="rotary", norm="rmsnorm")),
    # decode gives every expert S slots; eval capacity 8 * 2 * 4 / 4 = 16 >= S: no drops.
    ("moe_learned_swiglu", dataclasses.replace(MOE, activation="swiglu",
                                               eval_capacity_factor=4.0)),
    # The shipped configs' path: no capacity in the full forward either, the prefill's
    # tokens through the grouped FFN and each later one through decode_experts.
    ("moe_dropless", dataclasses.replace(MOE, dispatch="dropless")),
] + [(f"moe_{router}", dataclasses.replace(MOE, router=router, eval_capacity_factor=4.0))
     for router in sorted(set(ROUTERS) - {MOE.router})])
def test_cached_decoding_matches_full_forward(name, cfg):
  model = Decoder(cfg)
  params = init_params(cfg)
  tokens = jnp.asarray(random_tokens(1))
  full_logits, _ = jax.jit(functools.partial(model.apply, deterministic=True))(
      {"params": params}, tokens)

  # The cache starts as zeros (empty keys and values, position 0).
  cache_shapes = jax.eval_shape(functools.partial(model.init, decode=True), jax.random.key(0),
                                jnp.zeros((BATCH, cfg.max_len), jnp.int32))["cache"]
  cache = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, x.dtype), cache_shapes)

  @jax.jit
  def step(cache, chunk):
    (logits, _), variables = model.apply({"params": params, "cache": cache}, chunk,
                                         decode=True, mutable=["cache"])
    return logits, variables["cache"]

  prompt = 3
  logits, cache = step(cache, tokens[:, :prompt])
  decoded = [logits]
  for position in range(prompt, LENGTH):
    logits, cache = step(cache, tokens[:, position:position + 1])
    decoded.append(logits)
  chex.assert_trees_all_close(jnp.concatenate(decoded, axis=1), full_logits,
                              atol=1e-5, rtol=1e-5)


def test_full_size_shapes_with_eval_shape():
  cfg = ModelConfig(vocab_size=50304, num_layers=12, num_heads=12, d_model=768, d_ff=3072,
                    max_len=1024, num_experts=8, top_k=2, expert_d_ff=3072, moe_every=2,
                    group_size=256)
  model = Decoder(cfg)
  tokens = jax.ShapeDtypeStruct((2, 512), jnp.int32)
  params = jax.eval_shape(model.init, jax.random.key(0), tokens)["params"]
  chex.assert_shape(params["embed"]["embedding"], (50304, 768))
  chex.assert_shape(params["pos_embed"], (1024, 768))
  chex.assert_shape(params["block_0"]["attn"]["qkv"]["kernel"], (768, 3 * 12 * 64))
  chex.assert_shape(params["block_0"]["attn"]["out"]["kernel"], (12 * 64, 768))
  assert set(params["block_0"]) == {"norm_attn", "attn", "norm_ffn", "moe"}
  assert set(params["block_1"]) == {"norm_attn", "attn", "norm_ffn", "mlp"}
  chex.assert_shape(params["block_1"]["mlp"]["wi"]["kernel"], (768, 3072))
  chex.assert_shape(params["block_1"]["mlp"]["wo"]["kernel"], (3072, 768))
  chex.assert_shape(params["block_0"]["moe"]["router"]["kernel"], (768, 8))
  chex.assert_shape(params["block_0"]["moe"]["wi"], (8, 768, 3072))
  chex.assert_shape(params["block_0"]["moe"]["wo"], (8, 3072, 768))
  total = sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(params))
  assert total == count(cfg, context=1024).params_total

  (logits, stats) = jax.eval_shape(
      functools.partial(model.apply, deterministic=True), {"params": params}, tokens)
  chex.assert_shape(logits, (2, 512, 50304))
  assert logits.dtype == jnp.float32
  # In bf16 the logits stay bf16: the loss upcasts inside its reductions (layers.cross_entropy).
  bf16_model = Decoder(dataclasses.replace(cfg, dtype="bfloat16"))
  bf16_logits, _ = jax.eval_shape(functools.partial(bf16_model.apply, deterministic=True),
                                  {"params": params}, tokens)
  assert bf16_logits.dtype == jnp.bfloat16
  chex.assert_shape(stats["expert_load"], (6, 8))  # MoE in blocks 0, 2, ..., 10
  chex.assert_shape(stats["dropped_fraction"], (6,))


def test_rotary_scores_depend_only_on_relative_position():
  head_dim, length = 8, 12
  rng = np.random.default_rng(0)
  q0, k0 = rng.normal(size=(2, head_dim)).astype(np.float32)
  positions = jnp.arange(length)
  # The same query and key vector at every position: [B=1, N=1, L, D].
  q = apply_rotary(jnp.broadcast_to(q0, (1, 1, length, head_dim)), positions)
  k = apply_rotary(jnp.broadcast_to(k0, (1, 1, length, head_dim)), positions)
  scores = np.asarray(jnp.einsum("bnld,bntd->lt", q, k))  # [L, L]
  # Constant along every diagonal: score(i, j) = score(i + 1, j + 1).
  np.testing.assert_allclose(scores[1:, 1:], scores[:-1, :-1], atol=1e-5)
  # ...but not constant across diagonals: the score does depend on i - j.
  assert np.abs(scores[5, 0] - scores[5, 3]) > 1e-2
  # Position 0 is not rotated, and rotations keep the norm.
  np.testing.assert_allclose(q[0, 0, 0], q0, atol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(q, axis=-1), np.linalg.norm(q0), rtol=1e-5)


def test_rotary_by_hand():
  """RoFormer's frequencies 10000^(-2i/D): for D = 4, pairs (0, 2) and (1, 3) turn by p and
  p / 100 radians at position p."""
  x = jnp.array([1.0, 2.0, 3.0, 4.0])
  slow, fast = 3 / 100, 3.0  # position 3
  expected = [1 * np.cos(fast) - 3 * np.sin(fast), 2 * np.cos(slow) - 4 * np.sin(slow),
              3 * np.cos(fast) + 1 * np.sin(fast), 4 * np.cos(slow) + 2 * np.sin(slow)]
  np.testing.assert_allclose(apply_rotary(x, jnp.array(3)), expected, rtol=1e-6, atol=1e-6)


def _norm(kind: str, x: np.ndarray, params, eps: float = 1e-6) -> np.ndarray:
  """LayerNorm (no bias) or RMSNorm, float64."""
  if kind == "layernorm":
    x = x - x.mean(-1, keepdims=True)
  return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps) * np.asarray(params["scale"], np.float64)


def _gelu(x: np.ndarray) -> np.ndarray:  # tanh approximation, as flax's nn.gelu
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_the_decoder_against_a_float64_reference(norm):
  """The whole dense forward, written out in numpy: embeddings plus positions, each block
  x += attention(norm(x)), x += mlp(norm(x)), then the final norm and the tied head. The
  weights are scaled and the norm scales moved off 1, so that no norm is an identity."""
  from test_layers import reference_attention
  cfg = ModelConfig(vocab_size=13, num_layers=2, num_heads=2, d_model=16, d_ff=32, max_len=16,
                    norm=norm)
  tokens = np.random.default_rng(0).integers(0, 13, (2, 7)).astype(np.int32)
  params = Decoder(cfg).init(jax.random.key(0), tokens)["params"]
  rng = np.random.default_rng(1)
  params = jax.tree.map(lambda p: p * 5.0 if p.ndim == 2 else p + 0.5 * rng.normal(size=p.shape),
                        params)
  logits, _ = Decoder(cfg).apply({"params": params}, tokens)
  f64 = lambda a: np.asarray(a, np.float64)
  embed = f64(params["embed"]["embedding"])
  x = embed[tokens] + f64(params["pos_embed"])[:7]
  for i in range(cfg.num_layers):
    block = params[f"block_{i}"]
    x = x + reference_attention(block["attn"], _norm(norm, x, block["norm_attn"]), cfg.num_heads)
    h = _norm(norm, x, block["norm_ffn"])
    x = x + _gelu(h @ f64(block["mlp"]["wi"]["kernel"])) @ f64(block["mlp"]["wo"]["kernel"])
  expected = _norm(norm, x, params["norm_final"]) @ embed.T
  np.testing.assert_allclose(np.asarray(logits), expected, rtol=1e-4,
                             atol=1e-4 * np.abs(expected).max())


def test_dropout_of_one_drops_every_path():
  """At dropout 1.0 the embedding, every residual branch and so the logits are zero: the
  biases (set to 1) would show any path that skips its dropout."""
  cfg = ModelConfig(vocab_size=13, num_layers=2, num_heads=2, d_model=16, d_ff=32, max_len=16,
                    dropout=1.0, use_bias=True)
  tokens = np.arange(14).reshape(2, 7) % 13
  params = Decoder(cfg).init(jax.random.key(0), tokens)["params"]
  params = jax.tree_util.tree_map_with_path(
      lambda path, p: (jnp.ones_like(p) if path[-1].key == "bias" and path[0].key != "norm_final"
                       else p), params)
  logits, _ = Decoder(cfg).apply({"params": params}, tokens, deterministic=False,
                                 rngs={"dropout": jax.random.key(1)})
  np.testing.assert_array_equal(np.asarray(logits), 0.0)


def test_the_moe_losses_are_means_over_layers():
  """So that load_balance_coef and z_loss_coef do not grow with the number of MoE layers."""
  import types
  routing = lambda balance, z: types.SimpleNamespace(
      load_balance_loss=jnp.float32(balance), z_loss=jnp.float32(z),
      dropped_fraction=jnp.float32(0), expert_load=jnp.zeros(4), max_violation=jnp.float32(0),
      router_entropy=jnp.float32(0), router_confidence=jnp.float32(0))
  stats = collect_moe_stats([routing(1.0, 0.5), routing(3.0, 1.5)], 4)
  assert float(stats["load_balance_loss"]) == 2.0 and float(stats["z_loss"]) == 1.0
  assert stats["expert_load"].shape == (2, 4)


def test_residual_projections_are_scaled_by_depth():
  """GPT-2's init: normal(0.02), the projections into the residual stream (attention's out,
  the MLP's wo) by 1/sqrt(2 * layers): 0.02 / 4 at 8 layers."""
  cfg = ModelConfig(vocab_size=11, num_layers=8, num_heads=4, d_model=128, d_ff=512, max_len=8)
  block = jax.jit(Decoder(cfg).init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))[
      "params"]["block_0"]
  np.testing.assert_allclose(np.std(block["mlp"]["wo"]["kernel"]), 0.005, rtol=0.1)
  np.testing.assert_allclose(np.std(block["attn"]["out"]["kernel"]), 0.005, rtol=0.1)
  np.testing.assert_allclose(np.std(block["mlp"]["wi"]["kernel"]), 0.02, rtol=0.1)
