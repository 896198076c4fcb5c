"""The side-by-side table of nanoGPT / nanogpt_cpu pairs from run_one.sh's files.

  python3 results/nanogpt_cpu/summarize_pairs.py 10 11 12   # pair numbers

Reads /tmp/sbs/{nanogpt,ours}_N.{post,out,err} (run_one.sh's logs) and
/tmp/ours_N/summary.json, and prints one markdown row per pair: nanoGPT's wall time,
median iteration and eval at 2000; ours' wall time, train tokens/s, eval at 2000, compile
line and system time; and ours / nanoGPT.
"""
import json
import re
import statistics
import sys
from pathlib import Path

LOGS = Path("/tmp/sbs")


def wall(kind: str, n: int) -> float:
  return float(re.search(r"wall=([\d.]+)", (LOGS / f"{kind}_{n}.post").read_text()).group(1))


def row(n: int) -> str:
  out = (LOGS / f"nanogpt_{n}.out").read_text()
  iterations = [float(t) for t in re.findall(r"iter \d+: loss [\d.]+, time ([\d.]+)ms", out)]
  nanogpt_val = re.findall(r"step 2000: train loss [\d.]+, val loss ([\d.]+)", out)
  summary = json.loads(Path(f"/tmp/ours_{n}/summary.json").read_text())
  err = (LOGS / f"ours_{n}.err").read_text()
  compiled = re.search(r"compiled[^0-9]*([\d.]+) s", err).group(1)
  system = re.search(r"System time \(seconds\): ([\d.]+)", err).group(1)
  theirs, ours = wall("nanogpt", n), wall("ours", n)
  return (f"| {n} | {theirs:.1f} s | {statistics.median(iterations):.1f} ms | "
          f"{nanogpt_val[0] if nanogpt_val else '?'} | {ours:.1f} s | "
          f"{summary['train_tokens_per_second']:,.0f} | {summary['final_val_loss']:.4f} | "
          f"{compiled} s | {system} s | **{ours / theirs:.2f}x** |")


if __name__ == "__main__":
  for n in map(int, sys.argv[1:]):
    print(row(n))
