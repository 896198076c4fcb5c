"""The two matmuls and GELU of the experts in the block layout (40 x 256 rows), forward and
backward, as shipped (A: hidden [N, b, H]) and with the hidden transposed (B: [N, H, b]),
against the dense MLP of the same model ([4096, 192] -> 768 -> 192). Medians of 15
interleaved calls.  python results/cpu-experiments/block-matmul/chain.py
"""
import time, numpy as np, jax, jax.numpy as jnp
from chimera.layers import Kernels
opts = Kernels().compiler_options()
N, b, M, H = 40, 256, 192, 384
k = jax.random.split(jax.random.key(0), 6)
x = jax.random.normal(k[0], (N, b, M)); w1 = jax.random.normal(k[1], (N, M, H))*.05; w2 = jax.random.normal(k[2], (N, H, M))*.05
ct = jax.random.normal(k[3], (N, b, M))
xd = jax.random.normal(k[0], (4096, M)); W1 = jax.random.normal(k[1], (M, 2*H))*.05; W2 = jax.random.normal(k[2], (2*H, M))*.05
ctd = jax.random.normal(k[3], (4096, M))
def A(x, w1, w2):
  h = jax.nn.gelu(jnp.einsum('nbm,nmh->nbh', x, w1)); return jnp.einsum('nbh,nhd->nbd', h, w2)
def B(x, w1, w2):
  h = jax.nn.gelu(jnp.einsum('nbm,nmh->nhb', x, w1)); return jnp.einsum('nhb,nhd->nbd', h, w2)
def D(x, w1, w2):
  return jax.nn.gelu(x @ w1) @ w2
def mk(f, args, c):
  def loss(*a): return jnp.vdot(f(*a), c)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(*args).compile(opts), args
fs = {"A": mk(A, (x, w1, w2), ct), "B": mk(B, (x, w1, w2), ct), "dense": mk(D, (xd, W1, W2), ctd)}
print(float(jnp.max(jnp.abs(fs["A"][0](x,w1,w2)[1][0] - fs["B"][0](x,w1,w2)[1][0]))))
times = {n: [] for n in fs}
for r in range(15):
  for n, (f, a) in fs.items():
    t = time.perf_counter(); jax.block_until_ready(f(*a)); times[n].append(time.perf_counter() - t)
for n, t in times.items(): print(f"{n}: median {np.median(t)*1e3:.2f} ms")
