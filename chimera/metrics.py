"""Where a run's numbers go: WORKDIR/metrics.jsonl, TensorBoard events, and the console.

Only process 0 writes; on other processes every method is a no-op.
"""

import json
import sys
import time
from pathlib import Path

import jax
import numpy as np
from tensorboardX import SummaryWriter


def _plain(value):
  """JSON-friendly: arrays become (nested) lists of floats."""
  if isinstance(value, (np.ndarray, jax.Array)):
    return np.asarray(value).tolist()
  if isinstance(value, (np.floating, np.integer)):
    return value.item()
  return value


class MetricWriter:
  """Appends one JSON object per event (each with `step`) and mirrors scalars to TensorBoard."""

  def __init__(self, workdir: Path):
    self.enabled = jax.process_index() == 0
    if not self.enabled:
      return
    self._jsonl = open(Path(workdir) / "metrics.jsonl", "a")
    self._tensorboard = SummaryWriter(str(Path(workdir) / "tensorboard"))

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
  return (f"step {step:>6}/{steps} | loss {loss:.4f} | {tokens_per_second / 1e3:7.1f}k tok/s"
          f" | ETA {format_duration(eta_seconds)}")
