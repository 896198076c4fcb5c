"""Builds the token cache of a corpus ahead of training, e.g. on a cluster's login node.

  python -m chimera.data --corpus=shakespeare --tokenizer=gpt2 \
      [--split=auto] [--val_fraction=0.1] [--text_field=text] [--threads=N]

Prints the cache's folder, and each split's tokens, documents and bytes per token. A
training run with the same data settings then memory-maps it.
"""
import sys

from absl import app, flags, logging

from chimera.config import DataConfig, validate_text
from chimera.data.cache import prepare
from chimera.data.tokenizers import get_tokenizer
from chimera.errors import ChimeraError, parse_flags

_DEFAULTS = DataConfig()
_CORPUS = flags.DEFINE_string("corpus", None, "As data.corpus: shakespeare, a file, folder or "
                              "glob, tfds:NAME or hf:NAME[:CONFIG].", required=True)
_TOKENIZER = flags.DEFINE_string("tokenizer", _DEFAULTS.tokenizer, "As data.tokenizer.")
_SPLIT = flags.DEFINE_string("split", _DEFAULTS.split, "As data.split: auto, documents or tail.")
_VAL_FRACTION = flags.DEFINE_float("val_fraction", _DEFAULTS.val_fraction, "As data.val_fraction.")
_TEXT_FIELD = flags.DEFINE_string("text_field", _DEFAULTS.text_field, "As data.text_field: an hf: corpus's text column.")
_THREADS = flags.DEFINE_integer("threads", None, "Tokenizer threads (default: every core).")


def main(argv: list[str]) -> None:
  del argv  # parse_flags refuses positional arguments
  logging.set_verbosity(logging.WARNING)  # datasets logs its backends at INFO
  try:
    if _THREADS.value is not None and _THREADS.value < 1:
      raise ChimeraError(f"--threads: must be >= 1, got {_THREADS.value}")
    # An empty --corpus was the current directory, read whole.
    validate_text(DataConfig(corpus=_CORPUS.value, split=_SPLIT.value,
                             val_fraction=_VAL_FRACTION.value, text_field=_TEXT_FIELD.value))
    cache = prepare(_CORPUS.value, get_tokenizer(_TOKENIZER.value), split=_SPLIT.value,
                    val_fraction=_VAL_FRACTION.value, text_field=_TEXT_FIELD.value,
                    num_threads=_THREADS.value)
  except ChimeraError as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)  # as every tool's bad input
  m = cache.manifest
  documents = lambda n: f"{n:,} document" + ("" if n == 1 else "s")
  built = (f"built in {m.build_seconds:.1f} s" if cache.built
           else f"read from the cache (built in {m.build_seconds:.1f} s)")
  print(f"cache: {cache.path}")
  print(f"corpus: {_CORPUS.value}, {documents(m.num_documents)}, {_TOKENIZER.value} tokenizer, "
        f"{m.split} split (val_fraction {_VAL_FRACTION.value}), {built}")
  for name in ("train", "val"):
    print(f"{name}: {m.tokens[name]:,} tokens, {documents(m.documents[name])}, "
          f"{m.bytes[name]:,} bytes, {m.bytes[name] / max(m.tokens[name], 1):.3f} bytes/token")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
