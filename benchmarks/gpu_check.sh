#!/usr/bin/env bash
# One-call GPU check of carafe-kernels on a machine with an NVIDIA GPU and a CUDA build of PyTorch
# (no registry access needed): environment, build, backend status, a CUDA smoke test (correctness vs the
# float64 reference, determinism, >2^31-element offsets, a first timing), the whole test suite, then the
# benchmark CLI. Every stage tees its log into OUTDIR; a stage that fails or runs out of time is recorded
# and the later stages still run; the exit status is non-zero when any stage failed.
#
#   benchmarks/gpu_check.sh OUTDIR [--quick | --bench-only]
#
#   --quick              skip the full benchmark (the smoke stage still times two CARes-like shapes)
#   --bench-only         skip the smoke test and the test suite (e.g. a second call on the still-warm
#                        machine, with GPU_CHECK_SKIP_BUILD=1, after a --quick call)
#   GPU_CHECK_BUDGET=s   wall-clock budget in seconds for the whole script (default 570: one device call)
#   GPU_CHECK_SKIP_BUILD=1   use the extension already built in the checkout
set -euo pipefail

usage() { echo "usage: $0 OUTDIR [--quick | --bench-only]" >&2; exit 2; }
OUTDIR=""
QUICK=0
BENCH_ONLY=0
for arg in "$@"; do
  case "$arg" in
    --quick) QUICK=1 ;;
    --bench-only) BENCH_ONLY=1 ;;
    -h|--help) usage ;;
    -*) echo "unknown option $arg" >&2; usage ;;
    *) [[ -z "$OUTDIR" ]] || usage; OUTDIR="$arg" ;;
  esac
done
[[ -n "$OUTDIR" ]] || usage
(( QUICK && BENCH_ONLY )) && { echo "--quick and --bench-only exclude each other" >&2; usage; }
mkdir -p "$OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"
cd "$(dirname "$0")/.."
BUDGET="${GPU_CHECK_BUDGET:-570}"
PY="${PYTHON:-python}"
export PY
unset TRITON_INTERPRET  # the suite must run Triton on the GPU, not in its interpreter

declare -a SUMMARY=()
FAILED=0
remaining() { echo $(( BUDGET - SECONDS )); }

# stage NAME MAX_SECONDS CMD...: runs CMD under `timeout`, tees into OUTDIR/NAME.log, records the result.
stage() {
  local name="$1" max="$2"; shift 2
  local left; left="$(remaining)"
  local limit=$(( max < left - 10 ? max : left - 10 ))
  if (( limit < 10 )); then
    SUMMARY+=("$name: SKIPPED (out of time)"); FAILED=1; return 0
  fi
  echo "=== [$name] (limit ${limit}s, ${SECONDS}s elapsed) $*" | tee "$OUTDIR/$name.log"
  local t0=$SECONDS rc=0
  if declare -F "$1" >/dev/null; then
    # A shell function: run it in a child bash so that `timeout` can bound it.
    timeout --kill-after=10 "$limit" bash -c "set -euo pipefail; $(declare -f "$1"); $*" 2>&1 \
      | tee -a "$OUTDIR/$name.log" || rc=$?
  else
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$OUTDIR/$name.log" || rc=$?
  fi
  local took=$(( SECONDS - t0 ))
  if (( rc == 0 )); then
    SUMMARY+=("$name: ok (${took}s)")
  elif (( rc == 124 || rc == 137 )); then
    SUMMARY+=("$name: TIMED OUT after ${took}s"); FAILED=1
  else
    SUMMARY+=("$name: FAILED rc=$rc (${took}s)"); FAILED=1
  fi
  return 0
}

finish() {
  {
    echo "=== summary (${SECONDS}s)"
    printf '  %s\n' "${SUMMARY[@]}"
  } | tee "$OUTDIR/summary.log"
  exit "$FAILED"
}

# ---- environment -----------------------------------------------------------------------------------
env_info() {
  nvidia-smi || true
  nvidia-smi --query-gpu=name,compute_cap,memory.total,clocks.max.sm,clocks.max.mem,driver_version --format=csv || true
  command -v nvcc >/dev/null && nvcc --version || echo "nvcc: not found"
  "$PY" - <<'EOF'
import platform, sys, torch
print("python", sys.version.split()[0], platform.platform())
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
try:
    import triton
    print("triton", triton.__version__)
except ImportError as exc:
    print("triton: not importable:", exc)
print("cuda available:", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device 0: {p.name}, cc {p.major}.{p.minor}, {p.multi_processor_count} SMs, "
          f"{p.total_memory / 2**30:.1f} GiB")
EOF
  git rev-parse HEAD 2>/dev/null || true
  git status --short 2>/dev/null | head -20 || true
}
stage env 60 env_info

GPU_NAME="$("$PY" -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")' 2>/dev/null || true)"
if [[ -z "$GPU_NAME" ]]; then
  SUMMARY+=("gpu: torch sees no CUDA device; nothing else to check")
  FAILED=1
  finish
fi
# "NVIDIA H200" -> h200, "NVIDIA GeForce RTX 4090" -> geforce-rtx-4090
GPU_TAG="$(echo "$GPU_NAME" | tr '[:upper:]' '[:lower:]' | sed -e 's/^nvidia //' -e 's/[^a-z0-9]\+/-/g' -e 's/^-//' -e 's/-$//')"
GPU_TAG="${GPU_TAG%%-sxm*}"; GPU_TAG="${GPU_TAG%%-nvl*}"; GPU_TAG="${GPU_TAG%%-pcie*}"
ARCH="$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability(0))')"
export ARCH
echo "GPU: $GPU_NAME (tag $GPU_TAG, arch $ARCH)" | tee -a "$OUTDIR/env.log"

# ---- build -------------------------------------------------------------------------------------------
build() {
  # Only this GPU's architecture (9.0 on an H100/H200): a fraction of the default multi-arch build time.
  export TORCH_CUDA_ARCH_LIST="$ARCH"
  export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
  export CARAFE_FORCE_CUDA=1
  # -v: shows setup.py's resolved build configuration and the compiler commands.
  "$PY" -m pip install --no-build-isolation --no-deps -v -e .
}
if [[ "${GPU_CHECK_SKIP_BUILD:-0}" == "1" ]]; then
  SUMMARY+=("build: skipped (GPU_CHECK_SKIP_BUILD=1)")
else
  stage build 300 build
fi

# ---- backend status ----------------------------------------------------------------------------------
status() {
  "$PY" - <<'EOF'
import carafe_kernels
status = carafe_kernels.backend_status()
print(status)
for name, why in status.items():
    print(f"  {name:10s} {'available' if why is None else 'unavailable: ' + why}")
if status.get("cuda") is not None:
    raise SystemExit(f"the cuda backend is not available: {status['cuda']}")
EOF
}
stage status 60 status

# ---- smoke: correctness vs float64, determinism, 64-bit offsets, first timings --------------------------
smoke() {
  "$PY" - <<'EOF'
import math, time, torch
import carafe_kernels
from carafe_kernels import carafe, carafe_fused
from carafe_kernels.reference import carafe_fused_reference, carafe_reference

dev = "cuda"
torch.manual_seed(0)
failures = []

def check(name, got, want, rtol, atol):
    err = (got.double() - want.double()).abs()
    bound = atol + rtol * want.double().abs()
    worst = (err - bound).max().item() if err.numel() else -1.0
    ok = worst <= 0 and bool(torch.isfinite(got).all())
    print(f"  {'ok  ' if ok else 'FAIL'} {name}: max abs err {err.max().item() if err.numel() else 0:.3e}")
    if not ok:
        failures.append(name)

def case(N, C, H, W, k, G, s, dtype, fused, channels_last=False):
    f = torch.randn(N, C, H, W, device=dev, dtype=torch.float64)
    m = (torch.randn(N, G*k*k*s*s, H, W, device=dev, dtype=torch.float64) if fused
         else torch.rand(N, G*k*k, H*s, W*s, device=dev, dtype=torch.float64))
    go = torch.randn(N, C, H*s, W*s, device=dev, dtype=torch.float64)
    fr, mr = f.clone().requires_grad_(), m.clone().requires_grad_()
    ref = (carafe_fused_reference if fused else carafe_reference)(fr, mr, k, G, s)
    ref.backward(go)
    fx = f.to(dtype); mx = m.to(dtype)
    if channels_last:
        fx = fx.to(memory_format=torch.channels_last); mx = mx.to(memory_format=torch.channels_last)
    fx.requires_grad_(); mx.requires_grad_()
    out = (carafe_fused if fused else carafe)(fx, mx, k, G, s, backend="cuda")
    out.backward(go.to(dtype))
    tol = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-5, 1e-5), torch.float16: (1e-2, 1e-2),
           torch.bfloat16: (5e-2, 5e-2)}[dtype]
    tag = f"{'fused ' if fused else 'carafe'} N{N}-C{C}-H{H}-W{W}-k{k}-g{G}-s{s} {str(dtype)[6:]}{' cl' if channels_last else ''}"
    check(tag + " out", out, ref, *tol)
    check(tag + " grad_features", fx.grad, fr.grad, *tol)
    check(tag + " grad_masks", mx.grad, mr.grad, *tol)

print("correctness vs the float64 reference (backend='cuda'):")
for fused in (False, True):
    for (k, s) in [(5, 2), (3, 2), (1, 1), (3, 4), (5, 4), (7, 1), (7, 2), (7, 4), (9, 3), (11, 2), (5, 8)]:
        case(2, 16, 9, 13, k, 2, s, torch.float32, fused)
    case(2, 16, 9, 13, 5, 4, 2, torch.float64, fused)
    case(2, 16, 9, 13, 5, 1, 2, torch.float16, fused)
    case(2, 16, 9, 13, 5, 1, 2, torch.bfloat16, fused, channels_last=True)
    case(1, 256, 33, 70, 5, 1, 2, torch.float32, fused)          # many channels: split reduction
    case(0, 8, 5, 5, 5, 1, 2, torch.float32, fused)              # empty batch

print("determinism (two backward passes, bitwise):")
for fused in (False, True):
    f = torch.randn(2, 128, 40, 40, device=dev)
    m = torch.randn(2, 25 * 4, 40, 40, device=dev) if fused else torch.rand(2, 25, 80, 80, device=dev)
    go = torch.randn(2, 128, 80, 80, device=dev)
    op = torch.ops.carafe_kernels.carafe_fused_backward if fused else torch.ops.carafe_kernels.carafe_backward
    a = op(go, f, m, 5, 1, 2); b = op(go, f, m, 5, 1, 2)
    same = all(torch.equal(x, y) for x, y in zip(a, b))
    print(f"  {'ok  ' if same else 'FAIL'} {'fused' if fused else 'carafe'} backward bitwise identical")
    if not same:
        failures.append("determinism")

print("offsets beyond 2^31 elements (bf16 output of 2^31 + elements, last channels checked):")
try:
    N, C, H, W, k, s = 1, 520, 1024, 1024, 5, 2
    f = torch.randn(N, C, H, W, device=dev, dtype=torch.bfloat16)
    logits = torch.randn(N, k*k*s*s, H, W, device=dev, dtype=torch.bfloat16)
    out = carafe_fused(f, logits, k, 1, s, backend="cuda")
    print(f"  output elements: {out.numel()} (2^31 = {2**31})")
    tail = carafe_fused_reference(f[:, -2:].double(), logits.double(), k, 1, s)
    check("fused forward, last 2 channels", out[:, -2:], tail, 5e-2, 5e-2)
    go = torch.randn_like(out)
    gf, gl = torch.ops.carafe_kernels.carafe_fused_backward(go, f, logits, k, 1, s)
    fr = f[:, -2:].double().requires_grad_()
    carafe_fused_reference(fr, logits.double(), k, 1, s).backward(go[:, -2:].double())
    check("fused backward grad_features, last 2 channels", gf[:, -2:], fr.grad, 5e-2, 5e-2)
    del f, logits, out, go, gf, gl, tail, fr
    torch.cuda.empty_cache()
except torch.OutOfMemoryError as exc:
    print("  skipped: out of memory:", exc)

print("timing (CUDA events via triton.testing.do_bench when available; median ms):")
try:
    from triton.testing import do_bench
except ImportError:
    def do_bench(fn, warmup=25, rep=100):
        for _ in range(5): fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20): fn()
        end.record(); torch.cuda.synchronize()
        return start.elapsed_time(end) / 20
props = torch.cuda.get_device_properties(0)
for (N, C, H, W) in [(16, 256, 64, 64), (8, 64, 128, 128)]:
    k, G, s = 5, 1, 2
    for dtype in (torch.float32, torch.bfloat16):
        b = 4 if dtype == torch.float32 else 2
        f = torch.randn(N, C, H, W, device=dev, dtype=dtype)
        lg = torch.randn(N, G*k*k*s*s, H, W, device=dev, dtype=dtype)
        go = torch.randn(N, C, H*s, W*s, device=dev, dtype=dtype)
        least = b * (N*C*H*W + N*G*k*k*s*s*H*W + N*C*H*s*W*s)
        flops = 2 * N * C * H*s * W*s * k*k
        row = []
        for backend in ("cuda", "triton", "reference"):
            if carafe_kernels.backend_status().get(backend) is not None:
                continue
            try:
                ms = do_bench(lambda: carafe_fused(f, lg, k, G, s, backend=backend))
            except Exception as exc:  # a backend failing here is reported, not fatal
                row.append(f"{backend}: error {type(exc).__name__}")
                continue
            row.append(f"{backend} fwd {ms:.3f} ms ({least / ms / 1e6:.0f} GB/s, {flops / ms / 1e9:.1f} TFLOP/s)")
        ms_b = do_bench(lambda: torch.ops.carafe_kernels.carafe_fused_backward(go, f, lg, k, G, s))
        row.append(f"cuda bwd {ms_b:.3f} ms")
        print(f"  fused N{N}-C{C}-H{H}-W{W}-k{k}-g{G}-s{s} {str(dtype)[6:]}: " + "; ".join(row))

if failures:
    raise SystemExit(f"{len(failures)} smoke check(s) failed: {failures}")
EOF
}
# ---- the whole test suite ------------------------------------------------------------------------------
if (( BENCH_ONLY )); then
  SUMMARY+=("smoke: skipped (--bench-only)" "tests: skipped (--bench-only)")
else
  stage smoke 150 smoke
  if (( QUICK )); then
    stage tests 330 "$PY" -m pytest -x -q tests
  else
    stage tests 240 "$PY" -m pytest -x -q tests
  fi
fi

# ---- the benchmark CLI ---------------------------------------------------------------------------------
if (( QUICK )); then
  SUMMARY+=("bench: skipped (--quick)")
else
  stage bench 600 "$PY" -m benchmarks.carafe --backends all --shapes cares,fpn --modes fwd,bwd,fwdbwd \
    --dtypes fp32,bf16 --json "$OUTDIR/$GPU_TAG.json"
fi

finish
