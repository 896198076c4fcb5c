class ChimeraError(ValueError):
    """A user-facing error: one line that names the bad field or file."""


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
