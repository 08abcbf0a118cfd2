#!/usr/bin/env bash
# Builds the wheel for a GPU machine, here, without a GPU: abi3 (every Python >= 3.10), on PyTorch's
# stable ABI (every torch >= 2.10, carafe_kernels/_abi.py), with the CUDA library compiled for CUDA 13
# and sm_80 + sm_90 + PTX (which later GPUs JIT-compile). It runs beside any cu13 torch >= 2.10 (e.g.
# 2.11.0+cu130 on Python 3.12) without compiling anything there:
#   pip install --no-deps --no-index carafe_kernels-*.whl
#   usage: scripts/build_gpu_wheel.sh [OUT_DIR]     (default .whl/; prints the wheel's path last)
#   GPU_TORCH=torch==2.14.1   the cu13 torch to build under (installed into GPU_VENV if missing)
#   GPU_VENV=.venv-newest-torch
#   TORCH_CUDA_ARCH_LIST="8.0;9.0+PTX", CUDA_HOME, MAX_JOBS, NVCC_THREADS: as setup.py documents
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-.whl}
VENV=${GPU_VENV:-$PWD/.venv-newest-torch}
[ -x "$VENV/bin/python" ] || "${PYTHON:-python3}" -m venv "$VENV"
"$VENV/bin/python" -c "import torch" 2>/dev/null || \
  "$VENV/bin/python" -m pip install -q "setuptools>=77" wheel ninja "${GPU_TORCH:-torch==2.14.1}"
cuda=$("$VENV/bin/python" -c "import torch; print(torch.version.cuda or '')")
case "$cuda" in
  13.*) ;;
  *) echo "build_gpu_wheel: $VENV has a torch with CUDA '${cuda:-none}', not CUDA 13" >&2; exit 1 ;;
esac
PYTHON="$VENV/bin/python" TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0+PTX} CARAFE_FORCE_CUDA=1 \
  bash scripts/build_wheel.sh "$OUT"
