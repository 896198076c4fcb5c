"""The backbone presets behind `configs/*.py`, each a short diff of the defaults.

The defaults live in the dataclasses of `chimera.config`; a preset states only what it
changes. Each config file picks a preset by its `arg` (`configs/dense.py:tiny`) and sets
its own feed-forward. The backbone, data and optimiser of a preset are the same for every
model, so the models compare at equal compute. Adding a preset is one entry in PRESETS.
"""

import ml_collections

from chimera import config as config_lib
from chimera.errors import ChimeraError

# preset name -> {section: {field: value}}, applied over the defaults.
PRESETS: dict[str, dict[str, dict]] = {
    "default": {},
    "tiny": {
        "model": dict(num_layers=2, num_heads=2, d_model=32, d_ff=128, max_len=64),
        "train": dict(steps=6, batch_size=4, context=32, warmup_steps=2, log_every=2,
                      eval_every=3, eval_batches=2, checkpoint_every=3),
    },
    # A smaller backbone for the CPU study (chimera.compare --preset=cpu): 10M tokens.
    "small": {
        "model": dict(num_layers=3, num_heads=2, d_model=128, d_ff=512, max_len=256),
        "train": dict(steps=2500, batch_size=32, context=128, eval_every=250,
                      checkpoint_every=500),
    },
    "gpu": {
        "model": dict(vocab_size=50304, num_layers=6, num_heads=8, d_model=512, d_ff=2048,
                      max_len=512, dtype="bfloat16"),
        "data": dict(tokenizer="gpt2"),
        "train": dict(steps=5000, batch_size=64, context=512, learning_rate=6e-4,
                      min_learning_rate=6e-5, warmup_steps=200, b2=0.95, log_every=100,
                      eval_every=500, eval_batches=40, checkpoint_every=1000),
    },
    # nanoGPT's shakespeare_char CPU quick run, field for field. Train it on the same
    # file: --config.data.corpus=PATH/tinyshakespeare.txt (nanoGPT's 90/10 tail split).
    "nanogpt_cpu": {
        "model": dict(num_layers=4, num_heads=4, d_model=128, d_ff=512, max_len=64),
        "data": dict(split="tail"),
        "train": dict(steps=2000, batch_size=12, context=64, learning_rate=1e-3,
                      min_learning_rate=1e-4, warmup_steps=100, log_every=100,
                      eval_every=500, eval_batches=20, checkpoint_every=1000),
    },
}
# The gpu preset at d_model 1024 / 12 layers (16 heads of 64, d_ff 4 x d_model), for MFU
# at a larger width. launch/gpu_check.sh's d1024 stage measures instead the gpu preset
# with only d_model and num_layers changed (d_ff 2048, 8 heads), as issue 11 states it.
PRESETS["gpu_large"] = {**PRESETS["gpu"], "model": {
    **PRESETS["gpu"]["model"], "num_layers": 12, "num_heads": 16, "d_model": 1024,
    "d_ff": 4096}}

# The GPU study at scale: the gpu backbone on FineWeb-Edu's 10B-token sample (GPT-2 BPE),
# about 1B tokens drawn (30,500 steps of 64 x 512, windows at random, not one pass in order).
# Needs the network once, for `python -m chimera.data
# --corpus=hf:HuggingFaceFW/fineweb-edu:sample-10BT --tokenizer=gpt2 --val_fraction=0.0005`;
# offline, point --config.data.corpus at a local file or folder.
PRESETS["gpu_fineweb"] = {**PRESETS["gpu"], "data": {
    **PRESETS["gpu"]["data"], "corpus": "hf:HuggingFaceFW/fineweb-edu:sample-10BT",
    "val_fraction": 0.0005}, "train": {
    **PRESETS["gpu"]["train"], "steps": 30_500, "warmup_steps": 700, "eval_every": 1000,
    "checkpoint_every": 2000}}


def base(name: str, arg: str | None) -> ml_collections.ConfigDict:
  """The ConfigDict of preset `arg` (None = "default"), before the FFN is chosen."""
  preset = arg or "default"
  if preset not in PRESETS:
    raise ChimeraError(f"config: unknown preset {preset!r} for {name}: expected one of "
                       f"{', '.join(PRESETS)}")
  c = config_lib.config_dict(name if preset == "default" else f"{name}-{preset}")
  for section, values in PRESETS[preset].items():
    if not isinstance(c.get(section), ml_collections.ConfigDict):
      sections = [name for name in c if isinstance(c[name], ml_collections.ConfigDict)]
      raise ChimeraError(f"config: preset {preset!r} sets section {section!r}, which the "
                         f"config does not have: expected one of {', '.join(sections)}")
    c[section].update(values)
  return c


def finish(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Locks the config: `--config.model.top_k=1` overrides, a misspelled key is an error."""
  c.lock()
  return c
