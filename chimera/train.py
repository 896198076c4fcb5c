"""The training loop: one run in one workdir, resumable, with its logs and summary.

The pure pieces (state, optimiser, loss, the jitted steps) live in chimera.steps. Here is
only what happens between steps, in small named parts: the workdir and its lock
(`open_workdir`), the data (`prepare_data`), the metric window (`TrainLog`), evaluation
(`Evaluator`), checkpoints (chimera.checkpoints) and the summary (chimera.records).
"""

import collections
import contextlib
import fcntl
import functools
import json
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from chimera import accounting, allocator, config as config_lib, routers, sharding
from chimera.checkpoints import Checkpointer, CheckpointWriteFailed, saved_meta
from chimera.config import Config
from chimera.data import batches as batches_lib
from chimera.data.cache import prepare as prepare_cache
from chimera.data.corpora import write_atomic
from chimera.data.tokenizers import get_tokenizer
from chimera.decoder import Decoder
from chimera.errors import ChimeraError, is_disk_refusal, out_of_memory_is_one_line
from chimera.layers import Kernels
from chimera.metrics import MetricWriter, log, progress_line
from chimera.records import (RUN_PLOTS, EvalRecord, Progress, RunSummary, device_name,
                             loaded_code_version, read_events)
from chimera.steps import TrainState, eval_step, init_state, make_schedule, train_step

EVAL_SEED = 0  # the validation subset is the same for every training seed


class TrainingDiverged(ChimeraError):
  """The loss became NaN or inf."""


# --- The workdir: one run, one live process. -------------------------------------------


@contextlib.contextmanager
def open_workdir(workdir: Path, config: Config):
  """Claims `workdir` for `config`'s run for the duration of the block.

  Refuses (one-line ChimeraError) a path that is a file or cannot be made, a folder that
  holds no run (see `_claimed`) but files the run would write over, a second live
  run on the same workdir, a config that computes a different run than the one saved there
  (or checkpoints that recorded no config, saved before 2026-11-28, without a
  config.json), and fewer train.steps than its checkpoints have reached. A workdir
  without a checkpoint holds no run yet (a start that failed on bad input, or a run killed
  before its first save): its config.json is replaced, so the corrected command starts
  there. A workdir this call created is removed again if the block fails while it holds
  only config.json and data.json (bad data, say: an auto-named runs/ folder would
  otherwise outlive the typo), with the empty folders above it that this call made. The
  lock is an flock held by this process: the kernel drops it when the process dies, so a
  killed run never blocks the next one. Yields the steps of the checkpoints
  there (empty: a fresh start).
  """
  if workdir.exists() and not workdir.is_dir():
    raise ChimeraError(f"--workdir: {workdir} is a file, not a directory")
  if RunSummary.exists(workdir):  # before anything is written there
    try:
      RunSummary.load(workdir)
    except (TypeError, ValueError):
      raise ChimeraError(f"--workdir: {workdir} holds a summary.json that is not a run's "
                         f"(a chimera.compare report folder?); use another workdir") from None
  if workdir.is_dir() and not _claimed(workdir):
    try:
      others = sorted(path.name for path in workdir.iterdir() if not path.name.startswith("."))
    except OSError:  # unreadable: creating the lock below says so in one line
      others = []
    # Not a run's folder. A file the run would write over (a log that is not its own) is
    # refused; other files (the log `| tee` writes there) are named, and left beside it.
    if (taken := [name for name in _RUN_FILES if name in others]):
      raise ChimeraError(f"--workdir: {workdir} holds no run but holds {', '.join(taken)}, "
                         f"which the run would write over; use a new or empty folder")
    if others:
      more = f" and {len(others) - 3} more" if len(others) > 3 else ""
      log(f"note: --workdir {workdir} holds no run but other files ({', '.join(others[:3])}"
          f"{more}); the run's files go beside them")
  made = [path for path in (workdir, *workdir.parents) if not path.exists()]  # this call's
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    lock = open(workdir / ".lock", "a+") if jax.process_index() == 0 else None
  except OSError as error:
    raise ChimeraError(f"--workdir: cannot create {workdir} ({error.strerror})") from None
  if lock is None:  # process 0 speaks for the run
    yield _check_steps(workdir, config)
    return
  with lock:
    try:
      fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      lock.seek(0)
      raise ChimeraError(f"--workdir: {workdir} is in use by another live run "
                         f"(pid {lock.read().strip() or '?'})") from None
    except OSError as error:  # a filesystem without flock
      raise ChimeraError(f"--workdir: cannot lock {workdir / '.lock'} ({error.strerror}); "
                         f"use a workdir on a local filesystem") from None
    try:
      os.ftruncate(lock.fileno(), 0)  # unbuffered: nothing is left to flush if it fails
      os.write(lock.fileno(), str(os.getpid()).encode())
      saved = saved_steps(workdir)  # listed under the lock: no run can save meanwhile
      # Another run first: its steps are not this config's to ask for.
      steps_note = _check_same_run(workdir, config, saved[-1]) if saved else None
      _check_steps(workdir, config)
      if steps_note:  # only once the steps asked for are known to be taken
        log(steps_note)
      write_atomic(workdir / "config.json",
                   json.dumps(config_lib.to_dict(config), indent=2).encode())
    except OSError as error:
      if not is_disk_refusal(error):
        raise
      if made:
        _remove_if_unused(made)
      raise ChimeraError(f"--workdir: cannot write in {workdir} ({error.strerror})") from None
    try:
      yield saved
    except BaseException:
      if made:  # a start that failed before training leaves no folder behind
        _remove_if_unused(made)
      raise


_CLAIM_FILES = {"config.json", "data.json", ".lock"}  # what a start writes before training
# What a run writes (RunSummary's summary.json is checked on its own): refused in a folder
# that holds no run, whose file it would write over.
_RUN_FILES = ("config.json", "data.json", "metrics.jsonl", "tensorboard", *RUN_PLOTS)


def _claimed(workdir: Path) -> bool:
  """Whether a start has claimed `workdir`: its lock file, checkpoints, or a config.json
  that is a run's (one with the sections of `config_lib.to_dict`). Another program's
  config.json (a Hugging Face model folder's, say) is not, so it is refused, not written
  over."""
  if (workdir / ".lock").exists() or (workdir / "checkpoints").exists():
    return True
  try:
    values = json.loads((workdir / "config.json").read_text())
  except (OSError, ValueError):  # none, unreadable, or not JSON
    return False
  return isinstance(values, dict) and {"model", "train", "data"} <= values.keys()


def _remove_if_unused(made: list[Path]) -> None:
  """Removes the workdir this start created (made[0]), under its lock, if it holds only
  the claim, and then the folders above it that this start made (made[1:], an auto-named
  run's runs/), those left empty."""
  workdir = made[0]
  try:
    if {path.name for path in workdir.iterdir()} <= _CLAIM_FILES:
      for name in _CLAIM_FILES:
        (workdir / name).unlink(missing_ok=True)
      workdir.rmdir()
      for parent in made[1:]:
        parent.rmdir()  # OSError if another start has put its run there meanwhile
  except OSError:  # left as it is: the next start with this workdir replaces config.json
    pass


def _check_steps(workdir: Path, config: Config) -> list[int]:
  """The saved steps, once train.steps is known to reach the latest of them."""
  saved = saved_steps(workdir)
  if saved and saved[-1] > config.train.steps:  # before config.json could be rewritten
    raise ChimeraError(f"train.steps={config.train.steps}: {workdir} holds this run at "
                       f"step {saved[-1]} already; ask for at least that many steps")
  return saved


def _last_good(workdir: Path) -> str:
  """What is left on disk after a run stopped on a non-finite value, once the save still
  being written (if any) is done."""
  if saved_steps(workdir):  # complete ones: the folder of a killed save is not one
    return f"The last good checkpoint in {workdir / 'checkpoints'} is untouched"
  return "No checkpoint had been saved yet"


def saved_steps(workdir: Path) -> list[int]:
  """The steps of the completed checkpoints in `workdir`, in order (orbax renames a
  checkpoint's folder to its step when the save is done)."""
  folder = workdir / "checkpoints"
  if not folder.is_dir():
    return []
  return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())


def _check_same_run(workdir: Path, config: Config, latest: int) -> str | None:
  """Refuses a config that computes another run than the one whose checkpoints are in
  `workdir`, judged by the config the latest checkpoint recorded as it was saved (since
  2026-11-28), else by config.json: an edited, copied or deleted config.json does not
  make the checkpoints another run's. Returns a line to log if train.steps changed."""
  path = workdir / "config.json"
  recorded = recorded_config(workdir, latest)
  if recorded is None and not path.exists():
    raise ChimeraError(f"--workdir: {workdir} holds checkpoints that do not record their "
                       f"config (saved before 2026-11-28) and no config.json, so this config "
                       f"cannot be checked against their run; use a new workdir")
  try:
    saved = recorded or config_lib.from_dict(json.loads(path.read_text()))
  except (TypeError, KeyError, ValueError) as error:
    raise ChimeraError(f"--workdir: {path} is not a config this version can read ({error}); "
                       f"use a new workdir") from None
  # A moved corpus is the run's if its text is (check_same_data compares data.json's hash).
  differing = config_lib.run_differences(saved, config,
                                         corpus_may_move=(workdir / "data.json").exists())
  if differing:
    old, new = config_lib.to_dict(saved), config_lib.to_dict(config)
    changes = ", ".join(f"{key} ({_lookup(old, key)!r} -> {_lookup(new, key)!r})"
                        for key in differing)
    said = f" (as its checkpoint at step {latest} recorded it)" if recorded else ""
    raise ChimeraError(f"--workdir: {workdir} holds another run{said}; these fields differ: "
                       f"{changes}. Use a new workdir")
  if config.train.steps != saved.train.steps:
    return (f"train.steps: {saved.train.steps} -> {config.train.steps}. The cosine schedule "
            f"is stretched to the new length, so the learning rate at the steps still to run "
            f"follows it, not the old one")
  return None


def recorded_config(workdir: Path, step: int, damaged_ok: bool = False) -> Config | None:
  """The config the checkpoint at `step` in `workdir` recorded as it was saved; None for a
  checkpoint from before checkpoints recorded it, or (`damaged_ok`: a restore that follows
  says what is wrong) one whose meta cannot be read. Read in this process alone, with no
  barrier with the others (checkpoints.saved_meta)."""
  try:
    values = saved_meta(workdir / "checkpoints", step).get("config")
  except (KeyError, TypeError, ValueError, AttributeError, OSError) as error:  # damaged
    if damaged_ok:
      return None
    raise ChimeraError(f"--workdir: the checkpoint at step {step} in {workdir} cannot be "
                       f"read, incomplete or damaged ({type(error).__name__})") from None
  try:
    return config_lib.from_dict(values) if values else None
  except (TypeError, KeyError, ValueError, AttributeError) as error:
    raise ChimeraError(f"--workdir: the checkpoint at step {step} in {workdir} records a "
                       f"config this version cannot read ({error})") from None


def _lookup(values: dict, key: str):
  section, _, field = key.partition(".")
  return values[section].get(field)


# --- Data. ------------------------------------------------------------------------------


class Data(NamedTuple):
  splits: batches_lib.Splits
  val_batches: np.ndarray  # [N, B / processes, context + 1]: this process's rows
  val_bytes_per_token: float
  unigram_loss: float
  identity: dict  # what the splits were built from: the corpus, its content hash, the counts

  def bits_per_byte(self, loss: float) -> float:
    """A validation loss (nats per token) in bits per byte of the validation text."""
    return loss / math.log(2) / self.val_bytes_per_token


def prepare_data(config: Config, check_identity=lambda identity: None) -> Data:
  """Tokenizer, the cached split (memory-mapped tokens; chimera.data.cache) and the fixed
  validation subset, with their checks. `check_identity` sees the data's identity (corpus,
  content hash, tokens) as soon as the cache is read, before the splits are cut into
  windows, so a run's other text is refused as other text, not as too short for them."""
  t, m, d = config.train, config.model, config.data
  tokenizer = get_tokenizer(d.tokenizer)
  if tokenizer.vocab_size > m.vocab_size:
    raise ChimeraError(
        f"config.model.vocab_size={m.vocab_size} does not match tokenizer "
        f"'{config.data.tokenizer}', which has {tokenizer.vocab_size} tokens")
  cache = prepare_cache(d.corpus, tokenizer, split=d.split, val_fraction=d.val_fraction,
                        text_field=d.text_field)
  splits = cache.splits()
  log(f"data: {config.data.corpus}: train {len(splits.train):,} tokens, "
      f"validation {len(splits.val):,} tokens ({config.data.tokenizer} tokenizer)")
  identity = {"corpus": d.corpus, "content_hash": cache.manifest.content_hash,
              "tokens": cache.manifest.tokens}
  check_identity(identity)
  # The fixed subset is drawn with replacement, so it may hold more windows than the split;
  # but train.eval_batches=1e9 hung drawing 528 GB of them.
  subset = t.eval_batches * t.batch_size * (t.context + 1) * 4  # int32
  memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  if subset > memory / 2:
    raise ChimeraError(f"config.train.eval_batches: {t.eval_batches} batches of {t.batch_size} "
                       f"windows of {t.context + 1} tokens would take {subset / 2**30:,.1f} GiB, "
                       f"more than half this machine's memory; lower it, or score the whole "
                       f"split with chimera.evaluate")
  val_batches = batches_lib.eval_batches(splits.val, batch_size=t.batch_size,
                                         window=t.context + 1, num_batches=t.eval_batches,
                                         seed=EVAL_SEED)
  val_batches = batches_lib.process_rows(val_batches, t.grad_accum, jax.process_index(),
                                         jax.process_count())
  return Data(splits, val_batches, splits.val_bytes / len(splits.val),
              batches_lib.unigram_cross_entropy(splits.counts, m.vocab_size), identity)


def check_same_data(workdir: Path, identity: dict, *, resuming: bool,
                    record_move: bool = True) -> None:
  """Refuses (one line) to go on with the run in `workdir` if its corpus changed since it
  started: its batches and its validation split would no longer be the run's (a file added
  to a folder corpus can move documents between the splits). The same text at another path
  (a moved corpus) is the run's: data.json records the new path. A fresh start (no checkpoint
  yet, `resuming` False) holds no run: process 0 records the data there (data.json), for
  later resumes and chimera.evaluate to check. `record_move` False: a reader
  (chimera.evaluate --corpus) leaves data.json as it is."""
  path = workdir / "data.json"
  if not resuming:
    if jax.process_index() == 0:
      write_atomic(path, json.dumps(identity, indent=2).encode())
    return
  if not path.exists():  # a run started before data.json was kept
    return
  saved = json.loads(path.read_text())
  changed = [key for key in identity if saved.get(key) != identity[key]]
  if changed == ["corpus"]:  # the same text (content hash, split sizes) read from elsewhere
    log(f"data: the corpus moved ({saved['corpus']} -> {identity['corpus']}); "
        f"its text is the run's")
    if record_move and jax.process_index() == 0:
      write_atomic(path, json.dumps(identity, indent=2).encode())
  elif changed:
    changes = ", ".join(f"{key} {saved.get(key)!r} -> {identity[key]!r}" for key in changed)
    advice = ("Restore the corpus or use a new workdir" if record_move else
              "Give --corpus the text the run trained on")  # a reader cannot start afresh
    raise ChimeraError(f"--workdir: {workdir} holds a run of other text: the corpus changed "
                       f"since it started ({changes}). {advice}")


# --- Between steps: the clock, the metric window, evaluation. -----------------------------


_LOG_FLOAT_MAX = math.log(sys.float_info.max)  # a loss past it has an infinite perplexity


class Clock:
  """Training seconds: those of earlier sessions (from the checkpoint) plus this one's."""

  def __init__(self, earlier_seconds: float):
    self.earlier_seconds = earlier_seconds
    self.started = time.perf_counter()

  def __call__(self) -> float:
    return self.earlier_seconds + time.perf_counter() - self.started


class TrainLog:
  """Per-step metrics, fetched from the device once per logging window and averaged.

  Also the run's throughput: every step but each session's first (its first execution:
  buffers allocated, caches filled; the step compiles before the loop), with evaluation and
  saving left out (`restart_window`), counted in the run's `Progress` so that they add up
  over its sessions. A run of one logging window is timed too, if it has two steps.
  """

  def __init__(self, config: Config, start_step: int, writer: MetricWriter, progress: Progress):
    self.config, self.start_step, self.writer = config, start_step, writer
    self.progress = progress
    self.tokens_per_step = config.train.batch_size * config.train.context
    self.schedule = jax.jit(make_schedule(config.train))  # one compile, not one per jnp op
    self.pending: list = []
    self.window_started = time.perf_counter()
    self.first_step_done_at: float | None = None  # set by first_step_done, read once
    self.last: dict | None = None

  def add(self, step_metrics: dict) -> None:
    self.pending.append(step_metrics)

  def restart_window(self) -> None:
    self.window_started = time.perf_counter()

  def first_step_done(self) -> None:
    """Called once the session's first step has run: its window is timed from here."""
    self.first_step_done_at = time.perf_counter()

  @property
  def tokens_per_second(self) -> float | None:
    p = self.progress
    return p.timed_tokens / p.timed_seconds if p.timed_seconds else None

  def flush(self, step: int, wall_seconds: float) -> dict:
    """Fetches and averages the window ending at `step`; stops on a non-finite loss."""
    records = jax.device_get(self.pending)
    first_step = step - len(records) + 1
    for offset, record in enumerate(records):
      # The loss checks the parameters the step started from; the parameters' norm the ones
      # it made, or without it (train.log_norms off) the gradient's norm: from finite
      # gradients AdamW makes a finite update, unless the parameters overflow.
      norm = "param_norm" if "param_norm" in record else "grad_norm"
      if not (np.isfinite(record["loss_sum"]) and np.isfinite(record[norm])):
        raise TrainingDiverged(
            f"non-finite loss ({record['loss_sum']}) or {norm} ({record[norm]}) at step "
            f"{first_step + offset}; stopping.")
    now = time.perf_counter()  # after device_get: the window's steps are done
    seconds = now - self.window_started
    timed_steps, timed_seconds = len(records), seconds
    if first_step - 1 == self.start_step:  # the session's first step is not timed
      timed_steps -= 1
      timed_seconds = now - self.first_step_done_at if self.first_step_done_at else 0.0
    if timed_steps > 0 and timed_seconds > 0:
      self.progress.timed_tokens += timed_steps * self.tokens_per_step
      self.progress.timed_seconds += timed_seconds
    averaged = _average(records)
    averaged["window_steps"] = len(records)  # the steps averaged (a stop ends a window early)
    averaged["tokens_per_second"] = len(records) * self.tokens_per_step / seconds
    averaged["learning_rate"] = float(self.schedule(step - 1))
    averaged["wall_seconds"] = wall_seconds
    self.writer.write("train", step, averaged)
    eta = (self.config.train.steps - step) * seconds / len(records)
    log(progress_line(step, self.config.train.steps, averaged["loss"],
                      averaged["tokens_per_second"], eta))
    self.pending.clear()
    self.restart_window()
    self.last = averaged
    return averaged


def _average(records: list[dict]) -> dict:
  summed = jax.tree.map(lambda *xs: np.sum(xs, axis=0), *records)
  steps = summed.pop("steps")
  averaged = {k: v / steps for k, v in summed.items() if k not in ("loss_sum", "tokens")}
  averaged["loss"] = summed["loss_sum"] / summed["tokens"]
  return averaged


def _check_finite(val_loss: float, step: int) -> None:
  if not math.isfinite(val_loss):
    raise TrainingDiverged(f"non-finite validation loss ({val_loss}) at step {step}; "
                           "stopping.")


class Evaluator:
  """Validation loss on the fixed subset, written as an EvalRecord."""

  def __init__(self, config: Config, data: Data, mesh: jax.sharding.Mesh, writer: MetricWriter):
    self.data, self.writer = data, writer
    # [A, B/A, L+1]: the training step's micro-batches (train.grad_accum), one at a time.
    t = config.train
    batch_sharding = sharding.batch_sharding(mesh, ndim=3, batch_axis=1)
    self.batches = [jax.make_array_from_process_local_data(
                        batch_sharding, batch.reshape(t.grad_accum, -1, t.context + 1))
                    for batch in data.val_batches]
    self.eval_fn = jax.jit(
        functools.partial(eval_step, model=Decoder(config.model), config=config.model),
        out_shardings=NamedSharding(mesh, PartitionSpec()),
        compiler_options=Kernels().compiler_options())

  def __call__(self, state: TrainState, step: int, progress: Progress) -> float:
    results = jax.device_get([self.eval_fn(state.params, state.model_state, batch)
                              for batch in self.batches])
    val_loss = float(sum(r["loss_sum"] for r in results) / sum(r["tokens"] for r in results))
    layers = lambda name: np.mean([r[name] for r in results], axis=0).tolist()
    record = EvalRecord(step=step, tokens_seen=progress.tokens_seen,
                        wall_seconds=progress.wall_seconds, val_loss=val_loss,
                        val_perplexity=(math.inf if val_loss > _LOG_FLOAT_MAX
                                        else math.exp(val_loss)),  # NaN stays NaN
                        val_bits_per_byte=self.data.bits_per_byte(val_loss),
                        dropped_fraction=layers("dropped_fraction"),
                        expert_load=layers("expert_load"))
    self.writer.write("eval", step, record.values())
    log(f"eval step {step}: val loss {val_loss:.4f} | ppl {record.val_perplexity:.2f} | "
        f"{record.val_bits_per_byte:.4f} bits/byte")
    progress.final_val_loss, progress.eval_step = val_loss, step
    progress.best_val_loss = min(val_loss, progress.best_val_loss or math.inf)
    return val_loss


# The signal that stopped this process's latest call of `train` (None: it was not stopped
# by one): chimera.main exits with 128 + it, as a process killed by it would.
_stopped_by: int | None = None


def stopped_by_signal() -> int | None:
  """The signal (SIGTERM, SIGINT) that stopped the latest `train` call, else None."""
  return _stopped_by


class _StopRequest:
  """Turns SIGTERM / SIGINT into a flag that the loop checks between steps.

  A process that started with SIGINT ignored (a job a script started with `&`: without job
  control the shell has it ignore SIGINT) keeps ignoring it, as Python itself does: Ctrl-C
  at the terminal is not for it. SIGTERM (`kill PID`) stops it."""

  def __init__(self):
    self.requested = False
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      if sig == signal.SIGINT and signal.getsignal(sig) == signal.SIG_IGN:
        continue
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    global _stopped_by
    self.requested, _stopped_by = True, signum

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


# Steps the training loop may have dispatched and not yet finished when it goes on to the
# next. At nanogpt_cpu on 2 CPU cores (600-step runs in ABBA order, medians of 4 each), 2
# trained at 18.3k tokens/s against 20.4k without a bound, and 4 at 20.0k against 19.5k
# (results/cpu-experiments/run-ahead). SIGTERM at step 50 of the small preset stopped it at 55.
MAX_AHEAD = 4


# --- The run. ---------------------------------------------------------------------------


def train(config: Config, workdir: str | Path, *, stop_after: int | None = None,
          resume_hint: str | None = None) -> RunSummary:
  """Trains (or resumes) the run in `workdir`; returns its summary (also summary.json).

  `stop_after`: stop as on SIGTERM (checkpoint, then return) after this many steps in
  this call; the run is resumed by calling again with the same workdir. `resume_hint`:
  how to resume, logged when the run stops early (default: chimera.main's --workdir).
  """
  global _stopped_by
  _stopped_by = None  # this call's stop only (it may end without reaching the loop)
  workdir = Path(workdir)
  config = sharding.resolve_mesh(config, jax.device_count())  # mesh.data unset: every device
  allocator.keep_freed_memory()  # each step's temporaries stay mapped (chimera.allocator)
  with (out_of_memory_is_one_line(f"; {workdir} keeps what it had (its latest checkpoint, "
                                  f"if any)"),
        open_workdir(workdir, config) as saved):
    data = prepare_data(config, functools.partial(check_same_data, workdir,
                                                  resuming=bool(saved)))
    mesh = sharding.make_mesh(config.mesh)
    with jax.set_mesh(mesh):
      checkpointer = Checkpointer(workdir / "checkpoints", keep=config.train.keep_checkpoints,
                                  remove_partial=True)  # open_workdir holds the lock
      hint = resume_hint or f"Run the same command with --workdir={workdir} to resume."
      failed = None  # a write the disk refused: the run is as good as its last checkpoint
      diverged = None  # said with what is on disk once a pending save is done
      try:
        return _train_loop(config, workdir, data, mesh, checkpointer, stop_after, hint)
      except TrainingDiverged as error:
        diverged = error
      except CheckpointWriteFailed as error:
        failed = str(error)
      except OSError as error:  # the log, TensorBoard's events, the summary
        if not is_disk_refusal(error):
          raise
        where = f": {error.filename}" if error.filename else ""
        failed = f"the run's records could not be written in {workdir} ({error.strerror}{where})"
      finally:  # a pending save completes even if the run stops on an error
        try:
          checkpointer.wait()
        except CheckpointWriteFailed as error:
          failed = failed or str(error)
        resumes_from = checkpointer.latest_complete() if failed else ""
        checkpointer.close()
        if failed:
          raise ChimeraError(f"{failed}; {resumes_from}. Make room (or mend the folder), "
                             f"then: {hint[:1].lower() + hint[1:]}") from None
      raise TrainingDiverged(f"{diverged} {_last_good(workdir)}") from None


def _train_loop(config: Config, workdir: Path, data: Data, mesh: jax.sharding.Mesh,
                checkpointer: Checkpointer, stop_after: int | None,
                resume_hint: str) -> RunSummary:
  t = config.train
  state, progress = _restore(config, mesh, checkpointer, workdir)
  start_step = step = int(state.step)  # at most t.steps: open_workdir checked
  summary = RunSummary.load(workdir) if RunSummary.exists(workdir) else None
  if summary and summary.steps == start_step == t.steps:
    log(f"{workdir} already holds a finished run of {t.steps} steps")
    return summary
  if summary and jax.process_index() == 0:
    # A finished run trained on (train.steps raised), or one cut short at its latest
    # checkpoint: its summary and plots are out of date until this session ends it.
    for name in ("summary.json", *RUN_PLOTS):
      (workdir / name).unlink(missing_ok=True)
  progress.trained_by(loaded_code_version())
  writer = MetricWriter(workdir, resume_step=start_step,  # None: a checkpoint from before
                        evaluated_at_resume=progress.eval_step in (None, start_step))  # eval_step
  _log_setup(config, data, mesh, writer, start_step)
  sampler = batches_lib.WindowSampler(data.splits.train, batch_size=t.batch_size,
                                      window=t.context + 1, seed=config.data.seed,
                                      step=start_step, process_index=jax.process_index(),
                                      process_count=jax.process_count(),
                                      micro_batches=t.grad_accum)
  to_batch = functools.partial(jax.make_array_from_process_local_data,
                               sharding.batch_sharding(mesh, ndim=3, batch_axis=1))
  rng, interrupted = jax.random.key(t.seed + 1), False
  step_fn = _compile_train_step(config, mesh, state, rng)
  evaluate = Evaluator(config, data, mesh, writer)
  # Each checkpoint records the config that saved it: chimera.evaluate and chimera.generate
  # refuse a config.json that no longer describes it (evaluate.restore_run).
  saved_config = config_lib.to_dict(config)
  train_log = TrainLog(config, start_step, writer, progress)
  clock = Clock(progress.wall_seconds)
  in_flight = collections.deque()  # the metrics of the steps dispatched, oldest first
  # A stop that comes after the last step (its evaluation, the summary) is noted, not
  # lost: stopped_by_signal() says so, and chimera.main and chimera.compare stop there.
  with _StopRequest() as stop:
    while step < t.steps and not interrupted:
      batch = to_batch(sampler.next().reshape(t.grad_accum, -1, t.context + 1))
      state, step_metrics = step_fn(state, batch, rng)
      # The loop goes on with at most MAX_AHEAD steps dispatched and not done. Left to
      # itself it runs ahead of the device (33 steps at the small preset on 2 CPU cores),
      # and a stop would wait for every step already dispatched.
      in_flight.append(step_metrics)
      if len(in_flight) > MAX_AHEAD:
        jax.block_until_ready(in_flight.popleft())
      train_log.add(step_metrics)
      if step == start_step:  # the session's first step: throughput is timed from its end
        jax.block_until_ready(step_metrics)
        train_log.first_step_done()
      step += 1
      progress.tokens_seen += t.batch_size * t.context
      is_eval = step % t.eval_every == 0 or step == t.steps
      is_save = step % t.checkpoint_every == 0 or step == t.steps
      interrupted = stop.requested or (stop_after is not None and step - start_step >= stop_after)
      if step % t.log_every == 0 or is_eval or is_save or interrupted:
        # Read after the window's steps are done (they run asynchronously); evaluation,
        # saving and the summary all follow a flush, so they read this value too.
        jax.block_until_ready(step_metrics)
        progress.wall_seconds = clock()
        train_log.flush(step, progress.wall_seconds)
      val_loss = evaluate(state, step, progress) if is_eval else None
      if val_loss is not None:
        _check_finite(val_loss, step)  # before it could be saved
      if is_save or interrupted:
        checkpointer.save(step, state, {**progress.to_json(), "config": saved_config},
                          val_loss=val_loss)
      if is_eval or is_save:  # keep evaluation and saving out of the next window's timing
        train_log.restart_window()
    if step >= t.steps and progress.eval_step != step:
      # train.steps lowered to a stopped run's latest checkpoint, or a checkpoint older than
      # Progress.eval_step: no step of this session evaluated the run's end.
      _check_finite(evaluate(state, step, progress), step)  # before the summary says done
    writer.close()
    summary = _summarize(config, data, progress, train_log, step, completed=step >= t.steps,
                         workdir=workdir)
    if not summary.completed:
      log(f"stopped at step {step}; checkpoint saved. {resume_hint}")
      return summary
    checkpointer.wait()  # the summary says the run is done: its last checkpoint is on disk
    if jax.process_index() == 0:
      summary.save(workdir)
    log(f"done: final val loss {summary.final_val_loss:.4f}, best {summary.best_val_loss:.4f}. "
        f"Results in {workdir}/ (summary.json, metrics.jsonl, tensorboard/, checkpoints/)")
    if stop.requested:  # too late to stop short: the run is done, and the caller stops next
      log("a stop was asked for during the run's last step, evaluation or save; the run is "
          "complete")
    return summary


def _restore(config: Config, mesh: jax.sharding.Mesh, checkpointer: Checkpointer,
             workdir: Path) -> tuple[TrainState, Progress]:
  """A fresh state, or the latest checkpoint's, laid out on this mesh."""
  state = init_state(config, mesh)
  if checkpointer.latest_step() is None:
    return state, Progress()
  state, meta = checkpointer.restore(state)  # onto this mesh, whatever the saving one was
  log(f"resumed from {workdir / 'checkpoints'} at step {int(state.step)}")
  return state, Progress.from_json(meta)


def _compile_train_step(config: Config, mesh: jax.sharding.Mesh, state: TrainState,
                        rng: jax.Array):
  """The jitted train step, compiled ahead of the loop, so that the run's clock (and the
  loss-at-equal-time comparisons built on it) leaves compilation out."""
  t = config.train
  started = time.perf_counter()
  replicated = NamedSharding(mesh, PartitionSpec())
  jitted = jax.jit(functools.partial(train_step, model=Decoder(config.model), config=config.model,
                                     log_norms=t.log_norms),
                   donate_argnums=0, compiler_options=Kernels().compiler_options(),
                   out_shardings=(sharding.state_sharding(mesh, state), replicated))
  batch = jax.ShapeDtypeStruct((t.grad_accum, t.batch_size // t.grad_accum, t.context + 1),
                               np.int32, sharding=sharding.batch_sharding(mesh, ndim=3, batch_axis=1))
  compiled = jitted.lower(state, batch, rng).compile()
  cached = jax.config.jax_compilation_cache_dir and jax.config.jax_enable_compilation_cache
  how = " (or read from the compilation cache)" if cached else ""
  log(f"train step: compiled{how} in {time.perf_counter() - started:.1f} s")
  return compiled


def _log_setup(config: Config, data: Data, mesh: jax.sharding.Mesh, writer: MetricWriter,
               start_step: int) -> None:
  counts = accounting.count_run(config)
  if start_step == 0:
    writer.write("setup", 0, {**counts._asdict(), "train_tokens": len(data.splits.train),
                              "val_tokens": len(data.splits.val),
                              "unigram_val_loss": data.unigram_loss})
  log(f"model: {counts.params_total:,} params, {counts.params_active:,} active, "
      f"{counts.flops_per_token / 1e6:.1f} MFLOPs/token; mesh {dict(mesh.shape)}")
  if (note := routers.causality_note(config.model)):
    log(f"note: {note}")


def _summarize(config: Config, data: Data, progress: Progress, train_log: TrainLog, step: int,
               completed: bool, workdir: Path) -> RunSummary:
  # The last logging window: this session's, or, when it trained no step (a run that
  # stopped after its final checkpoint and before summary.json), the log's last row.
  # (Process 0 writes the log; the others summarize without it.)
  last = train_log.last
  if last is None and (workdir / "metrics.jsonl").exists():
    last = (read_events(workdir, "train") or [None])[-1]
  last = last or {}
  moe_field = lambda name: np.asarray(last[name]).tolist() if config.model.num_experts and name in last else []
  return RunSummary(
      name=config.name, completed=completed, steps=step, tokens_seen=progress.tokens_seen,
      wall_seconds=progress.wall_seconds, train_tokens_per_second=train_log.tokens_per_second,
      final_val_loss=progress.final_val_loss, best_val_loss=progress.best_val_loss,
      val_bits_per_byte=(None if progress.final_val_loss is None
                         else data.bits_per_byte(progress.final_val_loss)),
      unigram_val_loss=data.unigram_loss,
      accounting=accounting.count_run(config)._asdict(),
      config=config_lib.to_dict(config), expert_load=moe_field("expert_load"),
      dropped_fraction=moe_field("dropped_fraction"), device=device_name(),
      code=list(progress.code))
