"""One dot at a time, through YNNPACK (XLA's choice in jaxlib 0.10.2) and through Eigen
(`Kernels(cpu_dots="eigen")`), interleaved, on the CPU.

  python results/cpu-experiments/cpu-dots/dots.py > results/cpu-experiments/cpu-dots/dots.txt

Shapes of the default preset (d_model 192, d_ff 768, 32 x 128 tokens) and of its MoE's
blocks (40 blocks of 256 rows, experts of hidden 384). Prints the median of `ROUNDS` calls
of each, with the compiled function's fusion kinds, so that the choice can be seen to take.
"""

import re
import time

import jax
import jax.numpy as jnp
import numpy as np

from chimera.layers import Kernels

ROUNDS = 30

keys = jax.random.split(jax.random.key(0), 6)
x, w = jax.random.normal(keys[0], (4096, 192)), jax.random.normal(keys[1], (192, 768))
g = jax.random.normal(keys[2], (4096, 768))
xb, wb = jax.random.normal(keys[3], (40, 256, 192)), jax.random.normal(keys[4], (40, 192, 384))
gb = jax.random.normal(keys[5], (40, 256, 384))
CASES = {
    "[4096, 192] x [192, 768]": (lambda x, w: x @ w, (x, w)),
    "its weight gradient, x^T g": (lambda x, g: x.T @ g, (x, g)),
    "its input gradient, g w^T": (lambda g, w: g @ w.T, (g, w)),
    "blocks [40, 256, 192] x [40, 192, 384]": (lambda a, b: jnp.einsum("nbm,nmh->nbh", a, b), (xb, wb)),
    "blocks, weight gradient": (lambda a, g: jnp.einsum("nbm,nbh->nmh", a, g), (xb, gb)),
    "blocks, input gradient": (lambda g, b: jnp.einsum("nbh,nmh->nbm", g, b), (gb, wb)),
}
FLOPS = 2 * 4096 * 192 * 768  # the same for every case

print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}; medians of {ROUNDS} interleaved calls")
print("dot | cpu_dots | ms | GFLOP/s | fusion kinds")
for name, (fn, args) in CASES.items():
  compiled = {}
  for choice in ("xla", "eigen"):
    options = Kernels(cpu_dots=choice).compiler_options()
    compiled[choice] = jax.jit(fn, compiler_options=options).lower(*args).compile()
    jax.block_until_ready(compiled[choice](*args))
  times = {choice: [] for choice in compiled}
  for _ in range(ROUNDS):
    for choice, f in compiled.items():
      start = time.perf_counter()
      jax.block_until_ready(f(*args))
      times[choice].append(time.perf_counter() - start)
  for choice, f in compiled.items():
    seconds = float(np.median(times[choice]))
    kinds = sorted(set(re.findall(r'"kind":"(__\w+)"', f.as_text()))) or ["none"]
    print(f"{name} | {choice} | {1e3 * seconds:.2f} | {FLOPS / seconds / 1e9:.0f} | {','.join(kinds)}")
