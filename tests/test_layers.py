"""The layers' fast paths against plain references: the embedding's gradient against
flax's nn.Embed, attention against softmax attention written out, the cross-entropy
against optax.

Shape letters as in chimera/layers.py: B batch, L length, N heads, D head dim, M model
dim, V vocab.
"""

import dataclasses
import functools
from typing import get_args

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from chimera import layers
from chimera.config import ModelConfig
from chimera.errors import ChimeraError
from chimera.decoder import Decoder
from chimera.layers import CausalSelfAttention, Embed, Kernels, cross_entropy

VOCAB, FEATURES = 13, 8
# Zipf-like repeats, as in real text: id 3 six times, id 0 three times, most ids never.
IDS = np.array([[3, 3, 0, 7, 3, 3], [0, 12, 3, 0, 3, 5]], np.int32)  # [B=2, L=6]

TOLERANCE = {jnp.float32: dict(atol=1e-6, rtol=1e-6), jnp.bfloat16: dict(atol=2e-2, rtol=2e-2)}


@pytest.mark.parametrize("embed_grad", ["onehot", "sorted", "scatter"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_embed_matches_flax_embed(embed_grad, dtype):
  init = nn.initializers.normal(1.0)
  ours = Embed(VOCAB, FEATURES, dtype=dtype, embedding_init=init, embed_grad=embed_grad)
  reference = nn.Embed(VOCAB, FEATURES, dtype=dtype, embedding_init=init)
  params = reference.init(jax.random.key(0), IDS)
  chex.assert_trees_all_equal_shapes_and_dtypes(ours.init(jax.random.key(0), IDS), params)
  # A cotangent that differs per position, so a wrong sum over repeats shows.
  weights = jax.random.normal(jax.random.key(1), (*IDS.shape, FEATURES))
  query = jax.random.normal(jax.random.key(2), (3, FEATURES))

  def loss(module, params):
    rows = module.apply(params, IDS)  # [B, L, M]
    logits = module.apply(params, query, method="attend")  # [3, V]: the tied head
    return (rows.astype(jnp.float32) * weights).sum() + logits.astype(jnp.float32).sum()

  chex.assert_trees_all_equal(ours.apply(params, IDS), reference.apply(params, IDS))
  value, grads = jax.jit(jax.value_and_grad(functools.partial(loss, ours)))(params)
  expected_value, expected_grads = jax.value_and_grad(functools.partial(loss, reference))(params)
  chex.assert_trees_all_close(value, expected_value, **TOLERANCE[dtype])
  # nn.Embed sums the repeats in the compute dtype, ours in float32: bf16 differs by rounding.
  chex.assert_trees_all_close(grads, expected_grads, **TOLERANCE[dtype])


def test_embed_gradient_sums_repeats_by_hand():
  table = jnp.zeros((4, 1))
  ids = jnp.array([2, 0, 2, 2], jnp.int32)
  cotangent = jnp.array([[1.0], [10.0], [100.0], [1000.0]])
  for embed_grad in ("onehot", "sorted", "scatter"):
    module = Embed(4, 1, embed_grad=embed_grad)
    grad = jax.grad(lambda t: (module.apply({"params": {"embedding": t}}, ids)
                               * cotangent).sum())(table)
    np.testing.assert_array_equal(grad[:, 0], [10.0, 0.0, 1101.0, 0.0], err_msg=embed_grad)


def test_narrow_ids_past_their_type_do_not_wrap():
  """uint8 ids (the byte tokenizer's arrays) with a vocabulary past 256: each kernel puts
  the gradient on the ids' own rows only, and the cross-entropy's gradient sums to zero."""
  table = jnp.zeros((300, 1))
  ids = np.array([0, 5, 44, 44], np.uint8)
  for embed_grad in ("onehot", "sorted", "scatter"):
    module = Embed(300, 1, embed_grad=embed_grad)
    grad = jax.grad(lambda t: module.apply({"params": {"embedding": t}}, ids).sum())(table)
    assert set(np.flatnonzero(grad[:, 0]).tolist()) == {0, 5, 44}, embed_grad
  for kernel in ("one_pass", "two_pass"):
    grad = jax.grad(lambda x: cross_entropy(x, np.array([0], np.uint8), kernel).sum())(
        jnp.zeros((1, 257)))
    assert abs(float(grad.sum())) < 1e-6 and float(grad[0, 256]) > 0, kernel


def reference_attention(params, x: np.ndarray, num_heads: int) -> np.ndarray:
  """Causal softmax attention, one head at a time in float64 numpy. x: [B, L, M]."""
  batch, length, d_model = x.shape
  head_dim = d_model // num_heads
  qkv = x.reshape(-1, d_model) @ np.asarray(params["qkv"]["kernel"], np.float64)
  q, k, v = qkv.reshape(batch, length, 3, num_heads, head_dim).transpose(2, 0, 3, 1, 4)
  out = np.zeros((batch, num_heads, length, head_dim))
  for b in range(batch):
    for n in range(num_heads):
      for i in range(length):
        scores = q[b, n, i] @ k[b, n, :i + 1].T / np.sqrt(head_dim)  # keys 0..i only
        weights = np.exp(scores - scores.max())
        out[b, n, i] = (weights / weights.sum()) @ v[b, n, :i + 1]
  out = out.transpose(0, 2, 1, 3).reshape(-1, d_model)
  return (out @ np.asarray(params["out"]["kernel"], np.float64)).reshape(batch, length, d_model)


CONFIG = ModelConfig(vocab_size=VOCAB, num_layers=2, num_heads=2, d_model=16, d_ff=32,
                     max_len=16)


@pytest.mark.parametrize("kernel", ["auto", "xla", "einsum"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_attention_matches_reference(kernel, dtype):
  cfg = dataclasses.replace(CONFIG, dtype=dtype)
  x = np.random.default_rng(0).normal(size=(2, 7, cfg.d_model)).astype(np.float32)
  layer = CausalSelfAttention(cfg, kernel)
  params = layer.init(jax.random.key(0), x, deterministic=True)["params"]
  out = jax.jit(functools.partial(layer.apply, deterministic=True))({"params": params}, x)
  chex.assert_shape(out, x.shape)
  expected = reference_attention(params, x.astype(np.float64), cfg.num_heads)
  # Tolerances relative to the output's scale (about 1e-2 at this init): an absolute bf16
  # tolerance of 2e-2 would pass an output of zeros.
  scale = np.abs(expected).max()
  tolerance = (dict(atol=1e-5 * scale, rtol=1e-5) if dtype == "float32"
               else dict(atol=2e-2 * scale, rtol=5e-2))
  np.testing.assert_allclose(np.asarray(out, np.float32), expected, **tolerance)


def test_cudnn_attention_where_it_cannot_run_is_one_line():
  """kernels.attention="cudnn" on the CPU (this suite's platform) was jax's RuntimeError
  with its traceback in chimera.bench --variants=kernels.attention=cudnn."""
  assert jax.default_backend() == "cpu"
  x = np.ones((1, 4, CONFIG.d_model), np.float32)
  layer = CausalSelfAttention(CONFIG, "cudnn")
  with pytest.raises(ChimeraError, match=r"^kernels.attention: 'cudnn' cannot run here \(cuDNN "
                                         r"is not detected\); 'auto' uses cuDNN where it fits"):
    layer.init(jax.random.key(0), x, deterministic=True)


@pytest.mark.parametrize("kernels, expected", [
    (Kernels(attention="einsum", embed_grad="onehot", cross_entropy="one_pass"),
     {"einsum attention", "onehot rows", "one-pass logsumexp"}),
    (Kernels(attention="xla", embed_grad="sorted", cross_entropy="two_pass"),
     {"xla attention", "sorted rows"}),
    (Kernels(attention="auto", embed_grad="scatter"), {"xla attention"}),  # auto: XLA on CPU
])
def test_each_kernel_choice_runs_its_implementation(kernels, expected, monkeypatch):
  """The Decoder's loss and gradient trace the implementation each Kernels field names
  (the choices compute the same numbers, so agreeing outputs alone cannot show this)."""
  seen = set()

  def spy(label, function):
    def wrapped(*args, **kwargs):
      seen.add(label(kwargs) if callable(label) else label)
      return function(*args, **kwargs)
    return wrapped
  monkeypatch.setattr(layers, "einsum_attention", spy("einsum attention",
                                                      layers.einsum_attention))
  monkeypatch.setattr(jax.nn, "dot_product_attention", spy(
      lambda kwargs: f"{kwargs['implementation']} attention", jax.nn.dot_product_attention))
  for name, function in layers._ROWS_GRAD.items():
    monkeypatch.setitem(layers._ROWS_GRAD, name, spy(f"{name} rows", function))
  monkeypatch.setattr(layers, "logsumexp_one_pass", spy("one-pass logsumexp",
                                                        layers.logsumexp_one_pass))
  tokens = jnp.zeros((2, 9), jnp.int32)
  params = Decoder(CONFIG, kernels).init(jax.random.key(0), tokens[:, :-1])["params"]
  seen.clear()  # the init's forward

  def loss(params):
    logits, _ = Decoder(CONFIG, kernels).apply({"params": params}, tokens[:, :-1])
    return cross_entropy(logits, tokens[:, 1:], kernels.cross_entropy).mean()
  jax.jit(jax.grad(loss)).lower(params)
  assert seen == expected


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_decoder_kernels_agree_forward_and_gradients(positions):
  """Every Kernels choice computes the same decoder and loss: logits, loss and parameter
  gradients (cuDNN attention aside: it runs on GPUs only)."""
  cfg = dataclasses.replace(CONFIG, positions=positions)
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, VOCAB, (2, 9)), jnp.int32)
  params = Decoder(cfg).init(jax.random.key(0), tokens[:, :-1])["params"]

  def loss_and_grads(kernels: Kernels):
    def loss(params):
      logits, _ = Decoder(cfg, kernels).apply({"params": params}, tokens[:, :-1])
      return cross_entropy(logits, tokens[:, 1:], kernels.cross_entropy).mean(), logits
    return jax.jit(jax.value_and_grad(loss, has_aux=True),
                   compiler_options=kernels.compiler_options())(params)

  reference = Kernels(embed_grad="scatter", attention="einsum", cross_entropy="two_pass",
                      cpu_dots="xla")
  others = [Kernels(), Kernels(embed_grad="onehot", attention="auto", cross_entropy="one_pass"),
            Kernels(embed_grad="sorted", attention="xla", cross_entropy="one_pass")]
  for field in dataclasses.fields(Kernels):  # every choice is run at least once
    used = {getattr(k, field.name) for k in [reference, *others]}
    assert used == set(get_args(Kernels.__annotations__[field.name])) - {"cudnn"}, field.name
  (loss, logits), grads = loss_and_grads(reference)
  for kernels in others:
    (other_loss, other_logits), other_grads = loss_and_grads(kernels)
    chex.assert_trees_all_close(other_logits, logits, atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close(other_loss, loss, atol=1e-6, rtol=1e-6)
    chex.assert_trees_all_close(other_grads, grads, atol=1e-6, rtol=1e-5)


def ynn_fusions(compiled) -> int:
  return compiled.as_text().count('"kind":"__ynn_fusion"')


def _product(kernels: Kernels):
  x, w = jnp.ones((64, 32)), jnp.ones((32, 48))
  return jax.jit(lambda x, w: jnp.tanh(x @ w) @ w.T,
                 compiler_options=kernels.compiler_options()).lower(x, w).compile()


def test_cpu_dots_eigen_leaves_no_dot_to_ynnpack():
  """cpu_dots="eigen" compiles every dot through Eigen: no YNNPACK fusion is left;
  "xla" passes no option, and an option this jaxlib lacks is reported as not taken."""
  assert Kernels(cpu_dots="xla").compiler_options() is None
  assert ynn_fusions(_product(Kernels())) == 0
  assert not layers._cpu_takes("xla_cpu_no_such_option")


def test_cpu_dots_eigen_turns_off_ynnpack_where_the_jaxlib_uses_it():
  """Where XLA's own choice sends dots to YNNPACK (jaxlib 0.10.2 does), "eigen" must pass
  the option that turns it off."""
  if not ynn_fusions(_product(Kernels(cpu_dots="xla"))):
    pytest.skip(f"jaxlib {jax.lib.__version__} hands no dot to YNNPACK by default")
  assert Kernels().compiler_options() == {"xla_cpu_experimental_ynn_fusion_type": ""}


def test_attention_dropout_still_drops():
  cfg = dataclasses.replace(CONFIG, dropout=0.5)
  x = np.random.default_rng(0).normal(size=(1, 6, cfg.d_model)).astype(np.float32)
  layer = CausalSelfAttention(cfg)
  params = layer.init(jax.random.key(0), x, deterministic=True)
  train = lambda seed: layer.apply(params, x, deterministic=False,
                                   rngs={"dropout": jax.random.key(seed)})
  evaluate = layer.apply(params, x, deterministic=True)
  assert not np.allclose(train(0), evaluate)
  assert not np.allclose(train(0), train(1))
  np.testing.assert_array_equal(train(0), train(0))


@pytest.mark.parametrize("kernel", ["one_pass", "two_pass"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_cross_entropy_matches_optax(dtype, kernel):
  rng = np.random.default_rng(0)
  logits = jnp.asarray(4 * rng.normal(size=(2, 5, 11)), dtype)  # [B, L, V]
  logits = logits.at[0, 0].add(60.0)  # a row far from the others: the running max moves
  targets = jnp.asarray(rng.integers(0, 11, (2, 5)), jnp.int32)
  weights = jnp.asarray(rng.normal(size=(2, 5)), jnp.float32)
  ours = lambda logits: (cross_entropy(logits, targets, kernel) * weights).sum()
  # The reference sees the same bf16 values, upcast: ours must not lose precision to bf16.
  reference = lambda logits: (optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), targets) * weights).sum()
  loss = cross_entropy(logits, targets, kernel)
  assert loss.dtype == jnp.float32
  chex.assert_trees_all_close(loss, optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), targets), atol=1e-5, rtol=1e-6)
  grad = jax.jit(jax.grad(ours))(logits)
  assert grad.dtype == dtype
  chex.assert_trees_all_close(grad.astype(jnp.float32),
                              jax.grad(reference)(logits).astype(jnp.float32),
                              **TOLERANCE[dtype])


def test_one_pass_logsumexp():
  """The one-pass reduction against jax.nn.logsumexp: rows whose max comes first, last
  or in the middle (the running max moves at every element, or never), a row of one large
  value (exp underflows for the rest), -inf entries (masked logits), and a long row."""
  rng = np.random.default_rng(1)
  rows = np.stack([np.arange(9.0), -np.arange(9.0), [0, 1, 2, 30, 2, 1, 0, -5, 3],
                   [-200.0] * 8 + [200.0], [-np.inf, 1, 2, -np.inf, 0, 0, 0, 0, 0]])
  for x in (rows, 8 * rng.normal(size=(3, 50304))):
    chex.assert_trees_all_close(layers.logsumexp_one_pass(jnp.asarray(x, jnp.float32)),
                                jax.nn.logsumexp(jnp.asarray(x, jnp.float32), axis=-1),
                                rtol=1e-6, atol=1e-5)
  with pytest.raises(ChimeraError, match="kernels.cross_entropy"):
    cross_entropy(jnp.zeros((2, 3)), jnp.zeros((2,), jnp.int32), "fused")


def test_rotary_attention_by_hand():
  """One head of D = 2 at positions 0 and 1, q = k = 3x, v = x: position 1's query and key
  turn by 1 radian, position 0's not, so the scores at position 1 are
  [q1 . k0, q1 . k1] / sqrt(2) = [-9 sin 1, 9] / sqrt(2) (both rotated: a relative angle)."""
  cfg = ModelConfig(vocab_size=5, num_layers=1, num_heads=1, d_model=2, d_ff=4, max_len=4,
                    positions="rotary")
  x = np.array([[[1.0, 0.0], [0.0, 1.0]]], np.float32)
  qkv = np.zeros((2, 6), np.float32)
  qkv[:, 0:2], qkv[:, 2:4], qkv[:, 4:6] = 3 * np.eye(2), 3 * np.eye(2), np.eye(2)
  params = {"qkv": {"kernel": qkv}, "out": {"kernel": np.eye(2, dtype=np.float32)}}
  out = CausalSelfAttention(cfg, "einsum").apply({"params": params}, x, deterministic=True)
  scores = np.array([-9 * np.sin(1.0), 9.0]) / np.sqrt(2)
  weights = np.exp(scores - scores.max()) / np.exp(scores - scores.max()).sum()
  np.testing.assert_allclose(out[0, 1], weights, rtol=1e-5)  # v = x: the weights themselves
