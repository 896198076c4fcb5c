"""Where a run's numbers go: WORKDIR/metrics.jsonl, TensorBoard events, and the console.

Only process 0 writes; on other processes every method is a no-op.
"""

import itertools
import json
import os
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
from tensorboardX import SummaryWriter, event_file_writer

from chimera.data.corpora import write_atomic
from chimera.errors import hook_without, is_disk_refusal
from chimera.records import read_jsonl


def _reported_by_the_run(args) -> bool:
  """A log the disk refuses stops the run in one line (chimera.train), from the main
  thread's own write, or its flush after every write. tensorboardX's writer thread meets
  the same file's errors, and at exit its atexit hook flushes the abandoned writer again:
  each printed a traceback of what that line has already said. Dropped: the disk's
  refusals anywhere, and any OSError in tensorboardX's writer thread (at exit, after a
  refusal, "handle is closed"). Everything else is printed as before."""
  error = args.exc_value
  thread = getattr(args, "thread", None)
  return is_disk_refusal(error) or (isinstance(error, OSError)
                                    and isinstance(thread, _TENSORBOARD_THREAD))


# tensorboardX's private writer thread class; () (nothing is one) if a release renames it.
_TENSORBOARD_THREAD = getattr(event_file_writer, "_EventLoggerThread", ())


threading.excepthook = hook_without(threading.excepthook, _reported_by_the_run)
sys.unraisablehook = hook_without(sys.unraisablehook, _reported_by_the_run)


def _plain(value):
  """JSON-friendly: arrays become (nested) lists of floats."""
  if isinstance(value, (np.ndarray, jax.Array)):
    return np.asarray(value).tolist()
  if isinstance(value, (np.floating, np.integer)):
    return value.item()
  return value


def truncate_after(path: Path, step: int, eval_at_step: bool = True) -> int:
  """Drops the records of steps after `step` from a metrics.jsonl (atomically), and a last
  line cut short by a crash; returns how many rows were dropped. A run that crashed after
  its last checkpoint wrote such rows, and the resumed run writes those steps again.
  `eval_at_step` False: the checkpoint at `step` records no evaluation there, so an eval
  row at `step` came after it too (an evaluation a stopped run's end gets when resumed)."""
  if not path.exists():
    return 0
  text = path.read_text()
  records, torn = read_jsonl(path, text)
  kept = [record for record in records if record["step"] < step or (
      record["step"] == step and (eval_at_step or record["event"] != "eval"))]
  dropped = len(records) - len(kept) + torn
  if dropped or (text and not text.endswith("\n")):  # the next row starts a line of its own
    write_atomic(path, "".join(json.dumps(record) + "\n" for record in kept).encode())
  return dropped


_SESSIONS = itertools.count()  # MetricWriters opened by this process


class MetricWriter:
  """Appends one JSON object per event (each with `step`) and mirrors scalars to TensorBoard.

  `resume_step`: the step a resumed run restarts from; later rows are dropped first, and
  an eval row at that step too unless `evaluated_at_resume` (its checkpoint records one).
  """

  def __init__(self, workdir: Path, resume_step: int = 0, evaluated_at_resume: bool = True):
    self.enabled = jax.process_index() == 0
    if not self.enabled:
      return
    jsonl = Path(workdir) / "metrics.jsonl"
    # A run that starts at step 0 writes its log afresh: rows there (its setup row among
    # them) came from an attempt that saved no checkpoint.
    dropped = truncate_after(jsonl, resume_step if resume_step > 0 else -1, evaluated_at_resume)
    if dropped:
      log(f"metrics.jsonl: dropped {dropped} rows written after the step-{resume_step} "
          f"checkpoint by the interrupted run" if resume_step > 0 else
          f"metrics.jsonl: dropped {dropped} rows of an earlier start that saved no checkpoint")
    self._jsonl = open(jsonl, "a")
    board = Path(workdir) / "tensorboard"
    if resume_step == 0 and board.is_dir():  # likewise, that attempt's TensorBoard events
      stale = list(board.glob("events.out.tfevents.*"))
      for events in stale:
        events.unlink()
      if stale:
        log(f"tensorboard/: removed {len(stale)} event files of an earlier start that saved "
            f"no checkpoint")
    # TensorBoard hides the events an interrupted run wrote past the checkpoint (a
    # SessionLog.START at purge_step), as metrics.jsonl drops its rows.
    # Event files are named by the second they open in, and TensorBoard reads them in name
    # order. Two sessions in the same second: the nanosecond (19 digits, so text order is
    # time order) keeps them in order, and the pid and a count apart ("10" sorted before
    # "9" when the count came first).
    self._tensorboard = SummaryWriter(
        str(Path(workdir) / "tensorboard"),
        purge_step=resume_step + 1 if resume_step > 0 else None,
        filename_suffix=f".{time.time_ns()}.{os.getpid()}.{next(_SESSIONS)}")

  def write(self, event: str, step: int, values: dict) -> None:
    if not self.enabled:
      return
    record = {"event": event, "step": step, "time": time.time()}
    record.update({k: _plain(v) for k, v in values.items()})
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    for name, value in values.items():
      value = np.asarray(value)
      if value.ndim == 0 and np.issubdtype(value.dtype, np.number):
        self._tensorboard.add_scalar(f"{event}/{name}", float(value), step)
      elif value.ndim == 1 and value.size and np.issubdtype(value.dtype, np.floating):
        for layer, item in enumerate(value):  # per-MoE-layer metrics
          self._tensorboard.add_scalar(f"{event}/{name}/moe_layer_{layer}", float(item), step)
    self._tensorboard.flush()

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tensorboard.close()


def log(message: str) -> None:
  """A console line, from process 0 only."""
  if jax.process_index() == 0:
    print(message, file=sys.stderr, flush=True)


def format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  hours, rest = divmod(seconds, 3600)
  return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def progress_line(step: int, steps: int, loss: float, tokens_per_second: float,
                  eta_seconds: float) -> str:
  rate = (f"{tokens_per_second / 1e3:7.1f}k" if tokens_per_second >= 1e3
           else f"{tokens_per_second:8.1f}")  # a slow step (a GPU preset on a CPU) is not 0.0k
  return (f"step {step:>6}/{steps} | loss {loss:.4f} | {rate} tok/s"
          f" | ETA {format_duration(eta_seconds)}")
