"""Text in, token batches out.

corpora: a corpus spec -> documents (downloads pinned by sha256, cached); hf: its hf: corpora.
tokenizers: "byte" and "gpt2".
cache: each (corpus, tokenizer, split) tokenized once into memory-mapped token files.
batches: the leak-free train/val split, token streams, and the seeded window sampler.

`load_splits` is the way in: `python -m chimera.data` builds its cache ahead of training.
"""
from chimera.data.cache import load_splits

__all__ = ["load_splits"]
