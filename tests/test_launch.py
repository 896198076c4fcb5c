"""launch/workstation.sh: the mesh it asks chimera.main for, from the GPUs it may use."""

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_workstation(tmp_path, env_extra: dict, *args) -> subprocess.CompletedProcess:
  """Runs the script with a fake nvidia-smi (4 GPUs) and a fake python that prints its
  arguments, so nothing trains."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir(exist_ok=True)
  (bin_dir / "nvidia-smi").write_text(
      "#!/bin/sh\nfor i in 0 1 2 3; do echo \"GPU $i: NVIDIA H100 (UUID: GPU-$i)\"; done\n")
  (bin_dir / "python").write_text('#!/bin/sh\necho "$@"\n')
  for tool in bin_dir.iterdir():
    tool.chmod(0o755)
  env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
  env.update(PATH=f"{bin_dir}:{os.environ['PATH']}", **env_extra)
  return subprocess.run(["bash", str(ROOT / "launch" / "workstation.sh"), *args], env=env,
                        capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("env_extra, data, expert, workdir", [
    ({}, 4, 1, "runs/moe_top2-gpu4"),
    ({"EXPERT": "2"}, 2, 2, "runs/moe_top2-gpu4"),
    ({"CUDA_VISIBLE_DEVICES": "1,3"}, 2, 1, "runs/moe_top2-gpu2"),
    ({"CUDA_VISIBLE_DEVICES": "2", "EXPERT": "1"}, 1, 1, "runs/moe_top2-gpu1"),
])
def test_the_mesh_follows_the_visible_gpus(tmp_path, env_extra, data, expert, workdir):
  result = run_workstation(tmp_path, env_extra)
  assert result.returncode == 0, result.stderr
  args = result.stdout.split()
  assert args[:3] == ["-m", "chimera.main", "--config=configs/moe_top2.py:gpu"]
  assert f"--workdir={workdir}" in args
  assert f"--config.mesh.data={data}" in args and f"--config.mesh.expert={expert}" in args


@pytest.mark.parametrize("env_extra, message", [
    ({"CUDA_VISIBLE_DEVICES": ""}, "no GPU visible"),
    ({"CUDA_VISIBLE_DEVICES": "0,1,2", "EXPERT": "2"}, "EXPERT=2 does not divide 3 GPUs"),
])
def test_no_gpu_or_an_expert_count_that_does_not_divide_is_one_line(tmp_path, env_extra,
                                                                     message):
  result = run_workstation(tmp_path, env_extra)
  assert result.returncode == 2 and result.stdout == ""
  assert result.stderr.strip() == result.stderr.strip().splitlines()[0]
  assert message in result.stderr
