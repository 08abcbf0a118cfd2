#!/usr/bin/env bash
# Sets up a fresh clone: a virtual environment in .venv, PyTorch, and this project installed in
# editable mode (which compiles the C++ CPU kernels, and the CUDA kernels where torch has CUDA and nvcc
# is found). Idempotent: the build is skipped while the sources (csrc/, setup.py, pyproject.toml, the
# stable-ABI target in carafe_kernels/_abi.py), the extras and torch are those of the last successful
# build (a stamp in .venv), so a second run takes seconds.
#   EXTRAS=dev,cares,triton   the optional dependency groups to install (pyproject.toml)
#   TORCH_SPEC=torch==2.13.0  the torch to install when the environment has none (a CPU build here;
#                             the README lists the tested versions)
#   PYTHON=python3            the interpreter that creates .venv
#   FORCE_REBUILD=1           rebuild even when nothing changed
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
EXTRAS=${EXTRAS:-dev,cares,triton}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install -q --upgrade pip "setuptools>=77" wheel ninja
  python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi

build_key() {
  {
    find csrc -type f | LC_ALL=C sort | xargs sha256sum
    sha256sum setup.py pyproject.toml carafe_kernels/_abi.py
    echo "extras=$EXTRAS"
    python -c "import torch; print('torch', torch.__version__, torch.version.cuda)"
  } | sha256sum | cut -d' ' -f1
}
STAMP=.venv/.carafe-kernels-build-key
key=$(build_key)
if [ "${FORCE_REBUILD:-0}" != 1 ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$key" ] \
   && python -c "import torch, carafe_kernels._C" 2>/dev/null; then
  echo "setup_env: sources, extras and torch unchanged since the last build: not rebuilding (FORCE_REBUILD=1 to force)"
else
  python -m pip install -q --upgrade pip "setuptools>=77" wheel ninja
  # --no-build-isolation: build against the torch installed above (no second torch downloaded into an
  # isolated build environment; the result runs on every torch >= 2.10 either way).
  MAX_JOBS=${MAX_JOBS:-2} python -m pip install -q --no-build-isolation -e ".[$EXTRAS]"
  echo "$key" > "$STAMP"
fi
python -c "import carafe_kernels, torch; print('torch', torch.__version__, '| CARAFE backends:', carafe_kernels.backend_status())"
