"""A trained run's loss on its whole validation split, not the fixed subset.

  python -m chimera.evaluate --workdir=runs/moe_top2 [--step=2000] [--batch_size=64] [--corpus=PATH]

Training evaluates on `train.eval_batches` fixed windows: cheap, and the same windows for
every model and seed, so runs compare paired. That subset is a sample of the split,
though: at the end of the nanogpt_cpu run it said 1.8909 and the split 1.8879, and
nanoGPT's 20 random batches said 1.8740 where its split said 1.8930 (results/nanogpt_cpu).

This reads the run's config.json and a checkpoint (the latest, or --step), cuts the
validation split into consecutive windows of the training context, so that every token
but the first is predicted once, from the tokens before it in its window, and prints the
mean loss over all of them in nats per token, and in bits per byte of the text those
tokens stand for (their own bytes, not the split's average per token). One process, the
checkpoint restored onto the default device.

A router that is not causal (chimera.routers.is_causal: "rank" priority with top_k >= 2
and capacity drops) lets a token's routing depend on later tokens of its group, so its
loss is not a language model's loss; the command says so on stderr.
"""

import dataclasses
import functools
import json
import math
import sys
from pathlib import Path

import jax
import numpy as np
from absl import app, flags, logging

from chimera import compile_cache, config as config_lib
from chimera.checkpoints import CheckpointMismatch, Checkpointer
from chimera.data.tokenizers import get_tokenizer
from chimera.decoder import Decoder
from chimera.errors import ChimeraError, parse_flags, tool_main
from chimera.layers import Kernels
from chimera.routers import causality_note
from chimera.steps import eval_step, init_state
from chimera.train import check_same_data, prepare_data, recorded_config, saved_steps


@dataclasses.dataclass(frozen=True)
class SplitLoss:
  step: int  # the checkpoint evaluated
  loss: float  # nats per predicted token, over the whole split
  bits_per_byte: float  # over the bytes of the predicted tokens
  tokens: int  # tokens predicted
  windows: int
  text_bytes: int  # the bytes the predicted tokens stand for
  note: str | None = None  # chimera.routers.causality_note: why this is no LM loss


def windows(tokens: np.ndarray, context: int) -> np.ndarray:
  """[N, context + 1] consecutive windows that overlap by one token, so each token but the
  first is a target exactly once; the split's tail that fills no window is left out."""
  count = (len(tokens) - 1) // context
  if count < 1:
    raise ChimeraError(f"the validation split has {len(tokens)} tokens, fewer than one "
                       f"window of context {context} + 1")
  starts = np.arange(count) * context
  return np.asarray(tokens)[starts[:, None] + np.arange(context + 1)]


def run_config(workdir: str | Path, step: int | None = None) -> tuple[config_lib.Config, int, Path]:
  """(config, step, where the config was read) of the run in `workdir` at checkpoint
  `step` (the latest if None), checked against the checkpoint's own record; nothing is
  restored or compiled, so a program can check its flags against the run first.
  ChimeraError naming what is missing."""
  workdir = Path(workdir)
  config_path = workdir / "config.json"
  if workdir.exists() and not workdir.is_dir():
    raise ChimeraError(f"--workdir: {workdir} is a file, not a directory")
  if not workdir.is_dir():
    raise ChimeraError(f"--workdir: {workdir} does not exist")
  config = None
  if config_path.is_file():
    try:
      config = config_lib.from_dict(json.loads(config_path.read_text()))
      config_lib.validate(config)
    except ChimeraError as error:  # a field out of range, a derived field that cannot resolve
      raise ChimeraError(f"--workdir: {config_path}: {error}") from None
    except (TypeError, KeyError, ValueError) as error:  # TypeError: null for a number, ...
      raise ChimeraError(f"--workdir: {config_path} is not a config this version can read "
                         f"({type(error).__name__}: {error}); without it, the config each "
                         f"checkpoint recorded is read (since 2026-11-28)") from None
  available = saved_steps(workdir)
  if not available:
    raise ChimeraError(f"--workdir: {workdir} " + ("has no checkpoint yet" if config
                                                   else "holds no run (no config.json)"))
  step = available[-1] if step is None else step
  if step not in available:
    raise ChimeraError(f"--step: no checkpoint at step {step} in {workdir} (it has "
                       f"{', '.join(map(str, available))})")
  # The config the checkpoint was saved with (checkpoints since 2026-11-28 record it):
  # arrays of the same shapes do not make it the same model (top_k, heads, the router),
  # and a config.json of other shapes is named by its fields. A damaged one is left to
  # the restore below to name.
  recorded = recorded_config(workdir, step, damaged_ok=True)
  if config is None and recorded is None:
    raise ChimeraError(f"--workdir: {workdir} holds checkpoints that do not record their "
                       f"config (saved before 2026-11-28) and no config.json")
  if config is None:  # config.json deleted: the checkpoint's own record
    config, config_path = recorded, workdir / "checkpoints" / str(step)  # named in errors
    try:
      config_lib.validate(config)
    except ChimeraError as error:
      raise ChimeraError(f"--workdir: {config_path}: {error}") from None
  differing = recorded and config_lib.run_differences(
      recorded, config, corpus_may_move=True)  # resumed from a new path
  if differing:
    raise ChimeraError(f"--workdir: {config_path} does not describe the checkpoint at "
                       f"step {step}: it was saved with other {', '.join(differing)}")
  return config, step, config_path


def restore_state(workdir: str | Path, config: config_lib.Config, step: int, config_path: Path):
  """The state of checkpoint `step` in `workdir`, restored onto the default device, for
  `config` and `config_path` from `run_config`."""
  workdir = Path(workdir)
  like = init_state(config)  # outside the try: running out of memory is not a damaged file
  checkpointer = None
  try:  # orbax lists every checkpoint as the manager opens: a live run may delete one
    checkpointer = Checkpointer(workdir / "checkpoints", keep=config.train.keep_checkpoints)
    state, meta = checkpointer.restore(like, step)
  except CheckpointMismatch as error:  # a config.json copied from, or edited after, another run
    raise ChimeraError(f"--workdir: {config_path} does not describe the checkpoint at "
                       f"step {step}: {error.difference}") from None
  except FileNotFoundError:  # deleted under us: a run still training here keeps only the last few
    raise ChimeraError(f"--workdir: the checkpoint at step {step} in {workdir} was removed "
                       f"while it was read (is a run still training there?); try again") from None
  except PermissionError as error:
    raise ChimeraError(f"--workdir: cannot read the checkpoints in {workdir} "
                       f"({error.strerror}: {error.filename})") from None
  except Exception as error:
    # orbax's, on a damaged checkpoint; an array file cut short is a bare Exception
    # ("Encountered error while reading array index"), which nothing else raises.
    if not (isinstance(error, (KeyError, ValueError, OSError)) or type(error) is Exception):
      raise
    raise ChimeraError(f"--workdir: the checkpoint at step {step} in {workdir} cannot be "
                       f"read, incomplete or damaged ({type(error).__name__}); the run's "
                       f"checkpoints: {', '.join(map(str, saved_steps(workdir)))} "
                       f"(--step)") from None
  finally:
    if checkpointer is not None:
      checkpointer.close()
  return state


def run_data(workdir: str | Path, config: config_lib.Config, corpus: str | None = None):
  """(config, data): the run's split, as training loaded it, from `corpus` if given (the
  run's corpus, moved since it trained), and checked to be the run's text (data.json)
  before it is cut into windows: other text is refused as such, not as too short."""
  if corpus and not (Path(workdir) / "data.json").exists():
    print(f"note: {workdir} has no data.json (a run from before 2026-11-28), so the text of "
          f"--corpus cannot be checked against the run's: what follows is of {corpus}, "
          f"whatever the run trained on", file=sys.stderr)
  if corpus:
    config = dataclasses.replace(config, data=dataclasses.replace(
        config.data, corpus=config_lib.absolute_corpus(corpus)))
  try:
    return config, prepare_data(config, functools.partial(
        check_same_data, Path(workdir), resuming=True, record_move=False))
  except ChimeraError as error:
    if "no such file" not in str(error) or corpus:
      raise
    raise ChimeraError(f"{error} (if the run's corpus moved, pass its new path: "
                       f"--corpus=PATH)") from None


def restore_run(workdir: str | Path, step: int | None = None):
  """(config, state, step) of the run in `workdir` at checkpoint `step` (the latest if
  None), restored onto the default device; ChimeraError naming what is missing."""
  config, step, config_path = run_config(workdir, step)
  return config, restore_state(workdir, config, step, config_path), step


def split_loss(workdir: str | Path, step: int | None = None,
               batch_size: int | None = None, corpus: str | None = None) -> SplitLoss:
  """The validation-split loss of the run in `workdir` at checkpoint `step` (latest if
  None), `batch_size` windows per forward pass (if None, the run's micro-batch,
  train.batch_size / train.grad_accum; rounded down to whole routing groups where a group
  holds several sequences). `corpus`: the run's corpus at another path (moved since it
  trained; its text must be the run's, as data.json records it)."""
  config, step, config_path = run_config(workdir, step)  # the data is checked before the restore
  config, data = run_data(workdir, config, corpus)
  rows = windows(data.splits.val, config.train.context)
  # A routing group of several sequences routes them together: every batch holds whole
  # groups, and a tail of windows too short for one is left out (and not counted).
  per_group = max(1, (config.model.group_size or 0) // config.train.context)
  if len(rows) < per_group:
    raise ChimeraError(f"the validation split has {len(rows)} windows, fewer than one "
                       f"routing group of {per_group} (model.group_size)")
  rows = rows[:len(rows) - len(rows) % per_group]
  batch_size = batch_size or config.train.batch_size // config.train.grad_accum
  batch_size = max(per_group, batch_size // per_group * per_group)
  state = restore_state(workdir, config, step, config_path)
  evaluate = jax.jit(functools.partial(eval_step, model=Decoder(config.model),
                                       config=config.model),
                     compiler_options=Kernels().compiler_options())
  loss_sum = 0.0
  for start in range(0, len(rows), batch_size):  # the last batch may be short: one recompile
    out = evaluate(state.params, state.model_state, rows[start:start + batch_size])
    loss_sum += float(out["loss_sum"])
  tokens = rows.shape[0] * config.train.context
  # The bytes of exactly the tokens scored (end-of-text counts 0), not the split's average
  # per token: the first token and the tail are not predicted.
  text_bytes = int(get_tokenizer(config.data.tokenizer).token_bytes[rows[:, 1:]].sum())
  if text_bytes == 0:
    raise ChimeraError("the validation windows hold no text (only end-of-text tokens)")
  return SplitLoss(step=step, loss=loss_sum / tokens,
                   bits_per_byte=loss_sum / math.log(2) / text_bytes, tokens=tokens,
                   windows=rows.shape[0], text_bytes=text_bytes,
                   note=causality_note(config.model))


def define_flags() -> None:
  """Command-line flags, defined only when this runs as a program (its functions are a
  library too, and chimera.generate defines its own --workdir)."""
  flags.DEFINE_string("workdir", None, "A run's workdir (chimera.main's).")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
  flags.DEFINE_integer("batch_size", None, "Windows per forward pass (default: the run's micro-batch, "
                       "train.batch_size / train.grad_accum).")
  flags.DEFINE_string("corpus", None, "The run's corpus at another path, if it moved since "
                      "the run trained (its text must be the run's).")


@tool_main
def main(argv):
  del argv
  FLAGS = flags.FLAGS
  logging.set_verbosity(logging.WARNING)  # orbax logs every restore at INFO
  compile_cache.enable()  # a $CHIMERA_CACHE that cannot be a folder is one line (tool_main)
  if not FLAGS.workdir:
    raise ChimeraError("--workdir is required")
  if FLAGS.batch_size is not None and FLAGS.batch_size < 1:
    raise ChimeraError(f"--batch_size: must be >= 1, got {FLAGS.batch_size}")
  result = split_loss(FLAGS.workdir, FLAGS.step, FLAGS.batch_size, FLAGS.corpus)
  if result.note:
    print(f"note: {result.note}", file=sys.stderr)
  print(f"{FLAGS.workdir}, step {result.step}: validation split {result.loss:.4f} nats per "
        f"token, {result.bits_per_byte:.4f} bits per byte ({result.tokens:,} tokens in "
        f"{result.windows:,} windows)")


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=parse_flags)
