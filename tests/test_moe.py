"""The MoE layer against a per-token loop, hand-computed routings, and routing invariants.

Shape letters as in chimera/moe.py: G groups, S tokens per group, E experts, C capacity,
K choices per token, M model dim, H expert hidden dim.
"""

import functools
import itertools
import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from chimera.config import ModelConfig
from chimera.layers import Mlp
from chimera.moe import MoeLayer, expert_capacity, route

D_MODEL, EXPERT_D_FF, NUM_EXPERTS = 8, 16, 4
BATCH, LENGTH = 2, 8  # one group per sequence: G = 2, S = 8


def naive_routing(router_logits: np.ndarray, k: int, capacity: int | None,
                  priority: str) -> np.ndarray:
  """Walks the assignments one by one in priority order. Returns dispatch [G, S, E, C].

  With capacity=None no expert is ever full; the returned C is then S.
  """
  groups, group_size, num_experts = router_logits.shape
  slots = group_size if capacity is None else capacity
  dispatch = np.zeros((groups, group_size, num_experts, slots), np.float32)
  for g in range(groups):
    ranked = [np.argsort(-router_logits[g, s], kind="stable")[:k] for s in range(group_size)]
    if priority == "token":
      order = [(s, r) for s in range(group_size) for r in range(k)]
    else:
      order = [(s, r) for r in range(k) for s in range(group_size)]
    fill = [0] * num_experts
    for s, r in order:
      e = ranked[s][r]
      if fill[e] < slots:
        dispatch[g, s, e, fill[e]] = 1.0
        fill[e] += 1
  return dispatch


def expert_mlp(params, e: int, x_s: jax.Array, activation: str) -> jax.Array:
  """Expert e on one token x_s: [M] -> [M]."""
  if activation == "swiglu":
    hidden = nn.silu(x_s @ params["wi_gate"][e]) * (x_s @ params["wi_up"][e])
  else:
    hidden = nn.gelu(x_s @ params["wi"][e])
  return hidden @ params["wo"][e]


@functools.partial(jax.vmap, in_axes=(None, 0, 0, None))
def reference_moe(params, x_s: jax.Array, kept_s: jax.Array, activation: str) -> jax.Array:
  """One token: y_s = sum over the experts e that kept it of gate_se * expert_e(x_s).

  Written for one token x_s [M] with its keep decisions kept_s [E] (from `naive_routing`)
  and mapped over tokens; gradients flow through the gates and the expert weights.
  """
  gates = jax.nn.softmax(x_s @ params["router"]["kernel"])  # [E]
  y_s = jnp.zeros_like(x_s)
  for e in range(kept_s.shape[0]):
    y_s = y_s + jnp.where(kept_s[e], gates[e] * expert_mlp(params, e, x_s, activation), 0.0)
  return y_s


@functools.partial(jax.jit, static_argnames="activation")
def reference_value_and_grad(params, tokens, kept, cotangent, activation):
  """y = reference_moe(...) and the gradient of sum(y * cotangent) w.r.t. (params, tokens).

  tokens: [N, M]; kept: [N, E] bool; cotangent: [N, M].
  """
  def loss(params, tokens):
    y = reference_moe(params, tokens, kept, activation)
    return jnp.sum(y * cotangent), y

  (_, y), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, tokens)
  return y, grads


def random_params(shapes, seed: int):
  """Normal weights of the given shapes, scaled by 1/sqrt(fan-in) (axis -2): large enough to
  make the routing and the MLPs nontrivial."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda p: jnp.asarray(rng.normal(size=p.shape) / math.sqrt(p.shape[-2]), jnp.float32),
      shapes)


# (deterministic, capacity the reference uses). "drops": training factor 0.5 gives
# C = ceil(k * 0.5 * 8 / 4) = k, fewer slots than the 2k assignments an expert gets on
# average, so tokens are dropped. "no drops": eval factor 4.0 gives C = 8k >= S.
CAPACITY_CASES = {"drops": (False, lambda k: k), "no_drops": (True, lambda k: None)}
MOE_CASES = ([(k, p, c, "gelu") for k, p, c in itertools.product(
    (1, 2, NUM_EXPERTS), ("token", "rank"), CAPACITY_CASES)]
             + [(2, p, "drops", "swiglu") for p in ("token", "rank")])


@pytest.mark.parametrize("k,priority,capacity_case,activation", MOE_CASES)
def test_moe_layer_matches_per_token_reference(k, priority, capacity_case, activation):
  deterministic, reference_capacity = CAPACITY_CASES[capacity_case]
  cfg = ModelConfig(d_model=D_MODEL, num_experts=NUM_EXPERTS, top_k=k,
                    expert_d_ff=EXPERT_D_FF, group_size=LENGTH, capacity_factor=0.5,
                    eval_capacity_factor=4.0, min_capacity=1, priority=priority,
                    activation=activation, dropout=0.0, router_jitter=0.0)
  layer = MoeLayer(cfg)
  rng = np.random.default_rng(k)
  x = jnp.asarray(rng.normal(size=(BATCH, LENGTH, D_MODEL)), jnp.float32)
  cotangent = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  shapes = jax.eval_shape(functools.partial(layer.init, deterministic=True),
                          jax.random.key(0), x)["params"]
  params = random_params(shapes, seed=k + 100)

  @jax.jit
  def layer_value_and_grad(params, x):
    def loss(params, x):
      y, routing = layer.apply({"params": params}, x, deterministic=deterministic)
      return jnp.sum(y * cotangent), (y, routing)
    (_, aux), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)
    return aux, grads

  (y, routing), grads = layer_value_and_grad(params, x)

  # Groups are consecutive runs of group_size tokens of the flattened batch.
  x_groups = x.reshape(BATCH * LENGTH // cfg.group_size, cfg.group_size, D_MODEL)
  router_logits = np.asarray(x_groups) @ np.asarray(params["router"]["kernel"])
  kept = naive_routing(router_logits, k, reference_capacity(k), priority).sum(-1) > 0
  num_assignments = kept.shape[0] * kept.shape[1] * k
  if capacity_case == "drops":
    assert kept.sum() < num_assignments  # the case exercises dropping
  else:
    assert kept.sum() == num_assignments
  np.testing.assert_allclose(routing.dropped_fraction, 1.0 - kept.sum() / num_assignments,
                             atol=1e-6)

  y_expected, (params_grad, tokens_grad) = reference_value_and_grad(
      params, x.reshape(-1, D_MODEL), kept.reshape(-1, NUM_EXPERTS),
      cotangent.reshape(-1, D_MODEL), activation)
  chex.assert_shape(y, (BATCH, LENGTH, D_MODEL))
  chex.assert_trees_all_close(y, y_expected.reshape(y.shape), atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(grads, (params_grad, tokens_grad.reshape(x.shape)),
                              atol=1e-5, rtol=1e-5)
  # The router is trained by the LM loss through the gates.
  assert np.abs(grads[0]["router"]["kernel"]).max() > 1e-3


jit_route = jax.jit(route, static_argnames=("k", "capacity", "priority", "renormalize"))


def log_probs(probs):
  return np.log(np.asarray(probs, np.float32))


# One group of S=4 tokens, E=3 experts; softmax(log p) = p, so these are the router
# probabilities. Top-2 choices, best first: t0 (e0, e1), t1 (e0, e2), t2 (e1, e0), t3 (e0, e1).
HAND_PROBS = [[[0.5, 0.3, 0.2], [0.5, 0.2, 0.3], [0.3, 0.6, 0.1], [0.4, 0.35, 0.25]]]

# Capacity 2. Token priority walks t0e0 t0e1 t1e0 t1e2 t2e1 t2e0 t3e0 t3e1: e0 is full
# after t1, e1 after t2, so t2e0, t3e0 and t3e1 are dropped.
TOKEN_DISPATCH = [[
    [[1, 0], [1, 0], [0, 0]],
    [[0, 1], [0, 0], [1, 0]],
    [[0, 0], [0, 1], [0, 0]],
    [[0, 0], [0, 0], [0, 0]],
]]
TOKEN_COMBINE = [[
    [[0.5, 0], [0.3, 0], [0, 0]],
    [[0, 0.5], [0, 0], [0.3, 0]],
    [[0, 0], [0, 0.6], [0, 0]],
    [[0, 0], [0, 0], [0, 0]],
]]
# Rank priority walks t0e0 t1e0 t2e1 t3e0 | t0e1 t1e2 t2e0 t3e1: t2's first choice takes
# slot 0 of e1, pushing t0's second choice (an earlier token) to slot 1; t3e0, t2e0 and
# t3e1 are dropped.
RANK_DISPATCH = [[
    [[1, 0], [0, 1], [0, 0]],
    [[0, 1], [0, 0], [1, 0]],
    [[0, 0], [1, 0], [0, 0]],
    [[0, 0], [0, 0], [0, 0]],
]]
RANK_COMBINE = [[
    [[0.5, 0], [0, 0.3], [0, 0]],
    [[0, 0.5], [0, 0], [0.3, 0]],
    [[0, 0], [0.6, 0], [0, 0]],
    [[0, 0], [0, 0], [0, 0]],
]]


@pytest.mark.parametrize("priority,dispatch,combine", [
    ("token", TOKEN_DISPATCH, TOKEN_COMBINE),
    ("rank", RANK_DISPATCH, RANK_COMBINE),
])
def test_route_hand_computed_masks(priority, dispatch, combine):
  routing = jit_route(log_probs(HAND_PROBS), k=2, capacity=2, priority=priority)
  chex.assert_shape(routing.dispatch, (1, 4, 3, 2))
  np.testing.assert_array_equal(routing.dispatch, np.array(dispatch, np.float32))
  np.testing.assert_allclose(routing.combine, np.array(combine, np.float32), atol=1e-6)
  np.testing.assert_allclose(routing.dropped_fraction, 3 / 8, atol=1e-6)
  # Chosen before drops: e0 by t0 t1 t2 t3, e1 by t0 t2 t3, e2 by t1; of 8 assignments.
  np.testing.assert_allclose(routing.expert_load, [4 / 8, 3 / 8, 1 / 8], atol=1e-6)
  np.testing.assert_allclose(routing.router_confidence, (0.5 + 0.5 + 0.6 + 0.4) / 4, atol=1e-6)


@pytest.mark.parametrize("groups,group_size,num_experts,k,capacity,priority", [
    (1, 16, 4, 1, 2, "token"),
    (3, 16, 4, 2, 3, "token"),
    (3, 16, 4, 2, 3, "rank"),
    (2, 12, 3, 3, 5, "token"),
    (2, 12, 3, 3, 5, "rank"),
    (2, 32, 8, 2, 16, "rank"),  # room for everything
])
def test_route_never_exceeds_capacity(groups, group_size, num_experts, k, capacity, priority):
  rng = np.random.default_rng(group_size + k)
  logits = jnp.asarray(rng.normal(size=(groups, group_size, num_experts)), jnp.float32)
  routing = jit_route(logits, k=k, capacity=capacity, priority=priority)
  dispatch = np.asarray(routing.dispatch)
  chex.assert_shape(dispatch, (groups, group_size, num_experts, capacity))

  assert set(np.unique(dispatch)) <= {0.0, 1.0}
  assert (dispatch.sum(axis=1) <= 1).all()  # each slot holds at most one token
  assert (dispatch.sum(axis=3) <= 1).all()  # a token takes at most one slot per expert
  assert (dispatch.sum(axis=(2, 3)) <= k).all()  # and at most k slots in all
  # Each expert fills its slots from 0 up, and takes min(C, tokens that chose it).
  used = dispatch.sum(axis=1)  # [G, E, C]
  assert (np.diff(used, axis=-1) <= 0).all()
  top_k = np.argsort(-np.asarray(logits), axis=-1)[..., :k]  # [G, S, K]
  chosen = (top_k[..., None] == np.arange(num_experts)).sum(axis=(1, 2))  # [G, E]
  np.testing.assert_array_equal(used.sum(-1), np.minimum(chosen, capacity))

  expected = naive_routing(np.asarray(logits), k, capacity, priority)
  np.testing.assert_array_equal(dispatch, expected)
  dropped = groups * group_size * k - expected.sum()
  np.testing.assert_allclose(routing.dropped_fraction, dropped / (groups * group_size * k),
                             atol=1e-6)
  probs = np.exp(logits) / np.exp(logits).sum(axis=-1, keepdims=True)
  np.testing.assert_allclose(routing.combine, dispatch * probs[..., None], atol=1e-6)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_load_balance_loss_is_one_under_uniform_routing(k):
  # Token s's logits are the base vector shifted by s places: over E consecutive tokens each
  # expert is ranked r-th exactly once for every r (f uniform) and takes every probability
  # value once (P uniform).
  num_experts = 4
  base = np.array([1.3, -0.2, 0.7, 0.1], np.float32)
  group = np.stack([np.roll(base, s) for s in range(2 * num_experts)])  # [S=8, E]
  logits = np.stack([group, group[::-1]])  # [G=2, S, E]
  routing = jit_route(logits, k=k, capacity=8, priority="token")
  np.testing.assert_allclose(routing.expert_load, [0.25] * 4, atol=1e-6)
  probs = np.exp(logits) / np.exp(logits).sum(axis=-1, keepdims=True)
  np.testing.assert_allclose(probs.mean(axis=1), np.full((2, 4), 0.25), atol=1e-6)
  np.testing.assert_allclose(routing.load_balance_loss, 1.0, atol=1e-6)


@pytest.mark.parametrize("probs,k,expected", [
    # Both tokens pick e0: f = [1, 0], P = [0.675, 0.325]; 2 * (1 * 0.675) = 1.35.
    ([[[0.75, 0.25], [0.6, 0.4]]], 1, 1.35),
    # HAND_PROBS: f = [4, 3, 1] / 8, P = [1.7, 1.45, 0.85] / 4;
    # 3 * (0.5 * 0.425 + 0.375 * 0.3625 + 0.125 * 0.2125) = 3 * 0.375 = 1.125.
    (HAND_PROBS, 2, 1.125),
])
def test_load_balance_loss_hand_computed(probs, k, expected):
  routing = jit_route(log_probs(probs), k=k, capacity=1, priority="token")
  np.testing.assert_allclose(routing.load_balance_loss, expected, atol=1e-6)


def test_z_loss_hand_computed():
  # logsumexp(a + log p) = a when p sums to 1: token 0 has logsumexp 2, token 1 has 3.
  logits = np.array([[[2.0 + math.log(0.5), 2.0 + math.log(0.5)],
                       [3.0 + math.log(0.25), 3.0 + math.log(0.75)]]])
  routing = jit_route(logits, k=1, capacity=2)
  np.testing.assert_allclose(routing.z_loss, (2.0**2 + 3.0**2) / 2, rtol=1e-6)  # 6.5


def test_expert_capacity():
  assert expert_capacity(8, 4, 2, 1.25, min_capacity=1) == 5  # ceil(2 * 1.25 * 8 / 4)
  assert expert_capacity(10, 4, 1, 1.0, min_capacity=1) == 3  # ceil(2.5)
  assert expert_capacity(8, 4, 1, 0.5, min_capacity=4) == 4  # the floor wins over 1


def test_route_rejects_bad_k():
  with pytest.raises(ValueError, match="k=3"):
    route(jnp.zeros((1, 4, 2)), k=3, capacity=2)


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_single_expert_equals_dense_mlp(activation):
  # E=1, k=1: the gate is softmax over one expert, 1.0; min_capacity=S leaves room for all.
  cfg = ModelConfig(d_model=D_MODEL, num_experts=1, top_k=1, d_ff=EXPERT_D_FF,
                    expert_d_ff=EXPERT_D_FF, group_size=LENGTH, min_capacity=LENGTH,
                    activation=activation, use_bias=False)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(BATCH, LENGTH, D_MODEL)), jnp.float32)
  shapes = jax.eval_shape(functools.partial(MoeLayer(cfg).init, deterministic=True),
                          jax.random.key(0), x)["params"]
  moe_params = random_params(shapes, seed=2)
  y_moe, routing = jax.jit(functools.partial(MoeLayer(cfg).apply, deterministic=True))(
      {"params": moe_params}, x)

  matrices = ("wi_gate", "wi_up", "wo") if activation == "swiglu" else ("wi", "wo")
  mlp_params = {name: {"kernel": moe_params[name][0]} for name in matrices}
  chex.assert_trees_all_equal_shapes(
      mlp_params, jax.eval_shape(Mlp(cfg).init, jax.random.key(0), x)["params"])
  y_mlp = jax.jit(Mlp(cfg).apply)({"params": mlp_params}, x)

  assert float(routing.dropped_fraction) == 0.0
  chex.assert_trees_all_close(y_moe, y_mlp, atol=1e-5, rtol=1e-5)


def test_moe_init_scales_by_fan_in():
  # Truncated-normal variance scaling: std = sqrt(expert_init_scale / fan_in), where the
  # fan-in of the router [M, E] and of wi [E, M, H] is M, and of wo [E, H, M] is H.
  d_model, hidden = 128, 256
  cfg = ModelConfig(d_model=d_model, num_experts=8, expert_d_ff=hidden, group_size=16,
                    expert_init_scale=0.1)
  x = jnp.ones((1, 16, d_model))
  params = jax.jit(functools.partial(MoeLayer(cfg).init, deterministic=True))(
      jax.random.key(0), x)["params"]
  expected_std = {"router": math.sqrt(0.1 / d_model), "wi": math.sqrt(0.1 / d_model),
                  "wo": math.sqrt(0.1 / hidden)}
  for name, std in expected_std.items():
    weights = params[name]["kernel"] if name == "router" else params[name]
    np.testing.assert_allclose(np.std(weights), std, rtol=0.1, err_msg=name)
