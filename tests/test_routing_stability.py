"""chimera.routing_stability: how far a run's routing moves between its checkpoints."""

import functools
import json
import shutil
import subprocess
import sys
import types

import flax
import jax
import numpy as np
import pytest

from chimera import evaluate, routing_stability
from chimera.config import ModelConfig
from chimera.decoder import Decoder
from chimera.errors import ChimeraError
from chimera.steps import eval_step
from chimera.train import train
from conftest import ROOT


def test_changed_counts_first_experts_and_sets():
  before = np.array([[[0, 1], [2, 3], [1, 0], [3, 2]]])  # [layers 1, tokens 4, k 2]
  after = np.array([[[1, 0], [2, 3], [1, 2], [0, 2]]])
  # token 0: first 0 -> 1, set {0,1} kept; token 2: first kept, set {0,1} -> {1,2};
  # token 3: both change.
  assert routing_stability.changed(before, after) == ((0.5,), (0.5,))
  assert routing_stability.changed(before, before) == ((0.0,), (0.0,))
  # A set that keeps one expert and changes the other has changed: {0, 1} -> {0, 2}.
  assert routing_stability.changed(np.array([[[0, 1], [0, 1]]]),
                                   np.array([[[0, 2], [0, 1]]])) == ((0.0,), (0.5,))


def test_token_share_is_one_for_a_lookup_and_zero_for_no_relation():
  tokens = np.repeat(np.arange(6), 40)
  lookup = tokens // 2  # 3 experts, each for two tokens
  assert routing_stability.token_share(lookup, tokens) == pytest.approx(1.0)
  unrelated = np.tile(np.arange(4), 60)  # every token sees the 4 experts equally often
  assert routing_stability.token_share(unrelated, tokens) == pytest.approx(0.0, abs=1e-12)
  # Half the entropy: the token picks one of two pairs of experts, and within the pair
  # the choice is even (H(first) = log 4, H(first | token) = log 2).
  half = 2 * (tokens % 2) + np.tile([0, 1], 120)
  assert routing_stability.token_share(half, tokens) == pytest.approx(0.5)
  assert np.isnan(routing_stability.token_share(np.zeros(10, int), np.arange(10)))
  choices = np.stack([np.stack([lookup, lookup], -1), np.stack([unrelated, lookup], -1)])
  by_token, shuffled = routing_stability.token_shares(choices, tokens)
  assert by_token == pytest.approx((1.0, 0.0), abs=1e-12)
  permuted = np.random.default_rng(0).permutation(tokens)
  assert shuffled == (routing_stability.token_share(lookup, permuted),
                      routing_stability.token_share(unrelated, permuted))
  assert 0 < shuffled[0] < 0.1 and shuffled[1] < 0.1  # the counts' bias: small, not nil


def test_json_keeps_the_fields_in_order_and_writes_nan_as_null():
  result = routing_stability.Report(
      [routing_stability.Change(3, 6, (0.5,), (0.25,), (0.125,))],
      [routing_stability.TokenShare(3, (float("nan"),), (0.0,))])
  assert json.loads(routing_stability.to_json(result)) == {
      "changes": [{"before": 3, "after": 6, "first_expert": [0.5], "expert_set": [0.25],
                   "expert_set_router_held": [0.125]}],
      "token_shares": [{"step": 3, "by_token": [None], "shuffled": [0.0]}]}
  assert list(json.loads(routing_stability.to_json(result))["changes"][0]) == [
      "before", "after", "first_expert", "expert_set", "expert_set_router_held"]


@pytest.fixture(scope="module")
def biased_run(tmp_path_factory, write_corpus):
  """A tiny moe_top2 run with the balancing bias on (it chooses too), three checkpoints."""
  from conftest import make_config
  folder = tmp_path_factory.mktemp("routing")
  config = make_config("moe_top2", write_corpus(folder / "corpus.txt"), train__steps=9,
                       train__checkpoint_every=3, train__keep_checkpoints=5,
                       model__router_bias_rate=0.01)
  train(config, folder / "run")
  return folder / "run"


def test_choices_are_the_layers_routing_and_changes_follow_the_checkpoints(biased_run):
  """The choices, counted per expert, are the expert loads the evaluation step reports
  from the MoE layers themselves (bias included); a checkpoint against itself changes
  nothing; and the run's steps pair up in order."""
  config, state, _ = evaluate.restore_run(biased_run)
  assert any(np.asarray(leaf).any() for leaf in
             jax.tree.leaves(state.model_state["router_bias"]))  # the bias has moved
  from chimera.train import prepare_data
  tokens = prepare_data(config).val_batches
  choices = routing_stability.expert_choices(config, state.params, state.model_state, tokens)
  layers, k, num_experts = 2, config.model.top_k, config.model.num_experts
  assert choices.shape == (layers, tokens.shape[0] * tokens.shape[1] * (tokens.shape[2] - 1), k)
  load = np.stack([np.bincount(layer.ravel(), minlength=num_experts) / layer.size
                   for layer in choices])
  step = jax.jit(functools.partial(eval_step, model=Decoder(config.model),
                                   config=config.model))
  reported = np.mean([np.asarray(step(state.params, state.model_state, batch)["expert_load"])
                      for batch in tokens], axis=0)
  np.testing.assert_allclose(load, reported, atol=1e-6)
  assert routing_stability.changed(choices, choices) == ((0.0,) * layers, (0.0,) * layers)
  # The later model through the earlier routers: their weights and bias are step 3's,
  # every other weight step 9's.
  _, earlier, _ = evaluate.restore_run(biased_run, step=3)
  params, model_state = routing_stability.with_routers_of(
      state.params, state.model_state, earlier.params, earlier.model_state)
  flat = lambda tree: flax.traverse_util.flatten_dict(flax.core.unfreeze(tree))
  routers = 0
  for path, leaf in flat(params).items():
    source = earlier if "router" in path else state
    routers += "router" in path
    np.testing.assert_array_equal(leaf, flat(source.params)[path])
  assert routers == layers
  assert model_state["router_bias"] is earlier.model_state["router_bias"]
  assert model_state.keys() == state.model_state.keys()
  assert all(model_state[key] is state.model_state[key] for key in model_state
             if key != "router_bias")
  # Choices come sequence by sequence in the order of input_tokens: reversing the
  # sequences of a batch reverses the blocks of their choices.
  one = tokens[:1]
  length = one.shape[2] - 1
  forward = routing_stability.expert_choices(config, state.params, state.model_state, one)
  backward = routing_stability.expert_choices(config, state.params, state.model_state,
                                              one[:, ::-1])
  blocks = lambda choices: choices.reshape(layers, -1, length, k)
  np.testing.assert_array_equal(blocks(backward), blocks(forward)[:, ::-1])
  np.testing.assert_array_equal(routing_stability.input_tokens(one[:, ::-1]).reshape(-1, length),
                                one[0, ::-1, :-1])
  # Over several batches: batch after batch, in both.
  assert tokens.shape[0] >= 2
  two = tokens[:2]
  np.testing.assert_array_equal(
      routing_stability.expert_choices(config, state.params, state.model_state, two),
      np.concatenate([routing_stability.expert_choices(config, state.params,
                                                       state.model_state, two[i:i + 1])
                      for i in (0, 1)], axis=1))
  np.testing.assert_array_equal(routing_stability.input_tokens(two),
                                np.concatenate([two[0, :, :-1].ravel(),
                                                two[1, :, :-1].ravel()]))
  result = routing_stability.report(biased_run, batches=1)
  changes = result.changes
  assert [(c.before, c.after) for c in changes] == [(3, 6), (6, 9)]
  assert [s.step for s in result.token_shares] == [3, 6, 9]
  ids = routing_stability.input_tokens(tokens[:1])
  first = routing_stability.expert_choices(config, state.params, state.model_state,
                                           tokens[:1])
  assert result.token_shares[-1].by_token == routing_stability.token_shares(first, ids)[0]
  assert all(0 <= f <= 1 and 0 <= s <= 1 and 0 <= h <= 1 for c in changes
             for f, s, h in zip(c.first_expert, c.expert_set, c.expert_set_router_held))
  assert any(s > 0 for c in changes for s in c.expert_set)  # 9 steps of training do move it


def test_command_prints_and_writes_the_changes_and_refuses_in_one_line(biased_run, tmp_path,
                                                                       make_config, corpus):
  out = tmp_path / "made" / "changes.json"  # its folder is made
  tool = lambda *args: subprocess.run([sys.executable, "-m", "chimera.routing_stability",
                                       *args], cwd=ROOT, capture_output=True, text=True,
                                      timeout=300)
  result = tool(f"--workdir={biased_run}", "--batches=1", f"--json={out}")
  assert result.returncode == 0, result.stderr[-2000:]
  lines = result.stdout.splitlines()
  assert lines[0].startswith("steps | MoE layer 0: first expert, expert set changed")
  assert [line.split(" |")[0] for line in lines[1:3]] == ["3 -> 6", "6 -> 9"]
  assert lines[3] == ""
  assert lines[4].startswith("step | MoE layer 0: first expert's entropy the token determines")
  assert [line.split(" |")[0] for line in lines[5:]] == ["3", "6", "9"]
  written = json.loads(out.read_text())
  expected = routing_stability.report(biased_run, batches=1)
  assert [(c["before"], c["after"]) for c in written["changes"]] == [(3, 6), (6, 9)]
  assert written["changes"] == [dataclass_dict(c) for c in expected.changes]
  assert written["token_shares"] == [dataclass_dict(s) for s in expected.token_shares]
  dense = tmp_path / "dense"
  train(make_config("dense", corpus, train__steps=3, train__checkpoint_every=3), dense)
  bad = tool(f"--workdir={dense}")
  assert (bad.returncode, bad.stdout, bad.stderr.strip().splitlines()) == (2, "", [
      f"error: --workdir: {dense} holds a dense run (model.num_experts=0): nothing is routed"])


def test_a_moved_corpus_is_read_from_its_new_path(biased_run, tmp_path):
  """As chimera.evaluate: the error says how to point at the moved corpus, and --corpus
  reads it (the same text: the same report)."""
  run = tmp_path / "run"
  shutil.copytree(biased_run, run)
  recorded = json.loads((run / "config.json").read_text())
  corpus = recorded["data"]["corpus"]
  recorded["data"]["corpus"] = str(tmp_path / "gone.txt")  # where it was when it trained
  (run / "config.json").write_text(json.dumps(recorded))
  with pytest.raises(ChimeraError, match=r"gone\.txt \(if the run's corpus moved, pass its new "
                                         r"path: --corpus=PATH\)$"):
    routing_stability.report(run, batches=1)
  moved = shutil.copy(corpus, tmp_path / "moved.txt")
  assert (routing_stability.report(run, batches=1, corpus=str(moved))
          == routing_stability.report(biased_run, batches=1))


def test_one_checkpoint_is_not_enough(biased_run, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(biased_run, workdir)
  for step in (3, 6):
    shutil.rmtree(workdir / "checkpoints" / str(step))
  with pytest.raises(ChimeraError, match=r"holds one checkpoint \(step 9\); routing changes "
                                         r"need two"):
    routing_stability.report(workdir)


def dataclass_dict(change) -> dict:
  import dataclasses
  return {key: list(value) if isinstance(value, tuple) else value
          for key, value in dataclasses.asdict(change).items()}


def test_the_routers_held_column_holds_the_earlier_routers(biased_run, monkeypatch):
  """expert_set_router_held compares the earlier checkpoint's choices with the later model
  routed by the earlier routers: with the whole earlier model held it is 0, and with
  nothing held (the later model whole) it is the expert-set column."""
  real = routing_stability.report(biased_run, batches=1)
  monkeypatch.setattr(routing_stability, "with_routers_of",
                      lambda params, state, earlier_params, earlier_state: (earlier_params,
                                                                           earlier_state))
  whole_earlier = routing_stability.report(biased_run, batches=1)
  assert all(h == 0.0 for c in whole_earlier.changes for h in c.expert_set_router_held)
  monkeypatch.setattr(routing_stability, "with_routers_of",
                      lambda params, state, earlier_params, earlier_state: (params, state))
  nothing = routing_stability.report(biased_run, batches=1)
  assert ([c.expert_set_router_held for c in nothing.changes]
          == [c.expert_set for c in real.changes])
  assert any(s > 0 for c in real.changes for s in c.expert_set)


def test_routing_stability_orders_the_layers_by_depth_past_ten_blocks():
  """expert_choices lists the MoE layers in depth order: with MoE blocks 2 and 10 (block_10
  sorts before block_2 as text), each layer's choices, counted per expert, are the expert
  loads that the layers themselves report, layer for layer."""
  cfg = ModelConfig(vocab_size=11, num_layers=11, num_heads=2, d_model=8, d_ff=16,
                    max_len=16, num_experts=4, top_k=1, expert_d_ff=16,
                    first_moe_layer=2, moe_every=8)
  assert [i for i in range(11) if cfg.is_moe_layer(i)] == [2, 10]
  tokens = np.random.default_rng(4).integers(0, 11, size=(1, 4, 9)).astype(np.int32)
  params = Decoder(cfg).init(jax.random.key(0), tokens[0, :, :-1])["params"]
  choices = routing_stability.expert_choices(types.SimpleNamespace(model=cfg), params, {},
                                             tokens)  # [Y, T, K]
  _, stats = jax.jit(functools.partial(Decoder(cfg).apply, deterministic=True))(
      {"params": params}, tokens[0, :, :-1])
  reported = np.asarray(stats["expert_load"])  # [Y, E], depth order
  assert not np.allclose(reported[0], reported[1])  # the two layers route differently
  counted = np.stack([np.bincount(layer.ravel(), minlength=4) / layer.size for layer in choices])
  np.testing.assert_allclose(counted, reported, atol=1e-6)
