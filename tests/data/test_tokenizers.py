"""Tokenizers, and placing GPT-2's rank file in tiktoken's cache, offline."""
import hashlib
import io
import tarfile

import numpy as np
import pytest
import tiktoken.load

from chimera.data import tokenizers
from chimera.errors import ChimeraError

# sha1 of R50K_URL: the file name tiktoken looks for in its cache dir.
R50K_CACHE_NAME = "0ea1e91bbb3a60f729a8dc8f777fd2fc07cd8df4"
FAKE_RANKS = b"IQ== 0\nIg== 1\n"


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
  monkeypatch.setenv("CHIMERA_CACHE", str(tmp_path / "cache"))
  monkeypatch.delenv("TIKTOKEN_CACHE_DIR", raising=False)
  return tmp_path / "cache"


def test_byte_round_trip():
  tok = tokenizers.get_tokenizer("byte")
  text = "Hello, naïve café — 日本語 ☃!\n"
  ids = tok.encode(text)
  assert ids.dtype == np.int32 and ids.tolist() == list(text.encode("utf-8"))
  assert tok.decode(ids) == text
  assert (tok.name, tok.vocab_size, tok.eot_id) == ("byte", 257, 256)


def test_byte_decode_drops_eot_and_replaces_broken_utf8():
  tok = tokenizers.ByteTokenizer()
  assert tok.decode([104, 105, 256, 33]) == "hi!"
  assert tok.decode(list("é".encode())[:1]) == "\ufffd"
  assert tok.token_bytes[[104, 256]].tolist() == [1, 0]


def test_unknown_tokenizer():
  with pytest.raises(ChimeraError, match="data.tokenizer: unknown tokenizer 'bpe' .expected 'byte' or 'gpt2'."):
    tokenizers.get_tokenizer("bpe")


def fake_whisper_sdist(cache, monkeypatch, ranks):
  """Puts a whisper sdist holding `ranks` in the sdist cache; pins it and FAKE_RANKS' hashes."""
  archive = cache / "sdists" / "openai-whisper-20250625.tar.gz"
  archive.parent.mkdir(parents=True)
  with tarfile.open(archive, "w:gz") as tar:
    info = tarfile.TarInfo("openai_whisper-20250625/whisper/assets/gpt2.tiktoken")
    info.size = len(ranks)
    tar.addfile(info, io.BytesIO(ranks))
  sha = hashlib.sha256(archive.read_bytes()).hexdigest()
  monkeypatch.setattr(tokenizers, "WHISPER_SDIST", ("openai-whisper", "20250625", sha))
  monkeypatch.setattr(tokenizers, "R50K_SHA256", hashlib.sha256(FAKE_RANKS).hexdigest())


def test_gpt2_ranks_land_where_tiktoken_reads_them(cache, monkeypatch):
  fake_whisper_sdist(cache, monkeypatch, FAKE_RANKS)
  path = tokenizers.ensure_gpt2_ranks()
  assert path == cache / "tiktoken" / R50K_CACHE_NAME
  assert path.read_bytes() == FAKE_RANKS
  # tiktoken finds the file by its own cache rule, so it never reaches for the network.
  monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(path.parent))
  assert tiktoken.load.read_file_cached(tokenizers.R50K_URL) == FAKE_RANKS


def test_gpt2_ranks_honour_a_user_tiktoken_cache_dir(tmp_path, cache, monkeypatch):
  fake_whisper_sdist(cache, monkeypatch, FAKE_RANKS)
  monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "mine"))
  assert tokenizers.ensure_gpt2_ranks() == tmp_path / "mine" / R50K_CACHE_NAME


def test_gpt2_ranks_in_a_folder_the_user_cannot_write(tmp_path, cache, monkeypatch):
  """A read-only $TIKTOKEN_CACHE_DIR without the ranks: one line naming the folder."""
  fake_whisper_sdist(cache, monkeypatch, FAKE_RANKS)
  monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "theirs"))

  def refused(path, data):
    raise PermissionError(13, "Permission denied", str(path))
  monkeypatch.setattr(tokenizers, "write_atomic", refused)
  with pytest.raises(ChimeraError, match=rf"^the cache {tmp_path / 'theirs'} cannot be written "
                                         r"\(Permission denied: "):
    tokenizers.ensure_gpt2_ranks()


def test_gpt2_ranks_with_the_wrong_hash_are_rejected(cache, monkeypatch):
  fake_whisper_sdist(cache, monkeypatch, b"IQ== 7\n")
  with pytest.raises(ChimeraError, match="data.tokenizer: gpt2.tiktoken in .* has sha256 .*, expected"):
    tokenizers.ensure_gpt2_ranks()
  assert not (cache / "tiktoken" / R50K_CACHE_NAME).exists()


def test_gpt2_ranks_already_cached_need_no_sdist(cache, monkeypatch):
  monkeypatch.setattr(tokenizers, "R50K_SHA256", hashlib.sha256(FAKE_RANKS).hexdigest())
  monkeypatch.setattr(tokenizers, "fetch_sdist", lambda *args: pytest.fail("fetched an sdist"))
  (cache / "tiktoken").mkdir(parents=True)
  (cache / "tiktoken" / R50K_CACHE_NAME).write_bytes(FAKE_RANKS)
  assert tokenizers.ensure_gpt2_ranks().read_bytes() == FAKE_RANKS


@pytest.mark.parametrize("lengths, parts", [([5, 1, 1, 1, 5, 3], 2), ([1] * 7, 3), ([0, 0], 4), ([9], 2), ([], 2)])
def test_texts_are_split_into_consecutive_runs_for_threads(lengths, parts):
  texts = ["x" * n for n in lengths]
  runs = tokenizers._split_evenly(texts, parts)
  assert [t for run in runs for t in run] == texts and len(runs) <= parts and all(runs)
  if sum(lengths) and len(lengths) >= parts:
    assert max(sum(map(len, run)) for run in runs) <= sum(lengths) / parts + max(lengths)


def test_byte_encode_batch():
  tok = tokenizers.ByteTokenizer()
  texts = ["héllo", "", "☃"]
  assert [ids.tolist() for ids in tok.encode_batch(texts, 4)] == [tok.encode(t).tolist() for t in texts]


def test_gpt2_methods_treat_special_token_text_as_text():
  """GPT2Tokenizer's methods on a tiny byte-level tiktoken Encoding (the real ranks need
  the network). Literal "<|endoftext|>" in a corpus is text, never the special id: tiktoken
  before 0.11 let encode_to_numpy emit the special id here, hence the version floor."""
  import tiktoken
  from chimera.data.tokenizers import GPT2Tokenizer

  ranks = {bytes([i]): i for i in range(256)}
  ranks[b"th"] = 256
  encoding = tiktoken.Encoding(
      name="tiny", pat_str=r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
      mergeable_ranks=ranks, special_tokens={"<|endoftext|>": 257})
  tokenizer = GPT2Tokenizer.__new__(GPT2Tokenizer)
  tokenizer._encoding, tokenizer.eot_id = encoding, encoding.eot_token
  text = "the <|endoftext|> thé"
  ids = tokenizer.encode(text)
  assert ids.dtype == np.int32 and 256 in ids.tolist() and 257 not in ids.tolist()
  assert tokenizer.decode(ids) == text
  # End-of-text (and any padded id past it) is dropped, not decoded as its literal text.
  assert tokenizer.decode([256, 257, 256, 300]) == "thth"
  texts = [text, "", "th"]
  assert ([a.tolist() for a in tokenizer.encode_batch(texts, 2)]
          == [tokenizer.encode(t).tolist() for t in texts])
