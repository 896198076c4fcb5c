"""Expert parallelism on 8 fake CPU devices, each case in its own process: the dropless
exchange of chimera/expert_parallel.py against one device, and the collectives of the
compiled train step (issue 13).

The send plan of the exchange is also checked here in-process, on one device, by hand.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from chimera import scaling, scaling_hlo
from chimera.expert_parallel import received_experts, send_plan
from chimera.routers import ROUTERS
from conftest import TEST_XLA_FLAGS
from test_sharding import assert_same_training

ROOT = Path(__file__).resolve().parents[1]
DRIVER = ROOT / "tests" / "expert_parallel_run.py"
TRAIN_DRIVER = ROOT / "tests" / "multidevice_run.py"
STEPS = 4


def run(args: list[str]) -> None:
  result = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "XLA_FLAGS": TEST_XLA_FLAGS})
  assert result.returncode == 0, result.stderr[-3000:]


def test_send_plan_by_hand():
  # 3 tokens, K = 2, E = 4 experts on X = 2 devices (experts 0, 1 on device 0; 2, 3 on 1),
  # C = 4 slots per destination.
  expert_index = jnp.array([[2, 0], [1, 3], [3, 2]])  # choices a = 0..5: 2 0 1 3 3 2
  plan = send_plan(expert_index, num_experts=4, num_devices=2, rows_per_destination=4)
  # Sorted by expert: a=1 (e0), a=2 (e1) | a=0 (e2), a=5 (e2), a=3 (e3), a=4 (e3).
  np.testing.assert_array_equal(plan.counts, [[1, 1], [2, 2]])
  # Device 0 gets two rows and two padding slots (6: no choice), device 1 four rows.
  np.testing.assert_array_equal(plan.choice_of_slot, [1, 2, 6, 6, 0, 5, 3, 4])
  np.testing.assert_array_equal(plan.slot_of_choice, [4, 0, 1, 6, 7, 5])
  # A device that receives counts [1, 1] from source 0 and [2, 2] from source 1: each
  # source's rows sorted by local expert, then padding (local expert 2: none).
  np.testing.assert_array_equal(received_experts(jnp.array([[1, 1], [2, 2]]), 4),
                                [0, 1, 2, 2, 0, 0, 1, 1])


@pytest.mark.slow
@pytest.mark.parametrize("data, expert", [(2, 4), (1, 8)])
def test_layer_on_a_mesh_equals_one_device(data, expert, tmp_path):
  """Outputs and gradients (router, experts, input) of the MoE layer, dropless and einsum,
  including a routing that sends every row to one device and fills its buffer exactly, and
  the training noise on the choice (model.router_noise), drawn the same on every mesh."""
  out = tmp_path / "layer.npz"
  run([DRIVER, "layer", data, expert, out])
  results = np.load(out)
  singles = [name for name in results.files if "/single/" in name]
  assert singles and ({name.replace("/single/", "/sharded/") for name in singles}
                      == {name for name in results.files if "/sharded/" in name})
  for name in singles:
    single, sharded = results[name], results[name.replace("/single/", "/sharded/")]
    np.testing.assert_allclose(sharded, single, rtol=1e-5,
                               atol=1e-5 * float(np.abs(single).max()), err_msg=name)
  # Really exchanged: dropless, counts, rows and results forward, two transposes backward;
  # einsum, dispatch and combine, forward and backward. Every registered router has a case
  # on each path (expert_parallel_run.CASES).
  cases = {name.split("/")[0] for name in singles}
  assert {"dropless_k2", "dropless_k1_swiglu", "dropless_k2_skewed", "einsum_k2",
          "dropless_k2_noise", "einsum_k2_noise"} <= cases
  assert len(cases) == 6 + 2 * (len(ROUTERS) - 1)
  for case in cases:
    assert int(results[f"{case}/all_to_alls"]) == (5 if case.startswith("dropless") else 4), case
    # Each device routes its own tokens: nothing that grows with the batch is gathered or
    # reduced (a router's plain jax.lax.top_k would all-gather the logits here).
    assert int(results[f"{case}/token_sized"]) == 0, case


def train(tmp_path, name: str, devices: int, data: int, expert: int, corpus, dispatch: str):
  workdir = tmp_path / name
  run([TRAIN_DRIVER, devices, data, expert, workdir, corpus, STEPS, 0, dispatch])
  return dict(np.load(workdir / "result.npz"))


@pytest.fixture(scope="module")
def single_device_run(tmp_path_factory, write_corpus):
  tmp = tmp_path_factory.mktemp("single")
  corpus = write_corpus(tmp / "corpus.txt")
  return corpus, train(tmp, "dropless", 1, 1, 1, corpus, "dropless")


@pytest.mark.slow
@pytest.mark.parametrize("data, expert", [(2, 4), (1, 8)])
def test_dropless_training_on_a_mesh_equals_one_device(data, expert, single_device_run,
                                                       tmp_path):
  """Dropless through shard_map; tests/test_sharding.py runs the einsum path."""
  corpus, reference = single_device_run
  result = train(tmp_path, f"dropless{data}x{expert}", 8, data, expert, corpus, "dropless")
  assert_same_training(result, reference)
  assert int(result["experts_per_device"]) == 8 // expert


_HLO = {}


def compiled_step(dispatch: str, tmp_path_factory) -> dict:
  """tests/expert_parallel_run.py hlo, once per dispatch for this module."""
  if dispatch not in _HLO:
    out = tmp_path_factory.mktemp("hlo") / f"{dispatch}.json"
    run([DRIVER, "hlo", dispatch, out])
    _HLO[dispatch] = json.loads(out.read_text())
  return _HLO[dispatch]


@pytest.mark.slow
@pytest.mark.parametrize("dispatch", ["einsum", "dropless"])
def test_compiled_step_moves_tokens_by_all_to_all(dispatch, tmp_path_factory):
  """configs/moe_top2.py:tiny, 32 x 64 tokens, groups of 64, on 1 x 8: the all-to-alls
  are there and carry what chimera.scaling's formula says."""
  report = compiled_step(dispatch, tmp_path_factory)
  # Per MoE layer: einsum 2 forward + 2 backward; dropless also the counts.
  assert len(report["all_to_alls"]) == {"einsum": 8, "dropless": 10}[dispatch]
  assert sum(c["bytes"] for c in report["all_to_alls"]) == report["predicted_all_to_all_bytes"]


@pytest.mark.slow
@pytest.mark.parametrize("dispatch", ["einsum", "dropless"])
def test_compiled_step_gathers_nothing_token_sized(dispatch, tmp_path_factory):
  """No all-gather or all-reduce whose arrays grow with the batch (routing, masks,
  activations, token ids); parameter gradients keep their shapes and may be all-reduced."""
  report = compiled_step(dispatch, tmp_path_factory)
  assert report["token_sized"] == []
  # The parser does see the other collectives: the replicated weights' gradients are
  # all-reduced over the 8 devices. (test_token_sized_finds_what_grows checks the rule.)
  assert report["other_collectives"] > 0


def test_token_sized_finds_what_grows():
  """chimera.scaling_hlo.token_sized on hand-written HLO: an all-gather that doubles with
  the batch is reported (its async -start form too); a parameter's all-reduce that keeps
  its shape, and all-to-alls, are not."""
  def module(rows):
    return "\n".join([
        '  %ar = f32[64,32]{1,0} all-reduce(f32[64,32]{1,0} %g), metadata={op_name="wi_grad"}',
        f'  %ag = (f32[{rows},16]{{1,0}}, f32[{rows},16]{{1,0}}) all-gather-start(f32[1,16] %x), '
        'metadata={op_name="routing/gather"}',
        f'  %a2a = f32[{rows},8]{{1,0}} all-to-all(f32[{rows},8]{{1,0}} %t), metadata={{op_name="dispatch"}}'])
  assert [c.kind for c in scaling.collectives(module(4))] == ["all-reduce", "all-gather",
                                                             "all-to-all"]
  assert scaling_hlo.token_sized(module(4), module(4)) == []
  assert scaling_hlo.token_sized(module(4), module(8)) == [
      ("all-gather", "f32[8,16]", "routing/gather"), ("all-gather", "f32[8,16]", "routing/gather")]


def test_formula_and_notes_of_the_scaling_tools(make_config, corpus):
  """A dense model on an expert axis exchanges nothing (the formula divided by
  num_experts = 0); a bfloat16 model whose compiled all-to-alls carry float32 (XLA:CPU
  widens them) gets a note, not a silent factor of two."""
  dense = make_config("dense", corpus, mesh__data=2, mesh__expert=4, train__batch_size=8)
  assert scaling.predicted_bytes(dense) == 0.0
  moe = make_config("moe_top2", corpus, mesh__data=2, mesh__expert=4, train__batch_size=8,
                    model__dtype="bfloat16")
  assert scaling.predicted_bytes(moe) > 0
  widened = '  %a2a = f32[1,512,32]{2,1,0} all-to-all(f32[1,512,32]{2,1,0} %t), metadata={op_name="x"}'
  counts = '  %n = s32[1,1]{1,0} all-to-all(s32[1,1]{1,0} %c), metadata={op_name="counts"}'
  kept = widened.replace("f32", "bf16")
  assert "twice the formula's bytes" in scaling.upcast_note(moe, "\n".join([counts, widened]))
  assert scaling.upcast_note(moe, "\n".join([counts, kept])) is None
  float32 = make_config("moe_top2", corpus, mesh__data=2, mesh__expert=4, train__batch_size=8)
  assert scaling.upcast_note(float32, widened) is None


@pytest.mark.parametrize("module", ["chimera.scaling", "chimera.scaling_hlo"])
def test_scaling_tools_parse_their_flags(module):
  """Their flags are defined only when they run (chimera.scaling.define_flags)."""
  result = subprocess.run([sys.executable, "-m", module, "--helpshort"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
  assert "Traceback" not in result.stderr, result.stderr[-2000:]  # absl's help exits 1
  for flag in ("--config", "--mesh", "--set"):
    assert flag in result.stdout, (flag, result.stdout)
