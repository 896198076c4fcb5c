"""Speed, MFU and memory of each config, measured in one process.

  python -m chimera.bench [--configs=configs/dense.py,configs/moe_top2.py] [--repeats=5]
      [--json=FILE] [--set=model.group_size=128] [--variants=model.dispatch=einsum,dropless]

For each config (default preset unless `path:preset` is given):
- train step: median seconds per step after warm-up, and tokens/s;
- MFU: model FLOPs/s (chimera.accounting) over the peak matmul FLOP/s of this device,
  which the bench measures itself with a large matmul in the compute dtype;
- dispatch share (MoE): the MoE layer's forward+backward timed with and without its
  expert matmuls; the difference is the experts, the rest routing, dispatch and combine;
- decode: tokens/s and ms/token with the KV cache, prompt 64, 256 new tokens, batch 1 and 8;
- memory: XLA's own accounting of the compiled train step (arguments + outputs +
  temporaries - aliased), per config, and the device's peak where the backend reports it.
The configs are interleaved and repeated, so a comparison holds while the machine's speed
drifts; every figure is a median over repeats.
"""

import dataclasses
import functools
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from chimera import accounting, config as config_lib
from chimera.config import Config
from chimera.decoder import Decoder
from chimera.errors import ChimeraError
from chimera.generate import generate
from chimera.moe import MoeLayer
from chimera.steps import init_state, train_step



def _timed(fn, *args) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - start


def peak_matmul_flops(dtype, repeats: int = 10) -> float:
  """Measured FLOP/s of square matmuls in `dtype` on the default device: the best median
  over a few sizes, since the fastest size differs between CPUs and GPUs."""
  sizes = (4096, 8192) if jax.default_backend() == "gpu" else (512, 1024, 2048)
  best = 0.0
  for size in sizes:
    a = jnp.ones((size, size), dtype)
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, a).block_until_ready()
    best = max(best, 2 * size ** 3 / np.median([_timed(matmul, a, a) for _ in range(repeats)]))
  return best


def device_peak_memory() -> int | None:
  stats = jax.local_devices()[0].memory_stats()
  return stats.get("peak_bytes_in_use") if stats else None


@dataclasses.dataclass(frozen=True)
class Settings:
  steps: int = 10  # timed train steps per repeat
  prompt_len: int = 64
  new_tokens: int = 256
  decode_batches: tuple[int, ...] = (1, 8)


@dataclasses.dataclass
class Subject:
  """One config and its compiled functions, measured a slice at a time."""

  spec: str
  config: Config
  settings: Settings
  times: dict = dataclasses.field(default_factory=lambda: {})

  def __post_init__(self):
    c = self.config
    self.accounting = accounting.count(c.model, c.train.context)
    self.state = init_state(c)
    self.step = jax.jit(functools.partial(train_step, model=Decoder(c.model), config=c.model),
                        donate_argnums=0)
    rng = np.random.default_rng(0)
    self.batch = rng.integers(0, c.model.vocab_size,
                              (c.train.grad_accum, c.train.batch_size // c.train.grad_accum,
                               c.train.context + 1)).astype(np.int32)
    self.rng = jax.random.key(0)
    compiled = self.step.lower(self.state, self.batch, self.rng).compile()
    memory = compiled.memory_analysis()
    self.compiled_memory = None if memory is None else int(
        memory.argument_size_in_bytes + memory.output_size_in_bytes
        + memory.temp_size_in_bytes - memory.alias_size_in_bytes)
    self.prompts = {b: rng.integers(0, c.model.vocab_size, (b, self.settings.prompt_len))
                    for b in self.settings.decode_batches}
    self.moe_layer = self._moe_layer_fns() if c.model.num_experts else None
    self.measure(warmup=True)

  def _moe_layer_fns(self):
    """Forward+backward of one MoE layer on a training batch, with and without experts."""
    c = self.config
    x = jax.random.normal(jax.random.key(1), (c.train.batch_size, c.train.context,
                                              c.model.d_model)).astype(jnp.float32)
    fns = []
    for skip in (False, True):
      layer = MoeLayer(c.model, skip_experts=skip)
      params = layer.init(jax.random.key(0), x, deterministic=True)
      loss = lambda p, x, layer=layer: layer.apply(p, x, deterministic=False,
                                                   rngs={"dropout": jax.random.key(0)})[0].sum()
      fns.append((jax.jit(jax.grad(loss, argnums=(0, 1))), params, x))
    return fns

  def _train_seconds(self) -> float:
    seconds = []
    for _ in range(self.settings.steps):
      start = time.perf_counter()
      self.state, metrics = self.step(self.state, self.batch, self.rng)
      jax.block_until_ready(metrics)
      seconds.append(time.perf_counter() - start)
    return float(np.median(seconds))

  def _decode_seconds(self, batch: int) -> float:
    return _timed(lambda: generate(self.state.params, self.prompts[batch], jax.random.key(0),
                                   config=self.config.model,
                                   max_new_tokens=self.settings.new_tokens,
                                   temperature=1.0))

  def measure(self, warmup: bool = False) -> None:
    """One slice: train steps, decode per batch size, and the MoE layer split."""
    record = lambda name, value: None if warmup else self.times.setdefault(name, []).append(value)
    record("train_step_seconds", self._train_seconds())
    for batch in self.prompts:
      record(f"decode_seconds_b{batch}", self._decode_seconds(batch))
    if self.moe_layer:
      (full, params, x), (routing_only, routing_params, _) = self.moe_layer
      record("moe_layer_seconds", np.median([_timed(full, params, x) for _ in range(5)]))
      record("moe_routing_seconds",
             np.median([_timed(routing_only, routing_params, x) for _ in range(5)]))

  def result(self, peak_flops: float) -> dict:
    c, median = self.config, lambda name: float(np.median(self.times[name]))
    step_seconds = median("train_step_seconds")
    tokens_per_second = c.train.batch_size * c.train.context / step_seconds
    out = {
        "config": self.spec,
        "params_total": self.accounting.params_total,
        "params_active": self.accounting.params_active,
        "flops_per_token": self.accounting.flops_per_token,
        "train_step_seconds": step_seconds,
        "train_tokens_per_second": tokens_per_second,
        "mfu": self.accounting.flops_per_token * tokens_per_second / peak_flops,
        "peak_memory_bytes": self.compiled_memory,
        "device_peak_memory_bytes": device_peak_memory(),
    }
    for batch in self.prompts:
      seconds = median(f"decode_seconds_b{batch}")
      out[f"decode_tokens_per_second_b{batch}"] = batch * self.settings.new_tokens / seconds
      out[f"decode_ms_per_token_b{batch}"] = 1e3 * seconds / self.settings.new_tokens
    first = min(self.prompts)
    out["decode_tokens_per_second"] = out[f"decode_tokens_per_second_b{first}"]
    out["decode_ms_per_token"] = out[f"decode_ms_per_token_b{first}"]
    if self.moe_layer:
      layer, routing = median("moe_layer_seconds"), median("moe_routing_seconds")
      out["dispatch_share_of_moe_layer"] = routing / layer
      out["dispatch_share_of_step"] = c.model.num_moe_layers * routing / step_seconds
    return out


def parse_value(text: str):
  """A command-line value: int, float, bool or string, in that order."""
  for cast in (int, float):
    try:
      return cast(text)
    except ValueError:
      pass
  return {"True": True, "False": False, "true": True, "false": False}.get(text, text)


def parse_override(text: str) -> tuple[str, object]:
  """"section.field=value" -> ("section.field", value)."""
  key, _, value = text.partition("=")
  return key, parse_value(value)


def run(named_configs: list[tuple[str, Config]], repeats: int,
        settings: Settings = Settings()) -> list[dict]:
  """Measures every (name, config), interleaved `repeats` times; one record per config."""
  subjects = [Subject(name, config, settings) for name, config in named_configs]
  dtypes = {s.config.model.dtype for s in subjects}
  peak = {d: peak_matmul_flops(jnp.bfloat16 if d == "bfloat16" else jnp.float32) for d in dtypes}
  for _ in range(repeats):
    for subject in subjects:
      subject.measure()
  records = [s.result(peak[s.config.model.dtype]) for s in subjects]
  for record, subject in zip(records, subjects):
    record["peak_matmul_flops"] = peak[subject.config.model.dtype]
    record["device"] = jax.devices()[0].device_kind
  return records


def format_table(records: list[dict]) -> str:
  columns = [("config", "{}"), ("train_step_seconds", "{:.4f}"),
             ("train_tokens_per_second", "{:,.0f}"), ("mfu", "{:.1%}"),
             ("decode_tokens_per_second_b1", "{:,.0f}"), ("decode_ms_per_token_b1", "{:.2f}"),
             ("decode_tokens_per_second_b8", "{:,.0f}"), ("peak_memory_bytes", "{:,}"),
             ("dispatch_share_of_step", "{:.1%}")]
  lines = [" | ".join(name for name, _ in columns)]
  for r in records:
    lines.append(" | ".join("-" if r.get(name) is None else fmt.format(r[name])
                            for name, fmt in columns))
  return "\n".join(lines)


def define_flags() -> None:
  """Command-line flags, defined only when the bench runs as a program (other modules,
  like chimera.compare, import it as a library)."""
  flags.DEFINE_list("configs", ["configs/dense.py", "configs/moe_top2.py"],
                    "Config files, each optionally path:preset.")
  flags.DEFINE_multi_string("set", [], "Override for every config: section.field=value.")
  flags.DEFINE_string("variants", None, "section.field=v1,v2: measure each config once per "
                      "value, e.g. model.dispatch=einsum,dropless.")
  flags.DEFINE_integer("repeats", 5, "Interleaved repeats per config.")
  flags.DEFINE_integer("steps", 10, "Timed train steps per repeat.")
  flags.DEFINE_integer("prompt_len", 64, "Decode prompt length.")
  flags.DEFINE_integer("new_tokens", 256, "Decode tokens generated.")
  flags.DEFINE_list("decode_batches", ["1", "8"], "Decode batch sizes.")
  flags.DEFINE_string("json", None, "Write the records here as JSON.")


def main(argv):
  del argv
  FLAGS = flags.FLAGS
  logging.set_verbosity(logging.WARNING)
  overrides = dict(map(parse_override, FLAGS.set))
  settings = Settings(steps=FLAGS.steps, prompt_len=FLAGS.prompt_len, new_tokens=FLAGS.new_tokens,
                      decode_batches=tuple(int(b) for b in FLAGS.decode_batches))
  try:
    named = [(spec, config_lib.load(spec, overrides)) for spec in FLAGS.configs]
    if FLAGS.variants:
      key, _, values = FLAGS.variants.partition("=")
      named = [(f"{spec} {key.split('.')[-1]}={value}",
                config_lib.load(spec, {**overrides, key: parse_value(value)}))
               for spec in FLAGS.configs for value in values.split(",")]
    records = run(named, FLAGS.repeats, settings)
  except ChimeraError as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)
  print(f"device: {records[0]['device']}; peak matmul "
        f"{records[0]['peak_matmul_flops'] / 1e9:.1f} GFLOP/s ({records[0]['config']} dtype)")
  print(format_table(records))
  if len(records) > 1:
    base = records[0]
    for r in records[1:]:
      print(f"{r['config']} vs {base['config']}: train step "
            f"{r['train_step_seconds'] / base['train_step_seconds']:.2f}x, decode b1 "
            f"{r['decode_tokens_per_second'] / base['decode_tokens_per_second']:.2f}x tokens/s")
  if FLAGS.json:
    Path(FLAGS.json).write_text(json.dumps(records, indent=2))


if __name__ == "__main__":
  define_flags()
  app.run(main)
