"""Executed FLOPs per token of every committed study, as its summary.json saved them and
as chimera.accounting counts them at this commit.

Two counts changed after studies were saved: on 2026-11-27 the einsum dispatch went from
6 passes over the one-hot tensors to 5 (the capacity and calibration sweeps were saved
before), and on 2026-11-29 the matmuls that build the einsum path's dispatch and combine
masks, and dropless's gate-weighted sum of the k outputs, were added (every study was
saved before). The runs behind most reports are no longer on this machine, so their
tables cannot be regenerated without training them again; this prints both counts.
Each study is rebuilt from its saved command (`chimera.compare.make_study`); one that no
longer builds is named and skipped. Run from the repository root:

    python results/cpu-experiments/recount/recount.py
"""

import json
import shlex
import sys
from pathlib import Path

from absl import flags

from chimera import accounting, bench, compare, sharding

ROOT = Path(__file__).resolve().parents[3]
FLAGS = flags.FLAGS

for path in sorted((ROOT / "results").glob("*/summary.json")):
  saved = json.loads(path.read_text())
  if "command" not in saved or "dense" not in saved["models"]:
    continue
  FLAGS.unparse_flags()
  FLAGS(["compare"] + shlex.split(saved["command"])[3:])
  try:
    overrides = bench.parse_overrides("set", FLAGS.set)
    if FLAGS.train_steps is not None:
      overrides["train.steps"] = FLAGS.train_steps
    study = compare.make_study(FLAGS.preset, FLAGS.sweep, FLAGS.base, overrides,
                               bench.parse_overrides("base_set", FLAGS.base_set), sets=overrides)
  except Exception as error:  # a study the code no longer builds: name it, go on
    print(f"{path.parent.name}: not rebuilt ({error})", file=sys.stderr)
    continue
  # One device, as every saved study trained.
  now = {m.name: accounting.count_run(sharding.resolve_mesh(m.config, 1)).executed_flops_per_token
         for m in study.models}
  base_saved = saved["models"]["dense"]["executed_flops_per_token"]
  print(f"{path.parent.name}: model | saved MFLOPs/token (x dense) | now (x dense)")
  for name, entry in saved["models"].items():
    old = entry["executed_flops_per_token"]
    if name not in now:
      print(f"  {name} | {old / 1e6:.2f} ({old / base_saved:.2f}x) | not in the rebuilt study")
      continue
    print(f"  {name} | {old / 1e6:.3f} ({old / base_saved:.3f}x) | "
          f"{now[name] / 1e6:.3f} ({now[name] / now['dense']:.3f}x)")
