"""REPORT.md, plots and summary.json for a study (see chimera.compare).

Every number in the report comes from the runs' own metrics.jsonl and summary.json and
from the bench records; nothing is typed in by hand.
"""

import json
import time
from pathlib import Path
from typing import NamedTuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from chimera.config import Config  # noqa: E402


class Run(NamedTuple):
  seed: int
  summary: dict
  evals: list[dict]  # {"step", "tokens", "seconds", "val_loss"} per evaluation


def load_run(workdir: Path, seed: int) -> Run:
  """A finished run's summary and validation curve, from its workdir."""
  config = json.loads((workdir / "config.json").read_text())
  tokens_per_step = config["train"]["batch_size"] * config["train"]["context"]
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  start = records[0]["time"]
  evals = [{"step": r["step"], "tokens": r["step"] * tokens_per_step,
            "seconds": r["time"] - start, "val_loss": r["val_loss"]}
           for r in records if r["event"] == "eval"]
  return Run(seed, json.loads((workdir / "summary.json").read_text()), evals)


def _stats(values: list[float]) -> dict:
  return {"mean": float(np.mean(values)), "min": float(np.min(values)),
          "max": float(np.max(values)), "per_seed": [float(v) for v in values]}


def summarize(models: list[tuple[str, Config]], runs: dict[str, list[Run]],
              speed: list[dict]) -> dict:
  """One record per model: sizes, losses across seeds, speed, expert balance."""
  by_name = {record["config"]: record for record in speed}
  out = {}
  for name, _ in models:
    model_runs, bench_record = runs[name], by_name[name]
    first = model_runs[0].summary
    entry = {
        "params_total": first["params_total"],
        "params_active": first["params_active"],
        "flops_per_token": first["flops_per_token"],
        "tokens_seen": first["tokens_seen"],
        "final_val_loss": _stats([r.summary["final_val_loss"] for r in model_runs]),
        "best_val_loss": _stats([r.summary["best_val_loss"] for r in model_runs]),
        "val_bits_per_byte": _stats([r.summary["val_bits_per_byte"] for r in model_runs]),
        "unigram_val_loss": first.get("unigram_val_loss"),
        "wall_seconds": _stats([r.summary["wall_seconds"] for r in model_runs]),
        "train_tokens_per_second": bench_record["train_tokens_per_second"],
        "train_step_seconds": bench_record["train_step_seconds"],
        "mfu": bench_record["mfu"],
        "decode_tokens_per_second": bench_record["decode_tokens_per_second"],
        "decode_tokens_per_second_b8": bench_record.get("decode_tokens_per_second_b8"),
        "peak_memory_bytes": bench_record["peak_memory_bytes"],
    }
    if "expert_load" in first:
      loads = np.array([r.summary["expert_load"] for r in model_runs])  # [seeds, Y, E]
      entry["expert_load"] = loads.mean(axis=0).tolist()
      entry["expert_load_max_over_min"] = float(np.mean(
          loads.max(axis=-1) / np.maximum(loads.min(axis=-1), 1e-9)))
      entry["dropped_fraction"] = float(np.mean([r.summary["dropped_fraction"]
                                                 for r in model_runs]))
      entry["dispatch_share_of_step"] = bench_record.get("dispatch_share_of_step")
    out[name] = entry
  return out


def _plot_curves(path: Path, runs: dict[str, list[Run]], x: str, xlabel: str) -> None:
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for index, (name, model_runs) in enumerate(runs.items()):
    color = f"C{index}"
    for run in model_runs:
      ax.plot([e[x] for e in run.evals], [e["val_loss"] for e in run.evals], color=color,
              alpha=0.35, linewidth=1)
    steps = min(len(r.evals) for r in model_runs)
    mean_x = np.mean([[e[x] for e in r.evals[:steps]] for r in model_runs], axis=0)
    mean_y = np.mean([[e["val_loss"] for e in r.evals[:steps]] for r in model_runs], axis=0)
    ax.plot(mean_x, mean_y, color=color, linewidth=2, label=f"{name} (mean of {len(model_runs)})")
  ax.set_xlabel(xlabel)
  ax.set_ylabel("validation loss (nats/token)")
  ax.set_ylim(top=min(ax.get_ylim()[1], np.percentile(
      [e["val_loss"] for rs in runs.values() for r in rs for e in r.evals], 90) * 1.05))
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _plot_expert_load(path: Path, summary: dict) -> bool:
  moe = {name: np.array(entry["expert_load"]) for name, entry in summary.items()
         if "expert_load" in entry}
  if not moe:
    return False
  layers = max(load.shape[0] for load in moe.values())
  fig, axes = plt.subplots(len(moe), layers, figsize=(2.6 * layers, 2.2 * len(moe)),
                           squeeze=False)
  for row, (name, load) in enumerate(moe.items()):
    for layer in range(layers):
      ax = axes[row][layer]
      if layer < load.shape[0]:
        experts = load.shape[1]
        ax.bar(range(experts), load[layer], color=f"C{row}")
        ax.axhline(1 / experts, color="black", linewidth=0.8, linestyle="--")
        ax.set_title(f"{name}, MoE layer {layer}", fontsize=8)
        ax.set_xticks(range(experts))
        ax.tick_params(labelsize=7)
      else:
        ax.axis("off")
  fig.supxlabel("expert (dashed: uniform load)", fontsize=9)
  fig.supylabel("share of assignments", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


def _plot_throughput(path: Path, summary: dict) -> None:
  names = list(summary)
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
  for ax, field, label in ((axes[0], "train_tokens_per_second", "training tokens/s"),
                           (axes[1], "decode_tokens_per_second", "decode tokens/s (batch 1)")):
    values = [summary[n][field] for n in names]
    ax.bar(names, values, color=[f"C{i}" for i in range(len(names))])
    ax.set_title(label)
    ax.tick_params(axis="x", rotation=20, labelsize=8)
    ax.grid(axis="y", alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _loss_cell(stats: dict) -> str:
  spread = (stats["max"] - stats["min"]) / 2
  return f"{stats['mean']:.4f} ± {spread:.4f}"


def findings(summary: dict) -> list[str]:
  """Plain sentences from the numbers: where each model wins and where it loses."""
  lines = []
  if "dense" in summary:
    dense = summary["dense"]
    for name, entry in summary.items():
      if name == "dense":
        continue
      delta = entry["final_val_loss"]["mean"] - dense["final_val_loss"]["mean"]
      spread = max(entry["final_val_loss"]["max"] - entry["final_val_loss"]["min"],
                   dense["final_val_loss"]["max"] - dense["final_val_loss"]["min"])
      verdict = ("beyond" if abs(delta) > spread else "within")
      direction = "lower" if delta < 0 else "higher"
      flops_ratio = entry["flops_per_token"] / dense["flops_per_token"]
      lines.append(
          f"**{name}** ends {abs(delta):.4f} nats {direction} than dense "
          f"({entry['final_val_loss']['mean']:.4f} vs {dense['final_val_loss']['mean']:.4f}), "
          f"{verdict} the seed spread ({spread:.4f}), at {flops_ratio:.2f}x dense's FLOPs per "
          f"token and {entry['params_total'] / dense['params_total']:.2f}x its parameters "
          f"({entry['params_active'] / entry['params_total']:.0%} of them active).")
      lines.append(
          f"  Its training step takes {dense['train_tokens_per_second'] / entry['train_tokens_per_second']:.2f}x "
          f"dense's time and it decodes at {entry['decode_tokens_per_second'] / dense['decode_tokens_per_second']:.2f}x "
          f"dense's tokens/s (batch 1).")
  if "moe_top2" in summary and "dense_wide" in summary:
    moe, wide = summary["moe_top2"], summary["dense_wide"]
    lines.append(
        f"With the same total parameters all active, **dense_wide** reaches "
        f"{wide['final_val_loss']['mean']:.4f} against moe_top2's "
        f"{moe['final_val_loss']['mean']:.4f}, for {wide['flops_per_token'] / moe['flops_per_token']:.2f}x "
        f"the FLOPs per token and {moe['train_tokens_per_second'] / wide['train_tokens_per_second']:.2f}x "
        f"the step time of moe_top2.")
  if "dense" not in summary:  # a sweep: the loss against the swept value
    ordered = summary.items()
    lines.append("Final validation loss by swept value (total parameters, FLOPs per token): " + "; ".join(
        f"{name}: {entry['final_val_loss']['mean']:.4f} ({entry['params_total'] / 1e6:.2f}M total, "
        f"{entry['flops_per_token'] / 1e6:.1f} MFLOPs/token)" for name, entry in ordered) + ".")
  for name, entry in summary.items():
    if "expert_load" in entry:
      lines.append(
          f"{name}: busiest/idlest expert load ratio {entry['expert_load_max_over_min']:.2f} "
          f"(mean over layers), {entry['dropped_fraction']:.1%} of assignments dropped in "
          f"the last training window.")
  return lines


def write(out: Path, *, title: str, models: list[tuple[str, Config]],
          runs: dict[str, list[Run]], speed: list[dict], command: str) -> dict:
  """Writes REPORT.md, summary.json and PNG plots into `out`; returns the summary."""
  out.mkdir(parents=True, exist_ok=True)
  summary = summarize(models, runs, speed)
  _plot_curves(out / "loss_vs_tokens.png", runs, "tokens", "training tokens")
  _plot_curves(out / "loss_vs_time.png", runs, "seconds", "wall-clock seconds")
  has_load_plot = _plot_expert_load(out / "expert_load.png", summary)
  _plot_throughput(out / "throughput.png", summary)
  config = models[0][1]
  meta = {"title": title, "command": command, "date": time.strftime("%Y-%m-%d"),
          "device": speed[0]["device"], "peak_matmul_flops": speed[0]["peak_matmul_flops"],
          "corpus": config.data.corpus, "tokenizer": config.data.tokenizer,
          "steps": config.train.steps, "seeds": [r.seed for r in next(iter(runs.values()))]}
  (out / "summary.json").write_text(json.dumps({**meta, "models": summary}, indent=2))

  unigram = next(iter(summary.values()))["unigram_val_loss"]
  lines = [
      f"# {title}", "",
      f"Generated by `{command}` on {meta['date']} ({meta['device']}, measured matmul peak "
      f"{meta['peak_matmul_flops'] / 1e9:.0f} GFLOP/s). Corpus `{meta['corpus']}`, "
      f"{meta['tokenizer']} tokens, {meta['steps']} steps per run, seeds {meta['seeds']}. "
      f"Losses are validation nats per token: mean ± half the range across seeds. "
      f"A unigram model scores {unigram:.4f}." if unigram else "", "",
      "| model | params total | params active | MFLOPs/token | final val loss | best val loss "
      "| bits/byte | train tok/s | MFU | decode tok/s (b1) | expert load max/min | dropped |",
      "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
  ]
  for name, e in summary.items():
    balance = (f"{e['expert_load_max_over_min']:.2f}", f"{e['dropped_fraction']:.1%}") \
        if "expert_load" in e else ("-", "-")
    lines.append(
        f"| {name} | {e['params_total'] / 1e6:.2f}M | {e['params_active'] / 1e6:.2f}M | "
        f"{e['flops_per_token'] / 1e6:.1f} | {_loss_cell(e['final_val_loss'])} | "
        f"{_loss_cell(e['best_val_loss'])} | {e['val_bits_per_byte']['mean']:.4f} | "
        f"{e['train_tokens_per_second']:,.0f} | {e['mfu']:.1%} | "
        f"{e['decode_tokens_per_second']:,.0f} | {balance[0]} | {balance[1]} |")
  lines += ["", "## Findings", ""] + [f"- {line}" if not line.startswith("  ") else line
                                      for line in findings(summary)]
  lines += ["", "## Plots", "", "![validation loss against tokens](loss_vs_tokens.png)", "",
            "![validation loss against wall-clock time](loss_vs_time.png)", "",
            "![training and decode throughput](throughput.png)", ""]
  if has_load_plot:
    lines += ["![per-expert load, per layer](expert_load.png)", ""]
  lines += ["Speed figures come from `chimera.bench` run in the same process after training, "
            "configs interleaved, medians over repeats. Expert loads are from each run's last "
            "training window.", ""]
  (out / "REPORT.md").write_text("\n".join(lines))
  return summary
