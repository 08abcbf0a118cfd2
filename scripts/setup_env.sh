#!/usr/bin/env bash
# Sets up a fresh clone: a virtual environment in .venv, PyTorch, and this project installed in
# editable mode (which compiles the C++ CPU kernels, and the CUDA kernels where torch has CUDA and nvcc
# is found). Idempotent: a second run only re-checks.
#   EXTRAS=dev,cares,triton   the optional dependency groups to install (pyproject.toml)
#   TORCH_SPEC=torch==2.13.0  the torch to install when the environment has none (a CPU build here)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install -q --upgrade pip "setuptools>=77" wheel ninja
python -c "import torch" 2>/dev/null || python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
# --no-build-isolation: build against the torch installed above (the extension must match its ABI).
MAX_JOBS=${MAX_JOBS:-2} python -m pip install -q --no-build-isolation -e ".[${EXTRAS:-dev,cares,triton}]"
python -c "import carafe_kernels, torch; print('torch', torch.__version__, '| CARAFE backends:', carafe_kernels.backend_status())"
