"""The study: train a set of models on the same tokens with the same seeds, then report.

  python -m chimera.compare --preset=cpu                 # dense, MoE top-1/top-2, dense-wide
  python -m chimera.compare --preset=gpu
  python -m chimera.compare --preset=cpu --sweep=model.num_experts=4,8,16
  python -m chimera.compare --preset=cpu --sweep=model.priority=token,rank --seeds=0

The default set is:
- dense: configs/dense.py, the baseline;
- moe_top1, moe_top2: configs/moe_top*.py, compute-matched to dense (FLOPs per token
  within 10 %, checked here before training);
- dense_wide: the dense model with d_ff = E * expert_d_ff of moe_top2, so its total
  parameters match moe_top2's (all of them active).
A sweep trains configs/moe_top2.py (or --base) once per value of one field instead.

Every run is a normal chimera.main run in runs/compare/<config hash>/, so an
interrupted study resumes where it stopped, and runs shared between studies (the same
config and seed) are trained once. The report, plots and summary.json go to
results/<preset>/ (or results/<preset>-sweep-<field>/).
"""

import dataclasses
import hashlib
import json
import sys
from pathlib import Path

from absl import app, flags, logging

from chimera import accounting, bench, config as config_lib, report
from chimera.config import Config
from chimera.errors import ChimeraError

_PRESET = flags.DEFINE_enum("preset", "cpu", ["cpu", "gpu"], "Scale of the study.")
_CORPUS = flags.DEFINE_string("corpus", None, "Corpus for every model (default: the configs').")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1"], "Seeds; each model is trained once per seed.")
_SWEEP = flags.DEFINE_string("sweep", None, "section.field=v1,v2,...: sweep one field of --base.")
_BASE = flags.DEFINE_string("base", "configs/moe_top2.py", "The config a sweep varies.")
_STEPS = flags.DEFINE_integer("train_steps", None, "Override the preset's training steps.")
_OUT = flags.DEFINE_string("out", None, "Report directory (default: results/<preset>[...]).")
_RUNS = flags.DEFINE_string("runs", "runs/compare", "Where the training runs live.")
_BENCH_REPEATS = flags.DEFINE_integer("bench_repeats", 3, "Interleaved speed repeats.")

# Per preset: which preset of the config files, and the training overrides.
PRESETS = {
    "cpu": ("default", {"train.steps": 600, "train.eval_every": 100, "train.log_every": 50,
                        "train.checkpoint_every": 300}),
    "gpu": ("gpu", {}),
}


def default_models(preset_arg: str, overrides: dict) -> list[tuple[str, Config]]:
  """dense, moe_top1, moe_top2 and a dense model with moe_top2's total parameters."""
  load = lambda name, extra={}: config_lib.load(
      f"configs/{name}.py" + ("" if preset_arg == "default" else f":{preset_arg}"),
      {**overrides, **extra})
  dense, moe_top2 = load("dense"), load("moe_top2")
  wide_ff = moe_top2.model.num_experts * moe_top2.model.expert_d_ff
  models = [("dense", dense), ("moe_top1", load("moe_top1")), ("moe_top2", moe_top2),
            ("dense_wide", load("dense", {"model.d_ff": wide_ff}))]
  base_flops = accounting.count(dense.model, dense.train.context).flops_per_token
  for name, config in models[1:3]:
    flops = accounting.count(config.model, config.train.context).flops_per_token
    if abs(flops / base_flops - 1) > 0.10:
      raise ChimeraError(f"{name} is not compute-matched to dense: {flops:,} vs "
                         f"{base_flops:,} FLOPs per token")
  return models


def sweep_models(base: str, preset_arg: str, sweep: str,
                 overrides: dict) -> list[tuple[str, Config]]:
  key, _, values = sweep.partition("=")
  if not values:
    raise ChimeraError(f"--sweep: expected section.field=v1,v2,..., got {sweep!r}")
  spec = base + ("" if preset_arg == "default" else f":{preset_arg}")
  return [(f"{key.split('.')[-1]}={value}",
           config_lib.load(spec, {**overrides, key: bench.parse_value(value)}))
          for value in values.split(",")]


def run_dir(root: Path, config: Config) -> Path:
  """A run's directory, keyed by its whole config but its name, so identical runs are
  shared between studies (a sweep's num_experts=8 is the study's moe_top2)."""
  values = config_lib.to_dict(config)
  values.pop("name")
  return root / hashlib.sha1(json.dumps(values, sort_keys=True).encode()).hexdigest()[:12]


def train_all(models: list[tuple[str, Config]], seeds: list[int], root: Path) -> dict:
  """Trains every model for every seed (resuming finished or partial runs)."""
  from chimera.train import train  # heavy import, after the arguments are checked
  runs = {}
  for seed in seeds:  # seed-major: a partial study still compares every model
    for name, config in models:
      seeded = dataclasses.replace(
          config, name=f"{name}-seed{seed}",
          train=dataclasses.replace(config.train, seed=seed),
          data=dataclasses.replace(config.data, seed=seed))
      workdir = run_dir(root, seeded)
      print(f"== {name}, seed {seed}: {workdir}", file=sys.stderr, flush=True)
      train(seeded, workdir)
      runs.setdefault(name, []).append(report.load_run(workdir, seed))
  return runs


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  preset_arg, overrides = PRESETS[_PRESET.value]
  overrides = dict(overrides)
  if _CORPUS.value:
    overrides["data.corpus"] = _CORPUS.value
  if _STEPS.value:
    overrides["train.steps"] = _STEPS.value
  try:
    seeds = [int(s) for s in _SEEDS.value]
    if _SWEEP.value:
      models = sweep_models(_BASE.value, preset_arg, _SWEEP.value, overrides)
      field = _SWEEP.value.partition("=")[0].split(".")[-1]
      out = Path(_OUT.value or f"results/{_PRESET.value}-sweep-{field}")
      title = f"Sweep over {_SWEEP.value.partition('=')[0]} ({_PRESET.value} preset)"
    else:
      models = default_models(preset_arg, overrides)
      out = Path(_OUT.value or f"results/{_PRESET.value}")
      title = f"MoE vs dense at equal compute ({_PRESET.value} preset)"
    runs = train_all(models, seeds, Path(_RUNS.value))
  except ChimeraError as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)
  print("== measuring speed", file=sys.stderr, flush=True)
  speed = bench.run(models, _BENCH_REPEATS.value)
  report.write(out, title=title, models=models, runs=runs, speed=speed,
               command="python -m chimera.compare " + " ".join(sys.argv[1:]))
  print(f"report: {out / 'REPORT.md'}")


if __name__ == "__main__":
  app.run(main)
