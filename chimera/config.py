"""Typed, validated configuration: the one place where fields and their defaults live.

The frozen dataclasses below hold every field and its only default. `config_dict()`
turns them into the ml_collections ConfigDict that `configs/*.py` (through
`chimera.presets`) change and `--config.model.x=` overrides; `from_config_dict` turns the
final ConfigDict back into dataclasses, resolves the derived fields from the final values
and validates the whole run once. Past this point the code trusts the config.

Allowed values are written once: a `Literal` annotation, or the keys of a registry
(`model.router` is a key of `chimera.routers.ROUTERS`). Every check raises `ChimeraError`
with one line that names the offending field, before anything is compiled.
"""

import dataclasses
import importlib.util
import math
import os
import re
import typing
from pathlib import Path
from typing import Literal

import ml_collections
from ml_collections import config_dict as config_dict_lib

from chimera.errors import ChimeraError


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The decoder. `num_experts == 0` means a dense feed-forward in every block.

  Derived fields (None = derive) are resolved when the config is built, from the final
  values of the fields they follow, so `--config.model.d_ff=...` keeps an MoE matched:
  - expert_d_ff: d_ff / (top_k + num_shared_experts), the same active hidden size per
    token as the dense MLP (a d_ff that is not a multiple of it is refused);
  - renormalize_gates: on when top_k >= 2;
  - group_size: one sequence (train.context tokens) per routing group.
  They are filled in when the dataclass is built: `dataclasses.replace(m, top_k=4)` keeps
  the resolved expert_d_ff and renormalize_gates unless it also passes them as None.
  """

  vocab_size: int = 257
  num_layers: int = 4
  num_heads: int = 3
  d_model: int = 192
  d_ff: int = 768  # hidden size of the dense MLP
  max_len: int = 512  # longest context the model supports
  positions: Literal["learned", "rotary"] = "learned"
  norm: Literal["layernorm", "rmsnorm"] = "layernorm"
  activation: Literal["gelu", "swiglu"] = "gelu"
  use_bias: bool = False
  dropout: float = 0.0
  dtype: Literal["float32", "bfloat16"] = "float32"  # compute dtype; params stay float32
  init_std: float = 0.02
  # Mixture of Experts.
  num_experts: int = 0
  top_k: int = 2
  expert_d_ff: int | None = None  # hidden size of one expert; None: compute-matched
  num_shared_experts: int = 0  # always-on experts of expert_d_ff (DeepSeekMoE)
  router: str = "top_k"  # a key of chimera.routers.ROUTERS
  priority: Literal["token", "rank"] = "token"
  renormalize_gates: bool | None = None  # None: on when top_k >= 2
  capacity_factor: float = 1.25  # training
  eval_capacity_factor: float = 2.0
  min_capacity: int = 4
  group_size: int | None = None  # tokens per routing group; None: one sequence
  # "einsum": static capacity, one-hot dispatch/combine; "dropless": sort by expert and
  # run the experts as a grouped matmul, no capacity and no drops (see chimera/moe.py).
  dispatch: Literal["einsum", "dropless"] = "einsum"
  router_jitter: float = 0.0  # epsilon of the multiplicative U(1-eps, 1+eps) jitter
  # Exploration in training: each token's k experts are the top k of its router logits plus
  # router_noise times Gumbel noise, i.e. k experts drawn without replacement from
  # softmax(logits / router_noise) (the Gumbel-top-k trick). Only the choice is noisy: the
  # gates are the noise-free probabilities of the experts chosen, and evaluation and
  # decoding choose without noise. 0: no noise. At 32 experts on the cpu study's budget,
  # 0.1 and 0.3 ended 0.0107 ± 0.0127 and 0.0461 ± 0.0122 above 0 (mean ± SD of the paired
  # differences, n=2; results/cpu-sweep-router_noise-at-num_experts-32).
  router_noise: float = 0.0
  # "switch": truncated normal of variance expert_init_scale / fan_in (Switch); "dense":
  # the dense MLP's init, residual projection scaled by 1/sqrt(2 * num_layers). At the cpu
  # study's budget (`chimera.compare --preset=cpu --sweep=init`, moe_top2, one seed) the final
  # losses were switch 0.1: 1.5437, switch 1.0: 1.5417, dense: 1.5608, so Switch's small
  # scale stays the default (results/cpu-sweep-init).
  expert_init: Literal["switch", "dense"] = "switch"
  expert_init_scale: float = 0.1
  moe_every: int = 1  # an MoE layer every `moe_every` layers...
  first_moe_layer: int = 0  # ...starting at this layer index
  load_balance_coef: float = 0.01
  # "group": the load-balance loss per routing group, averaged; "batch": over the whole
  # (global) micro-batch, across data-parallel devices (Qwen's global-batch balancing).
  load_balance_scope: Literal["group", "batch"] = "group"
  # Auxiliary-loss-free balancing (DeepSeek-V3): > 0 turns on a per-expert bias added to
  # the logits that choose experts, moved by this rate * sign(mean load - load) each step.
  router_bias_rate: float = 0.0
  z_loss_coef: float = 0.001

  def __post_init__(self):
    # Frozen, so derived fields are filled through object.__setattr__, once.
    if self.expert_d_ff is None:
      active = self.top_k + self.num_shared_experts
      if self.d_ff > 0 and 1 <= self.top_k <= self.num_experts and self.num_shared_experts >= 0:
        _check(self.d_ff % active == 0 and self.d_ff >= active, "model.d_ff",
               f"{self.d_ff} is not a multiple of model.top_k + model.num_shared_experts = "
               f"{active}, so the derived expert width cannot match the dense MLP's "
               f"hidden size per token: set model.expert_d_ff")
      object.__setattr__(self, "expert_d_ff", max(1, self.d_ff // max(1, active)))
    if self.renormalize_gates is None:
      object.__setattr__(self, "renormalize_gates", self.top_k >= 2)

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads

  def is_moe_layer(self, layer: int) -> bool:
    return (self.num_experts > 0 and layer >= self.first_moe_layer
            and (layer - self.first_moe_layer) % self.moe_every == 0)

  @property
  def num_moe_layers(self) -> int:
    return sum(self.is_moe_layer(i) for i in range(self.num_layers))


@dataclasses.dataclass(frozen=True)
class DataConfig:
  corpus: str = "shakespeare"  # "shakespeare", a path, folder or glob, "tfds:NAME", "hf:NAME[:CONFIG]"
  text_field: str = "text"  # the text column of an hf: corpus
  tokenizer: Literal["byte", "gpt2"] = "byte"
  split: Literal["auto", "documents", "tail"] = "auto"
  val_fraction: float = 0.1
  seed: int = 0  # the training batches' order


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  steps: int = 1000
  batch_size: int = 32
  context: int = 128
  grad_accum: int = 1
  learning_rate: float = 2e-3
  min_learning_rate: float = 2e-4
  warmup_steps: int = 100
  b1: float = 0.9
  b2: float = 0.99
  weight_decay: float = 0.1
  # The MoE routers' own optimiser settings: their learning rate as a multiple of the
  # schedule's, and whether AdamW's weight decay pulls them towards zero (uniform routing).
  router_lr_scale: float = 1.0
  router_weight_decay: bool = True
  # The routed experts' learning rate as a multiple of the schedule's (shared experts
  # and everything else keep the schedule's): each expert sees only about k/E of a batch.
  expert_lr_scale: float = 1.0
  # AdamW's weight decay on the routed experts' weights, as a multiple of `weight_decay`
  # (0: none; the true/false of older config files, config.json and --set read as 1 and 0;
  # on chimera.main's command line write 1 or 0). It acts at every step on
  # every expert, while each expert's gradient comes from about k/E of the batch. Like the
  # gradient step, it is scaled by `expert_lr_scale`.
  expert_weight_decay: float = 1.0
  grad_clip: float = 1.0
  seed: int = 0
  log_every: int = 50
  # Log the parameters' and the update's global norms every step (each a pass over the
  # parameters; off: the non-finite check reads the loss and the gradient's norm).
  log_norms: bool = True
  eval_every: int = 250
  eval_batches: int = 20  # a fixed validation subset, the same for every seed
  checkpoint_every: int = 500
  keep_checkpoints: int = 2


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """The device mesh, data x expert devices: their product is the device count."""
  # None: every device the expert axis leaves (device count // expert), resolved when a
  # run starts (chimera.sharding.resolve_mesh): one CPU, or every GPU of a machine.
  data: int | None = None
  expert: int = 1


@dataclasses.dataclass(frozen=True)
class Config:
  name: str = "run"
  model: ModelConfig = ModelConfig()
  data: DataConfig = DataConfig()
  train: TrainConfig = TrainConfig()
  mesh: MeshConfig = MeshConfig()


SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "mesh": MeshConfig}

# The fields only an MoE reads: a dense model (model.num_experts 0) computes the same run
# whatever they hold, so a setting meant for the experts is never a dense model's.
MOE_ONLY = ("model.num_experts", "model.top_k", "model.expert_d_ff",
            "model.num_shared_experts", "model.router", "model.priority",
            "model.renormalize_gates", "model.capacity_factor", "model.eval_capacity_factor",
            "model.min_capacity", "model.group_size", "model.dispatch", "model.router_jitter",
            "model.router_noise", "model.expert_init", "model.expert_init_scale",
            "model.moe_every", "model.first_moe_layer", "model.load_balance_coef",
            "model.load_balance_scope", "model.router_bias_rate", "model.z_loss_coef",
            "train.router_lr_scale", "train.router_weight_decay", "train.expert_lr_scale",
            "train.expert_weight_decay")

# The MoE fields only the einsum dispatch reads (static capacity and the order slots fill
# in): dispatch="dropless" keeps every choice, so it computes the same run whatever they hold.
EINSUM_ONLY = ("model.priority", "model.capacity_factor", "model.eval_capacity_factor",
               "model.min_capacity")

# Fields that do not change what a run computes: a workdir's run may be resumed with
# other values of these (see `run_differences`). The mesh is one: a checkpoint restores
# onto any mesh, and sharded training equals one device's.
_RUN_NEUTRAL = {"name", "train.log_every", "train.log_norms", "train.eval_every",
                "train.checkpoint_every", "train.keep_checkpoints", "train.steps", "mesh.data",
                "mesh.expert"}


def _field_value(field: dataclasses.Field):
  """A dataclass field's default as a ConfigDict value: `X | None` becomes a typed
  placeholder, so that `--config.model.expert_d_ff=384` can still override it."""
  if field.default is None:
    types = [t for t in typing.get_args(field.type) if t is not type(None)]
    return config_dict_lib.placeholder(types[0])
  return field.default


def config_dict(name: str = "run") -> ml_collections.ConfigDict:
  """The defaults of every field, as the ConfigDict that presets and flags change."""
  c = ml_collections.ConfigDict()
  c.name = name
  for section, cls in SECTIONS.items():
    c[section] = ml_collections.ConfigDict(
        {f.name: _field_value(f) for f in dataclasses.fields(cls)})
  return c


def _build(cls, section: str, values) -> object:
  fields = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - fields)
  if unknown:
    raise ChimeraError(f"config.{section}.{unknown[0]}: unknown field")
  return cls(**values)


def _check(ok: bool, field: str, message: str) -> None:
  if not ok:
    raise ChimeraError(f"config.{field}: {message}")


FLOAT32_MAX = 3.4028234663852886e38
# jax.random.key keeps a seed's low 32 bits (2**32 is seed 0's key), and the run also
# draws from train.seed + 1: larger seeds would repeat smaller ones' runs.
MAX_SEED = 2**32 - 2


def _check_fields(section: str, value) -> None:
  """Every `Literal` field holds one of its allowed values (read from the annotation), and
  every float field is a finite float32: inf passes `> 0` checks, and 1e39 becomes inf in
  the step (a learning rate of either trains NaN and logs it as "Infinity")."""
  for field in dataclasses.fields(value):
    allowed = typing.get_args(field.type) if typing.get_origin(field.type) is Literal else ()
    current = getattr(value, field.name)
    _check(not allowed or current in allowed, f"{section}.{field.name}",
           f"expected one of {', '.join(map(repr, allowed))}, got {current!r}")
    if isinstance(current, float):
      _check(math.isfinite(current) and abs(current) <= FLOAT32_MAX,
             f"{section}.{field.name}", f"must be a finite number, got {current}")


def _check_positive(section: str, value, names: tuple[str, ...]) -> None:
  for name in names:
    current = getattr(value, name)
    _check(current > 0, f"{section}.{name}", f"must be > 0, got {current}")


def validate_model(m: ModelConfig) -> None:
  """Raises ChimeraError on the first bad field of a ModelConfig."""
  from chimera.routers import ROUTERS  # the registry imports jax: only when validating
  _check_fields("model", m)
  _check_positive("model", m, ("vocab_size", "num_layers", "num_heads", "d_model", "d_ff",
                               "max_len", "init_std"))
  _check(m.d_model % m.num_heads == 0, "model.d_model",
         f"{m.d_model} is not divisible by model.num_heads={m.num_heads}")
  _check(m.positions != "rotary" or m.head_dim % 2 == 0, "model.positions",
         f"rotary needs an even head dim, got {m.head_dim}")
  _check(0.0 <= m.dropout < 1.0, "model.dropout", f"must be in [0, 1), got {m.dropout}")
  _check(m.num_experts >= 0, "model.num_experts", f"must be >= 0, got {m.num_experts}")
  _check(m.num_experts > 0 or m.num_shared_experts == 0, "model.num_shared_experts",
         f"{m.num_shared_experts} shared experts need routed ones (model.num_experts > 0)")
  # Checked for dense models too: a misspelled router must not reach config.json.
  _check(m.router in ROUTERS, "model.router",
         f"expected one of {', '.join(map(repr, sorted(ROUTERS)))}, got {m.router!r}")
  if m.num_experts == 0:
    return
  _check(1 <= m.top_k <= m.num_experts, "model.top_k",
         f"must be between 1 and model.num_experts={m.num_experts}, got {m.top_k}")
  _check(m.num_shared_experts >= 0, "model.num_shared_experts",
         f"must be >= 0, got {m.num_shared_experts}")
  _check_positive("model", m, ("capacity_factor", "eval_capacity_factor", "expert_d_ff",
                               "min_capacity", "moe_every", "expert_init_scale"))
  _check(m.group_size is None or m.group_size > 0, "model.group_size",
         f"must be > 0, got {m.group_size}")
  _check(0 <= m.first_moe_layer < m.num_layers, "model.first_moe_layer",
         f"must be in [0, model.num_layers={m.num_layers}), got {m.first_moe_layer}")
  _check(0.0 <= m.router_jitter < 1.0, "model.router_jitter",
         f"must be in [0, 1), got {m.router_jitter}")
  _check(m.router_noise >= 0, "model.router_noise", f"must be >= 0, got {m.router_noise}")
  for name in ("load_balance_coef", "z_loss_coef", "router_bias_rate"):
    _check(getattr(m, name) >= 0, f"model.{name}", f"must be >= 0, got {getattr(m, name)}")
  _check(m.top_k >= 2 or not m.renormalize_gates, "model.renormalize_gates",
         "with model.top_k=1 the renormalised gate is a constant 1 and the router gets no "
         "gradient from the loss")
  refused = ROUTERS[m.router].refuse(m)
  _check(refused is None, "model.router", f"{m.router!r}: {refused}")


def _validate_groups(c: Config) -> None:
  """Routing groups lie inside one sequence or hold whole ones, and tile every batch."""
  m, t = c.model, c.train
  if not m.num_experts:
    return
  context = t.context
  group = m.group_size or context  # unresolved: one sequence
  _check(context % group == 0 or group % context == 0, "model.group_size",
         f"{group} straddles sequences of train.context={context}: use a divisor or a "
         f"multiple of it")
  # mesh.data unset: checked here as on the fewest devices (data = 1), where a micro-batch's
  # share is largest: a group that does not tile it tiles no smaller share. The device
  # count, once known, is checked again (chimera.sharding.resolve_mesh).
  devices = (c.mesh.data or 1) * c.mesh.expert
  micro_batch = t.batch_size // t.grad_accum
  if micro_batch % devices == 0:  # otherwise sharding.check_mesh names the batch
    local_tokens = micro_batch // devices * context
    _check(local_tokens % group == 0, "model.group_size",
           f"{group} does not divide the {local_tokens} tokens of a micro-batch on one "
           f"device (train.batch_size={t.batch_size}, grad_accum={t.grad_accum}, "
           f"{devices} devices)")


def validate_text(d: DataConfig) -> None:
  """Raises ChimeraError on the first bad field of what a token cache is made from: the
  corpus, the validation fraction and the text field (chimera.main and chimera.data; the
  split's mode is checked as the cache is made)."""
  _check(0.0 < d.val_fraction < 1.0, "data.val_fraction",
         f"must be in (0, 1), got {d.val_fraction}")
  _check(bool(d.corpus), "data.corpus", "is empty")
  _check(bool(d.text_field), "data.text_field", "is empty")
  # Only an hf: corpus has columns: another text_field would be read by nothing and name
  # a new run (and study runs) of the same text.
  _check(d.text_field == DataConfig.text_field or d.corpus.startswith("hf:"),
         "data.text_field", f"names a column of an hf: corpus; {d.corpus} is read as text, "
         f"so it takes none (got {d.text_field!r})")


def validate(c: Config) -> None:
  """Raises ChimeraError on the first bad field of a whole run's Config."""
  validate_model(c.model)
  t, d = c.train, c.data
  _check_fields("data", d)
  _check_fields("train", t)
  _check_positive("train", t, ("steps", "batch_size", "context", "grad_accum", "log_every",
                               "eval_every", "eval_batches", "checkpoint_every",
                               "keep_checkpoints", "learning_rate"))
  # optax counts steps in int32: a step past 2**31 - 1 wraps to a negative count.
  _check(t.steps < 2**31, "train.steps", f"must be < 2**31, got {t.steps}")
  _check(t.context <= c.model.max_len, "train.context",
         f"{t.context} is longer than the model supports (model.max_len={c.model.max_len})")
  _check(t.batch_size % t.grad_accum == 0, "train.batch_size",
         f"{t.batch_size} is not divisible by train.grad_accum={t.grad_accum}")
  _check(0 <= t.warmup_steps < t.steps, "train.warmup_steps",
         f"must be in [0, train.steps={t.steps}), got {t.warmup_steps}")
  _check(0 <= t.min_learning_rate <= t.learning_rate, "train.min_learning_rate",
         f"must be in [0, train.learning_rate={t.learning_rate}], got {t.min_learning_rate}")
  _check(0 <= t.b1 < 1, "train.b1", f"must be in [0, 1), got {t.b1}")
  _check(0 <= t.b2 < 1, "train.b2", f"must be in [0, 1), got {t.b2}")
  _check(t.weight_decay >= 0, "train.weight_decay", f"must be >= 0, got {t.weight_decay}")
  for name in ("router_lr_scale", "expert_lr_scale"):
    _check(getattr(t, name) > 0, f"train.{name}", f"must be > 0, got {getattr(t, name)}")
  _check(t.expert_weight_decay >= 0, "train.expert_weight_decay",
         f"must be >= 0, got {t.expert_weight_decay}")
  _check(t.grad_clip > 0, "train.grad_clip", f"must be > 0, got {t.grad_clip}")
  validate_text(d)
  for name, seed in (("data.seed", d.seed), ("train.seed", t.seed)):
    _check(seed >= 0, name, f"must be >= 0, got {seed}")
    _check(seed <= MAX_SEED, name, f"must be in [0, {MAX_SEED}], got {seed}")
  _check_positive("mesh", c.mesh, ("expert",) if c.mesh.data is None else ("data", "expert"))
  _validate_groups(c)


def absolute_corpus(spec: str) -> str:
  """A local corpus spec (a file, folder or glob) as an absolute path, so that a run resumed,
  evaluated or compared from another directory reads the same text; a named corpus
  ("shakespeare", "tfds:...", "hf:...") as it is."""
  if not spec or spec == "shakespeare" or spec.startswith(("tfds:", "hf:")):
    return spec
  return os.path.abspath(os.path.expanduser(spec))


def resolve(c: Config) -> Config:
  """The derived fields that need more than the model: group_size (one sequence); and a
  local corpus path made absolute (`absolute_corpus`)."""
  if c.model.group_size is None:
    c = dataclasses.replace(c, model=dataclasses.replace(c.model, group_size=c.train.context))
  if absolute_corpus(c.data.corpus) != c.data.corpus:
    c = dataclasses.replace(c, data=dataclasses.replace(c.data,
                                                        corpus=absolute_corpus(c.data.corpus)))
  return c


def from_config_dict(cd: ml_collections.ConfigDict) -> Config:
  """Builds, resolves and validates a Config from a `configs/*.py` ConfigDict."""
  sections = {name: _build(cls, name, cd[name].to_dict() if name in cd else {})
              for name, cls in SECTIONS.items()}
  config = resolve(Config(name=cd.get("name", "run"), **sections))
  validate(config)
  return config


def to_dict(config: Config) -> dict:
  return dataclasses.asdict(config)


def from_dict(values: dict) -> Config:
  """Inverse of `to_dict`, for `WORKDIR/config.json`."""
  return Config(name=values["name"], **{name: cls(**values.get(name, {}))
                                        for name, cls in SECTIONS.items()})


def run_differences(saved: Config, new: Config, *, corpus_may_move: bool = False,
                    neutral: bool = True) -> list[str]:
  """The fields, as "section.field", in which `new` computes a different run than `saved`.

  Logging, evaluation and checkpoint intervals and `train.steps` (extending a run) do not
  count; see `_RUN_NEUTRAL` (`neutral=False`: they do, every field that differs). Between
  two dense models neither do the fields only an MoE reads (`MOE_ONLY`): a dense run
  started with one (before chimera.main refused them) resumes without it. With
  `corpus_may_move`, neither does `data.corpus`: the caller knows the text by its content
  (data.json), not by its path.
  """
  dense = not saved.model.num_experts and not new.model.num_experts
  old, now = to_dict(saved), to_dict(new)
  # A config.json written before local corpus paths were made absolute: read from here.
  old["data"]["corpus"] = absolute_corpus(old["data"]["corpus"])
  differing = []
  for section in SECTIONS:
    for field in sorted(set(old[section]) | set(now[section])):
      key = f"{section}.{field}"
      ignored = ((neutral and key in _RUN_NEUTRAL) or (corpus_may_move and key == "data.corpus")
                 or (dense and key in MOE_ONLY))
      if not ignored and old[section].get(field) != now[section].get(field):
        differing.append(key)
  return differing


def load_config_dict(spec: str) -> ml_collections.ConfigDict:
  """`path/to/config.py[:preset]` -> its get_config(preset), as `--config=` would load it.
  An error in the file itself is one line naming it (`config_file_error`)."""
  path, _, preset = spec.partition(":")
  if not Path(path).is_file():
    raise ChimeraError(f"config: no such file: {path}")
  module_spec = importlib.util.spec_from_file_location(Path(path).stem, path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
    return module.get_config(preset or None)
  except Exception as error:
    if (message := config_file_error(error, path)) is None:
      raise
    raise ChimeraError(f"config: {message}") from None


def config_file_error(error: Exception, path: str) -> str | None:
  """The one line (after the flag's name) for an error of the config file itself (its
  syntax, its import, its get_config), naming the file and its line; None for any other
  error (a ChimeraError names its own field, from chimera.presets or config validation).
  The error is the file's own, or (`--config=FILE:PRESET`, which ml_collections loads while
  parsing the flag) absl's, which carries the file's traceback as text."""
  if isinstance(error, ChimeraError) or "ChimeraError: " in str(error):
    return None
  file = Path(path).resolve()
  if isinstance(error, SyntaxError) and error.filename and Path(error.filename).resolve() == file:
    return f"{path}, line {error.lineno}: {error.msg}"
  frames, traceback = [], error.__traceback__  # (file, line) from the innermost frame last
  while traceback is not None:
    frames.append((traceback.tb_frame.f_code.co_filename, traceback.tb_lineno))
    traceback = traceback.tb_next
  what = f"{type(error).__name__}: {error}"
  text = str(error)
  if "Traceback (most recent call last)" in text:
    frames = [(name, int(line)) for name, line in re.findall(r'File "([^"]+)", line (\d+)', text)]
    what = [line for line in text.strip().splitlines() if line.strip()][-1].strip()
  lines = [line for name, line in frames if Path(name).resolve() == file]
  if lines:
    return f"{path}, line {lines[-1]}: {what}"
  if "has no attribute 'get_config'" in what:
    return f"{path} defines no get_config(arg=None)"
  if what.startswith("TypeError: get_config()"):
    return (f"{path}: {what.removeprefix('TypeError: ')} (chimera calls "
            f"get_config(preset), with the text after ':' or None)")
  return None


def load(spec: str, overrides: dict | None = None) -> Config:
  """A validated Config from `path[:preset]` and {"section.field": value} overrides."""
  config_dict = load_config_dict(spec)
  for key, value in (overrides or {}).items():
    if key == "name":  # the one field outside a section
      config_dict.name = str(value)
      continue
    section, _, field = key.partition(".")
    if section not in SECTIONS or field not in config_dict[section]:
      raise ChimeraError(f"config.{key}: unknown field")
    annotation = typing.get_type_hints(SECTIONS[section])[field]
    expected = _type_name(annotation)
    if value is None and type(None) not in typing.get_args(annotation):
      raise ChimeraError(f"config.{key}: expected {expected}, got None")
    # ConfigDict takes True for an int or a float field (bool is an int to Python); only
    # expert_weight_decay, a bool in older configs, reads true/false as 1 and 0.
    if (isinstance(value, bool) and annotation is not bool and bool not in
        typing.get_args(annotation) and key != "train.expert_weight_decay"):
      raise ChimeraError(f"config.{key}: expected {expected}, got {value!r}")
    try:
      setattr(config_dict[section], field, value)
    except TypeError:  # the locked ConfigDict keeps each field's type
      raise ChimeraError(f"config.{key}: expected {expected}, got {value!r}") from None
  return from_config_dict(config_dict)


def is_text_field(key: str) -> bool:
  """Whether "section.field" holds text (a str, a str or None, or one of some strings): a
  command-line value for it is its text as written, not a number that looks like it."""
  section, _, field = key.partition(".")
  if section not in SECTIONS or field not in SECTIONS[section].__dataclass_fields__:
    return False
  annotation = typing.get_type_hints(SECTIONS[section])[field]
  if typing.get_origin(annotation) is Literal:
    return all(isinstance(arg, str) for arg in typing.get_args(annotation))
  return annotation is str or set(typing.get_args(annotation)) == {str, type(None)}


def _type_name(annotation) -> str:
  """A field's annotation as a reader writes it: "int", "int | None", "'token' or 'rank'"."""
  if typing.get_origin(annotation) is Literal:
    return " or ".join(map(repr, typing.get_args(annotation)))
  args = typing.get_args(annotation)
  if args:
    return " | ".join(_type_name(a) for a in args)
  return "None" if annotation is type(None) else getattr(annotation, "__name__", str(annotation))
