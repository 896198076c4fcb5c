"""GFLOP/s of a batched matmul [n, b, M] x [n, M, H] on this CPU, by rows per block b,
at 8192 rows in all: the expert shapes of moe_top2 at the default preset (M = 192,
H = 384, and 384 -> 192) and the dense MLP's (192 -> 768). Medians of 20 calls.
  python results/cpu-experiments/block-matmul/rates.py
"""
import time, numpy as np, jax, jax.numpy as jnp
from chimera.layers import Kernels
opts = Kernels().compiler_options()
shapes = [(256,192,384),(512,192,384),(1024,192,384),(4096,192,384),(8192,192,384),(4096,192,768),(256,384,192),(4096,384,192)]
fs = []
for (b,m,h) in shapes:
  n = max(1, 8192 // b)
  x = jnp.ones((n, b, m)); w = jnp.ones((n, m, h))
  f = jax.jit(lambda x, w: jnp.einsum("nbm,nmh->nbh", x, w)).lower(x, w).compile(opts)
  fs.append(((n,b,m,h), f, x, w))
res = {s: [] for s, *_ in fs}
for r in range(20):
  for s, f, x, w in fs:
    t = time.perf_counter(); jax.block_until_ready(f(x, w)); res[s].append(time.perf_counter() - t)
for s, t in res.items():
  n,b,m,h = s; fl = 2*n*b*m*h
  print(s, f"{np.median(t)*1e3:.2f} ms {fl/np.median(t)/1e9:.0f} GFLOP/s")
