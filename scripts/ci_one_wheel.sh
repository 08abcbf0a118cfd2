#!/usr/bin/env bash
# CI leg: ONE wheel for every torch (the extension is on PyTorch's stable ABI, docs/design.md#the-build).
#   1. builds one wheel under the newest torch, a CUDA build, so the CUDA library (glue and kernels for
#      one architecture) is compiled too: it must build, and it must stay off the CPU library's path;
#   2. installs that same file, without rebuilding, next to torch 2.13.0+cpu and next to the newest
#      torch, each in its own environment, and runs the op tests there on the installed package (not the
#      checkout). No GPU is needed: the CUDA library is compiled and checked, its kernels are not run.
#   NEWEST_TORCH=torch==2.14.1       the torch that builds the wheel (a CUDA build)
#   OLDER_TORCH=torch==2.13.0+cpu    the other torch the same wheel must run on (a CPU-only build)
#   NEWEST_VENV=.venv-newest-torch   their virtual environments (kept between runs: torch is ~3 GB)
#   OLDER_VENV=.venv-older-torch
#   TORCH_CUDA_ARCH_LIST=9.0         the architectures to compile
#   CUDA_HOME                        the toolkit; by default setup.py finds it (beside nvcc's prefix)
#   MAX_JOBS=2                       parallel compile jobs
#   WHEEL=path                       skip the build and test this wheel (local reruns)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PYTHON=${PYTHON:-python3}
NEW_VENV=${NEWEST_VENV:-$REPO/.venv-newest-torch}
OLD_VENV=${OLDER_VENV:-$REPO/.venv-older-torch}
TOOLS=("setuptools>=77" wheel ninja pytest numpy)

setup_venv() {  # venv, torch spec
  [ -x "$1/bin/python" ] || "$PYTHON" -m venv "$1"
  "$1/bin/python" -m pip install -q "${TOOLS[@]}" "$2"
}
setup_venv "$NEW_VENV" "${NEWEST_TORCH:-torch==2.14.1}"
setup_venv "$OLD_VENV" "${OLDER_TORCH:-torch==2.13.0+cpu}"

WHEELS=$(mktemp -d "${TMPDIR:-/tmp}/carafe-ci-wheel.XXXXXX")
trap 'rm -rf "$WHEELS"' EXIT
if [ -n "${WHEEL:-}" ]; then  # a wheel built earlier by this script's build step (local reruns)
  wheel=$(cd "$(dirname "$WHEEL")" && pwd)/$(basename "$WHEEL")
else
  wheel=$(PYTHON="$NEW_VENV/bin/python" TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} CARAFE_FORCE_CUDA=1 \
          MAX_JOBS=${MAX_JOBS:-2} bash scripts/build_wheel.sh "$WHEELS" | tail -1)
  echo "ci_one_wheel: built $(basename "$wheel")"
fi
"$NEW_VENV/bin/python" -c "import sys, zipfile; sys.exit('carafe_kernels/_C_cuda.abi3.so' not in zipfile.ZipFile(sys.argv[1]).namelist())" "$wheel" || {
  echo "ci_one_wheel: $(basename "$wheel") has no CUDA library (carafe_kernels/_C_cuda.abi3.so)" >&2; exit 1; }
case "$(basename "$wheel")" in
  *-cp310-abi3-*.whl) ;;
  *) echo "ci_one_wheel: $(basename "$wheel") is not an abi3 (cp310-abi3) wheel" >&2; exit 1 ;;
esac

# Tests run from an empty folder, so `import carafe_kernels` finds the installed wheel, not the checkout.
RUN_DIR="$WHEELS/run"
mkdir -p "$RUN_DIR"
for venv in "$OLD_VENV" "$NEW_VENV"; do
  # --no-deps: torch stays as installed; a wheel is never compiled by pip, so this cannot rebuild.
  "$venv/bin/python" -m pip install -q --no-deps --force-reinstall "$wheel"
  (cd "$RUN_DIR" && "$venv/bin/python" - <<'EOF'
import pathlib, torch, carafe_kernels
import carafe_kernels._native as native
status = carafe_kernels.backend_status()
print("torch", torch.__version__, "| carafe_kernels from", pathlib.Path(carafe_kernels.__file__).parent,
      "| built with torch", torch.ops.carafe_kernels._built_with_torch(), "| backends:", status)
assert "site-packages" in carafe_kernels.__file__, "testing the checkout, not the installed wheel"
assert status["cpu"] is None, status["cpu"]
if torch.version.cuda is None:
    assert native.CUDA_LIBRARY_ERROR == "torch is a CPU-only build", native.CUDA_LIBRARY_ERROR
else:  # the CUDA library loaded and registered the CUDA kernels (no GPU needed for that)
    assert native.CUDA_LIBRARY_ERROR is None, native.CUDA_LIBRARY_ERROR
    assert torch._C._dispatch_has_kernel_for_dispatch_key("carafe_kernels::carafe", "CUDA")
EOF
  )
  start=$(date +%s)
  (cd "$RUN_DIR" && OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} "$venv/bin/pytest" -q -p no:cacheprovider \
     --rootdir "$REPO" -c "$REPO/pyproject.toml" \
     "$REPO/tests/test_stable_abi.py" "$REPO/tests/test_ops.py" "$REPO/tests/test_carafe.py" \
     "$REPO/tests/test_validation.py" "$REPO/tests/test_registry.py" -k "not cuda and not triton")
  echo "ci_one_wheel: op tests on $("$venv/bin/python" -c 'import torch; print(torch.__version__)') took $(( $(date +%s) - start )) s"
done
