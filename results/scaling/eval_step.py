"""The evaluation step's all-to-all bytes and temporaries per device, compiled as training's
Evaluator compiles it, at train.grad_accum = 1, 4 and 16 (the same global batch): they
follow the micro-batch, not the batch. moe_top2:tiny, 128 x 64 tokens, groups of 64, on
1 x 8 fake CPU devices. Run from the repository root:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
        python results/scaling/eval_step.py [dispatch]
"""

import sys
import types

import jax
import numpy as np

from chimera import config as config_lib, scaling, sharding, train


def main(dispatch: str) -> None:
  print(f"moe_top2:tiny, dispatch={dispatch}, batch 128 x 64, mesh 1 x 8; the eval step:")
  for accum in (1, 4, 16):
    config = config_lib.load("configs/moe_top2.py:tiny", {
        "train.batch_size": 128, "train.context": 64, "model.group_size": 64,
        "train.grad_accum": accum, "model.dispatch": dispatch, "mesh.data": 1,
        "mesh.expert": 8, "data.corpus": "unused.txt"})
    mesh = sharding.make_mesh(config.mesh)
    batch = np.zeros((128, 65), np.int32)
    with jax.set_mesh(mesh):  # as chimera.train runs a run
      evaluator = train.Evaluator(config, types.SimpleNamespace(val_batches=[batch]), mesh,
                                  writer=None)
      state = train.init_state(config, mesh)
      compiled = evaluator.eval_fn.lower(state.params, state.model_state,
                                         evaluator.batches[0]).compile()
    _, moved = scaling.all_to_all_bytes(compiled.as_text())
    temp = compiled.memory_analysis().temp_size_in_bytes
    print(f"  grad_accum {accum:>2}: all-to-all bytes per device {moved:>10,} per micro-batch "
          f"(the HLO's loop body), temporaries {temp:>10,}")


if __name__ == "__main__":
  main(sys.argv[1] if len(sys.argv) > 1 else "dropless")
