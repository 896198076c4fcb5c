"""chimera.metrics and the metrics.jsonl reader: what a crash mid-write leaves behind."""

import json

import pytest

from chimera.errors import ChimeraError
from chimera.metrics import MetricWriter, truncate_after
from chimera.records import read_all_events, read_jsonl


def rows(*steps):
  return "".join(json.dumps({"event": "train", "step": s, "loss": 1.0 / s}) + "\n" for s in steps)


def test_a_torn_last_line_is_dropped_and_the_resumed_run_appends_whole_lines(tmp_path):
  jsonl = tmp_path / "metrics.jsonl"
  jsonl.write_text(rows(10, 20, 30) + '{"event": "eval", "step": 30, "val_lo')  # cut mid-row
  assert read_jsonl(jsonl)[1]  # torn
  assert [r["step"] for r in read_all_events(tmp_path)["train"]] == [10, 20, 30]
  # Resumed from the step-20 checkpoint: step 30's row and the torn one go.
  writer = MetricWriter(tmp_path, resume_step=20)
  writer.write("train", 30, {"loss": 0.5})
  writer.close()
  records, torn = read_jsonl(jsonl)
  assert not torn and [(r["event"], r["step"]) for r in records] == [
      ("train", 10), ("train", 20), ("train", 30)]
  assert records[-1]["loss"] == 0.5


def test_a_whole_last_row_without_its_newline_gets_one(tmp_path):
  jsonl = tmp_path / "metrics.jsonl"
  jsonl.write_text(rows(10, 20).rstrip("\n"))  # the crash came between the row and "\n"
  assert truncate_after(jsonl, 20) == 0
  assert jsonl.read_text() == rows(10, 20)
  assert truncate_after(jsonl, 10) == 1 and jsonl.read_text() == rows(10)


def test_a_bad_line_before_the_last_is_damage_and_named(tmp_path):
  jsonl = tmp_path / "metrics.jsonl"
  jsonl.write_text(rows(10) + "not json\n" + rows(20))
  with pytest.raises(ChimeraError, match=r"metrics.jsonl: line 2 is not JSON"):
    truncate_after(jsonl, 20)
  with pytest.raises(ChimeraError, match="line 2"):
    read_all_events(tmp_path)
