"""The table of seeds.sh's runs: each seed's eval at iteration 2000 (each implementation's
own 20 batches), its whole validation split, and wall time; then ours − nanoGPT per seed
on the whole split, with mean ± sample SD.

  python3 results/nanogpt_cpu/summarize_seeds.py 0 1 2 3     # reads /tmp/sbs/seeds
"""

import re
import statistics
import sys
from pathlib import Path

root = Path("/tmp/sbs/seeds")
walls = {}
for line in (root / "walls.txt").read_text().splitlines():
  kind, _, seed, _, wall = line.split()
  walls[(kind, seed)] = float(wall)  # a rerun of a seed keeps its last time


def number(pattern: str, path: Path) -> float:
  return float(re.findall(pattern, path.read_text())[-1])


print("| seed | nanoGPT eval at 2000 | nanoGPT whole split | nanoGPT wall | ours eval at 2000 "
      "| ours whole split | ours wall | ours − nanoGPT, whole split | ours / nanoGPT, wall |")
print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
differences, ratios = [], []
for seed in sys.argv[1:]:
  theirs = number(r"step 2000: train loss [\d.]+, val loss ([\d.]+)", root / f"nanogpt_{seed}.log")
  theirs_split = number(r"validation split ([\d.]+) nats", root / f"nanogpt_{seed}.split")
  ours = number(r"eval step 2000: val loss ([\d.]+)", root / f"ours_{seed}.log")
  ours_split = number(r"validation split ([\d.]+) nats", root / f"ours_{seed}.split")
  wall_theirs, wall_ours = walls[("nanogpt", seed)], walls[("ours", seed)]
  differences.append(ours_split - theirs_split)
  ratios.append(wall_ours / wall_theirs)
  print(f"| {seed} | {theirs:.4f} | {theirs_split:.4f} | {wall_theirs:.1f} s | {ours:.4f} "
        f"| {ours_split:.4f} | {wall_ours:.1f} s | {differences[-1]:+.4f} | {ratios[-1]:.2f}x |")
print(f"\nours − nanoGPT on the whole split: {statistics.mean(differences):+.4f} ± "
      f"{statistics.stdev(differences):.4f} (mean ± sample SD, n={len(differences)}); "
      f"wall time ours / nanoGPT: median {statistics.median(ratios):.2f}x "
      f"(range {min(ratios):.2f}-{max(ratios):.2f}x, n={len(ratios)})")
