"""The token cache at scale: a benchmark that prints its figures (a script, not a test).

  python -m chimera.data.bench_cache [--size_mb=1000] [--dir=/tmp/chimera-bench-cache] \
      [--parts=prepare,train] [--repeats=2] [--keep]

1. Writes a corpus of --size_mb MB into --dir: 1 MB files of runs of lines drawn at random
   from the Shakespeare corpus.
2. prepare: `python -m chimera.data --corpus=DIR --tokenizer=gpt2`, the first preparation
   of its cache, with every core. Target: at least 5 MB/s of text on 2 cores.
3. train: the same 2-step run of configs/dense.py:tiny on GPT-2 tokens, on Shakespeare and
   on this corpus, both caches built. Targets: at most 5 s longer wall clock and at most
   300 MB more peak resident memory than on Shakespeare.
Each command runs in a child process, measured by wait4 (wall clock, CPU time, max RSS).
Then the corpus and its cache are deleted, unless --keep, or unless DIR/corpus was there
before the run (a kept corpus is reused, and left as it was).
"""
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
from absl import app, flags

from chimera.data.corpora import load_corpus
from chimera.errors import ChimeraError, check_writable, existing_ancestor, parse_flags, tool_main

FILE_BYTES = 1_000_000
# The config by its place in the checkout, so the tool runs from any directory.
DENSE = Path(__file__).resolve().parents[2] / "configs" / "dense.py"
TRAIN = ["-m", "chimera.main", f"--config={DENSE}:tiny", "--config.data.tokenizer=gpt2",
         "--config.model.vocab_size=50304", "--config.train.steps=2", "--config.train.warmup_steps=1"]


class Measured(NamedTuple):
  wall_s: float
  cpu_s: float  # user + system
  max_rss_mb: float
  stdout: str


def measure(args: list[str], log: Path) -> Measured:
  """Runs `python args` in a child process; its output goes to `log`."""
  started = time.perf_counter()
  with open(log, "w") as out:
    child = subprocess.Popen([sys.executable, *args], stdout=out, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(child.pid, 0)
  wall = time.perf_counter() - started
  child.returncode = os.waitstatus_to_exitcode(status)
  if child.returncode:
    sys.exit(f"failed ({child.returncode}): python {' '.join(args)}\n{log.read_text()[-3000:]}")
  return Measured(wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, log.read_text())


def write_corpus(folder: Path, size_mb: int) -> int:
  """Fills `folder` with 1 MB files of random runs of 1-40 Shakespeare lines; returns bytes.
  They are written beside it and renamed into place whole: an interrupted write leaves no
  partial corpus that a later run would take for its own."""
  lines = [line for doc in load_corpus("shakespeare") for line in doc.text.splitlines(keepends=True)]
  rng, written = np.random.default_rng(0), 0
  partial = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
  try:
    for i in range(size_mb * 1_000_000 // FILE_BYTES):
      written += _write_file(partial / f"doc{i:05d}.txt", lines, rng)
    partial.rename(folder)
  except BaseException:
    shutil.rmtree(partial, ignore_errors=True)
    raise
  return written


def _write_file(path: Path, lines: list[str], rng) -> int:
  """One file of about FILE_BYTES; returns its bytes."""
  runs, size = [], 0
  while size < FILE_BYTES:
    start = int(rng.integers(len(lines)))
    run = "".join(lines[start:start + int(rng.integers(1, 41))])
    runs.append(run)
    size += len(run)
  data = "".join(runs).encode("utf-8")
  path.write_bytes(data)
  return len(data)


def cache_of(output: str) -> Path:
  return Path(next(line for line in output.splitlines() if line.startswith("cache: "))[7:])


PARTS = ("prepare", "train")


def check_flags(size_mb: int, folder: Path, parts: list[str], repeats: int) -> float:
  """A ChimeraError, in one line, for flags that would fail after minutes of writing (or
  measure nothing); returns the free GB where the corpus goes. A corpus already in `folder`
  is reused, so only a new one needs the room: its size plus about half for its cache."""
  if size_mb < 1:
    raise ChimeraError(f"--size_mb: must be >= 1, got {size_mb}")
  if repeats < 1:
    raise ChimeraError(f"--repeats: must be >= 1, got {repeats}")
  if set(parts) - set(PARTS):
    raise ChimeraError(f"--parts: expected {', '.join(PARTS)}, both, or none (--parts=), got "
                       f"{','.join(parts)!r}")
  check_writable("dir", folder, folder=True)
  there = existing_ancestor(folder)
  free_gb = shutil.disk_usage(there).free / 1e9
  if not folder.exists() and free_gb < 1.5 * size_mb / 1000:
    raise ChimeraError(f"--size_mb={size_mb}: the corpus and its cache need about "
                       f"{1.5 * size_mb / 1000:.3g} GB, and {there} has {free_gb:.3g} GB free")
  return free_gb


@tool_main
def main(argv: list[str]) -> None:
  del argv
  f = flags.FLAGS
  folder = Path(f.dir).absolute() / "corpus"
  try:
    free_gb = check_flags(f.size_mb, folder, f.parts, f.repeats)
    folder.parent.mkdir(parents=True, exist_ok=True)
  except (ChimeraError, OSError) as e:
    print(f"error: {e if isinstance(e, ChimeraError) else f'--dir: {e.strerror}: {e.filename}'}",
          file=sys.stderr)
    sys.exit(2)
  logs = Path(tempfile.mkdtemp(prefix="bench-cache-"))
  print(f"disk: {free_gb:.0f} GB free; the corpus takes {f.size_mb / 1000:.1f} GB and its "
        f"cache about half that", flush=True)
  created = not folder.exists()  # only what this run wrote is deleted after it
  if created:
    started = time.perf_counter()
    size = write_corpus(folder, f.size_mb)
    print(f"corpus: {size / 1e6:,.0f} MB in {len(list(folder.iterdir()))} files, written in "
          f"{time.perf_counter() - started:.0f} s: {folder}", flush=True)
  size = sum(p.stat().st_size for p in folder.iterdir())
  prepare = lambda corpus, name: measure(
      ["-m", "chimera.data", f"--corpus={corpus}", "--tokenizer=gpt2"], logs / f"{name}.log")
  cores = len(os.sched_getaffinity(0))
  try:
    if "prepare" in f.parts:
      first = prepare(folder, "prepare")
      print(f"prepare: {size / 1e6 / first.wall_s:.1f} MB/s on {cores} cores ({first.wall_s:.0f} s "
            f"wall, {first.cpu_s:.0f} s CPU, max RSS {first.max_rss_mb:.0f} MB); target >= 5 MB/s",
            flush=True)
      print("\n".join("  " + line for line in first.stdout.splitlines()
                      if line.startswith(("cache", "corpus", "train", "val"))), flush=True)
      again = prepare(folder, "prepare-again")
      print(f"prepare again (cached): {again.wall_s:.2f} s wall, max RSS {again.max_rss_mb:.0f} MB",
            flush=True)
    if "train" in f.parts:
      prepare("shakespeare", "prepare-shakespeare")
      prepare(folder, "prepare-big")
      runs = {}
      for repeat in range(f.repeats):
        for name, corpus in [("shakespeare", "shakespeare"), ("big", folder)]:
          workdir = logs / f"run-{name}-{repeat}"
          runs.setdefault(name, []).append(measure(
              TRAIN + [f"--config.data.corpus={corpus}", f"--workdir={workdir}"],
              logs / f"train-{name}-{repeat}.log"))
      best = {name: min(measured, key=lambda m: m.wall_s) for name, measured in runs.items()}
      for name, m in best.items():
        print(f"train {name}: {m.wall_s:.1f} s wall, {m.cpu_s:.1f} s CPU, max RSS {m.max_rss_mb:.0f} MB "
              f"(fastest of {', '.join(f'{r.wall_s:.1f}' for r in runs[name])} s)", flush=True)
      extra_s = best["big"].wall_s - best["shakespeare"].wall_s
      extra_mb = best["big"].max_rss_mb - best["shakespeare"].max_rss_mb
      print(f"train on {size / 1e9:.1f} GB vs Shakespeare: {extra_s:+.1f} s wall (target <= 5 s), "
            f"{extra_mb:+.0f} MB max RSS (target <= 300 MB)", flush=True)
  finally:
    if f.keep:
      print(f"kept the corpus in {folder}, its cache, and the logs in {logs}", flush=True)
    else:
      if created:
        cached = [cache_of(log.read_text()) for log in logs.glob("prepare*.log")
                  if "prepare-shakespeare" not in log.name and "cache: " in log.read_text()]
        for path in {folder, *cached}:
          shutil.rmtree(path, ignore_errors=True)
      shutil.rmtree(logs, ignore_errors=True)
      print("deleted the corpus and its cache" if created else
            f"left {folder} and its cache as they were (this run did not write them)", flush=True)


if __name__ == "__main__":  # here, so that importing the module (tests) defines no flags
  flags.DEFINE_integer("size_mb", 1000, "Size of the corpus to write, in MB (1e6 bytes).")
  flags.DEFINE_string("dir", "/tmp/chimera-bench-cache", "Where the corpus is written.")
  flags.DEFINE_list("parts", ["prepare", "train"], "prepare, train, both, or none "
                    "(--parts=: write the corpus only, to keep with --keep).")
  flags.DEFINE_integer("repeats", 2, "Training runs per corpus; the fastest counts.")
  flags.DEFINE_bool("keep", False, "Keep the corpus and its cache.")
  app.run(main, flags_parser=parse_flags)
