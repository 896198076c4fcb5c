"""Routers: pure functions from router logits to a `Routing`, in a registry.

A router decides, for each token of a routing group, which k experts it goes to and with
what gate weights; `assign` then gives each choice a slot in its expert's buffer (or, with
no capacity, keeps every choice) and computes the losses and metrics from the assignments
made. `config.model.router` picks a router by its key in ROUTERS; config validation reads
the same keys.

Adding a router is one function with the signature of `top_k` below, one `@register` line
and its reference test (tests/test_routers.py runs its shape, causality, gradient and
reference checks over every registered router; the decoder, decoding and mesh tests run
over every router too). A router picks its experts with `choose`, which keeps the choice
on each device's own tokens on a mesh (a plain `jax.lax.top_k` there all-gathers the
whole batch's logits), and hands its choices to `assign`, which places them and computes
the losses and metrics.

Shape letters: G groups, S tokens per group, E experts, C capacity (slots per expert per
group), K choices per token, Y MoE layers.
"""

import dataclasses
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from chimera import sharding
from chimera.config import ModelConfig


class Routing(NamedTuple):
  """What a router decides for one MoE layer, and the losses and metrics of it.

  With no capacity (the dropless path and single-token decoding) dispatch and combine are
  None and nothing is dropped; the other fields mean the same either way.
  """

  gate: jax.Array  # [G, S, K] weight of each choice, best first
  expert_index: jax.Array  # [G, S, K] int32, the chosen experts
  dispatch: jax.Array | None  # [G, S, E, C] 1.0 where token s occupies slot c of expert e
  combine: jax.Array | None  # [G, S, E, C] the token's gate weight at that slot, else 0
  load_balance_loss: jax.Array  # scalar; 1.0 under perfectly uniform routing
  z_loss: jax.Array  # scalar: mean over tokens of logsumexp(logits)^2
  dropped_fraction: jax.Array  # scalar: share of the G*S*K choices that found no slot
  expert_load: jax.Array  # [E]: share of all choices that chose each expert (before drops)
  max_violation: jax.Array  # scalar MaxVio: max load / mean load - 1 (0 when balanced)
  router_entropy: jax.Array  # scalar: mean entropy of the router distribution, in nats
  router_confidence: jax.Array  # scalar: mean top-1 router probability


Router = Callable[..., Routing]  # (router_logits, config, *, capacity, bias) -> Routing


@dataclasses.dataclass(frozen=True)
class RouterEntry:
  route: Router
  # Whether a token's routing (and so its output) never depends on later tokens of its
  # group, under this config. The causality tests read it, and chimera.main,
  # chimera.evaluate, chimera.generate and chimera.compare's reports say so when it is
  # False (causality_note).
  causal: Callable[[ModelConfig], bool]
  # Why a config it is not causal under leaks, and which settings are causal: the end of
  # causality_note's sentence.
  not_causal_because: str
  # The configs this router cannot train (e.g. a gate that is constant, so the LM loss
  # gives the router no gradient): a message for config validation, or None.
  refuse: Callable[[ModelConfig], str | None]


ROUTERS: dict[str, RouterEntry] = {}


def register(name: str, *, causal: bool | Callable[[ModelConfig], bool],
             not_causal_because: str = "",
             refuse: Callable[[ModelConfig], str | None] = lambda config: None):
  """Adds the decorated router to ROUTERS under `name`.

  `causal` is a bool or a function of the ModelConfig; a router that is not always causal
  says why in `not_causal_because` (what leaks, and which settings are causal). `refuse`
  returns the reason a config cannot train with this router (chimera.config's validation
  raises it for model.router), or None.
  """
  if causal is not True and not not_causal_because:
    raise ValueError(f"router {name!r}: a router that is not always causal says why "
                     f"(not_causal_because)")
  def add(route: Router) -> Router:
    ROUTERS[name] = RouterEntry(route, causal if callable(causal) else lambda config: causal,
                                not_causal_because, refuse)
    return route
  return add


def is_causal(config: ModelConfig) -> bool:
  """Whether the configured router is causal (see RouterEntry.causal)."""
  return ROUTERS[config.router].causal(config)


def causality_note(config: ModelConfig) -> str | None:
  """One sentence for a config whose router is not causal (None when it is, or when
  the model has no experts): its losses see later tokens, and decoding cannot match it."""
  if config.num_experts == 0 or is_causal(config):
    return None
  return (f"config.model routes with router={config.router!r}, priority={config.priority!r}, "
          f"top_k={config.top_k} on the {config.dispatch} path, which is not causal, so the "
          f"training and validation losses see the future, and decoding (which routes each "
          f"new token on its own) samples from a different model: "
          f"{ROUTERS[config.router].not_causal_because}")


# The slot rule of `assign`, for the routers whose causality is `slots_are_causal`.
SLOTS_NOT_CAUSAL = ("a token's slot can depend on later tokens of its routing group; "
                    "priority='token' or dispatch='dropless' is causal")


def slots_are_causal(config: ModelConfig) -> bool:
  """`assign` keeps causality when nothing is dropped, one choice per token is placed, or
  all of token s's choices are placed before token s+1's ("token" priority). Under
  "rank" priority with k >= 2 a later token's first choice can take the slot of an
  earlier token's second choice."""
  return config.dispatch == "dropless" or config.top_k == 1 or config.priority == "token"


def choose(scores: jax.Array, bias: jax.Array | None, k: int) -> jax.Array:
  """The k best experts of scores [G, S, E] (+ bias [E] or [G, S, E], for choosing only):
  [G, S, K]."""
  num_experts = scores.shape[-1]
  if not 1 <= k <= num_experts:
    raise ValueError(f"k={k} must be between 1 and the number of experts {num_experts}")
  if bias is not None:
    scores = scores + bias.astype(scores.dtype)
  if num_experts <= RANK_CHOICE_MAX_EXPERTS:
    return _top_k_by_rank(scores, k)
  # Per device: under GSPMD, XLA's SPMD partitioner all-gathers TopK's operand when the
  # token axes are split (it partitions only the sorted axis).
  return sharding.map_over_batch(lambda scores: jax.lax.top_k(scores, k)[1], scores)


# Up to this many experts, `choose` ranks them with E*E comparisons per token: elementwise
# work and sums that XLA can fuse with what surrounds them, where a TopK is an op of its
# own, in every MoE layer, at every decoded token too.
RANK_CHOICE_MAX_EXPERTS = 64


def _top_k_by_rank(scores: jax.Array, k: int) -> jax.Array:
  """jax.lax.top_k(scores, k)'s indices [..., K], from each expert's rank: the number of
  experts that score higher, or the same with a lower index (top_k's order for ties).
  Scores are compared in top_k's total order of floats, as integers of the same bits: -0
  below +0, and a NaN above every number if its sign bit is clear, below them if set."""
  num_experts = scores.shape[-1]
  experts = jnp.arange(num_experts)
  bits = jax.lax.bitcast_convert_type(scores, jnp.dtype(f"int{8 * scores.dtype.itemsize}"))
  key = bits ^ ((bits >> (8 * scores.dtype.itemsize - 1)) & jnp.iinfo(bits.dtype).max)
  mine, theirs = key[..., :, None], key[..., None, :]  # [..., E, 1], [..., 1, E]
  ahead = (theirs > mine) | ((theirs == mine) & (experts[None, :] < experts[:, None]))
  rank = ahead.sum(axis=-1, dtype=jnp.int32)  # [..., E], a permutation of 0..E-1
  at_rank = rank[..., None, :] == jnp.arange(k, dtype=jnp.int32)[:, None]  # [..., K, E]
  return (at_rank * experts.astype(jnp.int32)).sum(axis=-1, dtype=jnp.int32)


def _slot_index(choice: jax.Array, priority: str) -> jax.Array:
  """choice [G, S, K, E] one-hot -> each choice's slot in its expert's buffer [G, S, K].

  The slot is the number of earlier choices of the same expert, in priority order:
  "token" orders (s, r), "rank" orders (r, s).
  """
  groups, group_size, k, num_experts = choice.shape
  if priority == "token":
    ordered = choice.reshape(groups, group_size * k, num_experts)
    earlier = (jnp.cumsum(ordered, axis=1) - ordered).reshape(choice.shape)
  elif priority == "rank":
    ordered = choice.transpose(0, 2, 1, 3).reshape(groups, k * group_size, num_experts)
    earlier = jnp.cumsum(ordered, axis=1) - ordered
    earlier = earlier.reshape(groups, k, group_size, num_experts).transpose(0, 2, 1, 3)
  else:
    raise ValueError(f"priority must be 'token' or 'rank', got {priority!r}")
  return jnp.sum(earlier * choice, axis=-1).astype(jnp.int32)


def load_balance_loss(assigned_share: jax.Array, mean_prob: jax.Array, scope: str) -> jax.Array:
  """E * sum_e f_e * P_e (Switch), from f = assigned_share [G, E] and P = mean_prob [G, E].

  "group": per routing group, then averaged over groups. "batch": f and P are first
  averaged over every group of the batch (under GSPMD, over every data-parallel device:
  Qwen's global-batch balancing), so a group may specialise as long as the batch balances.
  """
  num_experts = assigned_share.shape[-1]
  if scope == "batch":
    assigned_share, mean_prob = assigned_share.mean(0), mean_prob.mean(0)
  elif scope != "group":
    raise ValueError(f"load_balance_scope must be 'group' or 'batch', got {scope!r}")
  return jnp.mean(num_experts * jnp.sum(assigned_share * mean_prob, axis=-1))


def assign(router_logits: jax.Array, probs: jax.Array, gate: jax.Array,
           expert_index: jax.Array, config: ModelConfig, capacity: int | None) -> Routing:
  """Places a router's choices into expert slots and measures them.

  Args:
    router_logits: [G, S, E] float32, for the z-loss.
    probs: [G, S, E] the router's distribution over experts (sums to 1 over E), for the
      load-balance loss, entropy and confidence.
    gate: [G, S, K] the weights of the choices; expert_index: [G, S, K] the choices.
    config: reads priority and load_balance_scope.
    capacity: C slots per expert per group; choices beyond it are dropped (the token gets
      nothing from that expert and the residual connection carries it). None: keep all.
  """
  groups, group_size, num_experts = router_logits.shape
  k = expert_index.shape[-1]
  choice = jax.nn.one_hot(expert_index, num_experts, dtype=jnp.float32)  # [G, S, K, E]
  if capacity is None:
    dispatch = combine = None
    dropped_fraction = jnp.zeros((), jnp.float32)
  else:
    slot_index = _slot_index(choice, config.priority)  # [G, S, K]
    # one_hot of an index >= C is all zeros, so overflowing choices vanish here.
    slot = jax.nn.one_hot(slot_index, capacity, dtype=jnp.float32)  # [G, S, K, C]
    dispatch = jnp.einsum("gske,gskc->gsec", choice, slot)
    combine = jnp.einsum("gsk,gske,gskc->gsec", gate.astype(jnp.float32), choice, slot)
    dropped_fraction = 1.0 - jnp.mean(slot_index < capacity)

  assigned_share = choice.sum(axis=(1, 2)) / (group_size * k)  # f: [G, E], before drops
  expert_load = assigned_share.mean(axis=0)  # [E]
  log_probs = jnp.log(jnp.maximum(probs, jnp.finfo(jnp.float32).tiny))
  return Routing(
      gate=gate, expert_index=expert_index, dispatch=dispatch, combine=combine,
      load_balance_loss=load_balance_loss(assigned_share, probs.mean(axis=1),
                                          config.load_balance_scope),
      z_loss=jnp.mean(jax.nn.logsumexp(router_logits, axis=-1) ** 2),
      dropped_fraction=dropped_fraction,
      expert_load=expert_load,
      max_violation=expert_load.max() / expert_load.mean() - 1.0,
      router_entropy=jnp.mean(-jnp.sum(probs * log_probs, axis=-1)),
      router_confidence=probs.max(axis=-1).mean(),
  )


def renormalized(gate: jax.Array) -> jax.Array:
  """The chosen experts' gates [..., K] divided by their sum. A sum that underflowed to 0
  (a bias or noise that chose experts of probability 0, logits some 100 below the best)
  gives gates of 0, not NaN; any other sum gives the plain quotient, bit for bit."""
  return gate / jnp.maximum(gate.sum(axis=-1, keepdims=True), jnp.finfo(gate.dtype).tiny)


@register("top_k", causal=slots_are_causal, not_causal_because=SLOTS_NOT_CAUSAL)
def top_k(router_logits: jax.Array, config: ModelConfig, *, capacity: int | None,
          bias: jax.Array | None = None) -> Routing:
  """Softmax top-k (Switch for k=1, GShard / Mixtral for k=2).

  Each token goes to the k experts of highest logit + bias (bias only chooses: [E]
  for the aux-loss-free balancing of DeepSeek-V3, [G, S, E] with the training noise of
  `model.router_noise`). Gates are the softmax probabilities of the
  chosen experts, divided by their sum when `config.renormalize_gates`. With k=1 the
  gate is the probability itself (Switch), through which the LM loss trains the router.
  """
  probs = jax.nn.softmax(router_logits, axis=-1)  # [G, S, E]
  expert_index = choose(router_logits, bias, config.top_k)  # [G, S, K]
  gate = jnp.take_along_axis(probs, expert_index, axis=-1)
  if config.renormalize_gates:
    gate = renormalized(gate)
  return assign(router_logits, probs, gate, expert_index, config, capacity)


@register("sigmoid_top_k", causal=slots_are_causal,
          not_causal_because=SLOTS_NOT_CAUSAL)
def sigmoid_top_k(router_logits: jax.Array, config: ModelConfig, *, capacity: int | None,
                  bias: jax.Array | None = None) -> Routing:
  """Sigmoid affinities (DeepSeek-V3): each expert scores sigmoid(logit) independently.

  Each token goes to the k experts of highest logit + bias; the gates are the chosen
  sigmoid affinities, divided by their sum when `config.renormalize_gates`. The
  distribution used for the load-balance loss, entropy and confidence is the affinities
  normalised over all experts. With k=1 and no renormalising, the gate starts near 0.5
  whatever E is.
  """
  affinity = jax.nn.sigmoid(router_logits)  # [G, S, E]
  probs = affinity / affinity.sum(axis=-1, keepdims=True)
  expert_index = choose(router_logits, bias, config.top_k)
  gate = jnp.take_along_axis(affinity, expert_index, axis=-1)
  if config.renormalize_gates:
    gate = renormalized(gate)
  return assign(router_logits, probs, gate, expert_index, config, capacity)


def route(router_logits: jax.Array, config: ModelConfig, *, capacity: int | None,
          bias: jax.Array | None = None) -> Routing:
  """The configured router (`config.router`) on router_logits [G, S, E]."""
  return ROUTERS[config.router].route(router_logits, config, capacity=capacity, bias=bias)


def moe_layer_names(config: ModelConfig) -> list[str]:
  """The Block names of the MoE layers, in layer order (the Y axis of the stats)."""
  return [f"block_{i}" for i in range(config.num_layers) if config.is_moe_layer(i)]


def update_router_bias(router_bias: dict, expert_load: jax.Array, rate: float,
                       config: ModelConfig) -> dict:
  """One step of aux-loss-free balancing: bias_y += rate * sign(mean(load_y) - load_y).

  Args:
    router_bias: the "router_bias" collection, {"block_i": {"moe": {"bias": [E]}}}.
    expert_load: [Y, E] the step's expert_load stat, MoE layers in layer order.
    rate: config.router_bias_rate.
  Returns:
    The collection with every MoE layer's bias moved: up for underloaded experts, down for
    overloaded ones.
  """
  updated = dict(router_bias)
  for load, name in zip(expert_load, moe_layer_names(config), strict=True):
    bias = router_bias[name]["moe"]["bias"]
    step = rate * jnp.sign(load.mean() - load)
    updated[name] = {**router_bias[name], "moe": {**router_bias[name]["moe"],
                                                   "bias": bias + step.astype(bias.dtype)}}
  return updated


def expert_capacity(config: ModelConfig, group_size: int, *, deterministic: bool = False) -> int:
  """C, slots per expert per group of S tokens:
  min(S, max(min_capacity, ceil(k * capacity_factor * S / E))).

  Training uses capacity_factor, evaluation (`deterministic`) eval_capacity_factor. C never
  exceeds S: no expert can get more than S choices of one group. The MoE layer, the FLOP
  accounting and the scaling tool all use this one function.
  """
  factor = config.eval_capacity_factor if deterministic else config.capacity_factor
  # Rounded first: in floats k * 1.1 * 100 / 11 is 10.000000000000002, not 10.
  exact = round(config.top_k * factor * group_size / config.num_experts, 9)
  slots = max(config.min_capacity, math.ceil(exact))
  return min(group_size, slots)
