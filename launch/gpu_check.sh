#!/usr/bin/env bash
# Every GPU figure of issue 11 ("Speed on real text") on the gpu preset, and issue 10's
# gpu-small study, over two or three calls of up to 10 minutes (STAGES splits them).
#
#   CHIMERA_CACHE=.gpu-cache STAGES="main train" launch/gpu_check.sh   # figures under $OUT
#   CHIMERA_CACHE=.gpu-cache STAGES="study d1024" launch/gpu_check.sh  # the next call
#   DEADLINE=600 STEPS=100 STUDY=0 launch/gpu_check.sh       # more time, longer runs, no study
#   STAGES="loss train_dense numerics" launch/gpu_check.sh  # only these stages ("train": all 4)
#
# Made for a lent GPU with no network: the project must import (run from the repository
# root with PYTHONPATH=., which needs nothing installed; an offline
# `pip install --no-deps --no-build-isolation -e .` needs setuptools >= 70.1, or an older
# one with the wheel package, already installed), and $CHIMERA_CACHE must already hold the
# Shakespeare texts and GPT-2's ranks (and, to save a few seconds, their token cache).
# Fill it on a machine with the network first:
#   CHIMERA_CACHE=.gpu-cache python -m chimera.data --corpus=shakespeare --tokenizer=gpt2
#
# Stages, in this order (most important first); each is cut off at DEADLINE seconds after
# the start (default 540), and a stage with under 30 s left is skipped. Measured on an
# H100 (results/gpu/h100), compiles included: main 115 s, each train run 46-51 s, d1024
# 124 s, the study over 242 s (it trained every model, then ran out of time in its bench).
# On an H200 (results/gpu/h200), with PROFILE=0: main 71 s, each train run 23-43 s, the
# study without its sweep and bench 137 s, d1024 87 s; that call took 433 s in all.
# All stages do not fit in one call's 10 minutes: split them with STAGES across calls.
#   main      chimera.bench, dense and MoE top-2: step time, tokens/s, MFU against the
#             nominal and the measured peak, decode at batch 1 and 8, and (PROFILE=0: not)
#             a profile of where each step's time goes (by model part and pass, costliest
#             ops); the traces and HLO are kept in $OUT/profile.tgz, to read again offline
#   train     chimera.main for STEPS steps (default 60) of dense as shipped and with
#             train.log_norms off, MoE top-2 as shipped (dropless) and with einsum
#             dispatch: summary.json's train_tokens_per_second, to compare with the bench's
#   study     issue 10's `chimera.compare --preset=gpu-small`, one seed per model (STUDY=0:
#             none; STUDY_BENCH=0: no speed bench); SWEEP=model.num_experts=4,8,16,32 adds
#             the expert sweep first, at SWEEP_SEEDS (default 0,1: its target is a mean
#             over at least 2 seeds, so one seed would spend device time on a NOT MEASURED);
#             the reports in $OUT/study_results.tgz, the runs' logs and configs in
#             $OUT/study_runs.tgz
#   dropless  MoE top-2, einsum against dropless dispatch (grouped matmul: "blocks")
#   d1024     dense and MoE at d_model 1024, 12 layers: MFU
#   grouped   the grouped matmul alone at the MoE's shapes: ragged_dot against blocks
#   dense     dense: real text against random ids, and the embedding-gradient kernels
#   numerics  the fast paths against float32 references at full size (cuDNN attention,
#             embedding gradients, cross-entropy, grouped matmul): relative errors
#   loss      dense: the cross-entropy's logsumexp in one pass against two
#   attention dense: cuDNN flash attention ("auto") against XLA's
#   cublas    dense and MoE with XLA_FLAGS=--xla_gpu_enable_triton_gemm=false (every dot
#             through cuBLAS), against the main stage's step
# Writes to $OUT (default results/gpu/check): gpu_check.log (everything printed, versions
# first; each call appends), bench_<stage>.json (chimera.bench records), profile.tgz,
# train.json ({model: summary.json}; rewritten only by a call whose train stages ran), and
# the study's two .tgz files. A lent device sends back at most 8 files from its $OUT: a
# call of "main train study" writes 6. Exits 1 if any stage failed; a skipped stage (no
# time left) is named in the last line but does not fail the call.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-results/gpu/check}
DEADLINE=${DEADLINE:-540}
STEPS=${STEPS:-60}
PYTHON=${PYTHON:-python3}
RUNS=${RUNS:-/tmp/chimera-runs}  # the train stages' workdirs
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# Stages share compiled executables: the dense step compiled for "main" is reused later.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/chimera-jax-cache}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
export JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0
# Appended: calls split with STAGES write into one OUT without losing each other's lines.
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
echo "== gpu_check.sh, $(date -u '+%Y-%m-%d %H:%M:%S UTC'), STAGES='${STAGES:-all}'"

DENSE=${DENSE:-configs/dense.py:gpu}  # other presets (tiny) only to try the script out
MOE=${MOE:-configs/moe_top2.py:gpu}
BENCH=(-m chimera.bench --repeats=3 --steps=10 --decode_batches= --nomoe_split)

wanted() {  # wanted NAME: the stage is among the STAGES asked for (all without STAGES)
  [[ -z ${STAGES:-} || " $STAGES " == *" ${1%% *} "* || " $STAGES " == *" ${1// /_} "* ]]
}

FAILED=() SKIPPED=() TRAINED=0
stage() {  # stage NAME COMMAND...: runs COMMAND with whatever is left before DEADLINE
  local name=$1 left=$(( DEADLINE - SECONDS ))
  shift
  wanted "$name" || return 0
  if (( left < 30 )); then
    echo "== $name: skipped, ${left}s left of ${DEADLINE}s"
    SKIPPED+=("$name")
    return
  fi
  # A warm machine's earlier runs would be resumed, not timed: cleared before the first
  # train stage that runs (a call whose train stages are all skipped keeps them).
  if [[ $name == train\ * ]] && (( ! TRAINED )); then
    rm -rf "$RUNS"
    TRAINED=1
  fi
  echo "== $name: $* (at ${SECONDS}s, ${left}s left)"
  timeout "$left" "$@" || { echo "== $name: stopped with exit code $?"; FAILED+=("$name"); }
}

echo "== versions"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader || true
"$PYTHON" -c "import jax, jaxlib, flax, optax; print('jax', jax.__version__, 'jaxlib', \
jaxlib.__version__, 'flax', flax.__version__, 'optax', optax.__version__); print(jax.devices())"
git log -1 --format='commit %H %s' 2>/dev/null || true

PROFILE_ARGS=(--profile --profile_dir="$OUT/profile")
[[ ${PROFILE:-1} == 0 ]] && PROFILE_ARGS=()
stage main "$PYTHON" "${BENCH[@]}" --configs=$DENSE,$MOE --decode_batches=1,8 \
  "${PROFILE_ARGS[@]}" --json="$OUT/bench_main.json"
# One file, not a dozen: a lent device sends back at most 8 files.
if [[ -d $OUT/profile ]]; then
  tar -czf "$OUT/profile.tgz" -C "$OUT" profile && rm -rf "$OUT/profile"
fi
# Dense as shipped, then without the per-step parameter and update norms; the MoE as
# shipped (dropless dispatch), then with einsum dispatch.
for run in "$DENSE" "$DENSE --config.train.log_norms=false" "$MOE" \
    "$MOE --config.model.dispatch=einsum"; do
  spec=${run%% *}
  name=$(basename "${spec%%:*}" .py)
  [[ $run == *dispatch=einsum ]] && name+=_einsum
  [[ $run == *log_norms=false ]] && name+=_no_norms
  stage "train $name" "$PYTHON" -m chimera.main --config=$run \
    --workdir="$RUNS/$name" --config.train.steps="$STEPS" \
    --config.train.warmup_steps=$(( STEPS / 6 )) --config.train.log_every=$(( STEPS < 60 ? (STEPS + 2) / 3 : 20 )) \
    --config.train.eval_every="$STEPS" --config.train.eval_batches=4 \
    --config.train.checkpoint_every="$STEPS"
done
(( TRAINED )) && "$PYTHON" - "$OUT/train.json" "$RUNS" <<'EOF'
import json, pathlib, sys
runs = {p.parent.name: json.loads(p.read_text())
        for p in pathlib.Path(sys.argv[2]).glob("*/summary.json")}
if runs:  # no run finished: the earlier call's train.json stays
  pathlib.Path(sys.argv[1]).write_text(json.dumps(runs, indent=2))
else:
  print("== train: no run finished; train.json left as it was")
for name, summary in runs.items():
  print(f"chimera.main {name}: train_tokens_per_second {summary.get('train_tokens_per_second')}")
EOF
# Issue 10's gpu-small study, one seed per model (with SWEEP, its expert sweep first, which
# the study's targets read, at SWEEP_SEEDS); reports in results/gpu-small*/.
# STUDY_BENCH=0 leaves out its speed bench. The runs' logs and configs (no checkpoints)
# come back in $OUT/study_runs.tgz, to write the reports again offline
# (`chimera.compare --preset=gpu-small --runs=DIR --report_only`).
SWEEP=${SWEEP:-}
if [[ ${STUDY:-1} == 1 && ( -z ${STAGES:-} || " $STAGES " == *" study "* ) ]]; then
  study=(-m chimera.compare --preset=gpu-small --runs=/tmp/chimera-study ${STUDY_ARGS:-})
  started=$(mktemp)  # reports written after this are this call's, not the checkout's
  [[ -n $SWEEP ]] && stage "study sweep" "$PYTHON" "${study[@]}" --sweep="$SWEEP" \
    --seeds="${SWEEP_SEEDS:-0,1}" --bench_repeats=0
  stage study "$PYTHON" "${study[@]}" --bench_repeats="${STUDY_BENCH:-1}"
  mapfile -t written < <(find results -path 'results/gpu-small*' -type f -newer "$started")
  if (( ${#written[@]} )); then
    tar -czf "$OUT/study_results.tgz" "${written[@]}"
  else
    echo "== study: no report written in this call; no study_results.tgz"
  fi
  tar -czf "$OUT/study_runs.tgz" --exclude=checkpoints --exclude=tensorboard --exclude=.lock \
    -C /tmp chimera-study 2>/dev/null
fi
stage dropless "$PYTHON" "${BENCH[@]}" --configs=$MOE \
  --variants=model.dispatch=einsum,dropless --json="$OUT/bench_dropless.json"
stage d1024 "$PYTHON" "${BENCH[@]}" --configs=$DENSE,$MOE --set=model.d_model=1024 \
  --set=model.num_layers=12 --json="$OUT/bench_d1024.json"
stage grouped "$PYTHON" -m chimera.bench_grouped --config=$MOE
stage dense "$PYTHON" "${BENCH[@]}" --configs=$DENSE --variants=ids=corpus,random \
  --variants=kernels.embed_grad=onehot,sorted,scatter --json="$OUT/bench_dense.json"
stage numerics "$PYTHON" -m chimera.bench_numerics --config=$MOE
stage loss "$PYTHON" "${BENCH[@]}" --configs=$DENSE \
  --variants=kernels.cross_entropy=two_pass,one_pass --json="$OUT/bench_loss.json"
stage attention "$PYTHON" "${BENCH[@]}" --configs=$DENSE --variants=kernels.attention=auto,xla \
  --json="$OUT/bench_attention.json"
# XLA's own GEMMs (Triton) against cuBLAS for every dot: one environment variable, no code.
stage cublas env XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_triton_gemm=false" "$PYTHON" \
  "${BENCH[@]}" --configs=$DENSE,$MOE --json="$OUT/bench_cublas.json"
echo "== done at ${SECONDS}s"
(( ${#SKIPPED[@]} )) && echo "== skipped (no time left): ${SKIPPED[*]}"
if (( ${#FAILED[@]} )); then
  echo "== failed: ${FAILED[*]}"
  exit 1
fi
