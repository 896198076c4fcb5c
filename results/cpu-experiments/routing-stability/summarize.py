"""The routing changes of the runs here, averaged over their three MoE layers, as a table;
then, per layer, the share of the first expert's entropy that the token determines.

  python results/cpu-experiments/routing-stability/summarize.py
"""
import json
from pathlib import Path

HERE = Path(__file__).parent
RUNS = {"e16": "16 experts", "e32": "32 experts", "e32_lr0.5": "32 experts, expert lr x 0.5"}
mean = lambda values: sum(values) / len(values)
saved = {name: json.loads((HERE / f"{name}.json").read_text()) for name in RUNS
         if (HERE / f"{name}.json").exists()}

print("run | steps | first expert changed | expert set changed | with the routers held "
      "| held / set")
print("--- | --- | ---: | ---: | ---: | ---:")
for name, label in RUNS.items():
  if name not in saved:
    continue
  changes = saved[name]["changes"]
  rows = [(f"{c['before']} -> {c['after']}", mean(c["first_expert"]), mean(c["expert_set"]),
           mean(c["expert_set_router_held"])) for c in changes]
  rows.append(("mean of the intervals", *(mean([row[i] for row in rows]) for i in (1, 2, 3))))
  for steps, first, changed, held in rows:
    print(f"{label} | {steps} | {first:.1%} | {changed:.1%} | {held:.1%} | {held / changed:.2f}")

print()
print("run | step | " + " | ".join(f"MoE layer {i}: token's share (shuffled)" for i in range(3)))
print("--- | --- | " + " | ".join("---:" for _ in range(3)))
for name, label in RUNS.items():
  if name not in saved:
    continue
  shares = saved[name]["token_shares"]
  for share in (shares[0], shares[len(shares) // 2], shares[-1]):
    print(f"{label} | {share['step']} | " + " | ".join(
        f"{b:.2f} ({s:.2f})" for b, s in zip(share["by_token"], share["shuffled"])))

# The same changes, drawn: the pair's changes against the interval's end, solid; with the routers
# held, dashed (routing_stability.png, next to this file).
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

figure, axis = plt.subplots(figsize=(7, 4.5))
for (name, label), color in zip(RUNS.items(), ("tab:blue", "tab:orange", "tab:green")):
  if name not in saved:
    continue
  changes = saved[name]["changes"]
  steps = [c["after"] for c in changes]
  axis.plot(steps, [mean(c["expert_set"]) for c in changes], color=color, label=label)
  axis.plot(steps, [mean(c["expert_set_router_held"]) for c in changes], color=color,
            linestyle="--", label=f"{label}, routers held")
axis.set_xlabel("training step (end of each 250-step interval)")
axis.set_ylabel("validation tokens whose pair of experts changed")
axis.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
axis.set_title("Routing changes between checkpoints, mean of 3 MoE layers (seed 0)")
axis.legend(fontsize=8)
axis.grid(alpha=0.3)
figure.tight_layout()
figure.savefig(HERE / "routing_stability.png", dpi=110)
