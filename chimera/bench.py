"""Speed, MFU and memory of each config, measured in one process, on the tokens training sees.

  python -m chimera.bench [--configs=configs/dense.py,configs/moe_top2.py] [--repeats=5]
      [--json=FILE] [--set=model.group_size=128] [--variants=model.dispatch=einsum,dropless]
      [--random_ids] [--decode_batches=1,8] [--profile]

For each config (default preset unless `path:preset` is given):
- train step: median seconds per step after warm-up, and tokens/s, on batches drawn from
  the config's own corpus with its tokenizer, as training draws them. Real text repeats
  ids (Zipf), and the embedding's gradient is slow on GPU when they collide, so uniform
  random ids (`--random_ids`) flatter the step;
- MFU: model FLOPs/s (chimera.accounting) over the device's nominal dense peak for the
  compute dtype (`NOMINAL_PEAK_FLOPS`), and beside it over the matmul peak the bench
  measures itself. A device missing from the table falls back to the measured peak, and
  the record says which one it used (`peak_source`);
- dispatch share (MoE): the MoE layer's forward+backward timed with and without its
  expert matmuls; the difference is the experts, the rest routing, dispatch and combine;
- decode: tokens/s and ms/token with the KV cache at each batch size, per new token after
  the prefill, and the prefill's own time (the two compiled and timed apart); the prompt
  and the new tokens are cut to fit the model's max_len, and the record keeps the lengths.
  Decoding attends over its cache through XLA's masked attention whatever
  `kernels.attention` says: of a `kernels.*` variant, only `kernels.cpu_dots` changes it;
- memory: XLA's own accounting of the compiled train step (arguments + outputs +
  temporaries - aliased), per config, and, where the backend reports it, the device's peak
  over the whole process (every config's buffers together), printed once;
- with `--profile`: where the step's time goes, by model part and pass, from a
  jax.profiler trace (chimera.bench_profile), and where decoding's goes at the largest
  decode batch, per new token after the prefill.
The configs are interleaved and repeated, so a comparison holds while the machine's speed
drifts; every figure is a median over repeats.

`--variants=KEY=v1,v2` measures each config once per value. KEY is a config field
(`model.dispatch`), a field of `chimera.layers.Kernels` (`kernels.embed_grad`), or `ids`
(`corpus`, `random`). Several `--variants` add their rows together; a row that is the
same case as an earlier one is measured once, and a dense config measures a field only
an MoE reads (`chimera.config.MOE_ONLY`, e.g. `model.dispatch`) once, under its own name.
"""

import dataclasses
import functools
import json
import re
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from chimera import accounting, allocator, bench_profile, config as config_lib, generate
from chimera.config import Config, DataConfig, MeshConfig
from chimera.data import load_splits
from chimera.data.batches import WindowSampler
from chimera.data.corpora import write_atomic
from chimera.data.tokenizers import get_tokenizer
from chimera.decoder import Decoder
from chimera.errors import (ChimeraError, check_writable, out_of_memory_is_one_line, parse_flags,
                            tool_main)
from chimera.layers import Kernels
from chimera.moe import MoeLayer
from chimera.steps import init_state, train_step

# Dense (no sparsity) peak matmul FLOP/s by the name in jax's `device_kind`, matched as
# whole words ("A100" is not "RTX A1000"); the first match wins, so a name that contains
# another comes before it. Columns: bfloat16, float32. The float32 figure of an NVIDIA
# part is its TF32 tensor-core peak, which XLA uses for float32 matmuls at jax's default
# precision; None where no peak is known. The NVL parts run at lower clocks than the SXM
# ones and are left unknown (None for both): the bench then divides by its measured peak
# and says so, rather than by the SXM figure.
NOMINAL_PEAK_FLOPS = (
    ("H100 PCIe", 756e12, 378e12),
    ("H100 NVL", None, None),
    ("H200 NVL", None, None),
    ("H100", 989e12, 494.7e12),  # SXM ("NVIDIA H100 80GB HBM3")
    ("GH200", 989e12, 494.7e12),
    ("H200", 989e12, 494.7e12),
    ("A100", 312e12, 156e12),
    ("L40S", 362e12, 183e12),
    ("L40", 181e12, 90.5e12),
    ("L4", 121e12, 60e12),
    ("RTX 4090", 165e12, 82.6e12),
    ("TPU v4", 275e12, None),
    ("TPU v5 lite", 197e12, None),
    ("TPU v5p", 459e12, None),
    ("TPU v5", 459e12, None),  # v5p, as some jax versions name it
    ("TPU v6 lite", 918e12, None),
)


def nominal_peak_flops(device_kind: str, dtype: str) -> float | None:
  """The table's peak for this device and compute dtype ("bfloat16" or "float32")."""
  for name, bf16, f32 in NOMINAL_PEAK_FLOPS:
    if re.search(rf"(?<![A-Za-z0-9]){re.escape(name)}(?![A-Za-z0-9])", device_kind):
      return bf16 if dtype == "bfloat16" else f32
  return None


def moe_split_shape(config) -> tuple[int, int, int]:
  """The activations [B / grad_accum, L, M] one MoE layer sees in one training micro-batch:
  what the bench's MoE split times, once per layer and micro-batch of a step."""
  t = config.train
  return (t.batch_size // t.grad_accum, t.context, config.model.d_model)


def _timed(fn, *args) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - start


def peak_matmul_flops(dtype, repeats: int = 10) -> float:
  """Measured FLOP/s of square matmuls in `dtype` on the default device: the best median
  over a few sizes, since the fastest size differs between CPUs and GPUs. Dots as the
  default Kernels compute them."""
  sizes = (4096, 8192) if jax.default_backend() == "gpu" else (512, 1024, 2048)
  best = 0.0
  for size in sizes:
    a = jax.random.normal(jax.random.key(size), (size, size), dtype)  # not constant: real power
    matmul = jax.jit(lambda x, y: x @ y, compiler_options=Kernels().compiler_options())
    matmul(a, a).block_until_ready()
    best = max(best, 2 * size ** 3 / np.median([_timed(matmul, a, a) for _ in range(repeats)]))
  return best


def device_peak_memory() -> int | None:
  stats = jax.local_devices()[0].memory_stats()
  return stats.get("peak_bytes_in_use") if stats else None


@functools.cache
def _train_stream(data: DataConfig, vocab_size: int) -> np.ndarray:
  """The training split of a corpus, as chimera.train reads it (the token cache)."""
  tokenizer = get_tokenizer(data.tokenizer)
  if tokenizer.vocab_size > vocab_size:
    raise ChimeraError(f"config.model.vocab_size={vocab_size} is smaller than tokenizer "
                       f"'{data.tokenizer}', which has {tokenizer.vocab_size} tokens")
  return load_splits(data.corpus, tokenizer, split=data.split, val_fraction=data.val_fraction,
                     text_field=data.text_field).train


def token_batches(config: Config, count: int, random_ids: bool) -> np.ndarray:
  """`count` training batches [count, A, B/A, context + 1] int32 (A accumulation steps):
  windows of the config's corpus drawn by training's sampler, or uniform random ids."""
  t, d = config.train, config.data
  shape = (t.grad_accum, t.batch_size // t.grad_accum, t.context + 1)
  if random_ids:
    rng = np.random.default_rng(0)
    return rng.integers(0, config.model.vocab_size, (count, *shape)).astype(np.int32)
  stream = _train_stream(d, config.model.vocab_size)
  sampler = WindowSampler(stream, batch_size=t.batch_size, window=t.context + 1, seed=d.seed)
  return np.stack([sampler.next().reshape(shape) for _ in range(count)])


@dataclasses.dataclass(frozen=True)
class Settings:
  steps: int = 10  # timed train steps per repeat
  prompt_len: int = 64  # decode lengths, cut to fit each model's max_len (`decode_lengths`)
  new_tokens: int = 256
  decode_batches: tuple[int, ...] = (1, 8)  # () skips decoding
  batches: int = 4  # distinct token batches the timed steps cycle through
  moe_split: bool = True  # time the MoE layer with and without its experts (dispatch share)
  profile: bool = False  # trace `steps` steps after the measurements (chimera.bench_profile)
  profile_dir: str | None = None  # keep each profiled config's trace and HLO here


def decode_lengths(settings: Settings, max_len: int) -> tuple[int, int]:
  """(prompt length, new tokens) within max_len: the prompt at most half of it, and at
  least 2 new tokens (one decode step to time after the prefill)."""
  prompt = min(settings.prompt_len, max_len // 2)
  new_tokens = min(settings.new_tokens, max_len - prompt)
  if new_tokens < 2:
    raise ChimeraError(f"decode: {new_tokens} new token(s) after a prompt of {prompt} in "
                       f"model.max_len={max_len}: at least 2 are needed to time decoding "
                       f"(--new_tokens, or --decode_batches= to skip it)")
  return prompt, new_tokens


@dataclasses.dataclass(frozen=True)
class Case:
  """One row of the bench: a config, and how to run it."""

  name: str  # what the row is called
  spec: str  # the config file[:preset] it was loaded from
  config: Config
  overrides: dict = dataclasses.field(default_factory=dict)  # applied to spec: "section.field" -> value
  kernels: Kernels = Kernels()
  random_ids: bool = False


@dataclasses.dataclass(frozen=True)
class DecodeSpeed:
  """Decoding at one batch size. tokens_per_second and ms_per_token are per new token
  after the prefill: the median time of `generate.decode` (new_tokens - 1 forwards of one
  token, new_tokens samples) over new_tokens - 1; prefill_ms is `generate.prefill`'s
  median. Records written before 2026-11-28 (no prefill_ms) divided one whole generate
  call, prefill included, by new_tokens."""
  batch: int
  prompt_len: int
  new_tokens: int
  tokens_per_second: float
  ms_per_token: float
  prefill_ms: float | None = None  # the prompt's forward and the first token


@dataclasses.dataclass(frozen=True)
class BenchRecord:
  """One case's figures: what `--json` writes, one per row. Written and read here only."""

  name: str
  spec: str
  overrides: dict
  kernels: dict  # chimera.layers.Kernels, field by field
  token_ids: str  # "corpus:<corpus>/<tokenizer>" or "random"
  device: str  # jax device_kind
  jax_version: str
  params_total: int
  params_active: int
  flops_per_token: int
  train_step_seconds: float
  train_tokens_per_second: float
  mfu: float  # model FLOPs/s over peak_flops
  peak_flops: float  # nominal where the device is in NOMINAL_PEAK_FLOPS, else measured
  peak_source: str  # "nominal" or "measured"
  measured_peak_flops: float  # the square-matmul peak this process measured
  mfu_vs_measured_peak: float
  peak_memory_bytes: int | None  # XLA's accounting of the compiled train step
  # The device's peak over the whole bench process, where every case's buffers were alive
  # together: the same for every record of a run, not this case's (None on a CPU).
  process_peak_memory_bytes: int | None
  decode: tuple[DecodeSpeed, ...] = ()
  dtype: str | None = None  # model.dtype, which picks the peaks; None in older records
  dispatch_share_of_moe_layer: float | None = None  # MoE only, with Settings.moe_split
  dispatch_share_of_step: float | None = None
  profile: dict | None = None  # chimera.bench_profile.summarize, with Settings.profile
  # The same for decoding at the largest decode batch, per new token after the prefill,
  # with Settings.profile and decode batches.
  decode_profile: dict | None = None

  def decode_speed(self, batch: int) -> DecodeSpeed | None:
    return next((d for d in self.decode if d.batch == batch), None)

  def to_json(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, values: dict) -> "BenchRecord":
    values = dict(values)
    values["decode"] = tuple(DecodeSpeed(**d) for d in values["decode"])
    if "device_peak_memory_bytes" in values:  # its name before 2026-11-28
      values["process_peak_memory_bytes"] = values.pop("device_peak_memory_bytes")
    return cls(**values)


def save_records(path: str | Path, records: list[BenchRecord]) -> None:
  write_atomic(Path(path), json.dumps([r.to_json() for r in records], indent=2).encode())


def load_records(path: str | Path) -> list[BenchRecord]:
  return [BenchRecord.from_json(values) for values in json.loads(Path(path).read_text())]


class Subject:
  """One case and its compiled functions, measured a slice at a time."""

  def __init__(self, case: Case, settings: Settings, batches: np.ndarray):
    """`batches`: the case's `token_batches`, read before anything compiles (`run`)."""
    self.case, self.settings, self.times = case, settings, {}
    c = case.config
    # The bench's step runs on one device, whatever mesh the config names.
    self.accounting = accounting.count_run(dataclasses.replace(c, mesh=MeshConfig(1, 1)))
    self.state = init_state(c)
    step = jax.jit(functools.partial(train_step, model=Decoder(c.model, case.kernels),
                                     config=c.model, log_norms=c.train.log_norms),
                   donate_argnums=0, compiler_options=case.kernels.compiler_options())
    self.batches = [jax.device_put(b) for b in batches]
    self.rng = jax.random.key(0)
    self.step = step.lower(self.state, self.batches[0], self.rng).compile()
    memory = self.step.memory_analysis()
    self.compiled_memory = None if memory is None else int(
        memory.argument_size_in_bytes + memory.output_size_in_bytes
        + memory.temp_size_in_bytes - memory.alias_size_in_bytes)
    self.prompt_len, self.new_tokens = decode_lengths(settings, c.model.max_len)
    # Prompts from the same tokens as training: [B, P] for each decode batch size.
    rows = batches.reshape(-1, batches.shape[-1])[:, :self.prompt_len]
    self.prompts = {b: jnp.asarray(np.resize(rows, (b, self.prompt_len)))
                    for b in settings.decode_batches}
    # Decoding in its two parts (generate is the one, then the other), each compiled once
    # per batch size like the train step: timed apart, and the second profiled from its
    # HLO. The prefill's cache and logits are the decoder's input. The state's other
    # collections (the router bias) go in too, as generate.main does. Of a kernels.*
    # variant only its compiler options reach decoding (chimera.generate._forward).
    options, state = case.kernels.compiler_options(), self.state
    self.prefills, self.prefilled, self.decoders = {}, {}, {}
    for b, prompt in self.prompts.items():
      self.prefills[b] = generate.prefill.lower(
          state.params, prompt, config=c.model, model_state=state.model_state).compile(options)
      cache, logits = self.prefilled[b] = self.prefills[b](state.params, prompt,
                                                          model_state=state.model_state)
      self.decoders[b] = generate.decode.lower(
          state.params, cache, logits, jax.random.key(0), config=c.model,
          prompt_length=self.prompt_len, max_new_tokens=self.new_tokens, temperature=1.0,
          model_state=state.model_state).compile(options)
    self.moe_layer = self._moe_layer_fns() if c.model.num_experts and settings.moe_split else None
    self.measure(warmup=True)

  def _moe_layer_fns(self):
    """Forward+backward of one MoE layer on a training micro-batch (the step runs
    train.grad_accum of them), with and without experts."""
    c = self.case.config
    x = jax.random.normal(jax.random.key(1), moe_split_shape(c)).astype(jnp.float32)
    fns = []
    for skip in (False, True):
      layer = MoeLayer(c.model, skip_experts=skip)
      params = layer.init(jax.random.key(0), x, deterministic=True)
      loss = lambda p, x, layer=layer: layer.apply(p, x, deterministic=False,
                                                   rngs={"dropout": jax.random.key(0)})[0].sum()
      fns.append((jax.jit(jax.grad(loss, argnums=(0, 1)),
                          compiler_options=self.case.kernels.compiler_options()), params, x))
    return fns

  def _train_seconds(self) -> float:
    """Seconds per step over `steps` steps dispatched back to back, as training runs them:
    the host queues the next step while the device runs this one, and only the last is
    waited for. (Waiting for each step adds the host's dispatch time to every step: on an
    H100 that made the gpu preset's dense step 8% slower than `chimera.main` measured.)"""
    start = time.perf_counter()
    metrics = None
    for i in range(self.settings.steps):
      self.state, metrics = self.step(self.state, self.batches[i % len(self.batches)], self.rng)
    jax.block_until_ready((self.state, metrics))
    return (time.perf_counter() - start) / self.settings.steps

  def _prefill_seconds(self, batch: int) -> float:
    return _timed(functools.partial(self.prefills[batch], model_state=self.state.model_state),
                  self.state.params, self.prompts[batch])

  def _decode_seconds(self, batch: int) -> float:
    """The new tokens after the prefill: new_tokens - 1 forwards and new_tokens samples."""
    return _timed(functools.partial(self.decoders[batch], model_state=self.state.model_state),
                  self.state.params, *self.prefilled[batch], jax.random.key(0))

  def measure(self, warmup: bool = False) -> None:
    """One slice: train steps, decode per batch size, and the MoE layer split."""
    record = lambda name, value: None if warmup else self.times.setdefault(name, []).append(value)
    record("train_step_seconds", self._train_seconds())
    for batch in self.prompts:
      record(f"prefill_seconds_b{batch}", self._prefill_seconds(batch))
      record(f"decode_seconds_b{batch}", self._decode_seconds(batch))
    if self.moe_layer:
      (full, params, x), (routing_only, routing_params, _) = self.moe_layer
      record("moe_layer_seconds", np.median([_timed(full, params, x) for _ in range(5)]))
      record("moe_routing_seconds",
             np.median([_timed(routing_only, routing_params, x) for _ in range(5)]))

  def _keep(self, suffix: str = "") -> Path | None:
    if not self.settings.profile_dir:
      return None
    return Path(self.settings.profile_dir) / re.sub(r"[^A-Za-z0-9._-]+", "_",
                                                    self.case.name + suffix)

  def profile(self) -> dict:
    """Where the time of `steps` train steps goes (chimera.bench_profile)."""
    return bench_profile.profile(self._train_seconds, self.step.as_text(), self.settings.steps,
                                 float(np.median(self.times["train_step_seconds"])),
                                 keep=self._keep())

  def decode_profile(self) -> dict | None:
    """Where decoding's time goes at the largest decode batch, per new token after the
    prefill (`generate.decode`: new_tokens - 1 single-token forwards)."""
    if not self.prompts:
      return None
    batch, steps = max(self.prompts), self.new_tokens - 1
    seconds = float(np.median(self.times[f"decode_seconds_b{batch}"]))
    return bench_profile.profile(lambda: self._decode_seconds(batch),
                                 self.decoders[batch].as_text(), steps, seconds / steps,
                                 keep=self._keep(f" decode b{batch}"),
                                 part_of=bench_profile.decode_part,
                                 pass_of=bench_profile.decode_pass)

  def result(self, measured_peak: float) -> BenchRecord:
    case, c = self.case, self.case.config
    median = lambda name: float(np.median(self.times[name]))
    step_seconds = median("train_step_seconds")
    tokens_per_second = c.train.batch_size * c.train.context / step_seconds
    model_flops = self.accounting.flops_per_token * tokens_per_second
    device = jax.devices()[0].device_kind
    nominal = nominal_peak_flops(device, c.model.dtype)
    def decode_speed(batch: int) -> DecodeSpeed:
      token = median(f"decode_seconds_b{batch}") / (self.new_tokens - 1)
      return DecodeSpeed(batch, self.prompt_len, self.new_tokens,
                         tokens_per_second=batch / token, ms_per_token=1e3 * token,
                         prefill_ms=1e3 * median(f"prefill_seconds_b{batch}"))
    decode = tuple(decode_speed(batch) for batch in self.prompts)
    moe = {}
    if self.moe_layer:
      layer, routing = median("moe_layer_seconds"), median("moe_routing_seconds")
      moe = dict(dispatch_share_of_moe_layer=routing / layer,
                 dispatch_share_of_step=(c.model.num_moe_layers * c.train.grad_accum * routing
                                         / step_seconds))
    return BenchRecord(
        name=case.name, spec=case.spec, overrides=dict(case.overrides),
        kernels=dataclasses.asdict(case.kernels),
        token_ids="random" if case.random_ids else f"corpus:{c.data.corpus}/{c.data.tokenizer}",
        device=device, jax_version=jax.__version__,
        params_total=self.accounting.params_total,
        params_active=self.accounting.params_active,
        flops_per_token=self.accounting.flops_per_token,
        train_step_seconds=step_seconds, train_tokens_per_second=tokens_per_second,
        mfu=model_flops / (nominal or measured_peak),
        peak_flops=nominal or measured_peak, peak_source="nominal" if nominal else "measured",
        measured_peak_flops=measured_peak, mfu_vs_measured_peak=model_flops / measured_peak,
        peak_memory_bytes=self.compiled_memory, process_peak_memory_bytes=device_peak_memory(),
        decode=decode, dtype=c.model.dtype, **moe, profile=self.profile() if self.settings.profile else None,
        decode_profile=self.decode_profile() if self.settings.profile else None)


def run(cases: list[Case], repeats: int, settings: Settings = Settings()) -> list[BenchRecord]:
  """Measures every case, interleaved `repeats` times; one record per case. malloc is set
  as training sets it (chimera.allocator), so that the bench times what training runs."""
  allocator.keep_freed_memory()
  # Every case's tokens first: a corpus that is missing or too short is one line before
  # anything compiles.
  batches = [token_batches(c.config, settings.batches, c.random_ids) for c in cases]
  subjects = [Subject(case, settings, b) for case, b in zip(cases, batches)]
  dtypes = {s.case.config.model.dtype for s in subjects}
  peak = {d: peak_matmul_flops(jnp.bfloat16 if d == "bfloat16" else jnp.float32) for d in dtypes}
  for _ in range(repeats):
    for subject in subjects:
      subject.measure()
  return [s.result(peak[s.case.config.model.dtype]) for s in subjects]


def format_table(records: list[BenchRecord]) -> str:
  decode = lambda batch, field: lambda r: getattr(r.decode_speed(batch), field, None)
  columns = [
      ("name", "{}", lambda r: r.name),
      ("step s", "{:.4f}", lambda r: r.train_step_seconds),
      ("tokens/s", "{:,.0f}", lambda r: r.train_tokens_per_second),
      ("MFU", "{:.1%}", lambda r: r.mfu),
      ("MFU measured peak", "{:.1%}", lambda r: r.mfu_vs_measured_peak),
  ]
  # Decode columns for every batch measured (ms per token at the smallest, the latency).
  batches = sorted({d.batch for r in records for d in r.decode})
  for batch in batches:
    columns.append((f"decode b{batch} tok/s", "{:,.0f}", decode(batch, "tokens_per_second")))
    if batch == batches[0]:
      columns.append((f"decode b{batch} ms/tok", "{:.2f}", decode(batch, "ms_per_token")))
  columns += [
      ("step memory bytes", "{:,}", lambda r: r.peak_memory_bytes),
      ("dispatch share", "{:.1%}", lambda r: r.dispatch_share_of_step),
  ]
  lines = [" | ".join(name for name, _, _ in columns)]
  for r in records:
    lines.append(" | ".join("-" if get(r) is None else fmt.format(get(r))
                            for _, fmt, get in columns))
  return "\n".join(lines)


def device_line(records: list[BenchRecord]) -> str:
  """The device and the peaks MFU is divided by: one per compute dtype, each naming its
  configs when the records hold more than one dtype."""
  by_dtype: dict = {}
  for r in records:
    by_dtype.setdefault(r.dtype, []).append(r)
  peaks = []
  for dtype, group in by_dtype.items():
    r = group[0]
    names = f" ({', '.join(g.name for g in group)})" if len(by_dtype) > 1 else ""
    peaks.append(f"{dtype or 'dtype not recorded'}{names}: MFU over the {r.peak_source} peak "
                 f"{r.peak_flops / 1e12:.1f} TFLOP/s, measured matmul peak "
                 f"{r.measured_peak_flops / 1e12:.1f} TFLOP/s")
  first = records[0]
  memory = ("" if first.process_peak_memory_bytes is None else
            f"; the process's peak device memory, every config's buffers together: "
            f"{first.process_peak_memory_bytes / 2**30:.2f} GiB")
  return f"device: {first.device}, jax {first.jax_version}; " + "; ".join(peaks) + memory


def comparison_lines(records: list[BenchRecord]) -> list[str]:
  """Each record's train step and decode speed against the first record's."""
  first, lines = records[0], []
  for r in records[1:]:
    line = f"{r.name} vs {first.name}: train step {r.train_step_seconds / first.train_step_seconds:.2f}x"
    for batch in sorted({d.batch for d in r.decode}):
      if r.decode_speed(batch) and first.decode_speed(batch):
        ratio = r.decode_speed(batch).tokens_per_second / first.decode_speed(batch).tokens_per_second
        line += f", decode b{batch} {ratio:.2f}x tokens/s"
    lines.append(line)
  return lines


def parse_value(text: str, key: str | None = None):
  """A command-line value: int, float, bool or string, in that order; the text itself for
  a field `key` that holds text (data.corpus=2024 is a path)."""
  if key and config_lib.is_text_field(key):
    return text
  for cast in (int, float):
    try:
      return cast(text)
    except ValueError:
      pass
  return {"True": True, "False": False, "true": True, "false": False}.get(text, text)


def parse_override(text: str) -> tuple[str, object]:
  """"section.field=value" -> ("section.field", value)."""
  key, equals, value = text.partition("=")
  if not equals or not key:
    raise ChimeraError(f"{text!r}: expected section.field=value")
  return key, parse_value(value, key)


def parse_overrides(flag: str, texts: list[str]) -> dict:
  """A repeated "section.field=value" flag (--set) -> {"section.field": value}; a field
  given twice is refused (the last value won, silently)."""
  overrides = {}
  for text in texts:
    key, value = parse_override(text)
    if key in overrides:
      raise ChimeraError(f"--{flag}: {key} is given twice ({overrides[key]!r} and "
                         f"{value!r}); give it once")
    overrides[key] = value
  return overrides


# Fields the bench's steps never read: the loop's logging, evaluation and checkpoints, the
# run's length (only the schedule's values, not the step's work), its name and its seeds
# (other numbers, the same work).
_NOT_IN_STEP = ("train.log_every", "train.eval_every", "train.eval_batches",
                "train.checkpoint_every", "train.keep_checkpoints", "train.steps", "name",
                "train.seed", "data.seed")


def _step_reads(config: Config, key: str) -> bool:
  """Whether the timed step of `config` reads the field `key`: a dense model no MoE field
  but num_experts, a dropless MoE no field only the einsum dispatch reads."""
  m = config.model
  if key in _NOT_IN_STEP:
    return False
  if key in config_lib.MOE_ONLY and key != "model.num_experts" and not m.num_experts:
    return False
  return not (key in config_lib.EINSUM_ONLY and m.num_experts and m.dispatch != "einsum")


def make_cases(specs: list[str], overrides: dict, variants: list[str],
               random_ids: bool) -> list[Case]:
  """One case per spec, or per spec and variant value (see the module docstring)."""
  for flag, key in [("--set", k) for k in overrides] + [("--variants", v.partition("=")[0])
                                                        for v in variants]:
    if key.startswith("mesh."):  # it was measured on one device, with no word of it
      raise ChimeraError(f"{flag}={key}: the bench times one device's step, whatever the "
                         f"mesh; chimera.scaling and chimera.scaling_hlo measure a mesh")
  if (twice := sorted({spec for spec in specs if specs.count(spec) > 1})):
    raise ChimeraError(f"--configs: {', '.join(twice)} given twice (its rows would time one "
                       f"step against itself); give each config once")
  if not variants:
    return [Case(spec, spec, config_lib.load(spec, overrides), dict(overrides),
                 random_ids=random_ids) for spec in specs]
  cases = {}
  for spec in specs:
    plain = config_lib.load(spec, overrides)
    for variant in variants:
      key, _, values = variant.partition("=")
      if not values:
        raise ChimeraError(f"--variants: expected KEY=v1,v2,..., got {variant!r}")
      for value in values.split(","):
        case = _variant(spec, key, value, overrides, random_ids)  # a bad value: one line
        if not _step_reads(plain, key):  # one row, not rows whose ratios are noise
          case = Case(spec, spec, plain, dict(overrides), random_ids=random_ids)
        # The resolved config: a variant at a default value is the case it equals.
        same = (spec, case.config, case.kernels, case.random_ids)
        cases.setdefault(same, case)
  return list(cases.values())


def _variant(spec: str, key: str, value: str, overrides: dict, random_ids: bool) -> Case:
  name, kernels, overrides = f"{spec} {key.split('.')[-1]}={value}", Kernels(), dict(overrides)
  kernel_field = key.removeprefix("kernels.")
  if key == "ids":
    if value not in ("corpus", "random"):
      raise ChimeraError(f"--variants: ids takes corpus or random, got {value!r}")
    random_ids = value == "random"
  elif key.startswith("kernels."):
    if kernel_field not in {f.name for f in dataclasses.fields(Kernels)}:
      raise ChimeraError(f"--variants: {key}: not a field of chimera.layers.Kernels")
    kernels = dataclasses.replace(kernels, **{kernel_field: value})
  else:
    overrides[key] = parse_value(value, key)
  return Case(name, spec, config_lib.load(spec, overrides), overrides, kernels, random_ids)


def define_flags() -> None:
  """Command-line flags, defined only when the bench runs as a program (other modules,
  like chimera.compare, import it as a library)."""
  flags.DEFINE_list("configs", ["configs/dense.py", "configs/moe_top2.py"],
                    "Config files, each optionally path:preset.")
  flags.DEFINE_multi_string("set", [], "Override for every config: section.field=value.")
  flags.DEFINE_multi_string("variants", [], "KEY=v1,v2: measure each config once per value; "
                            "KEY is section.field, kernels.FIELD or ids (corpus, random).")
  flags.DEFINE_bool("random_ids", False, "Uniform random token ids instead of the corpus.")
  flags.DEFINE_integer("repeats", 5, "Interleaved repeats per config.")
  flags.DEFINE_integer("steps", 10, "Timed train steps per repeat.")
  flags.DEFINE_integer("prompt_len", 64, "Decode prompt length (at most half of max_len).")
  flags.DEFINE_integer("new_tokens", 256, "Decode tokens generated (cut to fit max_len).")
  flags.DEFINE_list("decode_batches", ["1", "8"], "Decode batch sizes; empty for none.")
  flags.DEFINE_bool("moe_split", True, "Time MoE layers with and without their experts.")
  flags.DEFINE_bool("profile", False, "Trace the train step and decoding and say where "
                    "their time goes.")
  flags.DEFINE_string("profile_dir", None, "With --profile: keep each config's trace "
                      "(NAME.trace.json.gz) and compiled HLO (NAME.hlo.txt) in this folder.")
  flags.DEFINE_string("json", None, "Write the records here as JSON.")


def check_flags(values) -> None:
  """The bench's counts and output paths, before anything compiles: one-line
  ChimeraErrors."""
  for name in ("repeats", "steps", "prompt_len", "new_tokens"):
    if getattr(values, name) < 1:
      raise ChimeraError(f"--{name}: must be >= 1, got {getattr(values, name)}")
  if not all(b.strip().isdigit() and int(b) >= 1 for b in values.decode_batches):
    raise ChimeraError(f"--decode_batches: expected positive integers, got "
                       f"{','.join(values.decode_batches)!r}")
  if not values.configs:
    raise ChimeraError("--configs: no config given")
  if values.profile_dir and not values.profile:
    raise ChimeraError("--profile_dir: keeps the traces of --profile, which is off")
  if values.json:
    check_writable("json", values.json, folder=False)
  if values.profile_dir:
    check_writable("profile_dir", values.profile_dir, folder=True)


@tool_main
def main(argv):
  del argv
  FLAGS = flags.FLAGS
  logging.set_verbosity(logging.WARNING)
  try:
    check_flags(FLAGS)
    settings = Settings(steps=FLAGS.steps, prompt_len=FLAGS.prompt_len,
                        new_tokens=FLAGS.new_tokens,
                        decode_batches=tuple(int(b) for b in FLAGS.decode_batches),
                        moe_split=FLAGS.moe_split, profile=FLAGS.profile,
                        profile_dir=FLAGS.profile_dir)
    cases = make_cases(FLAGS.configs, parse_overrides("set", FLAGS.set), FLAGS.variants,
                       FLAGS.random_ids)
    with out_of_memory_is_one_line():
      records = run(cases, FLAGS.repeats, settings)
  except ChimeraError as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)
  print(device_line(records))
  print(format_table(records))
  print("\n".join(comparison_lines(records)))
  for record in records if FLAGS.profile else ():
    print(f"\nwhere the train step's time goes: {record.name}\n"
          + bench_profile.format_summary(record.profile))
    if record.decode_profile:
      print(f"\nwhere decoding's time goes, batch {max(d.batch for d in record.decode)}, "
            f"per generated token after the prefill: {record.name}\n"
            + bench_profile.format_summary(record.decode_profile, unit="token"))
  if FLAGS.json:
    save_records(FLAGS.json, records)


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=parse_flags)
