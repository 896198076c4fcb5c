"""Tokenizers: "byte" (UTF-8 bytes) and "gpt2" (tiktoken's r50k_base, GPT-2's ranks).

Both give int32 ids, keep end-of-text out of `encode`, and drop it in `decode`.
`encode_batch` encodes many texts on several threads, for the token cache.
`token_bytes[id]` is the number of UTF-8 bytes a token stands for (0 for end-of-text),
which turns token counts into byte counts for bits per byte.
"""
import functools
import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from chimera.data.corpora import (cache_dir, cache_writes, fetch_sdist, read_members, sha256_of,
                                  write_atomic)
from chimera.errors import ChimeraError

R50K_URL = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"
R50K_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
# Whisper ships GPT-2's rank file in its sdist, which PyPI serves where Azure blobs are blocked.
WHISPER_SDIST = ("openai-whisper", "20250625", "37a91a3921809d9f44748ffc73c0a55c9f366c85a3ef5c2ae0cc09540432eb96")
WHISPER_RANKS = "*/whisper/assets/gpt2.tiktoken"


def _split_evenly(texts: list[str], parts: int) -> list[list[str]]:
  """`texts` cut into at most `parts` consecutive runs of about equal total length."""
  total, bounds, length = sum(map(len, texts)), [0], 0
  for i, text in enumerate(texts):
    length += len(text)
    if length * parts >= total * len(bounds) and len(bounds) < parts:
      bounds.append(i + 1)
  bounds.append(len(texts))
  return [texts[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]


class ByteTokenizer:
  """UTF-8 bytes as ids 0..255, with end-of-text as 256."""
  name = "byte"
  identity = "byte"  # names the id mapping in a token cache's key
  vocab_size = 257
  eot_id = 256

  def __init__(self):
    self.token_bytes = np.append(np.ones(256, np.int32), 0)

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

  def encode_batch(self, texts: list[str], num_threads: int = 1) -> list[np.ndarray]:
    """The ids of each text, [N_i] uint8 or wider."""
    return [np.frombuffer(text.encode("utf-8"), np.uint8) for text in texts]

  def decode(self, ids) -> str:
    ids = np.asarray(ids)
    return ids[ids < 256].astype(np.uint8).tobytes().decode("utf-8", errors="replace")


def tiktoken_cache_dir() -> Path:
  """$TIKTOKEN_CACHE_DIR if the user set it, else cache_dir()/tiktoken."""
  return Path(os.environ.get("TIKTOKEN_CACHE_DIR") or cache_dir() / "tiktoken")


def ensure_gpt2_ranks() -> Path:
  """Puts the r50k_base rank file where tiktoken looks before it downloads; returns its path."""
  # tiktoken names a cached file by the sha1 of the URL it would otherwise fetch.
  path = tiktoken_cache_dir() / hashlib.sha1(R50K_URL.encode()).hexdigest()
  if path.exists() and sha256_of(path) == R50K_SHA256:
    return path
  archive = fetch_sdist(*WHISPER_SDIST)
  (ranks,) = read_members(archive, WHISPER_RANKS).values()
  actual = hashlib.sha256(ranks).hexdigest()
  if actual != R50K_SHA256:
    raise ChimeraError(f"data.tokenizer: gpt2.tiktoken in {archive} has sha256 {actual}, expected {R50K_SHA256}")
  with cache_writes(path.parent):
    write_atomic(path, ranks)
  return path


class GPT2Tokenizer:
  """GPT-2's byte-level BPE via tiktoken; 50257 ids, end-of-text is 50256."""
  name = "gpt2"

  def __init__(self):
    import tiktoken  # Only this tokenizer needs it.

    path = ensure_gpt2_ranks()
    os.environ["TIKTOKEN_CACHE_DIR"] = str(path.parent)
    self._encoding = tiktoken.get_encoding("r50k_base")
    self.identity = f"gpt2 r50k_base sha256:{R50K_SHA256}"
    self.vocab_size = self._encoding.n_vocab
    self.eot_id = self._encoding.eot_token
    self.token_bytes = np.array(
        [len(self._encoding.decode_single_token_bytes(i)) for i in range(self.eot_id)] + [0], np.int32)

  def _encode(self, text: str) -> np.ndarray:
    # As encode_ordinary (special-token text is ordinary text), without a Python list.
    return self._encoding.encode_to_numpy(text, disallowed_special=())

  def encode(self, text: str) -> np.ndarray:
    return self._encode(text).astype(np.int32)

  def encode_batch(self, texts: list[str], num_threads: int = 1) -> list[np.ndarray]:
    """The ids of each text, [N_i] uint32. tiktoken releases the GIL while it encodes, so
    `num_threads` threads, each with a run of consecutive texts, keep as many cores busy."""
    runs = _split_evenly(texts, num_threads)
    if len(runs) <= 1:
      return [self._encode(text) for text in texts]
    with ThreadPoolExecutor(len(runs)) as pool:
      return [ids for run in pool.map(lambda run: [self._encode(t) for t in run], runs) for ids in run]

  def decode(self, ids) -> str:
    ids = np.asarray(ids)
    # Ids past end-of-text can only come from a vocab padded for speed; drop them with it.
    return self._encoding.decode(ids[ids < self.eot_id].tolist(), errors="replace")


@functools.cache  # tokenizers hold no state that changes: one per name and process
def get_tokenizer(name: str) -> ByteTokenizer | GPT2Tokenizer:
  if name == "byte":
    return ByteTokenizer()
  if name == "gpt2":
    return GPT2Tokenizer()
  raise ChimeraError(f"data.tokenizer: unknown tokenizer '{name}' (expected 'byte' or 'gpt2')")
