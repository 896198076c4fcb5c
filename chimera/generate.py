"""Sampling with a static-shape key/value cache.

  python -m chimera.generate --workdir=runs/moe_top2-... --prompt="ROMEO:" \
      --max_new_tokens=200 --temperature=0.8 --top_k=40 [--step=N]   # N: a checkpoint

The prompt is run through the model once (prefill), filling each layer's cache; then one
token per step goes through `jax.lax.scan`, so the whole generation is one compiled
function per (batch, prompt length, new tokens) shape. MoE layers route every new token
with capacity equal to the group size, so decoding never drops a token: on the einsum path,
where training and evaluation drop assignments beyond capacity, the samples come from the
model without drops, and the command says so. A router that is not causal
(chimera.routers.is_causal) cannot be decoded as it was trained; the command says that too.

The prompt and the new tokens must fit in the context the run trained on
(`train.context`): positions past it never had a gradient. `--max_new_tokens` defaults to
200, or fewer where the trained context ends sooner.
"""

import functools
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from chimera import compile_cache
from chimera.config import FLOAT32_MAX, ModelConfig
from chimera.decoder import Decoder
from chimera.errors import ChimeraError, parse_flags
from chimera.layers import compute_dtype
from chimera.routers import causality_note


def init_cache(config: ModelConfig, batch_size: int):
  """Zeroed decode cache for `batch_size` sequences of up to `config.max_len` tokens."""
  model = Decoder(config)
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((batch_size, 1), jnp.int32), decode=True))
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["cache"])


def sample_logits(logits: jax.Array, rng: jax.Array, temperature: float, top_k: int) -> jax.Array:
  """logits [B, V] -> token ids [B]. temperature 0 is greedy; top_k 0 keeps every token.

  The top k are chosen before the temperature scales anything, and the logits are scaled
  from their maximum, so extreme temperatures reach their limits: greedy where 1 /
  temperature overflows float32, uniform over the top k where it underflows (dividing the
  raw logits overflowed: at 1e-40 every positive logit became inf, and the lowest such id
  was sampled, even outside the top k)."""
  if temperature == 0 or 1 / temperature > FLOAT32_MAX:
    return jnp.argmax(logits, axis=-1)
  if top_k:
    kth_best = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth_best, -jnp.inf, logits)
  shifted = logits - jnp.max(logits, axis=-1, keepdims=True)
  # Excluded ids stay -inf: a tiny 1 / temperature can flush to 0, and -inf * 0 is NaN.
  logits = jnp.where(jnp.isneginf(shifted), -jnp.inf, shifted / temperature)
  return jax.random.categorical(rng, logits, axis=-1)


def _forward(params, config: ModelConfig, vocab_limit: int | None, model_state: dict | None):
  """One forward of `tokens` [B, T] through the model with its cache -> (cache, the last
  position's float32 logits [B, V], ids at or above vocab_limit masked).

  No `chimera.layers.Kernels` choice changes this computation: attention over the cache is
  XLA's masked `dot_product_attention` whatever `kernels.attention` says (cuDNN's causal
  mask cannot express queries at an offset), and the embedding's gradient and the loss are
  not computed. Only the compiler options (`Kernels.compiler_options`, XLA:CPU's dots)
  reach decoding, where the caller compiles with them (chimera.bench)."""
  model = Decoder(config)

  def forward(cache, tokens):
    variables = {"params": params, "cache": cache, **(model_state or {})}
    (logits, _), variables = model.apply(variables, tokens, decode=True, mutable=["cache"])
    logits = logits[:, -1].astype(jnp.float32)  # bf16 models sample from float32 logits
    if vocab_limit is not None:
      logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab_limit, logits, -jnp.inf)
    return variables["cache"], logits
  return forward


def _continue(forward, cache, logits, rng, max_new_tokens: int, temperature: float,
              top_k: int) -> tuple[jax.Array, jax.Array]:
  """From the prefill's (cache, logits): `max_new_tokens` sampled tokens, N - 1 forwards
  (the last token's logits are not computed). Returns (tokens [B, N], logits [B, N, V])."""
  def step(carry, step_rng):
    cache, logits = carry
    token = sample_logits(logits, step_rng, temperature, top_k)
    cache, next_logits = forward(cache, token[:, None])
    return (cache, next_logits), (token, logits)

  rngs = jax.random.split(rng, max_new_tokens)
  (_, logits), (tokens, step_logits) = jax.lax.scan(step, (cache, logits), rngs[:-1])
  last = sample_logits(logits, rngs[-1], temperature, top_k)  # no forward after it
  tokens = jnp.concatenate([tokens, last[None]])
  step_logits = jnp.concatenate([step_logits, logits[None]])
  return tokens.T, step_logits.transpose(1, 0, 2)


_STATIC = ("config", "max_new_tokens", "temperature", "top_k", "vocab_limit")


@functools.partial(jax.jit, static_argnames=_STATIC)
def generate(params, prompt: jax.Array, rng: jax.Array, *, config: ModelConfig,
             max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
             vocab_limit: int | None = None,
             model_state: dict | None = None) -> tuple[jax.Array, jax.Array]:
  """Continues prompt [B, P] by `max_new_tokens` tokens with the KV cache: `prefill`, then
  `decode`, in one compiled function.

  Returns (new tokens [B, N], the logits that chose them [B, N, V]). `vocab_limit` masks
  ids at or above it (a vocabulary padded beyond the tokenizer's). `model_state`: the
  TrainState's non-parameter collections (the router bias of aux-loss-free balancing).
  Raises ChimeraError (when traced) if P + N - 1 (the tokens read) exceeds the
  model's max_len.
  """
  check_length(config, prompt.shape[1], max_new_tokens)
  forward = _forward(cast_once(params, config), config, vocab_limit, model_state)
  cache, logits = forward(init_cache(config, prompt.shape[0]), prompt)
  return _continue(forward, cache, logits, rng, max_new_tokens, temperature, top_k)


@functools.partial(jax.jit, static_argnames=("config", "vocab_limit"))
def prefill(params, prompt: jax.Array, *, config: ModelConfig, vocab_limit: int | None = None,
            model_state: dict | None = None):
  """The prompt [B, P] through the model once: (the filled cache, the logits [B, V] that
  choose the first new token). `generate` is this, then `decode`."""
  check_length(config, prompt.shape[1], 1)
  forward = _forward(cast_once(params, config), config, vocab_limit, model_state)
  return forward(init_cache(config, prompt.shape[0]), prompt)


@functools.partial(jax.jit, static_argnames=(*_STATIC, "prompt_length"))
def decode(params, cache, logits: jax.Array, rng: jax.Array, *, config: ModelConfig,
           prompt_length: int, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
           vocab_limit: int | None = None,
           model_state: dict | None = None) -> tuple[jax.Array, jax.Array]:
  """From `prefill`'s (cache, logits) of a prompt of `prompt_length` tokens: the new tokens
  and their logits, as `generate` returns them for the same rng (the bench times the two
  parts apart). Raises ChimeraError (when traced) past the model's max_len, as `generate`
  does: the cache would keep writing its last slot, and the logits would be meaningless."""
  check_length(config, prompt_length, max_new_tokens)
  forward = _forward(cast_once(params, config), config, vocab_limit, model_state)
  return _continue(forward, cache, logits, rng, max_new_tokens, temperature, top_k)


def cast_once(params, config: ModelConfig):
  """The parameters the model casts to its compute dtype at every use (weight matrices,
  embeddings, experts: every float array of 2 or more axes but the float32 routers), cast
  once. Outside the decode loop, the loop then reads them at the compute width, not float32
  with a cast per token; the model computes the same bits from either."""
  dtype = compute_dtype(config)
  def cast(path, p):
    router = any(getattr(key, "key", None) == "router" for key in path)
    floating = jnp.issubdtype(p.dtype, jnp.floating)
    return p.astype(dtype) if floating and p.ndim >= 2 and not router else p
  return jax.tree_util.tree_map_with_path(cast, params)


def check_length(config: ModelConfig, prompt_length: int, max_new_tokens: int) -> None:
  if prompt_length < 1:
    raise ChimeraError("prompt: is empty")
  if max_new_tokens < 1:
    raise ChimeraError(f"max_new_tokens: must be >= 1, got {max_new_tokens}")
  # The last new token is sampled and not fed back: the model reads P + N - 1 positions.
  if prompt_length + max_new_tokens - 1 > config.max_len:
    raise ChimeraError(
        f"prompt: {prompt_length} prompt tokens + max_new_tokens={max_new_tokens} exceed the "
        f"model's context (model.max_len={config.max_len}; the last new token is not read, "
        f"so at most {config.max_len + 1} tokens in all)")


def new_tokens_in_context(prompt_length: int, asked: int | None, context: int,
                          default: int = 200) -> int:
  """The tokens to generate after a prompt, within the context the run trained on: the
  number `asked`, or `default` cut to what fits if None; ChimeraError if none fits. The
  model reads the prompt and every new token but the last, so P + N <= context + 1."""
  room = context + 1 - prompt_length
  if room < 1:
    raise ChimeraError(f"--prompt: {prompt_length} tokens leave no room in the context the "
                       f"run trained on (train.context={context})")
  if asked is None:
    return min(default, room)
  if asked > room:
    raise ChimeraError(f"--max_new_tokens: {prompt_length} prompt tokens + {asked} new tokens "
                       f"exceed the context the run trained on (train.context={context}; "
                       f"positions past it were never trained): at most {room}")
  return asked


def decode_notes(config: ModelConfig) -> list[str]:
  """What a reader of the samples should know about how this config decodes."""
  if (note := causality_note(config)):
    return [note]
  if config.num_experts and config.dispatch == "einsum":
    return [f"decoding routes each new token without capacity limits (no drops); training "
            f"and evaluation drop assignments beyond capacity (capacity_factor="
            f"{config.capacity_factor}, eval_capacity_factor={config.eval_capacity_factor}), "
            f"so the samples come from the model without drops"]
  return []


def define_flags() -> None:
  """Command-line flags, defined only when this runs as a program: chimera.bench imports
  this module, and its flags must not become every bench-importing tool's."""
  flags.DEFINE_string("workdir", None, "A run directory with checkpoints/.")
  flags.DEFINE_string("prompt", "\n", "Text to continue.")
  flags.DEFINE_integer("max_new_tokens", None, "Tokens to generate (default: 200, or up to "
                       "the end of the context the run trained on if that comes sooner).")
  flags.DEFINE_float("temperature", 0.8, "Sampling temperature; 0 is greedy.")
  flags.DEFINE_integer("top_k", 40, "Sample among the k likeliest tokens; 0 for all.")
  flags.DEFINE_integer("seed", 0, "Sampling seed.")
  flags.DEFINE_integer("step", None, "The checkpoint to sample (default: the latest).")


def main(argv):
  del argv
  FLAGS = flags.FLAGS
  logging.set_verbosity(logging.WARNING)
  from chimera.data.tokenizers import get_tokenizer
  from chimera.evaluate import restore_state, run_config
  from chimera.layers import Kernels
  try:
    compile_cache.enable()  # in the try: a $CHIMERA_CACHE that cannot be a folder is one line
    if not FLAGS.workdir:
      raise ChimeraError("--workdir is required")
    if FLAGS.max_new_tokens is not None and FLAGS.max_new_tokens < 1:
      raise ChimeraError(f"--max_new_tokens: must be >= 1, got {FLAGS.max_new_tokens}")
    if not (math.isfinite(FLAGS.temperature) and 0 <= FLAGS.temperature <= FLOAT32_MAX):
      raise ChimeraError(f"--temperature: must be >= 0 (0 is greedy) and a float32, got "
                         f"{FLAGS.temperature}")
    if not 0 <= FLAGS.seed < 2**32:  # jax.random.key keeps the low 32 bits
      raise ChimeraError(f"--seed: must be in [0, {2**32 - 1}], got {FLAGS.seed}")
    # The flags are checked against the run's config before the checkpoint is restored
    # (restoring compiles the state's initialisation).
    config, step, config_path = run_config(FLAGS.workdir, FLAGS.step)
    tokenizer = get_tokenizer(config.data.tokenizer)
    if not 0 <= FLAGS.top_k <= tokenizer.vocab_size:
      raise ChimeraError(f"--top_k: must be in [0, {tokenizer.vocab_size}] (the tokenizer's "
                         f"vocabulary; 0 for all), got {FLAGS.top_k}")
    try:
      FLAGS.prompt.encode("utf-8")
    except UnicodeEncodeError:  # bytes the shell passed that are not UTF-8
      raise ChimeraError("--prompt: not valid UTF-8") from None
    prompt = tokenizer.encode(FLAGS.prompt)
    if len(prompt) == 0:
      raise ChimeraError("--prompt: is empty (the model continues a prompt of at least one "
                         "token)")
    max_new_tokens = new_tokens_in_context(len(prompt), FLAGS.max_new_tokens,
                                           config.train.context)
    state = restore_state(FLAGS.workdir, config, step, config_path)
    for note in decode_notes(config.model):
      print(f"note: {note}", file=sys.stderr)
    args = (state.params, jnp.asarray(prompt)[None], jax.random.key(FLAGS.seed))
    decode = generate.lower(*args, config=config.model, max_new_tokens=max_new_tokens,
                            temperature=FLAGS.temperature, top_k=FLAGS.top_k,
                            vocab_limit=tokenizer.vocab_size, model_state=state.model_state)
    tokens, _ = decode.compile(Kernels().compiler_options())(*args, model_state=state.model_state)
  except ChimeraError as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)
  # A terminal that cannot show a character (PYTHONIOENCODING=ascii, say) gets "?" for it.
  sys.stdout.reconfigure(errors="replace")
  print(FLAGS.prompt + tokenizer.decode(np.asarray(tokens[0])))


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=parse_flags)
