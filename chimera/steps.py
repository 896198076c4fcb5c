"""The pure pieces of training: state, optimiser, loss and the jitted steps.

Train, bench, generate and scaling all import these; none of them imports the loop.
`train_step` and `eval_step` are module-level pure functions: bind the model and config
with functools.partial and jit them once.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct
from flax.training import train_state

from chimera import sharding
from chimera.config import Config, ModelConfig, TrainConfig
from chimera.decoder import Decoder
from chimera.moe import ROUTED_EXPERT_PARAMS
from chimera.routers import update_router_bias
from chimera.layers import Kernels, cross_entropy

class TrainState(train_state.TrainState):
  """flax's TrainState plus `model_state`: the model's non-parameter collections that
  the step updates itself, outside the optimiser (today "router_bias", the per-expert
  bias of auxiliary-loss-free balancing). Saved and restored with the rest."""

  model_state: Any = struct.field(default_factory=dict)


def make_schedule(t: TrainConfig) -> optax.Schedule:
  """Linear warmup from 0, then cosine decay to `min_learning_rate` at `steps`."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=t.learning_rate, warmup_steps=t.warmup_steps,
      decay_steps=t.steps, end_value=t.min_learning_rate)


def _module_and_name(path) -> tuple[str | None, str | None]:
  """The (parent module, leaf name) of a parameter's path: ("router", "kernel") for a
  router kernel, ("moe", "wi") for a routed expert matrix."""
  keys = [getattr(key, "key", None) for key in path]
  return (keys[-2] if len(keys) > 1 else None), (keys[-1] if keys else None)


def is_router(path) -> bool:
  return _module_and_name(path)[0] == "router"


def is_routed_expert(path) -> bool:
  module, name = _module_and_name(path)
  return module == "moe" and name in ROUTED_EXPERT_PARAMS


def make_optimizer(t: TrainConfig) -> optax.GradientTransformation:
  """AdamW on the schedule above, after global-norm clipping.

  Weight decay applies to matrices (embeddings, kernels, expert weights), not to norm
  scales or biases, not to the MoE routers when `router_weight_decay` is off, and to the
  routed experts at `expert_weight_decay` times `weight_decay` (0: not at all). The
  routers' updates (decay included) are scaled by `router_lr_scale`, the routed experts'
  by `expert_lr_scale`: per-group learning rates.
  """
  schedule = make_schedule(t)
  mask = lambda keep: lambda params: jax.tree_util.tree_map_with_path(keep, params)
  expert_decay = float(t.expert_weight_decay)
  matrices = lambda path, p: p.ndim >= 2 and (t.router_weight_decay or not is_router(path))
  decay = mask(lambda path, p: matrices(path, p)
               and (expert_decay == 1.0 or not is_routed_expert(path)))
  if expert_decay in (0.0, 1.0):  # optax's AdamW as it stands
    adamw = optax.adamw(schedule, b1=t.b1, b2=t.b2, weight_decay=t.weight_decay, mask=decay)
  else:  # the same chain as optax.adamw, with the routed experts' decay term apart
    adamw = optax.chain(
        optax.scale_by_adam(b1=t.b1, b2=t.b2),
        optax.add_decayed_weights(t.weight_decay, mask=decay),
        optax.add_decayed_weights(t.weight_decay * expert_decay, mask=mask(
            lambda path, p: matrices(path, p) and is_routed_expert(path))),
        optax.scale_by_learning_rate(schedule))
  parts = [optax.clip_by_global_norm(t.grad_clip), adamw]
  for scale, group in ((t.router_lr_scale, is_router), (t.expert_lr_scale, is_routed_expert)):
    if scale != 1.0:
      parts.append(optax.masked(optax.scale(scale), mask(lambda path, _, g=group: g(path))))
  return optax.chain(*parts)


def loss_fn(params, model_state: dict, model: nn.Module, config: ModelConfig,
            tokens: jax.Array, rng: jax.Array, deterministic: bool):
  """Mean next-token cross-entropy plus the weighted MoE losses. tokens: [B, L+1]."""
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  logits, stats = model.apply({"params": params, **model_state}, inputs,
                              deterministic=deterministic, rngs={"dropout": rng})
  kernel = getattr(model, "kernels", Kernels()).cross_entropy
  token_loss = cross_entropy(logits, targets, kernel)  # [B, L] float32, logits in compute dtype
  loss = (token_loss.mean() + config.load_balance_coef * stats["load_balance_loss"]
          + config.z_loss_coef * stats["z_loss"])
  return loss, (token_loss.sum(), stats)


def train_step(state: TrainState, tokens: jax.Array, rng: jax.Array, *, model: nn.Module,
               config: ModelConfig, log_norms: bool = True) -> tuple[TrainState, dict]:
  """One optimiser step over tokens [A, B/A, L+1] (A gradient-accumulation micro-batches).

  Returns the new state and metrics as sums with their denominators (`tokens`, and
  `steps` = 1), to be averaged on the host. The gradient's global norm is always among
  them; the new parameters' and the update's only with `log_norms`.
  """
  rng = jax.random.fold_in(rng, state.step)
  grad_fn = jax.grad(loss_fn, has_aux=True)

  def micro_step(grads_sum, micro):
    index, micro_tokens = micro
    grads, (loss_sum, stats) = grad_fn(state.params, state.model_state, model, config, micro_tokens,
                                       jax.random.fold_in(rng, index), False)
    return jax.tree.map(jnp.add, grads_sum, grads), (loss_sum, stats)

  accum = tokens.shape[0]
  if accum == 1:  # no accumulation buffers: they cost a pass over the params on XLA:CPU
    grads, (loss_sum, stats) = grad_fn(state.params, state.model_state, model, config, tokens[0],
                                       jax.random.fold_in(rng, 0), False)
    loss_sums, stats = loss_sum[None], jax.tree.map(lambda x: x[None], stats)
  else:
    zeros = jax.tree.map(jnp.zeros_like, state.params)
    grads, (loss_sums, stats) = jax.lax.scan(micro_step, zeros, (jnp.arange(accum), tokens))
    grads = jax.tree.map(lambda g: g / accum, grads)
  new_state = state.apply_gradients(grads=grads)
  if config.num_experts and config.router_bias_rate > 0:  # aux-loss-free balancing, after the step
    new_state = new_state.replace(model_state={
        **state.model_state, "router_bias": update_router_bias(
            state.model_state["router_bias"], stats["expert_load"].mean(axis=0),
            config.router_bias_rate, config)})
  metrics = {
      "loss_sum": loss_sums.sum(),
      "tokens": jnp.asarray(tokens[..., 1:].size, jnp.float32),
      "steps": jnp.ones((), jnp.float32),
      "grad_norm": optax.tree.norm(grads),
      **{name: value.mean(axis=0) for name, value in stats.items()},
  }
  if log_norms:
    updates = jax.tree.map(jnp.subtract, new_state.params, state.params)
    metrics.update(param_norm=optax.tree.norm(new_state.params),
                   update_norm=optax.tree.norm(updates))
  return new_state, metrics


def eval_step(params, model_state: dict, tokens: jax.Array, *, model: nn.Module,
              config: ModelConfig) -> dict:
  """Summed cross-entropy over tokens [B, L+1], or [A, B/A, L+1]: A micro-batches, one
  after another, as `train_step` runs them (so evaluation's activations and, on a mesh,
  its exchanges follow the micro-batch, not the batch). Evaluation capacity, no dropout.
  The routing statistics are means over the micro-batches."""
  def forward(micro_tokens):
    _, (loss_sum, stats) = loss_fn(params, model_state, model, config, micro_tokens,
                                   jax.random.key(0), True)
    return loss_sum, stats["dropped_fraction"], stats["expert_load"]

  if tokens.ndim == 2 or tokens.shape[0] == 1:
    loss_sum, dropped, load = forward(tokens.reshape(-1, *tokens.shape[-1:]))
  else:
    _, (loss_sums, dropped, load) = jax.lax.scan(lambda _, micro: (None, forward(micro)),
                                                 None, tokens)
    loss_sum, dropped, load = loss_sums.sum(), dropped.mean(axis=0), load.mean(axis=0)
  return {"loss_sum": loss_sum, "tokens": jnp.asarray(tokens[..., 1:].size, jnp.float32),
          "dropped_fraction": dropped, "expert_load": load}


def init_state(config: Config, mesh: jax.sharding.Mesh | None = None) -> TrainState:
  """A fresh TrainState; with a mesh, each leaf is created where `sharding` puts it."""
  model = Decoder(config.model)
  tx = make_optimizer(config.train)

  def create():
    dummy = jnp.zeros((1, config.train.context), jnp.int32)
    variables = model.init(jax.random.key(config.train.seed), dummy)
    params = variables.pop("params")
    return TrainState.create(apply_fn=model.apply, params=params, tx=tx,
                             model_state=dict(variables))

  if mesh is None:
    return jax.jit(create)()
  shardings = sharding.state_sharding(mesh, jax.eval_shape(create))
  return jax.jit(create, out_shardings=shardings)()
