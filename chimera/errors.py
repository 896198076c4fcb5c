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


def parse_flags(argv: list[str]) -> list[str]:
  """As `parse_flags_and_args`, for a tool that takes no positional argument: one given
  ("seeds=5", its "--" forgotten, or anything after a bare "--") is refused in one line
  rather than ignored."""
  import sys

  remaining = parse_flags_and_args(argv)
  if len(remaining) > 1:
    print(f"error: unexpected argument {remaining[1]!r} (flags start with --)", file=sys.stderr)
    sys.exit(2)
  return remaining
