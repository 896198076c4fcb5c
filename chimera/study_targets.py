"""The targets of issue 10, checked against a study's figures (chimera.study_stats).

Each check returns a `Target`: the claim as the issue states it, the command that
measures it, the measured value with its n and spread, and PASS, FAIL or NOT MEASURED.
A target whose measurement does not meet its own conditions (too few seeds, too few
evaluations, a missing run) is NOT MEASURED, never PASS; the thresholds are constants here.
"""

import dataclasses
import math

from chimera.study_stats import common_means, describe, seed_by_seed, worst

MIN_SEEDS = 2  # the study's figures are means over at least this many seeds
BEST_MOE_MARGIN = 0.05  # nats below dense, for the best compute-matched MoE
TOP2_MARGIN = 0.03  # nats below dense, for moe_top2
EXPERT_DOUBLING_DROP = 0.005  # nats, from 8 to 16 and from 16 to 32 experts
TOKEN_FRACTION = 0.7  # of dense's tokens, for the best MoE to reach dense's final loss
EVAL_GAP = 0.10  # evaluations at least every 10% of training
MAX_DROPPED = 0.01  # dropped assignments after warm-up, worst layer
MAX_EXECUTED_RATIO = 1.3  # executed FLOPs per token over dense's

PASS, FAIL, NOT_MEASURED = "PASS", "FAIL", "NOT MEASURED"


@dataclasses.dataclass(frozen=True)
class Target:
  claim: str
  command: str
  measured: str
  status: str
  note: str = ""


def _moe(models: dict) -> dict:
  return {name: e for name, e in models.items() if e["role"] == "moe" and "vs_baseline" in e}


def moe_differences(models: dict) -> dict[str, dict]:
  """Each compute-matched MoE's paired final-loss difference to dense (a Spread JSON),
  where it has one."""
  return {name: e["vs_baseline"]["final_val_loss"] for name, e in _moe(models).items()
          if e["vs_baseline"]["final_val_loss"]["mean"] is not None}


def best_moe(models: dict) -> str | None:
  """The compute-matched MoE with the lowest mean paired difference to dense, the means
  over the seeds every such MoE has (`common_means`); over each one's own seeds only
  when they share none."""
  differences = moe_differences(models)
  if not differences:
    return None
  means, seeds = common_means(differences)
  if not seeds:
    means = {name: spread["mean"] for name, spread in differences.items()}
  return min(differences, key=lambda name: (means[name], name))


def _margin(models: dict, name: str | None, margin: float, claim: str, command: str) -> Target:
  """Mean paired difference name - dense <= -margin, over at least MIN_SEEDS seeds."""
  if name is None or name not in models or "vs_baseline" not in models[name]:
    return Target(claim, command, "-", NOT_MEASURED, "no such run in this study")
  spread = models[name]["vs_baseline"]["final_val_loss"]
  measured = f"{name}: {describe(spread, signed=True)} nats"
  if spread["n"] < MIN_SEEDS:
    return Target(claim, command, measured, NOT_MEASURED,
                  f"n={spread['n']}: the target is a mean over >= {MIN_SEEDS} seeds")
  ok = spread["mean"] <= -margin if margin else spread["mean"] < 0
  return Target(claim, command, measured, PASS if ok else FAIL)


def loss_targets(models: dict, command: str) -> list[Target]:
  best = best_moe(models)
  return [
      _margin(models, best, BEST_MOE_MARGIN,
              f"The best compute-matched MoE ends >= {BEST_MOE_MARGIN} nats below dense", command),
      _margin(models, "moe_top2", TOP2_MARGIN,
              f"moe_top2 ends >= {TOP2_MARGIN} nats below dense", command),
      _margin(models, "moe_top1", 0.0, "moe_top1 ends below dense", command),
  ]


def token_target(models: dict, command: str) -> Target:
  claim = (f"The best MoE reaches dense's final loss in <= {TOKEN_FRACTION}x dense's tokens "
           f"(evaluations every <= {EVAL_GAP:.0%} of training, linear interpolation)")
  best = best_moe(models)
  if best is None:
    return Target(claim, command, "-", NOT_MEASURED, "no compute-matched MoE in this study")
  spread = models[best]["vs_baseline"]["token_fraction"]
  measured = f"{best}: {describe(spread, digits=2, suffix='x', missing='not reached')}"
  gap = max(models[best]["largest_eval_gap"], models["dense"]["largest_eval_gap"])
  if gap > EVAL_GAP + 1e-9:
    return Target(claim, command, measured, NOT_MEASURED,
                  f"evaluations {gap:.0%} of training apart")
  if spread["n"] < len(spread["values"]):
    return Target(claim, command, measured, FAIL,
                  f"dense's final loss not reached in {len(spread['values']) - spread['n']} "
                  f"of {len(spread['values'])} seeds")
  if spread["n"] < MIN_SEEDS:
    return Target(claim, command, measured, NOT_MEASURED,
                  f"n={spread['n']}: the target is a mean over >= {MIN_SEEDS} seeds")
  return Target(claim, command, measured, PASS if spread["mean"] <= TOKEN_FRACTION else FAIL)


def routing_targets(models: dict, command: str) -> list[Target]:
  """Per compute-matched MoE: drops after warm-up and executed FLOPs against dense."""
  out = []
  for name, entry in _moe(models).items():
    dropped = entry["routing"]["dropped_after_warmup"]
    value = worst(dropped)
    claim = (f"{name}: <= {MAX_DROPPED:.0%} of assignments dropped after warmup_steps, "
             f"training capacity, worst layer")
    if value is None:
      out.append(Target(claim, command, "-", NOT_MEASURED, "no training rows after warm-up"))
    else:
      out.append(Target(claim, command, f"{value:.2%} (worst of n={dropped['n']} seeds)",
                        PASS if value <= MAX_DROPPED else FAIL))
    ratio = entry["vs_baseline"]["executed_flops_ratio"]
    claim = f"{name}: executed FLOPs per token <= {MAX_EXECUTED_RATIO}x dense's"
    if ratio is None:
      out.append(Target(claim, command, "-", NOT_MEASURED, "executed FLOPs not recorded"))
    else:
      out.append(Target(claim, command, f"{ratio:.2f}x",
                        PASS if ratio <= MAX_EXECUTED_RATIO else FAIL))
  return out


def expert_sweep_target(models: dict | None, command: str) -> Target:
  """Loss falls >= EXPERT_DOUBLING_DROP from 8 to 16 and 16 to 32 experts, at one k and
  expert size: each step is the mean, over the seeds run at both points, of the paired
  per-seed step (a seed one point lacks is left out), over at least MIN_SEEDS seeds."""
  claim = (f"Number-of-experts sweep (moe_top2's k and expert size): loss falls >= "
           f"{EXPERT_DOUBLING_DROP} nats from 8 to 16 and from 16 to 32 experts")
  points = {}
  for entry in (models or {}).values():
    if entry["role"] == "point":
      points.setdefault((entry["shape"]["top_k"], entry["shape"]["expert_d_ff"]), {})[
          entry["shape"]["num_experts"]] = entry["final_val_loss"]
  series = [p for p in points.values() if {8, 16, 32} <= set(p)]
  if len(points) != 1 or not series:
    return Target(claim, command, "-", NOT_MEASURED,
                  "no sweep of 8, 16 and 32 experts at one k and expert size found")
  losses = series[0]
  steps = [(a, b, seed_by_seed(losses[a], losses[b])) for a, b in ((8, 16), (16, 32))]
  measured = ", ".join(f"{a}->{b}: {describe(step.to_json(), signed=True)}"
                       for a, b, step in steps) + " nats (paired by seed)"
  # Both steps must fall: one that missed over enough seeds decides it whatever the other.
  if any(step.n >= MIN_SEEDS and step.mean > -EXPERT_DOUBLING_DROP for _, _, step in steps):
    return Target(claim, command, measured, FAIL)
  n = min(step.n for _, _, step in steps)
  if n < MIN_SEEDS:
    return Target(claim, command, measured, NOT_MEASURED,
                  f"n={n}: the target is a mean over >= {MIN_SEEDS} seeds")
  return Target(claim, command, measured, PASS)


def _common_means(models: dict, names: list[str]) -> tuple[dict[str, float], list[int]]:
  """Each model's mean final loss over the seeds every one of `names` has, and those seeds."""
  means, seeds = common_means({n: models[n]["final_val_loss"] for n in names})
  return {n: math.inf if mean is None else mean for n, mean in means.items()}, seeds


def ordering_target(models: dict, reference: dict | None, command: str,
                    reference_command: str) -> Target:
  """The models rank by mean final loss in the same order as in the reference study, each
  study's means over the seeds all its models have, at least MIN_SEEDS of them."""
  claim = f"The same ordering of mean final loss as `{reference_command}`"
  if not reference:
    return Target(claim, command, "-", NOT_MEASURED, "no reference study summary found")
  names = [n for n in models if n in reference]
  if len(names) < 2:
    return Target(claim, command, "-", NOT_MEASURED, "fewer than 2 models in both studies")
  (means, seeds), (ref_means, ref_seeds) = (_common_means(m, names) for m in (models, reference))
  here, there = (sorted(names, key=m.get) for m in (means, ref_means))
  measured = " < ".join(here) + f" (n={len(seeds)} per model)"
  if min(len(seeds), len(ref_seeds)) < MIN_SEEDS:
    return Target(claim, command, measured, NOT_MEASURED,
                  f"n={len(seeds)} here, {len(ref_seeds)} in the reference: the order is of "
                  f"means over >= {MIN_SEEDS} seeds; reference: " + " < ".join(there))
  return Target(claim, command, measured, PASS if here == there else FAIL,
                "" if here == there else "reference: " + " < ".join(there))
