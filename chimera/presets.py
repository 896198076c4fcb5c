"""The shared backbone presets behind `configs/*.py`.

Each config file picks a preset by its `arg` (`configs/dense.py:tiny`) and sets its own
feed-forward: dense, or MoE with its experts. The backbone, data and optimiser of a
preset are the same for every model, so the models compare at equal compute.
"""

import ml_collections

PRESETS = ("default", "tiny", "gpu", "nanogpt_cpu")


def base(name: str, arg: str | None) -> ml_collections.ConfigDict:
  """The ConfigDict of preset `arg` (None = "default"), before the FFN is chosen."""
  preset = arg or "default"
  if preset not in PRESETS:
    raise ValueError(f"unknown preset {preset!r} for {name}: expected one of {PRESETS}")
  c = ml_collections.ConfigDict()
  c.name = name if preset == "default" else f"{name}-{preset}"

  c.model = dict(
      vocab_size=257, num_layers=4, num_heads=3, d_model=192, d_ff=768, max_len=512,
      positions="learned", norm="layernorm", activation="gelu", use_bias=False,
      dropout=0.0, dtype="float32", init_std=0.02,
      # Dense by default; the MoE configs set these.
      num_experts=0, top_k=2, expert_d_ff=256, capacity_factor=1.25,
      eval_capacity_factor=2.0, min_capacity=4, group_size=64, priority="token", dispatch="einsum",
      renormalize_gates=False, router_jitter=0.0, expert_init_scale=0.1, moe_every=1,
      first_moe_layer=0, load_balance_coef=0.01, z_loss_coef=0.001)
  c.data = dict(corpus="shakespeare", tokenizer="byte", split="auto", val_fraction=0.1, seed=0)
  c.train = dict(
      steps=1000, batch_size=32, context=128, grad_accum=1, learning_rate=2e-3,
      min_learning_rate=2e-4, warmup_steps=100, b1=0.9, b2=0.99, weight_decay=0.1,
      grad_clip=1.0, seed=0, log_every=50, eval_every=250, eval_batches=20,
      checkpoint_every=500, keep_checkpoints=2)
  c.mesh = dict(data=1, expert=1)
  c = ml_collections.ConfigDict(c)

  if preset == "tiny":
    c.model.update(num_layers=2, num_heads=2, d_model=32, d_ff=128, max_len=64,
                   expert_d_ff=64, group_size=32)
    c.train.update(steps=6, batch_size=4, context=32, warmup_steps=2, log_every=2,
                   eval_every=3, eval_batches=2, checkpoint_every=3)
  elif preset == "gpu":
    c.model.update(vocab_size=50304, num_layers=6, num_heads=8, d_model=512, d_ff=2048,
                   max_len=512, expert_d_ff=1024, group_size=1024, dtype="bfloat16")
    c.data.tokenizer = "gpt2"
    c.train.update(steps=5000, batch_size=64, context=512, learning_rate=6e-4,
                   min_learning_rate=6e-5, warmup_steps=200, b2=0.95, log_every=100,
                   eval_every=500, eval_batches=40, checkpoint_every=1000)
  elif preset == "nanogpt_cpu":
    # nanoGPT's shakespeare_char CPU quick run, field for field. Train it on the same
    # file: --config.data.corpus=PATH/tinyshakespeare.txt (nanoGPT's 90/10 tail split).
    c.model.update(num_layers=4, num_heads=4, d_model=128, d_ff=512, max_len=64,
                   expert_d_ff=256, group_size=64)
    c.data.split = "tail"
    c.train.update(steps=2000, batch_size=12, context=64, learning_rate=1e-3,
                   min_learning_rate=1e-4, warmup_steps=100, log_every=100,
                   eval_every=500, eval_batches=20, checkpoint_every=1000)
  return c


def finish(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Locks the config: `--config.model.top_k=1` overrides, a misspelled key is an error."""
  c.lock()
  return c
