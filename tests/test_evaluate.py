"""chimera.evaluate: a finished run's loss over its whole validation split."""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from chimera import evaluate, train as train_lib
from chimera.checkpoints import Checkpointer
from chimera.data.batches import make_splits
from chimera.data.corpora import load_corpus
from chimera.data.tokenizers import get_tokenizer
from chimera.errors import ChimeraError
from chimera.train import train
from conftest import make_config


def test_windows_predict_every_token_once():
  tokens = np.arange(23)
  rows = evaluate.windows(tokens, context=5)  # (23 - 1) // 5 = 4 windows; token 21, 22 left out
  assert rows.shape == (4, 6)
  np.testing.assert_array_equal(rows[:, 0], [0, 5, 10, 15])
  targets = rows[:, 1:].ravel()
  np.testing.assert_array_equal(targets, np.arange(1, 21))  # each once, in order
  with pytest.raises(ChimeraError, match="fewer than one window"):
    evaluate.windows(np.arange(5), context=5)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, write_corpus):
  """A 12-step tiny dense run with checkpoints at steps 4, 8 and 12 (trained once)."""
  root = tmp_path_factory.mktemp("evaluate")
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv("CHIMERA_CACHE", str(root / "cache"))
    config = make_config("dense", write_corpus(root / "corpus.txt"), train__steps=12,
                         train__checkpoint_every=4, train__keep_checkpoints=5)
    yield root / "run", train(config, root / "run"), config


def test_split_loss_counts_the_split_and_does_not_depend_on_batching(finished_run):
  workdir, summary, config = finished_run
  whole = evaluate.split_loss(workdir)
  assert whole.step == 12
  # The validation split, rebuilt here from the corpus: every full window of it is scored.
  val = make_splits(load_corpus(config.data.corpus), get_tokenizer("byte"),
                    val_fraction=config.data.val_fraction, mode=config.data.split).val
  windows = (len(val) - 1) // config.train.context
  assert windows >= 2 * config.train.batch_size  # several batches
  assert (whole.windows, whole.tokens) == (windows, windows * config.train.context)
  # Batches of 1 and of a size that leaves a short last batch give the run's loss.
  short = next(b for b in range(2, windows) if windows % b)
  for batch_size in (1, short):
    assert evaluate.split_loss(workdir, batch_size=batch_size).loss == pytest.approx(
        whole.loss, rel=1e-5)
  # The fixed subset the run evaluated on is a sample of the same split.
  assert abs(whole.loss - summary.final_val_loss) < 0.25


def test_split_loss_reads_the_step_asked_for(finished_run):
  workdir, _, _ = finished_run
  early, late = evaluate.split_loss(workdir, step=4), evaluate.split_loss(workdir, step=12)
  assert early.step == 4 and late.loss < early.loss  # trained longer, lower on held-out text
  with pytest.raises(ChimeraError, match="no checkpoint at step 5"):
    evaluate.split_loss(workdir, step=5)


def test_a_run_without_checkpoints_is_refused_and_left_as_it_was(finished_run, tmp_path):
  workdir, _, _ = finished_run
  fresh = tmp_path / "fresh"
  fresh.mkdir()
  (fresh / "config.json").write_text((workdir / "config.json").read_text())
  with pytest.raises(ChimeraError, match="has no checkpoint yet"):
    evaluate.split_loss(fresh)
  assert [p.name for p in fresh.iterdir()] == ["config.json"]


def test_bad_workdir_is_one_line(tmp_path):
  result = subprocess.run([sys.executable, "-m", "chimera.evaluate", f"--workdir={tmp_path}"],
                          capture_output=True, text=True)
  assert result.returncode == 2
  assert result.stderr.strip() == f"error: --workdir: {tmp_path} holds no run (no config.json)"
  with pytest.raises(ChimeraError, match=r"^--workdir: \S+/nowhere does not exist$"):
    evaluate.split_loss(tmp_path / "nowhere")
  (tmp_path / "summary.json").write_text("{}")  # a run's file given for its folder
  with pytest.raises(ChimeraError, match=r"^--workdir: \S+/summary\.json is a file, not a "
                                         r"directory$"):
    evaluate.split_loss(tmp_path / "summary.json")


def test_a_moved_corpus_is_scored_from_its_new_path(finished_run, tmp_path, monkeypatch,
                                                   capsys):
  """A run whose corpus moved since it trained: the error says how to point at it, and
  --corpus scores the same text (refusing other text) without changing the run's records.
  Both errors come before the checkpoint is restored."""
  workdir, _, config = finished_run

  def no_restore(*args, **kwargs):
    raise AssertionError("the checkpoint was restored before the corpus was checked")
  run = tmp_path / "run"
  shutil.copytree(workdir, run)
  recorded = json.loads((run / "config.json").read_text())
  recorded["data"]["corpus"] = str(tmp_path / "gone.txt")  # where it was when it trained
  (run / "config.json").write_text(json.dumps(recorded))
  data_json = (run / "data.json").read_text()
  with monkeypatch.context() as patch, pytest.raises(
      ChimeraError, match=r"gone\.txt \(if the run's corpus moved, pass its new path: "
                          r"--corpus=PATH\)$"):
    patch.setattr(evaluate, "restore_state", no_restore)
    evaluate.split_loss(run)
  moved = tmp_path / "moved.txt"
  shutil.copy(config.data.corpus, moved)
  assert evaluate.split_loss(run, corpus=str(moved)).loss == evaluate.split_loss(workdir).loss
  assert (run / "data.json").read_text() == data_json  # a reader records nothing
  moved.write_text(moved.read_text() + "\nthe queen will speak\n")
  monkeypatch.setattr(evaluate, "restore_state", no_restore)
  with pytest.raises(ChimeraError, match=r"holds a run of other text.*\. Give --corpus the "
                                         r"text the run trained on$"):
    evaluate.split_loss(run, corpus=str(moved))
  # Other text too short to cut into the run's validation windows is still other text
  # (it was refused as too short, before the text was compared).
  moved.write_text("the queen will speak\n" * 3)
  with pytest.raises(ChimeraError, match=r"holds a run of other text.*\. Give --corpus the "
                                         r"text the run trained on$"):
    evaluate.split_loss(run, corpus=str(moved))
  # A run from before data.json: the text cannot be checked, and the loss says so.
  shutil.copy(config.data.corpus, moved)
  (run / "data.json").unlink()
  monkeypatch.undo()
  with_note = evaluate.split_loss(run, corpus=str(moved))
  assert with_note.loss > 0
  assert (f"note: {run} has no data.json (a run from before 2026-11-28), so the text of "
          f"--corpus cannot be checked against the run's") in capsys.readouterr().err


def test_an_unreadable_config_is_one_line(tmp_path):
  (tmp_path / "config.json").write_text('{"model": {}}')
  with pytest.raises(ChimeraError, match=r"is not a config this version can read \(KeyError: "
                                         r".*\); without it, the config each checkpoint "
                                         r"recorded is read"):
    evaluate.split_loss(tmp_path)


def test_imports_beside_generate():
  # These are libraries as well as programs; their flags must not collide on import. A fresh
  # process: in this one, other test modules have imported them already.
  modules = "chimera.evaluate, chimera.generate, chimera.compare, chimera.bench, chimera.scaling, chimera.scaling_hlo"
  result = subprocess.run([sys.executable, "-c", f"import {modules}"],
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  # Nor define one another's: chimera.compare imports the bench, which imports generate,
  # and a mistyped --seed (for --seeds) must not be taken as generate's sampling seed.
  check = ("from absl import flags; import chimera.compare; "
           "print(sorted(set(flags.FLAGS) & {'prompt', 'seed', 'temperature', 'top_k'}))")
  result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True,
                          timeout=120)
  assert result.returncode == 0 and result.stdout.strip() == "[]", result.stderr[-2000:]


def test_routing_groups_of_several_sequences_are_scored_whole(tmp_path, monkeypatch,
                                                              write_corpus):
  """With model.group_size = 2 sequences, every batch holds whole groups (batch size 1 is
  rounded up to 2) and the odd window at the end of the split is left out."""
  monkeypatch.setenv("CHIMERA_CACHE", str(tmp_path / "cache"))
  config = make_config("moe_top2", write_corpus(tmp_path / "corpus.txt"), train__steps=3,
                       train__checkpoint_every=3, model__group_size=64)
  assert config.model.group_size == 2 * config.train.context
  train(config, tmp_path / "run")
  val = make_splits(load_corpus(config.data.corpus), get_tokenizer("byte"),
                    val_fraction=config.data.val_fraction, mode=config.data.split).val
  windows = (len(val) - 1) // config.train.context
  assert windows % 2 == 1  # so one window is left out
  whole = evaluate.split_loss(tmp_path / "run")
  assert whole.windows == windows - 1
  for batch_size in (1, 6):  # 1 is rounded up to one group of 2
    assert evaluate.split_loss(tmp_path / "run", batch_size=batch_size).loss == pytest.approx(
        whole.loss, rel=1e-5)


def test_a_checkpoint_that_is_not_the_configs_model_is_one_line(finished_run, tmp_path,
                                                                monkeypatch):
  """A config.json edited after training (or copied from another run) beside the
  checkpoints: one line naming the fields that differ from the config the checkpoint
  recorded; for a checkpoint that recorded none (before 2026-11-28), orbax's shape or tree
  error becomes one line naming the arrays."""
  workdir, _, _ = finished_run
  edited = tmp_path / "edited"
  shutil.copytree(workdir / "checkpoints", edited / "checkpoints")
  saved = json.loads((workdir / "config.json").read_text())
  for change, field in (({"d_ff": saved["model"]["d_ff"] // 2}, "model.d_ff"),
                        ({"num_experts": 4}, "model.num_experts")):
    (edited / "config.json").write_text(json.dumps({**saved, "model": {**saved["model"],
                                                                        **change}}))
    with pytest.raises(ChimeraError, match=r"^--workdir: .*config\.json does not describe the "
                                           rf"checkpoint at step 12: it was saved with other "
                                           rf"{field}"):
      evaluate.split_loss(edited)
    with monkeypatch.context() as patch:
      patch.setattr(train_lib, "saved_meta", lambda folder, step: {})  # an older checkpoint
      with pytest.raises(ChimeraError, match=r"^--workdir: .*config\.json does not describe "
                                             r"the checkpoint at step 12: params/"):
        evaluate.split_loss(edited)


def test_a_config_json_that_is_not_the_checkpoints_is_one_line(finished_run, tmp_path):
  """Arrays of the same shapes do not make the same model: the checkpoint records the
  config it was saved with, and a config.json that differs in what the run computes (here
  the heads, or the compute dtype) is refused, naming the fields. One that is not valid is refused
  before any restore, naming its field."""
  import json
  import shutil
  workdir, _, _ = finished_run
  edited = tmp_path / "edited"
  shutil.copytree(workdir / "checkpoints", edited / "checkpoints")
  saved = json.loads((workdir / "config.json").read_text())
  write = lambda section, change: (edited / "config.json").write_text(json.dumps(
      {**saved, section: {**saved[section], **change}}))
  for change, fields in (({"num_heads": 4}, "model.num_heads"),
                         ({"dtype": "bfloat16", "init_std": 0.01}, "model.dtype, model.init_std")):
    write("model", change)
    with pytest.raises(ChimeraError, match=r"^--workdir: .*config\.json does not describe the "
                                           rf"checkpoint at step 12: it was saved with other "
                                           rf"{re.escape(fields)}$"):
      evaluate.restore_run(edited)
  write("train", {"eval_every": 1, "steps": 40})  # what a run may change when resumed
  assert evaluate.restore_run(edited)[2] == 12
  write("train", {"context": 10_000})
  with pytest.raises(ChimeraError, match=r"^--workdir: .*config\.json: config\.train\.context: "
                                         r"10000 is longer than the model supports"):
    evaluate.restore_run(edited)
  write("model", {"num_heads": None})
  with pytest.raises(ChimeraError, match=r"is not a config this version can read"):
    evaluate.restore_run(edited)


def test_a_damaged_checkpoint_is_one_line(finished_run, tmp_path):
  import shutil
  workdir, _, _ = finished_run
  damaged = tmp_path / "damaged"
  shutil.copytree(workdir, damaged)
  steps = sorted(int(p.name) for p in (damaged / "checkpoints").iterdir() if p.name.isdigit())
  shutil.rmtree(damaged / "checkpoints" / str(steps[-1]) / "state")
  with pytest.raises(ChimeraError, match=rf"^--workdir: the checkpoint at step {steps[-1]} in "
                                         rf".* cannot be read, incomplete or damaged"):
    evaluate.restore_run(damaged)
  # Its largest array file cut short: orbax raises a bare Exception, the same damage.
  arrays = (damaged / "checkpoints" / str(steps[0]) / "state").glob("ocdbt.process_0/d/*")
  os.truncate(max(arrays, key=lambda path: path.stat().st_size), 1000)
  with pytest.raises(ChimeraError, match=rf"^--workdir: the checkpoint at step {steps[0]} in "
                                         rf".* cannot be read, incomplete or damaged "
                                         rf"\(Exception\)"):
    evaluate.restore_run(damaged, steps[0])


def test_a_checkpoints_record_of_its_config_damaged_or_unreadable_is_one_line(
    finished_run, tmp_path, monkeypatch):
  """The config a checkpoint recorded, written by another version (a field this one does
  not have) or damaged (meta that is not a JSON object): one line in evaluate and on a
  resume, each naming the checkpoint; evaluate leaves a damaged meta to the restore."""
  workdir, _, config = finished_run
  run = tmp_path / "run"
  shutil.copytree(workdir, run)
  recorded = json.loads((run / "config.json").read_text())
  other = {**recorded, "model": {**recorded["model"], "no_such_field": 1}}
  monkeypatch.setattr(train_lib, "saved_meta", lambda folder, step: {"config": other})
  for attempt in (lambda: evaluate.restore_run(run), lambda: train(config, run)):
    with pytest.raises(ChimeraError, match=r"^--workdir: the checkpoint at step 12 in \S+ "
                                           r"records a config this version cannot read "
                                           r"\(.*no_such_field"):
      attempt()
  monkeypatch.setattr(train_lib, "saved_meta", lambda folder, step: dict(["not", "meta"]))
  with pytest.raises(ChimeraError, match=r"^--workdir: the checkpoint at step 12 in \S+ "
                                         r"cannot be read, incomplete or damaged \(ValueError"):
    train(config, run)
  assert evaluate.restore_run(run)[2] == 12  # its arrays are whole


def test_running_out_of_memory_is_not_a_damaged_checkpoint(finished_run, monkeypatch):
  import jax
  workdir, _, _ = finished_run

  def out_of_memory(config):
    raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory")
  monkeypatch.setattr(evaluate, "init_state", out_of_memory)
  with pytest.raises(jax.errors.JaxRuntimeError, match="RESOURCE_EXHAUSTED"):
    evaluate.restore_run(workdir)


def test_a_checkpoint_removed_while_read_is_one_line(finished_run, monkeypatch):
  """A run still training in the workdir keeps only its last few checkpoints: the one
  listed can go before it is read, or as orbax lists them when the manager opens. A
  folder this user cannot read is said as such, not as damage."""
  workdir, _, _ = finished_run
  removed = (r"^--workdir: the checkpoint at step 12 in .* was removed while it was read "
             r"\(is a run still")
  def restore_removed(self, like_state, step=None):
    raise FileNotFoundError(f"Checkpoint at {workdir}/checkpoints/{step} not found.")
  def open_denied(self, directory, keep, **kwargs):
    raise PermissionError(13, "Permission denied", f"{directory}/12")
  def listing_removed(self, directory, keep, **kwargs):
    raise FileNotFoundError(2, "No such file or directory", f"{directory}/9")
  for method, failing, message in (
      ("restore", restore_removed, removed),
      ("__init__", open_denied, r"^--workdir: cannot read the checkpoints in \S+ "
                                r"\(Permission denied: \S+/checkpoints/12\)$"),
      ("__init__", listing_removed, removed)):
    monkeypatch.setattr(Checkpointer, method, failing)
    with pytest.raises(ChimeraError, match=message):
      evaluate.restore_run(workdir)


def test_bits_per_byte_count_the_bytes_of_the_tokens_scored(tmp_path, monkeypatch,
                                                            write_corpus):
  """A folder corpus: end-of-text tokens (0 bytes) between documents. Bits per byte divide
  by the bytes of exactly the predicted tokens, not the split's average per token."""
  monkeypatch.setenv("CHIMERA_CACHE", str(tmp_path / "cache"))
  folder = tmp_path / "docs"
  folder.mkdir()
  for i in range(30):
    write_corpus(folder / f"{i:02d}.txt", lines=12 + i, seed=i)
  config = make_config("dense", folder, train__steps=2, train__checkpoint_every=2,
                       train__warmup_steps=0)
  train(config, tmp_path / "run")
  result = evaluate.split_loss(tmp_path / "run")
  tokenizer = get_tokenizer("byte")
  val = make_splits(load_corpus(config.data.corpus), tokenizer,
                    val_fraction=config.data.val_fraction, mode=config.data.split).val
  targets = evaluate.windows(val, config.train.context)[:, 1:]
  assert (targets == tokenizer.eot_id).any()  # the case this is about
  assert result.text_bytes == int((targets != tokenizer.eot_id).sum())
  assert result.bits_per_byte == pytest.approx(
      result.loss * result.tokens / np.log(2) / result.text_bytes, rel=1e-9)
  assert result.note is None  # a dense model's loss is a language model's
