"""Mixture-of-Experts feed-forward layer in the Switch / GShard style.

Two ways to run the experts (`config.dispatch`):
- "einsum": static shapes. Each expert has C slots per group; one-hot dispatch/combine
  einsums move the tokens in and out, and assignments beyond C are dropped. This follows
  the Switch Transformer (Fedus et al., 2021) and GShard (Lepikhin et al., 2020) papers.
- "dropless": no capacity and no drops. The token-expert assignments are sorted by
  expert and the experts run as one grouped matmul (`jax.lax.ragged_dot`).

Read top to bottom: `expert_capacity`, then `route` (the whole einsum routing math, a pure
function of the router logits) and `route_dropless`, which share the losses and metrics
of `_router_stats`; then `dropless_experts`; then `MoeLayer`, which routes and runs the
experts.

Shape letters: G groups, S tokens per group, E experts, C capacity (slots per expert per
group), K choices per token (top-k), M model dim, H expert hidden dim, T tokens (G*S).
"""

import math
from typing import Literal, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from chimera import sharding
from chimera.config import ModelConfig
from chimera.layers import compute_dtype


def expert_capacity(group_size: int, num_experts: int, k: int, capacity_factor: float,
                    min_capacity: int = 4) -> int:
  """Slots per expert per group: C = max(min_capacity, ceil(k * capacity_factor * S / E))."""
  return max(min_capacity, math.ceil(k * capacity_factor * group_size / num_experts))


class Routing(NamedTuple):
  """What `route` (or `route_dropless`) decides for one MoE layer.

  `route_dropless` has no slots: its dispatch and combine are None, and its
  dropped_fraction is 0. The losses and the other metrics mean the same on both paths.
  """

  dispatch: jax.Array | None  # [G, S, E, C] 1.0 where token s occupies slot c of expert e
  combine: jax.Array | None  # [G, S, E, C] the token's gate weight at that slot, else 0
  load_balance_loss: jax.Array  # scalar; 1.0 under perfectly uniform routing
  z_loss: jax.Array  # scalar
  dropped_fraction: jax.Array  # scalar: share of the G*S*K assignments that found no slot
  expert_load: jax.Array  # [E]: share of all assignments that chose each expert (pre-drop)
  router_entropy: jax.Array  # scalar: mean entropy of the router distribution, in nats
  router_confidence: jax.Array  # scalar: mean top-1 router probability


def _top_k_gates(router_logits: jax.Array, k: int,
                 renormalize: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
  """router_logits [G, S, E] -> probs [G, S, E], gate [G, S, K], expert_index [G, S, K].

  The gates are the softmax probabilities of the k best experts, best first; with
  `renormalize` they are divided by their sum.
  """
  num_experts = router_logits.shape[-1]
  if not 1 <= k <= num_experts:
    raise ValueError(f"k={k} must be between 1 and the number of experts {num_experts}")
  probs = jax.nn.softmax(router_logits, axis=-1)
  gate, expert_index = jax.lax.top_k(probs, k)
  if renormalize:
    gate = gate / gate.sum(axis=-1, keepdims=True)
  return probs, gate, expert_index


def _router_stats(router_logits: jax.Array, probs: jax.Array, expert_index: jax.Array,
                  dropped_fraction: jax.Array) -> dict[str, jax.Array]:
  """The Routing fields other than dispatch and combine, as keyword arguments.

  router_logits, probs: [G, S, E]; expert_index: [G, S, K]; dropped_fraction: scalar.
  load_balance_loss = E * sum_e f_e * P_e per group, averaged over groups, where f_e is
  the share of the group's K*S assignments that chose e (counted before any drop) and
  P_e the mean router probability of e. z_loss = mean over tokens of logsumexp(logits)^2.
  """
  groups, group_size, num_experts = router_logits.shape
  k = expert_index.shape[-1]
  choice = jax.nn.one_hot(expert_index, num_experts, dtype=jnp.float32)  # [G, S, K, E]
  assigned_share = choice.sum(axis=(1, 2)) / (group_size * k)  # f: [G, E]
  mean_prob = probs.mean(axis=1)  # P: [G, E]
  log_probs = jax.nn.log_softmax(router_logits, axis=-1)
  return dict(
      load_balance_loss=jnp.mean(num_experts * jnp.sum(assigned_share * mean_prob, axis=-1)),
      z_loss=jnp.mean(jax.nn.logsumexp(router_logits, axis=-1) ** 2),
      dropped_fraction=dropped_fraction,
      expert_load=choice.sum(axis=(0, 1, 2)) / (groups * group_size * k),
      router_entropy=jnp.mean(-jnp.sum(probs * log_probs, axis=-1)),
      router_confidence=probs.max(axis=-1).mean(),  # the top-1 gate, before renormalizing
  )


def route(router_logits: jax.Array, *, k: int, capacity: int,
          priority: Literal["token", "rank"] = "token",
          renormalize: bool = False) -> Routing:
  """Top-k routing of each group's tokens to experts with a static capacity.

  Args:
    router_logits: [G, S, E] float32.
    k: experts per token, 1 <= k <= E (1 is Switch, 2 is GShard / Mixtral).
    capacity: C, slots per expert per group. Assignments beyond it are dropped: the token
      gets nothing from that expert and the residual connection carries it.
    priority: who gets a slot when an expert is full.
      "token": all k choices of token s are placed before any choice of token s+1, in
        position order. Causal: a token's fate depends only on earlier tokens.
      "rank": every token's r-th choice before any token's (r+1)-th choice, position
        order within a rank (GShard, flaxformer). With k >= 2 a token's second choice
        can lose its slot to a later token's first choice, so future tokens leak into
        the past. Kept for comparison.
    renormalize: divide the k gate weights by their sum. Off by default: with k=1 the
      gate would be a constant 1 and the router would get no gradient from the LM loss.

  Returns:
    Routing. The gate weights are the softmax probabilities of the chosen experts. The
    losses and metrics are those of `_router_stats`.
  """
  groups, group_size, num_experts = router_logits.shape
  probs, gate, expert_index = _top_k_gates(router_logits, k, renormalize)  # gate: [G, S, K]
  choice = jax.nn.one_hot(expert_index, num_experts, dtype=jnp.float32)  # [G, S, K, E]

  # Lay the assignments out in priority order, and count for each one how many earlier
  # assignments chose the same expert: that count is its slot in the expert's buffer.
  if priority == "token":
    ordered = choice.reshape(groups, group_size * k, num_experts)  # order (s, r)
    earlier = jnp.cumsum(ordered, axis=1) - ordered
    earlier = earlier.reshape(groups, group_size, k, num_experts)
  elif priority == "rank":
    ordered = choice.transpose(0, 2, 1, 3).reshape(groups, k * group_size, num_experts)
    earlier = jnp.cumsum(ordered, axis=1) - ordered  # order (r, s)
    earlier = earlier.reshape(groups, k, group_size, num_experts).transpose(0, 2, 1, 3)
  else:
    raise ValueError(f"priority must be 'token' or 'rank', got {priority!r}")
  slot_index = jnp.sum(earlier * choice, axis=-1).astype(jnp.int32)  # [G, S, K]
  kept = slot_index < capacity  # [G, S, K]
  # one_hot of an index >= C is all zeros, so overflowing assignments vanish here.
  slot = jax.nn.one_hot(slot_index, capacity, dtype=jnp.float32)  # [G, S, K, C]

  dispatch = jnp.einsum("gske,gskc->gsec", choice, slot)  # [G, S, E, C]
  combine = jnp.einsum("gsk,gske,gskc->gsec", gate, choice, slot)  # [G, S, E, C]
  return Routing(dispatch=dispatch, combine=combine,
                 **_router_stats(router_logits, probs, expert_index, 1.0 - kept.mean()))


def route_dropless(router_logits: jax.Array, *, k: int,
                   renormalize: bool = False) -> tuple[jax.Array, jax.Array, Routing]:
  """Top-k routing with no capacity: every assignment is kept.

  Args:
    router_logits: [G, S, E] float32. The groups only matter to the load-balance loss,
      which is computed per group exactly as in `route`.
    k, renormalize: as in `route`.

  Returns:
    gate [G, S, K], expert_index [G, S, K] int32, and a Routing with dispatch and combine
    None and dropped_fraction 0.
  """
  probs, gate, expert_index = _top_k_gates(router_logits, k, renormalize)
  stats = _router_stats(router_logits, probs, expert_index, jnp.zeros((), jnp.float32))
  return gate, expert_index, Routing(dispatch=None, combine=None, **stats)


def dropless_experts(x: jax.Array, gate: jax.Array, expert_index: jax.Array,
                     weights: dict[str, jax.Array], activation: Literal["gelu", "swiglu"],
                     skip_experts: bool = False) -> jax.Array:
  """y_t = sum_r gate[t, r] * expert_{expert_index[t, r]}(x_t), as one grouped matmul.

  The T*K assignments are sorted by expert, so that each expert's rows are contiguous,
  and `jax.lax.ragged_dot` multiplies each run of rows by that expert's weights. Nothing
  is padded and nothing is dropped. On CPU (jax 0.10.2) ragged_dot is lowered to a masked
  dense dot over all E experts, so there it costs E times the FLOPs of its rows.

  Args:
    x: [T, M] tokens, in the compute dtype.
    gate: [T, K] gate weights; expert_index: [T, K] int32 chosen experts.
    weights: "wi" (or "wi_gate" and "wi_up") [E, M, H] and "wo" [E, H, M].
    activation: "gelu" or "swiglu".
    skip_experts: benchmarks only; each expert returns its input rows unchanged.

  Returns:
    y: [T, M].
  """
  num_tokens, k = expert_index.shape
  num_experts = weights["wo"].shape[0]
  expert_ids = expert_index.reshape(-1)  # [T*K], assignment a = t * K + r
  # Stable, so within an expert the rows stay in token order.
  order = jnp.argsort(expert_ids, stable=True)  # [T*K] assignment ids, sorted by expert
  x_sorted = x[order // k]  # [T*K, M]
  group_sizes = jnp.bincount(expert_ids, length=num_experts).astype(jnp.int32)  # [E]

  if skip_experts:
    out_sorted = x_sorted
  else:
    matmul = lambda rows, w: jax.lax.ragged_dot(rows, w, group_sizes)
    if activation == "swiglu":
      hidden = nn.silu(matmul(x_sorted, weights["wi_gate"])) * matmul(x_sorted, weights["wi_up"])
    else:
      hidden = nn.gelu(matmul(x_sorted, weights["wi"]))  # [T*K, H]
    out_sorted = matmul(hidden, weights["wo"])  # [T*K, M]

  out = out_sorted[jnp.argsort(order)].reshape(num_tokens, k, -1)  # [T, K, M], token order
  return jnp.einsum("tkm,tk->tm", out, gate.astype(out.dtype))


class MoeLayer(nn.Module):
  """The MoE feed-forward sublayer: router, `route`, experts batched over E.

  With `config.dispatch == "dropless"`, `route_dropless` and `dropless_experts` replace
  the capacity, dispatch and combine; the router logits, and so the losses, are still
  computed per group.

  Tokens are cut into groups of `config.group_size` consecutive tokens (of the flattened
  [B*L] batch; when group_size divides L, groups never straddle two sequences). If the
  token count is not a multiple of group_size, the whole batch is one group. Training
  uses `capacity_factor`, evaluation (`deterministic=True`) `eval_capacity_factor`.

  Decoding (`decode=True`) never drops a token: a prompt is routed with capacity S (every
  expert could take the whole group), and a single new token per sequence skips the
  dispatch tensors (and, under "dropless", the sort) altogether: it runs just its k
  experts, whose weights are gathered. In that case the returned Routing is None (there is
  nothing to balance).
  """

  config: ModelConfig
  skip_experts: bool = False  # benchmarks only: time routing, dispatch and combine alone

  def _expert_weights(self, d_model: int) -> dict[str, jax.Array]:
    """The experts' weights, each with a leading E axis, in the compute dtype."""
    cfg = self.config
    init = nn.initializers.variance_scaling(cfg.expert_init_scale, "fan_in", "truncated_normal",
                                            in_axis=-2, out_axis=-1, batch_axis=(0,))
    shape = lambda fan_in, fan_out: (cfg.num_experts, fan_in, fan_out)
    names = ("wi_gate", "wi_up") if cfg.activation == "swiglu" else ("wi",)
    weights = {name: self.param(name, init, shape(d_model, cfg.expert_d_ff)) for name in names}
    weights["wo"] = self.param("wo", init, shape(cfg.expert_d_ff, d_model))
    return {name: w.astype(compute_dtype(cfg)) for name, w in weights.items()}

  def _experts(self, expert_in: jax.Array, weights: dict[str, jax.Array]) -> jax.Array:
    """Each expert's MLP on its own tokens: expert_in [E, C, M] -> [E, C, M]."""
    if self.skip_experts:
      return expert_in
    if self.config.activation == "swiglu":
      hidden = (nn.silu(jnp.einsum("ecm,emh->ech", expert_in, weights["wi_gate"]))
                * jnp.einsum("ecm,emh->ech", expert_in, weights["wi_up"]))
    else:
      hidden = nn.gelu(jnp.einsum("ecm,emh->ech", expert_in, weights["wi"]))  # [E, C, H]
    return jnp.einsum("ech,ehm->ecm", hidden, weights["wo"])

  @nn.compact
  def __call__(self, x: jax.Array, *, deterministic: bool,
               decode: bool = False) -> tuple[jax.Array, Routing | None]:
    # x: [B, L, M]
    cfg = self.config
    dtype = compute_dtype(cfg)
    batch, length, d_model = x.shape
    num_tokens = batch * length
    group_size = cfg.group_size if num_tokens % cfg.group_size == 0 else num_tokens
    groups = num_tokens // group_size
    x = sharding.constrain(x.reshape(groups, group_size, d_model), sharding.BATCH)  # [G, S, M]

    router_input = x.astype(jnp.float32)
    if not deterministic and cfg.router_jitter > 0:
      router_input *= jax.random.uniform(self.make_rng("dropout"), router_input.shape,
                                         minval=1.0 - cfg.router_jitter,
                                         maxval=1.0 + cfg.router_jitter)
    # Not the experts' initializer: the router kernel [M, E] has no leading expert axis.
    router_init = nn.initializers.variance_scaling(cfg.expert_init_scale, "fan_in",
                                                   "truncated_normal")
    router_logits = nn.Dense(cfg.num_experts, use_bias=False, dtype=jnp.float32,
                             kernel_init=router_init, name="router")(router_input)  # [G, S, E]
    weights = self._expert_weights(d_model)

    if decode and length == 1:
      _, gate, expert_index = _top_k_gates(router_logits, cfg.top_k, cfg.renormalize_gates)
      chosen = {name: w[expert_index.reshape(-1)] for name, w in weights.items()}  # [T*K, ...]
      token_in = jnp.repeat(x.reshape(-1, 1, d_model), cfg.top_k, axis=0).astype(dtype)
      out = self._experts(token_in, chosen).reshape(groups, group_size, cfg.top_k, d_model)
      y = jnp.einsum("gskm,gsk->gsm", out, gate.astype(dtype))
      return y.reshape(batch, length, d_model), None

    if cfg.dispatch == "dropless":
      gate, expert_index, routing = route_dropless(router_logits, k=cfg.top_k,
                                                   renormalize=cfg.renormalize_gates)
      y = dropless_experts(x.reshape(num_tokens, d_model).astype(dtype),
                           gate.reshape(num_tokens, cfg.top_k),
                           expert_index.reshape(num_tokens, cfg.top_k), weights,
                           cfg.activation, self.skip_experts)  # [T, M]
      return y.reshape(batch, length, d_model), routing

    if decode:
      capacity = group_size
    else:
      factor = cfg.eval_capacity_factor if deterministic else cfg.capacity_factor
      capacity = expert_capacity(group_size, cfg.num_experts, cfg.top_k, factor,
                                 cfg.min_capacity)
    routing = route(router_logits, k=cfg.top_k, capacity=capacity, priority=cfg.priority,
                    renormalize=cfg.renormalize_gates)
    # Expert parallelism, through GSPMD rather than shard_map: the groups G are split over
    # every device (`sharding.BATCH`), and the expert buffers [E, G, C, M] over `expert`
    # (G over `data`), so the dispatch and combine einsums become all-to-alls over the
    # expert axis that XLA inserts and schedules. The math stays the single-device math
    # above; on one device the constraints are no-ops.
    expert_in = jnp.einsum("gsec,gsm->egcm", routing.dispatch.astype(dtype), x.astype(dtype))
    expert_in = sharding.constrain(expert_in, sharding.EXPERT, sharding.DATA)
    expert_out = self._experts(expert_in.reshape(cfg.num_experts, -1, d_model), weights)
    expert_out = expert_out.reshape(expert_in.shape)  # [E, G, C, M]
    expert_out = sharding.constrain(expert_out, sharding.EXPERT, sharding.DATA)
    y = jnp.einsum("egcm,gsec->gsm", expert_out, routing.combine.astype(dtype))  # [G, S, M]
    y = sharding.constrain(y, sharding.BATCH)
    return y.reshape(batch, length, d_model), routing
