"""`hf:NAME[:CONFIG]` corpora: the train split of a Hugging Face dataset, one document per row.

NAME is a dataset on the Hub (read by streaming, so nothing is downloaded whole), a local
folder of data files the `datasets` loaders read (JSON lines, parquet, CSV, text), or a
folder written by `Dataset.save_to_disk`. The text is the `text_field` column.
"""
import contextlib
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

from chimera.data.corpora import Corpus, files_under
from chimera.errors import ChimeraError

ROWS_PER_READ = 1000  # rows fetched from the dataset at a time


def _import_datasets(spec: str):
  try:
    import datasets
  except ImportError:
    raise ChimeraError(f'data.corpus: {spec} needs the datasets package; run pip install -e ".[hf]"') from None
  datasets.disable_progress_bars()
  return datasets


def _one_line(error: Exception) -> str:
  text = " ".join(str(error).split()).split(" Example of usage")[0]
  return text[:300] or type(error).__name__


def _load_saved(datasets, path: Path, config: str, spec: str):
  """The train split of a `save_to_disk` folder."""
  if config:
    raise ChimeraError(f"data.corpus: {spec}: a dataset saved with save_to_disk has no "
                       f"configs, so drop ':{config}'")
  dataset = datasets.load_from_disk(str(path))
  if isinstance(dataset, datasets.DatasetDict):
    if "train" not in dataset:
      raise ChimeraError(f"data.corpus: {spec} has no 'train' split (splits: {', '.join(dataset)})")
    dataset = dataset["train"]
  return dataset


def _load(datasets, name: str, config: str, spec: str):
  """The train split, streamed, of a Hub dataset or a local folder of data files."""
  try:
    return datasets.load_dataset(name, config or None, split="train", streaming=True)
  except StopIteration:  # its loaders' guess of the format, over a folder of empty files
    raise ChimeraError(f"data.corpus: {spec} has no rows (its data files are empty)") from None
  except ConnectionError as e:  # offline, or the Hub down: not a missing dataset
    raise ChimeraError(f"data.corpus: hf dataset '{name}' cannot be reached, is this machine "
                       f"offline? ({_one_line(e)}); a copy saved with save_to_disk, or a folder "
                       f"of its data files, loads offline as hf:PATH") from None
  except (datasets.exceptions.DatasetNotFoundError, FileNotFoundError) as e:
    raise ChimeraError(f"data.corpus: hf dataset '{name}' not found ({_one_line(e)})") from None
  except ValueError as e:
    message = _one_line(e)
    if config and f"'{config}'" in message:
      raise ChimeraError(f"data.corpus: hf dataset '{name}' has no config '{config}' ({message})") from None
    if "config" in message.lower():
      raise ChimeraError(f"data.corpus: hf dataset '{name}' needs a config, as hf:{name}:CONFIG ({message})") from None
    if "split" in message.lower():
      raise ChimeraError(f"data.corpus: hf dataset '{name}' has no 'train' split ({message})") from None
    raise ChimeraError(f"data.corpus: {spec}: {message}") from None


@contextlib.contextmanager
def _quiet_loggers():
  """Offline, huggingface_hub warns of each retry before the error; datasets logs a file
  that does not parse before raising the error that `_rows` turns into one line."""
  quiet = {"huggingface_hub": logging.ERROR, "datasets": logging.CRITICAL}
  loggers = [logging.getLogger(name) for name in quiet]
  levels = [logger.level for logger in loggers]
  for logger in loggers:
    logger.setLevel(quiet[logger.name])
  try:
    yield
  finally:
    for logger, level in zip(loggers, levels):
      logger.setLevel(level)


def _check_field(dataset, field: str, spec: str) -> None:
  features = dataset.features  # None for some streamed datasets: then rows are checked as read
  if features is None:
    return
  if field not in features:
    raise ChimeraError(f"data.text_field: {spec} has no column '{field}' "
                       f"(columns: {', '.join(features)})")
  dtype = getattr(features[field], "dtype", None)
  if dtype not in ("string", "large_string"):
    raise ChimeraError(f"data.text_field: column '{field}' of {spec} holds {dtype or features[field]}, not text")


def _num_rows(dataset) -> dict:
  """{"documents": rows} where the dataset knows its length ahead, for the progress ETA."""
  rows = getattr(dataset, "num_rows", None)
  if not rows:
    splits = dataset.info.splits or {}
    rows = splits["train"].num_examples if "train" in splits else None
  return {"documents": rows} if rows else {}


def _rows(dataset, spec: str) -> Iterator[dict]:
  """The dataset's rows, ROWS_PER_READ at a time; a file that does not parse (a bad line
  of JSON, a damaged parquet file) is a one-line ChimeraError, not a traceback."""
  rows = iter(dataset.iter(batch_size=ROWS_PER_READ))
  while True:
    try:
      batch = next(rows)
    except StopIteration:
      return
    except (ValueError, OSError) as e:  # pyarrow's ArrowInvalid is a ValueError
      raise ChimeraError(f"data.corpus: {spec}: {_one_line(e)}") from None
    yield batch


def open_hf(spec: str, text_field: str) -> Corpus:
  """The corpus `hf:NAME[:CONFIG]`. A missing dataset, config, split or column is a one-line
  ChimeraError when it is read. A local NAME (a path) is identified by its files' content;
  a Hub NAME by its name alone."""
  name, _, config = spec.removeprefix("hf:").partition(":")
  if not name:
    raise ChimeraError(f"data.corpus: {spec} names no dataset (expected hf:NAME[:CONFIG])")
  local = Path(name).expanduser()
  is_local = name.startswith(("/", ".", "~")) or local.exists()
  if is_local and not local.is_dir():
    raise ChimeraError(f"data.corpus: hf dataset '{name}' not found (no such local folder)")
  files = tuple(files_under(str(local.resolve()))) if is_local else ()
  key = f"hf:{local.resolve() if is_local else name}:{config} text_field={text_field}"

  def read() -> Iterator[tuple[str, Iterator[str]]]:
    datasets = _import_datasets(spec)  # first: importing it sets its logger's level
    with _quiet_loggers():
      yield from read_rows(datasets)

  def read_rows(datasets) -> Iterator[tuple[str, Iterator[str]]]:
    if is_local and ((local / "state.json").exists() or (local / "dataset_dict.json").exists()):
      dataset = _load_saved(datasets, local, config, spec)
    else:
      dataset = _load(datasets, str(local.resolve()) if is_local else name, config, spec)
    _check_field(dataset, text_field, spec)
    expected.update(_num_rows(dataset))
    if dataset.features is not None:  # else the rows are checked as they are read
      dataset = dataset.select_columns([text_field])
    index = nulls = 0
    for rows in _rows(dataset, spec):
      if text_field not in rows:
        raise ChimeraError(f"data.text_field: {spec} has no column '{text_field}' "
                           f"(columns: {', '.join(rows)})")
      for text in rows[text_field]:
        if text is not None and not isinstance(text, str):
          raise ChimeraError(f"data.text_field: column '{text_field}' of {spec} holds "
                             f"{type(text).__name__}, not text")
        # Zero-padded numbers keep name order and reading order the same. A null text (a
        # JSON line without the field, say) is an empty document, and is counted.
        yield f"{spec}/{index:010d}", iter([text or ""])
        index, nulls = index + 1, nulls + (text is None)
    if nulls:  # a misspelt key in some JSON lines would otherwise drop them unseen
      print(f"data: {nulls:,} of {index:,} rows of {spec} have no '{text_field}' (null): "
            f"read as empty documents", file=sys.stderr)

  expected = {}
  return Corpus(spec, key, files, read, expected)
