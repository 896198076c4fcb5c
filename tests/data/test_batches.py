"""The train/val split, token streams and the window sampler, with the byte tokenizer."""
import json
import time

import numpy as np
import pytest

from chimera.data.batches import (WindowSampler, eval_batches, held_out, join_documents, make_splits,
                                  process_rows, split_documents)
from chimera.data.corpora import Document
from chimera.data.tokenizers import ByteTokenizer
from chimera.errors import ChimeraError

TOK = ByteTokenizer()


def test_tail_split_sizes():
  splits = make_splits([Document("one", "abcdefghij" * 100)], TOK, val_fraction=0.1)
  assert (len(splits.train), len(splits.val)) == (900, 100)
  assert (splits.train_bytes, splits.val_bytes) == (900, 100)
  assert splits.train.dtype == splits.val.dtype == np.int32


def test_tail_split_matches_nanogpt_shakespeare_char():
  # nanoGPT's shakespeare_char prepare.py splits the 1,115,394-char file at int(n * 0.9).
  splits = make_splits([Document("input.txt", "x" * 1_115_394)], TOK, val_fraction=0.1)
  assert (len(splits.train), len(splits.val)) == (1_003_854, 111_540)


def test_tail_split_is_one_cut_of_the_joined_stream():
  first = "Once upon a midnight dreary. " + "a" * 500
  last = "b" * 300 + " Quoth the Raven, Nevermore."
  docs = [Document("1", first), Document("2", last)]
  splits = make_splits(docs, TOK, val_fraction=0.25, mode="tail")
  stream = join_documents(docs, TOK)
  np.testing.assert_array_equal(np.concatenate([splits.train, splits.val]), stream)
  assert len(splits.train) == int(len(stream) * 0.75)
  train_text, val_text = TOK.decode(splits.train), TOK.decode(splits.val)
  assert "midnight dreary" in train_text and "midnight dreary" not in val_text
  assert "Nevermore" in val_text and "Nevermore" not in train_text
  # The end-of-text separator carries no bytes.
  assert splits.train_bytes + splits.val_bytes == len(first) + len(last)


def test_documents_split_by_hand():
  # 10 equal documents, val_fraction 0.2, so k = 5: documents 4 and 9 make exactly 20%.
  docs = [Document(f"d{i}", f"{i}" * 10) for i in range(10)]
  train, val = split_documents(docs, val_fraction=0.2)
  assert [d.name for d in val] == ["d4", "d9"]
  assert [d.name for d in train] == ["d0", "d1", "d2", "d3", "d5", "d6", "d7", "d8"]


def test_documents_split_shares_no_document():
  rng = np.random.default_rng(0)
  docs = [Document(f"doc{i:02d}", f"<doc {i}>" + "z" * int(rng.integers(10, 200))) for i in range(23)]
  splits = make_splits(docs, TOK, val_fraction=0.1)
  train_text, val_text = TOK.decode(splits.train), TOK.decode(splits.val)
  for i in range(23):
    assert (f"<doc {i}>" in train_text) != (f"<doc {i}>" in val_text)
  total = sum(len(d.text) for d in docs)
  assert splits.val_bytes >= 0.1 * total and splits.train_bytes + splits.val_bytes == total
  # One end-of-text between consecutive documents of a split.
  assert (splits.train == TOK.eot_id).sum() + (splits.val == TOK.eot_id).sum() == 23 - 2


@pytest.mark.parametrize("num_docs, mode", [(3, "tail"), (4, "documents")])
def test_auto_mode(num_docs, mode):
  docs = [Document(f"d{i}", "w" * 100) for i in range(num_docs)]
  auto = make_splits(docs, TOK, val_fraction=0.3)
  explicit = make_splits(docs, TOK, val_fraction=0.3, mode=mode)
  for a, b in zip(auto, explicit):
    np.testing.assert_array_equal(a, b)


def sampler(tokens, **kwargs):
  return WindowSampler(tokens, **{"batch_size": 4, "window": 9, "seed": 3, **kwargs})


def test_windows_are_consecutive_tokens():
  batch = sampler(np.arange(1000, dtype=np.int32)).next()
  assert batch.shape == (4, 9) and batch.dtype == np.int32
  np.testing.assert_array_equal(batch, batch[:, :1] + np.arange(9))


def test_sampler_is_deterministic_per_seed():
  tokens = np.arange(1000, dtype=np.int32)
  a, b, c = sampler(tokens), sampler(tokens), sampler(tokens, seed=4)
  np.testing.assert_array_equal(a.next(), b.next())
  assert not np.array_equal(a.next(), c.next())


def test_resumed_sampler_continues_exactly():
  tokens = np.arange(1000, dtype=np.int32)
  uninterrupted = [batch for _, batch in zip(range(10), sampler(tokens))]
  first = sampler(tokens)
  head = [first.next() for _ in range(5)]
  state = json.loads(json.dumps(first.state()))
  assert state == {"seed": 3, "step": 5}
  resumed = WindowSampler.restore(tokens, state, batch_size=4, window=9)
  tail = [resumed.next() for _ in range(5)]
  np.testing.assert_array_equal(np.stack(head + tail), np.stack(uninterrupted))


def test_processes_split_the_global_batch():
  tokens = np.arange(1000, dtype=np.int32)
  whole = sampler(tokens)
  halves = [sampler(tokens, process_index=p, process_count=2) for p in range(2)]
  for _ in range(3):
    np.testing.assert_array_equal(np.concatenate([h.next() for h in halves]), whole.next())


def test_every_window_of_the_split_can_be_drawn():
  """Starts run from 0 to len - window inclusive: a split of exactly one window gives it,
  and one token more gives both windows."""
  tokens = np.arange(9, dtype=np.int32)
  np.testing.assert_array_equal(WindowSampler(tokens, batch_size=4, window=9, seed=0).next(),
                                np.tile(tokens, (4, 1)))
  tokens = np.arange(10, dtype=np.int32)
  starts = {int(row[0]) for step in range(20)
            for row in WindowSampler(tokens, batch_size=4, window=9, seed=0, step=step).next()}
  assert starts == {0, 1}


def test_processes_split_each_micro_batch():
  """With gradient accumulation, micro-batch a put together from every process's rows is
  micro-batch a of one process: the same rows, in the same order."""
  tokens = np.arange(5000, dtype=np.int32)
  one = WindowSampler(tokens, batch_size=16, window=9, seed=3, micro_batches=4)
  parts = [WindowSampler(tokens, batch_size=16, window=9, seed=3, micro_batches=4,
                         process_index=p, process_count=2) for p in range(2)]
  for _ in range(3):
    whole = one.next().reshape(4, 4, 9)  # as the training step cuts it
    shares = [part.next().reshape(4, 2, 9) for part in parts]
    np.testing.assert_array_equal(np.concatenate(shares, axis=1), whole)
  # One process draws the same batch with accumulation as without.
  np.testing.assert_array_equal(
      WindowSampler(tokens, batch_size=16, window=9, seed=3, micro_batches=4).next(),
      WindowSampler(tokens, batch_size=16, window=9, seed=3).next())
  # The fixed validation batches [N, B, W] split the same way.
  val = eval_batches(tokens, batch_size=16, window=9, num_batches=2)
  shares = [process_rows(val, 4, p, 2).reshape(2, 4, 2, 9) for p in range(2)]
  np.testing.assert_array_equal(np.concatenate(shares, axis=2), val.reshape(2, 4, 4, 9))


def test_eval_batches_are_fixed():
  tokens = np.arange(500, dtype=np.int32)
  batches = eval_batches(tokens, batch_size=2, window=5, num_batches=3)
  assert batches.shape == (3, 2, 5)
  np.testing.assert_array_equal(batches, eval_batches(tokens, batch_size=2, window=5, num_batches=3))
  # Each row is a window of the split (consecutive tokens), and the windows differ.
  np.testing.assert_array_equal(batches, batches[..., :1] + np.arange(5))
  assert len({int(start) for start in batches[..., 0].ravel()}) > 1
  # Another seed draws other windows.
  assert not np.array_equal(batches, eval_batches(tokens, batch_size=2, window=5,
                                                  num_batches=3, seed=1))


def test_too_short_splits_name_the_split():
  tokens = np.arange(5, dtype=np.int32)
  with pytest.raises(ChimeraError, match=r"the training split has 5 tokens, fewer than one window of 9 \(context \+ 1\)"):
    sampler(tokens)
  with pytest.raises(ChimeraError, match="the validation split has 5 tokens"):
    eval_batches(tokens, batch_size=2, window=9, num_batches=1)


def test_bad_arguments():
  with pytest.raises(ChimeraError, match="^config.train.batch_size: 4 does not split evenly into 1 "
                                         "micro-batches over 3 processes"):
    sampler(np.arange(100), process_count=3)
  with pytest.raises(ChimeraError, match="data.split: unknown mode 'random'"):
    make_splits([Document("a", "abc")], TOK, mode="random")


def held_out_by_loop(doc_chars, val_fraction):
  """The reference: walk the held-out order of the non-empty documents one at a time."""
  k = max(2, round(1 / val_fraction))
  nonempty = [i for i, chars in enumerate(doc_chars) if chars]
  order = [nonempty[j] for offset in range(k - 1, -1, -1) for j in range(offset, len(nonempty), k)]
  held, chars = set(), 0
  for i in order:
    if chars >= val_fraction * sum(doc_chars) or len(held) == len(nonempty) - 1:
      break
    if chars + doc_chars[i] <= 2 * val_fraction * sum(doc_chars):  # else passed over
      held.add(i)
      chars += doc_chars[i]
  held = held or set(order[:1])
  return [i in held for i in range(len(doc_chars))]


@pytest.mark.parametrize("seed", range(20))
def test_held_out_matches_the_reference_loop(seed):
  rng = np.random.default_rng(seed)
  doc_chars = rng.integers(0, 50, size=int(rng.integers(1, 40)))
  doc_chars = np.where(rng.random(len(doc_chars)) < 0.3, 0, doc_chars).tolist()  # some empty
  val_fraction = float(rng.choice([0.05, 0.1, 0.25, 0.5, 0.9]))
  assert held_out(doc_chars, val_fraction).tolist() == held_out_by_loop(doc_chars, val_fraction)


def test_one_large_document_is_not_most_of_validation():
  # Every 10th document from the last: the 30,000-character one first, which alone would
  # hold out 91% of the text for a val_fraction of 0.1. It is passed over, and the three
  # small ones make 9.1%, short of 10% rather than far past it.
  assert held_out([1000, 1000, 1000, 30000], 0.1).tolist() == [True, True, True, False]
  assert held_out([5000, 5000], 0.1).tolist() == [False, True]  # at least one, never all


def test_empty_documents_are_never_held_out():
  # Held out, empty documents made a validation split of end-of-text tokens and no text.
  assert held_out([10, 0] * 10, 0.2).tolist() == [i in (8, 18) for i in range(20)]
  assert not held_out([1200, 0, 0, 0], 0.1).any()
  # So "auto" counts only non-empty documents: one text and three empty files cut the tail
  # (the 3 empty ones added 2 end-of-text tokens of validation and crashed the first eval).
  docs = [Document("a", "hello world " * 100)] + [Document(f"z{i}", "") for i in range(3)]
  splits = make_splits(docs, TOK, val_fraction=0.1)
  for a, b in zip(splits, make_splits(docs, TOK, val_fraction=0.1, mode="tail")):
    np.testing.assert_array_equal(a, b)
  assert (len(splits.val), splits.val_bytes) == (121, 118)


def test_a_validation_split_without_text_is_an_error():
  # Bits per byte divides by the validation bytes: here the tail holds only end-of-text
  # tokens of empty documents, and one document cannot be split into documents.
  docs = [Document("a", "x" * 100)] + [Document(f"z{i:02d}", "") for i in range(39)]
  with pytest.raises(ChimeraError, match=r"the validation split has no text \(3 tokens, 0 bytes\)"):
    make_splits(docs, TOK, val_fraction=0.02)
  with pytest.raises(ChimeraError, match=r"the validation split has no text \(0 tokens, 0 bytes\)"):
    make_splits(docs, TOK, val_fraction=0.02, mode="documents")


def test_held_out_with_a_tiny_val_fraction_is_fast():
  # k = 1 / val_fraction offsets, each an array, took 17 s and 2 GB at 1e-7.
  started = time.perf_counter()
  assert held_out([100] * 10, 1e-7).tolist() == [False] * 9 + [True]
  assert time.perf_counter() - started < 1


def test_batch_i_is_drawn_from_the_seed_and_i():
  """The contract a checkpoint's {seed, step} relies on: batch i's starts are
  default_rng([seed, i]) over the len - window + 1 possible starts, from the first batch
  on (a sampler that drew batch i from [seed, i + 1] still resumed consistently with
  itself, but not a run saved by the documented one)."""
  tokens = np.arange(1000, dtype=np.int32)
  drawn = sampler(tokens)  # batch_size 4, window 9, seed 3
  for i in range(3):
    starts = np.random.default_rng([3, i]).integers(0, 1000 - 9 + 1, size=4)
    np.testing.assert_array_equal(drawn.next(), starts[:, None] + np.arange(9))
