"""Decoder building blocks: the token embedding and tied head, norms, rotary positions,
causal attention with a KV cache, the MLP, and the cross-entropy of the logits.

Shape letters: B batch, L length (queries), T length (keys), M model dim, N heads,
D head dim, F hidden dim, V vocab, R rows (B*L token positions).
"""

import dataclasses
import functools
import math
from typing import Callable, Literal, get_args

import flax.linen as nn
import jax
import jax.numpy as jnp

from chimera import sharding
from chimera.config import ModelConfig
from chimera.errors import ChimeraError


def compute_dtype(config: ModelConfig):
  return jnp.bfloat16 if config.dtype == "bfloat16" else jnp.float32


def dense_init(config: ModelConfig, residual: bool = False):
  """Normal(0, init_std); projections back into the residual stream are scaled down by
  sqrt(2 * num_layers), as in GPT-2, so the stream's variance does not grow with depth."""
  std = config.init_std / math.sqrt(2 * config.num_layers) if residual else config.init_std
  return nn.initializers.normal(std)


def make_norm(config: ModelConfig, name: str) -> nn.Module:
  if config.norm == "rmsnorm":
    return nn.RMSNorm(dtype=jnp.float32, name=name)
  return nn.LayerNorm(use_bias=config.use_bias, dtype=jnp.float32, name=name)


# How the embedding's gradient is summed into the table [V, M] (all give the same sums):
# "onehot": one_hot(ids)^T @ cotangent, a matmul (2*R*V*M FLOPs; under data parallelism
# each device multiplies its own rows, and the [V, M] sums are all-reduced like any
# gradient); "sorted": sort the rows by id, a segmented prefix sum, then a gather per
# vocab entry (no FLOPs to speak of, but a sharded batch is gathered onto every device
# first); "scatter": autodiff's scatter-add, whose colliding updates serialised on an H100
# when ids repeat (real text is Zipfian: 57 of 95 ms of a gpu-preset step, issue 11).
# Default "sorted": on an H200 its step was 0.75x onehot's and equal to scatter's
# (docs/performance.md). Under data parallelism "onehot" avoids gathering the batch.
EmbedGrad = Literal["onehot", "sorted", "scatter"]
# "auto": cuDNN flash attention on GPU for bf16/fp16 (when cuDNN takes the shape), XLA's
# dot_product_attention elsewhere; "einsum": the plain einsum path (also used whenever
# attention dropout is on, which jax.nn.dot_product_attention does not do).
AttentionKernel = Literal["auto", "xla", "cudnn", "einsum"]
# The cross-entropy's logsumexp over the vocabulary. "two_pass": a max, then a sum of
# exponentials (two reads of the [B, L, V] logits, the two biggest reductions of a
# gpu-preset step: 1.1 and 1.3 ms of 30 ms on an H100); "one_pass": one variadic reduction
# that carries (running max, sum of exp(x - max)) and rescales the sum when the max moves
# (the online softmax's normaliser): one read of the logits, two exponentials per element.
# Default "two_pass": the one H100 run of `chimera.main` with "one_pass" (1,172,827 tok/s,
# dense gpu preset) did not beat the one with "two_pass" (1,178,525), each on its own
# machine; the side-by-side bench (launch/gpu_check.sh's "loss" stage) is still to run.
# "one_pass" is also less precise on XLA:CPU: up to 7.9e-5 from a float64 logsumexp over
# 50,304 logits, against 9.7e-7 for "two_pass" (results/cpu-experiments/cross-entropy/).
CrossEntropyKernel = Literal["two_pass", "one_pass"]
# How XLA:CPU computes matrix products (no effect on GPUs). "eigen": every dot through
# Eigen, XLA:CPU's own matmul kernels; "xla": the installed jaxlib's choice, which in jaxlib
# 0.10.2 hands most dots to YNNPACK (fusions of kind __ynn_fusion) and the rest to Eigen.
# Default "eigen": on a 2-core AMD EPYC (AVX-512) the default preset's dense step took
# 0.522 against 0.557 s and moe_top2's 0.707 against 0.783 s, the small preset's moe_top2
# 0.303 against 0.375 s (one bench run each; docs/performance.md, "Dots on the CPU").
# A jaxlib without the option compiles both choices its own way.
CpuDots = Literal["eigen", "xla"]


@dataclasses.dataclass(frozen=True)
class Kernels:
  """Which implementation computes a layer's math. Every choice gives the same numbers up
  to rounding, so this is not part of the model config. `python -m chimera.bench
  --variants=kernels.embed_grad=onehot,sorted` compares them; docs/performance.md has the
  measurements behind the defaults."""

  embed_grad: EmbedGrad = "sorted"
  attention: AttentionKernel = "auto"
  cross_entropy: CrossEntropyKernel = "two_pass"
  cpu_dots: CpuDots = "eigen"

  def __post_init__(self):
    for field in dataclasses.fields(self):
      check_kernel(field.name, getattr(self, field.name))

  def compiler_options(self) -> dict[str, str] | None:
    """What these choices ask of XLA, for `jax.jit(..., compiler_options=...)`: the dots
    taken back from YNNPACK on the CPU with "eigen"; None when there is nothing to ask."""
    if self.cpu_dots == "eigen" and jax.default_backend() == "cpu" and _cpu_takes(_YNN_TYPES):
      return {_YNN_TYPES: ""}  # no fusion type handed to YNNPACK
    return None


_YNN_TYPES = "xla_cpu_experimental_ynn_fusion_type"


@functools.cache
def _cpu_takes(option: str) -> bool:
  """Whether this jaxlib's CPU compiler knows `option` (an unknown one fails the compile)."""
  try:
    jax.jit(lambda x: x + 1, compiler_options={option: ""}).lower(jnp.float32(0)).compile()
  except jax.errors.JaxRuntimeError:
    return False
  return True


def check_kernel(field: str, value: str) -> None:
  """A one-line ChimeraError unless `value` is one of the choices of Kernels.`field`."""
  allowed = get_args(Kernels.__annotations__[field])
  if value not in allowed:
    raise ChimeraError(f"kernels.{field}: expected one of {allowed}, got {value!r}")


def _onehot_rows_grad(ids: jax.Array, cotangent: jax.Array, vocab_size: int) -> jax.Array:
  """ids [R], cotangent [R, M] -> [V, M] float32: one_hot(ids)^T @ cotangent."""
  one_hot = jax.nn.one_hot(ids, vocab_size, dtype=cotangent.dtype)  # [R, V]
  return jnp.einsum("rv,rm->vm", one_hot, cotangent, preferred_element_type=jnp.float32)


def _sorted_rows_grad(ids: jax.Array, cotangent: jax.Array, vocab_size: int) -> jax.Array:
  """ids [R], cotangent [R, M] -> [V, M] float32, with no scatter: the rows sorted by id,
  a prefix sum that restarts at each new id, and each id's total read at its last row."""
  order = jnp.argsort(ids)
  sorted_ids = ids[order]  # [R]
  rows = cotangent[order].astype(jnp.float32)  # [R, M]
  starts = jnp.concatenate([jnp.ones((1,), bool), sorted_ids[1:] != sorted_ids[:-1]])

  def add_within_run(left, right):  # associative: a run start on the right resets the sum
    (left_start, left_sum), (right_start, right_sum) = left, right
    return left_start | right_start, jnp.where(right_start[:, None], right_sum,
                                               left_sum + right_sum)

  _, run_sums = jax.lax.associative_scan(add_within_run, (starts, rows))  # [R, M]
  vocab = jnp.arange(vocab_size, dtype=sorted_ids.dtype)
  # Unrolled: a binary search of log2(R) fused steps, not a loop that syncs with the host.
  first = jnp.searchsorted(sorted_ids, vocab, side="left", method="scan_unrolled")  # [V]
  end = jnp.searchsorted(sorted_ids, vocab, side="right", method="scan_unrolled")  # [V]
  return jnp.where((end > first)[:, None], run_sums[jnp.maximum(end - 1, 0)], 0.0)


_ROWS_GRAD = {"onehot": _onehot_rows_grad, "sorted": _sorted_rows_grad}


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _lookup(table: jax.Array, ids: jax.Array, embed_grad: EmbedGrad) -> jax.Array:
  return jnp.take(table, ids, axis=0)


def _lookup_fwd(table, ids, embed_grad):
  return jnp.take(table, ids, axis=0), (ids, jnp.zeros((0,) + table.shape, table.dtype))


def _lookup_bwd(embed_grad, residuals, cotangent):
  ids, empty_table = residuals  # the table's shape and dtype, without its values
  vocab_size, features = empty_table.shape[1:]
  rows_grad = lambda ids, cotangent: _ROWS_GRAD[embed_grad](
      ids.reshape(-1), cotangent.reshape(-1, features), vocab_size)
  # Per device, then summed: sorted over the global batch, the ids would be all-gathered.
  grad = sharding.sum_over_batch(rows_grad, ids, cotangent)
  return grad.astype(empty_table.dtype), None


_lookup.defvjp(_lookup_fwd, _lookup_bwd)


def embed_lookup(table: jax.Array, ids: jax.Array, embed_grad: EmbedGrad = "sorted") -> jax.Array:
  """table [V, M], ids [...] integer -> rows [..., M] in the table's dtype; the gradient
  with respect to the table is summed as `embed_grad` says. Ids are compared as int32: in a
  narrower type (uint8 bytes) ids past its range would wrap onto small ones."""
  ids = jnp.asarray(ids).astype(jnp.int32)
  if embed_grad == "scatter":
    return jnp.take(table, ids, axis=0)
  return _lookup(table, ids, embed_grad)


class Embed(nn.Module):
  """The token embedding table [V, M] ("embedding", float32), looked up by id and reused,
  transposed, as the output head (`attend`). Params as flax's nn.Embed."""

  num_embeddings: int
  features: int
  dtype: jnp.dtype = jnp.float32  # compute dtype of the looked-up rows and the head
  embedding_init: Callable = nn.initializers.normal(0.02)
  embed_grad: EmbedGrad = "sorted"

  def setup(self):
    self.embedding = self.param("embedding", self.embedding_init,
                                (self.num_embeddings, self.features), jnp.float32)

  def __call__(self, ids: jax.Array) -> jax.Array:
    """ids [B, L] -> [B, L, M] in `dtype`."""
    return embed_lookup(self.embedding, ids, self.embed_grad).astype(self.dtype)

  def attend(self, x: jax.Array) -> jax.Array:
    """x [..., M] -> logits [..., V] in `dtype` (accumulated in float32 by the matmul)."""
    return jnp.einsum("...m,vm->...v", x.astype(self.dtype), self.embedding.astype(self.dtype))


def cross_entropy(logits: jax.Array, targets: jax.Array,
                  kernel: CrossEntropyKernel = "two_pass") -> jax.Array:
  """logits [..., V] (any float dtype), targets [...] integer -> [...] float32.

  logsumexp(logits) - logits[target], computed in float32 inside fused reductions (in one
  or two reads of the logits, as `kernel` says), so bfloat16 logits are never copied out as
  float32; the backward pass is one elementwise pass, softmax - one_hot, written in the
  logits' dtype.
  """
  check_kernel("cross_entropy", kernel)
  with jax.named_scope("cross_entropy"):  # int32 targets: a narrower type wraps in one_hot
    return _cross_entropy(logits, jnp.asarray(targets).astype(jnp.int32), kernel)


def _add_scaled_exp(left, right):
  """Combines two (max m, sum of exp(x - m)) pairs. A sum whose max is the new max is
  kept as it is, so -inf maxima (the identity (-inf, 0), masked logits) never compute
  exp(-inf - -inf)."""
  (left_max, left_sum), (right_max, right_sum) = left, right
  new_max = jnp.maximum(left_max, right_max)
  rescale = lambda m, s: jnp.where(m == new_max, s, s * jnp.exp(m - new_max))
  return new_max, rescale(left_max, left_sum) + rescale(right_max, right_sum)


def logsumexp_one_pass(x: jax.Array) -> jax.Array:
  """logsumexp over the last axis, in float32, reading x once: a variadic reduction of
  the pairs (x, 1) under `_add_scaled_exp`."""
  x = x.astype(jnp.float32)
  init = (jnp.float32(-jnp.inf), jnp.float32(0.0))
  top, total = jax.lax.reduce((x, jnp.ones_like(x)), init, _add_scaled_exp, (x.ndim - 1,))
  return top + jnp.log(total)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _cross_entropy(logits, targets, kernel):
  return _cross_entropy_fwd(logits, targets, kernel)[0]


def _cross_entropy_fwd(logits, targets, kernel):
  if kernel == "one_pass":
    log_normalizer = logsumexp_one_pass(logits)  # [...]
  else:
    log_normalizer = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return log_normalizer - target_logit.astype(jnp.float32), (logits, targets, log_normalizer)


def _cross_entropy_bwd(kernel, residuals, cotangent):
  del kernel
  logits, targets, log_normalizer = residuals
  probs = jnp.exp(logits.astype(jnp.float32) - log_normalizer[..., None])  # [..., V]
  one_hot = jax.nn.one_hot(targets, logits.shape[-1], dtype=jnp.float32)
  return ((probs - one_hot) * cotangent[..., None]).astype(logits.dtype), None


_cross_entropy.defvjp(_cross_entropy_fwd, _cross_entropy_bwd)


def apply_rotary(x: jax.Array, positions: jax.Array) -> jax.Array:
  """Rotary position embedding (RoFormer), rotating channel pairs (i, i + D/2).

  x: [..., D]; positions: integer, broadcastable to x's shape without D (e.g. [L] for
  x [B, N, L, D], [L, 1] for x [B, L, N, D]). Returns x rotated, in x's dtype.
  """
  half = x.shape[-1] // 2
  inv_freq = 1.0 / (10_000 ** (jnp.arange(half, dtype=jnp.float32) / half))
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [..., D/2]
  sin, cos = jnp.sin(angles), jnp.cos(angles)  # broadcast over x's other axes
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x.dtype)


def einsum_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                     dropout: Callable[[jax.Array], jax.Array] = lambda weights: weights
                     ) -> jax.Array:
  """Softmax attention written out. q [B, L, N, D], k and v [B, T, N, D], mask [L, T]
  (True where query l may read key t), `dropout` applied to the weights -> [B, L, N, D]."""
  scores = jnp.einsum("blnd,btnd->bnlt", q, k, preferred_element_type=jnp.float32)
  scores = jnp.where(mask, scores / math.sqrt(q.shape[-1]), jnp.finfo(jnp.float32).min)
  weights = dropout(jax.nn.softmax(scores, axis=-1).astype(v.dtype))
  return jnp.einsum("bnlt,btnd->blnd", weights, v)


def _dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                           kernel: AttentionKernel) -> jax.Array:
  """Causal attention through jax.nn.dot_product_attention: q, k, v [B, L, N, D]."""
  if kernel == "auto":
    cudnn_fits = (jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
                  and q.shape[-1] % 8 == 0 and q.shape[-1] <= 128)
    if cudnn_fits:
      try:
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
      except (ValueError, NotImplementedError, RuntimeError):
        pass  # a cuDNN that rejects the shape: XLA's implementation below
    kernel = "xla"
  try:
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=kernel)
  except (ValueError, NotImplementedError, RuntimeError) as error:
    if kernel != "cudnn":
      raise
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0].rstrip(".")
    raise ChimeraError(f"kernels.attention: 'cudnn' cannot run here ({reason}); 'auto' uses "
                       f"cuDNN where it fits and XLA elsewhere") from None


class CausalSelfAttention(nn.Module):
  """Multi-head causal self-attention.

  With `decode=True` it keeps a static-shape key/value cache of `max_len` positions in
  the "cache" collection: initialise it by calling once with an input of the full
  decode shape, then feed tokens a few at a time.
  """

  config: ModelConfig
  kernel: AttentionKernel = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, *, deterministic: bool, decode: bool = False) -> jax.Array:
    # x: [B, L, M]
    cfg = self.config
    dtype = compute_dtype(cfg)
    batch, length, _ = x.shape
    # Projections act on [B*L, M]: XLA:CPU runs 2-D matmuls (and their gradients) faster.
    qkv = nn.Dense(3 * cfg.d_model, use_bias=cfg.use_bias, dtype=dtype,
                   kernel_init=dense_init(cfg), name="qkv")(x.reshape(-1, cfg.d_model))
    qkv = qkv.reshape(batch, length, 3, cfg.num_heads, cfg.head_dim)
    # each [B, L, N, D]: dot_product_attention's layout, and the cache's
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]

    start, cache_ready = jnp.zeros((), jnp.int32), False
    if decode:
      cache_ready = self.has_variable("cache", "key")
      cache_shape = (batch, cfg.max_len, cfg.num_heads, cfg.head_dim)
      cached_key = self.variable("cache", "key", jnp.zeros, cache_shape, dtype)
      cached_value = self.variable("cache", "value", jnp.zeros, cache_shape, dtype)
      index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
      if cache_ready:
        start = index.value
    positions = start + jnp.arange(length)  # [L]
    if cfg.positions == "rotary":
      q, k = apply_rotary(q, positions[:, None]), apply_rotary(k, positions[:, None])

    attention_dropout = cfg.dropout > 0 and not deterministic
    if decode and cache_ready:
      k = jax.lax.dynamic_update_slice(cached_key.value, k.astype(dtype), (0, start, 0, 0))
      v = jax.lax.dynamic_update_slice(cached_value.value, v.astype(dtype), (0, start, 0, 0))
      cached_key.value, cached_value.value = k, v
      index.value = start + length
      # The queries sit at `positions`, the cache's keys at 0..max_len-1: a mask by
      # position, which cuDNN's causal mask (query i sees keys <= i) does not express.
      mask = jnp.arange(cfg.max_len)[None, :] <= positions[:, None]  # [L, T]
      out = jax.nn.dot_product_attention(q, k, v, mask=mask[None, None], implementation="xla")
    elif attention_dropout or self.kernel == "einsum":
      # jax.nn.dot_product_attention has no dropout on the attention weights.
      causal = jnp.tril(jnp.ones((length, length), bool))  # [L, T=L]
      out = einsum_attention(q, k, v, causal, functools.partial(
          nn.Dropout(cfg.dropout), deterministic=deterministic))
    else:
      out = _dot_product_attention(q, k, v, self.kernel)
    out = nn.Dense(cfg.d_model, use_bias=cfg.use_bias, dtype=dtype,
                   kernel_init=dense_init(cfg, residual=True), name="out")(
                       out.reshape(-1, cfg.d_model))  # [B*L, N*D]
    return out.reshape(batch, length, cfg.d_model)


class Mlp(nn.Module):
  """The dense feed-forward sublayer: GELU MLP or SwiGLU. x: [B, L, M] -> [B, L, M]."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    dense = lambda features, name, residual=False: nn.Dense(
        features, use_bias=cfg.use_bias, dtype=compute_dtype(cfg),
        kernel_init=dense_init(cfg, residual), name=name)
    shape = x.shape
    x = x.reshape(-1, shape[-1])  # [B*L, M]: 2-D matmuls are faster on XLA:CPU
    if cfg.activation == "swiglu":
      h = nn.silu(dense(cfg.d_ff, "wi_gate")(x)) * dense(cfg.d_ff, "wi_up")(x)
    else:
      h = nn.gelu(dense(cfg.d_ff, "wi")(x))
    return dense(cfg.d_model, "wo", residual=True)(h).reshape(shape)
