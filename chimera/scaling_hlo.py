"""Does a sharded MoE train step scale with the local batch? Read from XLA's optimised HLO.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m chimera.scaling_hlo \
      --config=configs/moe_top2.py:tiny --mesh=1,8 --set=train.batch_size=32 \
      --set=train.context=64 --set=model.group_size=64

(the flags are chimera.scaling's). For each dispatch (einsum, dropless) it compiles the
train step of the config on one device and on the mesh, at the same global batch, and
prints
- per-device memory, XLA's temporaries plus arguments (`memory_analysis`), on both meshes,
  and their ratio;
- every all-to-all, with the bytes it outputs on one device, beside the formula of
  `chimera.scaling.predicted_bytes`;
- the token-sized all-gathers and all-reduces: those whose arrays change when the batch
  doubles (`token_sized`). Parameter gradients keep their shapes whatever the batch, so
  they never count; routing, masks and activations do.
Nothing is trained; the numbers are compiled sizes on fake CPU devices.
"""

import collections
import dataclasses
import sys

import jax
from absl import app, flags, logging

from chimera import config as config_lib, sharding
from chimera.bench import parse_overrides
from chimera.errors import ChimeraError, parse_flags, tool_main
from chimera.scaling import (Collective, collectives, compile_train_step, define_flags,
                             parse_mesh, predicted_bytes, upcast_note)
from chimera.sharding import make_mesh

FLAGS = flags.FLAGS  # chimera.scaling's --config, --mesh and --set (define_flags)


@dataclasses.dataclass(frozen=True)
class StepReport:
  """One compiled train step on one mesh."""

  dispatch: str
  mesh: tuple[int, int]  # (data, expert)
  memory_bytes: int  # per device: temporaries + arguments
  all_to_alls: list[Collective]
  predicted_all_to_all_bytes: float  # chimera.scaling.predicted_bytes


def token_sized(hlo_text: str, doubled_hlo_text: str) -> list[tuple[str, str, str]]:
  """(kind, array, op_name) of each all-gather, all-reduce, reduce-scatter or
  collective-permute array of `doubled_hlo_text` (the same step at twice the batch) that
  `hlo_text` does not have: the arrays that grow with the tokens. All-to-alls are left
  out; they carry tokens by design."""
  def arrays(text):
    return [(c.kind, array, c.op_name) for c in collectives(text) if c.kind != "all-to-all"
            for array in c.arrays]
  remaining = collections.Counter((kind, array) for kind, array, _ in arrays(hlo_text))
  grown = []
  for kind, array, op_name in arrays(doubled_hlo_text):
    if remaining[kind, array]:
      remaining[kind, array] -= 1
    else:
      grown.append((kind, array, op_name))
  return grown


def load(spec: str, overrides: dict, data: int, expert: int) -> config_lib.Config:
  return config_lib.load(spec, {**overrides, "mesh.data": data, "mesh.expert": expert})


def compile_step(spec: str, overrides: dict, data: int, expert: int):
  """(config, the train step compiled on a data x expert mesh)."""
  config = load(spec, overrides, data, expert)
  return config, compile_train_step(config, make_mesh(config.mesh))


def measure(spec: str, overrides: dict, data: int, expert: int) -> tuple[StepReport, str]:
  """The step compiled on a data x expert mesh: its report and its optimised HLO."""
  config, compiled = compile_step(spec, overrides, data, expert)
  memory = compiled.memory_analysis()
  text = compiled.as_text()
  report = StepReport(
      dispatch=overrides["model.dispatch"], mesh=(data, expert),
      memory_bytes=memory.temp_size_in_bytes + memory.argument_size_in_bytes,
      all_to_alls=[c for c in collectives(text) if c.kind == "all-to-all"],
      predicted_all_to_all_bytes=predicted_bytes(config))
  return report, text


def doubled(overrides: dict, batch_size: int) -> dict:
  return {**overrides, "train.batch_size": 2 * batch_size}


def _tail(name: str, width: int) -> str:
  """The end of a long op name, marked as cut ("...") rather than cut mid-word."""
  return name if len(name) <= width else "..." + name[len(name) - width + 3:]


@tool_main
def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # jax logs its platform search at INFO
  try:
    data, expert = parse_mesh(FLAGS.mesh)
    spec, base = FLAGS.config, parse_overrides("set", FLAGS.set)
    plain = load(spec, base, 1, 1)
    if not plain.model.num_experts:  # no dispatch to compare, nor experts to place
      raise ChimeraError(f"--config: {spec} has no experts (model.num_experts=0); this tool "
                         f"compares the MoE's two dispatches")
    batch_size = plain.train.batch_size
    for dispatch in ("einsum", "dropless"):
      sharding.check_mesh(load(spec, {**base, "model.dispatch": dispatch}, data, expert),
                          jax.device_count())
  except ChimeraError as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)
  print(f"config {spec} {' '.join(FLAGS.set)}; {jax.device_count()} "
        f"{jax.devices()[0].platform} devices; per-device memory = XLA temporaries + arguments")
  for dispatch in ("einsum", "dropless"):
    overrides = {**base, "model.dispatch": dispatch}
    single, _ = measure(spec, overrides, 1, 1)
    sharded, text = measure(spec, overrides, data, expert)
    _, doubled_step = compile_step(spec, doubled(overrides, batch_size), data, expert)
    grown = token_sized(text, doubled_step.as_text())
    print(f"\n== dispatch={dispatch}")
    print(f"per-device memory: 1x1 {single.memory_bytes:,} B, {data}x{expert} "
          f"{sharded.memory_bytes:,} B, ratio {sharded.memory_bytes / single.memory_bytes:.3f}")
    total = sum(c.bytes for c in sharded.all_to_alls)
    print(f"all-to-alls: {len(sharded.all_to_alls)} ops, {total:,} B per device per "
          f"micro-batch "
          f"(formula {sharded.predicted_all_to_all_bytes:,.0f} B)")
    if (note := upcast_note(load(spec, overrides, data, expert), text)):
      print(note)
    for c in sharded.all_to_alls:
      print(f"  {c.bytes:>9,} B  {len(c.arrays)} x {c.arrays[0]}  {_tail(c.op_name, 70)}")
    print(f"token-sized all-gathers / all-reduces (arrays that grow with the batch): "
          f"{len(grown)}")
    for kind, array, op_name in grown:
      print(f"  {kind} {array}  {_tail(op_name, 90)}")


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=parse_flags)
