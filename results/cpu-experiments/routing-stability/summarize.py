"""The routing changes of the runs here, averaged over their three MoE layers, as a table.

  python results/cpu-experiments/routing-stability/summarize.py
"""
import json
from pathlib import Path

HERE = Path(__file__).parent
RUNS = {"e16": "16 experts", "e32": "32 experts", "e32_lr0.5": "32 experts, expert lr x 0.5"}
mean = lambda values: sum(values) / len(values)

print("run | steps | first expert changed | expert set changed | with the routers held "
      "| held / set")
print("--- | --- | ---: | ---: | ---: | ---:")
for name, label in RUNS.items():
  path = HERE / f"{name}.json"
  if not path.exists():
    continue
  changes = json.loads(path.read_text())
  rows = [(f"{c['before']} -> {c['after']}", mean(c["first_expert"]), mean(c["expert_set"]),
           mean(c["expert_set_router_held"])) for c in changes]
  rows.append(("mean of the intervals", *(mean([row[i] for row in rows]) for i in (1, 2, 3))))
  for steps, first, changed, held in rows:
    print(f"{label} | {steps} | {first:.1%} | {changed:.1%} | {held:.1%} | {held / changed:.2f}")
