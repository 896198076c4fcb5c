"""REPORT.md, plots and summary.json for a study (see chimera.compare).

Every number comes from the runs' own records (summary.json, metrics.jsonl) and the
bench; every sentence under "Findings" and every verdict under "Targets" is built from
those numbers by the functions below, so they change when the numbers do.

  python -m chimera.report --readme=README.md   # README's headline, from a study's summary
"""

import collections
import dataclasses
import itertools
import json
import math
import sys
import time
from pathlib import Path

from chimera import study_plots, study_sweeps, study_targets
from chimera.data.corpora import write_atomic
from chimera.errors import ChimeraError, parse_flags
from chimera.study_stats import (Run, Spread, common_means, defined_seeds, describe, same_sign,
                                 seed_by_seed, summarize, worst)
from chimera.study_targets import EVAL_GAP, Target

SPREAD_NOTE = (
    "**How to read the numbers.** n is the number of seeds. \"a ± b\" is the mean over the "
    "n seeds and the sample standard deviation (ddof=1) of the per-seed values; with n=1 "
    "there is no spread. A difference \"- dense\" is paired: each seed's run minus dense's "
    "run of the same seed (the same batches in the same order, the same validation subset), "
    "and the mean and SD are over those n differences. Losses are validation nats per token.")
EFFICIENCY_NOTE = (
    "Tokens: where the validation curve first reaches dense's final loss (same seed), "
    "interpolated linearly between evaluations. Time: the loss each run had when dense's run "
    "of the same seed ended, on the measured training clock, on the steady-state clock "
    "(tokens / timed-step throughput: compilation and evaluation left out), and on the bench "
    "clock (tokens / the bench's training throughput for that model, every model measured "
    "interleaved in one process: the one clock that does not depend on what else the machine "
    "ran while each run trained); a run that ended sooner is read at its end.")
CURVE_NOTE = (
    "Each column is a step from one sweep point to the next: the later point's validation "
    "loss minus the earlier one's at the same evaluation, seed by seed (same batches, same "
    "validation subset), mean ± SD over the seeds run at both. Negative: the later point is "
    "lower.")
BENCH_FIELDS = ("train_tokens_per_second", "mfu", "decode_tokens_per_second",
                "peak_memory_bytes", "dispatch_share_of_step")


def bench_figures(record) -> tuple[str, dict]:
  """(model name, figures) of one chimera.bench record: the one place that reads its
  layout (a BenchRecord; a plain dict of the same fields, or of the older layout with
  "config" for the name and decode_tokens_per_second, reads too)."""
  values = dataclasses.asdict(record) if dataclasses.is_dataclass(record) else dict(record)
  name = values.get("name") or values.get("config")
  figures = {field: values.get(field) for field in BENCH_FIELDS}
  decode = sorted(values.get("decode") or (), key=lambda d: d["batch"])
  if decode:  # the smallest batch measured, batch 1 by default
    figures["decode_tokens_per_second"] = decode[0]["tokens_per_second"]
  figures["device"] = values.get("device")
  return name, figures


# --- Findings: sentences from the numbers. ---------------------------------------------------


def _seeds_clause(spread: dict) -> str:
  """The paired difference with its n, spread, per-seed values and their agreement."""
  if spread["n"] < 2:
    return f"paired difference {describe(spread, signed=True)}: one seed, so no spread"
  defined = [v for v in spread["values"] if v is not None]
  values = ", ".join(f"{v:+.4f}" for v in defined)
  # Over the seeds with a value (an undefined one made agreeing seeds read as disagreeing).
  seeds = ("every seed" if len(defined) == len(spread["values"])
           else f"every seed with a value ({len(defined)} of {len(spread['values'])})")
  if all(v == 0 for v in defined):
    agreement = f"{seeds} is exactly 0"
  elif same_sign({"values": defined}):
    agreement = f"{seeds} agrees in sign"
  else:
    agreement = "the seeds disagree in sign"
  size = "larger than" if abs(spread["mean"]) > spread["sd"] else "within"
  return (f"paired difference {spread['mean']:+.4f} ± {spread['sd']:.4f}, mean ± SD over "
          f"n={spread['n']} seeds, per seed {values}; {agreement}, and the mean is {size} "
          f"one SD")


def loss_finding(name: str, entry: dict) -> str:
  diff = entry["vs_baseline"]["final_val_loss"]
  bits = entry["vs_baseline"]["val_bits_per_byte"]
  if diff["mean"] is None:
    return f"**{name}** has no run paired with dense."
  side = "below" if diff["mean"] < 0 else "above" if diff["mean"] > 0 else "from"
  return (f"**{name}** ends {abs(diff['mean']):.4f} nats {side} dense ({_seeds_clause(diff)}); "
          f"in bits per byte {describe(bits, signed=True)}.")


CLOCK_WORDS = {"measured": "training time as measured (evaluation included; the train step compiles before the clock starts)",
               "steady": "steady-state training time (tokens / timed-step throughput)",
               "bench": "time on the bench clock (tokens / the bench's throughput)"}


def _missing_words(equal_time: dict) -> str:
  """Why seeds have no value at dense's time: the reasons _equal_time counted."""
  return " or ".join(equal_time.get("missing", {}))  # summaries before 2026-11-27 lack it


def _time_clause(equal_time: dict, clock: str) -> str:
  at_time = equal_time["difference"]
  if at_time["mean"] is None:
    # Without the clock (no bench) there is nothing to say; without an evaluation by
    # dense's end, the model is furthest behind, and the finding says so.
    unevaluated = equal_time.get("missing", {}).get("no evaluation yet", 0)
    if not unevaluated:
      return ""
    return (f" At dense's {CLOCK_WORDS[clock]}, {equal_time['seconds']['mean']:,.0f} s, it "
            f"had not been evaluated yet in {unevaluated} of {len(at_time['values'])} seeds.")
  side = "below" if at_time["mean"] < 0 else "above"
  text = (f" At dense's {CLOCK_WORDS[clock]}, {equal_time['seconds']['mean']:,.0f} s, it is "
          f"{abs(at_time['mean']):.4f} nats {side} dense "
          f"({describe(at_time, signed=True, missing=_missing_words(equal_time))})")
  ended = equal_time["ended_before"]
  return text + (f"; in {ended} of {len(at_time['values'])} seeds it had finished sooner, "
                 f"and its final loss is used." if ended else ".")


def efficiency_finding(name: str, entry: dict) -> str:
  vs = entry["vs_baseline"]
  reach = vs["token_fraction"]
  if not reach["values"]:  # no seed paired with dense: nothing was measured
    return ""
  if reach["n"] == 0:
    text = f"{name} does not reach dense's final loss in any of its {len(reach['values'])} seeds."
  else:
    text = (f"{name} reaches dense's final loss after "
            f"{describe(reach, digits=2, suffix='x', missing='not reached')} dense's tokens")
    gap = entry["largest_eval_gap"]
    text += (f", read from evaluations up to {gap:.0%} of training apart (a loss reached by "
             f"the first evaluation counts as reached there)." if gap > EVAL_GAP + 1e-9 else ".")
  return text + "".join(_time_clause(vs["equal_time"][clock], clock) for clock in CLOCK_WORDS)


def cost_finding(name: str, entry: dict) -> str:
  vs = entry["vs_baseline"]
  text = (f"{name} has {vs['params_total_ratio']:.2f}x dense's parameters "
          f"({entry['params_active'] / entry['params_total']:.0%} active per token) and "
          f"{vs['flops_ratio']:.2f}x its model FLOPs per token")
  if vs["executed_flops_ratio"] is not None:
    text += (f"; it executes {vs['executed_flops_ratio']:.2f}x dense's FLOPs per token "
             f"with capacity or block padding and dispatch")
  return text + "."


def routing_finding(name: str, entry: dict) -> str | None:
  routing = entry.get("routing")
  if not routing or worst(routing["dropped_after_warmup"]) is None:
    return None
  dropped, n = worst(routing["dropped_after_warmup"]), routing["dropped_after_warmup"]["n"]
  experts, window = entry["shape"]["num_experts"], worst(routing["dropped_worst_window"])
  return (f"{name} drops {dropped:.2%} of its assignments after warm-up in its worst layer "
          f"(worst of n={n} seeds; worst logging window {window:.2%}), "
          f"MaxVio {describe(routing['max_violation_after_warmup'], digits=2)}; in the last "
          f"window its router entropy is {describe(routing['router_entropy'], digits=3)} nats "
          f"(uniform over {experts} experts: {math.log(experts):.3f}) and its top-1 "
          f"probability {describe(routing['router_confidence'], digits=3)}.")


def wide_finding(models: dict) -> str | None:
  """dense_wide (moe_top2's parameters, all active) against moe_top2, paired by seed."""
  if "dense_wide" not in models or "moe_top2" not in models:
    return None
  step = seed_by_seed(models["moe_top2"]["vs_baseline"]["final_val_loss"],
                      models["dense_wide"]["vs_baseline"]["final_val_loss"])
  defined = [v for v in step.values if v is not None]
  if not defined:
    return None
  mean = step.mean
  ratio = models["dense_wide"]["flops_per_token"] / models["moe_top2"]["flops_per_token"]
  return (f"dense_wide, with moe_top2's total parameters all active, ends "
          f"{abs(mean):.4f} nats {'below' if mean < 0 else 'above'} moe_top2 (mean of "
          f"n={len(defined)} paired seeds, per seed "
          f"{', '.join(f'{v:+.4f}' for v in defined)}) at {ratio:.2f}x its model FLOPs.")


def sweep_step(a: dict, b: dict) -> str:
  """From point a to point b (Spread JSONs of the final loss): the mean of b - a over the
  seeds run at both (the seeds share batches and validation subset) and, with 2 or more
  such seeds, each seed's step and their spread. A seed one point lacks (diverged) is
  left out of the step, and the text says so."""
  step = seed_by_seed(a, b)
  if step.n == 0:
    return "no seed run at both"
  text = f"{step.mean:+.4f}"
  if step.n >= 2:
    per_seed = ", ".join(f"{v:+.4f}" for v in step.values if v is not None)
    text += f" (per seed {per_seed}; paired {describe(step.to_json(), signed=True)})"
  if defined_seeds(a) != defined_seeds(b):
    text += f" (over the {step.n} seed{'s' * (step.n != 1)} run at both points)"
  return text


def sweep_finding(models: dict) -> str | None:
  """The sweep's points in their order: each one's loss, the steps between neighbours,
  and the gap between the best and the worst against the seeds' spread."""
  points = {n: e["final_val_loss"] for n, e in models.items() if e["role"] == "point"}
  if not points:
    return None
  names = list(points)
  if len(names) == 1:
    return (f"Final validation loss of the one point: {names[0]}: {describe(points[names[0]])}"
            f"; with one point there is no step between points to report.")
  # Ranked over the seeds every point has: a seed one point lacks (it diverged there)
  # would put seed-to-seed variation into the ranking.
  means, seeds = common_means(points)
  uneven = any(defined_seeds(points[n]) != set(seeds) for n in names)
  steps = "; ".join(f"{a} -> {b}: {sweep_step(points[a], points[b])}"
                    for a, b in itertools.pairwise(names))
  text = (f"Final validation loss per point: "
          f"{'; '.join(f'{n}: {describe(points[n])}' for n in names)}. From each point to the "
          f"next: {steps or '-'}.")
  if not seeds:
    return text + " No seed was run at every point, so the points are not ranked."
  ranked = sorted(names, key=means.get)
  text += (f" The lowest is {ranked[0]}, {means[ranked[-1]] - means[ranked[0]]:.4f} nats below "
           f"the highest ({ranked[-1]})")
  if uneven:
    text += (f", in the means over the {len(seeds)} seed{'s' * (len(seeds) != 1)} run at "
             f"every point")
  spreads = {n: points[n]["sd"] for n in names if points[n]["sd"] is not None}
  single = [n for n in names if n not in spreads]
  if not spreads:
    text += "; with one seed per point there is no seed spread to weigh that gap against."
  else:
    text += f"; the largest seed SD of a point is {max(spreads.values()):.4f}"
    text += (f" ({', '.join(single)}: one seed, no spread)." if single else ".")
  gaps = {n: models[n].get("generalization_gap") for n in names}
  if all(gap and gap["mean"] is not None for gap in gaps.values()):
    text += (" Validation minus last-window training loss per point: "
             + "; ".join(f"{n}: {describe(g, signed=True)}" for n, g in gaps.items()) + ".")
  return text


def diverged_finding(models: dict, diverged: list[dict]) -> str | None:
  """The runs left out on a non-finite loss, and the models left with no figures."""
  if not diverged:
    return None
  gone = sorted({d["model"] for d in diverged} - set(models))
  text = ("Left out, diverged (a non-finite loss): "
          + "; ".join(f"{d['model']}, seed {d['seed']}" for d in diverged))
  return text + (f". No seed of {', '.join(gone)} finished, so no sentence above covers "
                 f"{'it' if len(gone) == 1 else 'them'}." if gone else ".")


def sweep_curves(models: dict) -> dict[str, dict[int, Spread]] | None:
  """The steps between neighbouring sweep points at every evaluation they share:
  {"a -> b": {step: b - a paired by seed}}. None for fewer than 2 points, or points from
  a summary written before the curves were kept."""
  points = [n for n, e in models.items() if e["role"] == "point"]
  if len(points) < 2 or not all(models[n].get("val_curve") for n in points):
    return None
  curves = {n: {c["step"]: c for c in models[n]["val_curve"]} for n in points}
  steps = sorted(set.intersection(*(set(curve) for curve in curves.values())))
  return {f"{a} -> {b}": {step: seed_by_seed(curves[a][step], curves[b][step]) for step in steps}
          for a, b in itertools.pairwise(points)}


def sweep_curve_finding(models: dict) -> str | None:
  """For each step between neighbouring points: where over training it was largest (most
  negative: the later point furthest below), and what is left of it at the end."""
  curves = sweep_curves(models)
  if not curves:
    return None
  parts = []
  for pair, by_step in curves.items():
    defined = {step: d for step, d in by_step.items() if d.mean is not None}
    if not defined:
      continue
    last = max(defined)
    best = min(defined, key=lambda step: defined[step].mean)
    parts.append(f"{pair}: {defined[best].mean:+.4f} at step {best} "
                 f"({describe(defined[best].to_json(), signed=True)}), "
                 f"{defined[last].mean:+.4f} at the last evaluation, step {last}")
  if not parts:
    return None
  return ("Over training (validation loss at each evaluation, paired by seed), the step "
          "between neighbouring points was lowest, and then at the end: " + "; ".join(parts)
          + ".")


def best_finding(models: dict) -> str | None:
  """Which compute-matched MoE ends lowest against dense (`study_targets.best_moe`), and over
  which seeds, when they are not every MoE's own."""
  best = study_targets.best_moe(models)
  if not best:
    return None
  differences = study_targets.moe_differences(models).values()
  _, seeds = common_means(dict(enumerate(differences)))
  over = ("" if all(defined_seeds(d) == set(seeds) for d in differences) else
          f", in the means over the {len(seeds)} seed{'s' * (len(seeds) != 1)} every one "
          f"of them has" if seeds else ", each mean over its own seeds (they share none)")
  return (f"Of the compute-matched MoE configs, **{best}** has the lowest mean paired "
          f"difference to dense{over}.")


def findings(models: dict, targets: list[Target], diverged: list[dict] = ()) -> list[str]:
  """The Findings section: one sentence group per model, then the study as a whole.
  `diverged`: the runs left out on a non-finite loss, named so that a point or model with
  no finished seed is not silently missing from the sentences."""
  lines = list(filter(None, [best_finding(models)]))
  for name, entry in models.items():
    if "vs_baseline" not in entry:
      continue
    lines.append(" ".join(filter(None, [loss_finding(name, entry),
                                        efficiency_finding(name, entry),
                                        cost_finding(name, entry),
                                        routing_finding(name, entry)])))
  lines += filter(None, [wide_finding(models), sweep_finding(models),
                         sweep_curve_finding(models), diverged_finding(models, diverged)])
  if targets:
    count = lambda status: sum(t.status == status for t in targets)
    lines.append(f"Targets: {count(study_targets.PASS)} pass, {count(study_targets.FAIL)} fail, "
                 f"{count(study_targets.NOT_MEASURED)} not measured, of {len(targets)}.")
  return lines


# --- The report. -----------------------------------------------------------------------------


def targets_for(study, models: dict, related: dict, command: str) -> list[Target]:
  """The issue's targets that this study measures (see chimera.study_targets)."""
  if study.sweep is not None:
    if study_sweeps.varies_num_experts(study.sweep) and study.over_moe_top2:
      return [study_targets.expert_sweep_target(models, command)]
    return []
  # The expert sweep this study reads: at its --set values, with the seeds it holds.
  expert_command = study.expert_sweep_command(related.get("expert_sweep_seeds") or [])
  out = study_targets.loss_targets(models, command)
  out.append(study_targets.expert_sweep_target(related.get("expert_sweep"), expert_command))
  out.append(study_targets.token_target(models, command))
  out += study_targets.routing_targets(models, command)
  if study.preset != "cpu":
    out.append(study_targets.ordering_target(models, related.get("reference_study"), command,
                                             "python -m chimera.compare --preset=cpu"))
  return out


def _mega(value) -> str:
  return "-" if value is None else f"{value / 1e6:.2f}"


def _ratio(value) -> str:
  return "" if value is None else f" ({value:.2f}x)"


def _number(value, spec: str) -> str:
  return "-" if value is None else format(value, spec)


def _percent(spread: dict) -> str:
  return "-" if worst(spread) is None else f"{worst(spread):.2%}"


def _table(header: list[str], rows: list[list[str]], numbers: bool = True) -> list[str]:
  """A markdown table; with `numbers`, every column but the first is right-aligned."""
  align = " ---: |" if numbers else " --- |"
  return ["| " + " | ".join(header) + " |", "| --- |" + align * (len(header) - 1)] + [
      "| " + " | ".join(row) + " |" for row in rows]


def _loss_row(name: str, e: dict) -> list[str]:
  vs = e.get("vs_baseline")
  def cell(field, **kw):
    return describe(vs[field], **kw) if vs else "-"
  return [name, describe(e["final_val_loss"]), cell("final_val_loss", signed=True),
          describe(e["val_bits_per_byte"]), cell("val_bits_per_byte", signed=True),
          describe(e["train_loss"]), describe(e["generalization_gap"], signed=True)]


def _efficiency_row(name: str, e: dict) -> list[str]:
  vs = e["vs_baseline"]
  row = [name, describe(vs["token_fraction"], digits=2, suffix="x", missing="not reached")]
  for clock in CLOCK_WORDS:
    at = vs["equal_time"][clock]
    missing = _missing_words(at)
    row += [describe(at["loss"], missing=missing),
            describe(at["difference"], signed=True, missing=missing)]
  return row


def _cost_row(name: str, e: dict, speed: dict) -> list[str]:
  vs = e.get("vs_baseline", {})
  return [name, _mega(e["params_total"]), _mega(e["params_active"]),
          _mega(e["flops_per_token"]) + _ratio(vs.get("flops_ratio")),
          _mega(e["executed_flops_per_token"]) + _ratio(vs.get("executed_flops_ratio")),
          describe(e["train_tokens_per_second"], digits=0),
          _number(speed.get("train_tokens_per_second"), ",.0f"),
          _number(speed.get("mfu"), ".1%"), _number(speed.get("decode_tokens_per_second"), ",.0f")]


def _routing_row(name: str, e: dict) -> list[str]:
  r = e["routing"]
  return [name, _percent(r["dropped_after_warmup"]), _percent(r["dropped_worst_window"]),
          describe(r["max_violation_after_warmup"], digits=2),
          describe(r["router_entropy"], digits=3), describe(r["router_confidence"], digits=3)]


def _tables(models: dict, speed: dict) -> list[str]:
  lines = ["## Loss", ""] + _table(
      ["model", "final val loss", "- dense", "bits/byte", "- dense",
       "train loss (last window)", "val - train"],
      [_loss_row(name, e) for name, e in models.items()])
  compared = {name: e for name, e in models.items() if "vs_baseline" in e}
  if compared:
    lines += ["", "## Tokens and time to dense's loss", "", EFFICIENCY_NOTE, ""] + _table(
        ["model", "tokens to dense's final loss (x dense's)", "loss at dense's measured time",
         "- dense", "loss at dense's steady-state time", "- dense", "loss at dense's bench time",
         "- dense"],
        [_efficiency_row(name, e) for name, e in compared.items()])
  lines += ["", "## Cost", ""] + _table(
      ["model", "params total (M)", "active (M)", "model MFLOPs/token", "executed MFLOPs/token",
       "train tok/s (training)", "train tok/s (bench)", "MFU", "decode tok/s (b1)"],
      [_cost_row(name, e, speed.get(name, {})) for name, e in models.items()])
  curves = sweep_curves(models)
  if curves:  # every pair has the same steps: those all the points share
    steps = next(iter(curves.values()))
    lines += ["", "## Steps between points over training", "", CURVE_NOTE, ""] + _table(
        ["step"] + list(curves),
        [[str(step)] + [describe(by_step[step].to_json(), signed=True)
                        for by_step in curves.values()] for step in steps])
  moe = {name: e for name, e in models.items() if "routing" in e}
  if moe:
    lines += ["", "## Routing (training rows, training capacity)", ""] + _table(
        ["model", "dropped after warm-up, worst layer (worst seed)", "worst window",
         "MaxVio after warm-up, worst layer", "router entropy (nats, last window)",
         "top-1 probability (last window)"],
        [_routing_row(name, e) for name, e in moe.items()])
  return lines


def _run_counts(runs: dict[str, list[Run]], key) -> dict[str, int]:
  """How many runs give each value of key(summary), sorted by value."""
  return dict(sorted(collections.Counter(key(r.summary) for rs in runs.values()
                                         for r in rs).items()))


def trained_by(runs: dict[str, list[Run]]) -> dict[str, int]:
  """How many runs each code version trained (`RunSummary.code`, versions joined by " then "
  for a run resumed by other code), "not recorded" for summaries older than that record."""
  return _run_counts(runs, lambda s: " then ".join(s.code) if s.code else "not recorded")


def trained_on_devices(runs: dict[str, list[Run]]) -> dict[str, int]:
  """How many runs each device trained (`RunSummary.device`; for the CPU, its model)."""
  return _run_counts(runs, lambda s: s.device or "not recorded")


def code_sentence(code: dict[str, int], devices: dict[str, int]) -> str:
  """The report's line on the code and devices that trained its runs; a warning when they
  were not one recorded commit on one device: a code change, or another CPU model (XLA
  compiles for the host's instruction set), moves a run's final loss as a seed does."""
  plural = lambda n: f"{n} run" + ("s" if n != 1 else "")
  listed = lambda counts: ", ".join(f"{key} ({plural(n)})" for key, n in counts.items())
  line = (f"Code that trained the runs (git commit, \"+dirty\" with uncommitted changes): "
          f"{listed(code)}; devices: {listed(devices)}.")
  one = lambda counts: len(counts) == 1 and "not recorded" not in counts
  if not one(code) or not one(devices) or any("dirty" in v or "unknown" in v for v in code):
    line += (" Not one recorded commit on one device: differences between runs may include "
             "code or hardware changes as well as seeds.")
  return line


def _one(values: set):
  """The value every run shares; None if they differ or none is recorded."""
  return next(iter(values)) if len(values) == 1 else None


def training_sentence(runs: dict[str, list[Run]]) -> str:
  """How the runs train and are evaluated: one clause when every run trains alike, else
  one per way of training, naming its models. The validation subset is fixed by the
  evaluation batches' count, size and context (chimera.train), so models that differ in
  those are scored on different text, and the sentence says so."""
  def how(run: Run) -> tuple:
    t = run.summary.config["train"]
    return (t["steps"], t["batch_size"], t["context"], run.summary.tokens_seen,
            t["eval_every"], t["eval_batches"] * t["batch_size"] * t["context"])
  ways: dict = {}
  for name, model_runs in runs.items():
    for way in dict.fromkeys(map(how, model_runs)):
      ways.setdefault(way, []).append(name)
  clause = lambda w: (f"{w[0]} steps of {w[1]} x {w[2]} = {w[3]:,} tokens, evaluated "
                      + (f"every {w[4]} steps" if w[4] < w[0] else "at the end only")
                      + f" on a fixed validation subset of {w[5]:,} tokens")
  if len(ways) == 1:
    return f"every run trains {clause(next(iter(ways)))} (the same for every model and seed)"
  parts = "; ".join(f"{', '.join(names)}: {clause(way)}" for way, names in ways.items())
  same_text = len({way[1:3] + way[5:] for way in ways}) == 1
  return ("the runs do not all train alike (" + parts + ")" + (
      "; the validation subset is the same for every model and seed" if same_text else
      "; the validation subsets differ between models (batch size, context or evaluation "
      "batches differ), so a paired difference compares losses on different text"))


def split_sentence(meta: dict) -> str:
  """How many tokens each run draws against the size of its training split (" " first),
  or "" when the runs do not share one recorded split. Training windows start at uniformly
  random offsets, with replacement (chimera.data.batches.WindowSampler), so text repeats
  within a run; the more tokens per split token, the more a model can fit the text it saw."""
  split = meta.get("train_split_tokens")
  if not split:
    return ""
  return (f" The training split holds {split:,} tokens; each run draws "
          f"{meta['tokens_per_run'] / split:.2f} times that many, as windows at random "
          f"starts with replacement, so text repeats within a run.")


def causality_lines(study) -> list[str]:
  """A warning for each model of the study whose router is not causal
  (chimera.routers.causality_note): its losses see later tokens, so they are not language
  model losses to set beside dense's."""
  from chimera.routers import causality_note  # imports jax: only when writing a report
  notes = [(m.name, note) for m in study.models if (note := causality_note(m.config.model))]
  return [f"**Not causal: {name}.** Its {note}. Its losses are not comparable with a "
          f"causal model's." for name, note in notes] + ([""] if notes else [])


def _verdicts(targets: list[Target], found: list[str]) -> list[str]:
  """The report's Targets table (when the study has targets) and its Findings."""
  lines = []
  if targets:
    lines += ["", "## Targets", ""] + _table(
        ["target", "measured", "status", "note", "command"],
        [[t.claim, t.measured, f"**{t.status}**", t.note, f"`{t.command}`"] for t in targets],
        numbers=False)
  return lines + ["", "## Findings", ""] + [f"- {line}" for line in found]


def refresh(out: Path, study, related: dict) -> bool:
  """Rewrites the Targets and Findings of the report in `out` from its summary.json's
  figures with this code's rules (for a report whose runs are no longer on the machine:
  `write` needs them); True if anything changed. The tables and plots stay as written."""
  summary = json.loads((out / "summary.json").read_text())
  targets = targets_for(study, summary["models"], related, study.command(summary["seeds"]))
  found = findings(summary["models"], targets, summary.get("diverged", []))
  path = out / "REPORT.md"
  if not path.is_file():
    raise ChimeraError(f"--refresh: {path} is missing; without --refresh the study writes "
                       f"it again from its runs")
  text = path.read_text()
  heading = "\n## Targets\n" if "\n## Targets\n" in text else "\n## Findings\n"
  start = text.find(heading)
  end = text.find("\n## Plots\n", start)
  if start < 0 or end < 0:
    raise ChimeraError(f"--refresh: {path} lacks the '## Targets' or '## Findings' heading, "
                       f"or a '## Plots' after it (edited by hand?); without --refresh the "
                       f"study writes it again from its runs")
  start += 1
  new_text = text[:start] + "\n".join(_verdicts(targets, found)[1:]) + "\n" + text[end:]
  new_summary = {**summary, "targets": [dataclasses.asdict(t) for t in targets],
                 "findings": found}
  if new_text == text and new_summary == summary:
    return False
  write_atomic(out / "summary.json", json.dumps(new_summary, indent=2).encode())
  write_atomic(out / "REPORT.md", new_text.encode())
  return True


def write(out: Path, *, study, runs: dict[str, list[Run]], speed: list, related: dict,
          command: str, device: str | None = None, diverged: list[dict] = ()) -> dict:
  """Writes REPORT.md, summary.json and PNG plots for `study` (a chimera.compare.Study)
  into `out`; returns what summary.json holds. `speed`: chimera.bench records (may be
  empty); `related`: other studies' summary models that targets read (see targets_for);
  `device`: what wrote the report, when no bench record says it; `diverged`: the runs
  left out on a non-finite loss (chimera.compare.diverged_runs)."""
  out.mkdir(parents=True, exist_ok=True)
  roles = {m.name: m.role for m in study.models}
  baseline = next((m.name for m in study.models if m.role == "baseline"), None)
  by_name = dict(map(bench_figures, speed))
  models = summarize(runs, roles, baseline, {name: figures["train_tokens_per_second"]
                                             for name, figures in by_name.items()})
  seeds = sorted({r.seed for rs in runs.values() for r in rs})
  targets = targets_for(study, models, related, study.command(seeds))
  lines_found = findings(models, targets, diverged)
  first = next(iter(runs.values()))[0].summary
  train = first.config["train"]
  meta = {"title": study.title, "command": command, "preset": study.preset,
          "date": time.strftime("%Y-%m-%d"),
          "device": next((s["device"] for s in by_name.values() if s.get("device")), device),
          "corpus": first.config["data"]["corpus"], "tokenizer": first.config["data"]["tokenizer"],
          "steps": train["steps"], "batch_size": train["batch_size"], "context": train["context"],
          "tokens_per_run": first.tokens_seen, "eval_every": train["eval_every"],
          "eval_tokens": train["eval_batches"] * train["batch_size"] * train["context"],
          "train_split_tokens": _one({r.train_split_tokens for rs in runs.values() for r in rs}),
          "seeds": seeds,
          "code": trained_by(runs), "devices": trained_on_devices(runs),
          "diverged": list(diverged)}
  write_atomic(out / "summary.json", json.dumps(
      {**meta, "models": models, "targets": [dataclasses.asdict(t) for t in targets],
       "findings": lines_found, "speed": by_name}, indent=2).encode())

  plots = [("loss_vs_tokens.png", "validation loss against training tokens",
            study_plots.loss_curves(out / "loss_vs_tokens.png", runs, "tokens_seen",
                                    "training tokens")),
           ("loss_vs_time.png", "validation loss against training seconds",
            study_plots.loss_curves(out / "loss_vs_time.png", runs, "wall_seconds",
                                    "training seconds (downtime excluded)")),
           ("paired_differences.png", "paired differences to dense, per seed",
            study_plots.paired_differences(out / "paired_differences.png", models)),
           ("routing.png", "dropped fraction, MaxVio, router entropy and confidence over training",
            study_plots.routing(out / "routing.png", runs)),
           ("expert_load.png", "per-expert load per layer, last training window",
            study_plots.expert_load(out / "expert_load.png", models)),
           ("throughput.png", "training and decode throughput (bench)",
            study_plots.throughput(out / "throughput.png", by_name))]
  lines = [
      f"# {study.title}", "",
      f"Generated by `{command}` on {meta['date']}"
      + (f" ({meta['device']})" if meta["device"] else "") + ". "
      f"Corpus `{meta['corpus']}`, {meta['tokenizer']} tokens; "
      + training_sentence(runs) + f"; seeds {meta['seeds']}. A unigram model scores "
      f"{first.unigram_val_loss:.4f}." + (split_sentence(meta) if _one(
          {r.summary.tokens_seen for rs in runs.values() for r in rs}) else ""), "",
      code_sentence(meta["code"], meta["devices"]), ""]
  if diverged:
    lines += ["Left out, diverged (a non-finite loss; the figures below have fewer seeds for "
              "these models, and none for a model that diverged in every seed): "
              + "; ".join(f"{d['model']}, seed {d['seed']} ({d['error']})" for d in diverged)
              + ".", ""]
  lines += causality_lines(study)
  lines += [SPREAD_NOTE, ""]
  lines += _tables(models, by_name)
  lines += _verdicts(targets, lines_found)
  for name, _, made in plots:
    if not made and (out / name).exists():  # left by an earlier report of this folder
      (out / name).unlink()
  lines += ["", "## Plots", ""] + [f"![{caption}]({name})\n" for name, caption, made in plots
                                   if made]
  lines += ["Training throughput and wall-clock seconds are measured during training, "
            "evaluation included, downtime between sessions excluded. "
            + ("Bench figures come from `chimera.bench` run after training in one process, "
               "configs interleaved, medians over repeats." if by_name else
               "No bench was run for this report (--bench_repeats=0)."), ""]
  write_atomic(out / "REPORT.md", "\n".join(lines).encode())
  return json.loads((out / "summary.json").read_text())


# --- README's headline: generated from a study's summary.json. -------------------------------

HEADLINE_START = "<!-- headline: {study} (generated by python -m chimera.report --readme=README.md) -->"
HEADLINE_END = "<!-- /headline -->"


def headline(summary: dict, study: str) -> list[str]:
  """README's headline for the study in folder `study` (e.g. "results/cpu"): where the
  numbers come from, one row per model, the best MoE and the targets' tally. Reads only
  summary.json, so the README says what the report says."""
  models = summary["models"]
  lines = [f"From [{study}/REPORT.md]({study}/REPORT.md): `{summary['command']}` on "
           f"{summary['date']} ({summary['device']}), {summary['tokens_per_run']:,} "
           f"{summary['tokenizer']} tokens of `{summary['corpus']}` per run, seeds "
           f"{summary['seeds']}.{split_sentence(summary)} \"a ± b (n=N)\": mean and sample SD "
           f"over N seeds; \"- dense\" is paired by seed.", ""]
  speed = summary.get("speed") or {}
  bench = lambda name: speed.get(name, {}).get("train_tokens_per_second")
  with_bench = any(bench(name) for name in models)
  rows = []
  for name, e in models.items():
    vs = e.get("vs_baseline")
    bench_column = ([f"{bench(name):,.0f}" if bench(name) else "-"] if with_bench else [])
    rows.append([name, describe(e["final_val_loss"]),
                 describe(vs["final_val_loss"], signed=True) if vs else "-",
                 describe(e["val_bits_per_byte"]),
                 describe(vs["token_fraction"], digits=2, suffix="x", missing="not reached")
                 if vs else "-",
                 f"{e['executed_flops_per_token'] / 1e6:.2f}"
                 + _ratio(vs and vs["executed_flops_ratio"]),
                 describe(e["train_tokens_per_second"], digits=0), *bench_column])
  lines += _table(["model", "final val loss", "- dense", "bits/byte",
                   "tokens to dense's final loss", "executed MFLOPs/token",
                   "train tok/s (during training)",
                   *(["train tok/s (bench)"] if with_bench else [])], rows)
  lines += ["", "Tokens/s during training is each run's own clock, with whatever else the "
            "machine ran beside it, so its spread includes the machine's load"
            + ("; the bench's figure is one process after training, every model interleaved, "
               "the median of its repeats, and the one to compare speeds by." if with_bench
               else "; this study ran no bench (--bench_repeats=0).")]
  best = study_targets.best_moe(models)
  if best:
    lines += ["", f"Lowest of the compute-matched MoE configs: **{best}**, "
              + loss_finding(best, models[best]).split(" ", 1)[1]]
  statuses = [t["status"] for t in summary.get("targets", [])]
  if statuses:
    lines += ["", f"Targets: {statuses.count(study_targets.PASS)} pass, "
              f"{statuses.count(study_targets.FAIL)} fail, "
              f"{statuses.count(study_targets.NOT_MEASURED)} not measured, of "
              f"{len(statuses)} (the report's Targets table)."]
  return lines


def readme_headline(text: str, root: Path) -> tuple[int, int, str]:
  """(start, end, block): where README's headline block lies in `text`, and what it must
  say, from the summary.json of the study its start marker names (relative to `root`)."""
  marker = HEADLINE_START.split("{study}")[0]
  start = text.find(marker)
  end = text.find(HEADLINE_END, start) if start >= 0 else -1
  if end < 0:
    raise ChimeraError(f"README has no headline block (a line starting {marker.strip()!r} "
                       f"and one holding {HEADLINE_END!r} after it)")
  study = text[start + len(marker):].split(" ", 1)[0]
  path = root / study / "summary.json"
  if not path.is_file():
    raise ChimeraError(f"README's headline names {study!r}, but {path} does not exist")
  summary = json.loads(path.read_text())
  block = "\n".join([HEADLINE_START.format(study=study), "", *headline(summary, study), ""])
  return start, end, block + "\n"


def update_readme(readme: Path) -> bool:
  """Rewrites README's headline block from its study's summary.json; True if it changed."""
  text = readme.read_text()
  start, end, block = readme_headline(text, readme.parent)
  new = text[:start] + block + text[end:]
  write_atomic(readme, new.encode())
  return new != text


def main(argv):
  del argv
  readme = Path(_README.value)
  try:
    if not readme.is_file():
      raise ChimeraError(f"--readme: {readme} is not a file")
    changed = update_readme(readme)
  except ChimeraError as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)
  print(f"{readme}: headline {'rewritten' if changed else 'already current'}")


if __name__ == "__main__":
  from absl import app, flags
  _README = flags.DEFINE_string("readme", "README.md", "The README whose headline block to "
                                "rewrite from the summary.json its marker names.")
  app.run(main, flags_parser=parse_flags)
