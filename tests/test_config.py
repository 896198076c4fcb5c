"""Every shipped config x preset, and the config machinery they rest on.

A new configs/*.py or a new preset is covered here without a new test: each one loads,
validates, and builds its model with jax.eval_shape (no memory spent on full-size models).
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import pytest

from chimera import accounting, bench, config as config_lib, presets
from chimera.config import Config, ModelConfig
from chimera.decoder import Decoder
from chimera.errors import ChimeraError
from conftest import SHIPPED_CONFIGS as CONFIGS


@pytest.mark.parametrize("preset", sorted(presets.PRESETS))
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_config_and_preset_builds(path, preset):
  config = config_lib.load(f"{path}:{preset}")
  assert config.name.startswith(path.stem)
  batch = (config.train.batch_size // config.train.grad_accum, config.train.context)
  model = Decoder(config.model)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(batch, jnp.int32)))
  logits, stats = jax.eval_shape(
      lambda v: model.apply(v, jnp.zeros(batch, jnp.int32)), variables)
  assert logits.shape == (*batch, config.model.vocab_size)
  assert stats["expert_load"].shape == (config.model.num_moe_layers, config.model.num_experts)
  # The resolved config survives the round trip through WORKDIR/config.json.
  assert config_lib.from_dict(config_lib.to_dict(config)) == config


def test_the_dataclasses_hold_the_only_defaults():
  """A preset is a diff: the default preset is exactly the dataclass defaults."""
  loaded = config_lib.load(f"{CONFIGS[0]}")  # dense.py:default sets nothing of its own
  defaults = config_lib.resolve(Config(name=loaded.name))
  assert loaded == defaults
  assert presets.PRESETS["default"] == {}


@pytest.mark.parametrize("override", [{"model.d_ff": 1024}, {"model.d_ff": 300},
                                      {"model.top_k": 1}, {"model.top_k": 4},
                                      {"model.d_model": 256, "model.num_heads": 4,
                                       "model.d_ff": 1024}])
def test_overrides_keep_moe_top2_compute_matched(override):
  """expert_d_ff is derived from the final d_ff and top_k, so FLOPs stay within 10%."""
  root = CONFIGS[0].parent
  dense = config_lib.load(f"{root}/dense.py", override)
  moe = config_lib.load(f"{root}/moe_top2.py", override)
  flops = lambda c: accounting.count(c.model, c.train.context).flops_per_token
  assert abs(flops(moe) / flops(dense) - 1) <= 0.10, (override, flops(moe), flops(dense))
  assert moe.model.expert_d_ff == moe.model.d_ff // moe.model.top_k


def test_an_explicit_expert_width_is_kept():
  config = config_lib.load(f"{CONFIGS[0].parent}/moe_top2.py",
                           {"model.expert_d_ff": 100, "model.d_ff": 1024})
  assert config.model.expert_d_ff == 100


def test_derived_fields():
  assert ModelConfig(d_ff=768, top_k=2).expert_d_ff == 384
  assert ModelConfig(d_ff=768, top_k=3, num_shared_experts=1).expert_d_ff == 192
  assert ModelConfig(top_k=1).renormalize_gates is False
  assert ModelConfig(top_k=2).renormalize_gates is True
  assert ModelConfig(top_k=2, renormalize_gates=False).renormalize_gates is False
  config = config_lib.resolve(Config(train=config_lib.TrainConfig(context=64)))
  assert config.model.group_size == 64


MOE = Config(model=ModelConfig(num_experts=8, top_k=2),
             train=config_lib.TrainConfig(batch_size=8, context=64))


@pytest.mark.parametrize("section, changes, field", [
    ("model", dict(top_k=9), "model.top_k"),
    ("model", dict(top_k=0), "model.top_k"),
    ("model", dict(capacity_factor=0.0), "model.capacity_factor"),
    ("model", dict(capacity_factor=-1.0), "model.capacity_factor"),
    ("model", dict(eval_capacity_factor=0.0), "model.eval_capacity_factor"),
    ("model", dict(d_model=65), "model.d_model"),
    ("model", dict(positions="alibi"), "model.positions"),
    ("model", dict(dispatch="megablocks"), "model.dispatch"),
    ("model", dict(router="nope"), "model.router"),
    ("model", dict(num_experts=0, router="top_kk"), "model.router"),  # dense: config.json
    ("model", dict(group_size=48), "model.group_size"),  # straddles 64-token sequences
    ("model", dict(group_size=1024), "model.group_size"),  # 8 x 64 tokens hold no 1024 group
    ("model", dict(top_k=1, renormalize_gates=True), "model.renormalize_gates"),
    ("model", dict(num_experts=0, num_shared_experts=1), "model.num_shared_experts"),
    ("model", dict(load_balance_scope="device"), "model.load_balance_scope"),
    ("model", dict(router_bias_rate=-1.0), "model.router_bias_rate"),
    ("data", dict(tokenizer="bpe"), "data.tokenizer"),
    ("data", dict(split="head"), "data.split"),
    ("train", dict(min_learning_rate=1.0), "train.min_learning_rate"),
    ("train", dict(warmup_steps=1000), "train.warmup_steps"),
    ("train", dict(context=1024), "train.context"),
    ("train", dict(router_lr_scale=0.0), "train.router_lr_scale"),
    ("train", dict(expert_lr_scale=-1.0), "train.expert_lr_scale"),
    ("train", dict(expert_weight_decay=-0.5), "train.expert_weight_decay"),
    ("train", dict(grad_clip=0.0), "train.grad_clip"),
    ("train", dict(b1=1.0), "train.b1"),
    ("train", dict(b2=-0.1), "train.b2"),
    ("train", dict(weight_decay=-1.0), "train.weight_decay"),
    ("model", dict(first_moe_layer=12), "model.first_moe_layer"),  # no MoE layer at all
    ("model", dict(router_jitter=1.0), "model.router_jitter"),
    ("model", dict(positions="rotary", d_model=66, num_heads=2), "model.positions"),
    # Not finite, or not as a float32: they pass `> 0` and train NaN.
    ("model", dict(capacity_factor=float("inf")), "model.capacity_factor"),
    ("model", dict(dropout=float("nan")), "model.dropout"),
    ("train", dict(learning_rate=float("inf")), "train.learning_rate"),
    ("train", dict(learning_rate=1e39), "train.learning_rate"),
    ("data", dict(val_fraction=float("nan")), "data.val_fraction"),
])
def test_contradictions_are_one_line_naming_the_field(section, changes, field):
  config = dataclasses.replace(MOE, **{section: dataclasses.replace(getattr(MOE, section),
                                                                    **changes)})
  with pytest.raises(ChimeraError, match="^" + re.escape(f"config.{field}:")) as error:
    config_lib.validate(config)
  assert "\n" not in str(error.value)


def test_allowed_values_are_listed_from_the_annotation():
  config = dataclasses.replace(MOE, model=dataclasses.replace(MOE.model, priority="first"))
  with pytest.raises(ChimeraError, match="expected one of 'token', 'rank', got 'first'"):
    config_lib.validate(config)


def test_groups_that_hold_whole_sequences_are_allowed():
  for group_size in (16, 64, 128, 512):
    config_lib.validate(dataclasses.replace(
        MOE, model=dataclasses.replace(MOE.model, group_size=group_size)))


def test_run_differences_ignore_logging_and_steps():
  changed = dataclasses.replace(MOE, name="other", train=dataclasses.replace(
      MOE.train, log_every=1, eval_every=7, checkpoint_every=9, steps=5000))
  assert config_lib.run_differences(MOE, changed) == []
  changed = dataclasses.replace(changed, model=dataclasses.replace(MOE.model, top_k=1),
                                data=dataclasses.replace(MOE.data, seed=3))
  assert config_lib.run_differences(MOE, changed) == ["model.top_k", "data.seed"]


def test_unknown_preset_is_one_line():
  with pytest.raises(ChimeraError, match="^config: unknown preset 'huge'"):
    config_lib.load(f"{CONFIGS[0]}:huge")


def test_a_preset_with_a_misspelled_section_is_one_line(monkeypatch):
  monkeypatch.setitem(presets.PRESETS, "laptop", {"modle": {"d_model": 64}})
  with pytest.raises(ChimeraError, match="^config: preset 'laptop' sets section 'modle', which "
                                         "the config does not have: expected one of data, "
                                         "mesh, model, train$"):
    config_lib.load(f"{CONFIGS[0]}:laptop")


def test_an_override_of_the_wrong_type_or_without_a_value_is_one_line():
  moe = f"{CONFIGS[0].parent}/moe_top2.py"
  with pytest.raises(ChimeraError, match=r"^config.train.steps: expected int, got 10000.0$"):
    config_lib.load(moe, {"train.steps": 1e4})
  # The expected type is the field's annotation, not the type of its default (None here).
  with pytest.raises(ChimeraError, match=r"^config.model.renormalize_gates: expected "
                                         r"bool \| None, got 0$"):
    config_lib.load(moe, {"model.renormalize_gates": 0})
  with pytest.raises(ChimeraError, match=r"^config.model.expert_d_ff: expected int \| None, "
                                         r"got '384'$"):
    config_lib.load(moe, {"model.expert_d_ff": "384"})
  # None only where the annotation allows it (it failed later, with a traceback).
  with pytest.raises(ChimeraError, match=r"^config.model.d_ff: expected int, got None$"):
    config_lib.load(moe, {"model.d_ff": None})
  one_sequence = config_lib.load(moe, {"model.group_size": None})  # None: one sequence
  assert one_sequence.model.group_size == one_sequence.train.context
  with pytest.raises(ChimeraError, match=r"^config.model.priority: expected 'token' or "
                                         r"'rank', got 3$"):
    config_lib.load(moe, {"model.priority": 3})
  with pytest.raises(ChimeraError, match=r"^'train.batch_size': expected section.field=value$"):
    bench.parse_override("train.batch_size")
  assert bench.parse_override("train.steps=300") == ("train.steps", 300)
  # A field that holds text takes the text as written (a corpus named 2024, 1e3 as a path),
  # as chimera.main's --config.data.corpus=2024 does; a number stays a number.
  assert bench.parse_override("data.corpus=2024") == ("data.corpus", "2024")
  assert bench.parse_override("data.corpus=1e3") == ("data.corpus", "1e3")
  assert bench.parse_override("model.router=top_k") == ("model.router", "top_k")
  assert bench.parse_override("train.learning_rate=1e-3") == ("train.learning_rate", 1e-3)
  assert config_lib.load(moe, dict([bench.parse_override("data.corpus=2024")])).data.corpus \
      .endswith("/2024")
  # The run's name is the one field outside a section; a section alone is no field.
  assert config_lib.load(moe, {"name": "mine"}).name == "mine"
  for key in ("model", "model.", "name.x", "nosuch.steps"):
    with pytest.raises(ChimeraError, match=rf"^config.{re.escape(key)}: unknown field$"):
      config_lib.load(moe, {key: 1})


@pytest.mark.parametrize("key", ["data.seed", "train.seed"])
def test_a_negative_seed_is_refused_before_compiling(key):
  with pytest.raises(ChimeraError, match=rf"^config.{key}: must be >= 0, got -1$"):
    config_lib.load(f"{CONFIGS[0].parent}/dense.py:tiny", {key: -1})


def test_steps_past_what_the_optimiser_counts_are_refused():
  """optax counts steps in int32: train.steps=3e9 was accepted (and its ETA printed)."""
  dense = f"{CONFIGS[0].parent}/dense.py:tiny"
  assert config_lib.load(dense, {"train.steps": 2**31 - 1}).train.steps == 2**31 - 1
  with pytest.raises(ChimeraError, match=r"^config.train.steps: must be < 2\*\*31, got "
                                         r"2147483648$"):
    config_lib.load(dense, {"train.steps": 2**31})


@pytest.mark.parametrize("key", ["data.seed", "train.seed"])
def test_a_seed_that_would_repeat_another_is_refused(key):
  """jax.random.key keeps a seed's low 32 bits (2**32 trained seed 0's run again), and the
  run also draws from train.seed + 1."""
  dense = f"{CONFIGS[0].parent}/dense.py:tiny"
  accepted = config_lib.load(dense, {key: config_lib.MAX_SEED})
  assert getattr(accepted, key.split(".")[0]).seed == 2**32 - 2
  with pytest.raises(ChimeraError, match=rf"^config.{key}: must be in \[0, 4294967294\], "
                                         rf"got 4294967296$"):
    config_lib.load(dense, {key: 2**32})


def test_a_boolean_for_a_number_is_refused():
  """ConfigDict takes True for an int or a float field; chimera.compare's --set and --sweep
  parse "true" as True, which trained top_k=True as top_k=1 under another name."""
  moe = f"{CONFIGS[0].parent}/moe_top2.py:tiny"
  with pytest.raises(ChimeraError, match=r"^config.model.top_k: expected int, got True$"):
    config_lib.load(moe, {"model.top_k": True})
  with pytest.raises(ChimeraError, match=r"^config.train.learning_rate: expected float, "
                                         r"got True$"):
    config_lib.load(moe, {"train.learning_rate": True})
  # expert_weight_decay was a bool: older config.json files and commands still say so.
  assert config_lib.load(moe, {"train.expert_weight_decay": False}).train.expert_weight_decay == 0
  assert config_lib.load(moe, {"model.renormalize_gates": False}).model.renormalize_gates is False


def test_a_derived_expert_width_that_cannot_match_dense_is_refused():
  """expert_d_ff = d_ff / (top_k + shared) only when that divides: d_ff=100 at moe_fine's
  top-8 floored to 12 (96 active units against dense's 100), and d_ff=4 clamped to 1 (8)."""
  fine = f"{CONFIGS[0].parent}/moe_fine.py:tiny"
  for d_ff in (100, 4):
    with pytest.raises(ChimeraError, match=rf"^config.model.d_ff: {d_ff} is not a multiple of "
                                           rf"model.top_k \+ model.num_shared_experts = 8"):
      config_lib.load(fine, {"model.d_ff": d_ff})
  assert config_lib.load(fine, {"model.d_ff": 104}).model.expert_d_ff == 13
  with pytest.raises(ChimeraError, match=r"^config.model.d_ff: must be > 0, got 0$"):
    config_lib.load(fine, {"model.d_ff": 0})  # not a width to set: a d_ff to fix
  assert config_lib.load(fine, {"model.d_ff": 100, "model.expert_d_ff": 12}).model.expert_d_ff == 12
  dense = config_lib.load(f"{CONFIGS[0].parent}/dense.py:tiny", {"model.d_ff": 101})
  assert dense.model.d_ff == 101  # a dense model has no experts to match


def test_a_local_corpus_path_is_made_absolute(tmp_path, monkeypatch):
  """A run resumed or evaluated from another directory reads the same text."""
  monkeypatch.chdir(tmp_path)
  dense = f"{CONFIGS[0].parent}/dense.py:tiny"
  assert config_lib.load(dense, {"data.corpus": "notes.txt"}).data.corpus == str(
      tmp_path / "notes.txt")
  assert config_lib.load(dense, {"data.corpus": "texts/*.txt"}).data.corpus == str(
      tmp_path / "texts" / "*.txt")
  for named in ("shakespeare", "tfds:tiny_shakespeare", "hf:roneneldan/TinyStories"):
    assert config_lib.load(dense, {"data.corpus": named}).data.corpus == named
  # A config.json written with a relative path is the same run as its absolute form here.
  absolute = config_lib.load(dense, {"data.corpus": "notes.txt"})
  relative = dataclasses.replace(absolute, data=dataclasses.replace(absolute.data,
                                                                    corpus="notes.txt"))
  assert config_lib.run_differences(relative, absolute) == []
  monkeypatch.chdir(tmp_path.parent)
  assert config_lib.run_differences(relative, absolute) == ["data.corpus"]


def test_the_mesh_does_not_change_the_run():
  """A checkpoint restores onto any mesh: resuming on another mesh is the same run."""
  other = dataclasses.replace(MOE, mesh=config_lib.MeshConfig(data=2, expert=4))
  assert config_lib.run_differences(MOE, other) == []


# A user's own config file with an error in it: what each case should say, after the file.
BROKEN_CONFIGS = [
    ("def get_config(arg=None):\n  return 1 / 0\n", "", ", line 2: ZeroDivisionError: division by zero"),
    ("def get_config(:\n", "", ", line 1: invalid syntax"),
    ("import no_such_module_here\n", "",
     ", line 1: ModuleNotFoundError: No module named 'no_such_module_here'"),
    ("x = 1\n", "", " defines no get_config(arg=None)"),
    ("from chimera import presets\ndef get_config():\n  return presets.finish(presets.base('x', None))\n",
     ":tiny", ": get_config() takes 0 positional arguments but 1 was given (chimera calls "
     "get_config(preset), with the text after ':' or None)"),
]


@pytest.mark.parametrize("text, preset, said", BROKEN_CONFIGS)
def test_an_error_in_a_config_file_is_one_line_naming_its_line(tmp_path, text, preset, said):
  """Every tool that loads a config file (chimera.bench, compare's --base, scaling, ...)
  reports an error of the file's own as one line naming the file and its line, not a
  traceback."""
  path = tmp_path / "mine.py"
  path.write_text(text)
  with pytest.raises(ChimeraError) as error:
    config_lib.load(f"{path}{preset}")
  assert str(error.value) == f"config: {path}{said}"


def test_a_preset_or_field_error_keeps_its_own_message(tmp_path):
  """A ChimeraError raised while a config file loads (an unknown preset) is its own line,
  not the file's."""
  path = tmp_path / "mine.py"
  path.write_text("from chimera import presets\n"
                  "def get_config(arg=None):\n"
                  "  return presets.finish(presets.base('mine', arg))\n")
  with pytest.raises(ChimeraError, match=r"^config: unknown preset 'nope' for mine"):
    config_lib.load(f"{path}:nope")
  assert config_lib.load(f"{path}:tiny").name == "mine-tiny"


def test_routing_groups_fit_each_devices_micro_batch():
  """A group must divide the tokens one device holds of one micro-batch: the batch split
  over data x expert devices, and over train.grad_accum."""
  moe = ModelConfig(num_experts=8, top_k=2)
  per_device = Config(model=dataclasses.replace(moe, group_size=64),
                      train=config_lib.TrainConfig(batch_size=8, context=32),
                      mesh=config_lib.MeshConfig(data=2, expert=4))  # 1 sequence each
  with pytest.raises(ChimeraError, match=r"^config\.model\.group_size: 64 does not divide "
                                         r"the 32 tokens"):
    config_lib.validate(per_device)
  per_micro_batch = Config(model=dataclasses.replace(moe, group_size=256),
                           train=config_lib.TrainConfig(batch_size=16, grad_accum=4, context=32))
  with pytest.raises(ChimeraError, match=r"^config\.model\.group_size: 256 does not divide "
                                         r"the 128 tokens"):
    config_lib.validate(per_micro_batch)


def test_gpu_large_is_the_gpu_preset_wider_and_deeper():
  m = config_lib.load("configs/dense.py:gpu_large").model
  assert (m.vocab_size, m.dtype, m.max_len, m.d_model, m.num_layers, m.num_heads, m.d_ff) == (
      50304, "bfloat16", 512, 1024, 12, 16, 4096)


def test_an_override_value_may_hold_an_equals_sign():
  """Only the first "=" ends the field: a corpus path with one in it is that path."""
  assert bench.parse_override("data.corpus=/data/run=3/text.txt") == (
      "data.corpus", "/data/run=3/text.txt")
  assert bench.parse_override("model.router=a=b") == ("model.router", "a=b")
