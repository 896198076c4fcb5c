"""The plots of a study's report (chimera.report), and of one run that chimera.main
finished (`run_plots`): PNG files, one figure each."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from chimera.records import RUN_PLOTS
from chimera.study_stats import Run, router_curves


def _colors(names) -> dict[str, str]:
  """One colour per model, by its place in the study, the same in every plot."""
  return {name: f"C{index}" for index, name in enumerate(names)}


def _save(fig, path: Path) -> None:
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _readable_ylim(ax, curves: list[list[float]]) -> None:
  """The first losses are far above the rest: keep the end of the curves readable, but
  never cut off a curve's last loss (a run that stalled high keeps its line)."""
  losses = [loss for curve in curves for loss in curve]
  if losses:
    top = min(max(losses), np.percentile(losses, 80) * 1.05)
    top = max(top, max(curve[-1] for curve in curves if curve) + 0.02)
    ax.set_ylim(min(losses) - 0.02, top)


def loss_curves(path: Path, runs: dict[str, list[Run]], x: str, xlabel: str) -> bool:
  """Validation loss against `x` ("tokens_seen" or "wall_seconds"): one thin line per
  seed, and the mean over seeds where the seeds share their evaluation points."""
  fig, ax = plt.subplots(figsize=(7, 4.5))
  curves = [list(r.curve(x)[1]) for rs in runs.values() for r in rs]
  for index, (name, model_runs) in enumerate(runs.items()):
    for run in model_runs:
      ax.plot(*run.curve(x), color=f"C{index}", alpha=0.35, linewidth=1)
    points = min(len(r.evals) for r in model_runs)
    mean_x = np.mean([r.curve(x)[0][:points] for r in model_runs], axis=0)
    mean_y = np.mean([r.curve(x)[1][:points] for r in model_runs], axis=0)
    ax.plot(mean_x, mean_y, color=f"C{index}", linewidth=2, marker="o", markersize=3,
            label=f"{name} (mean of {len(model_runs)})")  # a marker: one evaluation shows
  _readable_ylim(ax, curves)
  ax.set_xlabel(xlabel)
  ax.set_ylabel("validation loss (nats/token)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  _save(fig, path)
  return True


def paired_differences(path: Path, models: dict) -> bool:
  """Per-seed paired differences model - baseline (dots) and their mean (bar)."""
  names = [n for n, e in models.items() if "vs_baseline" in e]
  if not names:
    return False
  fig, ax, color = *plt.subplots(figsize=(7, 3.8)), _colors(models)
  for index, name in enumerate(names):
    spread = models[name]["vs_baseline"]["final_val_loss"]
    ax.bar(index, spread["mean"] or 0.0, color=color[name], alpha=0.5)
    values = [v for v in spread["values"] if v is not None]
    ax.scatter([index] * len(values), values, color="black", s=14, zorder=3)
  ax.axhline(0, color="black", linewidth=0.8)
  ax.set_xticks(range(len(names)), names, rotation=20, fontsize=8)
  ax.set_ylabel("final val loss - dense (nats)")
  ax.set_title("paired by seed: bar = mean, dots = seeds", fontsize=9)
  ax.grid(axis="y", alpha=0.3)
  _save(fig, path)
  return True


ROUTING_PANELS = (("dropped_fraction", "dropped fraction, worst layer (training capacity)"),
                  ("max_violation", "MaxVio, worst layer"),
                  ("router_entropy", "router entropy, mean of layers (nats)"),
                  ("router_confidence", "top-1 router probability, mean of layers"))


def routing(path: Path, runs: dict[str, list[Run]]) -> bool:
  """The routing metrics of every MoE run over training (one line per seed)."""
  curves = {name: [router_curves(r.train_rows) for r in model_runs]
            for name, model_runs in runs.items()}
  curves = {name: cs for name, cs in curves.items() if cs[0]["step"]}
  if not curves:
    return False
  fig, axes, color = *plt.subplots(2, 2, figsize=(10, 6.5)), _colors(runs)
  for ax, (field, title) in zip(axes.flat, ROUTING_PANELS):
    for name, model_curves in curves.items():
      for seed_index, curve in enumerate(model_curves):
        ax.plot(curve["step"], curve[field], color=color[name], linewidth=1,
                marker="o" if len(curve["step"]) < 3 else None, markersize=3,  # short runs
                label=name if seed_index == 0 else None)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("step", fontsize=8)
    ax.grid(alpha=0.3)
  axes.flat[0].legend(fontsize=7)
  _save(fig, path)
  return True


def expert_load(path: Path, models: dict) -> bool:
  """Each MoE model's share of assignments per expert and layer (last training window)."""
  loads = {name: np.array(e["expert_load"]) for name, e in models.items() if e.get("expert_load")}
  if not loads:
    return False
  layers = max(load.shape[0] for load in loads.values())
  fig, axes = plt.subplots(len(loads), layers, figsize=(2.8 * layers, 2.0 * len(loads)),
                           squeeze=False)
  color = _colors(models)
  for row, (name, load) in enumerate(loads.items()):
    for layer in range(layers):
      ax = axes[row][layer]
      if layer >= load.shape[0]:
        ax.axis("off")
        continue
      ax.bar(range(load.shape[1]), load[layer], color=color[name])
      ax.axhline(1 / load.shape[1], color="black", linewidth=0.8, linestyle="--")
      ax.set_title(f"{name}, MoE layer {layer}", fontsize=8)
      ax.tick_params(labelsize=6)
  fig.supxlabel("expert (dashed: uniform load)", fontsize=9)
  fig.supylabel("share of assignments", fontsize=9)
  _save(fig, path)
  return True


def throughput(path: Path, speed: dict[str, dict]) -> bool:
  """Training and decode tokens/s per model, from the bench."""
  if not speed:
    return False
  names = list(speed)
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
  for ax, (field, label) in zip(axes, (("train_tokens_per_second", "training tokens/s (bench)"),
                                       ("decode_tokens_per_second", "decode tokens/s (batch 1)"))):
    ax.bar(names, [speed[n].get(field) or 0.0 for n in names],
           color=[f"C{i}" for i in range(len(names))])
    ax.set_title(label)
    ax.tick_params(axis="x", rotation=20, labelsize=8)
    ax.grid(axis="y", alpha=0.3)
  _save(fig, path)
  return True


def run_curves(path: Path, run: Run) -> bool:
  """One run's training loss (the mean of each logging window) and validation loss
  (each evaluation) against training tokens."""
  rows = [r for r in run.train_rows if "loss" in r]
  tokens_per_step = run.summary.tokens_seen / run.summary.steps
  fig, ax = plt.subplots(figsize=(7, 4.5))
  ax.plot([r["step"] * tokens_per_step for r in rows], [r["loss"] for r in rows], color="C0",
          alpha=0.5, linewidth=1, label="training (mean of each logging window)")
  ax.plot(*run.curve("tokens_seen"), color="C1", marker="o", markersize=3, linewidth=1.5,
          label=f"validation (final {run.summary.final_val_loss:.4f})")
  _readable_ylim(ax, [[r["loss"] for r in rows], list(run.curve("tokens_seen")[1])])
  ax.set_xlabel("training tokens")
  ax.set_ylabel("loss (nats/token)")
  ax.set_title(run.model, fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  _save(fig, path)
  return True


def run_plots(workdir: Path, name: str) -> list[Path]:
  """loss.png and, for an MoE, routing.png (`routing`) in the workdir of a finished run;
  the paths written."""
  run = Run.load(workdir, name, seed=0)  # the seed is only a study's label
  loss, routing_plot = (workdir / plot for plot in RUN_PLOTS)
  plots = {loss: run_curves, routing_plot: lambda path, run: routing(path, {name: [run]})}
  return [path for path, plot in plots.items() if plot(path, run)]
