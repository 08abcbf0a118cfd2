#!/usr/bin/env bash
# The test command: sets up the environment (scripts/setup_env.sh), then runs
#   1. the whole suite (tests/ and the benchmark suite with timing disabled, so it cannot rot);
#   2. the Triton kernels on CPU through Triton's interpreter (TRITON_INTERPRET=1 must be set before
#      the kernels are imported, hence a separate pytest process): tests/test_triton.py, and the
#      content-aware downsampling suite's triton cases.
# Extra arguments go to the first pytest run (e.g. -k cpu, -x).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pytest tests benchmarks --benchmark-disable -q "$@"
TRITON_INTERPRET=1 python -m pytest -m triton tests/test_triton.py tests/test_carafe_down.py -q
