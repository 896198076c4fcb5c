"""hf: corpora from local datasets built here; the Hub's errors are stood in for."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import datasets  # a dev dependency (pyproject's [dev]): missing, these tests fail, not skip
import numpy as np
import pytest

from chimera.data import cache, hf, load_splits
from chimera.data.batches import make_splits
from chimera.data.corpora import load_corpus
from chimera.data.tokenizers import ByteTokenizer
from chimera.errors import ChimeraError

ROOT = Path(__file__).resolve().parents[2]
TEXTS = [f"<row {i}> " + "lorem ipsum dolor " * (i % 7 + 1) for i in range(30)]


@pytest.fixture
def saved(tmp_path):
  """A Dataset saved with save_to_disk: a text column and a label column."""
  path = tmp_path / "saved"
  datasets.Dataset.from_dict({"body": TEXTS, "label": list(range(30))}).save_to_disk(str(path))
  return path


@pytest.fixture
def json_folder(tmp_path):
  """A folder of JSON lines with two configs, as the Hub's datasets declare them."""
  for config, texts in [("first", TEXTS[:20]), ("second", TEXTS[20:])]:
    (tmp_path / "hub" / config).mkdir(parents=True)
    with open(tmp_path / "hub" / config / "train.jsonl", "w") as f:
      for i, text in enumerate(texts):
        f.write(json.dumps({"text": text, "n": i}) + "\n")
  (tmp_path / "hub" / "README.md").write_text(
      "---\nconfigs:\n"
      + "".join(f"- config_name: {c}\n  data_files:\n  - split: train\n    path: {c}/*.jsonl\n"
                for c in ("first", "second")) + "---\n")
  return tmp_path / "hub"


def test_saved_dataset_rows_are_documents(saved):
  docs = load_corpus(f"hf:{saved}", text_field="body")
  assert [d.text for d in docs] == TEXTS
  assert docs[11].name == f"hf:{saved}/0000000011"
  assert [d.name for d in docs] == sorted(d.name for d in docs)


def test_saved_dataset_dict_uses_its_train_split(tmp_path):
  path = tmp_path / "dict"
  datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": TEXTS[:3]}),
                        "test": datasets.Dataset.from_dict({"text": ["held"]})}).save_to_disk(str(path))
  assert [d.text for d in load_corpus(f"hf:{path}")] == TEXTS[:3]


def test_streamed_json_with_configs(json_folder):
  assert [d.text for d in load_corpus(f"hf:{json_folder}:second")] == TEXTS[20:]


def test_each_config_has_its_own_token_cache(json_folder):
  """hf:FOLDER:first and hf:FOLDER:second are other texts: neither reads the other's cache."""
  tok = ByteTokenizer()
  first, second = (load_splits(f"hf:{json_folder}:{name}", tok) for name in ("first", "second"))
  whole = lambda splits: tok.decode(np.concatenate([splits.train, splits.val]))
  assert "<row 0>" in whole(first) and "<row 0>" not in whole(second)
  assert "<row 25>" in whole(second) and "<row 25>" not in whole(first)


def test_cached_hf_corpus_equals_in_memory(saved, monkeypatch):
  tok = ByteTokenizer()
  cached = load_splits(f"hf:{saved}", tok, text_field="body")
  expected = make_splits(load_corpus(f"hf:{saved}", text_field="body"), tok)
  for a, b in zip(cached, expected):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert isinstance(cached.train, np.memmap)
  # A later run needs neither the dataset library's reader nor the tokenizer.
  monkeypatch.setattr(hf, "_import_datasets", lambda spec: pytest.fail("read the dataset again"))
  monkeypatch.setattr(tok, "encode_batch", lambda *a, **k: pytest.fail("tokenized again"))
  np.testing.assert_array_equal(load_splits(f"hf:{saved}", tok, text_field="body").val, cached.val)


def test_a_touched_hf_folder_is_reused_and_a_changed_one_rebuilt(json_folder, monkeypatch):
  """A local hf: folder's files hold many documents each: touching them (a copy, a
  checkout) keeps the cache, which compares the files' bytes, not the documents'."""
  tok = ByteTokenizer()
  spec = f"hf:{json_folder}:first"
  built = cache.prepare(spec, tok)
  assert built.manifest.files_hash not in (None, built.manifest.content_hash)
  os.utime(json_folder / "first" / "train.jsonl", ns=(1, 1))  # same bytes, another mtime
  with monkeypatch.context() as m:
    m.setattr(tok, "encode_batch", lambda *a, **k: pytest.fail("tokenized again"))
    again = cache.prepare(spec, tok)
  assert again.manifest.files != built.manifest.files  # updated: the next check is a stat
  with open(json_folder / "first" / "train.jsonl", "a") as f:
    f.write(json.dumps({"text": "<row 99> a new row", "n": 99}) + "\n")
  changed = cache.prepare(spec, tok)
  assert changed.manifest.num_documents == built.manifest.num_documents + 1


def test_the_text_field_is_part_of_the_cache_key(saved, tmp_path):
  path = tmp_path / "two"
  datasets.Dataset.from_dict({"text": ["a b c"] * 8, "title": ["x y"] * 8}).save_to_disk(str(path))
  tok = ByteTokenizer()
  by_text, by_title = (load_splits(f"hf:{path}", tok, text_field=f) for f in ("text", "title"))
  assert tok.decode(by_text.train).startswith("a b c") and tok.decode(by_title.train).startswith("x y")


def one_line_error(spec, message, text_field="text"):
  with pytest.raises(ChimeraError, match=message) as error:
    load_corpus(spec, text_field=text_field)
  assert "\n" not in str(error.value)


def test_missing_local_dataset(tmp_path):
  one_line_error(f"hf:{tmp_path}/nowhere", r"data.corpus: hf dataset '.*nowhere' not found \(no such local folder\)")


def test_missing_text_field(saved, json_folder):
  one_line_error(f"hf:{saved}", r"data.text_field: hf:.*saved has no column 'text' \(columns: body, label\)")
  one_line_error(f"hf:{json_folder}:first", r"data.text_field: .* has no column 'story' \(columns: text, n\)",
                 text_field="story")
  one_line_error(f"hf:{saved}", "data.text_field: column 'label' of hf:.* holds int64, not text",
                 text_field="label")


def test_a_file_that_does_not_parse(tmp_path):
  (tmp_path / "bad").mkdir()
  (tmp_path / "bad" / "rows.jsonl").write_text('{"text": "fine"}\n{"text": oops\n')
  one_line_error(f"hf:{tmp_path}/bad", r"data.corpus: hf:.*bad: .*JSON parse error")


def test_a_bad_file_is_one_line_and_logs_nothing(tmp_path):
  """datasets logs a file that does not parse before it raises; only the error is seen
  (a subprocess: under pytest its log handler writes to a stream pytest holds)."""
  (tmp_path / "bad").mkdir()
  (tmp_path / "bad" / "rows.jsonl").write_text('{"text": "fine"}\n{"text": oops\n')
  result = subprocess.run([sys.executable, "-m", "chimera.data", f"--corpus=hf:{tmp_path}/bad"],
                          capture_output=True, text=True, cwd=ROOT)
  assert result.returncode == 2
  assert re.fullmatch(r"error: data\.corpus: hf:\S+/bad: JSON parse error: [^\n]*\n",
                      result.stderr), result.stderr


def test_empty_data_files(tmp_path):
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "rows.jsonl").write_text("")
  one_line_error(f"hf:{tmp_path}/empty", r"data.corpus: hf:.*empty has no rows \(its data "
                                         r"files are empty\)")


def test_rows_without_the_text_field_are_counted(tmp_path, capfd):
  """A JSON line without the field reads as null: an empty document, and said."""
  (tmp_path / "mixed").mkdir()
  with open(tmp_path / "mixed" / "rows.jsonl", "w") as f:
    for i in range(20):
      f.write(json.dumps({"text" if i % 2 else "txt": f"row {i}"}) + "\n")
  docs = load_corpus(f"hf:{tmp_path}/mixed")
  assert [d.text for d in docs] == ["" if i % 2 == 0 else f"row {i}" for i in range(20)]
  assert capfd.readouterr().err.splitlines() == [
      f"data: 10 of 20 rows of hf:{tmp_path}/mixed have no 'text' (null): read as empty "
      f"documents"]


def test_missing_config(json_folder, saved):
  one_line_error(f"hf:{json_folder}:third",
                 r"data.corpus: hf dataset '.*hub' has no config 'third' \(.*Available: \['first', 'second'\]\)")
  one_line_error(f"hf:{json_folder}",
                 r"data.corpus: hf dataset '.*hub' needs a config, as hf:.*hub:CONFIG \(.*\['first', 'second'\]\)")
  one_line_error(f"hf:{saved}:first", "a dataset saved with save_to_disk has no configs, so drop ':first'")


def test_missing_train_split(tmp_path):
  path = tmp_path / "nosplit"
  datasets.DatasetDict({"test": datasets.Dataset.from_dict({"text": ["a"]})}).save_to_disk(str(path))
  one_line_error(f"hf:{path}", r"data.corpus: hf:.*nosplit has no 'train' split \(splits: test\)")


@pytest.mark.parametrize("error, message", [
    (lambda: datasets.exceptions.DatasetNotFoundError(
        "Dataset 'someone/missing' doesn't exist on the Hub or cannot be accessed."),
     r"data.corpus: hf dataset 'someone/missing' not found \(Dataset 'someone/missing' doesn't exist"),
    (lambda: ConnectionError("Couldn't reach 'someone/missing' on the Hub (LocalEntryNotFoundError)"),
     r"data.corpus: hf dataset 'someone/missing' cannot be reached, is this machine offline\? "
     r"\(Couldn't reach .*\); a copy saved with save_to_disk, or a folder of its data files, "
     r"loads offline as hf:PATH$"),
])
def test_hub_errors_name_the_dataset(monkeypatch, error, message):
  def load_dataset(*args, **kwargs):
    raise error()
  monkeypatch.setattr(datasets, "load_dataset", load_dataset)
  one_line_error("hf:someone/missing", message)


def test_hub_datasets_are_streamed_by_name(monkeypatch):
  calls = []

  def load_dataset(name, config, split, streaming):
    calls.append((name, config, split, streaming))
    return datasets.Dataset.from_dict({"text": ["one", "two"]}).to_iterable_dataset()
  monkeypatch.setattr(datasets, "load_dataset", load_dataset)
  assert [d.text for d in load_corpus("hf:someone/corpus:sample-10BT")] == ["one", "two"]
  assert calls == [("someone/corpus", "sample-10BT", "train", True)]
