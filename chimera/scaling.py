"""All-to-all volume and per-device memory of a sharded train step, measured from XLA.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
      python -m chimera.scaling --config=configs/moe_top2.py --mesh=2,4

It compiles the real train step on the mesh (no training), reads every all-to-all in the
optimized HLO and XLA's per-device memory accounting, and prints them beside the formula
of docs/scaling.md:

  einsum:   all-to-all buffer bytes per device per micro-batch = 4 * N_moe * k * cf' * T_d * M * b
  dropless: 4 * N_moe * X * min(k, E / X) * T_d * M * b  (+ 4 * N_moe * E bytes of counts)

(dispatch and combine, forward and backward), of which (X - 1) / X leave the device,
with N_moe MoE layers, T_d = tokens per device and micro-batch (a step runs
train.grad_accum micro-batches), M = d_model, X = mesh.expert, b = bytes
per element, and k * cf' = E * C / S the slots per token after rounding C up. Dropless
pads each destination to T_d * min(k, E / X) rows, the most it can receive
(`chimera.expert_parallel`).
"""

import dataclasses
import functools
import re
import sys

import jax
import numpy as np
from absl import app, flags, logging

from chimera import config as config_lib, sharding
from chimera.bench import parse_overrides
from chimera.errors import ChimeraError, parse_flags, tool_main
from chimera.decoder import Decoder
from chimera.layers import Kernels
from chimera.routers import expert_capacity
from chimera.steps import init_state, train_step

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command line of this module and of chimera.scaling_hlo. Defined only when one of
  them runs as a program, so that importing either beside another entry point (tests,
  notebooks) adds no flags."""
  flags.DEFINE_string("config", "configs/moe_top2.py", "Config file[:preset].")
  flags.DEFINE_list("mesh", ["2", "4"], "data,expert")
  flags.DEFINE_multi_string("set", [], "Overrides: section.field=value.")

_BYTES = {"f64": 8, "s64": 8, "u64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2,
          "s16": 2, "u16": 2, "s8": 1, "u8": 1, "pred": 1}
_KINDS = ("all-to-all", "all-gather", "all-reduce", "reduce-scatter", "collective-permute")
_COLLECTIVE = re.compile(r"= \(?(.*?)\)? (" + "|".join(_KINDS) + r")(?:-start)?\(")


@dataclasses.dataclass(frozen=True)
class Collective:
  """One collective op of an HLO module, as one device sees it."""

  kind: str  # "all-to-all", "all-gather", ...
  arrays: tuple[str, ...]  # its outputs, e.g. ("f32[1,256,32]", ...)
  bytes: int  # what it outputs on one device
  op_name: str  # the JAX op it came from (metadata), for the reader


def _array_bytes(array: str) -> int:
  dtype, dims = re.fullmatch(r"(\w+)\[([\d,]*)\]", array).groups()
  return _BYTES.get(dtype, 4) * int(np.prod([int(d) for d in dims.split(",") if d]))


def collectives(hlo_text: str) -> list[Collective]:
  """Every collective op in an optimised HLO module."""
  found = []
  for line in hlo_text.splitlines():
    match = _COLLECTIVE.search(line)
    if not match:
      continue
    arrays = tuple(re.findall(r"\w+\[[\d,]*\]", match.group(1)))
    op_name = re.search(r'op_name="([^"]*)"', line)
    found.append(Collective(match.group(2), arrays, sum(map(_array_bytes, arrays)),
                            op_name.group(1) if op_name else ""))
  return found


def all_to_all_bytes(hlo_text: str) -> tuple[int, int]:
  """(number of all-to-all ops, bytes they output on one device) in an HLO module."""
  found = [c for c in collectives(hlo_text) if c.kind == "all-to-all"]
  return len(found), sum(c.bytes for c in found)


def predicted_bytes(config: config_lib.Config) -> float:
  """The formula above: all-to-all buffer bytes per device per micro-batch (a training
  step runs train.grad_accum of them, in a loop whose body the HLO holds once)."""
  m, t, mesh = config.model, config.train, config.mesh
  if mesh.expert == 1 or not m.num_experts:  # nothing to exchange
    return 0.0
  tokens_per_device = t.batch_size // t.grad_accum * t.context / (mesh.data * mesh.expert)
  element = 2 if m.dtype == "bfloat16" else 4
  if m.dispatch == "dropless":  # X destinations of T_d * min(k, E / X) rows, int32 counts
    rows = mesh.expert * min(m.top_k, m.num_experts // mesh.expert) * tokens_per_device
    return m.num_moe_layers * (4 * rows * m.d_model * element + 4 * m.num_experts)
  capacity = expert_capacity(m, m.group_size)
  slots_per_token = m.num_experts * capacity / m.group_size  # k * cf'
  return 4 * m.num_moe_layers * slots_per_token * tokens_per_device * m.d_model * element


def upcast_note(config: config_lib.Config, hlo_text: str) -> str | None:
  """A sentence when the compiled all-to-alls carry wider floats than model.dtype: XLA:CPU
  sends bfloat16 exchanges as float32 (the lowered program sends bfloat16), so it
  measures twice the formula's bytes, which counts model.dtype's."""
  if config.model.dtype != "bfloat16":
    return None
  floats = {array.partition("[")[0] for c in collectives(hlo_text) if c.kind == "all-to-all"
            for array in c.arrays if array[0] in "fb"}
  if "f32" not in floats or "bf16" in floats:
    return None
  return ("note: the compiled all-to-alls carry float32 where model.dtype is bfloat16 (XLA "
          f"on {jax.devices()[0].platform} widens them), so they measure twice the "
          "formula's bytes")


def compile_train_step(config: config_lib.Config, mesh: jax.sharding.Mesh):
  """The real train step of `config`, lowered and compiled for `mesh` (a fresh state is
  built, no step runs): its `as_text()` is the optimised HLO, `memory_analysis()` XLA's
  per-device accounting."""
  with jax.set_mesh(mesh):
    state = init_state(config, mesh)
    shape = (config.train.grad_accum, config.train.batch_size // config.train.grad_accum,
             config.train.context + 1)
    batch = jax.make_array_from_process_local_data(
        sharding.batch_sharding(mesh, 3, 1), np.zeros(shape, np.int32))
    step = jax.jit(functools.partial(train_step, model=Decoder(config.model),
                                     config=config.model), donate_argnums=0,
                   compiler_options=Kernels().compiler_options())  # as training compiles it
    return step.lower(state, batch, jax.random.key(0)).compile()


def parse_mesh(values: list[str]) -> tuple[int, int]:
  """--mesh=data,expert as two positive integers, or a one-line ChimeraError."""
  if len(values) != 2 or not all(v.strip().isdigit() and int(v) > 0 for v in values):
    raise ChimeraError(f"--mesh: expected data,expert (two positive integers), got "
                       f"{','.join(values)!r}")
  data, expert = (int(v) for v in values)
  return data, expert


@tool_main
def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # jax logs its platform search at INFO
  try:
    data, expert = parse_mesh(FLAGS.mesh)
    overrides = {"mesh.data": data, "mesh.expert": expert}
    overrides.update(parse_overrides("set", FLAGS.set))
    config = config_lib.load(FLAGS.config, overrides)
    sharding.check_mesh(config, jax.device_count())
  except ChimeraError as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)
  compiled = compile_train_step(config, sharding.make_mesh(config.mesh))
  count, measured = all_to_all_bytes(compiled.as_text())
  memory = compiled.memory_analysis()
  per_device = (memory.argument_size_in_bytes + memory.output_size_in_bytes
                + memory.temp_size_in_bytes - memory.alias_size_in_bytes)
  print(f"config {FLAGS.config} on mesh data={data} x expert={expert} "
        f"({jax.device_count()} {jax.devices()[0].platform} devices)")
  accum = config.train.grad_accum
  print(f"all-to-all ops per micro-batch: {count} (a step runs {accum} micro-batch"
        f"{'es' if accum != 1 else ''})")
  print(f"all-to-all buffer bytes per device per micro-batch: measured {measured:,}, "
        f"formula {predicted_bytes(config):,.0f} ({accum * measured:,} per step); of these "
        f"{(expert - 1) / expert:.0%} cross to other devices")
  if (note := upcast_note(config, compiled.as_text())):
    print(note)
  print(f"per-device memory of the step (XLA): {per_device:,} bytes "
        f"(arguments {memory.argument_size_in_bytes:,}, temporaries "
        f"{memory.temp_size_in_bytes:,})")


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=parse_flags)
