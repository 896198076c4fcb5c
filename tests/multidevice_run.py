"""Driver for tests/test_sharding.py: one training run on N fake CPU devices.

XLA_FLAGS must name the device count before jax is imported, so each run is its own
process:
  python tests/multidevice_run.py DEVICES DATA EXPERT WORKDIR CORPUS STEPS [STOP_AFTER] [DISPATCH]
(STOP_AFTER 0: run every step; DISPATCH: model.dispatch, the config's own if absent).
It trains (or resumes) the tiny MoE config and writes WORKDIR/result.npz: the final
parameters (keys "params/<path>"), the last training loss, and how the expert weights are
laid out.
"""

import os
import sys

devices, data, expert = (int(a) for a in sys.argv[1:4])
os.environ["XLA_FLAGS"] = (f"{os.environ.get('XLA_FLAGS', '')} "  # the suite's (conftest)
                           f"--xla_force_host_platform_device_count={devices}")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from chimera import config as config_lib, sharding  # noqa: E402
from chimera.checkpoints import Checkpointer  # noqa: E402
from chimera.steps import init_state  # noqa: E402
from chimera.train import train  # noqa: E402

workdir, corpus, steps = sys.argv[4], sys.argv[5], int(sys.argv[6])
stop_after = int(sys.argv[7]) if len(sys.argv) > 7 and int(sys.argv[7]) else None
dispatch = {"model.dispatch": sys.argv[8]} if len(sys.argv) > 8 else {}
root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
config = config_lib.load(os.path.join(root, "configs", "moe_top2.py") + ":tiny", {
    "data.corpus": corpus, "train.steps": steps, "train.batch_size": 8, "train.log_every": 1,
    "train.eval_every": 1000, "train.checkpoint_every": 1000, "mesh.data": data,
    "mesh.expert": expert, "model.num_experts": 8, **dispatch})
assert jax.device_count() == devices
summary = train(config, workdir, stop_after=stop_after)

mesh = sharding.make_mesh(config.mesh)
checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), keep=2)
with jax.set_mesh(mesh):
  state, _ = checkpointer.restore(init_state(config, mesh))
wi = state.params["block_0"]["moe"]["wi"]
flat = {"params/" + "/".join(str(getattr(k, "key", k)) for k in path): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(state.params)}
losses = [line for line in open(os.path.join(workdir, "metrics.jsonl")) if '"train"' in line]
np.savez(os.path.join(workdir, "result.npz"), step=int(state.step),
         experts_per_device=wi.sharding.shard_shape(wi.shape)[0],
         distinct_shards=len({tuple((i.start, i.stop) for i in s.index)
                              for s in wi.addressable_shards}),
         last_loss=float(__import__("json").loads(losses[-1])["loss"]), **flat)
