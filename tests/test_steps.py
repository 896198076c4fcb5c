"""The pure training pieces of chimera.steps against values worked out by hand: the
learning-rate schedule, which parameters AdamW decays, gradient clipping, the loss's MoE
terms and the step's token count."""

import dataclasses
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from chimera.config import Config, ModelConfig, TrainConfig
from chimera.decoder import Decoder
from chimera.layers import cross_entropy
from chimera.steps import init_state, loss_fn, make_optimizer, make_schedule, train_step


def test_schedule_warms_up_then_decays_to_the_minimum():
  t = TrainConfig(steps=100, warmup_steps=10, learning_rate=1e-3, min_learning_rate=1e-4)
  schedule = make_schedule(t)
  # Linear from 0 over the warmup, then a cosine over the 90 steps left, to the minimum.
  expected = {0: 0.0, 5: 5e-4, 10: 1e-3, 100: 1e-4,
              55: 1e-4 + 0.5 * (1e-3 - 1e-4) * (1 + math.cos(math.pi * 45 / 90)),
              25: 1e-4 + 0.5 * (1e-3 - 1e-4) * (1 + math.cos(math.pi * 15 / 90))}
  for step, lr in expected.items():
    assert float(schedule(step)) == pytest.approx(lr, rel=1e-5, abs=1e-12), step


def _updates(t: TrainConfig, params, grads_seq):
  tx = make_optimizer(t)
  state, out = tx.init(params), []
  for grads in grads_seq:
    updates, state = tx.update(grads, state, params)
    out.append(updates)
  return out


PARAMS = {"dense": {"kernel": jnp.full((3, 4), 2.0), "bias": jnp.full((4,), 2.0)},
          "norm": {"scale": jnp.full((4,), 2.0)}}


def test_weight_decay_is_for_matrices_only():
  """AdamW's decay term moves the kernel, not a bias or a norm scale."""
  grads = [jax.tree.map(lambda p: jnp.full(p.shape, 0.1), PARAMS)]
  base = TrainConfig(steps=10, warmup_steps=0, grad_clip=1e6)
  decayed = _updates(dataclasses.replace(base, weight_decay=0.1), PARAMS, grads)[0]
  plain = _updates(dataclasses.replace(base, weight_decay=0.0), PARAMS, grads)[0]
  chex.assert_trees_all_equal(decayed["dense"]["bias"], plain["dense"]["bias"])
  chex.assert_trees_all_equal(decayed["norm"], plain["norm"])
  lr = float(make_schedule(base)(0))
  np.testing.assert_allclose(decayed["dense"]["kernel"],
                             plain["dense"]["kernel"] - lr * 0.1 * PARAMS["dense"]["kernel"],
                             rtol=1e-6)


def test_gradients_are_clipped_to_the_global_norm():
  """Adam divides out a constant scale, so clipping shows over two steps whose gradient
  norms differ: clipped, both steps' gradients have norm 1 and the second update is
  Adam's on equal gradients; unclipped, it is not. Below the clip nothing changes."""
  def grads(norm):  # every leaf the same value, global norm `norm`
    size = sum(p.size for p in jax.tree.leaves(PARAMS))
    return jax.tree.map(lambda p: jnp.full(p.shape, norm / math.sqrt(size)), PARAMS)
  base = TrainConfig(steps=10, warmup_steps=0, weight_decay=0.0)
  clipped = _updates(dataclasses.replace(base, grad_clip=1.0), PARAMS, [grads(100.), grads(1.)])
  free = _updates(dataclasses.replace(base, grad_clip=1e12), PARAMS, [grads(100.), grads(1.)])
  unit = _updates(dataclasses.replace(base, grad_clip=1e12), PARAMS, [grads(1.), grads(1.)])
  chex.assert_trees_all_close(clipped[1], unit[1], rtol=1e-5)
  assert not np.allclose(free[1]["dense"]["kernel"], clipped[1]["dense"]["kernel"], rtol=1e-3)
  below = _updates(dataclasses.replace(base, grad_clip=10.0), PARAMS, [grads(2.), grads(0.5)])
  chex.assert_trees_all_equal(below, _updates(dataclasses.replace(base, grad_clip=1e12),
                                              PARAMS, [grads(2.), grads(0.5)]))


MOE = ModelConfig(vocab_size=11, num_layers=2, num_heads=2, d_model=8, d_ff=32, max_len=16,
                  num_experts=4, top_k=2, expert_d_ff=16, group_size=8)


def test_the_loss_adds_the_weighted_moe_losses():
  model = Decoder(MOE)
  tokens = jax.random.randint(jax.random.key(1), (2, 9), 0, 11)
  params = model.init(jax.random.key(0), tokens[:, :-1])["params"]
  def loss(load_balance_coef, z_loss_coef):
    config = dataclasses.replace(MOE, load_balance_coef=load_balance_coef,
                                 z_loss_coef=z_loss_coef)
    total, (token_sum, stats) = loss_fn(params, {}, Decoder(config), config, tokens,
                                        jax.random.key(2), True)
    return float(total), float(token_sum), stats
  plain, token_sum, stats = loss(0.0, 0.0)
  assert plain == pytest.approx(token_sum / (2 * 8), rel=1e-6)  # the mean over B * L
  assert loss(0.5, 0.0)[0] == pytest.approx(plain + 0.5 * float(stats["load_balance_loss"]),
                                            rel=1e-6)
  assert loss(0.0, 0.25)[0] == pytest.approx(plain + 0.25 * float(stats["z_loss"]), rel=1e-6)
  assert float(stats["load_balance_loss"]) > 0 and float(stats["z_loss"]) > 0


def test_a_step_counts_the_tokens_it_predicts():
  """tokens [A, B/A, L+1]: the step predicts A * B/A * L tokens (not the extra column),
  and its loss_sum over them is the mean cross-entropy times that count."""
  config = Config(model=dataclasses.replace(MOE, num_experts=0, top_k=1),
                  train=TrainConfig(batch_size=4, context=8, grad_accum=2))
  state = init_state(config)
  tokens = jax.random.randint(jax.random.key(1), (2, 2, 9), 0, 11)
  _, metrics = jax.jit(lambda s, t: train_step(s, t, jax.random.key(0), model=Decoder(
      config.model), config=config.model))(state, tokens)
  assert float(metrics["tokens"]) == 2 * 2 * 8
  logits, _ = Decoder(config.model).apply({"params": state.params},
                                          tokens.reshape(4, 9)[:, :-1], deterministic=True)
  mean = float(cross_entropy(logits, tokens.reshape(4, 9)[:, 1:]).mean())
  assert float(metrics["loss_sum"]) / float(metrics["tokens"]) == pytest.approx(mean, rel=1e-5)
