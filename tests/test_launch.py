"""launch/workstation.sh and launch/slurm.sbatch: the mesh, devices and workdir they ask
chimera.main for, from the GPUs they may use; and every `python -m chimera...` tool's
handling of a bad flag and of a cache folder that cannot be one."""

import json
import os
import re
import subprocess
import sys
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
    ({}, 4, 1, "runs/moe_top2-gpu_4gpus"),
    ({"EXPERT": "2"}, 2, 2, "runs/moe_top2-gpu_4gpus"),
    ({"CUDA_VISIBLE_DEVICES": "1,3"}, 2, 1, "runs/moe_top2-gpu_2gpus"),
    ({"CUDA_VISIBLE_DEVICES": "2", "EXPERT": "1"}, 1, 1, "runs/moe_top2-gpu_1gpus"),
    # Another preset of the same file is another run: its own workdir.
    ({"CONFIG": "configs/moe_top2.py:gpu_large"}, 4, 1, "runs/moe_top2-gpu_large_4gpus"),
    ({"CONFIG": "configs/dense.py"}, 4, 1, "runs/dense_4gpus"),
])
def test_the_mesh_follows_the_visible_gpus(tmp_path, env_extra, data, expert, workdir):
  result = run_workstation(tmp_path, env_extra)
  assert result.returncode == 0, result.stderr
  args = result.stdout.split()
  assert args[:3] == ["-m", "chimera.main",
                      f"--config={env_extra.get('CONFIG', 'configs/moe_top2.py:gpu')}"]
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


def run_slurm(tmp_path, env_extra: dict) -> subprocess.CompletedProcess:
  """launch/slurm.sbatch as sbatch would run it on each node, with a fake srun that prints
  the device ids JAX will be given and the command."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir(exist_ok=True)
  (bin_dir / "srun").write_text('#!/bin/sh\necho "$JAX_LOCAL_DEVICE_IDS" "$@"\n')
  (bin_dir / "srun").chmod(0o755)
  env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "JAX_"))}
  env.update(PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_NNODES="2", **env_extra)
  return subprocess.run(["bash", str(ROOT / "launch" / "slurm.sbatch")], env=env,
                        capture_output=True, text=True, timeout=30, cwd=tmp_path)


def test_slurm_drives_every_gpu_of_each_node(tmp_path):
  # One process per node: JAX would give it only the GPU of its SLURM_LOCALID (0).
  result = run_slurm(tmp_path, {"SLURM_GPUS_PER_NODE": "h100:4", "EXPERT": "4"})
  assert result.returncode == 0, result.stderr
  ids, *args = result.stdout.split()
  assert ids == "0,1,2,3"
  assert args[:4] == ["python", "-m", "chimera.main", "--config=configs/moe_top2.py:gpu"]
  assert "--workdir=runs/moe_top2-gpu_slurm" in args
  assert "--config.mesh.data=2" in args and "--config.mesh.expert=4" in args
  # An expert count that does not divide the GPUs is refused before srun, in one line.
  result = run_slurm(tmp_path, {"SLURM_GPUS_PER_NODE": "8", "EXPERT": "3"})
  assert result.returncode == 2 and result.stdout == ""
  assert result.stderr.strip() == "EXPERT=3 does not divide 16 GPUs"


def test_gpu_check_fails_when_a_stage_fails_and_keeps_earlier_calls(tmp_path):
  """launch/gpu_check.sh, split across calls with STAGES into one OUT, with a fake python:
  a failed stage makes the call fail; a call whose train stages are all skipped (no time
  left) leaves the earlier call's train.json and runs; one whose train stages run writes
  their summaries; every call appends to the log."""
  out, runs = tmp_path / "out", tmp_path / "runs"
  out.mkdir()
  (out / "train.json").write_text('{"dense": {}}')
  (runs / "earlier").mkdir(parents=True)
  # The fake python: `python - ...` (the script's own heredoc) runs for real; chimera.main
  # leaves a summary.json in its workdir; anything else exits with FAKE_STATUS.
  fake = tmp_path / "python"
  fake.write_text(f"""#!/bin/sh
if [ "$1" = - ]; then exec {sys.executable} "$@"; fi
for arg; do case $arg in --workdir=*) dir=${{arg#--workdir=}};; esac; done
if [ "$2" = chimera.main ]; then mkdir -p "$dir" && echo '{{"steps": 6}}' > "$dir/summary.json"; fi
exit $FAKE_STATUS
""")
  fake.chmod(0o755)
  def run(status: int, **env):
    return subprocess.run(
        ["bash", str(ROOT / "launch" / "gpu_check.sh")], capture_output=True, text=True,
        timeout=60, env={**os.environ, "OUT": str(out), "RUNS": str(runs), "PYTHON": str(fake),
                         "FAKE_STATUS": str(status), "STUDY": "0", **env})
  failed = run(1, STAGES="numerics")
  assert failed.returncode == 1 and "== failed: numerics" in failed.stdout
  assert run(0, STAGES="numerics").returncode == 0
  skipped = run(0, STAGES="train", DEADLINE="1")
  assert skipped.returncode == 0 and "== skipped (no time left): train dense" in skipped.stdout
  assert (out / "train.json").read_text() == '{"dense": {}}'
  assert (runs / "earlier").is_dir()
  trained = run(0, STAGES="train_dense")
  assert trained.returncode == 0, trained.stdout
  assert json.loads((out / "train.json").read_text()) == {"dense": {"steps": 6}}
  assert not (runs / "earlier").exists()  # cleared before the first train stage that ran
  assert (out / "gpu_check.log").read_text().count("== gpu_check.sh, ") == 4


def test_every_command_line_tool_reports_a_bad_flag_in_one_line():
  """Every module that runs as `python -m` (found by its `app.run`, so a new tool is
  covered): an unknown flag is one line and exit status 2, not absl's FATAL and usage; so
  is a stray positional argument ("seeds=5", its "--" forgotten), which would otherwise be
  ignored: every tool but the one that takes a path parses with chimera.errors'
  `parse_flags`, which refuses it (run here for two of them), or, chimera.main, checks it
  itself."""
  sources = {".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__main__"):
             path.read_text() for path in (ROOT / "chimera").rglob("*.py")}
  tools = sorted(tool for tool, text in sources.items()
                 if re.search(r"^\s*app\.run\(", text, re.MULTILINE))
  assert {"chimera.main", "chimera.compare", "chimera.bench", "chimera.data"} <= set(tools)
  parser = {tool: re.search(r"flags_parser=(\w+)\)", sources[tool]).group(1) for tool in tools}
  assert {tool: name for tool, name in parser.items() if name != "parse_flags"} == {
      "chimera.bench_profile": "parse_flags_and_args"}
  assert all(re.search(r"^from chimera.errors import .*\bparse_flags\b", sources[tool], re.M)
             for tool in tools if tool not in ("chimera.bench_profile", "chimera.main"))
  required = {"chimera.main": ["--config=configs/dense.py"], "chimera.data": ["--corpus=x"]}
  cases = [(tool, "--no_such_flag=1", "error: Unknown command line flag 'no_such_flag'")
           for tool in tools]
  cases += [(tool, "seeds=5", "error: unexpected argument 'seeds=5' (flags start with --)")
            for tool in ("chimera.compare", "chimera.data", "chimera.main")]
  running = [(tool, expected, subprocess.Popen(
      [sys.executable, "-m", tool, *required.get(tool, []), arg], cwd=ROOT,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)) for tool, arg, expected in cases]
  for tool, expected, process in running:
    out, err = process.communicate(timeout=180)
    assert (process.returncode, err.strip().splitlines(), out) == (2, [expected], ""), tool


def test_a_cache_that_cannot_be_a_folder_is_one_line(tmp_path):
  """$CHIMERA_CACHE naming a file (or a path under one): every tool that reads or writes
  the cache says so in one line, exit status 2, before it does anything else."""
  a_file = tmp_path / "cache"
  a_file.write_text("")
  tools = [["chimera.main", "--config=configs/dense.py:tiny", f"--workdir={tmp_path / 'run'}"],
           ["chimera.evaluate", f"--workdir={tmp_path / 'run'}"],
           ["chimera.generate", f"--workdir={tmp_path / 'run'}"],
           ["chimera.compare", f"--runs={tmp_path / 'runs'}", f"--results={tmp_path / 'res'}"],
           ["chimera.bench", "--configs=configs/dense.py:tiny", "--decode_batches="],
           ["chimera.data", "--corpus=shakespeare"]]
  # As a user runs them: the compiled steps' cache in $CHIMERA_CACHE too, not the suite's.
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  for cache in (a_file, a_file / "below"):
    running = [(args[0], subprocess.Popen(
        [sys.executable, "-m", *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env={**env, "CHIMERA_CACHE": str(cache)})) for args in tools]
    for tool, process in running:
      out, err = process.communicate(timeout=180)
      assert (process.returncode, err.strip().splitlines()) == (2, [
          f"error: $CHIMERA_CACHE: {a_file} is a file, not a folder (the cache of downloads, "
          f"tokens and compiled steps: {cache})"]), (tool, err[-2000:])
  assert not (tmp_path / "run").exists() and not (tmp_path / "runs").exists()
