"""The token cache: a (corpus, tokenizer, split) is tokenized once, then memory-mapped.

The first `load_splits` of a corpus tokenizes it on every core and writes, under
$CHIMERA_CACHE/tokens/<corpus>-<tokenizer>-<key>/:

  train.bin, val.bin      the split's token streams, end-of-text between documents: uint16,
                          or uint32 for a vocabulary past 65,536 ids
  train.docs.npy, val.docs.npy
                          [D, 2] int64: each document's number in the corpus (name order)
                          and the offset in the stream where it starts
  counts.npy              [2, V] int64: how often each id occurs in train and val
  manifest.json           written last (see `Manifest`)

A build happens in a temp folder beside its place and is renamed into it, so a killed build
leaves nothing a later run would use. Later runs check the manifest and every file's size,
not the contents, and map the streams: start-up time and memory do not grow with the corpus.
"""
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from array import array
from pathlib import Path
from typing import NamedTuple

import numpy as np

from chimera.data.batches import Splits, check_val_bytes, held_out, resolve_mode
from chimera.data.corpora import (Corpus, cache_dir, cache_writes, open_corpus, open_corpus_file,
                                   write_atomic)
from chimera.errors import ChimeraError

FORMAT = 2  # bump when the layout, the tokenization or the split changes: older caches are rebuilt
BATCH_CHARS = 1 << 24  # text tokenized per batch, shared among the threads
PIECE_CHARS = 1 << 20  # longer documents are cut into pieces of about this size
COPY_TOKENS = 1 << 24  # tokens moved at a time when the split is written
# A cut before a space or newline that follows a word character or ASCII punctuation.
# GPT-2's pre-tokenizer never joins such a pair (a pre-token holding a non-space never goes
# on with whitespace), so the tokens of the pieces, joined, are the tokens of the whole text.
# The byte tokenizer can be cut anywhere.
_CUT = re.compile(r"""(?<=[\w.,;:!?'")\]}])[ \n]""")


@dataclasses.dataclass(frozen=True)
class Manifest:
  """What a cache folder holds. `key` says what it is of; the rest is what was built."""
  key: dict  # format, corpus, tokenizer, split and val_fraction; its hash names the folder
  files: list  # [[path, size, mtime_ns]] of the corpus's local files; [] if read by name
  content_hash: str  # blake2b-128 over each document's blake2b-128 of its UTF-8 text
  num_documents: int
  split: str  # as resolved: "documents" or "tail"
  dtype: str  # of the token streams
  tokens: dict  # {"train": count, "val": count}
  bytes: dict  # UTF-8 bytes of text behind each stream, for bits per byte
  documents: dict  # documents in each stream (at a tail split, the one cut is in both)
  sizes: dict  # {file name: bytes} of every file of the cache but the manifest
  build_seconds: float
  # blake2b-128 over each local file's bytes (`_files_content_hash`): where a file holds
  # many documents (an hf: folder of parquet or JSON lines) it is not content_hash. None
  # in caches built before it was kept, and for corpora read by name.
  files_hash: str | None = None

  def write(self, folder: Path) -> None:
    write_atomic(folder / "manifest.json", json.dumps(dataclasses.asdict(self), indent=1).encode())


@dataclasses.dataclass(frozen=True)
class TokenCache:
  path: Path
  manifest: Manifest
  built: bool = False  # by this call (else read from the cache)

  def splits(self) -> Splits:
    """The train and val streams, memory-mapped read-only."""
    m = self.manifest
    streams = [np.memmap(self.path / f"{name}.bin", m.dtype, "r", shape=(m.tokens[name],))
               if m.tokens[name] else np.zeros(0, m.dtype) for name in ("train", "val")]
    return Splits(*streams, m.bytes["train"], m.bytes["val"], np.load(self.path / "counts.npy"))

  def documents(self, split: str) -> np.ndarray:
    """[D, 2] int64: each document of `split` ("train" or "val"): its number in the corpus,
    and where it starts in the stream."""
    return np.load(self.path / f"{split}.docs.npy", mmap_mode="r")


def token_dtype(vocab_size: int) -> np.dtype:
  return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def _where(corpus: str, tokenizer, split: str, val_fraction: float,
           text_field: str) -> tuple[Corpus, dict, Path]:
  """(the corpus opened, its cache's key, the cache's folder)."""
  resolve_mode(0, split, val_fraction)  # a bad split or val_fraction fails before any work
  source = open_corpus(corpus, text_field=text_field)
  key = {"format": FORMAT, "corpus": source.key, "tokenizer": tokenizer.identity,
         "split": split, "val_fraction": val_fraction}
  digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
  slug = re.sub(r"[^A-Za-z0-9._-]+", "_", corpus.rstrip("/").rsplit("/", 1)[-1])[-40:]
  return source, key, cache_dir() / "tokens" / f"{slug}-{tokenizer.name}-{digest}"


def peek(corpus: str, tokenizer, *, split: str = "auto", val_fraction: float = 0.1,
         text_field: str = "text") -> tuple[Manifest | None, bool]:
  """(the manifest of `corpus`'s complete cache, whether the corpus still holds its text),
  built by no one: (None, False) if there is none. A cache whose corpus changed since is
  returned with False (its content_hash is the earlier text's)."""
  source, key, path = _where(corpus, tokenizer, split, val_fraction, text_field)
  manifest, _ = _check(path, key, source)
  if manifest:
    return manifest, True
  return _check(path, key, None)[0], False


def prepare(corpus: str, tokenizer, *, split: str = "auto", val_fraction: float = 0.1,
            text_field: str = "text", num_threads: int | None = None) -> TokenCache:
  """The cache of `corpus` under `tokenizer` and this split, built if it is missing,
  incomplete or of another version of the corpus's files."""
  source, key, path = _where(corpus, tokenizer, split, val_fraction, text_field)
  manifest, stale = _check(path, key, source)
  if manifest:
    return TokenCache(path, manifest)
  with cache_writes(path.parent, "the token cache"), _locked(path):
    manifest, stale = _check(path, key, source)  # another process may have built it
    if manifest:
      return TokenCache(path, manifest)
    if (manifest := _reuse_moved(path, key, source)):
      return TokenCache(path, manifest)
    if stale:
      print(f"data: rebuilding the token cache {path}: {stale}", file=sys.stderr)
    manifest = _build(path, key, source, tokenizer, num_threads or len(os.sched_getaffinity(0)))
  return TokenCache(path, manifest, built=True)


def load_splits(corpus: str, tokenizer, *, split: str = "auto", val_fraction: float = 0.1,
                text_field: str = "text") -> Splits:
  """Train and validation streams of `corpus` that share no document ("documents") or no
  text ("tail"), memory-mapped from the token cache. See `batches.make_splits`, whose
  streams these equal."""
  return prepare(corpus, tokenizer, split=split, val_fraction=val_fraction,
                 text_field=text_field).splits()


# --- Checking a cache. ---------------------------------------------------------------------


def _fingerprint(files: tuple[str, ...]) -> list:
  return [[path, (st := os.stat(path)).st_size, st.st_mtime_ns] for path in files]


def _content_hash(document_digests) -> str:
  corpus = hashlib.blake2b(digest_size=16)
  for digest in document_digests:
    corpus.update(digest)
  return corpus.hexdigest()


def _files_content_hash(files: tuple[str, ...]) -> str:
  def digest(path):
    with open_corpus_file(path) as f:
      return hashlib.file_digest(f, lambda: hashlib.blake2b(digest_size=16)).digest()
  return _content_hash(digest(path) for path in files)


def _check(path: Path, key: dict | None, source: Corpus | None) -> tuple[Manifest | None, str]:
  """(the manifest, "") of a complete cache of this key and source, else (None, why not);
  of any key and source if they are None."""
  try:
    manifest = Manifest(**json.loads((path / "manifest.json").read_text()))
    if key is not None and manifest.key != key:
      return None, "its manifest is of another corpus, tokenizer or split"
    itemsize = np.dtype(manifest.dtype).itemsize
    if any(manifest.sizes[f"{name}.bin"] != manifest.tokens[name] * itemsize for name in ("train", "val")):
      return None, "its manifest gives a token file a size that does not match its token count"
  except FileNotFoundError:
    return None, "there is no manifest" if path.exists() else ""
  except (ValueError, TypeError, KeyError, AttributeError) as error:
    return None, f"its manifest is unreadable ({type(error).__name__}: {error})"
  for name, size in manifest.sizes.items():
    actual = (path / name).stat().st_size if (path / name).exists() else None
    if actual != size:
      return None, f"{name} is {'missing' if actual is None else f'{actual} bytes'}, not {size} bytes"
  if source is not None and source.files:
    fingerprint = _fingerprint(source.files)
    if fingerprint != manifest.files:
      # Touched or moved, perhaps not changed: the content decides.
      if _files_content_hash(source.files) != (manifest.files_hash or manifest.content_hash):
        return None, "the corpus's files changed since it was built"
      manifest = dataclasses.replace(manifest, files=fingerprint)
      with contextlib.suppress(OSError):  # a shared cache this user cannot write:
        manifest.write(path)  # the content is checked again next time
  return manifest, ""


@contextlib.contextmanager
def _locked(path: Path, wait: bool = True):
  """Holds an flock for `path`, so that one process builds it while the others wait.
  Yields True, or with `wait` False, False at once if another process holds it."""
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path.parent / f".{path.name}.lock", "a") as lock:
    try:
      fcntl.flock(lock, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
      yield False
      return
    for leftover in path.parent.glob(f".{path.name}.build-*"):  # from a killed build
      shutil.rmtree(leftover, ignore_errors=True)
    yield True


# --- Building a cache. ---------------------------------------------------------------------


class _Stream(NamedTuple):
  """All documents in name order, end-of-text between them, as tokenized into all.bin."""
  doc_starts: np.ndarray  # [D] int64: where each document's tokens start
  doc_chars: np.ndarray  # [D] int64: characters of each document's text
  counts: np.ndarray  # [V] int64: of the whole stream, end-of-text included
  num_tokens: int
  content_hash: str


@contextlib.contextmanager
def _build_folder(path: Path):
  """A temporary folder beside `path` for a cache being made, removed if making it fails."""
  folder = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.build-"))
  try:
    yield folder
  except BaseException:
    shutil.rmtree(folder, ignore_errors=True)
    raise


def _put_in_place(folder: Path, path: Path, manifest: Manifest) -> None:
  """Writes the manifest last, syncs the folder's files, and renames it to `path` (an
  incomplete or stale cache there is set aside and removed first)."""
  manifest.write(folder)
  os.chmod(folder, 0o755)  # mkdtemp's 0700 would hide a shared cache from other users
  for name in [*manifest.sizes, "manifest.json", "."]:  # on disk before it is in place
    fd = os.open(folder / name, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
  if path.exists():
    stale = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.build-stale-"))
    os.rename(path, stale / "old")
    shutil.rmtree(stale)
  os.rename(folder, path)


def _link(source: Path, folder: Path, names: list[str]) -> None:
  """Hard links (copies where a link fails) of `names` in `source` into `folder`."""
  for name in names:
    try:
      os.link(source / name, folder / name)
    except OSError:  # another filesystem, or links not allowed
      shutil.copyfile(source / name, folder / name)


def _build(path: Path, key: dict, source: Corpus, tokenizer, num_threads: int) -> Manifest:
  started = time.perf_counter()
  # The files' hash is taken before they are tokenized, and their fingerprint (sizes and
  # times) before and after: a file written to meanwhile is refused below, not cached
  # with tokens of another text than the hash that will vouch for them.
  fingerprint = _fingerprint(source.files)
  files_hash = _files_content_hash(source.files) if source.files else None
  with _build_folder(path) as folder:
    dtype = token_dtype(tokenizer.vocab_size)
    stream = _tokenize(source, tokenizer, folder / "all.bin", dtype, num_threads)
    split = resolve_mode(int((stream.doc_chars > 0).sum()), key["split"], key["val_fraction"])
    tokens, documents, counts = _write_split(folder, stream, split, key["val_fraction"],
                                             tokenizer.eot_id, dtype)
    np.save(folder / "counts.npy", counts)
    text_bytes = (counts @ tokenizer.token_bytes).tolist()
    check_val_bytes(tokens[1], text_bytes[1])
    names = ["train.bin", "val.bin", "train.docs.npy", "val.docs.npy", "counts.npy"]
    manifest = Manifest(
        key, fingerprint, stream.content_hash, len(stream.doc_starts), split, dtype.name,
        dict(zip(["train", "val"], tokens)), dict(zip(["train", "val"], text_bytes)),
        dict(zip(["train", "val"], documents)),
        {name: (folder / name).stat().st_size for name in names},
        round(time.perf_counter() - started, 3), files_hash)
    try:
      changed = _fingerprint(source.files) != fingerprint
    except FileNotFoundError:  # a file removed meanwhile
      changed = True
    if changed:
      raise ChimeraError(f"data.corpus: {source.spec} changed while it was being tokenized; "
                         f"run again once it is written")
    _put_in_place(folder, path, manifest)
  return manifest


def _reuse_moved(path: Path, key: dict, source: Corpus) -> Manifest | None:
  """The manifest of a new cache at `path` made of another cache's files (hard links, or
  copies where links fail), if one holds the same local files' text under another path: a
  moved or copied corpus, whose tokens and split are the same (documents are read in name
  order, and the split follows their lengths in that order). Files of the same sizes are
  hashed first; None if no cache matches."""
  if not source.files or source.key.startswith(("hf:", "tfds:")):
    return None
  fingerprint = _fingerprint(source.files)  # before the hash: a later change is seen
  sizes = [size for _, size, _ in fingerprint]
  same_kind = lambda other: ({**other, "corpus": None} == {**key, "corpus": None}
                             and not str(other["corpus"]).startswith(("hf:", "tfds:")))
  files_hash = None
  for manifest_path in sorted(path.parent.glob("*/manifest.json")):
    if manifest_path.parent.name.startswith("."):  # a build not yet in place
      continue
    other, _ = _check(manifest_path.parent, None, None)
    if other is None or not same_kind(other.key) or [f[1] for f in other.files] != sizes:
      continue
    files_hash = files_hash or _files_content_hash(source.files)
    if (other.files_hash or other.content_hash) != files_hash:
      continue
    with _locked(manifest_path.parent, wait=False) as held, _build_folder(path) as folder:
      # Under its lock, and as it was when checked: no process rebuilds it meanwhile.
      if not held or _check(manifest_path.parent, None, None)[0] != other:
        shutil.rmtree(folder)
        continue
      _link(manifest_path.parent, folder, list(other.sizes))
      manifest = dataclasses.replace(other, key=key, files=fingerprint, files_hash=files_hash)
      _put_in_place(folder, path, manifest)
    print(f"data: {source.spec} holds the text of the token cache {manifest_path.parent} "
          f"(a moved or copied corpus): its tokens are reused, not tokenized again",
          file=sys.stderr)
    return manifest
  return None


def _cut(text: str, size: int) -> tuple[list[str], str]:
  """(pieces of at least `size` characters, the rest): `text` cut only where `_CUT` allows."""
  pieces, start = [], 0
  while (cut := _CUT.search(text, start + size)) is not None:
    pieces.append(text[start:cut.start()])
    start = cut.start()
  return pieces, text[start:]


def _tokenize(source: Corpus, tokenizer, out_path: Path, dtype: np.dtype,
              num_threads: int) -> _Stream:
  """Tokenizes every document of `source` into `out_path`, BATCH_CHARS of text at a time."""
  doc_starts, doc_chars = array("q"), array("q")
  content = hashlib.blake2b(digest_size=16)  # over each document's digest (see _content_hash)
  counts = np.zeros(tokenizer.vocab_size, np.int64)
  eot = np.array([tokenizer.eot_id], np.uint32)
  batch, batch_chars, num_tokens = [], 0, 0  # batch: [(document number, piece)]
  progress = _Progress(f"data: tokenizing {source.spec}", source.expected)

  def encode_batch(out) -> None:
    nonlocal batch_chars, num_tokens
    pieces, position = [], num_tokens
    for (doc, _), ids in zip(batch, tokenizer.encode_batch([p for _, p in batch], num_threads)):
      if doc == len(doc_starts):  # a document's first piece
        if doc:
          pieces.append(eot)
          position += 1
        doc_starts.append(position)
      pieces.append(ids)
      position += len(ids)
    tokens = np.concatenate(pieces).astype(dtype)
    counts[:] += np.bincount(tokens, minlength=tokenizer.vocab_size)
    out.write(tokens.data)  # not tofile: a full disk is then an OSError with its errno
    num_tokens += len(tokens)
    batch.clear()
    batch_chars = 0

  def add(doc: int, piece: str, out) -> None:
    nonlocal batch_chars
    batch.append((doc, piece))
    batch_chars += len(piece)
    if batch_chars >= BATCH_CHARS:
      encode_batch(out)

  text_bytes, any_text = 0, False
  with open(out_path, "wb") as out:
    for doc, (_, parts) in enumerate(source.read()):
      digest, chars, rest = hashlib.blake2b(digest_size=16), 0, ""
      for part in parts:
        data = part.encode("utf-8")
        digest.update(data)
        chars, text_bytes = chars + len(part), text_bytes + len(data)
        any_text = any_text or (bool(part) and not part.isspace())
        pieces, rest = _cut(rest + part, PIECE_CHARS)
        for piece in pieces:
          add(doc, piece, out)
      add(doc, rest, out)  # every document adds a piece, if only an empty one
      doc_chars.append(chars)
      content.update(digest.digest())
      progress.update(text_bytes, doc + 1)
    if batch:
      encode_batch(out)
  progress.done(text_bytes, len(doc_starts))
  if not any_text:
    raise ChimeraError(f"data.corpus: {source.spec} is empty")
  return _Stream(np.frombuffer(doc_starts, np.int64), np.frombuffer(doc_chars, np.int64),
                 counts, num_tokens, content.hexdigest())


def _gather(src: int, dst: int, runs: list[tuple[int, int]], eot: int, dtype: np.dtype,
            vocab_size: int | None = None) -> tuple[int, np.ndarray | None]:
  """Writes the token runs [a, b) of file `src`, end-of-text between runs, into `dst` from
  its start; returns (tokens written, their counts if `vocab_size`). `dst` may be `src`:
  the runs are in order, apart, and every write lands at or before what was read."""
  item, written = dtype.itemsize, 0
  counts = np.zeros(vocab_size, np.int64) if vocab_size else None
  for i, (begin, end) in enumerate(runs):
    if i:
      os.pwrite(dst, np.array([eot], dtype).tobytes(), written * item)
      written += 1
      if vocab_size:
        counts[eot] += 1
    for start in range(begin, end, COPY_TOKENS):
      data = os.pread(src, min(COPY_TOKENS, end - start) * item, start * item)
      if vocab_size:
        counts += np.bincount(np.frombuffer(data, dtype), minlength=vocab_size)
      os.pwrite(dst, data, written * item)
      written += len(data) // item
  return written, counts


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
  """[(first, last + 1)] of each run of True in `mask`."""
  edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
  return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist()))


def _write_split(folder: Path, stream: _Stream, split: str, val_fraction: float, eot: int,
                 dtype: np.dtype) -> tuple[list[int], list[int], np.ndarray]:
  """Turns all.bin into train.bin and val.bin (+ their .docs.npy); returns the token and
  document counts of (train, val), and counts [2, V]. The training stream is all.bin with
  validation taken out in place, so the build needs little more disk than the cache."""
  starts, n = stream.doc_starts, len(stream.doc_starts)
  ends = np.append(starts[1:] - 1, stream.num_tokens)  # each document's last token + 1
  numbers = np.arange(n)
  all_fd = os.open(folder / "all.bin", os.O_RDWR)
  val_fd = os.open(folder / "val.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
  try:
    if split == "tail":
      # nanoGPT's split: the last val_fraction of the joined stream.
      cut = int(stream.num_tokens * (1 - val_fraction))
      num_val, val_counts = _gather(all_fd, val_fd, [(cut, stream.num_tokens)], eot, dtype, len(stream.counts))
      num_train, train_counts = cut, stream.counts - val_counts
      in_train, in_val = starts < cut, (ends > cut) | (starts >= cut)
      train_docs = np.stack([numbers[in_train], starts[in_train]], 1)
      val_docs = np.stack([numbers[in_val], np.maximum(starts[in_val] - cut, 0)], 1)
    else:
      mask = held_out(stream.doc_chars, val_fraction)
      doc_runs = lambda keep: [(int(starts[a]), int(ends[b - 1])) for a, b in _runs(keep)]
      num_val, val_counts = _gather(all_fd, val_fd, doc_runs(mask), eot, dtype, len(stream.counts))
      num_train, _ = _gather(all_fd, all_fd, doc_runs(~mask), eot, dtype)
      train_counts = stream.counts - val_counts
      train_counts[eot] = max(int((~mask).sum()) - 1, 0)  # all.bin had one more separator
      lengths = lambda keep: ends[keep] - starts[keep] + 1  # with the end-of-text after
      offsets = lambda keep: np.cumsum(lengths(keep)) - lengths(keep)
      train_docs = np.stack([numbers[~mask], offsets(~mask)], 1)
      val_docs = np.stack([numbers[mask], offsets(mask)], 1)
    os.ftruncate(all_fd, num_train * dtype.itemsize)
  finally:
    os.close(all_fd)
    os.close(val_fd)
  os.rename(folder / "all.bin", folder / "train.bin")
  np.save(folder / "train.docs.npy", train_docs.astype(np.int64))
  np.save(folder / "val.docs.npy", val_docs.astype(np.int64))
  return ([num_train, num_val], [len(train_docs), len(val_docs)],
          np.stack([train_counts, val_counts]))


class _Progress:
  """A progress line with rate and ETA on stderr: redrawn in place on a terminal, else
  printed every 30 s."""

  def __init__(self, label: str, expected: dict):
    self.label, self.expected, self.started = label, expected, time.perf_counter()
    self.tty, self.shown = sys.stderr.isatty(), self.started

  def update(self, done_bytes: int, done_docs: int) -> None:
    now = time.perf_counter()
    if now - self.shown >= (0.5 if self.tty else 30):
      self.shown = now
      self._show(done_bytes, done_docs, end="\r" if self.tty else "\n")

  def done(self, done_bytes: int, done_docs: int) -> None:
    self._show(done_bytes, done_docs, end="\n")

  def _show(self, done_bytes: int, done_docs: int, end: str) -> None:
    seconds = max(time.perf_counter() - self.started, 1e-9)
    line = (f"{self.label}: {done_bytes / 1e6:,.1f} MB, {done_docs:,} documents, "
            f"{done_bytes / 1e6 / seconds:.1f} MB/s, {seconds:.0f} s")
    done, total = ((done_bytes, self.expected["bytes"]) if "bytes" in self.expected
                   else (done_docs, self.expected.get("documents")))
    if total:
      fraction = min(done / total, 1)
      bar = "#" * int(fraction * 20)
      eta = seconds * (1 - fraction) / max(fraction, 1e-9)
      line += f" [{bar:<20}] {fraction:.0%}, ETA {eta:.0f} s"
    print(line + " " * 4, end=end, file=sys.stderr, flush=True)
