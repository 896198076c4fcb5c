class ChimeraError(ValueError):
    """A user-facing error: one line that names the bad field or file."""
