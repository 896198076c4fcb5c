"""The dropless grouped matmul, forward and backward, per implementation, at a config's
MoE shapes, as one call of the dropless layer in training sees them: rows R = T * top_k for
the T = (batch / grad_accum) * context / devices tokens of one device's micro-batch,
M = d_model, H = expert_d_ff, E experts.

  python -m chimera.bench_grouped --config=configs/moe_top2.py:gpu [--block_sizes=256,512]
  python -m chimera.bench_grouped --devices=8   # each of 8 data-parallel devices' share

The rows are split among the experts unevenly, as a router in training splits them
(Dirichlet(2) shares, fixed seed). Prints ms per forward+backward of one [R, M] x [E, M, H]
grouped matmul, and its useful TFLOP/s (2 * R * M * H per pass, 3 passes), the methods
timed interleaved in `--repeats` rounds, medians.

Then the whole dropless FFN (`chimera.moe.dropless_experts`: sort, block layout, both
matmuls and the activation, un-sort and gates; forward and backward) at each block size
against the dense MLP of the same FLOPs per token (hidden k * H), timed interleaved with
`--repeats` rounds, medians.
"""

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from chimera import config as config_lib, moe
from chimera.errors import ChimeraError, parse_flags, tool_main
from chimera.grouped_matmul import default_block_size, ragged_matmul
from chimera.layers import Kernels, compute_dtype

_CONFIG = flags.DEFINE_string("config", "configs/moe_top2.py", "Config file[:preset].")
_BLOCK_SIZES = flags.DEFINE_list("block_sizes", ["128", "256", "512", "1024"],
                                 "Block sizes of the 'blocks' implementation.")
_REPEATS = flags.DEFINE_integer("repeats", 20, "Timed calls per implementation.")
_DEVICES = flags.DEFINE_integer("devices", 1, "Data-parallel devices the micro-batch is split "
                                "over in training: the rows are one device's share.")


def uneven_group_sizes(rows: int, groups: int, seed: int = 0) -> np.ndarray:
  shares = np.random.default_rng(seed).dirichlet(np.full(groups, 2.0))
  sizes = np.floor(shares * rows).astype(np.int32)
  sizes[np.argmax(sizes)] += rows - sizes.sum()
  return sizes


def interleaved_medians(cases: dict, repeats: int) -> dict[str, float]:
  """{name: median seconds per call} of cases {name: (fn, args)}: each compiled and run
  once first, then timed in `repeats` interleaved rounds."""
  for fn, args in cases.values():
    jax.block_until_ready(fn(*args))
  times = {name: [] for name in cases}
  for _ in range(repeats):
    for name, (fn, args) in cases.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[name].append(time.perf_counter() - start)
  return {name: float(np.median(values)) for name, values in times.items()}


def load_checked() -> config_lib.Config:
  """The config, block sizes and repeats, checked before anything compiles."""
  config = config_lib.load(_CONFIG.value)
  if not config.model.num_experts:
    raise ChimeraError(f"--config: {_CONFIG.value} has no experts (model.num_experts=0)")
  if not all(b.strip().isdigit() and int(b) > 0 for b in _BLOCK_SIZES.value):
    raise ChimeraError(f"--block_sizes: expected positive integers, got "
                       f"{','.join(_BLOCK_SIZES.value)!r}")
  if _REPEATS.value < 1:
    raise ChimeraError(f"--repeats: must be >= 1, got {_REPEATS.value}")
  micro_batch = config.train.batch_size // config.train.grad_accum
  if _DEVICES.value < 1:
    raise ChimeraError(f"--devices: must be >= 1, got {_DEVICES.value}")
  if micro_batch % _DEVICES.value:
    raise ChimeraError(f"--devices: must divide the micro-batch of {micro_batch} sequences "
                       f"(train.batch_size / train.grad_accum), got {_DEVICES.value}")
  return config


@tool_main
def main(argv):
  del argv
  try:
    config = load_checked()
  except ChimeraError as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)
  m, t = config.model, config.train
  tokens = t.batch_size // t.grad_accum // _DEVICES.value * t.context  # one call's
  rows, dtype = tokens * m.top_k, compute_dtype(m)
  keys = jax.random.split(jax.random.key(0), 2)
  x = jax.random.normal(keys[0], (rows, m.d_model), dtype)
  w = jax.random.normal(keys[1], (m.num_experts, m.d_model, m.expert_d_ff), dtype)
  group_sizes = jnp.asarray(uneven_group_sizes(rows, m.num_experts))
  flops = 3 * 2 * rows * m.d_model * m.expert_d_ff
  print(f"{_CONFIG.value} on {jax.devices()[0].device_kind}: R={rows} M={m.d_model} "
        f"H={m.expert_d_ff} E={m.num_experts} {m.dtype}; rows per expert "
        f"{np.asarray(group_sizes).tolist()}; the default block size here: "
        f"{default_block_size(rows, m.num_experts)}")
  print(f"method | ms per forward+backward | useful TFLOP/s (medians of {_REPEATS.value} "
        f"interleaved rounds)")
  methods = [("ragged_dot", 1)] + [("blocks", int(b)) for b in _BLOCK_SIZES.value]
  cases = {}
  for method, block_size in methods:
    loss = lambda x, w, method=method, block_size=block_size: ragged_matmul(
        x, w, group_sizes, method=method, block_size=block_size).astype(jnp.float32).sum()
    step = jax.jit(jax.grad(loss, argnums=(0, 1)), compiler_options=Kernels().compiler_options())
    cases[method if method == "ragged_dot" else f"blocks, b={block_size}"] = (step, (x, w))
  for name, seconds in interleaved_medians(cases, _REPEATS.value).items():
    print(f"{name} | {1e3 * seconds:.3f} | {flops / seconds / 1e12:.2f}")
  ffn_against_dense(m, tokens, dtype)


def ffn_against_dense(m, tokens: int, dtype) -> None:
  """The dropless FFN per block size against the dense MLP of equal FLOPs, interleaved."""
  keys = jax.random.split(jax.random.key(1), 6)
  x = jax.random.normal(keys[0], (tokens, m.d_model), dtype)
  probs, expert_index = jax.lax.top_k(
      jax.nn.softmax(1.5 * jax.random.normal(keys[1], (tokens, m.num_experts))), m.top_k)
  gate = probs.astype(dtype)
  init = lambda key, shape: (0.05 * jax.random.normal(key, shape)).astype(dtype)
  experts = {"wi": init(keys[2], (m.num_experts, m.d_model, m.expert_d_ff)),
             "wo": init(keys[3], (m.num_experts, m.expert_d_ff, m.d_model))}
  dense = {"wi": init(keys[4], (m.d_model, m.top_k * m.expert_d_ff)),
           "wo": init(keys[5], (m.top_k * m.expert_d_ff, m.d_model))}
  summed = lambda f: jax.jit(jax.grad(lambda x, w: f(x, w).astype(jnp.float32).sum(),
                                      argnums=(0, 1)), compiler_options=Kernels().compiler_options())
  cases = {"dense MLP": (summed(lambda x, w: moe.ffn(x, w, "gelu")), dense)}
  default = default_block_size(tokens * m.top_k, m.num_experts)
  for block in sorted({int(b) for b in _BLOCK_SIZES.value} | {default}):
    name = f"dropless, b={block}" + (" (default)" if block == default else "")
    cases[name] = (summed(lambda x, w, block=block: moe.dropless_experts(
        x, gate, expert_index, w, "gelu", block_size=block)), experts)
  medians = interleaved_medians({name: (fn, (x, weights))
                                 for name, (fn, weights) in cases.items()}, _REPEATS.value)
  base = medians["dense MLP"]
  print(f"\nthe dropless FFN, forward+backward, T={tokens} tokens, k={m.top_k}, GELU; "
        f"medians of {_REPEATS.value} interleaved rounds")
  print("case | ms | x dense MLP")
  for name, seconds in medians.items():
    print(f"{name} | {1e3 * seconds:.2f} | {seconds / base:.2f}")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
