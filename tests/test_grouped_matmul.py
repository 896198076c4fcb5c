"""The grouped matmul's block layout against jax.lax.ragged_dot: values and gradients.

Shape letters as in chimera/grouped_matmul.py: R rows, M input dim, H output dim, E groups.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from chimera.grouped_matmul import (MAX_BLOCK, MIN_BLOCK, block_layout, default_block_size,
                                    ragged_matmul)

ROWS, M, H = 13, 4, 3


@pytest.mark.parametrize("group_sizes", [
    [5, 0, 8],  # an empty group in the middle
    [0, 0, 13],  # every row in the last group
    [13, 0, 0],  # ...in the first; empty groups at the end
    [1, 1, 1, 1, 9],
    [4, 0, 6],  # 3 rows in no group: their outputs are zeros
])
@pytest.mark.parametrize("block_size,dtype", [(1, jnp.float32), (4, jnp.float32),
                                              (16, jnp.float32), (4, jnp.bfloat16)])
def test_blocks_match_ragged_dot(group_sizes, block_size, dtype):
  keys = jax.random.split(jax.random.key(sum(group_sizes) + block_size), 3)
  num_groups = len(group_sizes)
  rows = jax.random.normal(keys[0], (ROWS, M), dtype)
  weights = jax.random.normal(keys[1], (num_groups, M, H), dtype)
  cotangent = jax.random.normal(keys[2], (ROWS, H), jnp.float32)
  group_sizes = jnp.asarray(group_sizes, jnp.int32)

  def loss(method, rows, weights):
    out = ragged_matmul(rows, weights, group_sizes, method=method, block_size=block_size)
    return (out.astype(jnp.float32) * cotangent).sum(), out

  grad = lambda method: jax.jit(jax.grad(loss, argnums=(1, 2), has_aux=True),
                                static_argnums=0)(method, rows, weights)
  (rows_grad, weights_grad), out = grad("blocks")
  (expected_rows_grad, expected_weights_grad), expected = grad("ragged_dot")
  assert out.dtype == dtype
  tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == jnp.float32 else dict(atol=3e-2, rtol=3e-2)
  chex.assert_trees_all_close(out.astype(jnp.float32), expected.astype(jnp.float32), **tolerance)
  chex.assert_trees_all_close(rows_grad.astype(jnp.float32),
                              expected_rows_grad.astype(jnp.float32), **tolerance)
  chex.assert_trees_all_close(weights_grad.astype(jnp.float32),
                              expected_weights_grad.astype(jnp.float32), **tolerance)
  unassigned = int(group_sizes.sum())
  assert not np.asarray(out[unassigned:]).any() and not np.asarray(rows_grad[unassigned:]).any()


def test_block_layout_by_hand():
  # Groups of 3, 0 and 5 rows in blocks of 2: group 0 takes blocks 0-1 (one pad slot),
  # group 2 blocks 2-4 (one pad slot); 8 // 2 + 3 = 7 blocks, the last two unused.
  layout = block_layout(jnp.array([3, 0, 5]), num_rows=8, block_size=2)
  np.testing.assert_array_equal(layout.slot_of_row, [0, 1, 2, 4, 5, 6, 7, 8])
  np.testing.assert_array_equal(layout.row_of_slot,
                                [0, 1, 2, 8, 3, 4, 5, 6, 7, 8, 8, 8, 8, 8])
  np.testing.assert_array_equal(layout.block_group, [0, 0, 2, 2, 2, 3, 3])


def test_default_block_size_bounds_the_padding():
  assert default_block_size(8192, 8) == 256  # moe_top2, small preset: 8 * 256 = R / 4
  assert default_block_size(65536, 8) == MAX_BLOCK  # the gpu preset
  assert default_block_size(64, 8) == MIN_BLOCK  # tiny batches: the floor
  for rows, groups in [(8192, 8), (32768, 32), (100_000, 64), (4096, 2)]:
    block = default_block_size(rows, groups)
    assert groups * block * 4 <= rows and block & (block - 1) == 0
    assert block == MAX_BLOCK or groups * block * 2 * 4 > rows  # the largest that fits
