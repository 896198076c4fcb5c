"""The grouped matmul behind the dropless MoE path: rows sorted by expert times each
expert's weights.

  ragged_matmul(rows [R, M], weights [E, M, H], group_sizes [E]) -> [R, H]

rows[sum(group_sizes[:e]) : sum(group_sizes[:e + 1])] are multiplied by weights[e].
"""

import jax


def ragged_matmul(rows: jax.Array, weights: jax.Array, group_sizes: jax.Array) -> jax.Array:
  return jax.lax.ragged_dot(rows, weights, group_sizes)
