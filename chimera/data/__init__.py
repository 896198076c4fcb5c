"""Text in, token batches out.

corpora: a corpus spec -> documents (downloads pinned by sha256, cached).
tokenizers: "byte" and "gpt2".
batches: the leak-free train/val split, token streams, and the seeded window sampler.
"""
