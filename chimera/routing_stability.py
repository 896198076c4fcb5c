"""How far a run's routing moves between its checkpoints, and how much of it the token decides.

  python -m chimera.routing_stability --workdir=runs/moe_top2-...  [--batches=N] [--json=FILE]

When the router keeps changing which experts a token goes to ("routing fluctuation",
StableMoE, Dai et al. 2022), each expert keeps being trained on other tokens. For every
checkpoint the run kept (`train.keep_checkpoints`; the study runner's runs keep the last
two and the best), each MoE layer's choice for every token of the run's fixed validation
batches (those its evaluations score; the first N with --batches) is computed as
evaluation makes it: the top k of the router's logits plus the balancing bias, no noise.
Between each pair of consecutive checkpoints it prints, per MoE layer, the fraction of
those tokens whose first expert changed, the fraction whose set of k experts changed, and
that fraction again with the routers (their weights and bias) held at the earlier
checkpoint: the part of the change that the inputs to the router, the representations
the layers below learned meanwhile, make alone. The same checkpoint against itself gives
0, 0 and 0.

For every checkpoint it also prints, per MoE layer, the share of the first expert's
entropy that the current input token alone determines: I(first expert; token) /
H(first expert), from the counts over the same tokens. 1 means the layer routes by token
id, as a lookup table would; 0 means the token says nothing about the expert, so the
choice is made from context. Beside it is the same estimate with the tokens shuffled
against the choices: what the counts give when there is nothing to find (their bias).
"""

import dataclasses
import functools
import json
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from chimera import compile_cache, config as config_lib
from chimera.config import ModelConfig
from chimera.decoder import Decoder
from chimera.errors import ChimeraError, check_writable, parse_flags, tool_main
from chimera.data.corpora import write_atomic
from chimera.evaluate import restore_state, run_config, run_data
from chimera.routers import choose
from chimera.train import saved_steps


@dataclasses.dataclass(frozen=True)
class Change:
  """Between the checkpoints at steps `before` and `after`: per MoE layer (in depth order),
  the fraction of tokens whose first expert changed, and whose set of k experts changed."""

  before: int
  after: int
  first_expert: tuple[float, ...]
  expert_set: tuple[float, ...]
  expert_set_router_held: tuple[float, ...]  # the later model with the earlier routers


@dataclasses.dataclass(frozen=True)
class TokenShare:
  """At the checkpoint of `step`, per MoE layer: the share of the first expert's entropy
  that the current token determines, and the same with the tokens shuffled."""

  step: int
  by_token: tuple[float, ...]
  shuffled: tuple[float, ...]


@dataclasses.dataclass(frozen=True)
class Report:
  changes: list[Change]  # one per pair of consecutive checkpoints
  token_shares: list[TokenShare]  # one per checkpoint


def _is_router(module, method_name: str) -> bool:
  return module.name == "router" and method_name == "__call__"


@functools.partial(jax.jit, static_argnames="config")
def _batch_choices(params, model_state: dict, batch: jax.Array, *,
                   config: ModelConfig) -> jax.Array:
  _, captured = Decoder(config).apply({"params": params, **model_state}, batch[:, :-1],
                                      deterministic=True, capture_intermediates=_is_router,
                                      mutable=["intermediates"])
  blocks = captured["intermediates"]
  biases = model_state.get("router_bias", {})
  chosen = []
  for name in sorted(blocks, key=lambda n: int(n.rsplit("_", 1)[-1])):  # block_<i>
    logits = blocks[name]["moe"]["router"]["__call__"][0]  # [G, S, E]
    bias = biases.get(name, {}).get("moe", {}).get("bias")
    chosen.append(choose(logits, bias, config.top_k).reshape(-1, config.top_k))
  return jnp.stack(chosen)  # [layers, B * L, k]


def expert_choices(config: config_lib.Config, params, model_state: dict,
                   tokens: np.ndarray) -> np.ndarray:
  """Each MoE layer's k experts for every token of tokens [N, B, L+1] (the inputs, the
  last position left out): [layers, N * B * L, k], in the order of the layers and, for
  each, of the experts' scores (the first is the best)."""
  return np.concatenate([np.asarray(_batch_choices(params, model_state, batch,
                                                   config=config.model))
                         for batch in tokens], axis=1)


def input_tokens(tokens: np.ndarray) -> np.ndarray:
  """The token ids of tokens [N, B, L+1] that `expert_choices` routes, in its order:
  [N * B * L]."""
  return tokens[:, :, :-1].reshape(-1)


def _entropy(ids: np.ndarray) -> float:
  counts = np.unique(ids, return_counts=True)[1]
  p = counts / counts.sum()
  return float(-(p * np.log(p)).sum())


def token_share(first: np.ndarray, token_ids: np.ndarray) -> float:
  """I(first; token) / H(first) from the counts of the pairs (first[i], token_ids[i]):
  the share of the first expert's entropy that the token determines. NaN when every
  token goes to the same expert (no entropy to explain)."""
  h_first = _entropy(first)
  if h_first == 0:
    return float("nan")
  joint = first.astype(np.int64) * (int(token_ids.max()) + 1) + token_ids
  return (h_first + _entropy(token_ids) - _entropy(joint)) / h_first


def token_shares(choices: np.ndarray, token_ids: np.ndarray,
                 seed: int = 0) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Per layer of `expert_choices`, `token_share` of its first expert, and the same with
  the token ids shuffled (a fixed permutation)."""
  shuffled = np.random.default_rng(seed).permutation(token_ids)
  return (tuple(token_share(layer[:, 0], token_ids) for layer in choices),
          tuple(token_share(layer[:, 0], shuffled) for layer in choices))


def with_routers_of(params, model_state: dict, earlier_params,
                    earlier_model_state: dict) -> tuple[dict, dict]:
  """(params, model_state) with every router's weights and balancing bias taken from the
  earlier ones: the later model routing through the earlier routers."""
  is_router = lambda path: any(getattr(key, "key", None) == "router" for key in path)
  params = jax.tree_util.tree_map_with_path(
      lambda path, now, then: then if is_router(path) else now, params, earlier_params)
  if "router_bias" in model_state:
    model_state = {**model_state, "router_bias": earlier_model_state["router_bias"]}
  return params, model_state


def changed(before: np.ndarray, after: np.ndarray) -> tuple[tuple[float, ...],
                                                             tuple[float, ...]]:
  """Per layer, the fraction of tokens whose first expert differs between two
  `expert_choices` of the same tokens, and the fraction whose set of experts differs."""
  first = (before[..., 0] != after[..., 0]).mean(axis=1)
  sets = (np.sort(before, axis=-1) != np.sort(after, axis=-1)).any(axis=-1).mean(axis=1)
  return tuple(map(float, first)), tuple(map(float, sets))


def report(workdir: str | Path, batches: int | None = None, corpus: str | None = None) -> Report:
  """The changes between each pair of consecutive checkpoints of the run in `workdir`,
  and each checkpoint's token shares, on its first `batches` validation batches (all of
  them if None). `corpus`: the run's corpus at another path (moved since it trained)."""
  config, last, config_path = run_config(workdir)
  if not config.model.num_experts:
    raise ChimeraError(f"--workdir: {workdir} holds a dense run (model.num_experts=0): "
                       f"nothing is routed")
  steps = saved_steps(Path(workdir))
  if len(steps) < 2:
    raise ChimeraError(f"--workdir: {workdir} holds one checkpoint (step {last}); routing "
                       f"changes need two (train.keep_checkpoints)")
  config, data = run_data(workdir, config, corpus)
  tokens = data.val_batches[:batches]
  token_ids = input_tokens(tokens)
  previous, changes, shares = None, [], []
  for step in steps:
    state = restore_state(workdir, config, step, config_path)
    choices = expert_choices(config, state.params, state.model_state, tokens)
    shares.append(TokenShare(step, *token_shares(choices, token_ids)))
    if previous is not None:
      earlier_step, earlier, earlier_choices = previous
      held = expert_choices(config, *with_routers_of(state.params, state.model_state,
                                                     earlier.params, earlier.model_state),
                            tokens)
      changes.append(Change(earlier_step, step, *changed(earlier_choices, choices),
                            changed(earlier_choices, held)[1]))
    previous = (step, state, choices)
  return Report(changes, shares)


def to_json(result: Report) -> str:
  """The report as JSON, fields in their order; a NaN share (no entropy) as null."""
  fields = dataclasses.asdict(result)
  for share in fields["token_shares"]:
    for key in ("by_token", "shuffled"):
      share[key] = [None if math.isnan(value) else value for value in share[key]]
  return json.dumps(fields, indent=2)


def define_flags() -> None:
  """Command-line flags, defined only when this runs as a program (chimera.evaluate and
  chimera.generate define a --workdir of their own)."""
  flags.DEFINE_string("workdir", None, "A run directory with checkpoints/.")
  flags.DEFINE_integer("batches", None, "Score only the first N validation batches "
                       "(default: all the run's evaluation batches).")
  flags.DEFINE_string("json", None, "Also write the changes to this file, as JSON.")
  flags.DEFINE_string("corpus", None, "The run's corpus at its new path, if it moved since "
                      "the run trained (its text must still be the run's).")


@tool_main
def main(argv):
  del argv
  FLAGS = flags.FLAGS
  logging.set_verbosity(logging.WARNING)  # orbax logs every restore at INFO
  compile_cache.enable()  # a $CHIMERA_CACHE that cannot be a folder is one line (tool_main)
  if not FLAGS.workdir:
    raise ChimeraError("--workdir is required")
  if FLAGS.batches is not None and FLAGS.batches < 1:
    raise ChimeraError(f"--batches: must be >= 1, got {FLAGS.batches}")
  if FLAGS.json:
    check_writable("json", FLAGS.json, folder=False)
  result = report(FLAGS.workdir, FLAGS.batches, FLAGS.corpus)
  changes = result.changes
  layers = len(changes[0].first_expert)
  print("steps | " + " | ".join(f"MoE layer {i}: first expert, expert set changed (routers "
                                f"held)" for i in range(layers)))
  for c in changes:
    print(f"{c.before} -> {c.after} | " + " | ".join(
        f"{f:.1%}, {s:.1%} ({h:.1%})"
        for f, s, h in zip(c.first_expert, c.expert_set, c.expert_set_router_held)))
  print()
  print("step | " + " | ".join(f"MoE layer {i}: first expert's entropy the token determines "
                               f"(tokens shuffled)" for i in range(layers)))
  for share in result.token_shares:
    print(f"{share.step} | " + " | ".join(f"{b:.2f} ({s:.2f})"
                                          for b, s in zip(share.by_token, share.shuffled)))
  if FLAGS.json:  # its folder made if need be, as check_writable said it would be
    write_atomic(Path(FLAGS.json), to_json(result).encode())


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=parse_flags)
