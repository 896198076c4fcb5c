"""Train, evaluate and checkpoint one model.

  python -m chimera.main --config=configs/moe_top2.py [--workdir=DIR] [--config.train.steps=N]

A workdir that already holds a checkpoint is resumed. Without --workdir, a new
runs/<config>-<timestamp> is made.
"""

import sys
import time
from pathlib import Path

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from chimera import compile_cache, config as config_lib, sharding
from chimera.errors import ChimeraError, refuse_arguments

_CONFIG = config_flags.DEFINE_config_file("config", None, "A configs/*.py file[:preset].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (resumed if it has a checkpoint).")
_STOP_AFTER = flags.DEFINE_integer(
    "stop_after", None, "Checkpoint and exit (status 0) after this many steps.")
flags.mark_flag_as_required("config")


def check_config_keys(args: list[str]) -> None:
  """Refuses a --config.KEY that is not section.field or name, in one line of its own
  (ml_collections' were "string indices must be integers" for --config.name.x, a Python
  ast node for --config.model=foo)."""
  for arg in args:
    if not arg.startswith("--config."):
      continue
    key = arg.removeprefix("--config.").split("=")[0]
    parts = key.split(".")
    if parts[0] == "name" and len(parts) > 1:
      raise ChimeraError(f"--config.{key}: config.name is a string, not a section")
    if parts[0] in config_lib.SECTIONS and len(parts) != 2:
      raise ChimeraError(
          f"--config.{key}: a section; set one of its fields, --config.{key}.FIELD=value "
          f"(chimera/config.py's {config_lib.SECTIONS[key].__name__})" if len(parts) == 1
          else f"--config.{key}: {parts[0]}.{parts[1]} is a field, not a section")


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parser, with a bad flag, config file or config key reported as one line."""
  try:
    given = [arg.split("=", 1)[1] if "=" in arg else value  # --config=FILE, --config FILE
             for arg, value in zip(argv[1:], argv[2:] + [""])
             if arg.startswith("--config=") or arg == "--config"]
    config_file = given[-1].split(":")[0] if given else ""  # the last --config counts
    if config_file and not Path(config_file).is_file():
      raise ChimeraError(f"--config: no such file: {config_file}")
    check_config_keys(argv[1:])
    remaining = flags.FLAGS(argv)
    _CONFIG.value["model"]  # config files load lazily: make their errors surface here
    return remaining
  except Exception as error:  # absl and ml_collections raise several kinds here
    if config_file and (message := config_lib.config_file_error(error, config_file)):
      print(f"error: --config: {message}", file=sys.stderr)
      sys.exit(2)
    text = str(error).strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":  # a KeyError's repr
      text = text[1:-1]
    text = text.replace("\\n", "\n").replace("\\'", "'")
    lines = [line.strip(" \\") for line in text.splitlines() if line.strip(" \\")]
    # A config file that failed to import carries its whole traceback: keep the last line.
    message = lines[-1] if "Traceback" in text else " ".join(lines)
    message = message.removeprefix("chimera.errors.ChimeraError: ")
    key = lines[0].strip("'\"") if lines else ""
    if " " not in key:  # ml_collections names the unknown key (and a guess): say which flag
      flag = next((arg.split("=")[0] for arg in argv[1:] if arg.startswith("--config.")
                   and key in arg.split("=")[0].split(".")), None)
      if flag:
        # ml_collections guesses within the section; a field named at the top level (or in
        # another section) is found by its name in every section.
        elsewhere = [f"--config.{section}.{key}" for section, fields in
                     config_lib.SECTIONS.items() if key in fields.__dataclass_fields__
                     and f"--config.{section}.{key}" != flag]
        guess = " ".join(lines[1:]) or (
            f"did you mean {' or '.join(elsewhere)}?" if elsewhere else "")
        message = f"{flag}: no such config field {key!r}" + (
            f"; {guess[0].lower()}{guess[1:]}" if guess else "")
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def show_plots(workdir: Path, name: str) -> None:
  """Writes a finished run's plots (chimera.study_plots.run_plots) and says where. The run
  is done whatever happens here: a plot that cannot be written is a warning."""
  from chimera.study_plots import run_plots  # matplotlib: only for a finished run
  try:
    paths = run_plots(workdir, name)
  except (OSError, ValueError) as error:
    print(f"warning: no plots written ({type(error).__name__}: {error})", file=sys.stderr)
    return
  print(f"plots: {', '.join(map(str, paths))}", file=sys.stderr)


def refuse_unread_moe_settings(config: config_lib.Config, given, spec: str) -> None:
  """Refuses a --config.<field> that only an MoE reads (config.MOE_ONLY) on a dense model:
  it trained as if unset, but named the run apart (config.json, and a resume with another
  value was refused as another run). `given`: the ConfigDict after the overrides; `spec`:
  the config file and preset, loaded again to tell the overrides from the file's values."""
  if config.model.num_experts:
    return
  plain = config_lib.load_config_dict(spec)
  for key in config_lib.MOE_ONLY:
    if key == "model.num_experts":  # 0 on an MoE config's command line: this dense model
      continue
    section, field = key.split(".")
    if given[section].get(field) != plain[section].get(field):
      raise ChimeraError(f"--config.{key}: only an MoE model reads it, and this one is "
                         f"dense (model.num_experts=0), so it would change nothing")


def default_workdir(name: str) -> Path:
  """runs/<name>-<date>-<time>, the workdir of a run without --workdir. `name` must be a
  plain folder name: "../x" put the run outside runs/, "a/b" a folder below it."""
  if not name or "/" in name or name in (".", ".."):
    raise ChimeraError(f"config.name: names the run's folder under runs/ when no --workdir "
                       f"is given, so it must be a plain name (not empty, no '/'), got "
                       f"{name!r}")
  return Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def main(argv):
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  try:
    refuse_arguments(argv)  # "config.train.steps=100", its "--" forgotten
    if _STOP_AFTER.value is not None and _STOP_AFTER.value < 1:
      raise ChimeraError(f"--stop_after: must be >= 1, got {_STOP_AFTER.value}")
    config = config_lib.from_config_dict(_CONFIG.value)
    refuse_unread_moe_settings(config, _CONFIG.value, config_flags.get_config_filename(
        flags.FLAGS["config"]))
    sharding.initialize_distributed()  # before any other JAX call, on every host
    compile_cache.enable()  # a rerun or resume reads its compiled steps from disk
    workdir = Path(_WORKDIR.value) if _WORKDIR.value else default_workdir(config.name)
    from chimera.train import stopped_by_signal, train  # here: config errors come fast
    summary = train(config, workdir, stop_after=_STOP_AFTER.value)
    if summary.completed and jax.process_index() == 0:
      show_plots(workdir, config.name)
    if (signum := stopped_by_signal()):  # saved (done or not): `main && evaluate` stops here
      sys.exit(128 + signum)
  except ChimeraError as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)
  except OverflowError as error:  # a size past what an index can hold (num_experts=1e8)
    print(f"error: a size is too large for this model's arrays; lower the model or batch "
          f"sizes ({(str(error).splitlines() or [type(error).__name__])[0]})", file=sys.stderr)
    sys.exit(2)
  except KeyboardInterrupt:  # outside the training loop, which stops at a checkpoint itself
    print("error: interrupted outside the training loop; the workdir keeps what it had "
          "(its latest checkpoint, if any)", file=sys.stderr)
    sys.exit(130)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
