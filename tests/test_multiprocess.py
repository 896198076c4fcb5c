"""A real multi-process run on one machine: two processes on localhost, 4 fake CPU devices
each, started through `python -m chimera.main` as launch/slurm.sbatch starts it, with
jax.distributed and a coordinator on 127.0.0.1 (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
JAX_PROCESS_ID). The result must equal one process driving 8 devices."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import chex
import pytest

from chimera import config as config_lib
from chimera.checkpoints import Checkpointer
from chimera.records import RunSummary, read_events
from chimera.steps import init_state
from conftest import TEST_XLA_FLAGS

ROOT = Path(__file__).resolve().parents[1]
STEPS = 4


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def main_args(corpus: Path, workdir: Path, dispatch: str, grad_accum: int) -> list[str]:
  return [sys.executable, "-m", "chimera.main", "--config=configs/moe_top2.py:tiny",
          f"--config.data.corpus={corpus}", f"--workdir={workdir}",
          f"--config.model.dispatch={dispatch}", "--config.mesh.data=2",
          "--config.mesh.expert=4", "--config.train.batch_size=16",
          f"--config.train.grad_accum={grad_accum}",
          f"--config.train.steps={STEPS}", "--config.train.log_every=1",
          "--config.train.checkpoint_every=2"]


def launch(args: list[str], devices: int, processes: int) -> list[subprocess.CompletedProcess]:
  env = {**os.environ, "PYTHONUNBUFFERED": "1",
         "XLA_FLAGS": f"{TEST_XLA_FLAGS} --xla_force_host_platform_device_count={devices}"}
  if processes > 1:
    env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{free_port()}",
               JAX_NUM_PROCESSES=str(processes))
  running = [subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env={**env, "JAX_PROCESS_ID": str(i)})
             for i in range(processes)]
  results = []
  for process in running:
    out, err = process.communicate(timeout=600)
    results.append(subprocess.CompletedProcess(args, process.returncode, out, err))
  for result in results:
    assert result.returncode == 0, result.stderr[-3000:]
  return results


def restored(workdir: Path):
  config = config_lib.from_dict(json.loads((workdir / "config.json").read_text()))
  checkpointer = Checkpointer(workdir / "checkpoints", keep=2)
  state, _ = checkpointer.restore(init_state(config))  # 8-device checkpoint, one device here
  checkpointer.close()
  return state


@pytest.mark.slow
@pytest.mark.parametrize("dispatch,grad_accum", [("einsum", 1), ("dropless", 2)])
def test_two_processes_equal_one(dispatch, grad_accum, corpus, tmp_path):
  """With gradient accumulation (dropless, balanced over each micro-batch as moe_top2
  ships) each micro-batch must be the same rows on two processes as on one."""
  single, multi = tmp_path / "single", tmp_path / "multi"
  launch(main_args(corpus, single, dispatch, grad_accum), devices=8, processes=1)
  first, second = launch(main_args(corpus, multi, dispatch, grad_accum), devices=4, processes=2)

  # Only process 0 speaks and writes: one row per step, one summary.
  assert "step" in first.stderr and "done:" in first.stderr
  assert "step " not in second.stderr and "done:" not in second.stderr
  rows = read_events(multi, "train")
  assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
  assert RunSummary.load(multi).steps == STEPS
  expected = read_events(single, "train")
  assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in expected], rel=1e-5)
  # At step 1 the parameters are the same: the balancing loss (not linear over a micro-
  # batch) is the same to float rounding only if every micro-batch holds the same rows.
  assert rows[0]["load_balance_loss"] == pytest.approx(expected[0]["load_balance_loss"],
                                                       rel=1e-6)
  # The checkpoint both processes wrote restores in one process, equal to one process's.
  state_multi, state_single = restored(multi), restored(single)
  assert int(state_multi.step) == STEPS
  chex.assert_trees_all_close(state_multi.params, state_single.params, rtol=2e-4, atol=2e-5)
