"""Named sweeps for chimera.compare: a base config and the points it is trained at.

  python -m chimera.compare --preset=cpu --sweep=granularity
      # or shared, balancing, capacity, init, calibration, experts_sqrt_lr, experts_best_lr
  python -m chimera.compare --preset=cpu --sweep=model.num_experts=4,8,16,32   # one field

A point is a name and the {"section.field": value} overrides that make it from the base
config (resolved at the study's preset, so sizes follow the preset's d_ff). Every point
states all the fields its sweep is about, so one point of one sweep is the same run as
the same point of another (runs are keyed by their whole config). Adding a sweep is one
function and one entry in SWEEPS.
"""

import dataclasses
import math
from collections.abc import Callable

from chimera.config import Config
from chimera.errors import ChimeraError

Point = tuple[str, dict]

BIAS_RATE = 1e-3  # DeepSeek-V3's bias update speed for auxiliary-loss-free balancing
DEFAULT_BALANCE_COEF = 0.01


@dataclasses.dataclass(frozen=True)
class Sweep:
  question: str  # what the sweep asks, for the report's title
  base: str  # the config file it varies
  points: Callable[[Config], list[Point]]
  varies_num_experts: bool = False  # its report checks the number-of-experts target


def granularity(base: Config) -> list[Point]:
  """Experts split g ways (E*g experts of H/g, top k*g): the total and active expert
  parameters and the model FLOPs stay those of the base; only the router grows."""
  m = base.model
  if m.num_shared_experts:
    raise ChimeraError(f"--sweep=granularity: the base has model.num_shared_experts="
                       f"{m.num_shared_experts}, whose width is expert_d_ff too: splitting "
                       f"the experts would shrink the shared ones and the active parameters")
  points = []
  for g in (1, 2, 4, 8):
    if m.expert_d_ff % g:
      continue
    e, k, h = m.num_experts * g, m.top_k * g, m.expert_d_ff // g
    points.append((f"E={e} k={k} H={h}",
                   {"model.num_experts": e, "model.top_k": k, "model.expert_d_ff": h}))
  return points


def shared_expert(base: Config) -> list[Point]:
  """No shared expert against one shared expert that takes the place of one routed
  choice (DeepSeekMoE): the same expert size and the same active experts per token."""
  m = base.model
  active = m.top_k + m.num_shared_experts
  if active < 2:
    raise ChimeraError(f"--sweep=shared: the base activates {active} expert; need >= 2")
  return [(f"no shared, top-{active}", {"model.num_shared_experts": 0, "model.top_k": active,
                                        "model.expert_d_ff": m.expert_d_ff}),
          (f"1 shared + top-{active - 1}", {"model.num_shared_experts": 1,
                                            "model.top_k": active - 1,
                                            "model.expert_d_ff": m.expert_d_ff})]


def balancing(base: Config) -> list[Point]:
  """Load-balance loss per routing group or per batch, the auxiliary-loss-free bias
  (with and without the batch loss), and no balancing at all."""
  coef = base.model.load_balance_coef or DEFAULT_BALANCE_COEF
  point = lambda scope, loss, rate: {"model.load_balance_scope": scope,
                                     "model.load_balance_coef": coef if loss else 0.0,
                                     "model.router_bias_rate": rate}
  return [("loss per group", point("group", True, 0.0)),
          ("loss per batch", point("batch", True, 0.0)),
          ("bias, no loss", point("group", False, BIAS_RATE)),
          ("bias + loss per batch", point("batch", True, BIAS_RATE)),
          ("none", point("group", False, 0.0))]


def capacity(base: Config) -> list[Point]:
  """Training capacity factor 1.0 / 1.25 / 2.0 on the einsum path, and dropless."""
  del base
  return [(f"capacity {cf}", {"model.dispatch": "einsum", "model.capacity_factor": cf})
          for cf in (1.0, 1.25, 2.0)] + [("dropless", {"model.dispatch": "dropless"})]


def calibration(base: Config) -> list[Point]:
  """moe_top2 as it first shipped (einsum at capacity factor 1.25 over 64-token groups,
  gates not renormalised, balanced per group) against moe_top2 now (dropless, renormalised,
  balanced over the batch). The study's dense and moe_fine runs complete the issue's
  calibration: on the default backbone at 20M tokens, the first moe_top2 had lost its lead
  over dense and the 32-expert top-8 MoE led; this checks the same on the study's backbone."""
  del base
  return [("moe_top2 as first shipped", {"model.dispatch": "einsum",
                                         "model.capacity_factor": 1.25, "model.group_size": 64,
                                         "model.renormalize_gates": False,
                                         "model.load_balance_scope": "group",
                                         "model.router_bias_rate": 0.0}),
          ("moe_top2 now", {"model.dispatch": "dropless", "model.capacity_factor": 1.25,
                            "model.renormalize_gates": True,
                            "model.load_balance_scope": "batch"})]


def initialisation(base: Config) -> list[Point]:
  """The experts' init: Switch's truncated normal at expert_init_scale / fan_in (0.1 by
  default), Switch's at the dense MLP's scale (1.0), and the dense MLP's own (normal
  init_std, output projection scaled by 1/sqrt(2 * layers)). The router's init follows
  expert_init_scale too, so the scale-1.0 point also starts with larger router logits."""
  del base
  return [("switch, scale 0.1", {"model.expert_init": "switch", "model.expert_init_scale": 0.1}),
          ("switch, scale 1.0", {"model.expert_init": "switch", "model.expert_init_scale": 1.0}),
          ("dense MLP's", {"model.expert_init": "dense", "model.expert_init_scale": 0.1})]


def experts_sqrt_lr(base: Config) -> list[Point]:
  """The number of experts (8, 16, 32) at the base's k and expert size, the routed
  experts' learning rate scaled by sqrt(E_base / E): Adam's square-root rule (learning
  rate ~ sqrt(batch)) for the share k / E of a batch that one expert sees, relative to
  the base config's share, at which the schedule's rate was chosen."""
  e_base = base.model.num_experts
  return [(f"E={e}, expert lr x sqrt({e_base}/{e})",
           {"model.num_experts": e, "train.expert_lr_scale": math.sqrt(e_base / e)})
          for e in (8, 16, 32)]


# The routed experts' learning-rate multiple that ended lowest at each number of experts
# (moe_top2's k and expert size, cpu preset), of those tried: 1.0 and 0.5 at E=8 (seed 0);
# 1.0, 0.707 and 0.5 at E=16 (1.0 below 0.707 in seeds 0, 1 and 2; 0.5 level with 1.0 at
# seed 0); 1.0, 0.5 and 0.25 at E=32 (0.5 lowest at seed 0, below 1.0 at seeds 0, 1 and 2).
# results/cpu-sweep-expert_lr_scale-at-num_experts-{16,32}, -num_experts-at-expert_lr_scale-0.5,
# -experts_sqrt_lr.
BEST_MEASURED_EXPERT_LR = {8: 1.0, 16: 1.0, 32: 0.5}


def experts_best_lr(base: Config) -> list[Point]:
  """The number of experts (8, 16, 32) at the base's k and expert size, each point's
  routed experts at the learning-rate multiple that measured best for that E: the most
  that tuning the experts' rate alone gave the number-of-experts target."""
  return [(f"E={e}, expert lr x {scale}",
           {"model.num_experts": e, "train.expert_lr_scale": scale})
          for e, scale in BEST_MEASURED_EXPERT_LR.items()]


SWEEPS: dict[str, Sweep] = {
    "granularity": Sweep("Expert granularity at fixed total and active parameters",
                         "configs/moe_top2.py", granularity),
    "shared": Sweep("A shared expert, on or off, at the same active experts per token",
                    "configs/moe_fine.py", shared_expert),
    "balancing": Sweep("Balancing method", "configs/moe_top2.py", balancing),
    "capacity": Sweep("Training capacity and dropless dispatch", "configs/moe_top2.py",
                      capacity),
    "init": Sweep("Expert initialisation", "configs/moe_top2.py", initialisation),
    "experts_sqrt_lr": Sweep("Number of experts, the experts' learning rate scaled by "
                             "sqrt(E_base / E)", "configs/moe_top2.py", experts_sqrt_lr,
                             varies_num_experts=True),
    "experts_best_lr": Sweep("Number of experts, each at the experts' learning rate that "
                             "measured best for it", "configs/moe_top2.py", experts_best_lr,
                             varies_num_experts=True),
    "calibration": Sweep("moe_top2 as first shipped against moe_top2 now",
                         "configs/moe_top2.py", calibration),
}


def varies_num_experts(sweep: str) -> bool:
  """Whether `--sweep=...` trains points at several numbers of experts: a named sweep
  that says so, or `model.num_experts=...`."""
  if sweep in SWEEPS:
    return SWEEPS[sweep].varies_num_experts
  return sweep.partition("=")[0] == "model.num_experts"


def field_points(key: str, values: list) -> list[Point]:
  """One field at each value (`--sweep=model.num_experts=4,8,16,32`)."""
  return [(f"{key.split('.')[-1]}={value}", {key: value}) for value in values]
