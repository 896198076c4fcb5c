"""The two logsumexp kernels of the cross-entropy against a float64 reference, on XLA:CPU:
`one_pass` (chimera.layers.logsumexp_one_pass: one variadic reduction) and `two_pass`
(a max, then a sum of exponentials: jax.nn.logsumexp). 21 rows of 50,304 normal logits
(GPT-2's padded vocabulary) at four scales; the largest absolute error of each. Run from
the repository root: python results/cpu-experiments/cross-entropy/lse.py
"""
import jax
import jax.numpy as jnp
import numpy as np

from chimera.layers import logsumexp_one_pass

rng = np.random.default_rng(0)
print("logit scale | one_pass max error | two_pass max error")
for scale in (1, 5, 8, 20):
  x = jnp.asarray(scale * rng.normal(size=(21, 50304)), jnp.float32)
  reference = np.asarray([np.logaddexp.reduce(np.asarray(row, np.float64)) for row in x])
  one = np.abs(np.asarray(jax.jit(logsumexp_one_pass)(x)) - reference).max()
  two = np.abs(np.asarray(jax.nn.logsumexp(x, axis=-1)) - reference).max()
  print(f"{scale} | {one:.2e} | {two:.2e}")
