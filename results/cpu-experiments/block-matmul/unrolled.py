"""The dropless FFN's block matmul at the default preset's moe_top2 shapes (40 blocks of
256 rows, M = 192, H = 384), forward and backward: one batched einsum (as shipped)
against 40 separate matmuls, and 4 batched einsums of 10 blocks. Medians of 15
interleaved calls.  python results/cpu-experiments/block-matmul/unrolled.py
"""
import time, numpy as np, jax, jax.numpy as jnp
from chimera.layers import Kernels
opts = Kernels().compiler_options()
print("opts", opts)
N, b, M, H = 40, 256, 192, 384
k = jax.random.split(jax.random.key(0), 4)
x = jax.random.normal(k[0], (N, b, M)); w = jax.random.normal(k[1], (N, M, H)) * 0.05
ct = jax.random.normal(k[2], (N, b, H))
def batched(x, w): return jnp.einsum("nbm,nmh->nbh", x, w)
def unrolled(x, w): return jnp.stack([x[i] @ w[i] for i in range(N)])
def unrolled4(x, w):  # groups of 10 as batched
  return jnp.concatenate([jnp.einsum("nbm,nmh->nbh", x[i:i+10], w[i:i+10]) for i in range(0, N, 10)])
def mk(f):
  def loss(x, w): return jnp.vdot(f(x, w), ct)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(x, w).compile(opts)
fs = {n: mk(f) for n, f in [("batched", batched), ("unrolled", unrolled), ("unrolled4", unrolled4)]}
fwd = {n: jax.jit(f).lower(x, w).compile(opts) for n, f in [("batched", batched), ("unrolled", unrolled)]}
ref = fs["batched"](x, w)
for n, f in fs.items():
  out = f(x, w); print(n, float(jnp.max(jnp.abs(out[1][1] - ref[1][1]))))
times = {n: [] for n in list(fs) + ["fwd_" + n for n in fwd]}
for r in range(15):
  for n, f in fs.items():
    t = time.perf_counter(); jax.block_until_ready(f(x, w)); times[n].append(time.perf_counter() - t)
  for n, f in fwd.items():
    t = time.perf_counter(); jax.block_until_ready(f(x, w)); times["fwd_" + n].append(time.perf_counter() - t)
for n, t in times.items(): print(f"{n}: median {np.median(t)*1e3:.2f} ms")
