"""The grouped matmul behind the dropless MoE path: rows sorted by expert times each
expert's weights.

  ragged_matmul(rows [R, M], weights [E, M, H], group_sizes [E]) -> [R, H]

rows[sum(group_sizes[:e]) : sum(group_sizes[:e + 1])] are multiplied by weights[e]; rows
past sum(group_sizes) give zeros. Two implementations of the same function:
- "blocks" (the default): every group padded to a multiple of `block_size` rows, then one
  batched matmul over the blocks, each with its group's weights. Work and memory follow
  the routed rows: R + E * block_size rows (static shapes: the blocks a batch leaves
  unused are computed too), and R / block_size + E copies of the weights. Pure JAX, and
  no scatter in either pass. `default_block_size` keeps the E * block_size padding at
  most R / 4 where R >= 256 * E; below that the block stops at 64 rows, and the padding,
  E * 64 rows, is more (blocks between 64 and 512 rows).
- "ragged_dot": `jax.lax.ragged_dot`. XLA:CPU and (as of jax 0.11) XLA:GPU lower it to a
  dense matmul per group, E times the work: 5-10x slower than "blocks" on 2 CPU cores
  at the default preset (`python -m chimera.bench_grouped`).

Shape letters: R rows, M input dim, H output dim, E groups (experts), N blocks, S slots
(N * block_size padded rows), b block size.
"""

from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

Method = Literal["ragged_dot", "blocks"]


MAX_BLOCK, MIN_BLOCK = 512, 64


def default_block_size(num_rows: int, num_groups: int) -> int:
  """The largest power of two in [MIN_BLOCK, MAX_BLOCK] with num_groups * b <= num_rows / 4:
  big blocks run the batched matmul fastest, but every group can leave up to a block of
  padding, and the static layout always computes num_rows + num_groups * b rows.
  `python -m chimera.bench_grouped` times the dropless FFN per block size; docs/performance.md
  has the figures (2 CPU cores: the best block was 256 for moe_top2, 128-256 for moe_fine)."""
  block = MAX_BLOCK
  while block > MIN_BLOCK and num_groups * block * 4 > num_rows:
    block //= 2
  return block


def num_blocks(num_rows: int, num_groups: int, block_size: int) -> int:
  """N, the blocks of the static layout of `num_rows` rows in `num_groups` groups: always
  enough, since sum(ceil(g / b)) <= sum(g) / b + E."""
  return num_rows // block_size + num_groups


def ragged_matmul(rows: jax.Array, weights: jax.Array, group_sizes: jax.Array,
                  method: Method = "blocks", block_size: int | None = None) -> jax.Array:
  """rows [R, M] sorted by group, weights [E, M, H], group_sizes [E] -> [R, H].
  block_size: of the "blocks" method; None: `default_block_size`."""
  if method == "ragged_dot":
    return jax.lax.ragged_dot(rows, weights, group_sizes)
  block_size = block_size or default_block_size(rows.shape[0], weights.shape[0])
  return block_matmul(rows, weights, group_sizes, block_size)


def sort_by_group(group_ids: jax.Array, num_groups: int) -> tuple[jax.Array, jax.Array,
                                                                    jax.Array]:
  """(order, position, group_sizes) of rows labelled group_ids [R]: order [R] lists the
  rows group by group (stable, so each group keeps the rows' order), position [R] is each
  row's place in that order, group_sizes [E] int32 counts them (ids >= num_groups count
  nowhere and sort last)."""
  order = jnp.argsort(group_ids, stable=True)
  group_sizes = jnp.bincount(group_ids, length=num_groups).astype(jnp.int32)
  return order, jnp.argsort(order), group_sizes


class BlockLayout(NamedTuple):
  """Where the rows go when each group is padded to whole blocks."""

  slot_of_row: jax.Array  # [R] position of each row in the padded layout; S if in no group
  row_of_slot: jax.Array  # [S] the row each slot holds; R for padding
  block_group: jax.Array  # [N] the group of each block; E for blocks past the last group


def block_layout(group_sizes: jax.Array, num_rows: int, block_size: int) -> BlockLayout:
  """The padded layout of `num_rows` rows in groups of `group_sizes` [E]: the groups in
  order, each starting on a block boundary, in `num_blocks` blocks."""
  num_groups = group_sizes.shape[0]
  blocks_total = num_blocks(num_rows, num_groups, block_size)
  num_slots = blocks_total * block_size
  group_sizes = group_sizes.astype(jnp.int32)
  group_ends = jnp.cumsum(group_sizes)  # [E]
  group_starts = group_ends - group_sizes
  blocks = (group_sizes + block_size - 1) // block_size  # [E]
  block_ends = jnp.cumsum(blocks)
  slot_starts = (block_ends - blocks) * block_size  # [E] first slot of each group

  row = jnp.arange(num_rows, dtype=jnp.int32)
  # Unrolled binary searches over the E groups: no loop that syncs with the host on GPU.
  row_group = jnp.searchsorted(group_ends, row, side="right",
                               method="scan_unrolled")  # [R]; E past the last group
  in_group = row_group < num_groups
  row_group = jnp.minimum(row_group, num_groups - 1)
  slot_of_row = jnp.where(in_group, slot_starts[row_group] + row - group_starts[row_group],
                          num_slots)

  block_group = jnp.searchsorted(block_ends, jnp.arange(blocks_total, dtype=jnp.int32),
                                 side="right", method="scan_unrolled")  # [N]
  slot = jnp.arange(num_slots, dtype=jnp.int32)
  slot_group = jnp.minimum(block_group[slot // block_size], num_groups - 1)  # [S]
  offset = slot - slot_starts[slot_group]
  holds_row = (block_group[slot // block_size] < num_groups) & (offset < group_sizes[slot_group])
  row_of_slot = jnp.where(holds_row, group_starts[slot_group] + offset, num_rows)
  return BlockLayout(slot_of_row, row_of_slot, block_group)


@jax.custom_vjp
def move_rows(x: jax.Array, source: jax.Array, inverse: jax.Array) -> jax.Array:
  """y[i] = x[source[i]] (zero where source[i] is out of range). `inverse` maps each row
  of x to the one y row that reads it (out of range if none), so the gradient is a gather
  too, not a scatter-add."""
  return jnp.take(x, source, axis=0, mode="fill", fill_value=0)


def _move_rows_fwd(x, source, inverse):
  return move_rows(x, source, inverse), (source, inverse)


def _move_rows_bwd(residuals, cotangent):
  _, inverse = residuals
  return jnp.take(cotangent, inverse, axis=0, mode="fill", fill_value=0), None, None


move_rows.defvjp(_move_rows_fwd, _move_rows_bwd)


def to_blocks(rows: jax.Array, group_sizes: jax.Array,
              block_size: int) -> tuple[jax.Array, BlockLayout]:
  """rows [R, M] sorted by group -> ([N, b, M], layout): each group from a block
  boundary, zeros in the padding."""
  layout = block_layout(group_sizes, rows.shape[0], block_size)
  blocks = move_rows(rows, layout.row_of_slot, layout.slot_of_row)  # [S, M]
  return blocks.reshape(-1, block_size, rows.shape[1]), layout


def from_blocks(blocks: jax.Array, layout: BlockLayout) -> jax.Array:
  """The inverse of to_blocks: [N, b, H] -> [R, H] (zeros for rows in no group)."""
  return move_rows(blocks.reshape(-1, blocks.shape[-1]), layout.slot_of_row,
                   layout.row_of_slot)


def blocks_matmul(blocks: jax.Array, weights: jax.Array, block_group: jax.Array) -> jax.Array:
  """Each block [b, M] times its group's weights [M, H]: [N, b, M] -> [N, b, H].

  A row of zeros stays zeros, so a chain of these, with elementwise maps that keep 0 at 0
  between them (GELU, SiLU, products), may stay in the block layout from to_blocks to
  from_blocks: one layout and two row moves for a whole feed-forward.
  """
  # Each block's weights, as a one-hot matmul: its gradient sums the blocks of a group
  # with a matmul rather than a scatter-add. Blocks past the last group get zeros.
  block_weights = jnp.einsum("ne,emh->nmh",
                             jax.nn.one_hot(block_group, weights.shape[0], dtype=weights.dtype),
                             weights)  # [N, M, H]
  return jnp.einsum("nbm,nmh->nbh", blocks, block_weights)


def block_matmul(rows: jax.Array, weights: jax.Array, group_sizes: jax.Array,
                 block_size: int) -> jax.Array:
  """ragged_matmul through the padded block layout (see the module docstring)."""
  blocks, layout = to_blocks(rows, group_sizes, block_size)
  return from_blocks(blocks_matmul(blocks, weights, layout.block_group), layout)
