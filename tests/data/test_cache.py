"""The token cache against the in-memory path (`make_splits`), offline.

GPT-2's real rank file is a download, so a small BPE with GPT-2's own pre-tokenizer pattern
stands in for it: the cutting of long documents is checked against that pattern.
"""
import errno
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import tiktoken
from tiktoken_ext.openai_public import r50k_pat_str

from chimera.data import cache, load_splits, tokenizers
from chimera.data.batches import WindowSampler, eval_batches, make_splits, unigram_cross_entropy
from chimera.data.corpora import load_corpus
from chimera.errors import ChimeraError

ROOT = Path(__file__).resolve().parents[2]
WORDS = ("the king queen lord love death night day heart thou thee hath doth shall will "
         "naïve café 日本語 ☃ it's they'll 1234 3.14 -- ... ! ? ; ( )").split()


class SmallGPT2(tokenizers.GPT2Tokenizer):
  """GPT2Tokenizer's code over a byte-level BPE of a few merges and GPT-2's split pattern."""

  def __init__(self):
    ranks = {bytes([i]): i for i in range(256)}
    for merge in [b"th", b"he", b" t", b" th", b"the", b" the", b"  ", b"\n\n", b"in", b"an", b" a"]:
      ranks[merge] = len(ranks)
    self._encoding = tiktoken.Encoding("small_r50k", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                                       special_tokens={"<|endoftext|>": len(ranks)})
    self.identity, self.vocab_size, self.eot_id = "small", self._encoding.n_vocab, self._encoding.eot_token
    self.token_bytes = np.array([len(t) for t in sorted(ranks, key=ranks.get)] + [0], np.int32)


TOKENIZERS = {"byte": tokenizers.ByteTokenizer, "small_gpt2": SmallGPT2}


def random_text(rng, words: int) -> str:
  seps = [" ", " ", " ", "\n", "  ", "\n\n", "\t", " \n", "\u00a0", "\x1c", "\u3000"]
  return "".join(str(rng.choice(WORDS)) + str(rng.choice(seps)) for _ in range(words))


def write_docs(folder: Path, count: int, seed: int = 0) -> Path:
  """`count` files of random lengths, one with a marker "<doc i>" at its start."""
  rng = np.random.default_rng(seed)
  folder.mkdir(parents=True, exist_ok=True)
  for i in range(count):
    (folder / f"doc{i:03d}.txt").write_text(f"<doc {i}> " + random_text(rng, int(rng.integers(5, 120))))
  return folder


def assert_splits_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_cut_matches_gpt2_pre_tokenization():
  """Pieces from `_cut`, encoded one by one, give the tokens of the whole text."""
  tok, rng = SmallGPT2(), np.random.default_rng(1)
  for trial in range(30):
    text = random_text(rng, 400) + str(rng.choice(["", " ", "\n", "  \n"]))
    pieces, rest = cache._cut(text, int(rng.integers(1, 60)))
    assert len(pieces) > 5 and "".join(pieces) + rest == text
    joined = np.concatenate([tok.encode(p) for p in pieces + [rest]])
    np.testing.assert_array_equal(joined, tok.encode(text))


@pytest.mark.parametrize("tokenizer", sorted(TOKENIZERS))
@pytest.mark.parametrize("mode", ["auto", "documents", "tail"])
def test_cache_equals_in_memory_splits(tmp_path, monkeypatch, tokenizer, mode):
  # Small batches and pieces, so documents are cut and span batches.
  monkeypatch.setattr(cache, "BATCH_CHARS", 300)
  monkeypatch.setattr(cache, "PIECE_CHARS", 40)
  monkeypatch.setattr(cache, "COPY_TOKENS", 7)
  corpus = write_docs(tmp_path / "docs", 23)
  tok = TOKENIZERS[tokenizer]()
  cached = load_splits(str(corpus), tok, split=mode, val_fraction=0.2)
  assert isinstance(cached.train, np.memmap) and cached.train.dtype == np.uint16
  assert_splits_equal(cached, make_splits(load_corpus(str(corpus)), tok, val_fraction=0.2, mode=mode))


def test_a_single_file_and_threads(tmp_path, monkeypatch):
  monkeypatch.setattr(cache, "BATCH_CHARS", 1000)
  monkeypatch.setattr(cache, "PIECE_CHARS", 50)
  path = tmp_path / "one.txt"
  path.write_text(random_text(np.random.default_rng(2), 3000))
  tok = SmallGPT2()
  cached = cache.prepare(str(path), tok, num_threads=3).splits()
  assert_splits_equal(cached, make_splits(load_corpus(str(path)), tok))


def test_memmapped_batches_and_resume_are_exact(tmp_path):
  corpus, tok = write_docs(tmp_path / "docs", 30), tokenizers.ByteTokenizer()
  cached = load_splits(str(corpus), tok)
  memory = make_splits(load_corpus(str(corpus)), tok)
  kwargs = dict(batch_size=4, window=17, seed=5)
  from_cache, from_memory = WindowSampler(cached.train, **kwargs), WindowSampler(memory.train, **kwargs)
  batches = [from_cache.next() for _ in range(6)]
  for batch in batches:
    assert batch.dtype == np.int32 and not isinstance(batch, np.memmap)
    np.testing.assert_array_equal(batch, from_memory.next())
  resumed = WindowSampler.restore(cached.train, json.loads(json.dumps({"seed": 5, "step": 3})),
                                  batch_size=4, window=17)
  np.testing.assert_array_equal(np.stack([resumed.next() for _ in range(3)]), np.stack(batches[3:]))
  np.testing.assert_array_equal(eval_batches(cached.val, batch_size=3, window=9, num_batches=4),
                                eval_batches(memory.val, batch_size=3, window=9, num_batches=4))


def refuse_to_tokenize(monkeypatch, tok):
  def fail(*args, **kwargs):
    raise AssertionError("tokenized again")
  monkeypatch.setattr(tok, "encode_batch", fail)


def test_second_load_maps_without_tokenizing(tmp_path, monkeypatch):
  corpus, tok = write_docs(tmp_path / "docs", 10), tokenizers.ByteTokenizer()
  first = load_splits(str(corpus), tok)
  refuse_to_tokenize(monkeypatch, tok)
  assert_splits_equal(load_splits(str(corpus), tok), first)
  # The same corpus from another working directory is the same cache.
  monkeypatch.chdir(tmp_path)
  assert_splits_equal(load_splits("docs", tok), first)
  # Other split settings are another cache.
  with pytest.raises(AssertionError, match="tokenized again"):
    load_splits(str(corpus), tok, val_fraction=0.3)


def test_a_touched_corpus_is_reused_and_a_changed_one_rebuilt(tmp_path, monkeypatch):
  corpus, tok = write_docs(tmp_path / "docs", 6), tokenizers.ByteTokenizer()
  built = cache.prepare(str(corpus), tok)
  os.utime(corpus / "doc001.txt", ns=(1, 1))  # same content, another mtime
  with monkeypatch.context() as m:
    refuse_to_tokenize(m, tok)
    again = cache.prepare(str(corpus), tok)
  assert again.manifest.content_hash == built.manifest.content_hash
  assert again.manifest.files != built.manifest.files  # updated, so the next check is a stat
  (corpus / "doc001.txt").write_text("<doc 1> changed")
  changed = cache.prepare(str(corpus), tok)
  assert changed.manifest.content_hash != built.manifest.content_hash
  assert "changed" in tok.decode(np.concatenate([changed.splits().train, changed.splits().val]))


def test_a_moved_or_copied_corpus_reuses_its_tokens(tmp_path, monkeypatch, capsys):
  """The cache is keyed by the corpus's path; the same files' text at another path (a
  moved or copied folder) gets a cache of its own from the first one's files, tokenized
  no more. Other text of the same sizes, or another split, is tokenized."""
  corpus, tok = write_docs(tmp_path / "docs", 8), tokenizers.ByteTokenizer()
  first = cache.prepare(str(corpus), tok)
  moved = tmp_path / "elsewhere" / "texts"
  moved.parent.mkdir()
  corpus.rename(moved)
  capsys.readouterr()
  with monkeypatch.context() as m:
    refuse_to_tokenize(m, tok)
    reused = cache.prepare(str(moved), tok)
  assert not reused.built and reused.path != first.path
  assert reused.manifest.key["corpus"] != first.manifest.key["corpus"]
  assert reused.manifest.content_hash == first.manifest.content_hash
  assert_splits_equal(reused.splits(), first.splits())
  assert f"holds the text of the token cache {first.path}" in capsys.readouterr().err
  # Its own manifest, checked as any other: the next load is a stat, and the first cache
  # is untouched (its files are linked, not moved).
  with monkeypatch.context() as m:
    refuse_to_tokenize(m, tok)
    assert cache.prepare(str(moved), tok).path == reused.path
  assert cache._check(first.path, first.manifest.key, None)[0] == first.manifest
  # A copy with one byte changed (the same sizes) is other text: tokenized.
  copy = tmp_path / "copy"
  shutil.copytree(moved, copy)
  text = (copy / "doc003.txt").read_text()
  (copy / "doc003.txt").write_text(text.replace("<doc 3>", "<doc 9>"))
  changed = cache.prepare(str(copy), tok)
  assert changed.built and changed.manifest.content_hash != first.manifest.content_hash
  # The same text at another validation fraction is another split: tokenized.
  assert cache.prepare(str(moved), tok, val_fraction=0.3).built
  # A cache another process holds (rebuilding it, say) is not linked from: tokenized.
  import fcntl
  again = shutil.copytree(moved, tmp_path / "again")
  with open(reused.path.parent / f".{reused.path.name}.lock", "a") as lock, \
       open(first.path.parent / f".{first.path.name}.lock", "a") as other:
    fcntl.flock(lock, fcntl.LOCK_EX)
    fcntl.flock(other, fcntl.LOCK_EX)
    built = cache.prepare(str(again), tok)
  assert built.built and built.manifest.content_hash == first.manifest.content_hash


def test_a_cache_the_user_cannot_write(tmp_path, monkeypatch):
  """A shared cache built by someone else: a touched corpus still loads (the manifest is
  not rewritten), and a build that cannot write is one line naming the folder."""
  corpus, tok = write_docs(tmp_path / "docs", 6), tokenizers.ByteTokenizer()
  built = cache.prepare(str(corpus), tok)
  os.utime(corpus / "doc001.txt", ns=(1, 1))

  def denied(*args, **kwargs):
    raise PermissionError(13, "Permission denied", str(built.path / "manifest.json"))

  monkeypatch.setattr(cache.Manifest, "write", denied)
  assert cache.prepare(str(corpus), tok).manifest.content_hash == built.manifest.content_hash
  monkeypatch.setattr(cache, "_locked", denied)
  (corpus / "doc001.txt").write_text("<doc 1> changed")
  with pytest.raises(ChimeraError, match=r"^the token cache .*tokens cannot be written "
                                         r"\(Permission denied: .*\); set CHIMERA_CACHE"):
    cache.prepare(str(corpus), tok)


def test_a_corpus_the_user_cannot_read_is_named(tmp_path, monkeypatch):
  """Reading the corpus happens inside the cache's write handler; a file that cannot be
  read is named as the corpus's, not blamed on the cache."""
  corpus, tok = write_docs(tmp_path / "docs", 6), tokenizers.ByteTokenizer()
  real_open = open

  def denied(path, *args, **kwargs):  # as chmod 000 does for a user who is not root
    if str(path).endswith("doc003.txt"):
      raise PermissionError(13, "Permission denied", str(path))
    return real_open(path, *args, **kwargs)

  monkeypatch.setattr("builtins.open", denied)
  with pytest.raises(ChimeraError, match=r"^data\.corpus: cannot read \S+/doc003\.txt "
                                         r"\(Permission denied\)$"):
    cache.prepare(str(corpus), tok)
  assert not [p for p in (cache.cache_dir() / "tokens").glob("*docs-*")  # builds are hidden
              if not p.name.endswith(".lock")]


def test_a_corpus_written_while_it_is_tokenized_is_not_cached(tmp_path, monkeypatch):
  """A file that changes during the build is refused, not cached with the tokens of one
  text under the hash of another (which every later check would then accept)."""
  corpus, tok = write_docs(tmp_path / "docs", 6), tokenizers.ByteTokenizer()
  real = cache._write_split

  def appending(*args, **kwargs):
    with open(corpus / "doc002.txt", "a") as f:
      f.write(" NEW TEXT" * 50)
    return real(*args, **kwargs)

  monkeypatch.setattr(cache, "_write_split", appending)
  with pytest.raises(ChimeraError, match=r"^data\.corpus: \S+docs changed while it was being "
                                         r"tokenized; run again once it is written$"):
    cache.prepare(str(corpus), tok)
  monkeypatch.setattr(cache, "_write_split", real)
  built = cache.prepare(str(corpus), tok)  # the next start builds from the text as it is
  assert built.built and "NEW TEXT" in tok.decode(
      np.concatenate([built.splits().train, built.splits().val]))
  assert not cache.prepare(str(corpus), tok).built


def test_a_full_disk_while_the_token_cache_builds_is_one_line(tmp_path, monkeypatch):
  """The tokens are written with file.write, whose OSError carries ENOSPC (numpy's tofile
  raised a bare "N requested and M written"); checked by hand on a full tmpfs too."""
  corpus, tok = write_docs(tmp_path / "docs", 6), tokenizers.ByteTokenizer()

  class FullDisk(io.FileIO):
    def write(self, data):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
  real_open = open
  monkeypatch.setattr(cache, "open", lambda path, mode="r", *args, **kwargs: (
      FullDisk(path, mode) if str(path).endswith("all.bin") else real_open(path, mode, *args,
                                                                            **kwargs)),
      raising=False)
  with pytest.raises(ChimeraError, match=r"^the token cache .*tokens cannot be written \(No "
                                         r"space left on device\); make room there, or set "
                                         r"CHIMERA_CACHE to another folder$"):
    cache.prepare(str(corpus), tok)


def damage(name):
  def drop(folder):
    (folder / name).unlink()

  def truncate(folder):
    os.truncate(folder / name, (folder / name).stat().st_size - 2)

  return {"drop": drop, "truncate": truncate}


def edit_manifest(change):
  def edit(folder):
    manifest = json.loads((folder / "manifest.json").read_text())
    change(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))
  return edit


DAMAGE = {
    "missing val.bin": damage("val.bin")["drop"],
    "short train.bin": damage("train.bin")["truncate"],
    "missing counts": damage("counts.npy")["drop"],
    "no manifest (half-written)": damage("manifest.json")["drop"],
    "garbled manifest": lambda folder: (folder / "manifest.json").write_text('{"key": '),
    "manifest of another key": edit_manifest(lambda m: m["key"].update(val_fraction=0.5)),
    "manifest token count": edit_manifest(lambda m: m["tokens"].update(train=m["tokens"]["train"] - 1)),
    "manifest missing a field": edit_manifest(lambda m: m.pop("dtype")),
}


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_a_damaged_cache_is_rebuilt(tmp_path, capsys, kind):
  corpus, tok = write_docs(tmp_path / "docs", 8), tokenizers.ByteTokenizer()
  built = cache.prepare(str(corpus), tok)
  expected = [np.array(x) for x in built.splits()]  # in memory: damage may truncate the maps
  DAMAGE[kind](built.path)
  rebuilt = cache.prepare(str(corpus), tok)
  assert "rebuilding the token cache" in capsys.readouterr().err
  assert rebuilt.path == built.path
  assert_splits_equal(rebuilt.splits(), expected)


def test_a_failed_build_leaves_no_cache(tmp_path, monkeypatch):
  monkeypatch.setattr(cache, "BATCH_CHARS", 200)
  corpus, tok = write_docs(tmp_path / "docs", 8), tokenizers.ByteTokenizer()
  calls = []

  def fail_on_third_batch(texts, num_threads=1):
    calls.append(1)
    if len(calls) == 3:
      raise KeyboardInterrupt
    return tokenizers.ByteTokenizer().encode_batch(texts)

  monkeypatch.setattr(tok, "encode_batch", fail_on_third_batch)
  with pytest.raises(KeyboardInterrupt):
    load_splits(str(corpus), tok)
  tokens = Path(os.environ["CHIMERA_CACHE"]) / "tokens"
  assert [p.name for p in tokens.iterdir() if not p.name.endswith(".lock")] == []


KILL_MID_BUILD = """
import os, signal, sys
from chimera.data import cache, tokenizers
def killed(*args, **kwargs):
  os.kill(os.getpid(), signal.SIGKILL)  # after tokenizing, before the cache is in place
cache._write_split = killed
cache.prepare(sys.argv[1], tokenizers.ByteTokenizer())
"""


def test_a_killed_build_is_never_used(tmp_path):
  corpus, tok = write_docs(tmp_path / "docs", 8), tokenizers.ByteTokenizer()
  result = subprocess.run([sys.executable, "-c", KILL_MID_BUILD, str(corpus)], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
  assert result.returncode == -signal.SIGKILL
  tokens = Path(os.environ["CHIMERA_CACHE"]) / "tokens"
  (leftover,) = [p for p in tokens.iterdir() if ".build-" in p.name]
  assert (leftover / "all.bin").exists()
  built = cache.prepare(str(corpus), tok)
  assert not leftover.exists()  # the next build clears it
  assert_splits_equal(built.splits(), make_splits(load_corpus(str(corpus)), tok))


def test_splits_share_no_document_and_record_boundaries(tmp_path):
  corpus, tok = write_docs(tmp_path / "docs", 23), tokenizers.ByteTokenizer()
  built = cache.prepare(str(corpus), tok, split="documents", val_fraction=0.15)
  splits, manifest = built.splits(), built.manifest
  train_text, val_text = tok.decode(splits.train), tok.decode(splits.val)
  for i in range(23):
    assert (f"<doc {i}>" in train_text) != (f"<doc {i}>" in val_text)
  texts = [p.read_text() for p in sorted(corpus.iterdir())]
  for name, stream in [("train", splits.train), ("val", splits.val)]:
    docs = built.documents(name)
    assert len(docs) == manifest.documents[name]
    ends = np.append(docs[1:, 1] - 1, len(stream))
    for (number, start), end in zip(docs, ends):
      assert tok.decode(stream[start:end]) == texts[number]
  assert sorted(built.documents("train")[:, 0].tolist() + built.documents("val")[:, 0].tolist()) == list(range(23))
  assert manifest.split == "documents" and manifest.num_documents == 23
  assert splits.train_bytes + splits.val_bytes == sum(len(t.encode()) for t in texts)


def test_tail_split_is_one_cut(tmp_path):
  corpus, tok = write_docs(tmp_path / "docs", 5), tokenizers.ByteTokenizer()
  built = cache.prepare(str(corpus), tok, split="tail", val_fraction=0.25)
  splits = built.splits()
  whole = make_splits(load_corpus(str(corpus)), tok, mode="tail", val_fraction=0.999)
  joined = np.concatenate([whole.train, whole.val])
  np.testing.assert_array_equal(np.concatenate([splits.train, splits.val]), joined)
  assert len(splits.train) == int(len(joined) * 0.75)
  # The document at the cut is in both lists, and starts the validation stream.
  train_docs, val_docs = built.documents("train"), built.documents("val")
  assert train_docs[-1, 0] == val_docs[0, 0] and val_docs[0, 1] == 0
  assert len(train_docs) + len(val_docs) == 6


def test_empty_files_stay_in_training(tmp_path):
  corpus, tok = write_docs(tmp_path / "docs", 12), tokenizers.ByteTokenizer()
  for i in range(12):
    (corpus / f"doc{i:03d}e.txt").write_text("")  # after each text, in name order
  built = cache.prepare(str(corpus), tok, split="documents", val_fraction=0.2)
  files = sorted(corpus.iterdir())
  assert [files[number].stat().st_size > 0 for number in built.documents("val")[:, 0]] == [True] * 3
  assert_splits_equal(built.splits(), make_splits(load_corpus(str(corpus)), tok, val_fraction=0.2))
  # One text and three empty files: "auto" cuts the tail, as of a single file, where it
  # held out the empty ones (validation: 2 end-of-text tokens).
  (tmp_path / "one").mkdir()
  (tmp_path / "one" / "a.txt").write_text("hello world " * 100)
  for i in range(3):
    (tmp_path / "one" / f"z{i}.txt").write_text("")
  built = cache.prepare(str(tmp_path / "one"), tok)
  assert built.manifest.split == "tail" and built.manifest.bytes["val"] == 118


def test_a_validation_split_without_text_is_an_error(tmp_path):
  # The tail of one short text and 39 empty files is end-of-text tokens: bits per byte
  # would divide by zero at the first evaluation.
  (tmp_path / "docs").mkdir()
  (tmp_path / "docs" / "a.txt").write_text("x" * 100)
  for i in range(39):
    (tmp_path / "docs" / f"z{i:02d}.txt").write_text("")
  with pytest.raises(ChimeraError, match=r"data.corpus: the validation split has no text \(3 tokens, 0 bytes\)"):
    load_splits(str(tmp_path / "docs"), tokenizers.ByteTokenizer(), val_fraction=0.02)
  tokens = Path(os.environ["CHIMERA_CACHE"]) / "tokens"
  assert [p.name for p in tokens.iterdir() if not p.name.endswith(".lock")] == []


def test_wide_vocabularies_get_uint32():
  assert cache.token_dtype(257) == cache.token_dtype(1 << 16) == np.uint16
  assert cache.token_dtype((1 << 16) + 1) == np.uint32


def test_counts_and_unigram_loss(tmp_path):
  corpus, tok = write_docs(tmp_path / "docs", 12), tokenizers.ByteTokenizer()
  splits = load_splits(str(corpus), tok)
  np.testing.assert_array_equal(splits.counts[0], np.bincount(splits.train, minlength=257))
  np.testing.assert_array_equal(splits.counts[1], np.bincount(splits.val, minlength=257))
  # The add-one unigram model over a padded vocabulary, token by token.
  probs = (np.bincount(splits.train, minlength=300) + 1.0) / (len(splits.train) + 300)
  expected = -np.log(probs[np.asarray(splits.val)]).mean()
  assert unigram_cross_entropy(splits.counts, 300) == pytest.approx(expected, rel=1e-12)


def test_empty_and_bad_corpora(tmp_path):
  tok = tokenizers.ByteTokenizer()
  (tmp_path / "blank").mkdir()
  (tmp_path / "blank" / "a.txt").write_text(" \n")
  (tmp_path / "blank" / "b.txt").write_text("")
  with pytest.raises(ChimeraError, match="data.corpus: .*blank is empty"):
    load_splits(str(tmp_path / "blank"), tok)
  with pytest.raises(ChimeraError, match="data.val_fraction: must be in"):
    load_splits(str(tmp_path / "blank"), tok, val_fraction=1.5)
  with pytest.raises(ChimeraError, match="data.corpus: no such file"):
    load_splits(str(tmp_path / "nothing.txt"), tok)


def test_cli_prepares_and_reports(tmp_path):
  corpus = write_docs(tmp_path / "docs", 10)
  command = [sys.executable, "-m", "chimera.data", f"--corpus={corpus}", "--tokenizer=byte",
             "--split=documents", "--val_fraction=0.2"]
  result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert lines[0].startswith(f"cache: {os.environ['CHIMERA_CACHE']}/tokens/docs-byte-")
  assert "10 documents" in lines[1] and "documents split" in lines[1]
  # Bytes per token is just under 1: end-of-text stands for no bytes.
  assert re.fullmatch(r"train: [\d,]+ tokens, \d+ documents, [\d,]+ bytes, 0\.99\d bytes/token", lines[2])
  assert re.fullmatch(r"val: [\d,]+ tokens, \d+ documents, [\d,]+ bytes, 0\.99\d bytes/token", lines[3])
  assert "data: tokenizing" in result.stderr and lines[1].endswith(" s") and ", built in " in lines[1]
  again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)  # the same cache
  assert again.stdout.splitlines()[0] == lines[0] and "tokenizing" not in again.stderr
  assert ", read from the cache (built in " in again.stdout.splitlines()[1]
  os.utime(corpus / "doc001.txt")  # touched, not changed: still read, not built
  touched = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
  assert ", read from the cache (built in " in touched.stdout.splitlines()[1]
  one = write_docs(tmp_path / "one", 1)
  single = subprocess.run(command[:3] + [f"--corpus={one}", "--tokenizer=byte"], cwd=ROOT,
                          capture_output=True, text=True)
  assert single.returncode == 0, single.stderr
  assert ", 1 document, " in single.stdout.splitlines()[1]
  # Bad input: one line and exit status 2, as every tool's.
  for flag, message in (("--tokenizer=bpe", "data.tokenizer: unknown tokenizer 'bpe' (expected "
                                            "'byte' or 'gpt2')"),
                        ("--threads=0", "--threads: must be >= 1, got 0"),
                        # An empty corpus was the current directory, read whole; a text
                        # field on a plain file was read by nothing (chimera.main refused both).
                        ("--corpus=", "config.data.corpus: is empty"),
                        ("--text_field=body", "config.data.text_field: names a column of an hf: "
                                              f"corpus; {corpus} is read as text, so it takes "
                                              "none (got 'body')")):
    bad = subprocess.run(command[:4] + [flag], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [f"error: {message}"]


def test_bench_cache_leaves_a_corpus_it_did_not_write(tmp_path):
  """bench_cache deletes the corpus it wrote, never one that was there before it."""
  (tmp_path / "corpus").mkdir()
  (tmp_path / "corpus" / "mine.txt").write_text("the user's text")
  result = subprocess.run([sys.executable, "-m", "chimera.data.bench_cache", f"--dir={tmp_path}",
                           "--parts="], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "CHIMERA_CACHE": str(tmp_path / "cache")})
  assert result.returncode == 0, result.stderr[-2000:]
  assert "did not write them" in result.stdout
  assert (tmp_path / "corpus" / "mine.txt").read_text() == "the user's text"


def test_bench_cache_leaves_no_partial_corpus_and_runs_from_anywhere(tmp_path, monkeypatch):
  """An interrupted write left a partial corpus that the next run took for the one it asked
  for (and never deleted); the train part named its config relative to the checkout."""
  from chimera.data import bench_cache
  monkeypatch.setattr(bench_cache, "load_corpus", lambda name: [
      types.SimpleNamespace(text="ROMEO: the king will speak\n" * 50)])
  written, real = [], bench_cache._write_file

  def interrupted(path, lines, rng):
    if len(written) == 2:
      raise KeyboardInterrupt
    written.append(path)
    return real(path, lines, rng)
  monkeypatch.setattr(bench_cache, "_write_file", interrupted)
  with pytest.raises(KeyboardInterrupt):
    bench_cache.write_corpus(tmp_path / "corpus", size_mb=5)
  assert list(tmp_path.iterdir()) == []  # no corpus, and no partial one beside it
  monkeypatch.setattr(bench_cache, "_write_file", real)
  assert bench_cache.write_corpus(tmp_path / "corpus", size_mb=3) >= 3 * bench_cache.FILE_BYTES
  assert len(list((tmp_path / "corpus").iterdir())) == 3
  config = next(a for a in bench_cache.TRAIN if a.startswith("--config="))
  assert Path(config.removeprefix("--config=").removesuffix(":tiny")).is_absolute()
  assert bench_cache.DENSE.is_file()


@pytest.mark.parametrize("flags, message", [
    (["--size_mb=0"], "--size_mb: must be >= 1, got 0"),
    (["--size_mb=1", "--repeats=0"], "--repeats: must be >= 1, got 0"),
    (["--size_mb=1", "--parts=prepare,tran"],
     "--parts: expected prepare, train, both, or none (--parts=), got 'prepare,tran'"),
])
def test_bench_cache_refuses_bad_flags_before_writing(tmp_path, flags, message):
  """Flags that would fail only after the corpus is written (a KeyError with no training
  repeat), or would measure nothing unasked, are one line first, and nothing is written.
  (--size_mb=1: were a check lost, 1 MB is written, not the default 1 GB.)"""
  result = subprocess.run([sys.executable, "-m", "chimera.data.bench_cache",
                           f"--dir={tmp_path / 'bench'}", *flags], capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr.strip() == "error: " + message
  assert not (tmp_path / "bench").exists()


def test_bench_cache_refuses_a_corpus_the_disk_cannot_hold(tmp_path):
  """Checked in this process (`check_flags` writes nothing): a corpus larger than the free
  space, with its cache, is refused before the first file; one already there is reused, so
  it needs no room."""
  from chimera.data import bench_cache
  folder = tmp_path / "bench" / "corpus"
  with pytest.raises(ChimeraError, match=r"^--size_mb=1000000000: the corpus and its cache "
                                         r"need about 1\.5e\+06 GB, and .* GB free$"):
    bench_cache.check_flags(10**9, folder, ["prepare"], 1)
  folder.mkdir(parents=True)
  assert bench_cache.check_flags(10**9, folder, ["prepare"], 1) > 0


def test_bench_cache_refuses_a_dir_that_is_a_file(tmp_path):
  (tmp_path / "afile").write_text("x")
  result = subprocess.run([sys.executable, "-m", "chimera.data.bench_cache",
                           f"--dir={tmp_path / 'afile'}", "--size_mb=1"], capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 2
  assert result.stderr.strip() == f"error: --dir: cannot write under {tmp_path / 'afile'}"


class ShiftedBytes(tokenizers.ByteTokenizer):
  """Another id mapping under the byte tokenizer's name: byte b is id (b + 1) % 256."""
  identity = "byte, each id shifted by one"

  def encode(self, text):
    return (super().encode(text) + 1) % 256

  def encode_batch(self, texts, num_threads=1):
    return [self.encode(text).astype(np.uint8) for text in texts]


def test_the_cache_is_keyed_by_the_tokenizers_identity_not_its_name(tmp_path):
  """Two tokenizers of one name and other ids (GPT-2's under another rank file) are two
  caches: the second must not map the first one's tokens."""
  corpus = write_docs(tmp_path / "docs", 8)
  plain = cache.prepare(str(corpus), tokenizers.ByteTokenizer()).splits()
  shifted = cache.prepare(str(corpus), ShiftedBytes())
  assert shifted.built
  for ours, theirs in ((shifted.splits().train, plain.train), (shifted.splits().val, plain.val)):
    theirs = np.asarray(theirs, np.int64)
    np.testing.assert_array_equal(ours, np.where(theirs == 256, 256, (theirs + 1) % 256))


def test_the_documents_split_weighs_documents_by_characters_not_bytes(tmp_path):
  """held_out weighs documents by their characters (as make_splits does), also when the
  cache builds the split. By hand, val_fraction 0.2 (k = 5, order e, d, c, b, a):
  characters 100, 100, 100, 100, 40 -> target 88: e (40), then d (140) -> {d, e}.
  Counted in bytes ("日" is 3), e alone (120 of 520 bytes) would reach the target."""
  (tmp_path / "docs").mkdir()
  for name in "abcd":
    (tmp_path / "docs" / f"{name}.txt").write_text(name * 100)
  (tmp_path / "docs" / "e.txt").write_text("日" * 40)
  tok = tokenizers.ByteTokenizer()
  built = cache.prepare(str(tmp_path / "docs"), tok, split="documents", val_fraction=0.2)
  assert built.documents("val")[:, 0].tolist() == [3, 4]
  assert built.manifest.bytes == {"train": 300, "val": 220}
  assert_splits_equal(built.splits(), make_splits(load_corpus(str(tmp_path / "docs")), tok,
                                                  val_fraction=0.2, mode="documents"))


def test_peek_tells_a_cache_of_the_text_now_from_one_of_earlier_text(tmp_path, monkeypatch):
  """chimera.compare checks finished runs against peek: a cache of text the corpus no
  longer holds comes back with False (the run's text, changed since), never as current;
  and peek builds nothing."""
  corpus, tok = write_docs(tmp_path / "docs", 6), tokenizers.ByteTokenizer()
  assert cache.peek(str(corpus), tok) == (None, False)
  built = cache.prepare(str(corpus), tok)
  assert cache.peek(str(corpus), tok) == (built.manifest, True)
  (corpus / "doc001.txt").write_text("<doc 1> changed")
  refuse_to_tokenize(monkeypatch, tok)
  manifest, current = cache.peek(str(corpus), tok)
  assert manifest.content_hash == built.manifest.content_hash and current is False
