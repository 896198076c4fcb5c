"""Typed, validated configuration.

A run's ConfigDict (from `configs/*.py`) is checked once, here, and turned into frozen
dataclasses. Past this point the code trusts them. Every check raises `ChimeraError` with
one line that names the offending field, before anything is compiled.
"""

import dataclasses
import importlib.util
from pathlib import Path
from typing import Literal

import ml_collections

from chimera.errors import ChimeraError


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The decoder. `num_experts == 0` means a dense feed-forward in every block."""

  vocab_size: int = 257
  num_layers: int = 4
  num_heads: int = 4
  d_model: int = 128
  d_ff: int = 512  # hidden size of the dense MLP
  max_len: int = 256  # longest context the model supports
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
  expert_d_ff: int = 256  # hidden size of one expert
  capacity_factor: float = 1.25  # training
  eval_capacity_factor: float = 2.0
  min_capacity: int = 4
  group_size: int = 256
  priority: Literal["token", "rank"] = "token"
  # "einsum": static capacity, one-hot dispatch/combine; "dropless": sort by expert and
  # run the experts as a grouped matmul, no capacity and no drops (see chimera/moe.py).
  dispatch: Literal["einsum", "dropless"] = "einsum"
  renormalize_gates: bool = False
  router_jitter: float = 0.0  # epsilon of the multiplicative U(1-eps, 1+eps) jitter
  expert_init_scale: float = 0.1  # variance scale of the truncated-normal expert/router init
  moe_every: int = 1  # an MoE layer every `moe_every` layers...
  first_moe_layer: int = 0  # ...starting at this layer index
  load_balance_coef: float = 0.01
  z_loss_coef: float = 0.001

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
  corpus: str = "shakespeare"  # "shakespeare", a path or glob, or "tfds:NAME"
  tokenizer: Literal["byte", "gpt2"] = "byte"
  split: Literal["auto", "documents", "tail"] = "auto"
  val_fraction: float = 0.1
  seed: int = 0


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  steps: int = 1000
  batch_size: int = 16
  context: int = 128
  grad_accum: int = 1
  learning_rate: float = 1e-3
  min_learning_rate: float = 1e-4
  warmup_steps: int = 100
  b1: float = 0.9
  b2: float = 0.99
  weight_decay: float = 0.1
  grad_clip: float = 1.0
  seed: int = 0
  log_every: int = 50
  eval_every: int = 250
  eval_batches: int = 20
  checkpoint_every: int = 500
  keep_checkpoints: int = 2


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  data: int = 1
  expert: int = 1


@dataclasses.dataclass(frozen=True)
class Config:
  name: str
  model: ModelConfig
  data: DataConfig
  train: TrainConfig
  mesh: MeshConfig


def _build(cls, section: str, values) -> object:
  fields = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - fields)
  if unknown:
    raise ChimeraError(f"config.{section}.{unknown[0]}: unknown field")
  return cls(**values)


def _check(ok: bool, field: str, message: str) -> None:
  if not ok:
    raise ChimeraError(f"config.{field}: {message}")


def validate_model(m: ModelConfig) -> None:
  """Raises ChimeraError on the first bad field of a ModelConfig."""
  for field in ("vocab_size", "num_layers", "num_heads", "d_model", "d_ff", "max_len"):
    _check(getattr(m, field) > 0, f"model.{field}", f"must be > 0, got {getattr(m, field)}")
  _check(m.d_model % m.num_heads == 0, "model.d_model",
         f"{m.d_model} is not divisible by model.num_heads={m.num_heads}")
  _check(m.positions in ("learned", "rotary"), "model.positions",
         f"expected 'learned' or 'rotary', got {m.positions!r}")
  _check(m.positions != "rotary" or m.head_dim % 2 == 0, "model.positions",
         f"rotary needs an even head dim, got {m.head_dim}")
  _check(m.norm in ("layernorm", "rmsnorm"), "model.norm",
         f"expected 'layernorm' or 'rmsnorm', got {m.norm!r}")
  _check(m.activation in ("gelu", "swiglu"), "model.activation",
         f"expected 'gelu' or 'swiglu', got {m.activation!r}")
  _check(m.dtype in ("float32", "bfloat16"), "model.dtype",
         f"expected 'float32' or 'bfloat16', got {m.dtype!r}")
  _check(0.0 <= m.dropout < 1.0, "model.dropout", f"must be in [0, 1), got {m.dropout}")
  _check(m.num_experts >= 0, "model.num_experts", f"must be >= 0, got {m.num_experts}")
  if m.num_experts == 0:
    return
  _check(1 <= m.top_k <= m.num_experts, "model.top_k",
         f"must be between 1 and model.num_experts={m.num_experts}, got {m.top_k}")
  _check(m.capacity_factor > 0, "model.capacity_factor", f"must be > 0, got {m.capacity_factor}")
  _check(m.eval_capacity_factor > 0, "model.eval_capacity_factor",
         f"must be > 0, got {m.eval_capacity_factor}")
  for field in ("expert_d_ff", "group_size", "min_capacity", "moe_every"):
    _check(getattr(m, field) > 0, f"model.{field}", f"must be > 0, got {getattr(m, field)}")
  _check(0 <= m.first_moe_layer < m.num_layers, "model.first_moe_layer",
         f"must be in [0, model.num_layers={m.num_layers}), got {m.first_moe_layer}")
  _check(m.priority in ("token", "rank"), "model.priority",
         f"expected 'token' or 'rank', got {m.priority!r}")
  _check(m.dispatch in ("einsum", "dropless"), "model.dispatch",
         f"expected 'einsum' or 'dropless', got {m.dispatch!r}")
  _check(0.0 <= m.router_jitter < 1.0, "model.router_jitter",
         f"must be in [0, 1), got {m.router_jitter}")


def validate(c: Config) -> None:
  """Raises ChimeraError on the first bad field of a whole run's Config."""
  validate_model(c.model)
  t, d = c.train, c.data
  for field in ("steps", "batch_size", "context", "grad_accum", "log_every", "eval_every",
                "eval_batches", "checkpoint_every", "keep_checkpoints"):
    _check(getattr(t, field) > 0, f"train.{field}", f"must be > 0, got {getattr(t, field)}")
  _check(t.context <= c.model.max_len, "train.context",
         f"{t.context} is longer than the model supports (model.max_len={c.model.max_len})")
  _check(t.batch_size % t.grad_accum == 0, "train.batch_size",
         f"{t.batch_size} is not divisible by train.grad_accum={t.grad_accum}")
  _check(t.learning_rate > 0, "train.learning_rate", f"must be > 0, got {t.learning_rate}")
  _check(0 <= t.warmup_steps < t.steps, "train.warmup_steps",
         f"must be in [0, train.steps={t.steps}), got {t.warmup_steps}")
  _check(d.tokenizer in ("byte", "gpt2"), "data.tokenizer",
         f"expected 'byte' or 'gpt2', got {d.tokenizer!r}")
  _check(d.split in ("auto", "documents", "tail"), "data.split",
         f"expected 'auto', 'documents' or 'tail', got {d.split!r}")
  _check(0.0 < d.val_fraction < 1.0, "data.val_fraction",
         f"must be in (0, 1), got {d.val_fraction}")
  _check(bool(d.corpus), "data.corpus", "is empty")
  for field in ("data", "expert"):
    _check(getattr(c.mesh, field) > 0, f"mesh.{field}", f"must be > 0, got {getattr(c.mesh, field)}")


def from_config_dict(cd: ml_collections.ConfigDict) -> Config:
  """Builds and validates a Config from a `configs/*.py` ConfigDict."""
  mesh = cd.mesh.to_dict() if "mesh" in cd else {}
  config = Config(
      name=cd.get("name", "run"),
      model=_build(ModelConfig, "model", cd.model.to_dict()),
      data=_build(DataConfig, "data", cd.data.to_dict()),
      train=_build(TrainConfig, "train", cd.train.to_dict()),
      mesh=_build(MeshConfig, "mesh", mesh),
  )
  validate(config)
  return config


def to_dict(config: Config) -> dict:
  return dataclasses.asdict(config)


def from_dict(values: dict) -> Config:
  """Inverse of `to_dict`, for `WORKDIR/config.json`."""
  return Config(
      name=values["name"],
      model=ModelConfig(**values["model"]),
      data=DataConfig(**values["data"]),
      train=TrainConfig(**values["train"]),
      mesh=MeshConfig(**values.get("mesh", {})),
  )


def load_config_dict(spec: str) -> ml_collections.ConfigDict:
  """`path/to/config.py[:preset]` -> its get_config(preset), as `--config=` would load it."""
  path, _, preset = spec.partition(":")
  if not Path(path).is_file():
    raise ChimeraError(f"config: no such file: {path}")
  module_spec = importlib.util.spec_from_file_location(Path(path).stem, path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(preset or None)


def load(spec: str, overrides: dict | None = None) -> Config:
  """A validated Config from `path[:preset]` and {"section.field": value} overrides."""
  config_dict = load_config_dict(spec)
  for key, value in (overrides or {}).items():
    section, _, field = key.partition(".")
    if section not in config_dict or field not in config_dict[section]:
      raise ChimeraError(f"config.{key}: unknown field")
    setattr(config_dict[section], field, value)
  return from_config_dict(config_dict)
