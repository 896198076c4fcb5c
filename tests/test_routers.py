"""Every registered router: shapes, causality where claimed, and a per-token reference.

Adding a router to chimera.routers means adding its plain per-token reference to
REFERENCES below; `test_every_router_has_a_reference` fails until it is there.

Shape letters as in chimera/routers.py: G groups, S tokens per group, E experts,
C capacity, K choices per token, Y MoE layers.
"""

import dataclasses
import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from chimera.config import ModelConfig, validate_model
from chimera.decoder import Decoder
from chimera import routers
from chimera.errors import ChimeraError
from chimera.routers import (ROUTERS, causality_note, is_causal, moe_layer_names, route,
                             update_router_bias)

GROUPS, GROUP_SIZE, NUM_EXPERTS = 2, 8, 4


def softmax(v: np.ndarray) -> np.ndarray:
  e = np.exp(v - v.max())
  return e / e.sum()


def reference_top_k(logits_s: np.ndarray, bias: np.ndarray, cfg: ModelConfig):
  """One token's logits [E] -> (router distribution [E], chosen experts [K], gates [K])."""
  probs = softmax(logits_s)
  chosen = np.argsort(-(logits_s + bias), kind="stable")[:cfg.top_k]
  gate = probs[chosen]
  if cfg.renormalize_gates:
    gate = gate / gate.sum()
  return probs, chosen, gate


def reference_sigmoid_top_k(logits_s: np.ndarray, bias: np.ndarray, cfg: ModelConfig):
  affinity = 1.0 / (1.0 + np.exp(-logits_s))
  chosen = np.argsort(-(logits_s + bias), kind="stable")[:cfg.top_k]
  gate = affinity[chosen]
  if cfg.renormalize_gates:
    gate = gate / gate.sum()
  return affinity / affinity.sum(), chosen, gate


REFERENCES = {"top_k": reference_top_k, "sigmoid_top_k": reference_sigmoid_top_k}


def reference_routing(logits: np.ndarray, bias: np.ndarray | None, cfg: ModelConfig,
                      capacity: int | None) -> dict:
  """The router's reference token by token, then the slots by walking the choices in
  priority order, then every metric by its definition."""
  groups, group_size, num_experts = logits.shape
  k = cfg.top_k
  bias = np.zeros(num_experts) if bias is None else bias
  probs = np.zeros(logits.shape)
  index = np.zeros((groups, group_size, k), np.int32)
  gate = np.zeros((groups, group_size, k))
  for g, s in itertools.product(range(groups), range(group_size)):
    probs[g, s], index[g, s], gate[g, s] = REFERENCES[cfg.router](logits[g, s], bias, cfg)

  slots = group_size if capacity is None else capacity
  dispatch = np.zeros((groups, group_size, num_experts, slots))
  combine = np.zeros_like(dispatch)
  kept = 0
  for g in range(groups):
    if cfg.priority == "token":
      order = [(s, r) for s in range(group_size) for r in range(k)]
    else:
      order = [(s, r) for r in range(k) for s in range(group_size)]
    fill = [0] * num_experts
    for s, r in order:
      e = index[g, s, r]
      if fill[e] < slots:
        dispatch[g, s, e, fill[e]] = 1.0
        combine[g, s, e, fill[e]] = gate[g, s, r]
        fill[e] += 1
        kept += 1

  share = np.zeros((groups, num_experts))  # f: the share of each group's choices
  for g, s, r in itertools.product(range(groups), range(group_size), range(k)):
    share[g, index[g, s, r]] += 1.0 / (group_size * k)
  mean_prob = probs.mean(axis=1)  # P: [G, E]
  if cfg.load_balance_scope == "batch":
    balance = num_experts * np.sum(share.mean(0) * mean_prob.mean(0))
  else:
    balance = np.mean([num_experts * np.sum(share[g] * mean_prob[g]) for g in range(groups)])
  load = share.mean(axis=0)
  logsumexp = np.log(np.exp(logits).sum(-1))
  return dict(
      gate=gate, expert_index=index, load_balance_loss=balance,
      z_loss=np.mean(logsumexp ** 2), dropped_fraction=1.0 - kept / (groups * group_size * k),
      expert_load=load, max_violation=load.max() / load.mean() - 1.0,
      router_entropy=np.mean(-np.sum(probs * np.log(probs), axis=-1)),
      router_confidence=np.mean(probs.max(-1)),
      **({} if capacity is None else dict(dispatch=dispatch, combine=combine)))


def router_config(router: str, k: int, **changes) -> ModelConfig:
  return ModelConfig(num_experts=NUM_EXPERTS, router=router, top_k=k, **changes)


jit_route = jax.jit(route, static_argnames=("config", "capacity"))


def random_logits(seed: int, shape=(GROUPS, GROUP_SIZE, NUM_EXPERTS)) -> np.ndarray:
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32) * 2


def test_every_router_has_a_reference():
  assert set(REFERENCES) == set(ROUTERS)
  for name in ROUTERS:
    validate_model(router_config(name, 2))
  with pytest.raises(ChimeraError, match="config.model.router: expected one of"):
    validate_model(router_config("no_such_router", 2))


# (k, priority, capacity or None, renormalize or None for the default, scope, with bias)
REFERENCE_CASES = [
    (1, "token", 2, None, "group", False),
    (1, "token", None, None, "batch", True),
    (2, "token", 3, None, "group", True),
    (2, "rank", 3, None, "batch", False),
    (2, "rank", 3, False, "group", True),
    (2, "token", None, False, "group", False),
    (3, "token", 5, None, "batch", True),
    (NUM_EXPERTS, "rank", GROUP_SIZE, None, "group", False),
]


@pytest.mark.parametrize("router", sorted(ROUTERS))
@pytest.mark.parametrize("k,priority,capacity,renormalize,scope,with_bias", REFERENCE_CASES)
def test_router_matches_per_token_reference(router, k, priority, capacity, renormalize, scope,
                                            with_bias):
  cfg = router_config(router, k, priority=priority, renormalize_gates=renormalize,
                      load_balance_scope=scope)
  logits = random_logits(seed=k * 7 + (capacity or 0))
  bias = (np.random.default_rng(1).normal(size=NUM_EXPERTS).astype(np.float32)
          if with_bias else None)
  routing = jit_route(logits, cfg, capacity=capacity, bias=bias)
  expected = reference_routing(logits, bias, cfg, capacity)
  if capacity is None:
    assert routing.dispatch is None and routing.combine is None
  for field, value in expected.items():
    np.testing.assert_allclose(getattr(routing, field), value, atol=1e-5, rtol=1e-5,
                               err_msg=field)
  if capacity is not None and capacity < GROUP_SIZE:
    assert float(routing.dropped_fraction) > 0 or k == 1  # most cases exercise drops


@pytest.mark.parametrize("router", sorted(ROUTERS))
@pytest.mark.parametrize("capacity", [3, None])
def test_router_shapes(router, capacity):
  k = 2
  routing = jit_route(random_logits(0), router_config(router, k), capacity=capacity)
  chex.assert_shape([routing.gate, routing.expert_index], [(GROUPS, GROUP_SIZE, k)] * 2)
  assert routing.expert_index.dtype == jnp.int32
  if capacity is not None:
    chex.assert_shape([routing.dispatch, routing.combine],
                      [(GROUPS, GROUP_SIZE, NUM_EXPERTS, capacity)] * 2)
  chex.assert_shape(routing.expert_load, (NUM_EXPERTS,))
  for field in ("load_balance_loss", "z_loss", "dropped_fraction", "max_violation",
                "router_entropy", "router_confidence"):
    chex.assert_shape(getattr(routing, field), ())
  np.testing.assert_allclose(routing.expert_load.sum(), 1.0, atol=1e-6)


def future_leak(cfg: ModelConfig, capacity: int | None, seed: int) -> float:
  """The largest change of any token's routing (gate, choices, slots) when the logits of
  later tokens of its group change, over every cut point t of one group."""
  base = random_logits(seed, (1, GROUP_SIZE, NUM_EXPERTS))
  rng = np.random.default_rng(seed + 1)
  reference = jit_route(base, cfg, capacity=capacity)
  leak = 0.0
  for t in range(GROUP_SIZE - 1):
    for _ in range(4):
      changed = base.copy()
      changed[:, t + 1:] = rng.normal(size=changed[:, t + 1:].shape) * 2
      routing = jit_route(changed, cfg, capacity=capacity)
      for field in ("gate", "expert_index", "dispatch", "combine"):
        before, after = getattr(reference, field), getattr(routing, field)
        if before is not None:
          delta = np.abs(np.asarray(after[:, :t + 1], np.float32)
                         - np.asarray(before[:, :t + 1], np.float32))
          leak = max(leak, float(delta.max()))
  return leak


CAUSALITY_CASES = [(k, priority, capacity) for k in (1, 2, 3) for priority in ("token", "rank")
                   for capacity in (2, None)]


@pytest.mark.parametrize("router", sorted(ROUTERS))
@pytest.mark.parametrize("k,priority,capacity", CAUSALITY_CASES)
def test_causal_routers_ignore_later_tokens(router, k, priority, capacity):
  dispatch = "dropless" if capacity is None else "einsum"
  cfg = router_config(router, k, priority=priority, dispatch=dispatch)
  leak = future_leak(cfg, capacity, seed=k)
  if is_causal(cfg):
    assert leak == 0.0, f"{router} claims to be causal under {cfg.priority=}, {k=}"
  else:  # the flag is honest both ways: a non-causal router does leak
    assert leak > 0.0, f"{router} claims not to be causal under {cfg.priority=}, {k=}"


def test_top_k_causality_flag():
  cfg = router_config("top_k", 2)
  assert is_causal(dataclasses.replace(cfg, priority="token"))
  assert not is_causal(dataclasses.replace(cfg, priority="rank"))
  assert is_causal(dataclasses.replace(cfg, priority="rank", top_k=1))
  assert is_causal(dataclasses.replace(cfg, priority="rank", dispatch="dropless"))
  # The entry points' note (chimera.main, evaluate, generate) follows the flag.
  assert causality_note(dataclasses.replace(cfg, priority="token")) is None
  assert causality_note(dataclasses.replace(cfg, priority="rank", dispatch="dropless")) is None
  note = causality_note(dataclasses.replace(cfg, priority="rank"))
  assert "priority='rank'" in note and "not causal" in note and "\n" not in note



@pytest.mark.parametrize("router", sorted(ROUTERS))
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("renormalize", [False, True])
def test_every_router_learns_from_the_loss_where_validation_accepts_it(router, k, renormalize):
  """The loss through the gates (here a random weighting of each choice, as the experts'
  outputs weight them) has a gradient on the router logits under every config validation
  accepts, so the router does not learn from the auxiliary losses alone; validation refuses
  exactly the configs under which it has none (k=1 renormalised: a gate of 1)."""
  cfg = router_config(router, k, renormalize_gates=renormalize)
  weights = jnp.asarray(np.random.default_rng(k).normal(size=(GROUPS, GROUP_SIZE, k)))
  grad = jax.grad(lambda z: jnp.sum(route(z, cfg, capacity=None).gate * weights))(
      jnp.asarray(random_logits(k)))
  try:
    validate_model(cfg)
    accepted = True
  except ChimeraError:
    accepted = False
  assert accepted == ((k, renormalize) != (1, True))  # the one refused case
  learns = float(jnp.abs(grad).max())
  assert learns > 1e-3 if accepted else learns < 1e-6, f"{router}, k={k}: gradient {learns}"


def test_a_router_states_why_it_leaks_and_what_it_cannot_train(monkeypatch):
  """A router registered with its own reasons: validation raises its `refuse` message,
  causality_note ends with its `not_causal_because`; a router that may leak must say why."""
  def softmax_over_chosen(router_logits, config, *, capacity, bias=None):
    expert_index = routers.choose(router_logits, bias, config.top_k)
    gate = jax.nn.softmax(jnp.take_along_axis(router_logits, expert_index, axis=-1), axis=-1)
    return routers.assign(router_logits, jax.nn.softmax(router_logits, axis=-1), gate,
                          expert_index, config, capacity)
  monkeypatch.setattr(routers, "ROUTERS", dict(ROUTERS))
  with pytest.raises(ValueError, match="not_causal_because"):
    routers.register("leaky", causal=False)(softmax_over_chosen)
  routers.register(
      "softmax_over_chosen", causal=routers.slots_are_causal,
      not_causal_because="choices are placed in rank order here",
      refuse=lambda m: "one chosen expert gets a gate of 1 whatever the logits"
      if m.top_k == 1 else None)(softmax_over_chosen)
  with pytest.raises(ChimeraError, match="config.model.router: 'softmax_over_chosen': one "
                                         "chosen expert gets a gate of 1"):
    validate_model(router_config("softmax_over_chosen", 1, renormalize_gates=False))
  validate_model(router_config("softmax_over_chosen", 2))
  note = causality_note(router_config("softmax_over_chosen", 2, priority="rank"))
  assert note.endswith(": choices are placed in rank order here")
  assert "router='softmax_over_chosen'" in note and "not causal" in note

@pytest.mark.parametrize("router", sorted(ROUTERS))
def test_bias_changes_choice_not_gate(router):
  # k = E: every expert is chosen either way, so the bias can only reorder the choices;
  # each expert's gate must not move. A large bias on expert 2 puts it first everywhere.
  cfg = router_config(router, NUM_EXPERTS, renormalize_gates=False)
  logits = random_logits(3)
  bias = jnp.array([0.0, 0.0, 50.0, 0.0])

  def gate_per_expert(routing):  # [G, S, E]
    return jnp.einsum("gsk,gske->gse", routing.gate,
                      jax.nn.one_hot(routing.expert_index, NUM_EXPERTS))

  plain = jit_route(logits, cfg, capacity=None)
  biased = jit_route(logits, cfg, capacity=None, bias=bias)
  np.testing.assert_array_equal(biased.expert_index[..., 0], 2)
  assert (np.asarray(plain.expert_index[..., 0]) != 2).any()  # the bias did change choices
  np.testing.assert_allclose(gate_per_expert(biased), gate_per_expert(plain), atol=1e-6)


@pytest.mark.parametrize("router", sorted(ROUTERS))
def test_renormalised_gates_of_experts_of_probability_zero_are_zero_not_nan(router):
  """A bias that chooses experts 200 logits below the best: their probabilities (and
  sigmoid affinities) underflow to 0, and so does their sum. Their renormalised gates are
  0, not 0/0, and every other token's gates are the plain quotient, bit for bit."""
  cfg = router_config(router, 2, renormalize_gates=True)
  logits = random_logits(5)
  logits[0, 0] = [0.0, -200.0, -200.0, -200.0]
  bias = jnp.array([-1000.0, 0.0, 0.0, 0.0])
  routing = jit_route(logits, cfg, capacity=None, bias=bias)
  assert set(np.asarray(routing.expert_index[0, 0]).tolist()) <= {1, 2, 3}
  np.testing.assert_array_equal(routing.gate[0, 0], [0.0, 0.0])
  assert np.isfinite(np.asarray(routing.gate)).all()
  unnormalised = jit_route(logits, dataclasses.replace(cfg, renormalize_gates=False),
                           capacity=None, bias=bias).gate
  plain = unnormalised / unnormalised.sum(-1, keepdims=True)
  np.testing.assert_array_equal(np.asarray(routing.gate).reshape(-1, 2)[1:],
                                np.asarray(plain).reshape(-1, 2)[1:])


def test_top1_gate_is_the_probability_and_trains_the_router():
  # Switch: the top-1 gate is p_i, so d(sum of gates)/d logits = p_i * (onehot(i) - p).
  cfg = router_config("top_k", 1)
  logits = jnp.asarray(random_logits(4))
  routing = jit_route(logits, cfg, capacity=None)
  probs = jax.nn.softmax(logits)
  chosen = jax.nn.one_hot(routing.expert_index[..., 0], NUM_EXPERTS)
  np.testing.assert_allclose(routing.gate[..., 0], (chosen * probs).sum(-1), atol=1e-6)
  grad = jax.grad(lambda z: route(z, cfg, capacity=None).gate.sum())(logits)
  np.testing.assert_allclose(grad, routing.gate * (chosen - probs), atol=1e-6)


def test_update_router_bias_hand_computed():
  # MoE blocks 1 and 3 of 4. Layer y=0 loads [0.5, 0.25, 0.25, 0], mean 0.25: the busiest
  # expert moves down by the rate, the idle one up; layer y=1 is balanced and stays.
  cfg = ModelConfig(num_layers=4, num_experts=NUM_EXPERTS, moe_every=2, first_moe_layer=1)
  assert moe_layer_names(cfg) == ["block_1", "block_3"]
  router_bias = {name: {"moe": {"bias": jnp.full((NUM_EXPERTS,), 0.5)}}
                 for name in moe_layer_names(cfg)}
  expert_load = jnp.array([[0.5, 0.25, 0.25, 0.0], [0.25, 0.25, 0.25, 0.25]])
  updated = jax.jit(update_router_bias, static_argnums=(2, 3))(router_bias, expert_load,
                                                               0.1, cfg)
  chex.assert_trees_all_equal_structs(updated, router_bias)
  np.testing.assert_allclose(updated["block_1"]["moe"]["bias"], [0.4, 0.5, 0.5, 0.6],
                             atol=1e-6)
  np.testing.assert_allclose(updated["block_3"]["moe"]["bias"], [0.5] * 4, atol=1e-6)


@pytest.mark.parametrize("router", sorted(ROUTERS))
def test_bias_updates_balance_a_skewed_router(router):
  # Logits that favour expert 0 for every token; 200 updates of the bias, with no change
  # to the logits, bring MaxVio from 1 to near 0 (the aux-loss-free loop of DeepSeek-V3).
  cfg = router_config(router, 2, group_size=GROUP_SIZE)
  logits = random_logits(5) * 0.5 + jnp.array([2.0, 0.0, 0.0, 0.0])
  router_bias = {"block_0": {"moe": {"bias": jnp.zeros((NUM_EXPERTS,))}}}
  one_layer = dataclasses.replace(cfg, num_layers=1)

  @jax.jit
  def step(router_bias):
    routing = route(logits, cfg, capacity=None, bias=router_bias["block_0"]["moe"]["bias"])
    return update_router_bias(router_bias, routing.expert_load[None], 0.01, one_layer), \
        routing.max_violation

  _, first = step(router_bias)
  for _ in range(200):
    router_bias, last = step(router_bias)
  np.testing.assert_allclose(first, 1.0)  # expert 0 in every token's 2: load 0.5 vs 0.25
  assert float(last) < 0.3


def test_decoder_declares_router_bias_per_moe_layer():
  cfg = ModelConfig(vocab_size=11, num_layers=3, num_heads=2, d_model=8, d_ff=32, max_len=16,
                    num_experts=NUM_EXPERTS, moe_every=2, router_bias_rate=0.01,
                    group_size=8)
  variables = jax.eval_shape(Decoder(cfg).init, jax.random.key(0),
                             jax.ShapeDtypeStruct((2, 8), jnp.int32))
  assert set(variables["router_bias"]) == set(moe_layer_names(cfg)) == {"block_0", "block_2"}
  chex.assert_shape(variables["router_bias"]["block_0"]["moe"]["bias"], (NUM_EXPERTS,))
  no_bias = jax.eval_shape(Decoder(dataclasses.replace(cfg, router_bias_rate=0.0)).init,
                           jax.random.key(0), jax.ShapeDtypeStruct((2, 8), jnp.int32))
  assert "router_bias" not in no_bias


# 128 experts: above RANK_CHOICE_MAX_EXPERTS, choose calls top_k itself.
@pytest.mark.parametrize("num_experts,k", [(4, 1), (8, 2), (32, 8), (64, 8), (128, 2)])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_choose_equals_lax_top_k(num_experts, k, dtype):
  """choose ranks up to RANK_CHOICE_MAX_EXPERTS experts itself; its indices are top_k's,
  order included, with ties (lower index first), -0 against +0, infinities and NaN."""
  scores = jax.random.normal(jax.random.key(num_experts), (3, 40, num_experts))
  scores = (jnp.round(scores * 2) / 2).astype(dtype)  # many ties, and -0.0
  negative_nan = jax.lax.bitcast_convert_type(jnp.int32(-4194304), jnp.float32)
  scores = (scores.at[0, 0, 0].set(jnp.nan).at[0, 1, 1].set(negative_nan.astype(dtype))
            .at[0, 2].set(jnp.inf).at[0, 3, 2].set(-jnp.inf))
  bias = jnp.linspace(-0.5, 0.5, num_experts)
  for b in (None, bias):
    expected = jax.lax.top_k(scores if b is None else scores + b.astype(dtype), k)[1]
    np.testing.assert_array_equal(routers.choose(scores, b, k), expected)

