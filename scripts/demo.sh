#!/usr/bin/env bash
# The main job: sets up the environment, then trains CARes-UNet for a few minutes on the embedded
# synthetic CT dataset, evaluates it and writes a report to runs/demo/report.md (on CPU: < 10 minutes
# on 2 cores; a GPU is used when present). Extra arguments go to `cares demo`. A second run replaces
# runs/demo (and reuses the environment: setup_env.sh skips an unchanged build).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# shellcheck disable=SC1091
. .venv/bin/activate
python -m cares demo --out runs/demo --overwrite "$@"
cat runs/demo/report.md
