"""The MoE layer against a per-token loop, hand-computed routings, and routing invariants.

Shape letters as in chimera/moe.py: G groups, S tokens per group, E experts, C capacity,
K choices per token, M model dim, H expert hidden dim.
"""

import dataclasses
import functools
import itertools
import math

import chex
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from chimera.config import ModelConfig
from chimera.layers import Mlp
from chimera.moe import MoeLayer, _multiply_sum, decode_experts, expert_capacity, route
from chimera.routers import ROUTERS

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


def per_token_output(weights, x: np.ndarray, gate: np.ndarray, expert_index: np.ndarray,
                     activation: str = "gelu") -> np.ndarray:
  """y_t = sum_r gate[t, r] * expert_{expert_index[t, r]}(x_t), one token at a time."""
  y = np.zeros_like(x)
  for t in range(x.shape[0]):
    for r in range(expert_index.shape[1]):
      y[t] += gate[t, r] * np.asarray(expert_mlp(weights, int(expert_index[t, r]), x[t],
                                                 activation))
  return y


def reference_gates(probs: jax.Array, chosen: jax.Array, renormalize: bool) -> jax.Array:
  """The gate of every expert for one token: probs [E] (softmax), chosen [E] its top k.

  Renormalised: p_e / sum of the chosen p. Otherwise p_e.
  """
  if renormalize:
    return probs / jnp.sum(jnp.where(chosen, probs, 0.0))
  return probs


@functools.partial(jax.vmap, in_axes=(None, 0, 0, 0, None, None))
def reference_moe(params, x_s: jax.Array, chosen_s: jax.Array, kept_s: jax.Array,
                  activation: str, renormalize: bool) -> jax.Array:
  """One token: y_s = sum over the experts e that kept it of gate_se * expert_e(x_s).

  Written for one token x_s [M] with its choices chosen_s [E] and keep decisions kept_s
  [E] (from `naive_routing`) and mapped over tokens; gradients flow through the gates and
  the expert weights.
  """
  probs = jax.nn.softmax(x_s @ params["router"]["kernel"])  # [E]
  gates = reference_gates(probs, chosen_s, renormalize)
  y_s = jnp.zeros_like(x_s)
  for e in range(kept_s.shape[0]):
    y_s = y_s + jnp.where(kept_s[e], gates[e] * expert_mlp(params, e, x_s, activation), 0.0)
  return y_s


@functools.partial(jax.jit, static_argnames=("activation", "renormalize"))
def reference_value_and_grad(params, tokens, chosen, kept, cotangent, activation,
                             renormalize):
  """y = reference_moe(...) and the gradient of sum(y * cotangent) w.r.t. (params, tokens).

  tokens: [N, M]; chosen, kept: [N, E] bool; cotangent: [N, M].
  """
  def loss(params, tokens):
    y = reference_moe(params, tokens, chosen, kept, activation, renormalize)
    return jnp.sum(y * cotangent), y

  (_, y), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, tokens)
  return y, grads


def top_k_mask(router_logits: np.ndarray, k: int) -> np.ndarray:
  """[..., E] -> [..., E] bool, True at each token's k best experts (ties: lower index)."""
  top = np.argsort(-router_logits, axis=-1, kind="stable")[..., :k]
  return (top[..., None] == np.arange(router_logits.shape[-1])).any(axis=-2)


def random_params(shapes, seed: int):
  """Normal weights of the given shapes, scaled by 1/sqrt(fan-in) (axis -2): large enough to
  make the routing and the MLPs nontrivial."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda p: jnp.asarray(rng.normal(size=p.shape) / math.sqrt(p.shape[-2]), jnp.float32),
      shapes)


# (deterministic, capacity the reference uses). "drops": training factor 0.5 gives
# C = ceil(k * 0.5 * 8 / 4) = k, fewer slots than the 2k assignments an expert gets on
# average, so tokens are dropped. "no drops": eval factor 4.0 gives C = min(S, 8k) = S.
CAPACITY_CASES = {"drops": (False, lambda k: k), "no_drops": (True, lambda k: None)}
# renormalize None: the config's default (on for k >= 2).
MOE_CASES = ([(k, p, c, "gelu", None) for k, p, c in itertools.product(
    (1, 2, NUM_EXPERTS), ("token", "rank"), CAPACITY_CASES)]
             + [(2, p, "drops", "swiglu", None) for p in ("token", "rank")]
             + [(2, "token", "drops", "gelu", False)])


@pytest.mark.parametrize("k,priority,capacity_case,activation,renormalize", MOE_CASES)
def test_moe_layer_matches_per_token_reference(k, priority, capacity_case, activation,
                                               renormalize):
  deterministic, reference_capacity = CAPACITY_CASES[capacity_case]
  cfg = ModelConfig(d_model=D_MODEL, num_experts=NUM_EXPERTS, top_k=k,
                    expert_d_ff=EXPERT_D_FF, group_size=LENGTH, capacity_factor=0.5,
                    eval_capacity_factor=4.0, min_capacity=1, priority=priority,
                    activation=activation, dropout=0.0, router_jitter=0.0,
                    renormalize_gates=renormalize)
  assert cfg.renormalize_gates == (k >= 2 if renormalize is None else renormalize)
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
  chosen = top_k_mask(router_logits, k)
  num_assignments = kept.shape[0] * kept.shape[1] * k
  if capacity_case == "drops":
    assert kept.sum() < num_assignments  # the case exercises dropping
  else:
    assert kept.sum() == num_assignments
  np.testing.assert_allclose(routing.dropped_fraction, 1.0 - kept.sum() / num_assignments,
                             atol=1e-6)

  y_expected, (params_grad, tokens_grad) = reference_value_and_grad(
      params, x.reshape(-1, D_MODEL), chosen.reshape(-1, NUM_EXPERTS),
      kept.reshape(-1, NUM_EXPERTS), cotangent.reshape(-1, D_MODEL), activation,
      cfg.renormalize_gates)
  chex.assert_shape(y, (BATCH, LENGTH, D_MODEL))
  chex.assert_trees_all_close(y, y_expected.reshape(y.shape), atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(grads, (params_grad, tokens_grad.reshape(x.shape)),
                              atol=1e-5, rtol=1e-5)
  # The router is trained by the LM loss through the gates.
  assert np.abs(grads[0]["router"]["kernel"]).max() > 1e-3


_jit_route = jax.jit(route, static_argnames=("config", "capacity"))


def jit_route(router_logits, *, k: int, capacity: int | None, priority: str = "token",
              renormalize: bool = False, scope: str = "group", bias=None):
  """The top_k router on logits [G, S, E], configured by keywords."""
  cfg = ModelConfig(num_experts=np.shape(router_logits)[-1], top_k=k, priority=priority,
                    renormalize_gates=renormalize, load_balance_scope=scope)
  return _jit_route(jnp.asarray(router_logits, jnp.float32), cfg, capacity=capacity,
                    bias=bias)


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
  # MaxVio: max load 4/8 over mean load 1/3, minus 1.
  np.testing.assert_allclose(routing.max_violation, 0.5, atol=1e-6)


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
  def capacity(group_size, num_experts, k, factor, min_capacity, deterministic=False):
    cfg = ModelConfig(num_experts=num_experts, top_k=k, capacity_factor=factor,
                      eval_capacity_factor=2 * factor, min_capacity=min_capacity)
    return expert_capacity(cfg, group_size, deterministic=deterministic)
  assert capacity(8, 4, 2, 1.25, min_capacity=1) == 5  # ceil(2 * 1.25 * 8 / 4)
  assert capacity(8, 4, 2, 1.25, min_capacity=1, deterministic=True) == 8  # ceil(10), <= S
  assert capacity(10, 4, 1, 1.0, min_capacity=1) == 3  # ceil(2.5)
  assert capacity(8, 4, 1, 0.5, min_capacity=4) == 4  # the floor wins over 1
  assert capacity(8, 4, 1, 0.5, min_capacity=16) == 8  # but never above S
  assert capacity(128, 32, 8, 1.25, min_capacity=4) == 40  # ceil(8 * 1.25 * 128 / 32)
  assert capacity(100, 11, 1, 1.1, min_capacity=1) == 10  # exactly 10: not ceil(10.000000000000002)


def test_route_rejects_bad_k():
  with pytest.raises(ValueError, match="k=3"):
    route(jnp.zeros((1, 4, 2)), ModelConfig(num_experts=2, top_k=3), capacity=2)


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


def test_load_balance_loss_batch_scope_hand_computed():
  # Two groups of 2 tokens, E=2, top-1. Group 0: both tokens pick e0, f = [1, 0],
  # P = [0.675, 0.325], loss 2 * 0.675 = 1.35. Group 1: both pick e1, f = [0, 1],
  # P = [0.25, 0.75], loss 1.5. "group" averages the losses: 1.425. "batch" averages f and
  # P first: f = [0.5, 0.5], P = [0.4625, 0.5375], loss 2 * 0.5 = 1.0, balanced.
  probs = [[[0.75, 0.25], [0.6, 0.4]], [[0.2, 0.8], [0.3, 0.7]]]
  group = jit_route(log_probs(probs), k=1, capacity=2, scope="group")
  batch = jit_route(log_probs(probs), k=1, capacity=2, scope="batch")
  np.testing.assert_allclose(group.load_balance_loss, 1.425, atol=1e-6)
  np.testing.assert_allclose(batch.load_balance_loss, 1.0, atol=1e-6)
  # The routing itself does not depend on the scope.
  chex.assert_trees_all_close(group._replace(load_balance_loss=0.0),
                              batch._replace(load_balance_loss=0.0))


def layer_params(cfg: ModelConfig, x: jax.Array, seed: int):
  shapes = jax.eval_shape(functools.partial(MoeLayer(cfg).init, deterministic=True),
                          jax.random.key(0), x)["params"]
  return random_params(shapes, seed=seed)


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_shared_experts_add_an_always_on_ffn(activation):
  # No drops (eval capacity S): y = routed experts as in the reference + sum_j shared_j(x).
  k, num_shared = 2, 2
  cfg = ModelConfig(d_model=D_MODEL, num_experts=NUM_EXPERTS, top_k=k,
                    expert_d_ff=EXPERT_D_FF, num_shared_experts=num_shared,
                    group_size=LENGTH, eval_capacity_factor=4.0, activation=activation)
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.normal(size=(BATCH, LENGTH, D_MODEL)), jnp.float32)
  cotangent = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  params = layer_params(cfg, x, seed=8)
  matrices = ("wi_gate", "wi_up", "wo") if activation == "swiglu" else ("wi", "wo")
  chex.assert_shape([params["shared_" + name] for name in matrices],
                    [(num_shared, D_MODEL, EXPERT_D_FF)] * (len(matrices) - 1)
                    + [(num_shared, EXPERT_D_FF, D_MODEL)])

  def layer_loss(params, x):
    y, _ = MoeLayer(cfg).apply({"params": params}, x, deterministic=True)
    return jnp.sum(y * cotangent), y

  tokens = x.reshape(-1, D_MODEL)
  chosen = top_k_mask(np.asarray(tokens) @ np.asarray(params["router"]["kernel"]), k)
  shared = {name: params["shared_" + name] for name in matrices}

  def reference_loss(params, tokens):
    y = reference_moe(params, tokens, chosen, chosen, activation, True)
    for j in range(num_shared):
      y = y + jax.vmap(lambda x_s: expert_mlp(shared, j, x_s, activation))(tokens)
    return jnp.sum(y * cotangent.reshape(-1, D_MODEL)), y

  (_, y), grads = jax.value_and_grad(layer_loss, argnums=(0, 1), has_aux=True)(params, x)
  (_, y_expected), (params_grad, tokens_grad) = jax.value_and_grad(
      reference_loss, argnums=(0, 1), has_aux=True)(params, tokens)
  chex.assert_trees_all_close(y, y_expected.reshape(y.shape), atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(grads[1], tokens_grad.reshape(x.shape), atol=1e-5, rtol=1e-5)
  for name in matrices:  # checked against a reference in the next test
    assert float(jnp.abs(grads[0]["shared_" + name]).max()) > 1e-3, name
  routed = {name: g for name, g in grads[0].items() if not name.startswith("shared_")}
  chex.assert_trees_all_close(routed, {n: params_grad[n] for n in routed}, atol=1e-5,
                              rtol=1e-5)


def test_shared_expert_gradients_match_reference():
  # The shared experts' weights get the gradient of sum_j shared_j(x) alone: the routed
  # part does not depend on them.
  cfg = ModelConfig(d_model=D_MODEL, num_experts=NUM_EXPERTS, top_k=2,
                    expert_d_ff=EXPERT_D_FF, num_shared_experts=2, group_size=LENGTH,
                    eval_capacity_factor=4.0)
  rng = np.random.default_rng(9)
  x = jnp.asarray(rng.normal(size=(BATCH, LENGTH, D_MODEL)), jnp.float32)
  cotangent = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  params = layer_params(cfg, x, seed=10)
  shared_names = ("shared_wi", "shared_wo")

  def layer_loss(shared):
    y, _ = MoeLayer(cfg).apply({"params": {**params, **shared}}, x, deterministic=True)
    return jnp.sum(y * cotangent)

  def reference_loss(shared):
    weights = {"wi": shared["shared_wi"], "wo": shared["shared_wo"]}
    y = sum(jax.vmap(lambda x_s: expert_mlp(weights, j, x_s, "gelu"))(x.reshape(-1, D_MODEL))
            for j in range(2))
    return jnp.sum(y * cotangent.reshape(-1, D_MODEL))

  shared = {name: params[name] for name in shared_names}
  chex.assert_trees_all_close(jax.grad(layer_loss)(shared), jax.grad(reference_loss)(shared),
                              atol=1e-5, rtol=1e-5)


def test_dense_expert_init_matches_the_dense_mlp():
  # "dense": normal(init_std) for wi, init_std / sqrt(2 * num_layers) for the residual wo,
  # as chimera.layers.dense_init; the router keeps its own init.
  d_model, hidden, layers = 128, 256, 8
  cfg = ModelConfig(d_model=d_model, num_experts=8, expert_d_ff=hidden, group_size=16,
                    num_layers=layers, init_std=0.02, expert_init="dense",
                    num_shared_experts=1)
  params = jax.jit(functools.partial(MoeLayer(cfg).init, deterministic=True))(
      jax.random.key(0), jnp.ones((1, 16, d_model)))["params"]
  expected_std = {"wi": 0.02, "wo": 0.02 / math.sqrt(2 * layers), "shared_wi": 0.02,
                  "shared_wo": 0.02 / math.sqrt(2 * layers),
                  "router": math.sqrt(cfg.expert_init_scale / d_model)}
  for name, std in expected_std.items():
    weights = params[name]["kernel"] if name == "router" else params[name]
    np.testing.assert_allclose(np.std(weights), std, rtol=0.1, err_msg=name)
    np.testing.assert_allclose(np.mean(weights), 0.0, atol=0.1 * std, err_msg=name)


@pytest.mark.parametrize("num_tokens,k,num_experts", [
    (1, 1, NUM_EXPERTS), (1, 2, NUM_EXPERTS), (2, 2, NUM_EXPERTS), (4, 2, NUM_EXPERTS),
    (3, NUM_EXPERTS, NUM_EXPERTS),
    # The gather path with T >= 2 and K >= 2 (a decoded batch of 8 with top-2 of 64
    # experts): each token must meet its own K experts, in its own order.
    (3, 2, 8), (2, 3, 8)])
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_decode_experts_match_per_token_loop(num_tokens, k, num_experts, activation):
  # T*K < E gathers each choice's weights; T*K >= E runs every expert on every token.
  rng = np.random.default_rng(num_tokens * 10 + k)
  x = jnp.asarray(rng.normal(size=(num_tokens, D_MODEL)), jnp.float32)
  expert_index = jnp.asarray(np.stack([rng.permutation(num_experts)[:k]
                                       for _ in range(num_tokens)]), jnp.int32)
  gate = jnp.asarray(rng.uniform(size=(num_tokens, k)), jnp.float32)
  names = ("wi_gate", "wi_up") if activation == "swiglu" else ("wi",)
  weights = {name: jnp.asarray(rng.normal(size=(num_experts, D_MODEL, EXPERT_D_FF)),
                               jnp.float32) for name in names}
  weights["wo"] = jnp.asarray(rng.normal(size=(num_experts, EXPERT_D_FF, D_MODEL)),
                              jnp.float32)
  y = jax.jit(decode_experts, static_argnums=4)(x, gate, expert_index, weights, activation)
  expected = per_token_output(weights, np.asarray(x), np.asarray(gate),
                              np.asarray(expert_index), activation)
  chex.assert_shape(y, (num_tokens, D_MODEL))
  chex.assert_trees_all_close(y, expected, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("batch,k", [(1, 1), (4, 2)])  # gathered, and all experts
def test_single_token_decode_equals_the_routed_layer(batch, k):
  # A one-token group has capacity 1 and drops nothing, so decode must give the same y.
  cfg = ModelConfig(d_model=D_MODEL, num_experts=NUM_EXPERTS, top_k=k,
                    expert_d_ff=EXPERT_D_FF, num_shared_experts=1)
  x = jnp.asarray(np.random.default_rng(3).normal(size=(batch, 1, D_MODEL)), jnp.float32)
  params = layer_params(cfg, x, seed=4)
  y_decode, routing = MoeLayer(cfg).apply({"params": params}, x, deterministic=True,
                                          decode=True)
  y_routed, _ = MoeLayer(cfg).apply({"params": params}, x, deterministic=True)
  assert routing is None
  chex.assert_trees_all_close(y_decode, y_routed, atol=1e-5, rtol=1e-5)


def test_one_token_router_product_equals_the_dot():
  # Decoding computes the router logits as a multiply and a sum (moe._multiply_sum, the
  # nn.Dense's dot_general): the same product as the dot, to float32 rounding.
  rng = np.random.default_rng(6)
  x = jnp.asarray(rng.normal(size=(4, 1, D_MODEL)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(D_MODEL, NUM_EXPERTS)), jnp.float32)
  dims = (((2,), (0,)), ((), ()))
  chex.assert_trees_all_close(_multiply_sum(x, kernel, dims),
                              jax.lax.dot_general(x, kernel, dims), atol=1e-6, rtol=1e-6)
  with pytest.raises(ValueError, match="contracts x's last axis"):
    _multiply_sum(x, kernel.T, (((1,), (1,)), ((), ())))


def test_group_size_that_does_not_tile_the_batch_is_an_error():
  cfg = ModelConfig(d_model=D_MODEL, num_experts=NUM_EXPERTS, expert_d_ff=EXPERT_D_FF,
                    group_size=8)
  x = jnp.asarray(np.random.default_rng(7).normal(size=(1, 12, D_MODEL)), jnp.float32)
  variables = MoeLayer(cfg).init(jax.random.key(0), x[:, :8], deterministic=True)
  with pytest.raises(ValueError, match="group_size=8 does not divide the 12 tokens"):
    MoeLayer(cfg).apply(variables, x, deterministic=True)
  # Decoding routes each sequence as one group, whatever group_size says: the same output
  # as the layer with group_size = the sequence's 12 tokens.
  y, _ = MoeLayer(cfg).apply(variables, x, deterministic=True, decode=True)
  y_one_group, _ = MoeLayer(dataclasses.replace(cfg, group_size=12)).apply(
      variables, x, deterministic=True)
  assert float(jnp.abs(y).max()) > 0
  chex.assert_trees_all_close(y, y_one_group, atol=1e-6, rtol=1e-6)


def test_router_bias_lives_in_its_collection_and_only_chooses():
  cfg = ModelConfig(d_model=D_MODEL, num_experts=NUM_EXPERTS, top_k=2,
                    expert_d_ff=EXPERT_D_FF, group_size=LENGTH, router_bias_rate=1e-3,
                    renormalize_gates=False, eval_capacity_factor=4.0)
  x = jnp.asarray(np.random.default_rng(5).normal(size=(BATCH, LENGTH, D_MODEL)), jnp.float32)
  variables = MoeLayer(cfg).init(jax.random.key(0), x, deterministic=True)
  np.testing.assert_array_equal(variables["router_bias"]["bias"], np.zeros(NUM_EXPERTS))
  params = layer_params(cfg, x, seed=6)
  # A large bias on expert 3 makes every token choose it; its gate stays the softmax
  # probability of the unbiased logits.
  bias = jnp.array([0.0, 0.0, 0.0, 100.0])
  _, routing = MoeLayer(cfg).apply({"params": params, "router_bias": {"bias": bias}}, x,
                                   deterministic=True)
  probs = jax.nn.softmax(x.reshape(BATCH * LENGTH // LENGTH, LENGTH, D_MODEL)
                         @ params["router"]["kernel"])
  np.testing.assert_array_equal(routing.expert_index[..., 0], 3)
  np.testing.assert_allclose(routing.gate[..., 0], probs[..., 3], atol=1e-6)
  np.testing.assert_allclose(routing.expert_load[3], 0.5, atol=1e-6)  # 1 of each token's 2
  # The bias is read, never created, at apply time.
  with pytest.raises(flax.errors.ScopeCollectionNotFound, match='collection "router_bias"'):
    MoeLayer(cfg).apply({"params": params}, x, deterministic=True)


def test_decoder_stats_carry_max_violation_per_layer():
  from chimera.decoder import Decoder
  cfg = ModelConfig(vocab_size=11, num_layers=3, num_heads=2, d_model=D_MODEL, d_ff=32,
                    max_len=16, num_experts=NUM_EXPERTS, moe_every=2, group_size=LENGTH)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 11, (BATCH, LENGTH)), jnp.int32)
  variables = Decoder(cfg).init(jax.random.key(0), tokens)
  _, stats = jax.jit(Decoder(cfg).apply)(variables, tokens)
  chex.assert_shape(stats["max_violation"], (cfg.num_moe_layers,))
  load = np.asarray(stats["expert_load"])  # [Y, E]
  np.testing.assert_allclose(stats["max_violation"], load.max(-1) / load.mean(-1) - 1, atol=1e-6)


@pytest.mark.parametrize("router", sorted(ROUTERS))
@pytest.mark.parametrize("dispatch", ["einsum", "dropless"])
def test_layer_runs_every_router_as_routed(router, dispatch):
  # The layer's output is sum over each token's kept choices of gate * expert(x), with
  # the choices, gates and slots the router returned (each router's own reference is in
  # tests/test_routers.py). Training capacity factor 0.5 drops choices on the einsum path.
  cfg = ModelConfig(d_model=D_MODEL, num_experts=NUM_EXPERTS, top_k=2, router=router,
                    expert_d_ff=EXPERT_D_FF, group_size=LENGTH, capacity_factor=0.5,
                    min_capacity=1, dispatch=dispatch)
  x = jnp.asarray(np.random.default_rng(11).normal(size=(BATCH, LENGTH, D_MODEL)), jnp.float32)
  params = layer_params(cfg, x, seed=12)
  y, routing = jax.jit(functools.partial(MoeLayer(cfg).apply, deterministic=False))(
      {"params": params}, x)
  tokens = np.asarray(x).reshape(-1, D_MODEL)
  index = np.asarray(routing.expert_index).reshape(-1, 2)
  gate = np.asarray(routing.gate).reshape(-1, 2)
  if dispatch == "einsum":
    kept_by_expert = np.asarray(routing.dispatch).sum(-1).reshape(-1, NUM_EXPERTS) > 0
    assert float(routing.dropped_fraction) > 0
  else:
    kept_by_expert = np.ones((tokens.shape[0], NUM_EXPERTS), bool)
  expected = np.zeros_like(tokens)
  for t in range(tokens.shape[0]):
    for r in range(2):
      if kept_by_expert[t, index[t, r]]:
        expected[t] += gate[t, r] * expert_mlp(params, index[t, r], tokens[t], "gelu")
  chex.assert_trees_all_close(y.reshape(-1, D_MODEL), expected, atol=1e-5, rtol=1e-5)
  # The bench's routing-only layer (skip_experts): every expert returns its input, so each
  # token gets back its gate-weighted copies through the same dispatch, drops included.
  copies, _ = jax.jit(functools.partial(MoeLayer(cfg, skip_experts=True).apply,
                                        deterministic=False))({"params": params}, x)
  kept = np.take_along_axis(kept_by_expert, index, axis=1)  # [T, K]
  chex.assert_trees_all_close(copies.reshape(-1, D_MODEL),
                              (gate * kept).sum(-1, keepdims=True) * tokens, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("k", [1, 2])
def test_router_noise_draws_the_choice_from_the_tempered_softmax(k):
  # Every token has the same logits, so each token's choice is one draw. Gumbel-top-k at
  # temperature tau draws k experts without replacement from softmax(logits / tau): the
  # first with probability p_i, the second p_j / (1 - p_i) of what is left. The gates stay
  # the noise-free probabilities, and evaluation chooses the plain top k.
  tau, num_tokens = 0.5, 8192
  logits = np.array([1.0, 0.6, 0.2, -0.5], np.float32)
  cfg = ModelConfig(d_model=D_MODEL, num_experts=NUM_EXPERTS, top_k=k, router_noise=tau,
                    expert_d_ff=EXPERT_D_FF, dispatch="dropless", renormalize_gates=False)
  x = jnp.zeros((num_tokens // LENGTH, LENGTH, D_MODEL)).at[..., 0].set(1.0)
  params = layer_params(cfg, x, seed=3)
  params["router"]["kernel"] = params["router"]["kernel"].at[0].set(logits).at[1:].set(0.0)
  layer = jax.jit(functools.partial(MoeLayer(cfg).apply, deterministic=False))
  _, routing = layer({"params": params}, x, rngs={"dropout": jax.random.key(7)})
  chosen = np.asarray(routing.expert_index).reshape(-1, k)
  p = np.exp(logits / tau) / np.exp(logits / tau).sum()
  if k == 1:
    expected = {(i,): p[i] for i in range(NUM_EXPERTS)}
  else:
    expected = {(i, j): p[i] * p[j] / (1 - p[i])
                for i in range(NUM_EXPERTS) for j in range(NUM_EXPERTS) if i != j}
  seen = {pair: np.mean(np.all(chosen == pair, axis=-1)) for pair in expected}
  for pair, share in expected.items():  # sd of each share <= 0.0056 at 8192 draws
    assert abs(seen[pair] - share) < 0.025, (pair, seen[pair], share)
  clean = np.exp(logits) / np.exp(logits).sum()
  np.testing.assert_allclose(routing.gate.reshape(-1, k), clean[chosen], rtol=1e-5)
  # Another key draws other choices; evaluation has no noise, with or without a key.
  _, other = layer({"params": params}, x, rngs={"dropout": jax.random.key(8)})
  assert np.mean(np.asarray(other.expert_index).reshape(-1, k) != chosen) > 0.1
  for rngs in ({}, {"dropout": jax.random.key(7)}):
    _, plain = MoeLayer(cfg).apply({"params": params}, x, deterministic=True, rngs=rngs)
    np.testing.assert_array_equal(plain.expert_index.reshape(-1, k),
                                  np.broadcast_to(np.argsort(-logits)[:k], chosen.shape))


def test_router_jitter_scales_each_router_input_in_training_only():
  # Switch's jitter: in training, each element of the router's input is multiplied by its
  # own draw from U(1 - j, 1 + j). Each token here has two nonzero features a and b, so its
  # E logits are u_a * x_a W[a] + u_b * x_b W[b]: the two draws are solved for per token.
  jitter, num_tokens = 0.2, 4096
  cfg = ModelConfig(d_model=D_MODEL, num_experts=NUM_EXPERTS, top_k=2, router_jitter=jitter,
                    expert_d_ff=EXPERT_D_FF, group_size=LENGTH, dispatch="dropless")
  a = np.arange(num_tokens) % D_MODEL
  b = (a + 1) % D_MODEL
  tokens = 1.5 * (np.eye(D_MODEL, dtype=np.float32)[a] + np.eye(D_MODEL, dtype=np.float32)[b])
  x = jnp.asarray(tokens).reshape(-1, LENGTH, D_MODEL)
  params = layer_params(cfg, x, seed=9)
  kernel = np.asarray(params["router"]["kernel"])  # [M, E]

  def logits(deterministic, key):
    _, state = MoeLayer(cfg).apply({"params": params}, x, deterministic=deterministic,
                                   rngs={"dropout": key}, mutable=["intermediates"],
                                   capture_intermediates=lambda module, _: module.name == "router")
    return np.asarray(state["intermediates"]["router"]["__call__"][0]).reshape(num_tokens, -1)

  jittered = logits(False, jax.random.key(1))
  columns = 1.5 * np.stack([kernel[a], kernel[b]], axis=-1)  # [T, E, 2]
  draws = np.stack([np.linalg.lstsq(columns[t], jittered[t], rcond=None)[0]
                    for t in range(num_tokens)])  # [T, 2]: u_a, u_b
  np.testing.assert_allclose(np.einsum("tec,tc->te", columns, draws), jittered, atol=1e-5)
  assert draws.min() >= 1 - jitter - 1e-4 and draws.max() <= 1 + jitter + 1e-4
  # U(0.8, 1.2): mean 1 (SE 0.0013 over 8192 draws), SD 0.2 / sqrt(3) = 0.1155, and the
  # two draws of a token independent.
  assert abs(draws.mean() - 1) < 0.01 and abs(draws.std() - jitter / math.sqrt(3)) < 0.01
  assert abs(np.corrcoef(draws[:, 0], draws[:, 1])[0, 1]) < 0.1
  assert draws[a == 0, 0].std() > 0.05  # drawn per token too, not once per feature
  assert np.mean(np.abs(logits(False, jax.random.key(2)) - jittered) > 1e-6) > 0.99
  np.testing.assert_allclose(logits(True, jax.random.key(1)), tokens @ kernel, rtol=1e-5,
                             atol=1e-6)


def test_router_noise_below_zero_is_refused():
  from chimera import config as config_lib
  from chimera.errors import ChimeraError
  with pytest.raises(ChimeraError, match=r"^config.model.router_noise: must be >= 0, got -0.1$"):
    config_lib.load("configs/moe_top2.py:tiny", {"model.router_noise": -0.1})


def test_prefill_routes_each_sequence_without_drops():
  """decode=True on a prompt of several tokens (prefill) routes each sequence as one group
  with capacity S, so nothing is dropped, even where the configured capacity factors drop
  choices (decoding never drops, and prefill must agree with it)."""
  cfg = ModelConfig(d_model=D_MODEL, num_experts=4, top_k=2, expert_d_ff=EXPERT_D_FF,
                    capacity_factor=0.5, eval_capacity_factor=0.5, min_capacity=1)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, D_MODEL)), jnp.float32)
  params = layer_params(cfg, x, seed=1)
  apply = jax.jit(functools.partial(MoeLayer(cfg).apply, deterministic=True),
                  static_argnames="decode")
  _, outside = apply({"params": params}, x, decode=False)
  assert float(outside.dropped_fraction) > 0.2  # the premise: these capacities drop
  y, routing = apply({"params": params}, x, decode=True)
  assert float(routing.dropped_fraction) == 0.0
  expected = per_token_output(params, np.asarray(x).reshape(-1, D_MODEL),
                              np.asarray(routing.gate).reshape(-1, 2),
                              np.asarray(routing.expert_index).reshape(-1, 2))
  np.testing.assert_allclose(np.asarray(y).reshape(-1, D_MODEL), expected, atol=1e-5,
                             rtol=1e-5)


def test_router_noise_keeps_the_balancing_bias():
  """In training the choice offset is the balancing bias plus the noise: with
  router_noise on, a bias of +100 on expert 3 still puts it first for every token (the
  noise is a Gumbel draw times 0.01), and the gates stay the unbiased probabilities."""
  cfg = ModelConfig(d_model=D_MODEL, num_experts=4, top_k=2, expert_d_ff=EXPERT_D_FF,
                    group_size=8, dispatch="dropless", router_bias_rate=1e-3,
                    router_noise=0.01, renormalize_gates=False)
  x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 8, D_MODEL)), jnp.float32)
  params = layer_params(cfg, x, seed=3)
  bias = jnp.array([0.0, 0.0, 0.0, 100.0])
  _, routing = jax.jit(functools.partial(MoeLayer(cfg).apply, deterministic=False))(
      {"params": params, "router_bias": {"bias": bias}}, x,
      rngs={"dropout": jax.random.key(0)})
  np.testing.assert_array_equal(routing.expert_index[..., 0], 3)
  probs = jax.nn.softmax(x @ params["router"]["kernel"])
  np.testing.assert_allclose(routing.gate[..., 0], probs[..., 3], atol=1e-6)
