"""Executed FLOPs per token of two committed sweeps, as their summary.json saved them and
as chimera.accounting counts them at this commit.

The capacity and calibration sweeps were trained on 2026-11-27, when the einsum dispatch
was counted as 6 passes over the one-hot tensors; it is counted as 5 now. Their runs are
no longer on the machine that trained them, so their reports cannot be regenerated
without training them again. Run from the repository root:

    python results/cpu-experiments/recount/recount.py
"""

import json
from pathlib import Path

from chimera import accounting, compare

ROOT = Path(__file__).resolve().parents[3]

for sweep in ("capacity", "calibration"):
  saved = json.loads((ROOT / "results" / f"cpu-sweep-{sweep}" / "summary.json").read_text())
  study = compare.make_study("cpu", sweep, None, {})
  now = {m.name: accounting.count_run(m.config).executed_flops_per_token for m in study.models}
  base_saved = saved["models"]["dense"]["executed_flops_per_token"]
  print(f"cpu-sweep-{sweep}: model | saved MFLOPs/token (x dense) | now MFLOPs/token (x dense)")
  for name, entry in saved["models"].items():
    old = entry["executed_flops_per_token"]
    print(f"  {name} | {old / 1e6:.2f} ({old / base_saved:.2f}x) | "
          f"{now[name] / 1e6:.2f} ({now[name] / now['dense']:.2f}x)")
