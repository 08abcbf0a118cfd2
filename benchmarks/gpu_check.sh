#!/usr/bin/env bash
# One-call GPU check of carafe-kernels: env, (wheel or build), backend status, smoke, the GPU tests,
# benchmarks written row by row, the rest of the suite; OUTDIR/summary.json records every stage.
# The stages, limits and summary are benchmarks/gpu_check.py's (docs/design.md#the-gpu-check).
#
#   bash benchmarks/gpu_check.sh OUTDIR [--wheel PATH] [--budget S] [--only STAGES] [--limit STAGE=S]
#   bash benchmarks/gpu_check.sh --rehearse OUTDIR      # every stage on a CPU-only machine (CI)
#
# The GPU machine has python3 and maybe no `python`; $PYTHON overrides.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
command -v "$PY" >/dev/null || { echo "error: $PY not found (set PYTHON)" >&2; exit 2; }
# -P: the driver imports nothing from the checkout but itself; stages set their own sys.path.
exec "$PY" -P benchmarks/gpu_check.py "$@"
