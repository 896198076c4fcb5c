"""KV-cache generation: the same tokens and logits as re-running the full forward pass."""

import dataclasses
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from chimera.config import ModelConfig
from chimera.decoder import Decoder
from chimera.errors import ChimeraError
from chimera.routers import ROUTERS
from chimera.generate import (cast_once, check_length, decode, decode_notes, generate,
                              new_tokens_in_context, prefill, sample_logits)
from conftest import SHIPPED_CONFIGS

BASE = ModelConfig(vocab_size=40, num_layers=2, num_heads=2, d_model=16, d_ff=32, max_len=16)


@pytest.mark.parametrize("config", [
    BASE,
    dataclasses.replace(BASE, positions="rotary", norm="rmsnorm"),
    # MoE; a capacity that drops nothing in the full pass, since decoding never drops.
    # Routing groups are whole sequences (group_size unset), as the prompt grows.
    dataclasses.replace(BASE, num_experts=4, top_k=2, expert_d_ff=16, eval_capacity_factor=8.0),
] + [dataclasses.replace(BASE, num_experts=4, top_k=2, expert_d_ff=16, eval_capacity_factor=8.0,
                         router=router) for router in sorted(set(ROUTERS) - {BASE.router})],
    ids=["dense", "dense-rotary", "moe"] + sorted(set(ROUTERS) - {BASE.router}))
def test_greedy_generation_equals_naive_full_forward(config):
  model = Decoder(config)
  prompt = jax.random.randint(jax.random.key(1), (2, 5), 0, config.vocab_size)
  params = model.init(jax.random.key(0), prompt)["params"]
  new_tokens = config.max_len + 1 - prompt.shape[1]  # as many as fit: the last is not read
  tokens, logits = generate(params, prompt, jax.random.key(2), config=config,
                            max_new_tokens=new_tokens, temperature=0.0)

  # Naive: the prompt and the generated tokens through the model in one full, causal
  # pass. Position p's logits see tokens <= p only, so the logits at the prompt's last
  # position and at each generated token but the last are the ones that chose the next
  # token, and greedy decoding must have taken their argmax.
  # The last generated token is read by no position: max_len positions in all.
  sequence = jnp.concatenate([prompt, tokens[:, :-1]], axis=1)
  assert sequence.shape[1] == config.max_len
  full, _ = model.apply({"params": params}, sequence)
  naive_logits = full[:, prompt.shape[1] - 1:]  # [B, new_tokens, V]
  np.testing.assert_array_equal(tokens, jnp.argmax(naive_logits, -1))
  chex.assert_trees_all_close(logits, naive_logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", [path.stem for path in SHIPPED_CONFIGS])
def test_weights_cast_once_give_the_same_bits(name, make_config, corpus):
  """Every shipped config, in bfloat16: the model computes the same logits, in a full pass
  and a decode step, from weights cast once (generate's loop) as from float32 ones."""
  config = make_config(name, corpus, model__dtype="bfloat16").model
  model = Decoder(config)
  prompt = jax.random.randint(jax.random.key(1), (2, 32), 0, config.vocab_size)  # 2 groups
  params = model.init(jax.random.key(0), prompt)["params"]
  cast = cast_once(params, config)
  widths = {jnp.dtype(leaf.dtype).name for leaf in jax.tree.leaves(cast)}
  assert widths == {"bfloat16", "float32"}  # norms (and routers) stay float32
  full = lambda p: model.apply({"params": p}, prompt)[0]
  np.testing.assert_array_equal(full(cast), full(params))
  cache = jax.tree.map(jnp.zeros_like, model.init(jax.random.key(0), prompt[:, :1],
                                                  decode=True)["cache"])
  step = lambda p: model.apply({"params": p, "cache": cache}, prompt[:, :1], decode=True,
                               mutable=["cache"])[0][0]
  np.testing.assert_array_equal(step(cast), step(params))


def test_sampling_respects_top_k():
  config = BASE
  model = Decoder(config)
  prompt = jnp.zeros((4, 3), jnp.int32)
  params = model.init(jax.random.key(0), prompt)["params"]
  tokens, logits = generate(params, prompt, jax.random.key(3), config=config,
                            max_new_tokens=6, temperature=1.0, top_k=3)
  allowed = jax.lax.top_k(logits, 3)[1]  # [B, N, 3]
  assert bool(jnp.all(jnp.any(allowed == tokens[..., None], axis=-1)))
  # generate is prefill then decode: the two apart give the same tokens and logits (the
  # bench times them apart).
  cache, first = prefill(params, prompt, config=config)
  again = decode(params, cache, first, jax.random.key(3), config=config, prompt_length=3,
                 max_new_tokens=6, temperature=1.0, top_k=3)
  np.testing.assert_array_equal(again[0], tokens)
  chex.assert_trees_all_close(again[1], logits, atol=1e-5, rtol=1e-5)
  # Past the context, decode refuses as generate does (the cache would write its last
  # slot again and again).
  with pytest.raises(ChimeraError, match="exceed the model's context"):
    decode(params, cache, first, jax.random.key(3), config=config, prompt_length=3,
           max_new_tokens=config.max_len - 1, temperature=1.0)
  one, _ = generate(params, prompt, jax.random.key(3), config=config, max_new_tokens=1,
                    temperature=1.0, top_k=3)
  np.testing.assert_array_equal(one, tokens[:, :1])  # the first token needs no step


def test_extreme_temperatures_sample_within_the_top_k():
  """The top k are chosen before the temperature, and logits are scaled from their
  maximum: a tiny temperature is greedy, a huge one uniform over the top k. Dividing the
  raw logits overflowed float32 and sampled outside the top k (token 1 here)."""
  logits = jnp.array([[-1.0, 0.5, 2.0, 3.0]])
  rngs = jax.random.split(jax.random.key(0), 200)
  draw = lambda temperature, top_k: np.asarray(jax.vmap(
      lambda rng: sample_logits(logits, rng, temperature, top_k))(rngs))[:, 0]
  for top_k in (0, 2):
    assert set(draw(1e-40, top_k)) == {3}
  assert set(draw(1e38, 1)) == {3}
  assert set(draw(1e38, 2)) == {2, 3}
  assert set(draw(1e38, 0)) == {0, 1, 2, 3}
  with pytest.raises(ChimeraError, match=r"^max_new_tokens: must be >= 1, got 0"):
    generate(None, jnp.zeros((1, 3), jnp.int32), jax.random.key(0), config=BASE,
             max_new_tokens=0)


def test_too_long_a_request_is_refused():
  check_length(BASE, prompt_length=10, max_new_tokens=7)  # 16 positions read: max_len
  with pytest.raises(ChimeraError, match=r"exceed the model's context \(model\.max_len=16; "
                                         r"the last new token is not read, so at most 17"):
    check_length(BASE, prompt_length=10, max_new_tokens=8)
  # generate() itself refuses, before anything runs: 5 + 40 tokens with max_len 16.
  params = Decoder(BASE).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  with pytest.raises(ChimeraError, match=r"^prompt: 5 prompt tokens \+ max_new_tokens=40"):
    generate(params, jnp.zeros((1, 5), jnp.int32), jax.random.key(0), config=BASE,
             max_new_tokens=40)


def test_new_tokens_stay_in_the_trained_context():
  # The prompt and every new token but the last are read: 8 + 121 - 1 = 128 positions.
  assert new_tokens_in_context(8, None, context=128) == 121  # the default, cut to what fits
  assert new_tokens_in_context(8, None, context=512) == 200
  assert new_tokens_in_context(8, 121, context=128) == 121
  with pytest.raises(ChimeraError, match=r"^--max_new_tokens: 8 prompt tokens \+ 122 new .*"
                                         r"train\.context=128.*at most 121$"):
    new_tokens_in_context(8, 122, context=128)
  assert new_tokens_in_context(128, None, context=128) == 1  # from the last position's logits
  with pytest.raises(ChimeraError, match=r"^--prompt: 129 tokens leave no room"):
    new_tokens_in_context(129, None, context=128)


def test_decode_notes_name_what_decoding_does_differently():
  moe = dataclasses.replace(BASE, num_experts=4, top_k=2)
  assert decode_notes(BASE) == []  # dense
  assert decode_notes(dataclasses.replace(moe, dispatch="dropless")) == []
  [drops] = decode_notes(moe)  # einsum: capacity drops in training, none when decoding
  assert "without drops" in drops and "eval_capacity_factor=2.0" in drops
  [causal] = decode_notes(dataclasses.replace(moe, priority="rank"))
  assert "not causal" in causal


@pytest.mark.slow
def test_generate_entry_point_samples_from_a_run(make_config, corpus, tmp_path, repo_root):
  from chimera.train import train
  workdir = tmp_path / "run"
  train(make_config("moe_top2", corpus, train__steps=2, train__warmup_steps=0), workdir)
  result = subprocess.run(
      [sys.executable, "-m", "chimera.generate", f"--workdir={workdir}", "--prompt=the king",
       "--max_new_tokens=12", "--temperature=0.8", "--top_k=5", "--step=2"],
      cwd=repo_root, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.startswith("the king") and len(result.stdout) > len("the king")
  # A terminal that cannot show the sample's characters: "?" for them, not a traceback.
  # (Uniform over 257 bytes, 20 of them: some are not ASCII, but for 2**-20.)
  ascii_out = subprocess.run(
      [sys.executable, "-m", "chimera.generate", f"--workdir={workdir}", "--prompt=a",
       "--max_new_tokens=20", "--temperature=1e30", "--top_k=0"],
      cwd=repo_root, capture_output=True, timeout=300,
      env={**os.environ, "PYTHONIOENCODING": "ascii"})
  assert ascii_out.returncode == 0, ascii_out.stderr[-2000:]
  assert b"?" in ascii_out.stdout and ascii_out.stdout.startswith(b"a")
  # Bad sampling settings: one line naming the flag, no traceback, and found before the
  # checkpoint is restored (restoring compiles the state's initialisation; JAX_LOG_COMPILES
  # would log "Compiling ..." to stderr).
  for flag, message in (("--top_k=300", "--top_k: must be in [0, 257]"),
                        ("--temperature=-1", "--temperature: must be >= 0"),
                        ("--temperature=nan", "--temperature: must be >= 0"),
                        ("--temperature=inf", "--temperature: must be >= 0"),
                        ("--temperature=1e39", "--temperature: must be >= 0 (0 is greedy) "
                                               "and a float32, got 1e+39"),
                        ("--seed=4294967296", "--seed: must be in [0, 4294967295]"),
                        ("--step=7", "--step: no checkpoint at step 7"),
                        ("--max_new_tokens=33", "--max_new_tokens: 1 prompt tokens + 33"),  # context 32
                        ("--prompt=", "--prompt: is empty"),
                        (b"--prompt=ab\xffcd", "--prompt: not valid UTF-8")):  # raw bytes
    bad = subprocess.run([sys.executable, "-m", "chimera.generate", f"--workdir={workdir}", flag],
                         cwd=repo_root, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "JAX_LOG_COMPILES": "1"})
    assert bad.returncode == 2 and bad.stderr.startswith(f"error: {message}"), bad.stderr[-2000:]
    assert "Compiling" not in bad.stderr, bad.stderr[-2000:]
    assert len(bad.stderr.strip().splitlines()) == 1  # no traceback


def test_vocab_limit_masks_the_padded_ids():
  """A vocabulary padded past the tokenizer's (GPT-2's 50257 in 50304): ids at or above the
  limit are never sampled, and their logits are -inf; the ones below stay finite."""
  config = BASE  # vocab 40
  prompt = jnp.zeros((4, 3), jnp.int32)
  params = Decoder(config).init(jax.random.key(0), prompt)["params"]
  tokens, logits = generate(params, prompt, jax.random.key(1), config=config, max_new_tokens=8,
                            temperature=1e30, vocab_limit=30)  # near-uniform over what is left
  assert bool(jnp.all(jnp.isneginf(logits[..., 30:])))
  assert bool(jnp.all(jnp.isfinite(logits[..., :30])))
  assert int(tokens.max()) < 30 and int(tokens.max()) > 20  # the top of the allowed range is drawn
