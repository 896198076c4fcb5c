"""The device mesh and the partition rules, in one place.

The mesh has two axes, `data` and `expert` (config.mesh.data x config.mesh.expert
devices; 1 x 1 is a single device and runs the same code; `data` unset is every device
the expert axis leaves, `resolve_mesh`). The rules:
- The batch is split over every device, `data` and `expert` together: devices that hold
  different experts also hold different tokens, as in GShard, so no device routes
  tokens another one already routes.
- Expert weights (the leading E axis of `moe/wi`, `wi_gate`, `wi_up`, `wo`) are split
  over `expert`: each device holds E / mesh.expert experts.
- Everything else is replicated. The optimiser state follows its parameters (the rule
  looks at the parameter path, which optax's state repeats).
Inside the MoE layer, `constrain` pins the dispatched tokens [E, G, C, M] to be split by
expert, so GSPMD turns the dispatch and combine einsums into all-to-alls over `expert`.

Multi-host: `initialize_distributed` starts jax.distributed when SLURM or the usual
coordinator variables say there are several processes.
"""

import dataclasses
import os

import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from chimera import config as config_lib
from chimera.config import Config, MeshConfig
from chimera.errors import ChimeraError

DATA, EXPERT = "data", "expert"
BATCH = (DATA, EXPERT)  # the axes the batch (and the MoE groups) are split over
EXPERT_WEIGHTS = ("wi", "wi_gate", "wi_up", "wo")


def initialize_distributed() -> None:
  """jax.distributed.initialize() when the environment describes several processes.

  Under SLURM, JAX reads the SLURM_* variables itself. Elsewhere a launch is
  JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES and JAX_PROCESS_ID;
  JAX reads only the first, so the other two are passed here.
  """
  if jax.distributed.is_initialized():
    return
  slurm_tasks = int(os.environ.get("SLURM_NTASKS", "1"))
  if "JAX_COORDINATOR_ADDRESS" in os.environ and slurm_tasks == 1:
    missing = [name for name in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if name not in os.environ]
    if missing:
      raise ChimeraError(f"JAX_COORDINATOR_ADDRESS is set but {' and '.join(missing)} "
                         f"{'is' if len(missing) == 1 else 'are'} not: set all three")
    jax.distributed.initialize(coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
                               num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                               process_id=int(os.environ["JAX_PROCESS_ID"]))
  elif slurm_tasks > 1:
    jax.distributed.initialize()  # reads SLURM_* itself


def resolve_mesh(config: Config, device_count: int) -> Config:
  """The config with `mesh.data` resolved where it is unset: every device the expert axis
  leaves, so the same command trains on one CPU or on every GPU of a machine; then
  checked against the devices, the experts and the batch (`check_mesh`). A resolved
  mesh is validated again: the routing groups' check needs the device count (a mesh given
  whole was validated with the config)."""
  mesh = config.mesh
  if mesh.data is not None:
    check_mesh(config, device_count)
    return config
  if device_count % mesh.expert:
    raise ChimeraError(f"config.mesh.expert={mesh.expert} does not divide the "
                       f"{device_count} device{'s' if device_count != 1 else ''} (set "
                       f"config.mesh.data too, or another expert count)")
  config = dataclasses.replace(config, mesh=dataclasses.replace(
      mesh, data=device_count // mesh.expert))
  check_mesh(config, device_count)
  config_lib.validate(config)
  return config


def check_mesh(config: Config, device_count: int) -> None:
  """Rejects a mesh that does not fit the devices, the experts or the batch."""
  mesh, model, train = config.mesh, config.model, config.train
  if mesh.data * mesh.expert != device_count:
    wanted = mesh.data * mesh.expert
    if jax.default_backend() == "cpu":
      hint = (f" (to try a mesh on the CPU, start with XLA_FLAGS="
              f"--xla_force_host_platform_device_count={wanted})")
    elif wanted < device_count:
      hint = (" (leave config.mesh.data unset to use every device, or make only the ones "
              "to use visible: CUDA_VISIBLE_DEVICES)")
    else:
      hint = ""
    raise ChimeraError(
        f"config.mesh: data={mesh.data} x expert={mesh.expert} = {wanted} "
        f"device{'' if wanted == 1 else 's'}, but "
        f"{device_count} {'is' if device_count == 1 else 'are'} available{hint}")
  if model.num_experts and model.num_experts % mesh.expert:
    raise ChimeraError(
        f"config.model.num_experts={model.num_experts} is not divisible by "
        f"config.mesh.expert={mesh.expert}")
  micro_batch = train.batch_size // train.grad_accum
  if micro_batch % device_count:
    raise ChimeraError(
        f"config.train.batch_size: a micro-batch of {micro_batch} sequences cannot be split "
        f"over {device_count} devices: make batch_size / grad_accum a multiple of "
        f"{device_count}, or use fewer devices")


def make_mesh(config: MeshConfig) -> jax.sharding.Mesh:
  """The data x expert mesh over the first data * expert devices (all of them in training,
  which `check_mesh` requires; fewer where a tool compiles several meshes in one process).
  `data` must be resolved (`resolve_mesh`)."""
  if config.data is None:
    raise ValueError("make_mesh: mesh.data is unset; resolve it first (resolve_mesh)")
  return jax.make_mesh((config.data, config.expert), (DATA, EXPERT),
                       devices=jax.devices()[:config.data * config.expert],
                       axis_types=(AxisType.Auto, AxisType.Auto))


def _spec(path, leaf) -> P:
  names = [getattr(key, "key", getattr(key, "name", None)) for key in path]
  if getattr(leaf, "ndim", 0) == 3 and "moe" in names and names[-1] in EXPERT_WEIGHTS:
    return P(EXPERT)
  return P()


def state_sharding(mesh: jax.sharding.Mesh, state):
  """NamedShardings for every leaf of a TrainState (params and optimiser state)."""
  return jax.tree_util.tree_map_with_path(lambda path, leaf: NamedSharding(mesh, _spec(path, leaf)),
                                          state)


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int, batch_axis: int = 0) -> NamedSharding:
  """Token arrays: the batch axis split over every device."""
  spec = [None] * ndim
  spec[batch_axis] = BATCH
  return NamedSharding(mesh, P(*spec))


def constrain(x: jax.Array, *spec) -> jax.Array:
  """with_sharding_constraint(x, P(*spec)) under a mesh that has an expert axis; a no-op
  otherwise (a single device, or model code used outside chimera's mesh)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or EXPERT not in mesh.axis_names:
    return x
  return jax.lax.with_sharding_constraint(x, P(*spec))


def batch_mesh(batch_size: int) -> jax.sharding.AbstractMesh | None:
  """The current mesh when it splits a batch of `batch_size` over several devices."""
  mesh = jax.sharding.get_abstract_mesh()
  if (mesh.empty or not set(BATCH) <= set(mesh.axis_names) or mesh.size == 1
      or batch_size % mesh.size):
    return None
  return mesh


def sum_over_batch(fn, *args):
  """sum over devices of fn(*args split over every device on axis 0), as shard_map: fn
  runs on each device's share of the batch, and only its (batch-free) result is summed.
  Without chimera's mesh, or with a batch that does not split evenly, fn(*args)."""
  mesh = batch_mesh(args[0].shape[0])
  if mesh is None:
    return fn(*args)
  local_sum = lambda *local: jax.lax.psum(fn(*local), BATCH)
  return jax.shard_map(local_sum, mesh=mesh, in_specs=P(BATCH), out_specs=P())(*args)


def map_over_batch(fn, *args):
  """fn on each device's share of the batch (axis 0 of every arg and of the result), as
  shard_map, for ops GSPMD would gather the batch for. Without chimera's mesh, or with a
  batch that does not split evenly, fn(*args)."""
  mesh = batch_mesh(args[0].shape[0])
  if mesh is None:
    return fn(*args)
  return jax.shard_map(fn, mesh=mesh, in_specs=P(BATCH), out_specs=P(BATCH))(*args)
