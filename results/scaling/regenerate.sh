#!/usr/bin/env bash
# Every figure of docs/scaling.md, on 8 fake CPU devices: one file per command here.
# Run from the repository root: bash results/scaling/regenerate.sh
set -euo pipefail
export XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu
out=results/scaling
# What these files were measured with: the date, the code and the versions.
{ date -u '+%Y-%m-%d %H:%M UTC'; git log -1 --format='commit %H' 2>/dev/null
  git diff --quiet 2>/dev/null || echo "with uncommitted changes"
  python -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__)"
  nproc; } > "$out/versions.txt"
run() { local name=$1; shift; echo "$ python -m $*" > "$out/$name.txt"; python -m "$@" >> "$out/$name.txt" 2>&1; }
# The einsum table (default moe_top2, einsum dispatch).
run einsum_2x4 chimera.scaling --mesh=2,4 --set=model.dispatch=einsum
run einsum_1x8 chimera.scaling --mesh=1,8 --set=model.dispatch=einsum
run einsum_8x1 chimera.scaling --mesh=8,1 --set=model.dispatch=einsum
run einsum_2x4_E16 chimera.scaling --mesh=2,4 --set=model.dispatch=einsum --set=model.num_experts=16
run einsum_2x4_S256 chimera.scaling --mesh=2,4 --set=model.dispatch=einsum --set=model.group_size=256
# Dropless (the default dispatch) at the default preset, on three meshes.
run dropless_1x8 chimera.scaling --mesh=1,8
run dropless_2x4 chimera.scaling --mesh=2,4
run dropless_8x1 chimera.scaling --mesh=8,1
# Per-op listings, 1 x 1 against 1 x 8, both dispatches.
run hlo_1x8 chimera.scaling_hlo --config=configs/moe_top2.py:tiny --mesh=1,8 \
    --set=train.batch_size=32 --set=train.context=64 --set=model.group_size=64
run hlo_default_1x8 chimera.scaling_hlo --config=configs/moe_top2.py --mesh=1,8
# bfloat16: XLA:CPU widens the exchanges to float32 (the tool says so).
run bf16_tiny_2x4 chimera.scaling --config=configs/moe_top2.py:tiny --mesh=2,4 \
    --set=train.batch_size=32 --set=train.context=64 --set=model.group_size=64 --set=model.dtype=bfloat16
# The evaluation step at grad_accum 1, 4, 16 (it runs the training step's micro-batches).
for dispatch in dropless einsum; do
  echo "$ python results/scaling/eval_step.py $dispatch" > "$out/eval_step_$dispatch.txt"
  python results/scaling/eval_step.py "$dispatch" >> "$out/eval_step_$dispatch.txt" 2>&1
done
