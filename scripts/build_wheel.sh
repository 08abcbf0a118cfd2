#!/usr/bin/env bash
# Builds ONE carafe-kernels wheel (abi3: every Python >= 3.10; PyTorch stable ABI: every torch from the
# target in carafe_kernels/_abi.py up) against the torch of the Python given, without build isolation,
# from a copy of the checkout's sources (so no build output lands in the checkout).
#   usage: scripts/build_wheel.sh OUT_DIR
#   PYTHON=python3            the interpreter whose torch builds it (any torch >= the target; a CUDA
#                             torch builds the CUDA library too when a toolkit of its CUDA major is found)
#   TORCH_CUDA_ARCH_LIST, CARAFE_FORCE_CUDA, CARAFE_NO_CUDA, CUDA_HOME, MAX_JOBS: as setup.py documents
# Prints the wheel's path on the last line.
set -euo pipefail
OUT=${1:?usage: scripts/build_wheel.sh OUT_DIR}
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
SRC=$(mktemp -d "${TMPDIR:-/tmp}/carafe-wheel-src.XXXXXX")
trap 'rm -rf "$SRC"' EXIT
# The checkout's sources: tracked files and new ones git does not ignore (no build outputs, no venvs).
git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$SRC"
before=$(ls "$OUT")
start=$(date +%s)
MAX_JOBS=${MAX_JOBS:-1} "$PYTHON" -m pip wheel -q --no-build-isolation --no-deps -w "$OUT" "$SRC" >&2
echo "build_wheel: built in $(( $(date +%s) - start )) s" >&2
wheel=$(comm -13 <(echo "$before") <(ls "$OUT") | grep '\.whl$' || true)
[ -n "$wheel" ] || wheel=$(ls -t "$OUT"/*.whl | head -1 | xargs basename)
echo "$OUT/$wheel"
