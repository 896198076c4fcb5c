"""The dropless grouped matmul, forward and backward, per implementation, at a config's
MoE shapes: rows R = batch * context * top_k, M = d_model, H = expert_d_ff, E experts.

  python -m chimera.bench_grouped --config=configs/moe_top2.py:gpu [--block_sizes=256,512]

The rows are split among the experts unevenly, as a router in training splits them
(Dirichlet(2) shares, fixed seed). Prints ms per forward+backward of one [R, M] x [E, M, H]
grouped matmul, and its useful TFLOP/s (2 * R * M * H per pass, 3 passes).
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from chimera import config as config_lib
from chimera.grouped_matmul import ragged_matmul
from chimera.layers import compute_dtype

_CONFIG = flags.DEFINE_string("config", "configs/moe_top2.py", "Config file[:preset].")
_BLOCK_SIZES = flags.DEFINE_list("block_sizes", ["128", "256", "512", "1024"],
                                 "Block sizes of the 'blocks' implementation.")
_REPEATS = flags.DEFINE_integer("repeats", 20, "Timed calls per implementation.")


def uneven_group_sizes(rows: int, groups: int, seed: int = 0) -> np.ndarray:
  shares = np.random.default_rng(seed).dirichlet(np.full(groups, 2.0))
  sizes = np.floor(shares * rows).astype(np.int32)
  sizes[np.argmax(sizes)] += rows - sizes.sum()
  return sizes


def seconds_per_call(fn, *args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def main(argv):
  del argv
  m = config_lib.load(_CONFIG.value).model
  t = config_lib.load(_CONFIG.value).train
  rows, dtype = t.batch_size * t.context * m.top_k, compute_dtype(m)
  keys = jax.random.split(jax.random.key(0), 2)
  x = jax.random.normal(keys[0], (rows, m.d_model), dtype)
  w = jax.random.normal(keys[1], (m.num_experts, m.d_model, m.expert_d_ff), dtype)
  group_sizes = jnp.asarray(uneven_group_sizes(rows, m.num_experts))
  flops = 3 * 2 * rows * m.d_model * m.expert_d_ff
  print(f"{_CONFIG.value} on {jax.devices()[0].device_kind}: R={rows} M={m.d_model} "
        f"H={m.expert_d_ff} E={m.num_experts} {m.dtype}; rows per expert "
        f"{np.asarray(group_sizes).tolist()}")
  print("method | ms per forward+backward | useful TFLOP/s")
  methods = [("ragged_dot", 0)] + [("blocks", int(b)) for b in _BLOCK_SIZES.value]
  for method, block_size in methods:
    loss = lambda x, w, method=method, block_size=block_size: ragged_matmul(
        x, w, group_sizes, method=method, block_size=block_size or 1).astype(jnp.float32).sum()
    step = jax.jit(jax.grad(loss, argnums=(0, 1)))
    seconds = seconds_per_call(step, x, w, repeats=_REPEATS.value)
    name = method if method == "ragged_dot" else f"blocks, b={block_size}"
    print(f"{name} | {1e3 * seconds:.3f} | {flops / seconds / 1e12:.2f}")


if __name__ == "__main__":
  app.run(main)
