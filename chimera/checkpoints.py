"""Checkpoints, all through orbax's CheckpointManager.

Each checkpoint holds two items: `state` (the TrainState's arrays) and `meta` (JSON: the
run's `Progress`: tokens seen, the validation losses so far, training time so far; the batch
sampler needs no state of its own, it is rebuilt from the step). Orbax writes
each one into a temporary directory and renames it when complete, so a crash mid-save
leaves the previous checkpoint intact. Retention: the latest `keep` checkpoints, plus the
one with the best validation loss.
"""

import contextlib
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from chimera.errors import DISK_REFUSALS, ChimeraError, hook_without


def _not_an_expected_warning(record: logging.LogRecord) -> bool:
  """Orbax warns at every save without metrics once best_fn is set (see Checkpointer);
  saves between evaluations have none by design. Reading an item's metadata
  (Checkpointer.mismatch) warns that the item has no metadata file of its own, which the
  manager's items never have."""
  message = record.getMessage()
  return not ("did not provide metrics" in message
              or ("Metadata file does not exist" in message and "_CHECKPOINT_METADATA" in message))


logging.getLogger("absl").addFilter(_not_an_expected_warning)

# How the filesystem refusing a write reads in an OSError's text and in tensorstore's.
_DISK_REFUSAL_TEXTS = tuple(text for code in DISK_REFUSALS
                            for text in (os.strerror(code), f"[os_error_code='{code}']"))


def _not_a_refused_write(record: logging.LogRecord) -> bool:
  """Orbax logs a save the disk refused (full, over quota, read-only) as errors with
  tracebacks from each of its threads, hundreds of lines, and asyncio may log the same
  error again for the futures of orbax's writes ("exception was never retrieved"); the
  run then stops on CheckpointWriteFailed, which says it in one line. Drops orbax's and
  asyncio's records of that refusal only: any other error is logged as it was."""
  if record.levelno < logging.ERROR or not ("orbax" in record.pathname
                                            or record.name == "asyncio"):
    return True
  text = record.getMessage()
  if record.exc_info:
    text += "".join(traceback.format_exception(*record.exc_info))
  return not any(mark in text for mark in _DISK_REFUSAL_TEXTS)


for _logger in ("absl", "asyncio"):
  logging.getLogger(_logger).addFilter(_not_a_refused_write)


def _is_closed_loop(error: BaseException) -> bool:
  """When a save fails, orbax closes the event loop of its writes while tensorstore still
  has callbacks to deliver to it: each one raised "Event loop is closed", printed as an
  unraisable exception's traceback that no one can act on (CheckpointWriteFailed says
  what went wrong, in one line)."""
  return isinstance(error, RuntimeError) and str(error) == "Event loop is closed"


sys.unraisablehook = hook_without(sys.unraisablehook,
                                  lambda args: _is_closed_loop(args.exc_value))


class CheckpointMismatch(ChimeraError):
  """The checkpoint's arrays are not the model's (Checkpointer.mismatch says how)."""

  def __init__(self, message: str, difference: str):
    super().__init__(message)
    self.difference = difference


def saved_meta(directory: Path, step: int) -> dict:
  """The meta a Checkpointer in `directory` saved at `step`, read in this process alone
  (the JSON item's handler, with no manager: neither has a barrier with other processes,
  as a manager's restore does). FileNotFoundError if it is not there."""
  return dict(ocp.JsonCheckpointHandler().restore(Path(directory) / str(step) / "meta"))


class CheckpointWriteFailed(ChimeraError):
  """A checkpoint could not be written (a full disk, a quota, a folder gone read-only).
  The checkpoints before it are complete: orbax renames a checkpoint into place only once
  it is whole."""


def _write_failure(error: Exception) -> str | None:
  """The reason, if `error` is the filesystem refusing a write (orbax reports tensorstore's
  as a ValueError that carries the OS error code); None for anything else."""
  if isinstance(error, OSError):
    return error.strerror or str(error)
  if isinstance(error, ValueError) and "os_error_code" in str(error):
    return str(error).split(": ")[-1].split(" [os_error_code")[0]
  return None


class Checkpointer:

  def __init__(self, directory: Path, keep: int, *, remove_partial: bool = False):
    """`remove_partial`: remove the folders of saves a killed run left half-written (orbax
    renames a save into place only once it is whole), as only the run holding the
    workdir's lock may: a reader (chimera.evaluate) beside a live run would remove the
    save it is writing."""
    val_loss = lambda metrics: metrics["val_loss"]
    keep_best = policies.BestN(get_metric_fn=val_loss,
                               reverse=True,  # sorted descending: the last one is the lowest
                               n=1, keep_checkpoints_without_metrics=False)
    # best_fn only makes orbax write each checkpoint's metrics to disk (retention is the
    # preservation policy's): without them, a resumed run's manager would see the best
    # checkpoint without its val_loss and delete it at the next save.
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policies.AnyPreservationPolicy([policies.LatestN(n=keep), keep_best]),
        best_fn=val_loss, best_mode="min", create=True, cleanup_tmp_directories=remove_partial)
    self.directory = Path(directory).absolute()
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "meta"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any, meta: dict, val_loss: float | None = None) -> None:
    """Saves `state` and `meta` at `step`; `val_loss` (if evaluated at this step) ranks it.
    CheckpointWriteFailed if the filesystem refuses it (or the save before it, which
    orbax finishes here)."""
    with self._refused_writes():
      self._manager.save(
          step,
          args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  meta=ocp.args.JsonSave(meta)),
          metrics=None if val_loss is None else {"val_loss": float(val_loss)},
          force=True)

  @contextlib.contextmanager
  def _refused_writes(self):
    try:
      yield
    except (OSError, ValueError) as error:
      reason = _write_failure(error)
      if reason is None:
        raise
      raise CheckpointWriteFailed(f"a checkpoint could not be written in {self.directory} "
                                  f"({reason})") from None

  def latest_complete(self) -> str:
    """Which checkpoint a run stopped now would resume from, in words."""
    complete = self.all_steps()
    return (f"the latest complete checkpoint is step {complete[-1]}" if complete
            else "no checkpoint is complete")

  def mismatch(self, like_state: Any, step: int) -> str | None:
    """How the arrays saved at `step` differ from `like_state`'s names and shapes (the
    first few differences, parameters first), read from the checkpoint's metadata
    without reading an array; None if they agree."""
    folder = Path(self._manager.directory) / str(step) / "state"
    if not folder.is_dir():
      return None  # a layout this check does not know: the restore itself will tell
    with ocp.StandardCheckpointer() as reader:
      saved = ocp.tree.to_flat_dict(reader.metadata(folder).item_metadata)
    wanted = ocp.tree.to_flat_dict(ocp.tree.serialize_tree(like_state, keep_empty_nodes=True))
    shape = lambda leaf: tuple(getattr(leaf, "shape", ()) or ())
    differences = []
    for key in sorted(set(saved) | set(wanted), key=lambda k: (k[0] != "params", k)):
      name = "/".join(map(str, key))
      if key not in wanted:
        differences.append(f"{name} is in the checkpoint, not in the model")
      elif key not in saved:
        differences.append(f"{name} is in the model, not in the checkpoint")
      elif shape(saved[key]) != shape(wanted[key]):
        differences.append(f"{name} is {shape(saved[key])} in the checkpoint, "
                           f"{shape(wanted[key])} in the model")
    if not differences:
      return None
    more = f" (and {len(differences) - 3} more)" if len(differences) > 3 else ""
    return "; ".join(differences[:3]) + more

  def restore(self, like_state: Any, step: int | None = None) -> tuple[Any, dict]:
    """Restores (state, meta) at `step` (default: latest), with `like_state`'s structure,
    shapes, dtypes and shardings. CheckpointMismatch, before reading an array, if the
    checkpoint's arrays are not `like_state`'s (see `mismatch`)."""
    step = self._manager.latest_step() if step is None else step
    if (difference := self.mismatch(like_state, step)):
      raise CheckpointMismatch(f"the checkpoint at step {step} in {self._manager.directory} "
                               f"does not hold this config's model: {difference}", difference)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like_state)
    restored = self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                      meta=ocp.args.JsonRestore()))
    return restored.state, restored.meta

  def meta(self, step: int) -> dict:
    """The meta saved at `step`, without reading an array (see `saved_meta`)."""
    return saved_meta(Path(self._manager.directory), step)

  def wait(self) -> None:
    """Until the last save is on disk; CheckpointWriteFailed as `save`."""
    with self._refused_writes():
      self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()
