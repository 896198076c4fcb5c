#!/usr/bin/env bash
# The test suite at the dependency floors of pyproject.toml: a fresh virtual environment
# with every runtime dependency pinned to its floor, the project installed with --no-deps,
# then pytest on two workers. The [dev] extras' datasets is left out (its tests,
# tests/data/test_hf.py, are left out with it). Needs PyPI; about 20 s to install and
# about 8 minutes to test on 2 idle cores. Run from the repository root:
#   bash results/floors/run.sh [VENV_DIR]
set -eu
venv="${1:-/tmp/chimera-floors}"
python3 -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip
"$venv/bin/pip" install -q "jax==0.10.2" "jaxlib==0.10.2" "flax==0.12.8" "optax==0.2.8" \
    "orbax-checkpoint==0.12.8" "ml-collections==0.1.1" "tiktoken==0.11.0" "chex==0.1.92" \
    "absl-py==2.5.1" "numpy==2.0.0" "tensorboardX==2.6.2.2" "matplotlib==3.9.0" \
    "pytest>=8.0" "pytest-xdist>=3.5"
"$venv/bin/pip" install -q --no-deps -e .
"$venv/bin/pip" list 2>/dev/null | grep -i -E "^(jax|jaxlib|flax|optax|orbax-checkpoint|ml.collections|tiktoken|chex|absl-py|numpy|tensorboardx|matplotlib) "
"$venv/bin/python" -m pytest -q -n 2 -p no:cacheprovider tests --ignore=tests/data/test_hf.py
