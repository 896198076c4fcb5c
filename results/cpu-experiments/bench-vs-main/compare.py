"""The table of run.sh: bench tokens/s, chimera.main's train_tokens_per_second, their ratio."""
import json
import sys
from pathlib import Path

here = Path(sys.argv[1])
records = json.loads((here / "bench.json").read_text())
bench = {Path(r["name"]).stem: r for r in records}
print("| config | bench tokens/s | chimera.main train_tokens_per_second | bench / main |")
print("| --- | ---: | ---: | ---: |")
for name in ("dense", "moe_top2"):
  main = json.loads((here / f"main_{name}.json").read_text())["train_tokens_per_second"]
  b = bench[name]["train_tokens_per_second"]
  print(f"| {name} | {b:,.0f} | {main:,.0f} | {b / main:.3f} |")
steps = {n: bench[n]["train_step_seconds"] for n in ("dense", "moe_top2")}
print(f"\nbench step: dense {steps['dense']:.4f} s, moe_top2 {steps['moe_top2']:.4f} s, "
      f"MoE / dense {steps['moe_top2'] / steps['dense']:.2f}x")
