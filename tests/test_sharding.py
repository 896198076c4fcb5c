"""Data and expert parallelism on 8 fake CPU devices (each run in its own process)."""

import json
import os
import subprocess
import sys

from pathlib import Path

import numpy as np
import pytest

from chimera import config as config_lib, sharding
from conftest import TEST_XLA_FLAGS
from chimera.errors import ChimeraError

ROOT = Path(__file__).resolve().parents[1]
DRIVER = ROOT / "tests" / "multidevice_run.py"
STEPS = 4


def run(tmp_path, name, devices, data, expert, corpus, stop_after=None, workdir=None):
  workdir = workdir or tmp_path / name
  # The einsum (GSPMD) path; tests/test_expert_parallel.py runs dropless on a mesh.
  args = [sys.executable, str(DRIVER), str(devices), str(data), str(expert), str(workdir),
          str(corpus), str(STEPS), str(stop_after or 0), "einsum"]
  result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "XLA_FLAGS": TEST_XLA_FLAGS})
  assert result.returncode == 0, result.stderr[-3000:]
  return dict(np.load(workdir / "result.npz"))


@pytest.fixture(scope="module")
def single_device(tmp_path_factory, write_corpus):
  tmp = tmp_path_factory.mktemp("single")
  corpus = write_corpus(tmp / "corpus.txt")
  return corpus, run(tmp, "reference", 1, 1, 1, corpus)


def assert_same_training(result, reference):
  assert int(result["step"]) == int(reference["step"]) == STEPS
  np.testing.assert_allclose(result["last_loss"], reference["last_loss"], rtol=1e-5)
  params = sorted(name for name in reference if name.startswith("params/"))
  assert params == sorted(name for name in result if name.startswith("params/"))
  assert "params/pos_embed" in params and "params/block_0/moe/wi" in params  # top level too
  for name in params:
    np.testing.assert_allclose(result[name], reference[name], rtol=2e-4, atol=2e-5,
                               err_msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("data, expert", [(2, 4), (8, 1), (1, 8)])
def test_sharded_training_equals_single_device(data, expert, single_device, tmp_path):
  corpus, reference = single_device
  result = run(tmp_path, f"mesh{data}x{expert}", 8, data, expert, corpus)
  assert_same_training(result, reference)
  # The expert weights really are split: E / mesh.expert experts on each device, and as
  # many different pieces as the expert axis has devices (a replicated array has one).
  assert int(result["experts_per_device"]) == 8 // expert
  assert int(result["distinct_shards"]) == expert


@pytest.mark.slow
def test_checkpoint_moves_from_8_to_4_to_1_devices(single_device, tmp_path):
  corpus, reference = single_device
  workdir = tmp_path / "moving"
  first = run(tmp_path, "", 8, 2, 4, corpus, stop_after=2, workdir=workdir)
  assert int(first["step"]) == 2
  second = run(tmp_path, "", 4, 1, 4, corpus, stop_after=1, workdir=workdir)
  assert int(second["step"]) == 3
  final = run(tmp_path, "", 1, 1, 1, corpus, workdir=workdir)
  assert_same_training(final, reference)


def test_bad_mesh_is_rejected(make_config, corpus):
  config = make_config("moe_top2", corpus, mesh__data=2, mesh__expert=2, train__batch_size=8)
  with pytest.raises(ChimeraError, match=r"config.mesh: data=2 x expert=2 = 4 devices, but 8"):
    sharding.check_mesh(config, device_count=8)
  config = make_config("moe_top2", corpus, mesh__data=1, mesh__expert=3, model__num_experts=8)
  with pytest.raises(ChimeraError, match="num_experts=8 is not divisible by config.mesh.expert=3"):
    sharding.check_mesh(config, device_count=3)
  config = make_config("moe_top2", corpus, mesh__data=8, train__batch_size=4)
  with pytest.raises(ChimeraError, match="cannot be split over 8 devices: make batch_size / "
                                         "grad_accum a multiple of 8, or use fewer devices"):
    sharding.check_mesh(config, device_count=8)
  # It is each micro-batch that is split: 16 sequences in 4 micro-batches of 4.
  config = make_config("moe_top2", corpus, mesh__data=8, train__batch_size=16,
                       train__grad_accum=4)
  with pytest.raises(ChimeraError, match="micro-batch of 4 sequences cannot be split over 8"):
    sharding.check_mesh(config, device_count=8)
  # ...over every device, the expert axis's too: 6 sequences on 2 x 2 devices.
  config = make_config("moe_top2", corpus, mesh__data=2, mesh__expert=2, train__batch_size=6)
  with pytest.raises(ChimeraError, match="micro-batch of 6 sequences cannot be split over 4"):
    sharding.check_mesh(config, device_count=4)


def test_a_mesh_smaller_than_the_gpus_says_how_to_use_them(make_config, corpus, monkeypatch):
  """On a GPU machine a mesh.data given for fewer devices than there are says how to use
  them all, or fewer; a mesh larger than the machine has nothing to suggest."""
  monkeypatch.setattr(sharding.jax, "default_backend", lambda: "gpu")
  config = make_config("moe_top2", corpus, mesh__data=2, train__batch_size=8)
  with pytest.raises(ChimeraError, match=r"= 2 devices, but 4 are available \(leave "
                                         r"config\.mesh\.data unset to use every device, or "
                                         r"make only the ones to use visible: "
                                         r"CUDA_VISIBLE_DEVICES\)$"):
    sharding.check_mesh(config, device_count=4)
  with pytest.raises(ChimeraError, match=r"= 2 devices, but 1 is available$"):
    sharding.check_mesh(config, device_count=1)
  one = make_config("moe_top2", corpus, mesh__data=1)
  with pytest.raises(ChimeraError, match=r"data=1 x expert=1 = 1 device, but 2 are available"):
    sharding.check_mesh(one, device_count=2)


def test_an_unset_data_axis_is_every_device_the_expert_axis_leaves(make_config, corpus):
  """mesh.data unset (the default) resolves to device count / mesh.expert, so one command
  trains on one CPU or on every GPU of a machine; the devices-dependent checks run once it
  is known."""
  config = make_config("moe_top2", corpus, train__batch_size=8)
  assert config.mesh.data is None and config.mesh.expert == 1
  assert sharding.resolve_mesh(config, 1).mesh == config_lib.MeshConfig(data=1, expert=1)
  assert sharding.resolve_mesh(config, 8).mesh == config_lib.MeshConfig(data=8, expert=1)
  split = make_config("moe_top2", corpus, train__batch_size=8, mesh__expert=2)
  assert sharding.resolve_mesh(split, 8).mesh == config_lib.MeshConfig(data=4, expert=2)
  with pytest.raises(ChimeraError, match=r"^config\.mesh\.expert=2 does not divide the 3 "):
    sharding.resolve_mesh(split, 3)
  with pytest.raises(ChimeraError, match=r"^config\.mesh\.expert=2 does not divide the 1 device "):
    sharding.resolve_mesh(split, 1)
  with pytest.raises(ChimeraError, match="a micro-batch of 8 sequences cannot be split over 16"):
    sharding.resolve_mesh(config, 16)
  # A routing group of 4 sequences (of 32 tokens) fits one device's 8 sequences at 2
  # devices, not its 2 at 8.
  grouped = make_config("moe_top2", corpus, train__batch_size=16, model__group_size=4 * 32)
  assert sharding.resolve_mesh(grouped, 2).mesh.data == 2
  with pytest.raises(ChimeraError, match=r"^config\.model\.group_size: 128 does not divide "
                                         r"the 64 tokens of a micro-batch on one device"):
    sharding.resolve_mesh(grouped, 8)
  # A mesh given whole is checked as it was.
  fixed = make_config("moe_top2", corpus, train__batch_size=8, mesh__data=2)
  assert sharding.resolve_mesh(fixed, 2) == fixed


@pytest.mark.slow
def test_the_default_mesh_trains_on_every_device(corpus, tmp_path):
  """The README's command with no mesh flag, on 2 (fake CPU) devices: data-parallel over
  both, and config.json records the mesh it resolved to."""
  result = subprocess.run(
      [sys.executable, "-m", "chimera.main", "--config=configs/moe_top2.py:tiny",
       f"--config.data.corpus={corpus}", "--config.train.steps=2",
       "--config.train.warmup_steps=1", f"--workdir={tmp_path / 'run'}"],
      cwd=ROOT, capture_output=True, text=True, timeout=300,
      env={**os.environ, "XLA_FLAGS": f"{TEST_XLA_FLAGS} "
                                      f"--xla_force_host_platform_device_count=2"})
  assert result.returncode == 0, result.stderr[-3000:]
  recorded = json.loads((tmp_path / "run" / "config.json").read_text())["mesh"]
  assert recorded == {"data": 2, "expert": 1}
  assert json.loads((tmp_path / "run" / "summary.json").read_text())["config"]["mesh"] == recorded


@pytest.mark.parametrize("env, expected", [
    ({}, False),
    ({"SLURM_NTASKS": "1"}, False),
    ({"SLURM_NTASKS": "4"}, True),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "2",
      "JAX_PROCESS_ID": "1"},
     dict(coordinator_address="10.0.0.1:1234", num_processes=2, process_id=1)),
])
def test_distributed_starts_only_when_the_environment_says_so(env, expected, monkeypatch):
  import jax
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append(k))
  for name in ("SLURM_NTASKS", "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    monkeypatch.delenv(name, raising=False)
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  sharding.initialize_distributed()
  assert bool(calls) == bool(expected)
  if isinstance(expected, dict):
    assert calls == [expected]


def test_a_partial_coordinator_environment_is_one_line(monkeypatch):
  monkeypatch.delenv("SLURM_NTASKS", raising=False)
  monkeypatch.delenv("JAX_PROCESS_ID", raising=False)
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1234")
  monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
  with pytest.raises(ChimeraError, match="^JAX_COORDINATOR_ADDRESS is set but JAX_PROCESS_ID is not"):
    sharding.initialize_distributed()
