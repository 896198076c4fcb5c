"""chimera.metrics and the metrics.jsonl reader: what a crash mid-write leaves behind."""

import itertools
import json

import numpy as np
import pytest

from chimera import metrics
from chimera.errors import ChimeraError
from chimera.metrics import MetricWriter, progress_line, truncate_after
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


def test_an_eval_row_the_checkpoint_does_not_record_is_dropped(tmp_path):
  """A stopped run ended at its checkpoint evaluates there after the checkpoint was saved;
  killed before its summary, the next session evaluates again and writes the row again."""
  jsonl = tmp_path / "metrics.jsonl"
  evaluation = json.dumps({"event": "eval", "step": 20, "val_loss": 1.0}) + "\n"
  jsonl.write_text(rows(10, 20) + evaluation)
  assert truncate_after(jsonl, 20) == 0  # the checkpoint records it: kept
  assert truncate_after(jsonl, 20, eval_at_step=False) == 1
  assert jsonl.read_text() == rows(10, 20)  # the train row at 20 was the checkpoint's


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


def tensorboard_events(folder):
  """Every Event in a folder's event files (TFRecord: length, its CRC, data, its CRC)."""
  from tensorboardX.proto.event_pb2 import Event
  events = []
  for path in sorted(folder.glob("events.out.tfevents.*")):
    data, at = path.read_bytes(), 0
    while at < len(data):
      length = int.from_bytes(data[at:at + 8], "little")
      events.append(Event.FromString(data[at + 12:at + 12 + length]))
      at += 12 + length + 4
  return events


@pytest.mark.parametrize("resume_step, purge_at", [(20, 21), (0, None)])
def test_tensorboard_hides_what_an_interrupted_run_wrote_past_its_checkpoint(
    tmp_path, resume_step, purge_at):
  """A resumed run's TensorBoard events start with a purge at the step after its
  checkpoint, as metrics.jsonl drops the rows past it; a fresh run purges nothing."""
  from tensorboardX.proto.event_pb2 import SessionLog
  writer = MetricWriter(tmp_path, resume_step=resume_step)
  writer.write("train", resume_step + 1, {"loss": 0.5})
  writer.close()
  starts = [e.step for e in tensorboard_events(tmp_path / "tensorboard")
            if e.HasField("session_log") and e.session_log.status == SessionLog.START]
  assert starts == ([purge_at] if purge_at else [])
  scalars = [(e.step, v.tag) for e in tensorboard_events(tmp_path / "tensorboard")
             for v in e.summary.value]
  assert scalars == [(resume_step + 1, "train/loss")]


def test_per_layer_metrics_get_one_tensorboard_tag_per_moe_layer(tmp_path):
  writer = MetricWriter(tmp_path, resume_step=0)
  writer.write("train", 1, {"dropped": np.array([0.25, 0.5], np.float32), "loss": 2.0})
  writer.close()
  scalars = sorted((e.step, v.tag, v.simple_value)
                   for e in tensorboard_events(tmp_path / "tensorboard") for v in e.summary.value)
  assert scalars == [(1, "train/dropped/moe_layer_0", 0.25), (1, "train/dropped/moe_layer_1", 0.5),
                     (1, "train/loss", 2.0)]


def test_a_fresh_start_drops_the_events_of_an_attempt_that_saved_no_checkpoint(tmp_path):
  """A run at step 0 writes metrics.jsonl afresh; its TensorBoard folder likewise loses the
  earlier attempt's events, so the two attempts' curves do not show as one run."""
  first = MetricWriter(tmp_path, resume_step=0)
  first.write("train", 10, {"loss": 4.0})
  first.close()
  second = MetricWriter(tmp_path, resume_step=0)
  second.write("train", 10, {"loss": 5.0})
  second.close()
  losses = [(e.step, v.simple_value) for e in tensorboard_events(tmp_path / "tensorboard")
            for v in e.summary.value]
  assert losses == [(10, 5.0)]


def test_two_sessions_in_one_second_keep_both_event_files(tmp_path, monkeypatch):
  """tensorboardX names an event file by the second it opens in: a session that resumes
  within that second must not write over the first one's events, and TensorBoard reads
  the files in name order. The count of this process's sessions came first after the
  second, and the 10th sorted before the 9th (a suite's worker opens many)."""
  monkeypatch.setattr(metrics, "_SESSIONS", itertools.count(9))
  for step in (1, 2):  # a start, and a resume from its step-1 checkpoint, back to back
    writer = MetricWriter(tmp_path, resume_step=step - 1)
    writer.write("train", step, {"loss": 1.0 / step})
    writer.close()
  steps = [e.step for e in tensorboard_events(tmp_path / "tensorboard") if e.summary.value]
  assert steps == [1, 2]


def test_the_progress_line_shows_a_slow_rate():
  assert progress_line(2, 10, 10.88, 12.5, 65) == (
      "step      2/10 | loss 10.8800 |     12.5 tok/s | ETA 1m05s")
  assert progress_line(2, 10, 1.5, 12_345.0, 3700) == (
      "step      2/10 | loss 1.5000 |    12.3k tok/s | ETA 1h01m")



def test_each_row_is_on_disk_as_soon_as_it_is_written(tmp_path):
  """A run killed (SIGKILL, the OOM killer) keeps every row it wrote: metrics.jsonl is
  flushed at each write, not only when the writer closes."""
  writer = MetricWriter(tmp_path, resume_step=0)
  writer.write("train", 1, {"loss": 2.0})
  writer.write("eval", 1, {"val_loss": 3.0})
  records, torn = read_jsonl(tmp_path / "metrics.jsonl")
  assert not torn and [(r["event"], r["step"]) for r in records] == [("train", 1), ("eval", 1)]
  writer.close()
