#!/usr/bin/env bash
# Kernels.cpu_dots: eigen (the default) against xla (jaxlib's choice, YNNPACK for most dots),
# train-step seconds in one bench process per command, interleaved repeats, records saved
# here. Run from the repository root: bash results/cpu-experiments/cpu-dots/bench.sh
set -euo pipefail
here=results/cpu-experiments/cpu-dots
{ date -u +%FT%TZ; nproc; grep -m1 "model name" /proc/cpuinfo; git rev-parse --short HEAD; } > $here/bench_machine.txt
python -m chimera.bench --configs=configs/dense.py,configs/moe_top2.py \
    --variants=kernels.cpu_dots=eigen,xla --repeats=7 --steps=5 --decode_batches= --nomoe_split \
    --json=$here/bench_default.json > $here/bench_default.log 2>&1
python -m chimera.bench --configs=configs/dense.py:nanogpt_cpu,configs/dense.py:small,configs/moe_top2.py:small,configs/moe_fine.py:small \
    --variants=kernels.cpu_dots=eigen,xla --repeats=7 --steps=10 --decode_batches= --nomoe_split \
    --json=$here/bench_small.json > $here/bench_small.log 2>&1
python - "$here" <<'PY'
import json, sys
from pathlib import Path
here = Path(sys.argv[1])
print("| config | eigen s | xla s | eigen / xla | step memory, eigen / xla |")
print("| --- | ---: | ---: | ---: | ---: |")
for name in ("bench_default", "bench_small"):
  records = json.loads((here / f"{name}.json").read_text())
  by = {}
  for r in records:
    by.setdefault(r["spec"], {})[r["kernels"]["cpu_dots"]] = r
  for spec, two in by.items():
    e, x = two["eigen"], two["xla"]
    mem = lambda r: f"{r['peak_memory_bytes'] / 1e6:.0f}" if r.get("peak_memory_bytes") else "-"
    print(f"| {spec} | {e['train_step_seconds']:.4f} | {x['train_step_seconds']:.4f} | "
          f"{e['train_step_seconds'] / x['train_step_seconds']:.2f} | {mem(e)} / {mem(x)} MB |")
PY
