"""The train step compiled with each set of XLA compiler options, timed interleaved:
seconds per step over 5 steps dispatched back to back, medians of REPEATS rounds.

  python results/cpu-experiments/cpu-dots/options.py CONFIGS OPTIONS_JSON [REPEATS]

CONFIGS: comma-separated config specs; OPTIONS_JSON: {"name": {option: value, ...}, ...}.
The commands and their output are in options.txt.
"""
import functools, json, sys, time
import jax, numpy as np
from chimera import config as config_lib
from chimera.bench import token_batches
from chimera.decoder import Decoder
from chimera.steps import init_state, train_step
specs = sys.argv[1].split(",")
OPTS = json.loads(sys.argv[2])
repeats = int(sys.argv[3]) if len(sys.argv) > 3 else 5
subjects = []
for spec in specs:
  c = config_lib.load(spec)
  for name, opts in OPTS.items():
    state = init_state(c)
    batches = [jax.device_put(b) for b in token_batches(c, 4, False)]
    f = jax.jit(functools.partial(train_step, model=Decoder(c.model), config=c.model,
                                  log_norms=c.train.log_norms), donate_argnums=0,
                compiler_options=opts or None).lower(state, batches[0], jax.random.key(0)).compile()
    subjects.append([f"{spec} {name}", f, state, batches, []])
def run(s, steps=5):
  _, f, state, batches, times = s
  t = time.perf_counter()
  for i in range(steps):
    state, m = f(state, batches[i % 4], jax.random.key(0))
  jax.block_until_ready((state, m)); s[2] = state
  return (time.perf_counter() - t) / steps
for s in subjects: run(s, 2)
for _ in range(repeats):
  for s in subjects: s[4].append(run(s))
for s in subjects: print(f"{s[0]:50s} {np.median(s[4]):.4f}")
