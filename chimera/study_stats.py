"""The numbers of a study (chimera.compare), computed from the runs' own records.

Pure functions over plain lists, so each can be checked on hand-made numbers:
- `Spread`: one figure over seeds: its values per seed, mean, sample SD and n;
- `paired`: per-seed differences model - baseline (same seed, same tokens, same
  validation subset), then their Spread;
- `tokens_to_reach`: token efficiency, the tokens a curve needs to reach a loss, read by
  linear interpolation between evaluations;
- `value_at`: a curve read at one x (the loss at equal wall-clock time);
- `router_stats` / `router_curves`: dropped fraction, MaxVio, router entropy and
  confidence from the training-window rows of metrics.jsonl.

`Run` ties one finished run's records together; `run_accounting` is the one place that
counts a run's parameters and FLOPs (from its saved config).
"""

import dataclasses
import functools
import itertools
from pathlib import Path

import numpy as np

from chimera import accounting, config as config_lib
from chimera.records import EvalRecord, RunSummary, eval_records, read_all_events


@dataclasses.dataclass(frozen=True)
class Spread:
  """One figure over seeds. `values[i]` belongs to `seeds[i]`; None where it is not
  defined for that seed (e.g. a curve that never reached its target).

  mean and sd are over the defined values; sd is the sample standard deviation
  (ddof=1), None when fewer than 2 values are defined. n counts the defined values.
  """

  seeds: list[int]
  values: list[float | None]
  mean: float | None
  sd: float | None
  n: int

  @classmethod
  def of(cls, per_seed: dict[int, float | None]) -> "Spread":
    seeds = sorted(per_seed)
    values = [None if per_seed[s] is None else float(per_seed[s]) for s in seeds]
    defined = [v for v in values if v is not None]
    mean = float(np.mean(defined)) if defined else None
    sd = float(np.std(defined, ddof=1)) if len(defined) >= 2 else None
    return cls(seeds, values, mean, sd, len(defined))

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


def worst(spread: dict) -> float | None:
  """The largest defined value of a Spread's JSON (for figures where larger is worse)."""
  defined = [v for v in spread["values"] if v is not None]
  return max(defined) if defined else None


def same_sign(spread: dict) -> bool:
  """Every value of a Spread's JSON is defined and all are below zero, or all above."""
  values = spread["values"]
  return bool(values) and None not in values and (
      all(v < 0 for v in values) or all(v > 0 for v in values))


def describe(spread: dict, *, signed: bool = False, digits: int = 4, suffix: str = "",
             missing: str = "undefined") -> str:
  """A Spread's JSON as text: "mean ± SD (n=N)" or "value (n=1)", and how many seeds
  have no value (`missing` says why: "not reached in 1 of 2 seeds")."""
  total = len(spread["values"])
  absent = f"{missing} in {total - spread['n']} of {total} seeds"
  if spread["mean"] is None:
    return absent if total else "-"
  number = lambda v: f"{v:{'+' if signed else ''},.{digits}f}{suffix}"
  text = number(spread["mean"])
  if spread["sd"] is not None:
    text += f" ± {spread['sd']:,.{digits}f}"
  return text + f" (n={spread['n']}" + (f"; {absent})" if spread["n"] < total else ")")


def paired(values: dict[int, float | None], baseline: dict[int, float | None]) -> Spread:
  """Per-seed differences values[s] - baseline[s] over the seeds both have."""
  seeds = sorted(set(values) & set(baseline))
  return Spread.of({s: None if values[s] is None or baseline[s] is None
                    else values[s] - baseline[s] for s in seeds})


def seed_by_seed(a: dict, b: dict) -> Spread:
  """b - a for each seed both Spread JSONs have a value for: a step between two figures
  (e.g. two sweep points' final losses), paired by seed."""
  return paired(dict(zip(b["seeds"], b["values"])), dict(zip(a["seeds"], a["values"])))


def defined_seeds(spread: dict) -> set[int]:
  """The seeds a Spread JSON has a value for."""
  return {s for s, v in zip(spread["seeds"], spread["values"]) if v is not None}


def common_means(spreads: dict[str, dict]) -> tuple[dict[str, float | None], list[int]]:
  """Each Spread JSON's mean over the seeds every one of them has a value for, and those
  seeds: means that can be ranked against each other (a seed one lacks, say a diverged
  run, would otherwise put its seed-to-seed variation into the ranking). Means are None
  when they share no seed."""
  seeds = sorted(set.intersection(*map(defined_seeds, spreads.values()))) if spreads else []
  values = {n: dict(zip(sp["seeds"], sp["values"])) for n, sp in spreads.items()}
  return {n: sum(values[n][s] for s in seeds) / len(seeds) if seeds else None
          for n in spreads}, seeds


def tokens_to_reach(tokens: list[float], losses: list[float], target: float) -> float | None:
  """The tokens at which a validation curve first reaches `target`, interpolated linearly
  between the two evaluations around the crossing. None if it never does.

  With no evaluation before the first one, a curve already at or below `target` at its
  first evaluation gets that evaluation's tokens: an upper bound.
  """
  for index, (x, loss) in enumerate(zip(tokens, losses)):
    if loss <= target:
      if index == 0:
        return float(x)
      x0, loss0 = tokens[index - 1], losses[index - 1]
      return float(x0 + (loss0 - target) / (loss0 - loss) * (x - x0))
  return None


def value_at(xs: list[float], ys: list[float], x: float) -> tuple[float | None, bool]:
  """(y at x, ended_before): the curve interpolated linearly at x.

  Before the first point there is no value (None). Past the last point the curve has
  ended, and its last value is returned with ended_before=True.
  """
  if not xs or x < xs[0]:
    return None, False
  if x > xs[-1]:
    return float(ys[-1]), True
  return float(np.interp(x, xs, ys)), False


# --- Routing figures from the training-window rows. ---------------------------------------


def _windows(rows: list[dict]) -> list[tuple[dict, int, int]]:
  """(row, first_step, steps) per training row: a row averages the steps since the
  previous row (metrics.jsonl drops rows past the checkpoint a run resumed from)."""
  out, previous = [], 0
  for row in rows:
    out.append((row, previous + 1, row["step"] - previous))
    previous = row["step"]
  return out


def max_violation(row: dict) -> list[float]:
  """MaxVio per MoE layer, max load / mean load - 1: the row's own figure where the run
  logged one, else computed from its window-mean expert loads (shares summing to 1)."""
  if row.get("max_violation") is not None:
    return [float(v) for v in row["max_violation"]]
  return [len(load) * max(load) - 1.0 for load in row.get("expert_load", [])]


def router_stats(rows: list[dict], warmup_steps: int) -> dict[str, float | None]:
  """Routing figures of one MoE run, from its training rows (training capacity).

  - dropped_after_warmup: share of assignments dropped over the steps after
    warmup_steps (windows that start after it, step-weighted), in the worst layer;
  - dropped_worst_window: the largest window value after warmup in any layer;
  - max_violation_after_warmup: MaxVio over the same windows, step-weighted, worst layer;
  - router_entropy, router_confidence: the last window, mean over layers.
  """
  after = [(row, steps) for row, first, steps in _windows(rows) if first > warmup_steps]
  empty = dict.fromkeys(("dropped_after_warmup", "dropped_worst_window",
                         "max_violation_after_warmup", "router_entropy",
                         "router_confidence"))
  if not rows or not rows[-1].get("dropped_fraction"):
    return empty
  last = rows[-1]
  stats = {**empty, "router_entropy": _mean(last.get("router_entropy")),
           "router_confidence": _mean(last.get("router_confidence"))}
  if after:
    weights = np.array([steps for _, steps in after], float)
    dropped = np.array([row["dropped_fraction"] for row, _ in after])  # [windows, Y]
    violation = np.array([max_violation(row) for row, _ in after])
    stats["dropped_after_warmup"] = float((weights @ dropped / weights.sum()).max())
    stats["dropped_worst_window"] = float(dropped.max())
    stats["max_violation_after_warmup"] = float((weights @ violation / weights.sum()).max())
  return stats


def router_curves(rows: list[dict]) -> dict[str, list[float]]:
  """Per training row: step, dropped fraction and MaxVio in the worst layer, router
  entropy and confidence averaged over layers (empty lists for a dense run)."""
  rows = [r for r in rows if r.get("dropped_fraction")]
  return {"step": [r["step"] for r in rows],
          "dropped_fraction": [max(r["dropped_fraction"]) for r in rows],
          "max_violation": [max(max_violation(r)) for r in rows],
          "router_entropy": [_mean(r.get("router_entropy")) for r in rows],
          "router_confidence": [_mean(r.get("router_confidence")) for r in rows]}


def _mean(values) -> float | None:
  return float(np.mean(values)) if values else None


# --- One run's records. -------------------------------------------------------------------


def run_accounting(summary: RunSummary) -> accounting.Accounting:
  """Parameters and FLOPs per token (executed: capacity or block padding and dispatch
  included), counted now from the run's saved config by `chimera.accounting.count_run`,
  so that runs summarised before a change to the count are reported by the same rule as
  new ones."""
  return accounting.count_run(config_lib.from_dict(summary.config))


@dataclasses.dataclass(frozen=True)
class Run:
  """One finished run of a study: a model name, a seed and its records."""

  model: str
  seed: int
  summary: RunSummary
  evals: list[EvalRecord]
  train_rows: list[dict]
  # Tokens in the training split the run sampled from (its "setup" record); None if the
  # log has no setup record.
  train_split_tokens: int | None = None

  @classmethod
  def load(cls, workdir: Path, model: str, seed: int) -> "Run":
    events = read_all_events(workdir)  # metrics.jsonl, read once
    setup = events.get("setup")
    return cls(model, seed, RunSummary.load(workdir), eval_records(events.get("eval", [])),
               events.get("train", []), setup[0]["train_tokens"] if setup else None)

  def curve(self, x: str) -> tuple[list[float], list[float]]:
    """The validation curve against "tokens_seen" or "wall_seconds"."""
    return [getattr(e, x) for e in self.evals], [e.val_loss for e in self.evals]

  def seconds(self, clock: str, bench_speed: float | None = None
              ) -> tuple[list[float] | None, float | None]:
    """(seconds at each evaluation, seconds at the end) on one of CLOCKS:
    - "measured": the run's training clock (evaluation and its compilation included; the
      train step is compiled before the clock starts; downtime between sessions excluded);
    - "steady": tokens / the run's steady training throughput (timed steps only), the
      time the run would take with compilation and evaluation left out;
    - "bench": tokens / `bench_speed`, the model's training tokens per second from the
      study's bench (all models interleaved in one process after training), so that runs
      trained under different loads are put on one machine's clock. None without it.
    """
    if clock == "measured":
      return self.curve("wall_seconds")[0], self.summary.wall_seconds
    speed = bench_speed if clock == "bench" else self.summary.train_tokens_per_second
    if not speed:
      return None, None
    return [e.tokens_seen / speed for e in self.evals], self.summary.tokens_seen / speed

  def last_train_loss(self) -> float | None:
    """The training loss of the last logging window (dropout on, if the config has it)."""
    return self.train_rows[-1]["loss"] if self.train_rows else None

  def generalization_gap(self) -> float | None:
    """Final validation loss - last window's training loss: how far a model has begun to
    fit its training text (the study's runs see the corpus more than once)."""
    train = self.last_train_loss()
    final = self.summary.final_val_loss
    return None if train is None or final is None else final - train

  @property
  def warmup_steps(self) -> int:
    return self.summary.config["train"]["warmup_steps"]

  def largest_eval_gap(self) -> float:
    """The longest stretch of training without an evaluation, as a share of the run."""
    steps = [0] + [e.step for e in self.evals]
    return max(b - a for a, b in itertools.pairwise(steps)) / max(self.summary.steps, 1)


# --- A study's figures, per model. ----------------------------------------------------------

CLOCKS = ("measured", "steady", "bench")  # see Run.seconds
ROUTING_FIELDS = ("dropped_after_warmup", "dropped_worst_window", "max_violation_after_warmup",
                  "router_entropy", "router_confidence")


def summarize(runs: dict[str, list[Run]], roles: dict[str, str],
              baseline: str | None = "dense",
              bench_speed: dict[str, float] | None = None) -> dict[str, dict]:
  """Every figure of every model, as JSON-ready dicts (a Spread becomes its `to_json`).

  `roles[name]` says what a model is in the study ("baseline", "moe": a compute-matched
  MoE config, "reference": e.g. dense_wide, "point": a sweep point). Against the
  baseline, each seed is paired with the baseline's run of the same seed. `bench_speed`:
  each model's bench training tokens per second, for the "bench" clock (see Run.seconds).
  """
  base = {r.seed: r for r in runs.get(baseline, [])} if baseline else {}
  speeds = bench_speed or {}
  out = {}
  for name in sorted(runs, key=lambda name: name != baseline):  # the baseline first
    model_runs = runs[name]
    first = model_runs[0].summary
    model = first.config["model"]
    per_seed = functools.partial(_per_seed, model_runs)
    entry = {
        "role": roles[name],
        "shape": {k: model[k] for k in ("num_experts", "top_k", "expert_d_ff", "d_ff",
                                        "num_shared_experts", "dispatch", "capacity_factor")},
        **run_accounting(first)._asdict(),
        "steps": first.steps,
        "tokens_seen": first.tokens_seen,
        "largest_eval_gap": max(r.largest_eval_gap() for r in model_runs),
        "final_val_loss": Spread.of(per_seed(lambda r: r.summary.final_val_loss)).to_json(),
        "val_bits_per_byte": Spread.of(per_seed(lambda r: r.summary.val_bits_per_byte)).to_json(),
        "train_loss": Spread.of(per_seed(Run.last_train_loss)).to_json(),
        "generalization_gap": Spread.of(per_seed(Run.generalization_gap)).to_json(),
        "wall_seconds": Spread.of(per_seed(lambda r: r.summary.wall_seconds)).to_json(),
        "train_tokens_per_second": Spread.of(
            per_seed(lambda r: r.summary.train_tokens_per_second)).to_json(),
        "unigram_val_loss": first.unigram_val_loss,
        "val_curve": val_curve(model_runs),
    }
    if base and name != baseline:
      entry["vs_baseline"] = _against(model_runs, base, entry, out.get(baseline),
                                      (speeds.get(name), speeds.get(baseline)))
    if model["num_experts"]:
      stats = {r.seed: router_stats(r.train_rows, r.warmup_steps) for r in model_runs}
      entry["routing"] = {field: Spread.of({s: v[field] for s, v in stats.items()}).to_json()
                          for field in ROUTING_FIELDS}
      entry["expert_load"] = np.mean([r.summary.expert_load for r in model_runs],
                                     axis=0).tolist()  # [Y, E], last window, mean of seeds
    out[name] = entry
  return {name: out[name] for name in runs}


def val_curve(runs: list[Run]) -> list[dict]:
  """The validation loss at each evaluation step any run made, over seeds: a list of
  {"step": step, **Spread JSON} (a seed's value is None where its run has no such step)."""
  losses = {r.seed: {e.step: e.val_loss for e in r.evals} for r in runs}
  steps = sorted(set().union(*losses.values()))
  return [{"step": step, **Spread.of({seed: by_step.get(step)
                                      for seed, by_step in losses.items()}).to_json()}
          for step in steps]


def _per_seed(runs: list[Run], value) -> dict[int, float | None]:
  return {r.seed: value(r) for r in runs}


def _equal_time(runs: dict[int, Run], base: dict[int, Run], clock: str,
                bench_speeds: tuple[float | None, float | None]) -> dict:
  """Each run's loss at the time its baseline run ended, on one clock (see Run.seconds),
  and its paired difference to the baseline's final loss. bench_speeds: (the model's,
  the baseline's) bench throughput, for the "bench" clock."""
  at_time, ended_before, seconds, missing = {}, 0, {}, {}
  no_clock = "no bench" if clock == "bench" else "no throughput recorded"
  for seed, run in runs.items():
    times, _ = run.seconds(clock, bench_speeds[0])
    base_times, base_end = base[seed].seconds(clock, bench_speeds[1])
    if times is None or base_times is None:
      at_time[seed] = seconds[seed] = None
      missing[no_clock] = missing.get(no_clock, 0) + 1
      continue
    at_time[seed], ended = value_at(times, run.curve("tokens_seen")[1], base_end)
    if at_time[seed] is None:  # dense ended before this run's first evaluation
      missing["no evaluation yet"] = missing.get("no evaluation yet", 0) + 1
    seconds[seed] = base_end
    ended_before += ended
  return {"loss": Spread.of(at_time).to_json(),
          "difference": paired(at_time, {s: base[s].summary.final_val_loss
                                         for s in runs}).to_json(),
          "seconds": Spread.of(seconds).to_json(), "ended_before": ended_before,
          "missing": missing}  # why seeds have no value: {reason: seeds}


def _against(model_runs: list[Run], base: dict[int, Run], entry: dict,
             base_entry: dict | None, bench_speeds: tuple[float | None, float | None]) -> dict:
  """The paired figures of one model against the baseline's runs of the same seeds."""
  runs = {r.seed: r for r in model_runs if r.seed in base}
  final = lambda run: run.summary.final_val_loss
  reach = {}
  for seed, run in runs.items():
    tokens = tokens_to_reach(*run.curve("tokens_seen"), final(base[seed]))
    reach[seed] = None if tokens is None else tokens / base[seed].summary.tokens_seen
  ratio = lambda field: (None if base_entry is None or entry[field] is None
                         or base_entry[field] is None else entry[field] / base_entry[field])
  return {
      "final_val_loss": paired({s: final(r) for s, r in runs.items()},
                               {s: final(base[s]) for s in runs}).to_json(),
      "val_bits_per_byte": paired(
          {s: r.summary.val_bits_per_byte for s, r in runs.items()},
          {s: base[s].summary.val_bits_per_byte for s in runs}).to_json(),
      "token_fraction": Spread.of(reach).to_json(),
      "equal_time": {clock: _equal_time(runs, base, clock, bench_speeds) for clock in CLOCKS},
      "params_total_ratio": ratio("params_total"),
      "flops_ratio": ratio("flops_per_token"),
      "executed_flops_ratio": ratio("executed_flops_per_token"),
  }
