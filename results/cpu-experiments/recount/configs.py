"""Executed FLOPs per token of the shipped configs against dense, at the default and the
small (cpu study) presets, with their own dispatch and with the other one: the figures
the docstrings of configs/moe_*.py quote. Run from the repository root (configs.txt beside
this file is its output):

    python results/cpu-experiments/recount/configs.py
"""

import dataclasses

from chimera import accounting, config as config_lib
from chimera.config import MeshConfig


def executed(spec: str, **model) -> float:
  config = config_lib.load(spec)
  config = dataclasses.replace(config, model=dataclasses.replace(config.model, **model),
                               mesh=MeshConfig(1, 1))
  return accounting.count_run(config_lib.resolve(config)).executed_flops_per_token


print("config | preset | dispatch | executed MFLOPs/token | x dense")
for preset, suffix in (("default", ""), ("small", ":small")):
  dense = executed(f"configs/dense.py{suffix}")
  print(f"dense | {preset} | - | {dense / 1e6:.2f} | 1.00x")
  for name in ("moe_top1", "moe_top2", "moe_fine"):
    for dispatch in ("dropless", "einsum"):
      flops = executed(f"configs/{name}.py{suffix}", dispatch=dispatch)
      print(f"{name} | {preset} | {dispatch} | {flops / 1e6:.2f} | {flops / dense:.3f}x")
