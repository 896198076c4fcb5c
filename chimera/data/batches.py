"""From documents to batches: a leak-free train/val split, token streams, seeded windows.

A stream is a 1-D array of token ids with end-of-text between documents: int32 in memory,
or uint16/uint32 memory-mapped from the token cache (`chimera.data.cache`). A batch is
[B, W] int32 windows of W = context + 1 consecutive tokens (inputs are [:, :-1], targets [:, 1:]).
"""
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from chimera.data.corpora import Document
from chimera.errors import ChimeraError


class Splits(NamedTuple):
  train: np.ndarray  # [N_train] token ids
  val: np.ndarray  # [N_val]
  train_bytes: int  # UTF-8 bytes of text behind `train`, for bits per byte.
  val_bytes: int
  counts: np.ndarray  # [2, V] int64: how often each id occurs in train (row 0) and val (row 1)


def resolve_mode(num_docs: int, mode: str, val_fraction: float) -> str:
  """"documents" or "tail": "auto" holds out documents when at least 4 are non-empty
  (`num_docs` counts only those: empty ones are never held out)."""
  if not 0 < val_fraction < 1:
    raise ChimeraError(f"data.val_fraction: must be in (0, 1), got {val_fraction}")
  if mode == "auto":
    return "documents" if num_docs >= 4 else "tail"
  if mode not in ("documents", "tail"):
    raise ChimeraError(f"data.split: unknown mode '{mode}' (expected 'auto', 'documents' or 'tail')")
  return mode


def held_out(doc_chars: Sequence[int], val_fraction: float) -> np.ndarray:
  """[D] bool: which documents (in name order, of these lengths in characters) validation holds.

  Goes through every k-th non-empty document (k = 1 / val_fraction), then every k-th from
  the next offset, holding each out until validation holds at least `val_fraction` of the
  characters; a document that would take validation past twice that is passed over (one
  large file must not become most of the corpus's validation text), so where the others
  run out validation may end a little short. Never all non-empty documents, and at least
  one (the first in that order, when every one is too large). Empty ones stay in training:
  held out, they would make a validation split of end-of-text tokens and no text.
  """
  doc_chars = np.asarray(doc_chars, np.int64)
  nonempty = np.flatnonzero(doc_chars > 0)
  mask = np.zeros(len(doc_chars), bool)
  if len(nonempty) < 2:
    return mask
  chars = doc_chars[nonempty]
  k = max(2, round(1 / val_fraction))
  # Offsets past the last document pick nothing: a tiny val_fraction must not loop k times.
  order = np.concatenate([np.arange(offset, len(chars), k)
                          for offset in range(min(k, len(chars)) - 1, -1, -1)])
  target = val_fraction * int(chars.sum())
  picked, held = [], 0
  for i in order:
    if held >= target or len(picked) == len(chars) - 1:
      break
    if held + chars[i] <= 2 * target:
      picked.append(i)
      held += int(chars[i])
  mask[nonempty[picked or [order[0]]]] = True
  return mask


def split_documents(docs: list[Document], *, val_fraction: float,
                    mode: str = "auto") -> tuple[list[Document], list[Document]]:
  """Holds out whole documents, so validation shares no document with training.

  Holds out every k-th non-empty document in name order (k = 1 / val_fraction), then every
  k-th from the next offset, until validation holds `val_fraction` of the characters (see
  `held_out`: none that would take it past twice that).
  In "tail" mode (or "auto" with under 4 non-empty documents) nothing is held out here: the
  split happens inside the token stream, in `make_splits`. Returns (train, val), name-sorted.
  """
  docs = sorted(docs, key=lambda doc: doc.name)
  if resolve_mode(count_nonempty(docs), mode, val_fraction) == "tail":
    return docs, []
  mask = held_out([len(doc.text) for doc in docs], val_fraction)
  return ([doc for doc, val in zip(docs, mask) if not val],
          [doc for doc, val in zip(docs, mask) if val])


def count_nonempty(docs: list[Document]) -> int:
  return sum(1 for doc in docs if doc.text)


def check_val_bytes(val_tokens: int, val_bytes: int) -> None:
  """Bits per byte divides by the validation split's bytes: none is an error here, not a
  ZeroDivisionError at the first evaluation."""
  if val_bytes == 0:
    raise ChimeraError(f"data.corpus: the validation split has no text ({val_tokens} tokens, "
                       "0 bytes); use a larger data.val_fraction, another data.split or fewer "
                       "empty documents")


def join_documents(docs: list[Document], tokenizer) -> np.ndarray:
  """One stream [N] int32: each document's tokens, with end-of-text between documents."""
  parts = []
  for doc in docs:
    if parts:
      parts.append(np.array([tokenizer.eot_id], np.int32))
    parts.append(tokenizer.encode(doc.text))
  return np.concatenate(parts).astype(np.int32) if parts else np.zeros(0, np.int32)


def make_splits(docs: list[Document], tokenizer, *, val_fraction: float = 0.1,
                mode: str = "auto") -> Splits:
  """Train and validation streams that share no text.

  "documents": whole held-out documents (see `split_documents`). "tail": the last
  `val_fraction` of the joined stream, as nanoGPT splits a single file.
  """
  if resolve_mode(count_nonempty(docs), mode, val_fraction) == "documents":
    train_docs, val_docs = split_documents(docs, val_fraction=val_fraction, mode="documents")
    train, val = join_documents(train_docs, tokenizer), join_documents(val_docs, tokenizer)
  else:
    tokens = join_documents(docs, tokenizer)
    boundary = int(len(tokens) * (1 - val_fraction))
    train, val = tokens[:boundary], tokens[boundary:]
  counts = np.stack([np.bincount(stream, minlength=tokenizer.vocab_size) for stream in (train, val)])
  train_bytes, val_bytes = (counts @ tokenizer.token_bytes).tolist()
  check_val_bytes(len(val), val_bytes)
  return Splits(train, val, train_bytes, val_bytes, counts.astype(np.int64))


def unigram_cross_entropy(counts: np.ndarray, vocab_size: int) -> float:
  """Validation loss (nats/token) of the add-one-smoothed unigram model of the training
  split, over `vocab_size` ids: the bar a language model must clear. `counts` is Splits.counts."""
  train_counts = np.ones(vocab_size)
  train_counts[:counts.shape[1]] += counts[0]
  log_probs = np.log(train_counts / train_counts.sum())
  return float(-(counts[1] @ log_probs[:counts.shape[1]]) / counts[1].sum())


def _check_length(tokens: np.ndarray, window: int, split: str) -> None:
  if len(tokens) < window:
    raise ChimeraError(f"data.corpus: the {split} split has {len(tokens)} tokens, "
                       f"fewer than one window of {window} (context + 1)")


def _check_split(rows: int, micro_batches: int, process_count: int) -> None:
  """Refuses a batch of `rows` that does not cut into whole micro-batches, each into whole
  process shares (the sampler's batches and the validation subset, `process_rows`)."""
  if rows % (micro_batches * process_count):
    raise ChimeraError(f"config.train.batch_size: {rows} does not split evenly into "
                       f"{micro_batches} micro-batches over {process_count} processes "
                       f"(micro-batches: train.grad_accum)")


def process_rows(batch: np.ndarray, micro_batches: int, process_index: int,
                 process_count: int) -> np.ndarray:
  """This process's rows of a global batch [..., B, W]: [..., B / process_count, W].

  The batch is cut into `micro_batches` micro-batches of consecutive rows first (as the
  training step cuts it, `train.grad_accum`), and the process keeps its share of each, in
  micro-batch order: so micro-batch a, put together from every process's share, is the
  same rows on any number of processes (cutting each process's share instead would mix
  them, and anything not linear over a micro-batch, such as the batch-wide balancing
  loss, would change with the process count).
  """
  *lead, rows, window = batch.shape
  _check_split(rows, micro_batches, process_count)
  share = rows // (micro_batches * process_count)
  batch = batch.reshape(*lead, micro_batches, rows // micro_batches, window)
  mine = batch[..., process_index * share:(process_index + 1) * share, :]
  return mine.reshape(*lead, micro_batches * share, window)


class WindowSampler:
  """Random windows of `window` consecutive tokens, in batches that depend only on (seed, step).

  Batch i's start offsets come from np.random.default_rng([seed, i]) for the whole global
  batch; process p keeps its share of each of the `micro_batches` micro-batches
  (`process_rows`), so the global batch and each of its micro-batches are the same on any
  number of processes, and resuming at `step` is exact.
  """

  def __init__(self, tokens: np.ndarray, *, batch_size: int, window: int, seed: int, step: int = 0,
               process_index: int = 0, process_count: int = 1, micro_batches: int = 1,
               split: str = "training"):
    _check_length(tokens, window, split)
    _check_split(batch_size, micro_batches, process_count)  # at once, not at the first batch
    self.tokens, self.window, self.seed, self.step = tokens, window, seed, step
    self.batch_size = batch_size
    self.process_index, self.process_count = process_index, process_count
    self.micro_batches = micro_batches

  @classmethod
  def restore(cls, tokens: np.ndarray, state: dict, **kwargs) -> "WindowSampler":
    """A sampler that continues from `state()` of an earlier one."""
    return cls(tokens, seed=state["seed"], step=state["step"], **kwargs)

  def state(self) -> dict:
    return {"seed": self.seed, "step": self.step}

  def next(self) -> np.ndarray:
    """The next batch, [batch_size // process_count, window] int32."""
    rng = np.random.default_rng([self.seed, self.step])
    starts = rng.integers(0, len(self.tokens) - self.window + 1, size=self.batch_size)
    starts = process_rows(starts[:, None], self.micro_batches, self.process_index,
                          self.process_count)[:, 0]
    self.step += 1
    return np.asarray(self.tokens[starts[:, None] + np.arange(self.window)], np.int32)

  def __iter__(self):
    return self

  __next__ = next


def eval_batches(tokens: np.ndarray, *, batch_size: int, window: int, num_batches: int,
                 seed: int = 0) -> np.ndarray:
  """A fixed validation subset: [num_batches, batch_size, window] int32 random windows."""
  sampler = WindowSampler(tokens, batch_size=batch_size, window=window, seed=seed, split="validation")
  return np.stack([sampler.next() for _ in range(num_batches)])
