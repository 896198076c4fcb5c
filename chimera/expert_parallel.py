"""Dropless expert parallelism: each device routes its own tokens and trades them with the
experts' owners through all-to-alls, inside `jax.shard_map`.

Why not GSPMD, as the einsum path does: the einsum path has static shapes ([E, G, C, M]
buffers), so one sharding constraint lets XLA turn dispatch and combine into all-to-alls.
The dropless path sorts the token-expert choices, and the sort is data-dependent: under
GSPMD it runs over the global batch, which all-gathers the routing and all-reduces the
token x choice activations onto every device. Here the sort is written per device, and the
exchange is written out.

Each device, with T_d tokens [T_d, M] and their routing (gate, expert_index [T_d, K]):
1. sorts its T_d * K choices by expert, so that they are also sorted by the device that
   owns the expert (expert e lives on device e // E_d, E_d = E / X local experts, X =
   mesh.expert), and counts them per expert;
2. sends the counts [X, E_d] with an all-to-all, then the rows, padded to C rows per
   destination, with a second one;
3. runs its E_d experts on the X * C rows it received, through the single-device dropless
   experts (`chimera.moe.dropless_experts`: a sort by local expert and a grouped matmul;
   the padding rows carry an expert id past the last and come back as zeros);
4. sends the results back with the inverse all-to-all, and combines them with the gates.
The all-to-alls run over `expert` only; the `data` axis splits the tokens further and
trades nothing. All four steps are differentiable: the transpose of an all-to-all is an
all-to-all, and the expert weights, replicated over `data`, get their gradients summed
over it by shard_map.

The padding, and what it costs. XLA:CPU has no ragged all-to-all, so every destination gets
a buffer of static size C. Nothing may be dropped, so C is the worst case: a token's K
choices are K distinct experts, so at most min(K, E_d) of them land on one device, and

    C = T_d * min(K, E_d) rows per destination; X * C rows received per device.

On average a destination gets T_d * K / X rows, so the buffers (and the grouped matmul,
whose work follows its static row count) are X * min(K, E_d) / K times the rows that carry
a token: 4x at X = 8, E = 8, K = 2. The rows a device receives grow with X * T_d, the
tokens of its whole expert group, not with its own T_d: per device, the exchange scales
with the data axis, not with the expert axis. A capacity below C (the einsum path's
trade) would cut that to T_d * K * cf / X rows and drop what overflows; a ragged
all-to-all (GPU, TPU) sends only the rows that exist, but still needs a receive buffer
sized for the worst case. See docs/scaling.md for the bytes this moves.

Shape letters: T_d tokens on this device, K choices per token, R = T_d * K choices,
E experts, E_d experts per device, X devices on the expert axis, C rows per destination,
M model dim.
"""

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from chimera import sharding
from chimera.grouped_matmul import sort_by_group
from chimera.sharding import BATCH, EXPERT

# (x [T, M], gate [T, K], expert_index [T, K], weights {name: [E, ...]}) -> y [T, M]:
# the single-device dropless experts, e.g. a partial of chimera.moe.dropless_experts.
Experts = Callable[[jax.Array, jax.Array, jax.Array, dict[str, jax.Array]], jax.Array]


def dropless(experts: Experts, x: jax.Array, gate: jax.Array, expert_index: jax.Array,
             weights: dict[str, jax.Array]) -> jax.Array:
  """`experts(x, gate, expert_index, weights)` -> y [T, M], split over chimera's mesh.

  Under a mesh with the axes of `chimera.sharding`, the tokens x [T, M] and their routing
  [T, K] are split over every device and the expert weights [E, ...] over `expert`; each
  device runs the exchange of the module docstring (on a data-only mesh, expert = 1, just
  `experts` on its own tokens). Without such a mesh (one device), or when T does not
  split evenly (a dummy batch in `init`), `experts` runs as it is, so single-device
  numerics do not change.
  """
  mesh = sharding.batch_mesh(x.shape[0])
  if mesh is None:
    return experts(x, gate, expert_index, weights)
  per_device = functools.partial(_exchange_and_run, experts, mesh.shape[EXPERT])
  return jax.shard_map(per_device, mesh=mesh,
                       in_specs=(P(BATCH), P(BATCH), P(BATCH), P(EXPERT)),
                       out_specs=P(BATCH))(x, gate, expert_index, weights)


class SendPlan(NamedTuple):
  """Where each of a device's choices goes, in the padded [X, C] send buffer."""

  counts: jax.Array  # [X, E_d] choices for each destination's local experts
  choice_of_slot: jax.Array  # [X * C] the choice (t * K + r) in each slot; R for padding
  slot_of_choice: jax.Array  # [R] the slot of each choice


def send_plan(expert_index: jax.Array, num_experts: int, num_devices: int,
              rows_per_destination: int) -> SendPlan:
  """The choices expert_index [T_d, K] sorted by expert and cut into one padded run of
  `rows_per_destination` slots per destination device."""
  experts_per_device = num_experts // num_devices
  expert_ids = expert_index.reshape(-1)  # [R], choice a = t * K + r
  num_choices = expert_ids.shape[0]
  # In token order within an expert, as on one device; rank: each choice's sorted place.
  order, rank, counts = sort_by_group(expert_ids, num_experts)
  counts = counts.reshape(num_devices, experts_per_device)  # [X, E_d]
  per_destination = counts.sum(axis=1)  # [X]
  starts = jnp.cumsum(per_destination) - per_destination  # [X] first sorted position
  slot = jnp.arange(rows_per_destination, dtype=jnp.int32)  # [C]
  sorted_position = starts[:, None] + slot  # [X, C]
  choice_of_slot = jnp.where(slot < per_destination[:, None],
                             order[jnp.minimum(sorted_position, num_choices - 1)], num_choices)
  destination = expert_ids // experts_per_device  # [R]
  slot_of_choice = destination * rows_per_destination + rank - starts[destination]
  return SendPlan(counts, choice_of_slot.reshape(-1), slot_of_choice)


def received_experts(counts: jax.Array, rows_per_destination: int) -> jax.Array:
  """The local expert of each received row, from counts [X, E_d] (row c of source s is
  sorted by local expert): [X * C], E_d for the padding past each source's rows."""
  ends = jnp.cumsum(counts, axis=1)  # [X, E_d]
  slot = jnp.arange(rows_per_destination, dtype=jnp.int32)  # [C]
  return jnp.sum(slot[None, :, None] >= ends[:, None, :], axis=-1).reshape(-1)


def _exchange_and_run(experts: Experts, num_devices: int, x: jax.Array, gate: jax.Array,
                      expert_index: jax.Array, weights: dict[str, jax.Array]) -> jax.Array:
  """One device's part: x [T_d, M], gate and expert_index [T_d, K], its experts' weights
  [E_d, ...] -> y [T_d, M]."""
  if num_devices == 1:  # a data-only mesh: every device holds every expert
    return experts(x, gate, expert_index, weights)
  num_tokens, k = expert_index.shape
  d_model = x.shape[-1]
  experts_per_device = weights["wo"].shape[0]
  rows_per_destination = num_tokens * min(k, experts_per_device)  # C: nothing can overflow
  plan = send_plan(expert_index, experts_per_device * num_devices, num_devices,
                   rows_per_destination)
  exchange = functools.partial(jax.lax.all_to_all, axis_name=EXPERT, split_axis=0,
                               concat_axis=0)  # [X, ...] to device i <-> [X, ...] from i

  received_counts = exchange(plan.counts)  # [X, E_d] rows from each source, per expert
  send = jnp.take(x, plan.choice_of_slot // k, axis=0, mode="fill", fill_value=0)
  received = exchange(send.reshape(num_devices, rows_per_destination, d_model))  # [X, C, M]
  local_expert = received_experts(received_counts, rows_per_destination)  # [X * C]
  # Gate 1: the gates are applied where the tokens live, after the return trip.
  out = experts(received.reshape(-1, d_model), jnp.ones((local_expert.shape[0], 1), x.dtype),
                local_expert[:, None], weights)  # [X * C, M]
  returned = exchange(out.reshape(received.shape)).reshape(-1, d_model)  # [X * C, M]
  out = jnp.take(returned, plan.slot_of_choice, axis=0).reshape(num_tokens, k, d_model)
  return jnp.einsum("tkm,tk->tm", out, gate.astype(out.dtype))
