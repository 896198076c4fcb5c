"""The main job end to end on the `tiny` preset: smoke runs, exact resume, bad input, NaN."""

import errno
import fcntl
import functools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from pathlib import Path

from chimera import config as config_lib, evaluate, records, sharding, train as train_lib
from chimera.checkpoints import Checkpointer
from chimera.config import TrainConfig
from chimera.decoder import Decoder
from chimera.errors import ChimeraError
from chimera.layers import Kernels
from chimera.records import (Progress, RunSummary, code_version, cpu_model, device_name,
                              loaded_code_version, read_events)
from chimera.steps import eval_step, init_state, make_optimizer, make_schedule, train_step
from chimera.study_plots import run_plots
from chimera.train import TrainingDiverged, train

ROOT = Path(__file__).resolve().parents[1]


def run_main(*args, env_extra=None, **kwargs):
  env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env_extra or {})}
  return subprocess.run([sys.executable, "-m", "chimera.main", *args],
                        cwd=kwargs.pop("cwd", ROOT), env=env, capture_output=True, text=True,
                        timeout=300, **kwargs)


def start_main(*args, env_extra=None):
  return subprocess.Popen([sys.executable, "-m", "chimera.main", *args], cwd=ROOT,
                          stderr=subprocess.PIPE, text=True,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", **(env_extra or {})})


def run_main_patched(patch: str, *args) -> subprocess.CompletedProcess:
  """chimera.main with `args`, in a process that first runs `patch`: Python source that
  changes chimera.train (imported as `t`, with os, signal and sys)."""
  script = ("import os, signal, sys; import chimera.train as t\n" + patch +
            "\nfrom absl import app; from chimera import main\n"
            "sys.argv[0] = 'chimera.main'; app.run(main.main, flags_parser=main.parse_flags)")
  return subprocess.run([sys.executable, "-c", script, *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=300)


def main_args(name: str, corpus, workdir, overrides: dict) -> list[str]:
  """chimera.main's flags for configs/<name>.py:tiny with `section__field` overrides."""
  return [f"--config=configs/{name}.py:tiny", f"--config.data.corpus={corpus}",
          f"--workdir={workdir}"] + [f"--config.{k.replace('__', '.')}={v}"
                                     for k, v in overrides.items()]


def wait_for_line(process, prefix: str) -> str:
  for line in process.stderr:
    if line.startswith(prefix):
      return line
  raise AssertionError(f"the run ended before printing {prefix!r}")


def final_params(config, workdir):
  checkpointer = Checkpointer(workdir / "checkpoints", keep=2)
  state, meta = checkpointer.restore(init_state(config))
  checkpointer.close()
  return state, meta


def losses(workdir):
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [(r["event"], r["step"], r.get("loss", r.get("val_loss"))) for r in records
          if r["event"] in ("train", "eval")]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dense", "moe_top2"])
def test_entry_point_one_step(name, corpus, tmp_path):
  workdir = tmp_path / "run"
  result = run_main(f"--config=configs/{name}.py:tiny", f"--config.data.corpus={corpus}",
                    "--config.train.steps=1", "--config.train.warmup_steps=0",
                    f"--workdir={workdir}")
  assert result.returncode == 0, result.stderr
  summary = RunSummary.load(workdir)
  assert summary.steps == 1 and summary.tokens_seen == 4 * 32 and summary.completed
  for value in (summary.final_val_loss, summary.best_val_loss, summary.wall_seconds,
                summary.accounting["params_total"], summary.accounting["params_active"],
                summary.accounting["flops_per_token"]):
    assert value is not None and value > 0
  assert np.isfinite(summary.final_val_loss)
  assert bool(summary.expert_load) == (name != "dense")
  config = json.loads((workdir / "config.json").read_text())
  assert config["model"]["num_experts"] == (0 if name == "dense" else 8)
  # The resolved config is recorded: derived fields hold numbers, not "derive".
  assert summary.config == config and config["model"]["group_size"] == 32
  assert config["model"]["expert_d_ff"] == 128 // 2 and config["model"]["renormalize_gates"]
  assert list((workdir / "tensorboard").iterdir()), "no TensorBoard events"
  assert (workdir / "checkpoints" / "1").is_dir()
  assert str(workdir) in result.stderr  # says where the results are
  # The finished run's plots, as PNG files, and where they are; routing for an MoE only.
  plots = [workdir / "loss.png"] + ([workdir / "routing.png"] if name != "dense" else [])
  assert sorted(workdir.glob("*.png")) == sorted(plots)
  assert all(p.read_bytes().startswith(b"\x89PNG") for p in plots)
  assert f"plots: {', '.join(map(str, plots))}" in result.stderr


@pytest.mark.parametrize("name", ["dense", "moe_top2"])
def test_resume_is_exact(name, make_config, corpus, tmp_path):
  config = make_config(name, corpus, train__steps=6)
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  summary = train(config, straight)
  first = train(config, resumed, stop_after=3)
  assert not first.completed and first.steps == 3
  second = train(config, resumed)

  (state_a, meta_a), (state_b, meta_b) = final_params(config, straight), final_params(config, resumed)
  assert int(state_a.step) == int(state_b.step) == 6
  chex.assert_trees_all_equal(state_a.params, state_b.params)
  chex.assert_trees_all_equal(state_a.opt_state, state_b.opt_state)
  assert meta_a["tokens_seen"] == meta_b["tokens_seen"] == 6 * 4 * 32
  assert losses(straight) == losses(resumed)
  # Each training row logs the learning rate of its window's last step (step n ran at
  # schedule(n - 1): the optimiser counts from 0).
  rows = read_events(straight, "train")
  assert [r["learning_rate"] for r in rows] == pytest.approx(
      [float(make_schedule(config.train)(r["step"] - 1)) for r in rows], rel=1e-6)
  for field in ("final_val_loss", "best_val_loss", "steps", "tokens_seen", "code"):
    assert getattr(summary, field) == getattr(second, field), field
  assert summary.code == [loaded_code_version() or "unknown"]  # one version, noted once
  # Running a finished run again changes nothing and returns its summary.
  written = (straight / "summary.json").read_text()
  assert train(config, straight) == RunSummary.load(straight)
  assert (straight / "summary.json").read_text() == written
  # Throughput adds up over sessions: every step but a session's first is timed, so steps
  # 2-3 (session 1) and 5-6 (session 2) are.
  progress = Progress.from_json(meta_b)
  assert progress.timed_tokens == 4 * 4 * 32
  assert second.train_tokens_per_second == pytest.approx(
      progress.timed_tokens / progress.timed_seconds)
  # A run that stopped after its final checkpoint and before summary.json (a crash in
  # between) trains no step when resumed; its summary still holds the last window's routing
  # and the run's throughput.
  (resumed / "summary.json").unlink()
  again = train(config, resumed)
  assert RunSummary.exists(resumed)
  for field in ("expert_load", "dropped_fraction", "train_tokens_per_second",
                "final_val_loss", "steps", "tokens_seen", "wall_seconds"):
    assert getattr(again, field) == getattr(second, field), field
  if name == "moe_top2":
    assert again.expert_load == read_events(resumed, "train")[-1]["expert_load"]
    assert len(again.expert_load) == config.model.num_layers and again.dropped_fraction


def test_one_logging_window_is_timed(make_config, corpus, tmp_path):
  """A run that logs once (a smoke run) has a throughput: all its steps but the first."""
  config = make_config("dense", corpus, train__steps=4, train__log_every=4,
                       train__eval_every=4, train__checkpoint_every=4)
  summary = train(config, tmp_path / "run")
  progress = Progress.from_json(final_params(config, tmp_path / "run")[1])
  assert progress.timed_tokens == 3 * 4 * 32 and progress.timed_seconds > 0
  assert summary.train_tokens_per_second == pytest.approx(
      progress.timed_tokens / progress.timed_seconds)
  # One step: nothing to time.
  single = make_config("dense", corpus, train__steps=1, train__log_every=1,
                       train__eval_every=1, train__checkpoint_every=1, train__warmup_steps=0)
  assert train(single, tmp_path / "single").train_tokens_per_second is None


@pytest.mark.slow
def test_sigterm_saves_and_resumes_exactly(make_config, corpus, tmp_path):
  steps = 300
  overrides = dict(train__steps=steps, train__checkpoint_every=1000, train__eval_every=1000,
                   train__log_every=1)
  config = make_config("moe_top2", corpus, **overrides)
  train(config, tmp_path / "straight")

  workdir = tmp_path / "killed"
  process = start_main(*main_args("moe_top2", corpus, workdir, overrides))
  wait_for_line(process, "step")  # training is under way
  process.send_signal(signal.SIGTERM)
  rest = process.stderr.read()
  assert process.wait(timeout=120) == 128 + signal.SIGTERM, rest  # saved, but not done
  assert "stopped at step" in rest
  stopped_at = Checkpointer(workdir / "checkpoints", keep=2).latest_step()
  assert 0 < stopped_at < steps, "the run finished before the signal; raise `steps`"

  train(config, workdir)
  (state_a, _), (state_b, _) = final_params(config, tmp_path / "straight"), final_params(config, workdir)
  assert int(state_b.step) == steps
  chex.assert_trees_all_equal(state_a.params, state_b.params)


def test_a_stop_during_the_last_step_is_noted_and_ends_main(corpus, tmp_path):
  """SIGTERM while the run's last step evaluates: the run completes (summary.json, the
  final checkpoint), and chimera.main exits with 128 + the signal all the same, so that
  `main && evaluate` stops there as it would for a stop one step earlier."""
  last_step = ("evaluate = t.Evaluator.__call__\n"
               "def last(self, state, step, progress):\n"
               "  if step == 4: os.kill(os.getpid(), signal.SIGTERM)\n"
               "  return evaluate(self, state, step, progress)\n"
               "t.Evaluator.__call__ = last")
  workdir = tmp_path / "run"
  overrides = {"train__steps": 4, "train__warmup_steps": 0, "train__eval_every": 2}
  result = run_main_patched(last_step, *main_args("dense", corpus, workdir, overrides))
  assert result.returncode == 128 + signal.SIGTERM, result.stderr[-2000:]
  assert "a stop was asked for during the run's last step" in result.stderr
  summary = RunSummary.load(workdir)
  assert summary.completed and summary.steps == 4
  assert Checkpointer(workdir / "checkpoints", keep=2).latest_step() == 4


def test_the_loop_runs_at_most_max_ahead_steps_ahead(make_config, corpus, tmp_path,
                                                    monkeypatch):
  """A step is dispatched only once every step but the last MAX_AHEAD has finished, so a
  stop waits for those few (not for every step the loop could have run ahead by)."""
  compile_step = train_lib._compile_train_step
  returned, pending_at_dispatch = [], []

  def counted(*args):
    step_fn = compile_step(*args)
    def step(state, batch, rng):
      done_by_now = returned[:max(len(returned) - train_lib.MAX_AHEAD, 0)]
      pending_at_dispatch.append(sum(not leaf.is_ready() for leaf in done_by_now))
      state, metrics = step_fn(state, batch, rng)
      returned.append(jax.tree.leaves(metrics)[0])
      return state, metrics
    return step

  monkeypatch.setattr(train_lib, "_compile_train_step", counted)
  config = make_config("dense", corpus, train__steps=12, train__warmup_steps=0,
                       train__log_every=12, train__eval_every=12, train__checkpoint_every=12)
  assert train(config, tmp_path / "run").completed
  assert len(pending_at_dispatch) == 12 and max(pending_at_dispatch) == 0


def test_out_of_device_memory_is_one_line(make_config, corpus, tmp_path, monkeypatch):
  """XLA's out-of-memory error (here raised where the step compiles, as a GPU preset on a
  small device would) is one line naming the allocation and what to lower; other runtime
  errors pass through."""
  def oom(*args):
    raise jax.errors.JaxRuntimeError("INTERNAL: Error dispatching computation: "
                                     "Out of memory allocating 36862573904 bytes.")
  monkeypatch.setattr(train_lib, "_compile_train_step", oom)
  config = make_config("dense", corpus, train__steps=2, train__warmup_steps=0)
  with pytest.raises(ChimeraError, match=r"^out of device memory \(an allocation of 34\.33 GiB "
                                         r"failed\): lower train\.batch_size .*; .*run keeps "
                                         r"what it had \(its latest checkpoint, if any\)$"):
    train(config, tmp_path / "run")
  def other(*args):
    raise jax.errors.JaxRuntimeError("INVALID_ARGUMENT: something else")
  monkeypatch.setattr(train_lib, "_compile_train_step", other)
  with pytest.raises(jax.errors.JaxRuntimeError, match="something else"):
    train(config, tmp_path / "run")
  # A quota other than memory is not out of memory.
  from chimera.errors import out_of_memory_is_one_line
  with pytest.raises(jax.errors.JaxRuntimeError, match="coordination"):
    with out_of_memory_is_one_line():
      raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: coordination service quota")


def test_a_job_started_with_sigint_ignored_keeps_ignoring_it(monkeypatch):
  """As Python leaves Ctrl-C alone in a process started with SIGINT ignored (a job a
  script started with `&`), so does the training loop; SIGTERM still stops it."""
  monkeypatch.setattr(train_lib, "_stopped_by", None)  # the signals below set it
  before = signal.getsignal(signal.SIGINT)  # pytest-xdist's workers may ignore it already
  try:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with train_lib._StopRequest() as stop:
      assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
      os.kill(os.getpid(), signal.SIGINT)
      assert not stop.requested
      os.kill(os.getpid(), signal.SIGTERM)
      assert stop.requested and train_lib.stopped_by_signal() == signal.SIGTERM
    assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as Python starts normally
    with train_lib._StopRequest() as stop:  # Ctrl-C is a stop
      os.kill(os.getpid(), signal.SIGINT)
      assert stop.requested and train_lib.stopped_by_signal() == signal.SIGINT
    assert signal.getsignal(signal.SIGINT) == signal.default_int_handler
  finally:
    signal.signal(signal.SIGINT, before)


def test_a_size_that_overflows_is_one_line(corpus, tmp_path):
  """model.num_experts=1e8 overflowed an index as the state was initialised: jax's
  OverflowError and its traceback. One line, exit status 2."""
  overflow = ("def train(*args, **kwargs): raise OverflowError('An overflow was encountered "
              "while parsing an argument\\nmore')\nt.train = train")
  result = run_main_patched(overflow, *main_args("dense", corpus, tmp_path / "run", {}))
  assert result.returncode == 2 and result.stderr.splitlines() == [
      "error: a size is too large for this model's arrays; lower the model or batch sizes "
      "(An overflow was encountered while parsing an argument)"], result.stderr[-2000:]


def test_a_validation_subset_past_the_machine_s_memory_is_refused(make_config, corpus):
  """train.eval_batches=1e9 hung building the fixed subset (528 GB of windows): refused in
  one line before it is drawn. A subset of more windows than the split holds is drawn with
  replacement, as before (a run with one must still resume)."""
  config = make_config("dense", corpus, train__eval_batches=10**9)
  with pytest.raises(ChimeraError, match=rf"^config.train.eval_batches: 1000000000 batches of "
                                         rf"{config.train.batch_size} windows of "
                                         rf"{config.train.context + 1} tokens would take "
                                         rf"[\d,.]+ GiB, more than half this machine's memory"):
    train_lib.prepare_data(config)
  plain = train_lib.prepare_data(make_config("dense", corpus))
  windows = len(plain.splits.val) - plain.val_batches.shape[-1] + 1
  many = -(-2 * windows // plain.val_batches.shape[1])  # twice the windows the split holds
  assert train_lib.prepare_data(make_config("dense", corpus, train__eval_batches=many)
                                ).val_batches.shape[0] == many


def test_ctrl_c_outside_the_training_loop_is_one_line(corpus, tmp_path):
  """Ctrl-C while the data is prepared or the step compiles (the loop turns it into a
  checkpoint itself): one line and exit status 130, no traceback."""
  interrupted = "def train(*args, **kwargs): raise KeyboardInterrupt\nt.train = train"
  result = run_main_patched(interrupted, *main_args("dense", corpus, tmp_path / "run", {}))
  assert result.returncode == 130, result.stderr[-2000:]
  assert [line for line in result.stderr.splitlines() if line.strip()] == [
      "error: interrupted outside the training loop; the workdir keeps what it had (its "
      "latest checkpoint, if any)"]


@pytest.mark.slow
def test_bad_config_is_one_line_before_compiling(corpus, tmp_path):
  cases = {
      "--config.model.top_k=9": "config.model.top_k",
      "--config.model.capacity_factor=0": "config.model.capacity_factor",
      "--config.model.num_heads=3": "config.model.d_model",
      "--config.train.steps=0": "config.train.steps",
      "--config.train.context=1000": "config.train.context",
      "--config.data.corpus=/no/such/file.txt": "/no/such/file.txt",
      "--config.model.vocab_size=100": "vocab_size",
      "--config.model.num_expertz=4": "--config.model.num_expertz: no such config field "
                                      "'num_expertz'; did you mean \"num_experts\"",
      "--config.train.steps=abc": "invalid literal for int() with base 10: 'abc'",
      "--config.train.seed=4294967295": "config.train.seed: must be in [0, 4294967294]",
      "--config.model.foo=1": "--config.model.foo: no such config field 'foo'",
      # ml_collections' own: "string indices must be integers", a Python ast node.
      "--config.name.x=1": "--config.name.x: config.name is a string, not a section",
      "--config.model=foo": "--config.model: a section; set one of its fields, "
                            "--config.model.FIELD=value (chimera/config.py's ModelConfig)",
      "--config.model.d_ff.x=1": "--config.model.d_ff.x: model.d_ff is a field, not a section",
      "--config.seed=1": "--config.seed: no such config field 'seed'; did you mean "
                         "--config.data.seed or --config.train.seed?",
      "--config.model.group_size=48": "config.model.group_size",
      "--config.model.priority=ranked": "config.model.priority",
      "--config.data.seed=-1": "config.data.seed: must be >= 0",
      "--stop_after=0": "--stop_after: must be >= 1",
      "config.train.steps=100": "unexpected argument 'config.train.steps=100'",
      "--config.model.router=nope": "config.model.router",
      "--config.train.min_learning_rate=1": "config.train.min_learning_rate",
      "--config.data.text_field=body": "config.data.text_field: names a column of an hf: "
                                       "corpus;",
      f"--workdir={corpus}": "is a file",
      "--config=configs/moe_top3.py:tiny": "--config: no such file: configs/moe_top3.py",
  }
  for flag, expected in cases.items():
    args = ["--config=configs/moe_top2.py:tiny"]
    if "workdir" not in flag:
      args.append(f"--workdir={tmp_path / 'run'}")
    if "corpus" not in flag:
      args.append(f"--config.data.corpus={corpus}")
    # JAX_LOG_COMPILES: JAX would log any compilation ("Compiling ...") to stderr.
    result = run_main(*args, flag, env_extra={"JAX_LOG_COMPILES": "1"})
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert result.returncode != 0, flag
    assert expected in result.stderr, (flag, result.stderr)
    assert "Compiling" not in result.stderr, (flag, result.stderr)
    assert "Traceback" not in result.stderr, (flag, result.stderr)
    assert lines == [lines[-1]] and lines[-1].startswith("error: "), (flag, lines)
  # The file given as the flag's next argument is checked the same way.
  result = run_main("--config", "configs/moe_top3.py", f"--workdir={tmp_path / 'run'}")
  assert result.returncode == 2
  assert result.stderr.strip() == "error: --config: no such file: configs/moe_top3.py"


@pytest.mark.parametrize("content, expected", [
    (b"", "is empty"),
    (b"short text", "fewer than one window"),
    (b"caf\xe9 " * 5000, "not valid UTF-8"),
])
def test_bad_corpus(content, expected, make_config, tmp_path):
  path = tmp_path / "corpus.txt"
  path.write_bytes(content)
  with pytest.raises(ChimeraError, match=expected):
    train(make_config("dense", path), tmp_path / "run")


@pytest.mark.parametrize("log_norms", [True, False])
def test_nan_stops_and_keeps_last_good_checkpoint(log_norms, make_config, corpus, tmp_path):
  """With train.log_norms off, the check reads the gradient's norm instead of the new
  parameters': the checkpoint kept is still finite."""
  config = make_config("dense", corpus, train__steps=20, train__learning_rate=1e12,
                       train__warmup_steps=0, train__checkpoint_every=1, train__log_every=1,
                       train__grad_clip=1e12, train__log_norms=log_norms)
  workdir = tmp_path / "run"
  with pytest.raises(TrainingDiverged, match=r"at step (\d+)") as error:
    train(config, workdir)
  bad_step = int(error.value.args[0].split("at step ")[1].split(";")[0])
  checkpointer = Checkpointer(workdir / "checkpoints", keep=2)
  assert checkpointer.latest_step() == bad_step - 1
  state, _ = checkpointer.restore(init_state(config))
  assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(state.params))


@pytest.mark.parametrize("error", [
    ValueError("RESOURCE_EXHAUSTED: Error writing local file \"x/_sharding\": Failed "
               "writing: \"x\": No space left on device [os_error_code='28']"),  # tensorstore's
    OSError(122, "Disk quota exceeded")])
def test_a_checkpoint_the_disk_refuses_stops_in_one_line_and_resumes(error, make_config, corpus,
                                                                     tmp_path, monkeypatch):
  """A full disk (or a quota) at the step-4 save: one ChimeraError naming the folder, the
  reason and the latest complete checkpoint, with how to resume; step 2 stays whole, and
  the same call completes the run once the disk takes writes again."""
  import orbax.checkpoint as ocp
  config = make_config("dense", corpus, train__steps=6, train__warmup_steps=0,
                       train__checkpoint_every=2, train__log_every=1)
  workdir = tmp_path / "run"
  save = ocp.CheckpointManager.save

  def full_at_step_4(self, step, *args, **kwargs):
    if step == 4:
      raise error
    return save(self, step, *args, **kwargs)
  with monkeypatch.context() as patch:
    patch.setattr(ocp.CheckpointManager, "save", full_at_step_4)
    with pytest.raises(ChimeraError) as raised:
      train(config, workdir)
  reason = "No space left on device" if isinstance(error, ValueError) else "Disk quota exceeded"
  assert str(raised.value) == (
      f"a checkpoint could not be written in {workdir / 'checkpoints'} ({reason}); the latest "
      f"complete checkpoint is step 2. Make room (or mend the folder), then: run the same "
      f"command with --workdir={workdir} to resume.")
  assert Checkpointer(workdir / "checkpoints", keep=2).all_steps() == [2]
  summary = train(config, workdir)
  assert summary.completed and summary.steps == 6
  steps = [r["step"] for r in records.read_events(workdir, "train")]
  assert steps == sorted(set(steps)) and steps[-1] == 6  # the log cut back to step 2, no repeats


def test_orbax_errors_of_a_refused_write_are_left_to_the_one_line():
  """A save the disk refused is logged by orbax as errors with tracebacks, from several
  threads: those records are dropped (CheckpointWriteFailed says it in one line); orbax's
  other errors, and anyone else's records of a full disk, still reach the log."""
  import logging

  import orbax.checkpoint as ocp
  absl_logger = logging.getLogger("absl")
  orbax_file = str(Path(ocp.__file__).parent / "_src" / "futures" / "future.py")

  def kept(message, level=logging.ERROR, pathname=orbax_file, error=None):
    exc_info = (type(error), error, None) if error else None
    return bool(absl_logger.filter(logging.LogRecord("absl", level, pathname, 1, message,
                                                     None, exc_info)))
  tensorstore_text = ("RESOURCE_EXHAUSTED: Error writing \"opt_state\" in OCDBT database: "
                      "Failed to write 43957 bytes to file 12: No space left on device "
                      "[os_error_code='28']")
  assert not kept(f"_SignalingThread.run() raised an exception: {tensorstore_text}")
  assert not kept("Save Finalize thread (save_finalize) failed.",
                  error=OSError(errno.EROFS, os.strerror(errno.EROFS)))
  assert not kept("Failed to run 5 Handler Commit operations",
                  error=ValueError(tensorstore_text.replace("28", "122")))
  assert kept("Failed to run 5 Handler Commit operations", error=ValueError("a bug"))
  assert kept(tensorstore_text, pathname="/work/somewhere/else.py")
  assert kept(tensorstore_text, level=logging.WARNING)
  # asyncio's record of the same error, on a future of orbax's writes no one awaited
  # (logged from asyncio's own file); its other errors are kept.
  asyncio_logger = logging.getLogger("asyncio")
  asyncio_file = str(Path(logging.__file__).parent.parent / "asyncio" / "base_events.py")

  def asyncio_kept(message, error):
    record = logging.LogRecord("asyncio", logging.ERROR, asyncio_file, 1771, message, None,
                               (type(error), error, None))
    return bool(asyncio_logger.filter(record))
  assert not asyncio_kept("_GatheringFuture exception was never retrieved",
                          ValueError(tensorstore_text))
  assert asyncio_kept("Task exception was never retrieved", ValueError("a bug"))


def test_tracebacks_of_a_refused_write_that_the_one_line_reports_are_not_printed():
  """After a refused write, orbax's late callbacks into its closed event loop raised
  "Event loop is closed", and tensorboardX's writer thread and atexit flush raised the
  disk's error (or "handle is closed"), each printed as a traceback. The hooks drop those
  and hand every other exception to the hook that was there before."""
  import threading

  from tensorboardX import event_file_writer

  from chimera import checkpoints, metrics
  from chimera.errors import hook_without
  seen = []
  unraisable = lambda error: types.SimpleNamespace(exc_value=error)
  in_thread = lambda error, thread: types.SimpleNamespace(exc_value=error, thread=thread)
  orbax_hook = hook_without(seen.append, lambda args: checkpoints._is_closed_loop(args.exc_value))
  log_hook = hook_without(seen.append, metrics._reported_by_the_run)
  writer_thread = event_file_writer._EventLoggerThread(None, None, 1)
  other_thread = threading.Thread()
  dropped = [(orbax_hook, unraisable(RuntimeError("Event loop is closed"))),
             (log_hook, unraisable(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))),
             (log_hook, in_thread(OSError(errno.EROFS, os.strerror(errno.EROFS)), other_thread)),
             (log_hook, in_thread(OSError("handle is closed"), writer_thread))]
  kept = [(orbax_hook, unraisable(RuntimeError("something else"))),
          (orbax_hook, unraisable(ValueError("Event loop is closed"))),
          (log_hook, unraisable(OSError(errno.EIO, os.strerror(errno.EIO)))),
          (log_hook, in_thread(OSError("handle is closed"), other_thread)),
          (log_hook, in_thread(ValueError("a bug"), writer_thread))]
  for hook, args in dropped + kept:
    hook(args)
  assert seen == [args for _, args in kept]
  # This tensorboardX's writer thread class was found (a rename would leave () there,
  # and its threads' errors printed).
  assert isinstance(writer_thread, metrics._TENSORBOARD_THREAD)


def test_a_workdir_on_a_full_disk_is_one_line_and_left_as_it_was(make_config, corpus, tmp_path,
                                                                 monkeypatch):
  """No room for config.json: one line naming the workdir, and the folder this start made
  is gone (no half-claimed workdir)."""
  def full(path, data):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
  monkeypatch.setattr(train_lib, "write_atomic", full)
  workdir = tmp_path / "run"
  with pytest.raises(ChimeraError, match=rf"^--workdir: cannot write in {workdir} \(No space "
                                         rf"left on device\)$"):
    train(make_config("dense", corpus), workdir)
  assert not workdir.exists()


def test_a_log_the_disk_refuses_stops_in_one_line(make_config, corpus, tmp_path, monkeypatch):
  """The run's records (metrics.jsonl, TensorBoard) on a full disk at step 5: one line with
  the latest complete checkpoint (step 4), as for a checkpoint. Other OS errors propagate."""
  config = make_config("dense", corpus, train__steps=6, train__warmup_steps=0,
                       train__checkpoint_every=2, train__log_every=1)
  write = train_lib.MetricWriter.write

  def refuse_at_step_5(errno_):
    def refuse(self, event, step, values):
      if step == 5:
        raise OSError(errno_, os.strerror(errno_), str(tmp_path / "run" / "metrics.jsonl"))
      return write(self, event, step, values)
    return refuse
  monkeypatch.setattr(train_lib.MetricWriter, "write", refuse_at_step_5(28))
  with pytest.raises(ChimeraError, match=(
      rf"^the run's records could not be written in {tmp_path / 'run'} \(No space left on "
      rf"device: .*metrics\.jsonl\); the latest complete checkpoint is step 4\. Make room")):
    train(config, tmp_path / "run")
  monkeypatch.setattr(train_lib.MetricWriter, "write", refuse_at_step_5(5))  # EIO
  with pytest.raises(OSError, match="Input/output error"):
    train(config, tmp_path / "other")


def test_a_finite_loss_past_the_floats_perplexity_does_not_crash(make_config, corpus, tmp_path,
                                                                 monkeypatch):
  """A validation loss above log(float max) (~709.8; a sweep's far too large learning
  rate) is finite: the run goes on, and its perplexity is infinite, not an OverflowError."""
  real = train_lib.eval_step

  def huge(*args, **kwargs):
    out = real(*args, **kwargs)
    return {**out, "loss_sum": out["loss_sum"] * 1000.0}
  monkeypatch.setattr(train_lib, "eval_step", huge)
  config = make_config("dense", corpus, train__steps=2, train__warmup_steps=0)
  summary = train(config, tmp_path / "run")
  assert summary.completed and 709.8 < summary.final_val_loss < float("inf")
  assert read_events(tmp_path / "run", "eval")[-1]["val_perplexity"] == float("inf")


def test_a_non_finite_validation_loss_stops_before_it_is_saved(make_config, corpus, tmp_path,
                                                               monkeypatch):
  """A validation loss of NaN at step 2 (the training loss still finite) stops the run
  before the step-2 checkpoint, which would otherwise be saved as the best."""
  config = make_config("dense", corpus, train__steps=4, train__warmup_steps=0,
                       train__checkpoint_every=1, train__eval_every=1, train__log_every=1)
  evaluate = train_lib.Evaluator.__call__
  monkeypatch.setattr(train_lib.Evaluator, "__call__", lambda self, state, step, progress:
                      float("nan") if step == 2 else evaluate(self, state, step, progress))
  workdir = tmp_path / "run"
  with pytest.raises(TrainingDiverged, match=r"non-finite validation loss \(nan\) at step 2; "
                                             r"stopping\. The last good checkpoint"):
    train(config, workdir)
  assert Checkpointer(workdir / "checkpoints", keep=2).all_steps() == [1]


def test_a_non_finite_validation_loss_at_the_end_of_a_shortened_run_is_not_summarized(
    make_config, corpus, tmp_path, monkeypatch):
  """train.steps lowered to a stopped run's latest checkpoint: the run's end is evaluated
  after the loop. A NaN there was summarized as completed, with final and best val loss
  NaN (min(nan, x) is nan) in a summary.json that is not strict JSON."""
  kw = dict(train__warmup_steps=0, train__eval_every=4, train__checkpoint_every=4,
            train__log_every=1)
  workdir = tmp_path / "run"
  assert not train(make_config("dense", corpus, train__steps=4, **kw), workdir,
                   stop_after=2).completed
  monkeypatch.setattr(train_lib.Evaluator, "__call__",
                      lambda self, state, step, progress: float("nan"))
  with pytest.raises(TrainingDiverged, match=r"non-finite validation loss \(nan\) at step 2; "
                                             r"stopping\. The last good checkpoint"):
    train(make_config("dense", corpus, train__steps=2, **kw), workdir)
  assert not records.RunSummary.exists(workdir)


def test_a_save_killed_before_its_rename_is_removed_and_not_called_good(make_config, corpus,
                                                                       tmp_path, monkeypatch):
  """A run killed while orbax wrote a save leaves that save's temporary folder (orbax
  renames it into place once it is whole). The next start of the run removes it, and
  until then it is not taken for a good checkpoint."""
  config = make_config("dense", corpus, train__steps=2, train__warmup_steps=0,
                       train__checkpoint_every=2)
  workdir = tmp_path / "run"
  train(config, workdir)
  folder = workdir / "checkpoints"
  # As a killed save leaves it; at a step the run will not save again, so that only the
  # clean-up, not a later save of that step, can remove it.
  partial = folder / "5.orbax-checkpoint-tmp"
  shutil.copytree(folder / "2", partial)
  # What a divergence says of the checkpoints reads the complete ones only.
  (folder / "2").rename(tmp_path / "2")
  assert train_lib._last_good(workdir) == "No checkpoint had been saved yet"
  (tmp_path / "2").rename(folder / "2")
  assert train_lib._last_good(workdir) == f"The last good checkpoint in {folder} is untouched"

  def gone_within(path, seconds=60.0):  # orbax removes partial saves in the background
    deadline = time.monotonic() + seconds
    while path.exists() and time.monotonic() < deadline:
      time.sleep(0.1)
    return not path.exists()

  # A reader beside the run (chimera.evaluate) leaves it: it could be a live run's save.
  # (A control that may remove partial saves, opened after the reader on a copy, shows
  # that the reader had the time to remove it.)
  Checkpointer(folder, keep=2)
  control = tmp_path / "control"
  shutil.copytree(folder, control)
  Checkpointer(control, keep=2, remove_partial=True)
  assert gone_within(control / partial.name)
  assert partial.is_dir()
  extended = train(make_config("dense", corpus, train__steps=6, train__warmup_steps=0,
                               train__checkpoint_every=2), workdir)
  assert extended.completed
  assert gone_within(partial)  # the run that holds the workdir removes it
  assert sorted(p.name for p in folder.iterdir()) == ["4", "6"]


@pytest.mark.slow
def test_sigkill_between_checkpoints_cuts_the_log_and_the_downtime(make_config, corpus,
                                                                    tmp_path, monkeypatch):
  steps, every = 1000, 100
  overrides = dict(train__steps=steps, train__checkpoint_every=every, train__eval_every=every,
                   train__log_every=1)
  config = make_config("dense", corpus, **overrides)
  train(config, tmp_path / "straight")

  workdir = tmp_path / "killed"
  args = main_args("dense", corpus, workdir, overrides)
  # The compilation cache as chimera.main sets it (chimera.compile_cache), whatever this
  # shell sets, and every compiled step written to it, however fast this machine compiles.
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
  process = start_main(*args, env_extra={"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"})
  # Kill it once a checkpoint is complete and the run has logged steps past it. Orbax
  # finishes a save in the background and then renames its temporary folder to <step>.
  checkpoints = workdir / "checkpoints"
  for line in process.stderr:
    done = [int(p.name) for p in checkpoints.glob("*") if p.name.isdigit()]
    if done and line.startswith("step ") and int(line.split()[1].split("/")[0]) > max(done):
      break
  process.kill()  # SIGKILL: no handler runs, no checkpoint is written
  process.wait(timeout=60)
  saved = Checkpointer(workdir / "checkpoints", keep=2).latest_step()
  rows = read_events(workdir, "train")
  assert saved is not None and saved % every == 0 and rows[-1]["step"] > saved, \
      "the kill did not land between two checkpoints"
  wall_at_checkpoint = next(r["wall_seconds"] for r in rows if r["step"] == saved)

  downtime = 6.0
  time.sleep(downtime)
  restarted = time.time()
  # The .lock file of the killed run is still there. JAX_LOG_COMPILES makes JAX log its
  # compilation cache's hits.
  result = run_main(*args, env_extra={"JAX_LOG_COMPILES": "1"})
  assert result.returncode == 0, result.stderr[-2000:]
  # The killed run wrote its compiled step to the cache (chimera.compile_cache), and the
  # restart read it from there: with the checks below, the cached step trains exactly.
  assert "Persistent compilation cache hit for 'jit_train_step'" in result.stderr
  # The rows the killed run wrote after its checkpoint are gone, not duplicated.
  assert losses(workdir) == losses(tmp_path / "straight")
  after = next(r for r in read_events(workdir, "train") if r["step"] == saved + 1)
  # Training time runs on from the checkpoint's; the downtime is not in it.
  assert after["wall_seconds"] - wall_at_checkpoint <= after["time"] - restarted + 0.5
  assert RunSummary.load(workdir).steps == steps


def test_a_workdir_holds_one_run(make_config, corpus, tmp_path):
  workdir = tmp_path / "run"
  dense = make_config("dense", corpus, train__steps=2, train__warmup_steps=0)
  train(dense, workdir)
  with pytest.raises(ChimeraError, match=r"^--workdir: .* holds another run \(as its checkpoint "
                                         r"at step 2 recorded it\); these fields differ: "
                                         r".*model\.num_experts \(0 -> 8\)"):
    train(make_config("moe_top2", corpus, train__steps=2, train__warmup_steps=0), workdir)
  with pytest.raises(ChimeraError, match=r"train\.learning_rate \(0\.002 -> 0\.001\)"):
    train(make_config("dense", corpus, train__steps=2, train__warmup_steps=0,
                      train__learning_rate=1e-3), workdir)
  # An edited config.json does not make the checkpoints another run's: the config they
  # recorded decides, both ways, and resuming writes config.json back.
  edited = json.loads((workdir / "config.json").read_text())
  edited["train"]["learning_rate"] = 3e-3
  (workdir / "config.json").write_text(json.dumps(edited))
  with pytest.raises(ChimeraError, match=r"train\.learning_rate \(0\.002 -> 0\.003\)"):
    train(make_config("dense", corpus, train__steps=2, train__warmup_steps=0,
                      train__learning_rate=3e-3), workdir)
  # Logging intervals do not change the run; more steps extend it.
  same = make_config("dense", corpus, train__steps=2, train__warmup_steps=0, train__log_every=1)
  assert train(same, workdir).steps == 2
  assert json.loads((workdir / "config.json").read_text())["train"]["learning_rate"] == 2e-3
  longer = make_config("dense", corpus, train__steps=4, train__warmup_steps=0)
  assert train(longer, workdir).steps == 4
  assert [r["step"] for r in read_events(workdir, "eval")] == [2, 3, 4]
  # Fewer steps than the run has trained is not a shorter run.
  with pytest.raises(ChimeraError, match=r"^train\.steps=3: .* holds this run at step 4"):
    train(make_config("dense", corpus, train__steps=3, train__warmup_steps=0), workdir)
  # Refused before config.json is written: it still says 4 steps.
  assert json.loads((workdir / "config.json").read_text())["train"]["steps"] == 4
  # Another run with fewer steps is told it is another run, not to ask for more steps
  # (which would only lead to that).
  with pytest.raises(ChimeraError, match=r"^--workdir: .* holds another run .*"
                                         r"model\.num_experts \(0 -> 8\)"):
    train(make_config("moe_top2", corpus, train__steps=3, train__warmup_steps=0), workdir)
  # The same config over changed text is another run: resuming it, or scoring it on the
  # new split, is refused in one line.
  assert json.loads((workdir / "data.json").read_text())["corpus"] == str(corpus)
  # The same text moved elsewhere is the same run; data.json follows it.
  moved = tmp_path / "moved" / "corpus.txt"
  moved.parent.mkdir()
  corpus.rename(moved)
  assert train(make_config("dense", moved, train__steps=5, train__warmup_steps=0),
               workdir).steps == 5
  assert json.loads((workdir / "data.json").read_text())["corpus"] == str(moved)
  moved.write_text(moved.read_text() + "\nthe king will speak\n")
  with pytest.raises(ChimeraError, match=r"^--workdir: .* holds a run of other text: the "
                                         r"corpus changed since it started \(content_hash"):
    train(make_config("dense", moved, train__steps=6, train__warmup_steps=0), workdir)
  with pytest.raises(ChimeraError, match=r"holds a run of other text"):
    evaluate.split_loss(workdir)
  moved.write_text("the king will speak\n" * 3)  # too short for one window, and other text
  with pytest.raises(ChimeraError, match=r"^--workdir: .* holds a run of other text"):
    train(make_config("dense", moved, train__steps=6, train__warmup_steps=0), workdir)


def test_a_report_folder_is_not_a_workdir(make_config, corpus, tmp_path):
  """A chimera.compare report folder (its summary.json is a study's) is refused in one
  line before anything is written there."""
  report = tmp_path / "results" / "cpu"
  report.mkdir(parents=True)
  (report / "summary.json").write_text(json.dumps({"title": "MoE against dense", "models": {}}))
  with pytest.raises(ChimeraError, match=r"^--workdir: .* holds a summary\.json that is not a "
                                         r"run's \(a chimera\.compare report folder\?\)"):
    train(make_config("dense", corpus, train__steps=2, train__warmup_steps=0), report)
  assert sorted(p.name for p in report.iterdir()) == ["summary.json"]


def test_a_setting_only_an_moe_reads_is_refused_on_a_dense_model(corpus, tmp_path):
  """--config.model.top_k=99 on configs/dense.py trained dense as if unset, but wrote
  top_k 99 (and expert_d_ff 1) into config.json, and a resume with another value was
  refused as another run. The same field set by an MoE config file, on a model its
  command line makes dense (num_experts=0), is the file's, not an override."""
  refused = run_main(*main_args("dense", corpus, tmp_path / "dense", {"model__top_k": 99}))
  assert refused.returncode == 2 and refused.stderr.splitlines() == [
      "error: --config.model.top_k: only an MoE model reads it, and this one is dense "
      "(model.num_experts=0), so it would change nothing"], refused.stderr
  assert not (tmp_path / "dense").exists()
  made_dense = run_main(*main_args("moe_top2", corpus, tmp_path / "moe", {
      "model__num_experts": 0, "train__steps": 1, "train__warmup_steps": 0}))
  assert made_dense.returncode == 0, made_dense.stderr[-2000:]
  assert json.loads((tmp_path / "moe" / "config.json").read_text())["model"]["num_experts"] == 0


def test_a_name_that_is_not_a_plain_folder_name_is_refused_without_workdir(tmp_path):
  """Without --workdir the run's folder is runs/<name>-<time>: config.name=../../x put it
  outside runs/ (and "" made runs/-<time>). Refused in one line, before anything is made."""
  for name in ("../../escaped", "a/b", ""):
    result = run_main(f"--config={ROOT}/configs/dense.py:tiny", f"--config.name={name}",
                      cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.splitlines() == [
        f"error: config.name: names the run's folder under runs/ when no --workdir is "
        f"given, so it must be a plain name (not empty, no '/'), got {name!r}"], result.stderr
  assert list(tmp_path.iterdir()) == []


def test_a_folder_that_holds_no_run(make_config, corpus, tmp_path, capsys):
  """`--workdir=.` or `--workdir=~/papers`: a folder no start has claimed. Its files that
  the run would write over are refused (nothing is written there); other files are named
  and left beside the run's (`| tee WORKDIR/log` makes one before the run starts)."""
  config = make_config("dense", corpus, train__steps=2, train__warmup_steps=0)
  folder = tmp_path / "papers"
  (folder / "drafts").mkdir(parents=True)
  for name in ("notes.txt", "a.pdf", "metrics.jsonl"):
    (folder / name).write_text("mine")
  before = sorted(p.name for p in folder.iterdir())
  with pytest.raises(ChimeraError, match=r"^--workdir: \S+/papers holds no run but holds "
                                         r"metrics\.jsonl, which the run would write over; use "
                                         r"a new or empty folder$"):
    train(config, folder)
  assert sorted(p.name for p in folder.iterdir()) == before
  (folder / "metrics.jsonl").unlink()
  capsys.readouterr()
  assert train(config, folder).completed
  assert (f"note: --workdir {folder} holds no run but other files (a.pdf, drafts, notes.txt); "
          f"the run's files go beside them") in capsys.readouterr().err
  assert (folder / "notes.txt").read_text() == "mine"
  # Then it holds a run, resumed or extended there like any other, without the note.
  assert train(make_config("dense", corpus, train__steps=3, train__warmup_steps=0),
               folder).steps == 3
  assert "note: --workdir" not in capsys.readouterr().err


def test_another_program_s_config_json_is_not_written_over(make_config, corpus, tmp_path):
  """A Hugging Face model folder holds a config.json too: it was taken for a run that had
  not saved a checkpoint yet and replaced, even by a start that then failed. A run's own
  config.json, in a folder whose lock was removed, still marks the run."""
  config = make_config("dense", corpus, train__steps=2, train__warmup_steps=0)
  folder = tmp_path / "gpt2-hf"
  folder.mkdir()
  theirs = '{"architectures": ["GPT2LMHeadModel"], "n_embd": 768}'
  (folder / "config.json").write_text(theirs)
  with pytest.raises(ChimeraError, match=r"^--workdir: \S+/gpt2-hf holds no run but holds "
                                         r"config\.json, which the run would write over"):
    train(config, folder)
  assert (folder / "config.json").read_text() == theirs
  assert sorted(p.name for p in folder.iterdir()) == ["config.json"]
  ours = tmp_path / "ours"
  assert train(config, ours).completed
  for name in (".lock", "summary.json"):
    (ours / name).unlink()
  shutil.rmtree(ours / "checkpoints")
  assert train(config, ours).completed  # config.json alone: still this run's folder


def test_a_workdir_that_is_a_file_or_in_use_is_refused(make_config, corpus, tmp_path,
                                                         monkeypatch):
  config = make_config("dense", corpus, train__steps=2, train__warmup_steps=0)
  with pytest.raises(ChimeraError, match="is a file"):
    train(config, corpus)
  with pytest.raises(ChimeraError, match=r"^--workdir: cannot create .*Not a directory"):
    train(config, corpus / "run")
  workdir = tmp_path / "run"
  workdir.mkdir()
  with open(workdir / ".lock", "w") as lock:  # as a live run holds it
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with pytest.raises(ChimeraError, match="in use by another live run"):
      train(config, workdir)
  assert train(config, workdir).completed  # released: the next run goes ahead
  # A filesystem without flock (some network mounts) is named, with what to do instead.
  def no_flock(file, operation):
    raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
  monkeypatch.setattr(train_lib.fcntl, "flock", no_flock)
  with pytest.raises(ChimeraError, match=r"^--workdir: cannot lock .*\.lock \(No locks "
                                         r"available\); use a workdir on a local filesystem$"):
    train(make_config("dense", corpus, train__steps=3, train__warmup_steps=0), workdir)


def test_the_records_follow_the_checkpoints(make_config, corpus, tmp_path, monkeypatch,
                                           capsys):
  """summary.json is written once the final checkpoint is on disk, goes while a run is
  extended, and describes the step it names; every train row says how many steps it
  averages; checkpoints judge a resume by the config they recorded, config.json deleted or not."""
  workdir = tmp_path / "run"
  steps = lambda n, **kw: make_config("dense", corpus, train__steps=n, train__warmup_steps=0,
                                      train__eval_every=4, train__checkpoint_every=2,
                                      train__log_every=2, **kw)
  save = RunSummary.save
  on_disk, crash = [], []

  def save_or_crash(self, workdir):
    if crash:
      raise crash.pop()
    on_disk.append(sorted(p.name for p in (workdir / "checkpoints").iterdir()))
    save(self, workdir)

  monkeypatch.setattr(RunSummary, "save", save_or_crash)
  assert train(steps(4), workdir).completed and on_disk == [["2", "4"]]
  # Extended to 8 steps and stopped at 5: the 4-step summary no longer describes the run,
  # nor do the plots chimera.main drew of it.
  assert run_plots(workdir, "dense") == [workdir / "loss.png"]
  capsys.readouterr()
  assert not train(steps(8), workdir, stop_after=1).completed
  assert "train.steps: 4 -> 8. The cosine schedule is stretched" in capsys.readouterr().err
  assert not RunSummary.exists(workdir) and not list(workdir.glob("*.png"))
  # Then ended at its latest checkpoint: evaluated there, not left at step 4's loss. The
  # first try dies after that evaluation and before its summary; the step-5 checkpoint
  # records no evaluation, so the next one evaluates again, and the log keeps one row.
  crash.append(SystemExit("killed"))
  with pytest.raises(SystemExit):
    train(steps(5), workdir)
  assert [r["step"] for r in read_events(workdir, "eval")] == [4, 5]
  summary = train(steps(5), workdir)
  evals = read_events(workdir, "eval")
  assert summary.completed and summary.steps == 5 and [r["step"] for r in evals] == [4, 5]
  assert summary.final_val_loss == evals[-1]["val_loss"] != evals[0]["val_loss"]
  assert RunSummary.load(workdir).steps == 5
  # Fewer steps than the checkpoints reached: refused, and without the line a change of
  # train.steps would print.
  capsys.readouterr()
  with pytest.raises(ChimeraError, match=r"^train\.steps=4: .* holds this run at step 5 "
                                         r"already; ask for at least that many steps$"):
    train(steps(4), workdir)
  assert "train.steps: 5 -> 4" not in capsys.readouterr().err
  rows = read_events(workdir, "train")
  assert [r["step"] for r in rows] == [2, 4, 5]
  assert [r["window_steps"] for r in rows] == [2, 2, 1]
  # A deleted config.json: the checkpoints' own record of their config judges the resume
  # (and evaluate reads it), and resuming writes config.json back.
  (workdir / "config.json").unlink()
  restored, _, at = evaluate.restore_run(workdir)
  assert at == 5 and not config_lib.run_differences(restored, steps(5))
  with pytest.raises(ChimeraError, match=r"holds another run \(as its checkpoint at step 5 "
                                         r"recorded it\); these fields differ: train\.seed"):
    train(steps(6, train__seed=1), workdir)
  assert not (workdir / "config.json").exists()  # nothing written over
  # Checkpoints from before they recorded their config, without config.json: nothing to
  # check a config against, so they are not resumed (nor evaluated).
  monkeypatch.setattr(train_lib, "saved_meta", lambda folder, step: {})
  with pytest.raises(ChimeraError, match=r"holds checkpoints that do not record their config "
                                         r"\(saved before 2026-11-28\) and no config\.json"):
    train(steps(6), workdir)
  with pytest.raises(ChimeraError, match=r"holds checkpoints that do not record their config"):
    evaluate.restore_run(workdir)
  assert not (workdir / "config.json").exists()
  # There config.json judges; one this version cannot read is refused, and left as it is.
  (workdir / "config.json").write_text(json.dumps({"model": {"d_model": "wide"}}))
  with pytest.raises(ChimeraError, match=r"^--workdir: .*config\.json is not a config this "
                                         r"version can read \(.*\); use a new workdir$"):
    train(steps(6), workdir)
  assert json.loads((workdir / "config.json").read_text()) == {"model": {"d_model": "wide"}}
  (workdir / "config.json").unlink()
  monkeypatch.undo()
  assert train(steps(6), workdir).steps == 6
  # config.json records the run as it trains: its mesh resolved to this process's devices.
  assert config_lib.from_dict(json.loads((workdir / "config.json").read_text())) == (
      sharding.resolve_mesh(steps(6), jax.device_count()))
  # A run started before data.json was kept resumes without it (nothing to check the
  # corpus against), and a resume does not write one: only a fresh start records its data.
  (workdir / "data.json").unlink()
  assert train(steps(7), workdir).steps == 7
  assert not (workdir / "data.json").exists()


def test_a_refused_start_leaves_neither_its_workdir_nor_the_folders_it_made(make_config,
                                                                            tmp_path):
  """A corpus too short for one window is refused after the data was recorded (data.json):
  the auto-named workdir, and the runs/ folder made for it, are gone all the same; a
  folder that was there before stays."""
  short = tmp_path / "short.txt"
  short.write_text("To be, or not to be, that is the question. " * 7)  # 301 bytes
  workdir = tmp_path / "runs" / "dense-tiny-1"
  with pytest.raises(ChimeraError, match="fewer than one window"):
    train(make_config("dense", short), workdir)
  assert not (tmp_path / "runs").exists()
  (tmp_path / "runs").mkdir()
  with pytest.raises(ChimeraError, match="fewer than one window"):
    train(make_config("dense", short), workdir)
  assert (tmp_path / "runs").exists() and not workdir.exists()


def test_a_start_that_saved_no_checkpoint_does_not_hold_the_workdir(make_config, corpus,
                                                                    tmp_path):
  """A start refused for bad input, or stopped before its first checkpoint, leaves no run:
  the corrected command starts in the same workdir, with a log of its own."""
  workdir = tmp_path / "run"
  bad_corpus = make_config("dense", tmp_path / "missing.txt", train__steps=4)
  with pytest.raises(ChimeraError, match="no such file"):  # nothing left of a new workdir
    train(bad_corpus, workdir)
  assert not workdir.exists()
  workdir.mkdir()  # one that was there before keeps its claim
  with pytest.raises(ChimeraError, match="no such file"):
    train(bad_corpus, workdir)
  assert (workdir / "config.json").exists()
  config = make_config("dense", corpus, train__steps=4, train__checkpoint_every=4,
                       train__log_every=1)
  assert not train(config, workdir, stop_after=2).completed  # a save at the stop...
  shutil.rmtree(workdir / "checkpoints")  # ...lost, as in a kill before the first save
  other = make_config("dense", corpus, train__steps=4, train__checkpoint_every=4,
                      train__log_every=1, train__learning_rate=1e-3)
  assert train(other, workdir).completed
  assert json.loads((workdir / "config.json").read_text())["train"]["learning_rate"] == 1e-3
  assert len(read_events(workdir, "setup")) == 1
  assert [r["step"] for r in read_events(workdir, "train")] == [1, 2, 3, 4]
  # Once a checkpoint exists, the workdir holds that run.
  with pytest.raises(ChimeraError, match=r"holds another run"):
    train(config, workdir)


def test_train_and_evaluation_steps_compile_dots_as_the_default_kernels_say(make_config, corpus):
  """The trainer's compiled steps take Kernels().compiler_options(): with cpu_dots="eigen",
  no dot of the train or evaluation step goes to YNNPACK, which jaxlib 0.10.2 would pick
  for the same evaluation step without the options."""
  config = make_config("moe_top2", corpus)
  config = sharding.resolve_mesh(config, jax.device_count())
  mesh = sharding.make_mesh(config.mesh)
  state = init_state(config)
  batch = np.zeros((2, config.train.context + 1), np.int32)
  evaluator = train_lib.Evaluator(config, types.SimpleNamespace(val_batches=[]), mesh, writer=None)
  compiled = [train_lib._compile_train_step(config, mesh, state, jax.random.key(0)),
              evaluator.eval_fn.lower(state.params, state.model_state, batch).compile()]
  assert Kernels().cpu_dots == "eigen"
  for step in compiled:
    assert " dot(" in step.as_text() and '"kind":"__ynn_fusion"' not in step.as_text()
  if Kernels().compiler_options() is None:
    pytest.skip(f"jaxlib {jax.lib.__version__} has no YNNPACK option: the check that the "
                "options change the compiled step did not run")
  default = jax.jit(functools.partial(eval_step, model=Decoder(config.model), config=config.model))
  text = default.lower(state.params, state.model_state, batch).compile().as_text()
  assert '"kind":"__ynn_fusion"' in text


def test_the_moe_only_fields_do_not_change_a_dense_run(make_config, corpus):
  """config.MOE_ONLY names what only an MoE reads (chimera.compare keeps those settings off
  its dense models): a dense config with every one of them changed lowers to the same
  train step, from the same initial state."""
  changed = {"model.top_k": 1, "model.expert_d_ff": 7, "model.router": "sigmoid_top_k",
             "model.priority": "rank", "model.renormalize_gates": False,
             "model.capacity_factor": 3.0, "model.eval_capacity_factor": 3.0,
             "model.min_capacity": 9, "model.group_size": 16, "model.dispatch": "dropless",
             "model.router_jitter": 0.1, "model.router_noise": 0.3, "model.expert_init": "dense",
             "model.expert_init_scale": 0.5, "model.moe_every": 2, "model.first_moe_layer": 1,
             "model.load_balance_coef": 0.5, "model.load_balance_scope": "batch",
             "model.router_bias_rate": 0.1, "model.z_loss_coef": 0.1,
             "train.router_lr_scale": 3.0, "train.router_weight_decay": False,
             "train.expert_lr_scale": 0.5, "train.expert_weight_decay": 0.0}
  # num_experts makes a model an MoE, and shared experts need routed ones.
  assert set(config_lib.MOE_ONLY) == {*changed, "model.num_experts", "model.num_shared_experts"}
  plain = make_config("dense", corpus)
  other = make_config("dense", corpus, **{k.replace(".", "__"): v for k, v in changed.items()})
  before, after = config_lib.to_dict(plain), config_lib.to_dict(other)
  assert {f"{section}.{field}" for section in ("model", "train") for field in before[section]
          if before[section][field] != after[section][field]} == set(changed)  # each one took
  assert config_lib.run_differences(plain, other) == []  # so a dense run resumes without them

  def lowered(config):
    state = init_state(config)
    step = jax.jit(functools.partial(train_step, model=Decoder(config.model), config=config.model))
    batch = jnp.zeros((1, 2, config.train.context + 1), jnp.int32)
    text = step.lower(state, batch, jax.random.key(0)).as_text()
    return jax.tree.map(np.asarray, state.params), text

  (params, text), (other_params, other_text) = lowered(plain), lowered(other)
  chex.assert_trees_all_equal(params, other_params)
  assert text == other_text


def test_evaluation_runs_the_training_micro_batches(make_config, corpus):
  """With train.grad_accum = A, evaluation runs the batch as A micro-batches one after
  another: the loss and routing statistics of one pass over it, with one micro-batch's
  activations (a run whose grad_accum makes training fit must not run out of memory at its
  first evaluation)."""
  config = make_config("moe_top2", corpus, train__batch_size=8, train__grad_accum=4,
                       model__dispatch="einsum", model__eval_capacity_factor=1.0)
  config = sharding.resolve_mesh(config, jax.device_count())
  state = init_state(config)
  batch = np.random.default_rng(0).integers(0, 256, (8, config.train.context + 1), np.int32)
  evaluator = train_lib.Evaluator(config, types.SimpleNamespace(val_batches=[batch]),
                                  sharding.make_mesh(config.mesh), writer=None)
  [micro] = evaluator.batches
  assert micro.shape == (4, 2, config.train.context + 1)
  np.testing.assert_array_equal(np.asarray(micro).reshape(batch.shape), batch)
  step = jax.jit(functools.partial(eval_step, model=Decoder(config.model), config=config.model))
  whole, parts = step(state.params, state.model_state, batch), evaluator.eval_fn(
      state.params, state.model_state, micro)
  assert float(np.max(whole["dropped_fraction"])) > 0  # the statistics are not all zeros
  for name in whole:
    np.testing.assert_allclose(parts[name], whole[name], rtol=1e-5, err_msg=name)
  temp = lambda tokens: step.lower(state.params, state.model_state, tokens).compile() \
      .memory_analysis().temp_size_in_bytes
  assert temp(micro) < 0.5 * temp(batch)


def test_bits_per_byte_by_hand():
  """A validation loss of 2 ln 2 nats per token is 2 bits per token; at 2 bytes of text
  per token, 1 bit per byte."""
  data = train_lib.Data(splits=None, val_batches=None, val_bytes_per_token=2.0,
                        unigram_loss=0.0, identity={})
  assert data.bits_per_byte(2 * math.log(2)) == pytest.approx(1.0)
  assert data.bits_per_byte(math.log(2)) == pytest.approx(0.5)


def test_code_version_names_the_commit_and_uncommitted_changes(tmp_path):
  git = lambda *args: subprocess.run(["git", "-C", str(tmp_path), *args], check=True,
                                     capture_output=True, text=True).stdout.strip()
  package = tmp_path / "chimera"
  package.mkdir()
  (package / "__init__.py").write_text("")
  assert code_version(package) is None  # not a checkout yet
  git("init", "-q")
  git("-c", "user.name=t", "-c", "user.email=t@t", "add", ".")
  git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "first")
  commit = git("rev-parse", "--short=12", "HEAD")
  assert code_version(package) == commit
  (tmp_path / "notes.txt").write_text("not code")  # outside chimera/ and configs/
  assert code_version(package) == commit
  git("config", "status.showUntrackedFiles", "no")  # a user's setting must not hide it
  (package / "new_module.py").write_text("x = 1")  # untracked code counts
  assert code_version(package) == commit + "+dirty"
  # A chimera/ that is not at the top of its checkout (a copy inside another repo).
  nested = tmp_path / "site" / "chimera"
  nested.mkdir(parents=True)
  assert code_version(nested) is None
  # This checkout: a run records what code_version says, and a resumed run by other code
  # lists both.
  progress = Progress()
  progress.trained_by("abc")
  progress.trained_by("abc")
  progress.trained_by(None)
  assert progress.code == ["abc", "unknown"]
  progress.trained_by("abc")  # back to the first code: a third session, noted again
  assert progress.code == ["abc", "unknown", "abc"]
  progress.code.pop()
  assert Progress.from_json(progress.to_json()).code == ["abc", "unknown"]
  # A checkpoint older than the record: its code is not known, and a resume says so.
  assert Progress.from_json({"tokens_seen": 3}).code == ["not recorded"]


def test_cpu_model_is_read_from_cpuinfo(tmp_path, monkeypatch):
  cpuinfo = tmp_path / "cpuinfo"
  cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9B14\n"
                     "flags\t\t: fpu sse4_2 avx avx2 avx512f avx512bw\n"
                     "processor\t: 1\nmodel name\t: AMD EPYC 9B14\n")
  assert cpu_model(cpuinfo) == "AMD EPYC 9B14, AVX-512"
  cpuinfo.write_text("model name\t: AMD EPYC 9B14\nflags\t\t: fpu sse4_2 avx avx2\n")
  assert cpu_model(cpuinfo) == "AMD EPYC 9B14, AVX2"  # the same name, a narrower ISA
  # No /proc/cpuinfo (macOS): platform.processor(), which may be empty.
  import platform
  monkeypatch.setattr(platform, "processor", lambda: "arm")
  assert cpu_model(tmp_path / "missing") == "arm"
  monkeypatch.setattr(platform, "processor", lambda: "")
  assert cpu_model(tmp_path / "missing") is None
  # Runs on the CPU are named with it, and with the device count past one.
  monkeypatch.setattr(records, "cpu_model", lambda: "AMD EPYC 9B14, AVX-512")
  monkeypatch.setattr(jax, "device_count", lambda: 1)
  assert device_name() == "cpu (AMD EPYC 9B14, AVX-512)"
  monkeypatch.setattr(jax, "device_count", lambda: 2)
  assert device_name() == "cpu (AMD EPYC 9B14, AVX-512) x 2"
  monkeypatch.setattr(records, "cpu_model", lambda: None)
  assert device_name() == "cpu x 2"


def test_the_best_checkpoint_outlives_a_restart(tmp_path):
  """Retention keeps the latest `keep` checkpoints and the best by validation loss, also
  when a later session (a new manager over the same folder) saves the next one."""
  state = {"w": np.zeros(3, np.float32)}
  checkpointer = Checkpointer(tmp_path, keep=1)
  for step, val_loss in ((1, 1.0), (2, 5.0), (3, 6.0)):
    checkpointer.save(step, state, {}, val_loss=val_loss)
    checkpointer.wait()
  assert checkpointer.all_steps() == [1, 3]
  checkpointer.close()
  resumed = Checkpointer(tmp_path, keep=1)
  resumed.save(4, state, {})  # between evaluations: no metrics
  resumed.wait()
  resumed.save(5, state, {}, val_loss=7.0)
  resumed.wait()
  assert resumed.all_steps() == [1, 5]
  resumed.close()


def test_a_checkpoint_of_another_model_is_refused_before_reading_it(tmp_path):
  """Names and shapes are compared from the checkpoint's metadata: a one-line ChimeraError
  naming the arrays that differ, parameters first, instead of orbax's traceback."""
  saved = {"params": {"w": np.ones((2, 3), np.float32)}, "opt": {"mu": np.zeros(3, np.float32)}}
  checkpointer = Checkpointer(tmp_path, keep=1)
  checkpointer.save(1, saved, {"note": 1})
  checkpointer.wait()
  assert checkpointer.mismatch(saved, 1) is None
  state, meta = checkpointer.restore(saved, 1)
  np.testing.assert_array_equal(state["params"]["w"], saved["params"]["w"])
  assert meta == {"note": 1}
  wider = {"params": {"w": np.ones((2, 4), np.float32)}, "opt": {"mu": np.zeros(4, np.float32)}}
  with pytest.raises(ChimeraError, match=r"^the checkpoint at step 1 in .* does not hold this "
                                         r"config's model: params/w is \(2, 3\) in the "
                                         r"checkpoint, \(2, 4\) in the model; opt/mu is"):
    checkpointer.restore(wider, 1)
  more = {**saved, "params": {**saved["params"], "b": np.zeros(3, np.float32)}}
  assert checkpointer.mismatch(more, 1) == "params/b is in the model, not in the checkpoint"
  fewer = {"params": saved["params"]}
  assert checkpointer.mismatch(fewer, 1) == "opt/mu is in the checkpoint, not in the model"
  # Past three differences, the line names the first three and counts the rest.
  other = {"params": {name: np.zeros(3, np.float32) for name in "abcde"}}
  assert checkpointer.mismatch(other, 1) == (
      "params/a is in the model, not in the checkpoint; params/b is in the model, not in the "
      "checkpoint; params/c is in the model, not in the checkpoint (and 4 more)")
  checkpointer.close()


def test_the_best_validation_loss_is_the_lowest_evaluation():
  """Evaluator keeps the lowest loss as best and the latest as final (a run whose loss
  rises at the end, as an overfitting one's does)."""
  evaluator = object.__new__(train_lib.Evaluator)
  losses_seen = iter([3.0, 2.0, 2.5])
  evaluator.batches = [None]
  evaluator.eval_fn = lambda params, model_state, batch: {
      "loss_sum": 10 * next(losses_seen), "tokens": 10.0, "dropped_fraction": np.zeros(1),
      "expert_load": np.zeros((1, 2))}
  evaluator.data = types.SimpleNamespace(bits_per_byte=lambda loss: loss / math.log(2))
  written = []
  evaluator.writer = types.SimpleNamespace(write=lambda *args: written.append(args))
  progress = Progress()
  state = types.SimpleNamespace(params=None, model_state=None)
  for step in (10, 20, 30):
    evaluator(state, step, progress)
  assert (progress.best_val_loss, progress.final_val_loss, progress.eval_step) == (2.0, 2.5, 30)
  assert [args[2]["val_loss"] for args in written] == [3.0, 2.0, 2.5]


def test_the_sessions_first_step_is_left_out_of_the_throughput(make_config, corpus,
                                                               monkeypatch):
  """A window of 4 steps that ends 8 s after it started, the first step (buffers
  allocated, caches filled) done at 5 s: 3 steps in 3 s are timed, not 4 in 8."""
  config = make_config("dense", corpus)
  times = [0.0, 5.0, 8.0]  # the window's start, the first step done, the window's end
  # chimera.train's own clock only (jax, compiling the schedule, keeps the real one).
  monkeypatch.setattr(train_lib, "time", types.SimpleNamespace(
      perf_counter=lambda: times.pop(0) if len(times) > 1 else times[0], time=time.time,
      monotonic=time.monotonic, sleep=time.sleep))
  progress = Progress()
  log = train_lib.TrainLog(config, 0, types.SimpleNamespace(write=lambda *args: None), progress)
  log.first_step_done()
  for _ in range(4):
    log.add({"loss_sum": 20.0, "tokens": 10.0, "steps": 1.0, "param_norm": 1.0})
  log.flush(4, wall_seconds=8.0)
  tokens_per_step = config.train.batch_size * config.train.context
  assert (progress.timed_tokens, progress.timed_seconds) == (3 * tokens_per_step, 3.0)
  assert log.tokens_per_second == tokens_per_step


def test_progress_saved_is_a_copy():
  progress = Progress(tokens_seen=10)
  saved = progress.to_json()
  progress.tokens_seen += 5  # the loop goes on while orbax writes `saved`
  assert saved["tokens_seen"] == 10 and Progress.from_json(saved).tokens_seen == 10


def test_router_and_expert_learning_rates_and_router_weight_decay():
  """router_lr_scale and expert_lr_scale multiply the routers' and the routed experts'
  updates; router_weight_decay=False drops AdamW's decay term (lr * weight_decay * param)
  from the routers'. Shared experts, norms and the rest keep the plain AdamW update."""
  import dataclasses
  import jax.numpy as jnp
  keys = jax.random.split(jax.random.key(0), 9)
  params = {"block": {"moe": {"router": {"kernel": jax.random.normal(keys[0], (6, 4))},
                              "wi": jax.random.normal(keys[1], (4, 6, 3)),
                              "shared_wi": jax.random.normal(keys[2], (1, 6, 3))}},
            "norm": {"scale": jnp.ones(6)}}
  base = TrainConfig(steps=10, warmup_steps=0, grad_clip=1e6)
  moved = dataclasses.replace(base, router_lr_scale=3.0, router_weight_decay=False,
                              expert_lr_scale=0.5)
  undecayed_experts = dataclasses.replace(base, expert_weight_decay=False)  # an old config
  plain_tx, moved_tx = make_optimizer(base), make_optimizer(moved)
  free_tx = make_optimizer(undecayed_experts)
  double_tx = make_optimizer(dataclasses.replace(base, expert_weight_decay=2.0))
  slow_double_tx = make_optimizer(dataclasses.replace(base, expert_weight_decay=2.0,
                                                      expert_lr_scale=0.5))
  plain_state, moved_state = plain_tx.init(params), moved_tx.init(params)
  free_state, double_state = free_tx.init(params), double_tx.init(params)
  slow_double_state = slow_double_tx.init(params)
  for step, key in enumerate(keys[3:]):
    grads = jax.tree.map(lambda p: jax.random.normal(key, p.shape), params)
    plain, plain_state = plain_tx.update(grads, plain_state, params)
    moved, moved_state = moved_tx.update(grads, moved_state, params)
    # expert_weight_decay=False (0) drops the decay term from the routed experts' update
    # only; 2.0 doubles it, there only, and expert_lr_scale scales the whole update.
    free, free_state = free_tx.update(grads, free_state, params)
    double, double_state = double_tx.update(grads, double_state, params)
    slow_double, slow_double_state = slow_double_tx.update(grads, slow_double_state, params)
    decay_term = make_schedule(base)(step) * base.weight_decay * params["block"]["moe"]["wi"]
    np.testing.assert_allclose(free["block"]["moe"]["wi"],
                               plain["block"]["moe"]["wi"] + decay_term, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(double["block"]["moe"]["wi"],
                               plain["block"]["moe"]["wi"] - decay_term, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(slow_double["block"]["moe"]["wi"],
                               0.5 * double["block"]["moe"]["wi"], rtol=1e-6)
    for name in ("shared_wi", "router"):
      chex.assert_trees_all_equal(free["block"]["moe"][name], plain["block"]["moe"][name])
      chex.assert_trees_all_equal(double["block"]["moe"][name], plain["block"]["moe"][name])
    chex.assert_trees_all_equal(double["norm"], plain["norm"])
    np.testing.assert_array_equal(moved["block"]["moe"]["shared_wi"],
                                  plain["block"]["moe"]["shared_wi"])
    np.testing.assert_array_equal(moved["norm"]["scale"], plain["norm"]["scale"])
    np.testing.assert_allclose(moved["block"]["moe"]["wi"], 0.5 * plain["block"]["moe"]["wi"],
                               rtol=1e-6)
    kernel = params["block"]["moe"]["router"]["kernel"]
    undecayed = (plain["block"]["moe"]["router"]["kernel"]
                 + make_schedule(base)(step) * base.weight_decay * kernel)
    np.testing.assert_allclose(moved["block"]["moe"]["router"]["kernel"], 3.0 * undecayed,
                               rtol=1e-5, atol=1e-7)
    assert not np.allclose(undecayed, plain["block"]["moe"]["router"]["kernel"])


def test_log_norms_off_drops_two_metrics_and_changes_no_step(make_config, corpus):
  """train.log_norms=False leaves the parameters' and the update's norms out of the step's
  metrics; the new state, the loss and the gradient's norm are the same bits."""
  import functools
  from chimera.decoder import Decoder
  from chimera.steps import train_step
  config = make_config("dense", corpus, train__warmup_steps=0)  # a non-zero first update
  tokens = jax.random.randint(jax.random.key(1), (1, 4, config.train.context + 1), 0,
                              config.model.vocab_size)
  results = {}
  for log_norms in (True, False):
    step = jax.jit(functools.partial(train_step, model=Decoder(config.model),
                                     config=config.model, log_norms=log_norms))
    results[log_norms] = step(init_state(config), tokens, jax.random.key(2))
  (with_state, with_metrics), (without_state, without_metrics) = results[True], results[False]
  assert set(with_metrics) - set(without_metrics) == {"param_norm", "update_norm"}
  for name in without_metrics:
    np.testing.assert_array_equal(with_metrics[name], without_metrics[name])
  # The whole state: parameters, optimizer moments, step (and anything else it holds).
  jax.tree.map(np.testing.assert_array_equal, jax.tree.leaves(with_state),
               jax.tree.leaves(without_state))
  assert int(without_state.step) == 1
  assert float(with_metrics["update_norm"]) > 0



def test_a_step_in_micro_batches_equals_one_step(make_config, corpus):
  """train_step over A=2 micro-batches of a batch makes the update of one pass over it
  (per-group balancing, which does not see how the batch is cut), and moves the router
  bias by rate * sign(mean load - load) of the step's pre-drop expert load."""
  config = make_config("moe_top2", corpus, train__warmup_steps=0,
                       model__router_bias_rate=0.01, model__load_balance_scope="group")
  state, context = init_state(config), config.train.context
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 257, (4, context + 1)), jnp.int32)
  step = jax.jit(functools.partial(train_step, model=Decoder(config.model), config=config.model))
  whole, metrics = step(state, tokens[None], jax.random.key(0))
  halves, _ = step(state, tokens.reshape(2, 2, context + 1), jax.random.key(0))
  chex.assert_trees_all_close(halves.params, whole.params, atol=1e-5, rtol=1e-5)
  assert not np.allclose(whole.params["block_0"]["moe"]["wo"], state.params["block_0"]["moe"]["wo"])
  bias = whole.model_state["router_bias"]["block_0"]["moe"]["bias"]
  load = np.asarray(metrics["expert_load"][0])
  np.testing.assert_allclose(bias, 0.01 * np.sign(load.mean() - load), atol=1e-7)
  assert np.abs(bias).sum() > 0  # the load was not even: the bias moved
  np.testing.assert_array_equal(bias, halves.model_state["router_bias"]["block_0"]["moe"]["bias"])


@pytest.mark.parametrize("preset", ["", ":tiny"])
def test_an_error_in_the_config_file_is_one_line_from_chimera_main(tmp_path, preset):
  """chimera.main loads --config=FILE through ml_collections, which wraps an error of the
  file in absl's, with its traceback as text when a preset follows: either way, one line
  naming the file and its line."""
  path = tmp_path / "mine.py"
  path.write_text("def get_config(arg=None):\n  return {}['model']\n")
  result = run_main(f"--config={path}{preset}", f"--workdir={tmp_path / 'run'}")
  assert result.returncode == 2
  assert result.stderr.strip() == f"error: --config: {path}, line 2: KeyError: 'model'"


def test_the_validation_subset_is_the_same_for_every_data_seed(make_config, corpus):
  """The fixed validation windows do not follow data.seed (a study's seeds differ in it):
  every seed is scored on eval_batches of the validation split at seed 0, computed here
  from the text in memory."""
  from chimera.data.batches import eval_batches, make_splits
  from chimera.data.corpora import load_corpus
  from chimera.data.tokenizers import get_tokenizer
  configs = [make_config("dense", corpus, data__seed=seed, train__seed=seed) for seed in (3, 5)]
  t, d = configs[0].train, configs[0].data
  val = make_splits(load_corpus(str(corpus)), get_tokenizer(d.tokenizer),
                    val_fraction=d.val_fraction, mode=d.split).val
  expected = eval_batches(val, batch_size=t.batch_size, window=t.context + 1,
                          num_batches=t.eval_batches, seed=0)
  for config in configs:
    np.testing.assert_array_equal(train_lib.prepare_data(config).val_batches, expected)


# --- Run integrity: tests written by the checkpoint/resume mutation audit. ---------------


def test_a_resume_carries_on_from_where_the_run_stopped(make_config, corpus, tmp_path,
                                                        monkeypatch):
  """A stop (here stop_after, as SIGTERM) between two checkpoint steps saves a checkpoint
  where it stopped, and the next session carries the run on from it: the training time
  and the best validation loss so far come from that checkpoint, and the checkpoint ranked
  best there outlives the next session's saves (retention keeps it by its val_loss)."""
  config = make_config("dense", corpus, train__steps=2, train__warmup_steps=0,
                       train__checkpoint_every=2, train__eval_every=1, train__log_every=1,
                       train__keep_checkpoints=1)
  workdir = tmp_path / "run"
  evaluate = train_lib.Evaluator.__call__

  def best_so_far(self, state, step, progress):  # an evaluation better than any to come
    evaluate(self, state, step, progress)
    progress.best_val_loss = 0.5
    return 0.5
  with monkeypatch.context() as patch:
    patch.setattr(train_lib.Evaluator, "__call__", best_so_far)
    # The first session's clock reads an hour more: the second must count on from it.
    patch.setattr(train_lib.Clock, "__call__", lambda self: self.earlier_seconds + 3600.0)
    stopped = train(config, workdir, stop_after=1)
  assert not stopped.completed and stopped.steps == 1
  checkpoints = Checkpointer(workdir / "checkpoints", keep=1)
  assert checkpoints.all_steps() == [1], "the stop at step 1 saved no checkpoint there"
  checkpoints.close()
  summary = train(config, workdir)
  assert summary.completed and summary.steps == 2
  assert summary.wall_seconds >= 3600.0, "the training time restarted from 0 on resume"
  assert summary.best_val_loss == 0.5, "the best validation loss was not restored"
  assert summary.final_val_loss == read_events(workdir, "eval")[-1]["val_loss"] > 0.5
  # Retention (keep_checkpoints=1): the latest checkpoint, and step 1, the best by the
  # val_loss it was saved with.
  assert Checkpointer(workdir / "checkpoints", keep=1).all_steps() == [1, 2]


def test_a_resume_is_exact_with_dropout_and_the_router_bias(make_config, corpus, tmp_path):
  """What a resume must restore beyond the parameters and the optimiser: the random stream
  (here dropout's; router jitter and noise draw from it too), the same key at each step as
  the run without a stop, and the model's own state (the router bias of
  auxiliary-loss-free balancing)."""
  config = make_config("moe_top2", corpus, train__steps=2, train__warmup_steps=0,
                       train__checkpoint_every=1, train__eval_every=2, train__log_every=1,
                       model__dropout=0.1, model__router_bias_rate=0.01)
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  train(config, straight)
  assert not train(config, resumed, stop_after=1).completed
  assert train(config, resumed).completed
  (state_a, _), (state_b, _) = final_params(config, straight), final_params(config, resumed)
  assert int(state_a.step) == int(state_b.step) == 2
  bias = state_a.model_state["router_bias"]["block_0"]["moe"]["bias"]
  assert np.abs(np.asarray(bias)).sum() > 0  # the bias moved: there is something to restore
  chex.assert_trees_all_equal(state_a.model_state, state_b.model_state)
  chex.assert_trees_all_equal(state_a.params, state_b.params)


def test_a_diverged_step_is_not_saved_between_log_rows(make_config, corpus, tmp_path):
  """With train.log_every longer than train.checkpoint_every, each save still follows the
  check of the steps before it: the NaN at step 2 (learning rate 1e12) stops the run before
  it is saved, and the checkpoint left is step 1's, finite."""
  config = make_config("dense", corpus, train__steps=4, train__learning_rate=1e12,
                       train__warmup_steps=0, train__checkpoint_every=1, train__log_every=4,
                       train__eval_every=4, train__grad_clip=1e12)
  workdir = tmp_path / "run"
  with pytest.raises(TrainingDiverged, match=r"at step 2; stopping\. The last good checkpoint"):
    train(config, workdir)
  checkpointer = Checkpointer(workdir / "checkpoints", keep=2)
  assert checkpointer.all_steps() == [1]
  state, _ = checkpointer.restore(init_state(config))
  assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(state.params))


def test_a_non_finite_norm_stops_the_run_even_with_a_finite_loss(make_config, corpus):
  """The loss checks the parameters a step started from; the norm (the new parameters', or
  without train.log_norms the gradient's) is checked too, so that a step whose update
  overflowed is not saved."""
  config = make_config("dense", corpus)
  log = train_lib.TrainLog(config, 0, types.SimpleNamespace(write=lambda *args: None),
                           Progress())
  log.first_step_done()
  for norm in ("param_norm", "grad_norm"):
    log.add({"loss_sum": 20.0, "tokens": 10.0, "steps": 1.0, norm: 1.0})
    log.add({"loss_sum": 20.0, "tokens": 10.0, "steps": 1.0, norm: np.inf})
    with pytest.raises(TrainingDiverged, match=rf"^non-finite loss \(20\.0\) or {norm} \(inf\) "
                                               rf"at step 2; stopping\.$"):
      log.flush(2, wall_seconds=1.0)
    log.pending.clear()


def test_a_save_that_fails_in_the_background_is_one_line(make_config, corpus, tmp_path,
                                                         monkeypatch):
  """Orbax writes a checkpoint in the background: a full disk met there is raised when the
  run waits for that save, here as the run stops on a NaN validation loss at step 2 with
  step 1's save pending. It is the one-line error of a refused save, not orbax's."""
  import orbax.checkpoint as ocp
  config = make_config("dense", corpus, train__steps=4, train__warmup_steps=0,
                       train__checkpoint_every=1, train__eval_every=1, train__log_every=1)
  evaluate = train_lib.Evaluator.__call__
  monkeypatch.setattr(train_lib.Evaluator, "__call__", lambda self, state, step, progress:
                      float("nan") if step == 2 else evaluate(self, state, step, progress))
  wait, failed = ocp.CheckpointManager.wait_until_finished, []

  def full_once_step_1_is_pending(self):  # as orbax raises a background error: once
    wait(self)
    if self.latest_step() == 1 and not failed:
      failed.append(True)
      raise ValueError("RESOURCE_EXHAUSTED: Error writing local file \"x/_sharding\": "
                       "Failed writing: \"x\": No space left on device [os_error_code='28']")
  monkeypatch.setattr(ocp.CheckpointManager, "wait_until_finished", full_once_step_1_is_pending)
  workdir = tmp_path / "run"
  with pytest.raises(ChimeraError, match=rf"^a checkpoint could not be written in "
                                         rf"{workdir / 'checkpoints'} \(No space left on "
                                         rf"device\); .*Make room"):
    train(config, workdir)
  assert failed


def test_the_workdir_lock_is_exclusive(make_config, corpus, tmp_path):
  """While a run holds its workdir, no other process can take the workdir's lock, shared or
  exclusive (two runs would otherwise write the same checkpoints)."""
  config = make_config("dense", corpus, train__steps=2, train__warmup_steps=0)
  workdir = tmp_path / "run"
  with train_lib.open_workdir(workdir, config):
    for operation in (fcntl.LOCK_SH, fcntl.LOCK_EX):
      with open(workdir / ".lock") as other:  # another open file: as another process's
        with pytest.raises(BlockingIOError):
          fcntl.flock(other, operation | fcntl.LOCK_NB)
  with open(workdir / ".lock") as other:  # released with the block
    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)


def save_run_checkpoints(workdir, config, steps):
  """Checkpoints at `steps` that record `config` as a run's do, with a stand-in state:
  open_workdir reads only the steps and the config their meta records."""
  checkpointer = Checkpointer(workdir / "checkpoints", keep=len(steps))
  recorded = config_lib.to_dict(sharding.resolve_mesh(config, jax.device_count()))
  for step in steps:
    checkpointer.save(step, {"w": np.zeros(3, np.float32)},
                      {**Progress().to_json(), "config": recorded})
  checkpointer.wait()
  checkpointer.close()


def test_without_data_json_a_run_of_other_text_is_another_run(make_config, corpus, tmp_path,
                                                            write_corpus):
  """A workdir without data.json (a run started before it was kept) has no content hash to
  recognise a moved corpus by: its corpus path is part of the run, and another path is
  refused as another run."""
  workdir = tmp_path / "run"
  run = functools.partial(make_config, "dense", train__steps=2, train__warmup_steps=0)
  save_run_checkpoints(workdir, run(corpus), [1])
  other = write_corpus(tmp_path / "other.txt", seed=1)
  with pytest.raises(ChimeraError, match=r"^--workdir: .* holds another run .*: data\.corpus "):
    with train_lib.open_workdir(workdir, run(other)):
      pass
  with train_lib.open_workdir(workdir, run(corpus)) as saved:
    assert saved == [1]  # the run's own corpus resumes


def test_a_dense_run_started_with_a_setting_only_an_moe_reads_resumes_without_it(
    make_config, corpus, tmp_path):
  """chimera.main now refuses model.router_noise on a dense model, and a dense run that
  was started with it (before) was refused as another run without it: a field only an
  MoE reads is not a difference between two dense models."""
  workdir = tmp_path / "run"
  run = functools.partial(make_config, "dense", corpus, train__steps=2, train__warmup_steps=0)
  save_run_checkpoints(workdir, run(model__router_noise=0.1, model__top_k=4), [1])
  with train_lib.open_workdir(workdir, run()) as saved:
    assert saved == [1]
  with pytest.raises(ChimeraError, match=r"holds another run .* model\.num_experts \(0 -> 8\)"):
    with train_lib.open_workdir(workdir, make_config("moe_top2", corpus, train__steps=2,
                                                     train__warmup_steps=0)):
      pass


def test_the_latest_checkpoint_is_the_highest_step(make_config, corpus, tmp_path):
  """Checkpoints at steps 9 and 10 ("10" sorts before "9" as text): the run is at step 10,
  so 9 steps are refused as fewer than it has trained."""
  workdir = tmp_path / "run"
  run = functools.partial(make_config, "dense", corpus, train__warmup_steps=0)
  save_run_checkpoints(workdir, run(train__steps=10), [9, 10])
  with pytest.raises(ChimeraError, match=r"^train\.steps=9: .* holds this run at step 10 "):
    with train_lib.open_workdir(workdir, run(train__steps=9)):
      pass
  assert train_lib.saved_steps(workdir) == [9, 10]


def test_main_draws_no_plots_of_a_stopped_run(corpus, tmp_path):
  """chimera.main plots a run once it has completed, not one stopped short (a run's plots
  describe it as it ended, and go when it is trained on)."""
  stopped = ("import types, chimera.study_plots as plots\n"
             "t.train = lambda *args, **kwargs: types.SimpleNamespace(completed=False)\n"
             "plots.run_plots = lambda workdir, name: print('PLOTTED', file=sys.stderr) or []")
  result = run_main_patched(stopped, *main_args("dense", corpus, tmp_path / "run", {}))
  assert result.returncode == 0, result.stderr[-2000:]
  assert "PLOTTED" not in result.stderr, "a stopped run's plots were drawn"
