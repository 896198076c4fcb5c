class ChimeraError(ValueError):
    """A user-facing error: one line that names the bad field or file."""


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parser for `app.run(main, flags_parser=parse_flags)`, with a bad flag
  (unknown, or a value its type or enum refuses) reported as one line and exit status 2."""
  import sys

  from absl import flags
  try:
    return flags.FLAGS(argv)
  except flags.Error as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)
