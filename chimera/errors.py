import contextlib
import errno
import os
import re
from pathlib import Path

# The filesystem refusing a write (full, over quota, read-only): a run or a report stops on
# it with one line, and keeps what it had written.
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
DISK_REFUSALS = (*DISK_FULL, errno.EROFS)


def is_disk_refusal(error: BaseException) -> bool:
  """Whether `error` is the filesystem refusing a write (full, over quota, read-only)."""
  return isinstance(error, OSError) and error.errno in DISK_REFUSALS


def hook_without(previous, drop):
  """A sys.unraisablehook or threading.excepthook that hands `previous` every exception
  but those `drop(args)` (the hook's argument: its exc_value, and for a thread's, the
  thread) says a one-line error already reports."""
  def hook(args):
    if not drop(args):
      previous(args)
  return hook


class ChimeraError(ValueError):
    """A user-facing error: one line that names the bad field or file."""


@contextlib.contextmanager
def out_of_memory_is_one_line(after: str = ""):
  """Turns XLA running out of device memory (a JaxRuntimeError of RESOURCE_EXHAUSTED or
  "Out of memory ...", at compile or run time) into a ChimeraError: one line with the
  allocation that failed and what to lower, then `after`. Other errors pass through."""
  try:
    yield
  except RuntimeError as error:
    text = str(error)
    # A RESOURCE_EXHAUSTED of something else (a multi-host service) is not this.
    memory = "Out of memory" in text or ("RESOURCE_EXHAUSTED" in text and "memory" in text.lower())
    if type(error).__name__ != "JaxRuntimeError" or not memory:
      raise
    size = re.search(r"allocat\w* (\d+) bytes", text)
    need = f" (an allocation of {int(size.group(1)) / 2**30:.2f} GiB failed)" if size else ""
    raise ChimeraError(f"out of device memory{need}: lower train.batch_size (train.grad_accum "
                       f"keeps the batch per update), train.context or the model{after}"
                       ) from None
  except MemoryError:  # the host's (numpy, or XLA:CPU's buffers past a ulimit)
    raise ChimeraError(f"out of host memory: lower train.batch_size, train.context or the "
                       f"model{after}") from None


def tool_main(main):
  """A measuring tool's absl `main`, whose bad input (ChimeraError), running out of memory
  and Ctrl-C each end it with one line (exit status 2, 2 and 130), not a traceback."""
  import functools
  import sys

  @functools.wraps(main)
  def wrapped(argv):
    try:
      with out_of_memory_is_one_line():
        return main(argv)
    except ChimeraError as error:
      print(f"error: {error}", file=sys.stderr)
      sys.exit(2)
    except KeyboardInterrupt:
      print("error: interrupted (Ctrl-C); what was printed is all that was measured",
            file=sys.stderr)
      sys.exit(130)
  return wrapped


def parse_flags_and_args(argv: list[str]) -> list[str]:
  """absl's flag parser for `app.run(main, flags_parser=...)`, with a bad flag (unknown,
  or a value its type or enum refuses) reported as one line and exit status 2. Returns
  the program name and the positional arguments, for a tool that takes some."""
  import sys

  from absl import flags
  try:
    return flags.FLAGS(argv)
  except flags.Error as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)


def refuse_arguments(argv: list[str]) -> None:
  """A ChimeraError for a positional argument after the program name ("seeds=5", its "--"
  forgotten, or anything after a bare "--"), which a tool that takes none would ignore."""
  if len(argv) > 1:
    raise ChimeraError(f"unexpected argument {argv[1]!r} (flags start with --)")


def parse_flags(argv: list[str]) -> list[str]:
  """As `parse_flags_and_args`, for a tool that takes no positional argument: one given
  is refused in one line (`refuse_arguments`) rather than ignored."""
  import sys

  remaining = parse_flags_and_args(argv)
  try:
    refuse_arguments(remaining)
  except ChimeraError as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)
  return remaining


def check_writable(flag: str, path: str | os.PathLike, folder: bool) -> None:
  """A ChimeraError naming --`flag` for a file (or, `folder`, a directory) that a tool
  writes only after its work, if it could not be written there; checked before the work.
  Missing folders above it are fine (the tool makes them)."""
  path = Path(path).absolute()
  if path.exists() and path.is_dir() != folder:
    raise ChimeraError(f"--{flag}: {path} is a {'file' if folder else 'directory'}")
  existing = existing_ancestor(path if folder else path.parent)
  if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
    raise ChimeraError(f"--{flag}: cannot write under {existing}")


def existing_ancestor(path: str | os.PathLike) -> Path:
  """`path` if it exists, else the nearest folder (or file) above it that does."""
  path = Path(path).absolute()
  return next(p for p in (path, *path.parents) if p.exists())
