"""The study: train a set of models on the same tokens with the same seeds, then report.

  python -m chimera.compare --preset=cpu            # 5 models x 2 seeds, 10.24M tokens each
  python -m chimera.compare --preset=gpu-small      # the same models, 20.97M tokens, 1 seed
  python -m chimera.compare --preset=cpu --sweep=model.num_experts=4,8,16,32
  python -m chimera.compare --preset=cpu --sweep=granularity
      # or shared, balancing, capacity, init, calibration, experts_sqrt_lr, experts_best_lr
  python -m chimera.compare --preset=cpu --sweep=balancing --base_set=model.num_experts=32
  python -m chimera.compare --preset=cpu --sweep=model.num_experts=16,32 --set=train.batch_size=64
  python -m chimera.compare --preset=cpu --bench_repeats=0 --report_only   # rewrite a report
  python -m chimera.compare --preset=cpu --refresh   # its Targets and Findings, runs gone

The study's models:
- dense: configs/dense.py, the baseline;
- moe_top1, moe_top2, moe_fine: configs/<name>.py, compute-matched to dense (model FLOPs
  per token within 10%, checked here before anything trains);
- dense_wide: the dense model with moe_top2's total parameters, all of them active
  (d_ff = (E + shared) * expert_d_ff when every layer is MoE; with moe_every or
  first_moe_layer, moe_top2's feed-forward parameters spread over all layers).
A sweep trains its base config once per point (chimera.study_sweeps) beside dense, one
seed per point unless --seeds says otherwise.

A --set value applies to every model that reads it: settings only an MoE reads
(config.MOE_ONLY) leave dense the plain run, and dense_wide too unless they change
moe_top2's parameter count (moe_every, first_moe_layer, num_shared_experts, ...).
Refused, in one line: --set of model.num_experts or model.top_k in the study (they tell
moe_top1, moe_top2 and moe_fine apart: sweep them instead), seeds and names anywhere
(--seeds sets them), a --set or --base_set of a field the sweep's points set, a sweep whose
points differ from dense in the backbone, data, tokens or validation subset, a named
sweep of MoE settings over a dense base, and points that differ only where a run does
not (what it logs, how often it saves).

Every run is a normal training run in runs/compare/<config hash>/, so an interrupted study
resumes where it stopped, and runs shared between studies (the same config and seed)
train once. The report, plots and summary.json go to results/<preset>/ or
results/<preset>-sweep-<name>/ (chimera.report); a --base_set value adds
-at-<field>-<value> to the name, a --base other than the sweep's own adds -over-<config>,
and a --set, --corpus or --train_steps value, which changes the models that read it, adds
-with-<field>-<value>.
"""

import dataclasses
import hashlib
import json
import re
import sys
from pathlib import Path

import jax
from absl import app, flags, logging

from chimera import (accounting, bench, compile_cache, config as config_lib, report, sharding,
                     study_sweeps)
from chimera.config import Config
from chimera.data.cache import peek as peek_cache, prepare as prepare_cache
from chimera.data.corpora import open_corpus, write_atomic
from chimera.data.tokenizers import get_tokenizer
from chimera.errors import (ChimeraError, check_writable, is_disk_refusal, parse_flags,
                            out_of_memory_is_one_line)
from chimera.records import RunSummary
from chimera.study_stats import Run


@dataclasses.dataclass(frozen=True)
class StudyPreset:
  """One scale of the study: a preset of configs/*.py and what the study sets over it."""

  config_preset: str
  overrides: dict  # {"section.field": value} for every model
  seeds: tuple[int, ...]
  sized_for: str


PRESETS = {
    # 2500 steps x 32 x 128 = 10.24M byte tokens per run; an evaluation every 10%.
    "cpu": StudyPreset("small", {"train.steps": 2500, "train.batch_size": 32,
                                 "train.context": 128, "train.eval_every": 250,
                                 "train.log_every": 50, "train.checkpoint_every": 250},
                       seeds=(0, 1), sized_for="2 CPU cores, about 4 h for the whole study"),
    # 1280 steps x 64 x 256 = 20.97M byte tokens per run, every model in one GPU call.
    "gpu-small": StudyPreset("small", {"train.steps": 1280, "train.batch_size": 64,
                                       "train.context": 256, "train.eval_every": 128,
                                       "train.log_every": 32, "train.checkpoint_every": 640},
                             seeds=(0,), sized_for="one H100, under 8 minutes"),
    "gpu": StudyPreset("gpu", {}, seeds=(0,), sized_for="one GPU, GPT-2 tokens"),
}
MOE_CONFIGS = ("moe_top1", "moe_top2", "moe_fine")  # configs/<name>.py, compute-matched
COMPUTE_MATCH = 0.10  # MoE model FLOPs per token within 10% of dense's

_PRESET = flags.DEFINE_enum("preset", "cpu", list(PRESETS), "Scale of the study.")
_CORPUS = flags.DEFINE_string("corpus", None, "Corpus for every model (default: the configs').")
_SEEDS = flags.DEFINE_list("seeds", None, "Seeds (default: the preset's; a sweep's first).")
_SWEEP = flags.DEFINE_string("sweep", None, "A named sweep (" + ", ".join(study_sweeps.SWEEPS)
                             + ") or section.field=v1,v2,... of --base.")
_BASE = flags.DEFINE_string("base", None, "The config a sweep varies (default: the sweep's).")
_BASE_SET = flags.DEFINE_multi_string(
    "base_set", [], "section.field=value over a sweep's base only, not dense: the sweep at "
    "another point of its base (--sweep=balancing --base_set=model.num_experts=32).")
_STEPS = flags.DEFINE_integer("train_steps", None, "Override the preset's training steps.")
_SET = flags.DEFINE_multi_string("set", [], "section.field=value for every model that reads "
                                 "it, over the preset (a changed config is a new run; the "
                                 "values name the report's folder: "
                                 "results/<preset>-...-with-<field>-<value>).")
_OUT = flags.DEFINE_string("out", None, "Report directory (default: results/<preset>[...]).")
_RUNS = flags.DEFINE_string("runs", "runs/compare", "Where the training runs live.")
_RESULTS = flags.DEFINE_string("results", "results", "Where the reports live.")
_REPORT_ONLY = flags.DEFINE_bool(
    "report_only", False, "Write the report from runs already trained; refuse to train "
    "(an unfinished run is an error).")
_REFRESH = flags.DEFINE_bool(
    "refresh", False, "Rewrite the Targets and Findings of the study's existing report from "
    "its summary.json with this code's rules; trains and reads no run (for a report whose "
    "runs are gone). Tables and plots stay as they were written.")
_BENCH_REPEATS = flags.DEFINE_integer(
    "bench_repeats", 3, "Interleaved speed repeats after training; 0: no bench (the report "
    "then gives the throughput measured during training only).")


@dataclasses.dataclass(frozen=True)
class Model:
  name: str
  config: Config
  role: str  # "baseline", "moe" (compute-matched MoE), "reference" (dense_wide), "point"
  spec: str = ""  # the config file[:preset] it was loaded from
  overrides: dict = dataclasses.field(default_factory=dict)  # {"section.field": value} over it


@dataclasses.dataclass(frozen=True)
class Study:
  title: str
  preset: str  # a key of PRESETS
  models: list[Model]
  slug: str  # the report's folder under results/
  sweep: str | None = None  # the --sweep value, for a sweep
  base_set: tuple[str, ...] = ()  # its --base_set values, "section.field=value"
  sets: tuple[str, ...] = ()  # the --set values over the models, "section.field=value"
  base: str | None = None  # a sweep's --base, when given
  default_seeds: tuple[int, ...] = ()  # the seeds it trains without --seeds

  def command(self, seeds: list[int]) -> str:
    """The chimera.compare command that trains and reports this study at `seeds`."""
    return (f"python -m chimera.compare --preset={self.preset}"
            + (f" --sweep={self.sweep}" if self.sweep else "")
            + (f" --base={self.base}" if self.base else "")
            + "".join(f" --base_set={value}" for value in self.base_set)
            + "".join(f" --set={value}" for value in self.sets)
            + ("" if list(seeds) == list(self.default_seeds)
               else " --seeds=" + ",".join(map(str, seeds))))

  def expert_sweep_command(self, seeds: list[int]) -> str:
    """The number-of-experts sweep at this study's preset and --set values, at `seeds`
    (a sweep's default seed is its preset's first)."""
    sweep = Study("", self.preset, [], "", sweep="model.num_experts=4,8,16,32",
                  sets=self.sets, default_seeds=self.default_seeds[:1])
    return sweep.command(seeds or list(sweep.default_seeds))

  @property
  def over_moe_top2(self) -> bool:
    """Whether a sweep varies configs/moe_top2.py (its default base for a field sweep)."""
    return self.base is None or Path(self.base).stem == "moe_top2"


# Set for each run from --seeds and the model's name, never by --set, --base_set or a sweep.
PER_RUN = ("name", "train.seed", "data.seed")
# What tells the study's MoE configs apart: one --set value would make them alike.
STUDY_DEFINING = ("model.num_experts", "model.top_k")


def check_keys(flag: str, keys) -> None:
  for key in keys:
    if key in PER_RUN:
      raise ChimeraError(f"{flag}: {key} is set for each run from --seeds and the model's "
                         f"name; choose seeds with --seeds")


def load(path: str, preset: StudyPreset, overrides: dict) -> Config:
  return config_lib.load(f"{path}:{preset.config_preset}", {**preset.overrides, **overrides})


def make_model(name: str, role: str, path: str, preset: StudyPreset, overrides: dict) -> Model:
  """A model of the study. The dense ones (dense, dense_wide) take no MoE-only setting:
  --set=model.num_experts=32 is for the MoE models, and a setting a dense model would
  ignore must not make it a new run (runs are keyed by their whole config). dense_wide's
  width follows moe_top2's parameters (`study_models`)."""
  if role in ("baseline", "reference"):
    overrides = {k: v for k, v in overrides.items() if k not in config_lib.MOE_ONLY}
  try:
    config = load(path, preset, overrides)
  except ChimeraError as error:  # dense, built first, fails on what every model gets
    if role == "baseline":
      raise
    raise ChimeraError(f"{name} ({path}): {error}") from None
  return Model(name, config, role, f"{path}:{preset.config_preset}",
               {**preset.overrides, **overrides})


def check_compute_matched(models: list[Model]) -> None:
  flops = {m.name: accounting.count(m.config.model, m.config.train.context).flops_per_token
           for m in models}
  base = flops[models[0].name]
  for m in models:
    if m.role == "moe" and abs(flops[m.name] / base - 1) > COMPUTE_MATCH:
      raise ChimeraError(f"{m.name} is not compute-matched to {models[0].name}: "
                         f"{flops[m.name]:,} vs {base:,} FLOPs per token")


# What a sweep's points over an MoE base share with dense: the backbone (every model field
# but the MoE's own and the two below), the data, and the tokens each run trains on. The
# rest of the training (optimiser, dropout, initial scale) is the MoE's recipe to tune.
SAME_AS_DENSE = ("train.steps", "train.batch_size", "train.context", "train.eval_batches")
MAY_DIFFER = ("model.dropout", "model.init_std")


def check_same_backbone(models: list[Model]) -> None:
  """Refuses a sweep point over an MoE base that differs from dense (models[0]) in its
  backbone, its data or its tokens: a --base_set (or the sweep's own field) that dense
  does not get would compare models of other compute or text."""
  dense = models[0].config
  for m in models[1:]:
    # run_differences leaves train.steps out (a run may be extended): asked for here.
    differing = [key for key in config_lib.run_differences(dense, m.config)
                 + (["train.steps"] if m.config.train.steps != dense.train.steps else [])
                 if (key.startswith(("model.", "data.")) or key in SAME_AS_DENSE)
                 and key not in config_lib.MOE_ONLY + MAY_DIFFER]
    if differing:
      raise ChimeraError(f"--sweep: {m.name} differs from dense in {', '.join(differing)}, "
                         f"which dense does not get; a setting of the backbone, the data or "
                         f"the tokens goes in --set, which dense gets too")


def study_models(preset: StudyPreset, overrides: dict) -> list[Model]:
  """dense, the compute-matched MoE configs and dense_wide, at the preset."""
  dense = make_model("dense", "baseline", "configs/dense.py", preset, overrides)  # first:
  # what every model gets fails there, without a model's name
  moes = [make_model(name, "moe", f"configs/{name}.py", preset, overrides) for name in MOE_CONFIGS]
  top2 = next(m.config.model for m in moes if m.name == "moe_top2")
  # moe_top2's feed-forward parameters spread over every layer: its MoE layers hold E + S
  # experts of expert_d_ff, the others (moe_every, first_moe_layer) a dense MLP of d_ff.
  moe_layers = top2.num_moe_layers
  wide_ff = round(((top2.num_experts + top2.num_shared_experts) * top2.expert_d_ff * moe_layers
                   + top2.d_ff * (top2.num_layers - moe_layers)) / top2.num_layers)
  models = [dense, *moes,
            make_model("dense_wide", "reference", "configs/dense.py", preset,
                  {**overrides, "model.d_ff": wide_ff})]
  check_compute_matched(models)
  return models


def sweep_models(sweep: str, base: str | None, preset: StudyPreset, overrides: dict,
                 base_overrides: dict | None = None) -> tuple[str, list[Model]]:
  """(question, [dense, point, point, ...]) for a named sweep or section.field=v1,v2,...

  base_overrides apply to the base and so to every point, not to dense (a point's own
  fields win over them)."""
  base_overrides = base_overrides or {}
  if "=" in sweep:
    key, _, values = sweep.partition("=")
    if not values:
      raise ChimeraError(f"--sweep: expected section.field=v1,v2,..., got {sweep!r}")
    base = base or "configs/moe_top2.py"
    base_config = load(base, preset, {**overrides, **base_overrides})
    parsed = [bench.parse_value(v, key) for v in values.split(",")]
    if len(set(map(repr, parsed))) < len(parsed):
      raise ChimeraError(f"--sweep: each value once, got {values!r}")
    points = study_sweeps.field_points(key, parsed)
    points_without = lambda key: points  # the values given, whatever the base
    question = f"{key} over {base}"
  elif sweep in study_sweeps.SWEEPS:
    named = study_sweeps.SWEEPS[sweep]
    base = base or named.base
    base_config = load(base, preset, {**overrides, **base_overrides})
    if not base_config.model.num_experts:  # every named sweep is of an MoE's settings
      raise ChimeraError(f"--sweep={sweep}: a sweep of an MoE's settings, and its base "
                         f"({base}{' with --base_set' if base_overrides else ''}) is dense "
                         f"(model.num_experts=0)")
    points = named.points(base_config)

    def points_without(key):
      """The points from the base without the setting `key`: equal to `points` if they
      do not follow it (a constant point drops it), or None if that base is not valid."""
      settings = {k: v for k, v in {**overrides, **base_overrides}.items() if k != key}
      try:
        return named.points(load(base, preset, settings))
      except ChimeraError:
        return None
    question = f"{named.question}, over {base}"
  else:
    raise ChimeraError(f"--sweep: expected one of {', '.join(study_sweeps.SWEEPS)} or "
                       f"section.field=v1,v2,..., got {sweep!r}")
  for flag, given in (("--set", overrides), ("--base_set", base_overrides)):
    for key in given:
      setting = [name for name, point in points if key in point]
      if setting and points == points_without(key):  # points that do not follow the base
        raise ChimeraError(f"{flag}={key}: the sweep sets {key} at its points "
                           f"({', '.join(setting)}), so this value would be dropped")
  if base_overrides:
    question += " at " + ", ".join(f"{key}={value}" for key, value in base_overrides.items())
  models = [make_model("dense", "baseline", "configs/dense.py", preset, overrides)]
  models += [make_model(name, "point", base, preset, {**overrides, **base_overrides, **point})
             for name, point in points]
  swept = [("--sweep", sweep.partition("=")[0])] if "=" in sweep else []
  check_read(models, swept + [("--set", key) for key in overrides]
             + [("--base_set", key) for key in base_overrides], sweep=True)
  for i, a in enumerate(models[1:], 1):  # values that differ as written, not once read (1 and 1.0)
    for b in models[i + 1:]:
      if a.config.train.steps == b.config.train.steps and not config_lib.run_differences(
          a.config, b.config):
        only = config_lib.run_differences(a.config, b.config, neutral=False)
        why = (f": they differ only in {', '.join(only)}, which does not change what a run "
               f"trains" if only else "; each value once")
        raise ChimeraError(f"--sweep: {a.name} and {b.name} are the same model{why}")
  if base_config.model.num_experts:  # an MoE base
    if (dense := [m.name for m in models[1:] if not m.config.model.num_experts]):
      what = "is a dense model" if len(dense) == 1 else "are dense models"
      raise ChimeraError(f"--sweep: {', '.join(dense)} {what} (model.num_experts=0) over an "
                         f"MoE base, which computes the study's dense baseline again")
    check_same_backbone(models)
  return question, models


def check_read(models: list[Model], settings: list[tuple[str, str]], sweep: bool) -> None:
  """Refuses a (flag, key) setting of a field no model of the study reads: one only an MoE
  reads (config.MOE_ONLY) when none is an MoE, or one only the einsum dispatch reads
  (config.EINSUM_ONLY) when every MoE dispatches dropless. It would name new runs, or
  sweep points, of the same models. `sweep`: a sweep's study, where --base_set can give
  its base the einsum dispatch."""
  moe = [m for m in models if m.config.model.num_experts]
  einsum = any(m.config.model.dispatch == "einsum" for m in moe)
  for flag, key in settings:
    if not moe and key in config_lib.MOE_ONLY:
      raise ChimeraError(f"{flag}={key}: only an MoE model reads {key}, and no model here "
                         f"is MoE, so the runs would be the same")
    if moe and not einsum and key in config_lib.EINSUM_ONLY:
      add = ("--base_set=model.dispatch=einsum (or --set)" if sweep
             else "--set=model.dispatch=einsum")
      raise ChimeraError(
          f"{flag}={key}: only dispatch='einsum' reads {key} (static capacity and slot "
          f"order), and every MoE model here dispatches 'dropless', so the runs would be "
          f"the same; add {add} to study it")


def sets_suffix(sets: tuple[str, ...], word: str = "with") -> str:
  """The end of a report folder's name for "section.field=value" settings: -with-field-value
  for --set values, -at-field-value (word="at") for --base_set values."""
  return "".join(f"-{word}-{key.split('.')[-1]}-{re.sub(r'[^A-Za-z0-9._-]+', '_', value)}"
                 for key, _, value in (item.partition("=") for item in sets))


def make_study(preset_name: str, sweep: str | None, base: str | None, overrides: dict,
               base_overrides: dict | None = None, sets: dict | None = None) -> Study:
  """The study of a preset, or a sweep. `overrides` apply to every model that reads them
  (the --set values, `sets`, among them; see `make_model`); `base_overrides` to a sweep's
  base only. The --set and --base_set
  values name the report's folder, and so does a --base other than the sweep's own, so a
  study that changes them never writes over the plain one
  (cpu-sweep-num_experts-with-batch_size-64, cpu-sweep-balancing-at-num_experts-32,
  cpu-sweep-num_experts-over-moe_fine)."""
  preset, base_overrides, sets = PRESETS[preset_name], base_overrides or {}, sets or {}
  check_keys("--set", overrides)
  check_keys("--base_set", base_overrides)
  if sweep and "=" in sweep:
    check_keys("--sweep", [sweep.partition("=")[0]])
  if base and ":" in base:
    raise ChimeraError(f"--base: a config file without a preset (the study's preset "
                       f"{preset.config_preset!r} is added to it), got {base!r}")
  given = lambda values: tuple(f"{key}={value}" for key, value in values.items())
  suffix = sets_suffix(given(sets))
  with_sets = " with " + ", ".join(given(sets)) if sets else ""
  if sweep is None:
    if base_overrides:
      raise ChimeraError("--base_set: only with --sweep (the study's models are its configs)")
    if base:
      raise ChimeraError(f"--base={base}: only with --sweep (the study's models are its "
                         f"configs)")
    for key in STUDY_DEFINING:
      if key in overrides:
        raise ChimeraError(
            f"--set={key}={overrides[key]}: the study's MoE configs ({', '.join(MOE_CONFIGS)}) "
            f"differ in {key}, and one value would make them alike; vary it with "
            f"--sweep={key}=v1,v2,...")
    models = study_models(preset, overrides)
    check_read(models, [("--set", key) for key in overrides], sweep=False)
    return Study(f"MoE against dense at equal compute ({preset_name} preset{with_sets})",
                 preset_name, models, preset_name + suffix,
                 sets=given(sets), default_seeds=preset.seeds)
  question, models = sweep_models(sweep, base, preset, overrides, base_overrides)
  slug = sweep.partition("=")[0].split(".")[-1] + sets_suffix(given(base_overrides), "at")
  default_base = (study_sweeps.SWEEPS[sweep].base if sweep in study_sweeps.SWEEPS
                  else "configs/moe_top2.py")
  base_name = Path(base).stem if base else None
  if base_name and base_name != Path(default_base).stem:
    slug += f"-over-{base_name}"  # never the default base's folder
  return Study(f"Sweep: {question} ({preset_name} preset{with_sets})", preset_name, models,
               f"{preset_name}-sweep-{slug}{suffix}", sweep, given(base_overrides), given(sets),
               base=base, default_seeds=preset.seeds[:1])


# Fields added after runs were first keyed by their config. While one is at its default
# (the behaviour from before it existed) it is left out of the key, so adding it kept
# every stored run's directory. A field whose default changes must leave this list.
KEY_OMITS_AT_DEFAULT = ("train.router_lr_scale", "train.router_weight_decay",
                        "train.expert_lr_scale", "train.expert_weight_decay",
                        "model.router_noise")
# Fields that change what a run logs, never what it trains: left out of the key always.
KEY_OMITS = ("train.log_norms",)


def run_dir(root: Path, config: Config) -> Path:
  """A run's directory, keyed by its whole config but its name, so identical runs are
  shared between studies (a sweep's num_experts=8 is the study's moe_top2)."""
  values = config_lib.to_dict(config)
  values.pop("name")
  defaults = config_lib.to_dict(Config())
  for key in KEY_OMITS_AT_DEFAULT + KEY_OMITS:
    section, field = key.split(".")
    if key in KEY_OMITS or values[section][field] == defaults[section][field]:
      del values[section][field]
  # expert_weight_decay was a bool before it was a multiple: no decay keeps its old key.
  if values["train"].get("expert_weight_decay") == 0:
    values["train"]["expert_weight_decay"] = False
  return root / hashlib.sha1(json.dumps(values, sort_keys=True).encode()).hexdigest()[:12]


def seeded(config: Config, name: str, seed: int) -> Config:
  """The config of `name`'s run at `seed`, on this machine's devices (mesh.data unset is
  resolved here, as training would: the run's key and folder hold the mesh it trains on)."""
  return sharding.resolve_mesh(
      dataclasses.replace(config, name=f"{name}-seed{seed}",
                          train=dataclasses.replace(config.train, seed=seed),
                          data=dataclasses.replace(config.data, seed=seed)),
      jax.device_count())


class StudyStopped(Exception):
  """A run of the study stopped before its last step (SIGTERM, SIGINT): it saved a
  checkpoint, and the same command resumes the study from it."""


# In a run's directory: why it stopped on a non-finite loss (chimera.train.TrainingDiverged).
DIVERGED = "diverged.json"


def _check_finished_text(plan: list, train: bool) -> None:
  """Refuses (one line) a finished run whose text (data.json's content hash) is not what
  its corpus holds now: a run's folder is keyed by the corpus's path, so an edited corpus
  would otherwise leave its finished runs in the study beside runs of the new text. A
  corpus that runs will train on is read (its token cache built, as training would);
  another is checked only against a cache already there, never tokenized or downloaded
  for this (--report_only, a finished study), and not at all if it is gone."""
  data = lambda c: (c.data.corpus, c.data.tokenizer, c.data.split, c.data.val_fraction,
                    c.data.text_field)
  trained = {data(c) for _, _, c, _, finished, diverged in plan
             if train and not (finished or diverged)}
  cached = {}
  for model, seed, config, workdir, finished, diverged in plan:
    if not finished or not (workdir / "data.json").exists():
      continue
    corpus, tokenizer, split, val_fraction, text_field = source = data(config)
    if source not in cached:
      kwargs = dict(split=split, val_fraction=val_fraction, text_field=text_field)
      if source in trained:
        cached[source] = prepare_cache(corpus, get_tokenizer(tokenizer), **kwargs).manifest, True
      else:
        try:
          cached[source] = peek_cache(corpus, get_tokenizer(tokenizer), **kwargs)
        except ChimeraError:  # gone: nothing trains on it
          cached[source] = None, False
    manifest, current = cached[source]
    saved = json.loads((workdir / "data.json").read_text()).get("content_hash")
    # A cache of the text now that is not the run's, or one the corpus has changed from
    # since that is the run's.
    if manifest and (saved != manifest.content_hash) == current:
      raise ChimeraError(f"{model.name}, seed {seed} ({workdir}) finished on other text than "
                         f"{corpus} holds now; restore the corpus, or give this study a new "
                         f"--runs folder")


def train_all(models: list[Model], seeds: list[int], root: Path,
              train: bool = True) -> dict[str, list[Run]]:
  """Trains every model for every seed, resuming partial runs and skipping finished ones.
  Raises StudyStopped if a run stops early. With train=False (--report_only) nothing
  trains: a run that has not finished raises ChimeraError instead.

  A run that diverges (a non-finite loss, e.g. a sweep's largest learning rate) is noted
  in its directory (DIVERGED) and left out, so the other runs still report; the same
  command does not train it again (`diverged_runs` lists them for the report)."""
  plan = []  # seed-major: a partial study still compares every model
  for seed in seeds:
    for model in models:
      config = seeded(model.config, model.name, seed)
      workdir = run_dir(root, config)
      plan.append((model, seed, config, workdir,
                   RunSummary.exists(workdir) and RunSummary.load(workdir).completed,
                   (workdir / DIVERGED).exists()))
  if train:  # a corpus that is not there is one line before any run starts, not during one
    for spec, text_field in {(c.data.corpus, c.data.text_field)
                             for _, _, c, _, finished, diverged in plan
                             if not (finished or diverged)}:
      open_corpus(spec, text_field=text_field)
  _check_finished_text(plan, train)
  runs = {}
  for model, seed, config, workdir, finished, diverged in plan:
    print(f"== {model.name}, seed {seed}: {workdir}" + (" (done)" if finished else "")
          + (" (diverged: left out)" if diverged else ""), file=sys.stderr, flush=True)
    if diverged:
      continue
    if not finished:
      if not train:
        raise ChimeraError(f"--report_only: {model.name}, seed {seed} has not finished "
                           f"training ({workdir}); run without --report_only to train it "
                           f"(or, for a saved report whose runs are gone, --refresh rewrites "
                           f"its Targets and Findings from its summary.json)")
      from chimera.train import (TrainingDiverged, stopped_by_signal,  # heavy: only here
                                 train as train_run)
      try:
        summary = train_run(config, workdir,
                            resume_hint="Run the same chimera.compare command to resume.")
        ended = "finished"
      except TrainingDiverged as error:
        write_atomic(workdir / DIVERGED, json.dumps(
            {"model": model.name, "seed": seed, "error": str(error)}).encode())
        print(f"{model.name}, seed {seed} diverged, left out of the study: {error}",
              file=sys.stderr, flush=True)
        summary, ended = None, "diverged"
      if summary is not None and not summary.completed:
        raise StudyStopped(f"study stopped in {model.name}, seed {seed}, at step "
                           f"{summary.steps} of {config.train.steps} (checkpoint saved in "
                           f"{workdir}); run the same command to resume")
      if stopped_by_signal():  # asked as the run ended: it is done, and the study stops
        raise StudyStopped(f"study stopped after {model.name}, seed {seed}, which {ended} "
                           f"as the stop came ({workdir}); run the same command to resume")
      if summary is None:
        continue
    runs.setdefault(model.name, []).append(Run.load(workdir, model.name, seed))
  return {m.name: runs[m.name] for m in models if m.name in runs}  # the study's order


def diverged_runs(models: list[Model], seeds: list[int], root: Path) -> list[dict]:
  """The study's runs that diverged ({"model", "seed", "error"}), in training order."""
  out = []
  for seed in seeds:
    for model in models:
      path = run_dir(root, seeded(model.config, model.name, seed)) / DIVERGED
      if path.exists():
        out.append(json.loads(path.read_text()))
  return out


def measure_speed(models: list[Model], repeats: int) -> list:
  """chimera.bench's records of every model, measured interleaved in this process."""
  return bench.run([bench.Case(m.name, m.spec, m.config, m.overrides) for m in models], repeats)


def related_summaries(results: Path, study: Study) -> dict:
  """Reports that a study's targets read: the expert sweep at the same --set values (and
  the seeds it holds) and, away from the cpu preset, the cpu study (for the ordering).
  Missing ones, and ones written by an older report (no "targets"), are None."""
  def read(path: Path) -> dict:
    summary = json.loads(path.read_text()) if path.exists() else {}
    return summary if "targets" in summary else {}
  sweep = read(results / f"{study.preset}-sweep-num_experts{sets_suffix(study.sets)}"
               / "summary.json")  # same --set values
  return {"expert_sweep": sweep.get("models"), "expert_sweep_seeds": sweep.get("seeds"),
          "reference_study": None if study.preset == "cpu"
          else read(results / "cpu" / "summary.json").get("models")}


def check_out(out: Path, study: Study, seeds: list[int]) -> None:
  """A report folder holds one study's report. Refuses, in one line and before anything
  trains (or --refresh rewrites), to replace another study's: one with another title
  (preset, sweep, --set values) or other steps, batch or context, or with models or seeds
  this one lacks (a 2-point sweep over a 4-point one's folder, --seeds=0 over a 3-seed
  study). A study that adds models or seeds to the one there may write over it."""
  if out.exists() and not out.is_dir():
    raise ChimeraError(f"--out: {out} is a file, not a folder")
  path = out / "summary.json"
  if not path.is_file():
    return
  try:
    there = json.loads(path.read_text())
    models, there_seeds = list(there["models"]), list(there["seeds"])
  except (json.JSONDecodeError, KeyError, TypeError):
    raise ChimeraError(f"{path} is not a study summary; pass --out=DIR to write elsewhere "
                       f"or remove it") from None
  train = study.models[0].config.train
  settings = {"title": study.title, "steps": train.steps, "batch_size": train.batch_size,
              "context": train.context}
  differs = [f"{key} {there[key]!r}, this one's {value!r}" for key, value in settings.items()
             if key in there and there[key] != value]
  if differs:  # the same models and seeds at other settings: its numbers are not this one's
    raise ChimeraError(
        f"{out} holds the report of another study ({'; '.join(differs)}); pass --out=DIR "
        f"to write this one elsewhere, or remove that folder")
  ours = [m.name for m in study.models]
  missing = [m for m in models if m not in ours] + [f"seed {s}" for s in there_seeds
                                                    if s not in seeds]
  if missing:
    raise ChimeraError(
        f"{out} holds the report of another study (models {', '.join(models)}; seeds "
        f"{', '.join(map(str, there_seeds))}), which this one would replace without "
        f"{', '.join(missing)}; pass --out=DIR to write it elsewhere, or remove that folder")


def trained_on(runs: dict[str, list[Run]]) -> str:
  """What trained the runs, from their summaries (so that a report written again elsewhere,
  with --report_only, names it); "not recorded" for runs older than that record: this
  process's device need not be theirs."""
  return ", ".join(report.trained_on_devices(runs))


def write_report(out: Path, **fields) -> None:
  """report.write, after every run trained: a disk that refuses the report (full, over
  quota, read-only) is one line, and the runs stay for the same command to report."""
  try:
    report.write(out, **fields)
  except OSError as error:
    if not is_disk_refusal(error):
      raise
    raise ChimeraError(f"the report could not be written in {out} ({error.strerror}); the "
                       f"runs are kept: make room, then run the same command (with "
                       f"--report_only, nothing trains)") from None


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  try:
    compile_cache.enable()  # in the try: a $CHIMERA_CACHE that cannot be a folder is one line
    overrides = bench.parse_overrides("set", _SET.value)
    for flag, key, value in (("corpus", "data.corpus", _CORPUS.value or None),
                             ("train_steps", "train.steps", _STEPS.value)):
      if value is None:
        continue
      if key in overrides:
        raise ChimeraError(f"--{flag}={value} and --set={key}={overrides[key]} both set "
                           f"{key}; pass one")
      overrides[key] = value
    study = make_study(_PRESET.value, _SWEEP.value, _BASE.value, overrides,
                       bench.parse_overrides("base_set", _BASE_SET.value),
                       sets=overrides)  # every override over the preset names the folder
    given_seeds = _SEEDS.value or []
    if _SEEDS.value == []:  # --seeds= (None when not given)
      raise ChimeraError("--seeds: no seed given (leave the flag out for the study's own)")
    if not all(s.strip().isascii() and s.strip().isdigit() for s in given_seeds):
      raise ChimeraError(f"--seeds: expected non-negative integers, got "
                         f"{','.join(given_seeds)!r}")
    seeds = [int(s) for s in given_seeds] or list(study.default_seeds)
    if len(set(seeds)) < len(seeds):
      raise ChimeraError(f"--seeds: each seed once, got {','.join(given_seeds)!r}")
    if max(seeds) > config_lib.MAX_SEED:
      raise ChimeraError(f"--seeds: each in [0, {config_lib.MAX_SEED}], got {max(seeds)}")
    if _BENCH_REPEATS.value < 0:
      raise ChimeraError(f"--bench_repeats: must be >= 0 (0: no bench), got "
                         f"{_BENCH_REPEATS.value}")
    out = Path(_OUT.value or Path(_RESULTS.value) / study.slug)
    check_out(out, study, seeds)
    # Written only after every run trained: a folder that cannot take them fails now.
    check_writable("out" if _OUT.value else "results", out, folder=True)
    if not _REPORT_ONLY.value:
      check_writable("runs", _RUNS.value, folder=True)
    if _REFRESH.value:
      if not (out / "summary.json").is_file():
        raise ChimeraError(f"--refresh: no report in {out} to refresh")
      changed = report.refresh(out, study, related_summaries(Path(_RESULTS.value), study))
      print(f"{out / 'REPORT.md'}: {'refreshed' if changed else 'already current'}")
      return
    runs = train_all(study.models, seeds, Path(_RUNS.value), train=not _REPORT_ONLY.value)
    diverged = diverged_runs(study.models, seeds, Path(_RUNS.value))
    baseline = study.models[0].name
    if not runs.get(baseline):
      raise ChimeraError(f"{baseline} diverged in every seed ({', '.join(map(str, seeds))}); "
                         f"nothing to compare against")
    speed = []
    if _BENCH_REPEATS.value > 0:
      print("== measuring speed", file=sys.stderr, flush=True)
      with out_of_memory_is_one_line():
        speed = measure_speed(study.models, _BENCH_REPEATS.value)
    write_report(out, study=study, runs=runs, speed=speed,
                 related=related_summaries(Path(_RESULTS.value), study),
                 command="python -m chimera.compare " + " ".join(sys.argv[1:]),
                 device=trained_on(runs), diverged=diverged)
  except ChimeraError as error:
    hint = ""
    if (str(error).startswith("config.train.warmup_steps:") and _STEPS.value is not None
        and not any(s.startswith("train.warmup_steps=") for s in _SET.value)):
      hint = (f"; --train_steps={_STEPS.value} keeps the preset's warm-up: add "
              f"--set=train.warmup_steps=N with N < {_STEPS.value}")
    print(f"error: {error}{hint}", file=sys.stderr)
    sys.exit(2)
  except StudyStopped as stopped:
    print(stopped, file=sys.stderr)
    from chimera.train import stopped_by_signal  # imported already: a run trained
    sys.exit(128 + signum if (signum := stopped_by_signal()) else 1)  # as chimera.main
  except KeyboardInterrupt:  # outside a run's training loop, which stops at a checkpoint
    print("error: interrupted outside a run's training loop; each run keeps its latest "
          "checkpoint, and the same command resumes the study (and its report)",
          file=sys.stderr)
    sys.exit(130)
  print(f"report: {out / 'REPORT.md'}")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
