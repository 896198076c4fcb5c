"""The study pipeline on the tiny preset: train, bench, report."""

import json

import pytest

from chimera import bench, compare, report
from chimera.errors import ChimeraError


def test_study_writes_report_plots_and_summary(make_config, corpus, tmp_path):
  models = [("dense", make_config("dense", corpus, train__steps=4)),
            ("moe_top2", make_config("moe_top2", corpus, train__steps=4))]
  runs = compare.train_all(models, seeds=[0, 1], root=tmp_path / "runs")
  assert [r.seed for r in runs["dense"]] == [0, 1]
  # Different seeds give different runs; the same seed on two models the same tokens.
  assert runs["dense"][0].summary["final_val_loss"] != runs["dense"][1].summary["final_val_loss"]

  speed = bench.run(models, repeats=1, settings=bench.Settings(
      steps=2, prompt_len=4, new_tokens=4, decode_batches=(1,)))
  out = tmp_path / "results"
  summary = report.write(out, title="tiny study", models=models, runs=runs, speed=speed,
                         command="pytest")
  for name in ("REPORT.md", "summary.json", "loss_vs_tokens.png", "loss_vs_time.png",
               "expert_load.png", "throughput.png"):
    assert (out / name).stat().st_size > 0, name
  written = json.loads((out / "summary.json").read_text())["models"]
  assert written == json.loads(json.dumps(summary))
  losses = [r.summary["final_val_loss"] for r in runs["moe_top2"]]
  assert written["moe_top2"]["final_val_loss"]["per_seed"] == pytest.approx(losses)
  assert written["moe_top2"]["params_active"] < written["moe_top2"]["params_total"]
  assert len(written["moe_top2"]["expert_load"]) == 2  # tiny has 2 MoE layers
  text = (out / "REPORT.md").read_text()
  assert "## Findings" in text and "moe_top2" in text
  assert f"{written['dense']['final_val_loss']['mean']:.4f}" in text

  # A second study over the same runs trains nothing again.
  before = (tmp_path / "runs").stat().st_mtime_ns, sorted(p.name for p in (tmp_path / "runs").iterdir())
  compare.train_all(models, seeds=[0], root=tmp_path / "runs")
  assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == before[1]


def test_sweep_models_vary_one_field(corpus):
  models = compare.sweep_models("configs/moe_top2.py", "tiny", "model.num_experts=2,4",
                                {"data.corpus": str(corpus)})
  assert [name for name, _ in models] == ["num_experts=2", "num_experts=4"]
  assert [c.model.num_experts for _, c in models] == [2, 4]
  with pytest.raises(ChimeraError, match="unknown field"):
    compare.sweep_models("configs/moe_top2.py", "tiny", "model.num_expertz=2,4", {})


def test_default_models_are_compute_matched(corpus):
  models = dict(compare.default_models("tiny", {"data.corpus": str(corpus)}))
  assert set(models) == {"dense", "moe_top1", "moe_top2", "dense_wide"}
  from chimera.accounting import count
  total = {name: count(c.model, c.train.context).params_total for name, c in models.items()}
  assert abs(total["dense_wide"] / total["moe_top2"] - 1) < 0.02
