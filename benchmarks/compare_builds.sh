#!/usr/bin/env bash
# Side-by-side speed of two builds of the CPU kernels, on the same machine in one run: OLD_REF (a git
# commit, e.g. the last one before the stable-ABI port) against the working tree, both compiled here
# against the torch of $PYTHON. Interleaved rounds (old, new, old, new, ...) so that a change in machine
# load hits both alike. Per round: benchmarks.carafe's cpu rows (fused op, fwd and fwd+bwd, fp32 and bf16,
# at the target shape N2-C256-H44-W44 and a large one) and benchmarks.overhead. Then a table of the
# medians over rounds (new / old; the goal: every cpu row within 5%, overhead ratio <= 1.2x).
#   usage: benchmarks/compare_builds.sh OLD_REF OUT_DIR
#   PYTHON=.venv/bin/python  ROUNDS=3  SHAPES=target,N2-C256-H128-W128  THREADS=2  MAX_JOBS=1
#   IMPLS=cpu   the rows to time (benchmarks.carafe --impls; each is still checked against the float64
#               reference first); IMPLS= (empty) times the baselines too (reference, unfold, unfused:cpu),
#               which takes about 8x longer and does not bear on old vs new
# Writes OUT_DIR/{old,new}-round-R.json, OUT_DIR/{old,new}-overhead-R.txt and OUT_DIR/summary.{json,md}.
set -euo pipefail
OLD_REF=${1:?usage: benchmarks/compare_builds.sh OLD_REF OUT_DIR}
OUT=${2:?usage: benchmarks/compare_builds.sh OLD_REF OUT_DIR}
cd "$(dirname "$0")/.."
REPO=$PWD
PYTHON=$("${PYTHON:-.venv/bin/python}" -c "import sys; print(sys.executable)")  # absolute: used from other folders
ROUNDS=${ROUNDS:-3}
SHAPES=${SHAPES:-target,N2-C256-H128-W128}
THREADS=${THREADS:-2}
IMPLS=${IMPLS-cpu}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/carafe-compare.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/old" "$WORK/new"
git archive "$OLD_REF" | tar -x -C "$WORK/old"
git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$WORK/new"
for build in old new; do  # the two builds side by side (nothing is timed yet)
  (cd "$WORK/$build" && CARAFE_NO_CUDA=1 MAX_JOBS=${MAX_JOBS:-1} "$PYTHON" setup.py -q build_ext --inplace \
     >"$WORK/$build-build.log" 2>&1) &
done
for build in old new; do
  wait -n || { cat "$WORK"/*-build.log >&2; echo "compare_builds: a build failed" >&2; exit 1; }
done
git -C "$REPO" rev-parse "$OLD_REF" > "$OUT/old-ref.txt"
for round in $(seq "$ROUNDS"); do
  for build in old new; do
    # From the build's own tree (cwd first on sys.path), CUDA off: only the CPU kernels differ.
    (cd "$WORK/$build" && "$PYTHON" -m benchmarks.carafe --backends cpu --shapes "$SHAPES" \
       --modes fwd,fwdbwd --dtypes fp32,bf16 --threads "$THREADS" ${IMPLS:+--impls "$IMPLS"} \
       --json "$OUT/$build-round-$round.json" \
       > "$OUT/$build-round-$round.txt")
    (cd "$WORK/$build" && "$PYTHON" -m benchmarks.overhead > "$OUT/$build-overhead-$round.txt")
    echo "compare_builds: round $round $build done (load $(cut -d' ' -f1-3 /proc/loadavg))" >&2
  done
done
"$PYTHON" - "$OUT" "$ROUNDS" <<'PY'
import json, re, statistics, sys
from pathlib import Path

out, rounds = Path(sys.argv[1]), int(sys.argv[2])
rows = {}  # (shape, dtype, mode) -> {build: [ms]}
ratio, direct = {}, {}
for build in ("old", "new"):
    for r in range(1, rounds + 1):
        for row in json.loads((out / f"{build}-round-{r}.json").read_text())["rows"]:
            if row["impl"] == "cpu" and not row.get("invalid"):
                rows.setdefault((row["shape"], row["dtype"], row["mode"]), {}).setdefault(build, []).append(row["ms"])
        text = (out / f"{build}-overhead-{r}.txt").read_text()
        m = re.search(r"public ([\d.]+) us, torch.ops ([\d.]+) us, ratio ([\d.]+)x", text)
        ratio.setdefault(build, []).append(float(m.group(3)))
        direct.setdefault(build, []).append(float(m.group(2)))
table = []
for (shape, dtype, mode), t in sorted(rows.items()):
    if "old" in t and "new" in t:
        old, new = statistics.median(t["old"]), statistics.median(t["new"])
        table.append({"shape": shape, "dtype": dtype, "mode": mode, "old_ms": old, "new_ms": new,
                      "new_over_old": new / old, "within_5pct": new <= 1.05 * old})
summary = {"old_ref": (out / "old-ref.txt").read_text().strip(), "rounds": rounds, "rows": table,
           "overhead_ratio": {b: statistics.median(v) for b, v in ratio.items()},
           "direct_call_us": {b: statistics.median(v) for b, v in direct.items()}}
(out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
lines = ["| shape | dtype | mode | old ms | new ms | new/old | within 5% |", "|---|---|---|---|---|---|---|"]
lines += [f"| {r['shape']} | {r['dtype']} | {r['mode']} | {r['old_ms']:.3f} | {r['new_ms']:.3f} | "
          f"{r['new_over_old']:.3f} | {'yes' if r['within_5pct'] else 'NO'} |" for r in table]
lines += ["", f"benchmarks.overhead ratio (median of {rounds}): old {summary['overhead_ratio']['old']:.2f}x, "
          f"new {summary['overhead_ratio']['new']:.2f}x (goal <= 1.2x); direct torch.ops call: old "
          f"{summary['direct_call_us']['old']:.1f} us, new {summary['direct_call_us']['new']:.1f} us"]
(out / "summary.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PY
