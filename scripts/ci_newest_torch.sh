#!/usr/bin/env bash
# CI leg: the full extension (CPU kernels, CUDA glue and CUDA kernels) built against the newest torch
# pip installs here, a CUDA build, then the CPU op tests on it. No GPU is needed: the CUDA part is
# compiled (for one architecture, to keep the time down) and must load; its kernels are not run.
#   NEWEST_TORCH=torch==2.14.1      the torch to build against
#   NEWEST_VENV=.venv-newest-torch  its virtual environment (kept between runs: torch is ~3 GB)
#   TORCH_CUDA_ARCH_LIST=9.0        the architectures to compile
#   CUDA_HOME                       the toolkit; by default setup.py finds it (beside nvcc's prefix)
#   MAX_JOBS=2                      parallel compile jobs
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PYTHON=${PYTHON:-python3}
VENV=${NEWEST_VENV:-$REPO/.venv-newest-torch}
SPEC=${NEWEST_TORCH:-torch==2.14.1}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q "setuptools>=77" wheel ninja pytest numpy "$SPEC"

# Build in a copy of the tracked sources: an in-place build here would replace the extension that the
# main environment (another torch) uses.
SRC="$VENV/src"
rm -rf "$SRC" && mkdir -p "$SRC"
git ls-files -z | xargs -0 cp --parents -t "$SRC"
cd "$SRC"
start=$(date +%s)
TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-2} CARAFE_FORCE_CUDA=1 \
  "$VENV/bin/python" setup.py -q build_ext --inplace
echo "ci_newest_torch: build took $(( $(date +%s) - start )) s"

"$VENV/bin/python" - <<'EOF'
import torch
import carafe_kernels
status = carafe_kernels.backend_status()
print("torch", torch.__version__, "| CARAFE backends:", status)
assert status["cpu"] is None, status["cpu"]
assert torch._C._dispatch_has_kernel_for_dispatch_key("carafe_kernels::carafe", "CUDA"), \
    "the CUDA kernels were not compiled into the extension"
EOF
start=$(date +%s)
OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} "$VENV/bin/python" -m pytest -q -p no:cacheprovider \
  tests/test_carafe.py tests/test_ops.py tests/test_modules.py tests/test_validation.py tests/test_registry.py \
  -k "not cuda and not triton"
echo "ci_newest_torch: tests took $(( $(date +%s) - start )) s"
