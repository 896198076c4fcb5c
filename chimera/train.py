"""Training: the optimiser, the pure jitted steps, and the loop around them.

`train_step` and `eval_step` are module-level pure functions; the loop binds the model
and config with functools.partial and jits them once. Everything host-side (logging,
evaluation bookkeeping, checkpoints) happens between steps.
"""

import dataclasses
import functools
import json
import math
import signal
import time
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from chimera import accounting, config as config_lib, sharding
from chimera.checkpoints import Checkpointer
from chimera.config import Config
from chimera.data import batches as batches_lib
from chimera.data.corpora import load_corpus
from chimera.data.tokenizers import get_tokenizer
from chimera.decoder import Decoder
from chimera.steps import eval_step, init_state, make_schedule, train_step
from chimera.errors import ChimeraError
from chimera.metrics import MetricWriter, log, progress_line


class TrainingDiverged(ChimeraError):
  """The loss became NaN or inf."""


def unigram_cross_entropy(train_tokens: np.ndarray, val_tokens: np.ndarray,
                          vocab_size: int) -> float:
  """Validation loss (nats/token) of the add-one-smoothed unigram model of the training
  split: the bar a language model must clear."""
  counts = np.bincount(train_tokens, minlength=vocab_size) + 1.0
  log_probs = np.log(counts / counts.sum())
  return float(-log_probs[val_tokens].mean())


class _Data(NamedTuple):
  splits: batches_lib.Splits
  val_batches: np.ndarray  # [N, B / processes, context + 1]: this process's rows
  val_bytes_per_token: float
  unigram_loss: float


def _prepare_data(config: Config) -> _Data:
  """Tokenizer, corpus, split and the fixed validation subset, with their checks."""
  t, m = config.train, config.model
  tokenizer = get_tokenizer(config.data.tokenizer)
  if tokenizer.vocab_size > m.vocab_size:
    raise ChimeraError(
        f"config.model.vocab_size={m.vocab_size} does not match tokenizer "
        f"'{config.data.tokenizer}', which has {tokenizer.vocab_size} tokens")
  splits = batches_lib.make_splits(load_corpus(config.data.corpus), tokenizer,
                                   val_fraction=config.data.val_fraction, mode=config.data.split)
  log(f"data: {config.data.corpus}: train {len(splits.train):,} tokens, "
      f"validation {len(splits.val):,} tokens ({config.data.tokenizer} tokenizer)")
  val_batches = batches_lib.eval_batches(splits.val, batch_size=t.batch_size,
                                         window=t.context + 1, num_batches=t.eval_batches,
                                         seed=config.data.seed)
  rows = t.batch_size // jax.process_count()
  val_batches = val_batches[:, jax.process_index() * rows:(jax.process_index() + 1) * rows]
  return _Data(splits, val_batches, splits.val_bytes / len(splits.val),
               unigram_cross_entropy(splits.train, splits.val, m.vocab_size))


@dataclasses.dataclass
class _Window:
  """Per-step metrics not yet fetched from the device."""

  pending: list = dataclasses.field(default_factory=list)
  started: float = dataclasses.field(default_factory=time.perf_counter)


def _average(records: list[dict]) -> dict:
  summed = jax.tree.map(lambda *xs: np.sum(xs, axis=0), *records)
  steps = summed.pop("steps")
  averaged = {k: v / steps for k, v in summed.items() if k not in ("loss_sum", "tokens")}
  averaged["loss"] = summed["loss_sum"] / summed["tokens"]
  return averaged


class _StopRequest:
  """Turns SIGTERM / SIGINT into a flag that the loop checks between steps."""

  def __init__(self):
    self.requested = False
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    self.requested = True

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def train(config: Config, workdir: str | Path, *, stop_after: int | None = None) -> dict:
  """Trains (or resumes) the run in `workdir`; returns the summary written to summary.json.

  `stop_after`: stop as on SIGTERM (checkpoint, then return) after this many steps in
  this call; the run is resumed by calling again with the same workdir.
  """
  started = time.perf_counter()
  sharding.check_mesh(config, jax.device_count())
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  if jax.process_index() == 0:
    (workdir / "config.json").write_text(json.dumps(config_lib.to_dict(config), indent=2))
  data = _prepare_data(config)
  mesh = sharding.make_mesh(config.mesh)
  with jax.set_mesh(mesh):
    return _train_loop(config, workdir, data, mesh, started, stop_after)


def _train_loop(config: Config, workdir: Path, data: _Data, mesh: jax.sharding.Mesh,
                started: float, stop_after: int | None) -> dict:
  t, m = config.train, config.model
  window = t.context + 1
  counts = accounting.count(m, t.context)
  model = Decoder(m)
  state = init_state(config, mesh)
  checkpointer = Checkpointer(workdir / "checkpoints", keep=t.keep_checkpoints)
  meta = {"sampler": None, "best_val_loss": math.inf, "final_val_loss": None,
          "wall_seconds": 0.0, "tokens_seen": 0}
  if checkpointer.latest_step() is not None:
    state, meta = checkpointer.restore(state)  # onto this mesh, whatever the saving one was
    log(f"resumed from {workdir / 'checkpoints'} at step {int(state.step)}")
  start_step = int(state.step)
  if start_step >= t.steps and (workdir / "summary.json").exists():
    log(f"{workdir} already holds a finished run of {t.steps} steps")
    checkpointer.close()
    return json.loads((workdir / "summary.json").read_text())
  sampler = batches_lib.WindowSampler(data.splits.train, batch_size=t.batch_size, window=window,
                                      seed=config.data.seed, step=start_step,
                                      process_index=jax.process_index(),
                                      process_count=jax.process_count())
  train_batch = sharding.batch_sharding(mesh, ndim=3, batch_axis=1)  # [A, B, L+1]
  eval_batch = sharding.batch_sharding(mesh, ndim=2)  # [B, L+1]
  to_global = jax.make_array_from_process_local_data
  val_batches = [to_global(eval_batch, batch) for batch in data.val_batches]

  writer = MetricWriter(workdir)
  if start_step == 0:
    writer.write("setup", 0, {**counts._asdict(), "train_tokens": len(data.splits.train),
                              "val_tokens": len(data.splits.val),
                              "unigram_val_loss": data.unigram_loss})
  log(f"model: {counts.params_total:,} params, {counts.params_active:,} active, "
      f"{counts.flops_per_token / 1e6:.1f} MFLOPs/token; mesh {dict(mesh.shape)}")
  replicated = NamedSharding(mesh, PartitionSpec())
  state_shardings = sharding.state_sharding(mesh, state)
  step_fn = jax.jit(functools.partial(train_step, model=model, config=m), donate_argnums=0,
                    out_shardings=(state_shardings, replicated))
  eval_fn = jax.jit(functools.partial(eval_step, model=model, config=m),
                    out_shardings=replicated)
  rng = jax.random.key(t.seed + 1)
  tokens_per_step = t.batch_size * t.context
  bits_per_byte = lambda loss: loss / math.log(2) / data.val_bytes_per_token

  def evaluate(step: int) -> float:
    results = jax.device_get([eval_fn(state.params, batch) for batch in val_batches])
    averaged = jax.tree.map(lambda *xs: np.mean(xs, axis=0), *results)
    val_loss = float(np.sum([r["loss_sum"] for r in results])
                     / np.sum([r["tokens"] for r in results]))
    meta["best_val_loss"] = min(meta["best_val_loss"], val_loss)
    meta["final_val_loss"] = val_loss
    writer.write("eval", step, {"val_loss": val_loss, "val_perplexity": math.exp(val_loss),
                                "val_bits_per_byte": bits_per_byte(val_loss),
                                "dropped_fraction": averaged["dropped_fraction"],
                                "expert_load": averaged["expert_load"]})
    log(f"eval step {step}: val loss {val_loss:.4f} | ppl {math.exp(val_loss):.2f} | "
        f"{bits_per_byte(val_loss):.4f} bits/byte")
    return val_loss

  def flush(window: _Window, step: int) -> tuple[dict, float]:
    """Fetches pending metrics (and their window's seconds); stops on a non-finite loss."""
    records = jax.device_get(window.pending)
    first_step = step - len(records) + 1
    for offset, record in enumerate(records):
      # The loss checks the parameters the step started from, the norm the ones it made.
      if not (np.isfinite(record["loss_sum"]) and np.isfinite(record["param_norm"])):
        raise TrainingDiverged(
            f"non-finite loss ({record['loss_sum']}) or parameters (norm "
            f"{record['param_norm']}) at step {first_step + offset}; stopping. The last good "
            f"checkpoint in {workdir / 'checkpoints'} is untouched")
    averaged = _average(records)
    seconds = time.perf_counter() - window.started  # after device_get: the steps are done
    averaged["tokens_per_second"] = len(records) * tokens_per_step / seconds
    averaged["learning_rate"] = float(schedule(step - 1))
    window.pending.clear()
    window.started = time.perf_counter()
    return averaged, seconds

  schedule = make_schedule(t)
  last_train = None
  window_metrics = _Window()
  timed_tokens, timed_seconds = 0, 0.0
  step = start_step
  stopped_early = False
  try:
    with _StopRequest() as stop:
      while step < t.steps:
        batch = to_global(train_batch, sampler.next().reshape(t.grad_accum, -1, window))
        state, step_metrics = step_fn(state, batch, rng)
        window_metrics.pending.append(step_metrics)
        step += 1
        meta["tokens_seen"] += tokens_per_step
        is_eval = step % t.eval_every == 0 or step == t.steps
        is_save = step % t.checkpoint_every == 0 or step == t.steps
        interrupted = stop.requested or (stop_after is not None and step - start_step >= stop_after)
        if step % t.log_every == 0 or is_eval or is_save or interrupted:
          count = len(window_metrics.pending)
          averaged, window_seconds = flush(window_metrics, step)
          if step - count > start_step:  # the first window holds compilation: not timed
            timed_tokens += count * tokens_per_step
            timed_seconds += window_seconds
          last_train = averaged
          writer.write("train", step, averaged)
          eta = (t.steps - step) * window_seconds / max(count, 1)
          log(progress_line(step, t.steps, averaged["loss"], averaged["tokens_per_second"], eta))
        val_loss = evaluate(step) if is_eval else None
        if is_save or interrupted:
          meta["sampler"] = sampler.state()
          meta["wall_seconds"] += time.perf_counter() - started
          started = time.perf_counter()
          checkpointer.save(step, state, meta, val_loss=val_loss)
        if interrupted and step < t.steps:
          stopped_early = True
          break
        if is_eval or is_save:  # keep evaluation and saving out of the next window's timing
          window_metrics.started = time.perf_counter()
  finally:  # a pending save completes even if the run stops on an error
    checkpointer.wait()
    checkpointer.close()

  summary = {
      "config": config.name,
      "final_val_loss": meta["final_val_loss"],
      "best_val_loss": meta["best_val_loss"],
      "steps": step,
      "tokens_seen": meta["tokens_seen"],
      "wall_seconds": meta["wall_seconds"],
      "train_tokens_per_second": timed_tokens / timed_seconds if timed_seconds else None,
      "params_total": counts.params_total,
      "params_active": counts.params_active,
      "flops_per_token": counts.flops_per_token,
      "dispatch_flops_per_token": counts.dispatch_flops_per_token,
      "unigram_val_loss": data.unigram_loss,
      "val_bits_per_byte": (bits_per_byte(meta["final_val_loss"])
                            if meta["final_val_loss"] is not None else None),
      "completed": not stopped_early,
  }
  if m.num_experts and last_train is not None:
    summary["expert_load"] = np.asarray(last_train["expert_load"]).tolist()
    summary["dropped_fraction"] = np.asarray(last_train["dropped_fraction"]).tolist()
  writer.close()
  if stopped_early:
    log(f"stopped at step {step}; checkpoint saved. Run the same command with "
        f"--workdir={workdir} to resume.")
    return summary
  if jax.process_index() == 0:
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
  log(f"done: final val loss {summary['final_val_loss']:.4f}, best "
      f"{summary['best_val_loss']:.4f}. Results in {workdir}/ (summary.json, metrics.jsonl, "
      f"tensorboard/, checkpoints/)")
  return summary
