import functools, time, sys
import jax, jax.numpy as jnp, numpy as np
from chimera import grouped_matmul as gm
from chimera.moe import dropless_experts

@jax.custom_vjp
def gather_weights(weights, block_group):
    return jnp.take(weights, block_group, axis=0, mode="fill", fill_value=0)
def _fwd(weights, block_group):
    return gather_weights(weights, block_group), (block_group, weights.shape[0])
def _bwd(res, g):
    block_group, E = res
    onehot = jax.nn.one_hot(block_group, E, dtype=g.dtype)  # [N, E]
    flat = g.reshape(g.shape[0], -1)  # [N, M*H]
    dw = jax.lax.dot_general(onehot, flat, (((0,), (0,)), ((), ())))  # [E, M*H]
    return dw.reshape((E,) + g.shape[1:]), None
gather_weights.defvjp(_fwd, _bwd)

def blocks_matmul_new(blocks, weights, block_group):
    return jnp.einsum("nbm,nmh->nbh", blocks, gather_weights(weights, block_group))

T, K, E, M, H = 4096, 2, 8, 192, 384
rng = np.random.default_rng(0)
x = jnp.asarray(rng.normal(size=(T, M)), jnp.float32)
logits = rng.normal(size=(T, E)) * 2
idx = jnp.asarray(np.argsort(-logits, axis=1)[:, :K], jnp.int32)
gate = jnp.asarray(rng.uniform(size=(T, K)), jnp.float32)
w = {"wi": jnp.asarray(rng.normal(size=(E, M, H)) * 0.05, jnp.float32),
     "wo": jnp.asarray(rng.normal(size=(E, H, M)) * 0.05, jnp.float32)}

def loss(x, w, gate):
    return jnp.sum(dropless_experts(x, gate, idx, w, "gelu") ** 2)
g = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
def run(n):
    r = g(x, w, gate); jax.block_until_ready(r)
    ts = []
    for _ in range(n):
        s = time.perf_counter(); jax.block_until_ready(g(x, w, gate)); ts.append(time.perf_counter() - s)
    return r, ts
old = gm.blocks_matmul
res = {}
times = {"old": [], "new": []}
for rnd in range(6):
    for name in ("old", "new"):
        gm.blocks_matmul = old if name == "old" else blocks_matmul_new
        import chimera.moe as moe; moe.blocks_matmul = gm.blocks_matmul
        g = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        r, ts = run(5)
        res[name] = r; times[name] += ts
for k, v in times.items(): print(k, "median ms", np.median(v) * 1e3)
chex = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(a)) + 1e-30)), res["old"], res["new"])
print(chex)
