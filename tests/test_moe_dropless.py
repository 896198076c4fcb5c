"""The dropless MoE path (`dispatch="dropless"`): against the einsum path when that drops
nothing, against a per-token reference when it does, and inside a training step.

Shape letters as in chimera/moe.py: T tokens, K choices per token, E experts, M model dim,
H expert hidden dim.
"""

import dataclasses
import functools
import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from chimera.config import ModelConfig, validate_model
from chimera.decoder import Decoder
from chimera.errors import ChimeraError
from chimera.moe import MoeLayer, dropless_experts

# The per-token reference: y_s = sum over the experts e kept for s of gate_se * expert_e(x_s).
from test_moe import reference_moe

D_MODEL, EXPERT_D_FF, NUM_EXPERTS = 8, 16, 4
BATCH, LENGTH = 2, 8  # one group per sequence: G = 2, S = 8


def moe_config(k: int, activation: str = "gelu", **changes) -> ModelConfig:
  """min_capacity = S: every expert can take its whole group, so the einsum path drops
  nothing unless `changes` lowers it."""
  cfg = ModelConfig(d_model=D_MODEL, num_experts=NUM_EXPERTS, top_k=k,
                    expert_d_ff=EXPERT_D_FF, group_size=LENGTH, min_capacity=LENGTH,
                    activation=activation, dropout=0.0, router_jitter=0.0)
  return dataclasses.replace(cfg, **changes)


def random_params(cfg: ModelConfig, x: jax.Array, seed: int):
  """Normal weights scaled by 1/sqrt(fan-in) (axis -2): large enough that the routing
  is uneven and the MLPs nonlinear."""
  shapes = jax.eval_shape(functools.partial(MoeLayer(cfg).init, deterministic=True),
                          jax.random.key(0), x)["params"]
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda p: jnp.asarray(rng.normal(size=p.shape) / math.sqrt(p.shape[-2]), jnp.float32),
      shapes)


def random_inputs(seed: int) -> tuple[jax.Array, jax.Array]:
  """x and a cotangent for it, both [B, L, M]."""
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(BATCH, LENGTH, D_MODEL)), jnp.float32)
  return x, jnp.asarray(rng.normal(size=x.shape), jnp.float32)


def layer_value_and_grad(cfg: ModelConfig, deterministic: bool):
  """(params, x, cotangent) -> ((y, routing), (d params, d x)) of
  sum(y * cotangent) + load_balance_loss + z_loss, so the auxiliary losses' gradients
  are compared too."""
  layer = MoeLayer(cfg)

  @jax.jit
  def value_and_grad(params, x, cotangent):
    def loss(params, x):
      y, routing = layer.apply({"params": params}, x, deterministic=deterministic)
      return jnp.sum(y * cotangent) + routing.load_balance_loss + routing.z_loss, (y, routing)
    (_, aux), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)
    return aux, grads

  return value_and_grad


EQUIVALENCE_CASES = [
    (k, activation, deterministic, False)
    for k in (1, 2, NUM_EXPERTS) for activation in ("gelu", "swiglu")
    for deterministic in (False, True)
] + [(2, "gelu", False, True)]  # renormalized gates


@pytest.mark.parametrize("k,activation,deterministic,renormalize", EQUIVALENCE_CASES)
def test_dropless_matches_einsum_when_nothing_is_dropped(k, activation, deterministic,
                                                         renormalize):
  einsum_cfg = moe_config(k, activation, renormalize_gates=renormalize)
  dropless_cfg = dataclasses.replace(einsum_cfg, dispatch="dropless")
  x, cotangent = random_inputs(seed=k)
  params = random_params(einsum_cfg, x, seed=k + 100)

  (y_einsum, einsum_routing), einsum_grads = layer_value_and_grad(einsum_cfg, deterministic)(
      params, x, cotangent)
  (y_dropless, dropless_routing), dropless_grads = layer_value_and_grad(
      dropless_cfg, deterministic)(params, x, cotangent)

  assert float(einsum_routing.dropped_fraction) == 0.0  # the premise of the comparison
  assert float(dropless_routing.dropped_fraction) == 0.0
  assert dropless_routing.dispatch is None and dropless_routing.combine is None
  chex.assert_shape(y_dropless, (BATCH, LENGTH, D_MODEL))
  chex.assert_trees_all_close(y_dropless, y_einsum, atol=1e-5, rtol=1e-5)
  for field in ("load_balance_loss", "z_loss", "expert_load", "max_violation",
                "router_entropy", "router_confidence", "gate", "expert_index"):
    chex.assert_trees_all_close(getattr(dropless_routing, field),
                                getattr(einsum_routing, field), atol=1e-6, rtol=1e-6)
  # Every parameter (router, wi or wi_gate/wi_up, wo) and x.
  chex.assert_trees_all_equal_structs(dropless_grads, einsum_grads)
  chex.assert_trees_all_close(dropless_grads, einsum_grads, atol=1e-5, rtol=1e-5)
  # Nontrivial: the routing is uneven and every weight gets a gradient.
  assert float(jnp.max(einsum_routing.expert_load)) > 1 / NUM_EXPERTS or k == NUM_EXPERTS
  for name, grad in jax.tree_util.tree_leaves_with_path(dropless_grads[0]):
    assert float(jnp.abs(grad).max()) > 1e-3, name


@pytest.mark.parametrize("k,activation", [(1, "gelu"), (2, "gelu"), (2, "swiglu")])
def test_dropless_drops_nothing_where_einsum_does(k, activation):
  # Training capacity factor 0.5 gives C = max(1, ceil(k * 0.5 * 8 / 4)) = k slots per
  # expert, fewer than the 2k assignments an expert gets on average.
  einsum_cfg = moe_config(k, activation, capacity_factor=0.5, min_capacity=1)
  dropless_cfg = dataclasses.replace(einsum_cfg, dispatch="dropless")
  x, cotangent = random_inputs(seed=k + 10)
  params = random_params(einsum_cfg, x, seed=k + 200)

  (_, einsum_routing), _ = layer_value_and_grad(einsum_cfg, False)(params, x, cotangent)
  assert float(einsum_routing.dropped_fraction) > 0.1

  layer = MoeLayer(dropless_cfg)

  @jax.jit
  def dropless_value_and_grad(params, x):
    def loss(params, x):
      y, routing = layer.apply({"params": params}, x, deterministic=False)
      return jnp.sum(y * cotangent), (y, routing)
    (_, aux), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)
    return aux, grads

  for x_case in (x, -x):  # two different routings
    (y, routing), (params_grad, x_grad) = dropless_value_and_grad(params, x_case)
    assert float(routing.dropped_fraction) == 0.0

    tokens = np.asarray(x_case).reshape(-1, D_MODEL)
    router_logits = tokens @ np.asarray(params["router"]["kernel"])  # [T, E]
    top_k = np.argsort(-router_logits, axis=-1, kind="stable")[:, :k]  # [T, K]
    chosen = (top_k[..., None] == np.arange(NUM_EXPERTS)).any(axis=1)  # [T, E]
    assert chosen.sum() == BATCH * LENGTH * k

    def reference_loss(params, tokens):
      y = reference_moe(params, tokens, chosen, chosen, activation,
                        dropless_cfg.renormalize_gates)
      return jnp.sum(y * cotangent.reshape(-1, D_MODEL)), y

    (_, y_expected), (params_expected, tokens_expected) = jax.value_and_grad(
        reference_loss, argnums=(0, 1), has_aux=True)(params, jnp.asarray(tokens))
    chex.assert_trees_all_close(y, y_expected.reshape(y.shape), atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close((params_grad, x_grad),
                                (params_expected, tokens_expected.reshape(x.shape)),
                                atol=1e-5, rtol=1e-5)


def test_dropless_experts_with_an_unused_expert():
  # T=5 tokens, K=2, E=3; expert 1 is never chosen: group sizes [5, 0, 5].
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(5, D_MODEL)), jnp.float32)
  expert_index = jnp.array([[0, 2], [2, 0], [0, 2], [2, 0], [0, 2]], jnp.int32)
  gate = jnp.array([[0.6, 0.3], [0.5, 0.4], [0.7, 0.2], [0.9, 0.1], [0.5, 0.5]])
  weights = {"wi": jnp.asarray(rng.normal(size=(3, D_MODEL, EXPERT_D_FF)), jnp.float32),
             "wo": jnp.asarray(rng.normal(size=(3, EXPERT_D_FF, D_MODEL)), jnp.float32)}
  y = jax.jit(dropless_experts, static_argnums=4)(x, gate, expert_index, weights, "gelu")
  expected = np.zeros((5, D_MODEL), np.float32)
  for t in range(5):
    for r in range(2):
      e = int(expert_index[t, r])
      expected[t] += gate[t, r] * (nn.gelu(x[t] @ weights["wi"][e]) @ weights["wo"][e])
  chex.assert_shape(y, (5, D_MODEL))
  chex.assert_trees_all_close(y, expected, atol=1e-5, rtol=1e-5)

  # skip_experts: each expert is the identity, so y_t = (sum_r gate_tr) * x_t. The block
  # layout still runs (its row moves are dispatch, which the bench times this way).
  y_skipped = dropless_experts(x, gate, expert_index, weights, "gelu", skip_experts=True)
  chex.assert_trees_all_close(y_skipped, gate.sum(-1, keepdims=True) * x, atol=1e-6)
  jaxpr = jax.make_jaxpr(functools.partial(dropless_experts, activation="gelu",
                                           skip_experts=True, block_size=4))(
      x, gate, expert_index, weights)
  shapes = {v.aval.shape for eqn in jaxpr.eqns for v in eqn.outvars}
  assert any(len(shape) == 3 and shape[1:] == (4, D_MODEL) for shape in shapes), shapes


def test_skip_experts_leaves_out_the_shared_experts_too():
  """The bench's routing-only layer charges no expert matmul, shared ones included."""
  cfg = ModelConfig(vocab_size=11, num_layers=1, num_heads=2, d_model=D_MODEL, d_ff=32,
                    max_len=16, num_experts=NUM_EXPERTS, top_k=2, expert_d_ff=EXPERT_D_FF,
                    group_size=8, dispatch="dropless", num_shared_experts=1)
  x = jax.random.normal(jax.random.key(1), (2, 8, D_MODEL))
  def flops(c):
    layer = MoeLayer(c, skip_experts=True)
    params = layer.init(jax.random.key(0), x, deterministic=True)
    fn = jax.jit(lambda p: layer.apply(p, x, deterministic=True)[0].sum())
    return fn.lower(params).compile().cost_analysis()["flops"]
  assert flops(cfg) == flops(dataclasses.replace(cfg, num_shared_experts=0))


def test_decoder_with_dropless_matches_einsum_without_drops_and_trains():
  cfg = ModelConfig(vocab_size=11, num_layers=2, num_heads=2, d_model=D_MODEL, d_ff=32,
                    max_len=16, num_experts=NUM_EXPERTS, top_k=2, expert_d_ff=EXPERT_D_FF,
                    group_size=8, dispatch="dropless", dropout=0.0)
  # The einsum path with room for every assignment (C = group_size) drops nothing either.
  einsum_cfg = dataclasses.replace(cfg, dispatch="einsum", min_capacity=8)
  for c in (cfg, einsum_cfg):
    validate_model(c)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 11, size=(2, 9)), jnp.int32)
  params = Decoder(cfg).init(jax.random.key(0), tokens[:, :-1])["params"]

  def loss_and_grads(cfg):
    model = Decoder(cfg)

    @jax.jit
    def run(params):
      def loss(params):
        logits, stats = model.apply({"params": params}, tokens[:, :-1], deterministic=False,
                                    rngs={"dropout": jax.random.key(1)})
        lm_loss = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
        return (lm_loss + cfg.load_balance_coef * stats["load_balance_loss"]
                + cfg.z_loss_coef * stats["z_loss"]), stats
      return jax.value_and_grad(loss, has_aux=True)(params)
    return run

  dropless, einsum = loss_and_grads(cfg), loss_and_grads(einsum_cfg)
  (loss, stats), grads = dropless(params)
  (einsum_loss, einsum_stats), einsum_grads = einsum(params)
  chex.assert_shape(stats["dropped_fraction"], (cfg.num_moe_layers,))
  np.testing.assert_array_equal(einsum_stats["dropped_fraction"], 0.0)
  np.testing.assert_allclose(float(loss), float(einsum_loss), rtol=1e-5)
  for name in ("load_balance_loss", "z_loss", "expert_load", "router_entropy"):
    chex.assert_trees_all_close(stats[name], einsum_stats[name], atol=1e-6, rtol=1e-5)
  chex.assert_trees_all_close(grads, einsum_grads, atol=1e-5, rtol=1e-4)
  for layer in range(cfg.num_layers):
    moe_grads = grads[f"block_{layer}"]["moe"]
    for name in ("router", "wi", "wo"):
      assert float(jnp.abs(jax.tree_util.tree_leaves(moe_grads[name])[0]).max()) > 0, name

  # Twenty Adam steps on this batch lower its loss.
  optimizer = optax.adam(1e-2)
  opt_state = optimizer.init(params)
  for _ in range(20):
    (_, _), grads = dropless(params)
    updates, opt_state = optimizer.update(grads, opt_state)
    params = optax.apply_updates(params, updates)
  (trained_loss, _), _ = dropless(params)
  assert float(trained_loss) < float(loss) - 0.1


def test_validation_rejects_unknown_dispatch():
  with pytest.raises(ChimeraError,
                     match="config.model.dispatch: expected one of 'einsum', 'dropless', "
                           "got 'foo'"):
    validate_model(ModelConfig(num_experts=4, dispatch="foo"))
  validate_model(ModelConfig(num_experts=4, dispatch="dropless"))
