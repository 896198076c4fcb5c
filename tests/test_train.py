"""The main job end to end on the `tiny` preset: smoke runs, exact resume, bad input, NaN."""

import json
import os
import signal
import subprocess
import sys

import chex
import jax
import numpy as np
import pytest

from chimera.checkpoints import Checkpointer
from chimera.errors import ChimeraError
from chimera.steps import init_state
from chimera.train import TrainingDiverged, train

from conftest import ROOT


def run_main(*args, env_extra=None, **kwargs):
  env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env_extra or {})}
  return subprocess.run([sys.executable, "-m", "chimera.main", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300, **kwargs)


def final_params(config, workdir):
  checkpointer = Checkpointer(workdir / "checkpoints", keep=2)
  state, meta = checkpointer.restore(init_state(config))
  checkpointer.close()
  return state, meta


def losses(workdir):
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [(r["event"], r["step"], r.get("loss", r.get("val_loss"))) for r in records
          if r["event"] in ("train", "eval")]


@pytest.mark.parametrize("name", ["dense", "moe_top2"])
def test_entry_point_one_step(name, corpus, tmp_path):
  workdir = tmp_path / "run"
  result = run_main(f"--config=configs/{name}.py:tiny", f"--config.data.corpus={corpus}",
                    "--config.train.steps=1", "--config.train.warmup_steps=0",
                    f"--workdir={workdir}")
  assert result.returncode == 0, result.stderr
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["steps"] == 1 and summary["tokens_seen"] == 4 * 32
  for field in ("final_val_loss", "best_val_loss", "wall_seconds", "params_total",
                "params_active", "flops_per_token"):
    assert summary[field] is not None and summary[field] > 0, field
  assert np.isfinite(summary["final_val_loss"])
  assert ("expert_load" in summary) == (name != "dense")
  config = json.loads((workdir / "config.json").read_text())
  assert config["model"]["num_experts"] == (0 if name == "dense" else 8)
  assert list((workdir / "tensorboard").iterdir()), "no TensorBoard events"
  assert (workdir / "checkpoints" / "1").is_dir()
  assert str(workdir) in result.stderr  # says where the results are


@pytest.mark.parametrize("name", ["dense", "moe_top2"])
def test_resume_is_exact(name, make_config, corpus, tmp_path):
  config = make_config(name, corpus, train__steps=6)
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  summary = train(config, straight)
  first = train(config, resumed, stop_after=3)
  assert not first["completed"] and first["steps"] == 3
  second = train(config, resumed)

  (state_a, meta_a), (state_b, meta_b) = final_params(config, straight), final_params(config, resumed)
  assert int(state_a.step) == int(state_b.step) == 6
  chex.assert_trees_all_equal(state_a.params, state_b.params)
  chex.assert_trees_all_equal(state_a.opt_state, state_b.opt_state)
  assert meta_a["sampler"] == meta_b["sampler"]
  assert losses(straight) == losses(resumed)
  for field in ("final_val_loss", "best_val_loss", "steps", "tokens_seen"):
    assert summary[field] == second[field], field
  # Running a finished run again changes nothing and returns its summary.
  written = (straight / "summary.json").read_text()
  assert train(config, straight) == json.loads(written)
  assert (straight / "summary.json").read_text() == written


def test_sigterm_saves_and_resumes_exactly(make_config, corpus, tmp_path):
  steps = 300
  overrides = dict(train__steps=steps, train__checkpoint_every=1000, train__eval_every=1000,
                   train__log_every=1)
  config = make_config("moe_top2", corpus, **overrides)
  train(config, tmp_path / "straight")

  workdir = tmp_path / "killed"
  args = ["--config=configs/moe_top2.py:tiny", f"--config.data.corpus={corpus}",
          f"--workdir={workdir}"] + [f"--config.{k.replace('__', '.')}={v}"
                                     for k, v in overrides.items()]
  process = subprocess.Popen([sys.executable, "-m", "chimera.main", *args], cwd=ROOT,
                             stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONUNBUFFERED": "1"})
  for line in process.stderr:  # wait until training is under way
    if line.startswith("step") and "/300" in line:
      break
  process.send_signal(signal.SIGTERM)
  rest = process.stderr.read()
  assert process.wait(timeout=120) == 0, rest
  assert "stopped at step" in rest
  stopped_at = Checkpointer(workdir / "checkpoints", keep=2).latest_step()
  assert 0 < stopped_at < steps, "the run finished before the signal; raise `steps`"

  train(config, workdir)
  (state_a, _), (state_b, _) = final_params(config, tmp_path / "straight"), final_params(config, workdir)
  assert int(state_b.step) == steps
  chex.assert_trees_all_equal(state_a.params, state_b.params)


def test_bad_config_is_one_line_before_compiling(corpus, tmp_path):
  cases = {
      "--config.model.top_k=9": "config.model.top_k",
      "--config.model.capacity_factor=0": "config.model.capacity_factor",
      "--config.model.num_heads=3": "config.model.d_model",
      "--config.train.steps=0": "config.train.steps",
      "--config.train.context=1000": "config.train.context",
      "--config.data.corpus=/no/such/file.txt": "/no/such/file.txt",
      "--config.model.vocab_size=100": "vocab_size",
      "--config.model.num_expertz=4": "num_expertz",
  }
  for flag, expected in cases.items():
    args = ["--config=configs/moe_top2.py:tiny", f"--workdir={tmp_path / 'run'}"]
    if "corpus" not in flag:
      args.append(f"--config.data.corpus={corpus}")
    result = run_main(*args, flag)
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert result.returncode != 0, flag
    assert expected in result.stderr, (flag, result.stderr)
    assert "Traceback" not in result.stderr, (flag, result.stderr)
    if flag != "--config.model.num_expertz=4":  # absl's own error for unknown keys
      assert lines == [lines[-1]] and lines[-1].startswith("error: "), (flag, lines)


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


def test_nan_stops_and_keeps_last_good_checkpoint(make_config, corpus, tmp_path):
  config = make_config("dense", corpus, train__steps=20, train__learning_rate=1e12,
                       train__warmup_steps=0, train__checkpoint_every=1, train__log_every=1,
                       train__grad_clip=1e12)
  workdir = tmp_path / "run"
  with pytest.raises(TrainingDiverged, match=r"at step (\d+)") as error:
    train(config, workdir)
  bad_step = int(error.value.args[0].split("at step ")[1].split(";")[0])
  checkpointer = Checkpointer(workdir / "checkpoints", keep=2)
  assert checkpointer.latest_step() == bad_step - 1
  state, _ = checkpointer.restore(init_state(config))
  assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(state.params))
