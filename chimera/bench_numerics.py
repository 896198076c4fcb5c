"""The fast paths against float32 references at a config's full shapes, on this device.

  python -m chimera.bench_numerics --config=configs/moe_top2.py:gpu [--set=train.batch_size=8]

The tests check every path on small shapes on the CPU; this checks the same paths where
they run for real (cuDNN attention, the embedding gradients at the full vocabulary, the
grouped matmul at the MoE's row count). Prints ||fast - reference|| / ||reference|| per
path: bf16 paths land between 1e-3 and 1e-2, float32 ones far under 1e-3.
"""

import sys
from typing import get_args

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags, logging

from chimera import config as config_lib
from chimera.bench import parse_overrides
from chimera.errors import ChimeraError, parse_flags, tool_main
from chimera.grouped_matmul import ragged_matmul
from chimera.layers import CrossEntropyKernel, compute_dtype, cross_entropy, embed_lookup

_CONFIG = flags.DEFINE_string("config", "configs/moe_top2.py:gpu", "Config file[:preset].")
_SET = flags.DEFINE_multi_string("set", [], "Override: section.field=value.")


def relative_error(fast, reference) -> float:
  fast, reference = (np.asarray(x, np.float64) for x in (fast, reference))
  return float(np.linalg.norm(fast - reference) / np.linalg.norm(reference))


def zipf_ids(key, shape, vocab_size: int) -> jax.Array:
  """Token ids that repeat as text does: P(id) ~ 1 / (rank + 1)."""
  logits = -jnp.log1p(jnp.arange(vocab_size, dtype=jnp.float32))
  return jax.random.categorical(key, logits, shape=shape).astype(jnp.int32)


@tool_main
def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # jax logs its platform search at INFO
  try:
    config = config_lib.load(_CONFIG.value, parse_overrides("set", _SET.value))
  except ChimeraError as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)
  m, t = config.model, config.train
  dtype = compute_dtype(m)
  keys = iter(jax.random.split(jax.random.key(0), 16))
  batch, length = t.batch_size, t.context
  print(f"{_CONFIG.value} on {jax.devices()[0].device_kind}, compute dtype {m.dtype}")

  # Attention: cuDNN (the default on GPU in bf16) and XLA, against XLA in float32.
  q, k, v = (jax.random.normal(next(keys), (batch, length, m.num_heads, m.head_dim))
             for _ in range(3))
  cotangent = jax.random.normal(next(keys), q.shape)

  def attention_grads(implementation, dtype):
    def loss(q, k, v):
      out = jax.nn.dot_product_attention(*(x.astype(dtype) for x in (q, k, v)), is_causal=True,
                                         implementation=implementation)
      return (out.astype(jnp.float32) * cotangent).sum(), out
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)

  with jax.default_matmul_precision("float32"):  # no TF32 in the reference
    reference_grads, reference = attention_grads("xla", jnp.float32)
  for implementation in ("cudnn", "xla") if jax.default_backend() == "gpu" else ("xla",):
    grads, out = attention_grads(implementation, dtype)
    print(f"attention {implementation} ({m.dtype}): output {relative_error(out, reference):.1e}, "
          f"dq {relative_error(grads[0], reference_grads[0]):.1e}, "
          f"dv {relative_error(grads[2], reference_grads[2]):.1e}")

  # The embedding's gradient over Zipf ids, against the float32 scatter-add.
  ids = zipf_ids(next(keys), (batch, length), m.vocab_size)
  table = jax.random.normal(next(keys), (m.vocab_size, m.d_model))
  rows_cotangent = jax.random.normal(next(keys), (batch, length, m.d_model))
  def grad(embed_grad, cotangent):  # ids and cotangent as arguments: no constant folding
    loss = lambda table, ids, cotangent: (embed_lookup(table, ids, embed_grad).astype(
        cotangent.dtype) * cotangent).astype(jnp.float32).sum()
    return jax.jit(jax.grad(loss))(table, ids, cotangent)

  reference = grad("scatter", rows_cotangent)
  for embed_grad in ("onehot", "sorted", "scatter"):
    error = relative_error(grad(embed_grad, rows_cotangent.astype(dtype)), reference)
    print(f"embedding gradient {embed_grad} ({m.dtype} cotangent): {error:.1e}")

  # The cross-entropy over logits in the compute dtype, against optax in float32.
  logits = 3 * jax.random.normal(next(keys), (max(1, batch // 8), length, m.vocab_size))
  targets = zipf_ids(next(keys), logits.shape[:-1], m.vocab_size)
  reference = jax.value_and_grad(lambda x: optax.softmax_cross_entropy_with_integer_labels(
      x, targets).mean())(logits.astype(dtype).astype(jnp.float32))
  for kernel in get_args(CrossEntropyKernel):
    fast = jax.jit(jax.value_and_grad(
        lambda x, targets: cross_entropy(x, targets, kernel).mean()))(logits.astype(dtype), targets)
    print(f"cross-entropy {kernel} ({m.dtype} logits): loss "
          f"{relative_error(fast[0], reference[0]):.1e}, "
          f"gradient {relative_error(fast[1], reference[1]):.1e}")

  # The grouped matmul at the MoE's rows, against ragged_dot in float32.
  experts, hidden = m.num_experts or 8, m.expert_d_ff or m.d_ff // 2
  rows = jax.random.normal(next(keys), (batch * length * m.top_k, m.d_model))
  weights = jax.random.normal(next(keys), (experts, m.d_model, hidden)) / np.sqrt(m.d_model)
  shares = np.random.default_rng(0).dirichlet(np.full(experts, 2.0))
  group_sizes = np.floor(shares * rows.shape[0]).astype(np.int32)
  group_sizes[0] += rows.shape[0] - group_sizes.sum()
  group_sizes = jnp.asarray(group_sizes)
  fast = jax.jit(ragged_matmul)(rows.astype(dtype), weights.astype(dtype), group_sizes)
  with jax.default_matmul_precision("float32"):
    reference = jax.jit(jax.lax.ragged_dot)(rows, weights, group_sizes)
  print(f"grouped matmul blocks ({m.dtype}): {relative_error(fast, reference):.1e}")

if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
