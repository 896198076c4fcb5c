"""Driver for tests/test_expert_parallel.py, on 8 fake CPU devices (XLA_FLAGS must name
them before jax is imported, so each run is its own process):

  python tests/expert_parallel_run.py layer DATA EXPERT OUT.npz
      The MoE layer's output and gradients, for each case of CASES, on one device and on a
      DATA x EXPERT mesh; the number of all-to-alls in the sharded layer's HLO, and the
      collectives whose arrays grow with the batch (compiled again at twice the batch).
      Every registered router has a case on both paths.
  python tests/expert_parallel_run.py hlo DISPATCH OUT.json
      The train step of configs/moe_top2.py:tiny (issue 13's setting) compiled on 1 x 8:
      its all-to-alls, and the collectives whose arrays grow with the batch
      (`chimera.scaling_hlo.token_sized`).

Shape letters as in chimera/moe.py: B batch, L length, M model dim, E experts.
"""

import dataclasses
import json
import os
import sys

os.environ["XLA_FLAGS"] = (f"{os.environ.get('XLA_FLAGS', '')} "  # the suite's (conftest)
                           "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from chimera import scaling, scaling_hlo, sharding  # noqa: E402
from chimera.config import MeshConfig, ModelConfig  # noqa: E402
from chimera.moe import MoeLayer  # noqa: E402
from chimera.routers import ROUTERS  # noqa: E402

BATCH, LENGTH, D_MODEL, NUM_EXPERTS = 8, 16, 8, 8
# name -> (ModelConfig changes, whether every token chooses experts 0 and 1)
CASES = {
    "dropless_k2": (dict(top_k=2), False),
    "dropless_k1_swiglu": (dict(top_k=1, activation="swiglu"), False),
    # The worst case of the padded exchange: every row of every device goes to the owner
    # of experts 0 and 1, and exactly fills its buffers.
    "dropless_k2_skewed": (dict(top_k=2), True),
    "einsum_k2": (dict(top_k=2, dispatch="einsum", capacity_factor=1.0), False),
    # Training noise on the choice (model.router_noise): the same draws on any mesh.
    "dropless_k2_noise": (dict(top_k=2, router_noise=0.5), False),
    "einsum_k2_noise": (dict(top_k=2, dispatch="einsum", capacity_factor=1.0,
                             router_noise=0.5), False),
}
for _router in sorted(set(ROUTERS) - {ModelConfig.router}):
  CASES[f"dropless_k2_{_router}"] = (dict(top_k=2, router=_router), False)
  CASES[f"einsum_k2_{_router}"] = (dict(top_k=2, dispatch="einsum", capacity_factor=1.0,
                                        router=_router), False)


def layer_config(changes: dict) -> ModelConfig:
  changes = {"dispatch": "dropless", **changes}
  return ModelConfig(d_model=D_MODEL, num_experts=NUM_EXPERTS, expert_d_ff=16, group_size=LENGTH,
                     dropout=0.0, router_jitter=0.0, load_balance_scope="batch", **changes)


def inputs(cfg: ModelConfig, skewed: bool, seed: int = 0, batch: int = BATCH):
  """params, x [B, L, M] and a cotangent for y. Skewed: x[..., 0] > 0 and a router whose
  logits for experts 0 and 1 grow with it, so that every token picks those two."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(batch, LENGTH, D_MODEL)).astype(np.float32)
  shapes = jax.eval_shape(lambda: MoeLayer(cfg).init(jax.random.key(0), x, deterministic=True))
  params = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32)
                        / np.sqrt(p.shape[-2]), shapes["params"])
  if skewed:
    x[..., 0] = np.abs(x[..., 0]) + 1.0
    router = np.zeros((D_MODEL, NUM_EXPERTS), np.float32)
    router[0, :2] = (20.0, 10.0)
    params["router"]["kernel"] = router
  cotangent = rng.normal(size=x.shape).astype(np.float32)
  return params, x, cotangent


def value_and_grad(cfg: ModelConfig):
  def loss(params, x, cotangent):
    y, routing = MoeLayer(cfg).apply({"params": params}, x, deterministic=False,
                                     rngs={"dropout": jax.random.key(3)})
    return jnp.sum(y * cotangent) + routing.load_balance_loss + routing.z_loss, y
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))


def flat(prefix: str, tree) -> dict:
  return {f"{prefix}/" + "/".join(str(getattr(k, "key", k)) for k in path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def run_layer(data: int, expert: int, out: str):
  mesh = sharding.make_mesh(MeshConfig(data, expert))
  results = {}
  for name, (changes, skewed) in CASES.items():
    cfg = layer_config(changes)
    params, x, cotangent = inputs(cfg, skewed)
    step = value_and_grad(cfg)
    (_, y), grads = step(params, x, cotangent)  # one device, no mesh
    results |= flat(f"{name}/single", {"y": y, "grads": grads})
    with jax.set_mesh(mesh):
      put = lambda a, spec: jax.device_put(a, jax.sharding.NamedSharding(mesh, spec))
      # The layer's expert weights [E, ...] split over `expert`, as chimera.sharding does.
      params = {name: put(p, sharding.P(sharding.EXPERT) if name in sharding.EXPERT_WEIGHTS
                          else sharding.P()) for name, p in params.items()}
      x, cotangent = put(x, sharding.P(sharding.BATCH)), put(cotangent, sharding.P(sharding.BATCH))
      (_, y), grads = step(params, x, cotangent)
      hlo = step.lower(params, x, cotangent).compile().as_text()
      _, x2, cotangent2 = inputs(cfg, skewed, batch=2 * BATCH)
      x2, cotangent2 = put(x2, sharding.P(sharding.BATCH)), put(cotangent2, sharding.P(sharding.BATCH))
      doubled = step.lower(params, x2, cotangent2).compile().as_text()
    results |= flat(f"{name}/sharded", {"y": y, "grads": grads})
    results[f"{name}/all_to_alls"] = np.asarray(
        sum(c.kind == "all-to-all" for c in scaling.collectives(hlo)))
    grown = scaling_hlo.token_sized(hlo, doubled)
    results[f"{name}/token_sized"] = np.asarray(len(grown))
    if grown:
      print(name, "collectives that grow with the batch:", grown, file=sys.stderr)
  np.savez(out, **results)


def run_hlo(dispatch: str, out: str):
  overrides = {"train.batch_size": 32, "train.context": 64, "model.group_size": 64,
               "model.dispatch": dispatch}
  spec = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "configs", "moe_top2.py") + ":tiny"
  report, text = scaling_hlo.measure(spec, overrides, 1, 8)
  _, doubled = scaling_hlo.compile_step(spec, scaling_hlo.doubled(overrides, 32), 1, 8)
  with open(out, "w") as f:
    json.dump({"all_to_alls": [dataclasses.asdict(c) for c in report.all_to_alls],
               "predicted_all_to_all_bytes": report.predicted_all_to_all_bytes,
               "token_sized": scaling_hlo.token_sized(text, doubled.as_text()),
               "other_collectives": sum(c.kind != "all-to-all"
                                        for c in scaling.collectives(text))}, f)


if __name__ == "__main__":
  assert jax.device_count() == 8
  if sys.argv[1] == "layer":
    run_layer(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
  else:
    run_hlo(sys.argv[2], sys.argv[3])
