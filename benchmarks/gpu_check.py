"""The one-call GPU check behind ``bash benchmarks/gpu_check.sh`` (docs/design.md#the-gpu-check).

    bash benchmarks/gpu_check.sh OUTDIR [--wheel PATH] [--budget S] [--only a,b] [--limit stage=S]
    bash benchmarks/gpu_check.sh --rehearse OUTDIR [...]          # the same stages on a CPU-only machine

Stages, in order of value per second of GPU time; each runs in its own process under a time limit
(the smaller of its cap and what is left of --budget), logs to OUTDIR/<stage>.log, and the summary
OUTDIR/summary.json is rewritten after every stage, so whatever ends the call keeps what was done:

    wheel      (--wheel) unpack the prebuilt wheel into OUTDIR/wheel-site and check it matches this
               checkout; nothing is built
    env        versions, the GPU, where carafe_kernels is imported from
    build      (no --wheel) the extension in place, for this GPU's arch only
    status     every backend's status, and one small call of each usable backend against the float64
               reference; a backend that should run here but cannot (cuda, triton on a GPU) FAILS
    smoke      correctness vs the float64 reference (tolerance scaled like the suite's: by max|ref| and
               by the number of summed terms), bitwise determinism, >2^31-element offsets, channels_last;
               CARAFE, and the down ops (carafe_down, carafe_down_fused) on the backends that have them
    gpu-tests  the GPU-relevant part of the test suite, -rfEs (every skip listed with its reason), no -x
    bench      python -m benchmarks.carafe, each row appended to OUTDIR/bench.jsonl as it is measured
    rest       the rest of the suite (not slow), in whatever time is left

--rehearse runs the same driver on a CPU-only machine: GPU work is skipped by name (the cuda backend,
the 2^31-element case, nvcc), the smoke and status stages run the cpu backend and the Triton
interpreter, and the test and bench selections are cut down, so the script's own logic (stages, limits,
summary, partial results) is tested in CI (tests/test_gpu_check.py).

The module is also the pytest plugin of the test stages (``-p benchmarks.gpu_check``): it appends one
JSON line per test outcome to $GPU_CHECK_EVENTS, so counts and skip reasons survive a timeout.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# (name, cap in seconds, required): a required stage that fails or times out fails the run; bench and
# rest are expected to use up the time they are given, so their timeout is recorded, not a failure.
STAGES = [("wheel", 60, True), ("env", 60, True), ("build", 300, True), ("status", 90, True),
          ("smoke", 120, True), ("gpu-tests", 240, True), ("bench", 150, False), ("rest", 600, False)]
DEFAULT_BUDGET = 540  # one 10-minute device call, less a minute for start-up, transfers and the summary
RESERVE = 10          # seconds kept back from every limit for killing a stage and writing the summary

# The GPU-relevant tests: every CUDA/Triton case of the backend-parametrised files, the Triton file,
# input validation, and the training runs whose determinism / host-sync behaviour differs on CUDA.
# Files in order of value (a timeout keeps the outcomes before it): the CUDA training behaviour, the
# Triton kernels (never run on a GPU before), then the backend-parametrised files (the down ops' CUDA
# kernels, never run on a GPU before either, right after CARAFE's).
GPU_TEST_ARGS = ["tests/test_train.py", "tests/test_models.py", "tests/test_triton.py", "tests/test_carafe.py",
                 "tests/test_carafe_down.py", "tests/test_ops.py", "tests/test_validation.py", "-m", "not slow",
                 "-k", "cuda or triton or test_ops.py or test_validation.py or execution_options or bitwise "
                       "or data_on_device or deterministic or host_sync"]
# Rehearsal: the same mechanics on tests that finish in seconds on a CPU (the CUDA cases skip by name).
REHEARSAL_TEST_ARGS = ["tests/test_carafe.py", "tests/test_validation.py", "-m", "not slow",
                       "-k", "(cuda and deterministic) or bad_input"]
BENCH_ARGS = ["--backends", "all", "--shapes", "cares,fpn", "--dtypes", "bf16,fp32", "--modes", "fwd,bwd,fwdbwd",
              "--layouts", "contiguous,channels_last", "--min-run-time", "0.1", "--retime", "0"]
REHEARSAL_BENCH_ARGS = ["--device", "cpu", "--backends", "cpu", "--shapes", "tiny", "--dtypes", "fp32",
                        "--modes", "fwd", "--layouts", "contiguous,channels_last", "--min-run-time", "0.05",
                        "--retime", "0", "--peak-gbps", "10", "--peak-gflops", "10"]  # no ceiling measurement


# ---------------------------------------------------------------------------------------------------
# pytest plugin: one JSON line per outcome, appended as it happens
# ---------------------------------------------------------------------------------------------------

def _event(record: dict) -> None:
    path = os.environ.get("GPU_CHECK_EVENTS")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return reason.removeprefix("Skipped: ")


def pytest_runtest_logreport(report) -> None:
    if report.when == "call" or report.outcome != "passed":
        if hasattr(report, "wasxfail"):
            outcome = "xfailed" if report.skipped else "xpassed"
        elif report.failed and report.when != "call":
            outcome = "error"
        else:
            outcome = report.outcome
        record = {"test": report.nodeid, "outcome": outcome, "when": report.when}
        if outcome == "skipped":
            record["reason"] = _skip_reason(report)
        _event(record)


def pytest_collectreport(report) -> None:
    if report.failed:
        _event({"test": report.nodeid, "outcome": "error", "when": "collect"})
    elif report.skipped:
        _event({"test": report.nodeid, "outcome": "skipped", "when": "collect", "reason": _skip_reason(report)})


def pytest_collection_modifyitems(config, items) -> None:
    """The rest stage leaves out the tests an earlier stage ran ($GPU_CHECK_DESELECT: its events file)."""
    path = os.environ.get("GPU_CHECK_DESELECT")
    if not path or not Path(path).exists():
        return
    done = set()
    for line in Path(path).read_text().splitlines():
        try:
            done.add(json.loads(line)["test"])
        except (json.JSONDecodeError, KeyError):
            continue
    keep = [item for item in items if item.nodeid not in done]
    if len(keep) < len(items):
        config.hook.pytest_deselected(items=[item for item in items if item.nodeid in done])
        items[:] = keep


def count_events(path: Path) -> tuple[dict, dict, list]:
    """(counts by outcome, {skip reason: count}, failed/errored test ids) from an events file."""
    counts = {"passed": 0, "failed": 0, "error": 0, "skipped": 0, "xfailed": 0, "xpassed": 0}
    reasons: dict[str, int] = {}
    failures: list[str] = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                event = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill
                continue
            counts[event["outcome"]] = counts.get(event["outcome"], 0) + 1
            if event["outcome"] == "skipped":
                reasons[event["reason"]] = reasons.get(event["reason"], 0) + 1
            elif event["outcome"] in ("failed", "error"):
                failures.append(f"{event['test']} ({event['when']})")
    return counts, reasons, failures


# ---------------------------------------------------------------------------------------------------
# Smoke tolerance
# ---------------------------------------------------------------------------------------------------

def smoke_tolerance(expected, dtype, terms: int) -> tuple[float, float]:
    """(rtol, atol) of a result computed in dtype against the float64 expected tensor: the suite's
    table (tests/conftest.py TOLERANCES), atol scaled by max(1, max|expected|) as the suite scales it,
    plus the rounding that a sum of `terms` fp32 terms of that magnitude may accumulate
    (terms * eps * scale). A per-element bound without both misreads fp32 summation error as a bug:
    grad_features at k5/s8 sums 1,600 terms of magnitude up to ~80 (docs/design.md#the-gpu-check)."""
    import torch
    tolerances = _suite_tolerances()[dtype]
    scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
    accumulate = torch.float64 if dtype == torch.float64 else torch.float32  # fp16/bf16 accumulate in fp32
    atol = tolerances["atol"] * scale + terms * torch.finfo(accumulate).eps * scale
    return tolerances["rtol"], atol


def within_tolerance(got, expected, dtype, terms: int) -> tuple[bool, float, float]:
    """(ok, max abs error, atol): every element within rtol*|expected| + atol, and all finite."""
    import torch
    if got.numel() == 0:
        return got.shape == expected.shape, 0.0, 0.0
    rtol, atol = smoke_tolerance(expected, dtype, terms)
    got64, want64 = got.detach().to("cpu", torch.float64), expected.detach().to("cpu", torch.float64)
    err = (got64 - want64).abs()
    ok = bool(torch.isfinite(got64).all()) and bool((err <= atol + rtol * want64.abs()).all())
    return ok, float(err.max()), atol


def _suite_tolerances():
    """The suite's one tolerance table, read from tests/conftest.py (not copied)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("_gpu_check_suite_conftest", REPO / "tests" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.TOLERANCES


def summed_terms(k: int, G: int, s: int, C: int, fused: bool, down: bool = False) -> dict[str, int]:
    """How many terms each result element sums: output k*k taps; grad_features k*k taps of s*s output
    pixels (down: the ceil(k/s)^2 taps that reach a pixel); grad_masks the C/G channels of a group (the
    fused softmax backward adds k*k more)."""
    reach = -(-k // s)
    return {"out": k * k, "grad_features": reach * reach if down else k * k * s * s,
            "grad_masks": max(1, C // max(G, 1)) + (k * k if fused else 0)}


# ---------------------------------------------------------------------------------------------------
# Stages that run as Python in their own process: env, status, smoke
# ---------------------------------------------------------------------------------------------------

def stage_env(out: Path, rehearse: bool, wheel_site: str | None) -> int:
    import platform

    import torch
    info: dict = {"python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__,
                  "torch_cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
                  "cuda_available": torch.cuda.is_available()}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError as exc:
        info["triton"] = f"not importable: {exc}"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, arch=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                    gpu_memory_gib=round(props.total_memory / 2**30, 1), device_count=torch.cuda.device_count())
    import carafe_kernels
    info["carafe_kernels"] = str(Path(carafe_kernels.__file__).parent)
    for key, value in info.items():
        print(f"{key}: {value}")
    for tool in (["nvidia-smi", "--query-gpu=name,compute_cap,memory.total,clocks.max.sm,clocks.max.mem,"
                  "driver_version", "--format=csv"], ["nvcc", "--version"]):
        try:  # informational: clocks and driver for the benchmark's reader, nvcc for a build
            print(subprocess.run(tool, capture_output=True, text=True, timeout=20).stdout.strip())
        except (OSError, subprocess.SubprocessError) as exc:
            print(f"{tool[0]}: {exc}")
    (out / "env.json").write_text(json.dumps(info, indent=1) + "\n")
    problems = []
    if wheel_site and not info["carafe_kernels"].startswith(wheel_site):
        problems.append(f"carafe_kernels is imported from {info['carafe_kernels']}, not from the wheel in {wheel_site}")
    if not rehearse and not info["cuda_available"]:
        problems.append("torch sees no CUDA device (torch.cuda.is_available() is False)")
    for problem in problems:
        print("FAILED:", problem)
    return 1 if problems else 0


def _small_call(backend: str, device: str) -> str | None:
    """None when a small fused and plain forward+backward on `backend` match the float64 reference."""
    import torch

    from carafe_kernels import carafe, carafe_fused
    from carafe_kernels.reference import carafe_fused_reference, carafe_reference
    N, C, H, W, k, G, s = 1, 8, 5, 6, 3, 2, 2
    gen = torch.Generator().manual_seed(0)
    for fused, fn, ref in ((True, carafe_fused, carafe_fused_reference), (False, carafe, carafe_reference)):
        f = torch.randn(N, C, H, W, generator=gen, dtype=torch.float64)
        m = (torch.randn(N, G * k * k * s * s, H, W, generator=gen, dtype=torch.float64) if fused
             else torch.rand(N, G * k * k, H * s, W * s, generator=gen, dtype=torch.float64))
        fx = f.to(device, torch.float32).requires_grad_()
        mx = m.to(device, torch.float32).requires_grad_()
        out = fn(fx, mx, k, G, s, backend=backend)
        out.sum().backward()
        fr, mr = f.clone().requires_grad_(), m.clone().requires_grad_()
        want = ref(fr, mr, k, G, s)
        want.sum().backward()
        terms = summed_terms(k, G, s, C, fused)
        for name, got, exp in (("out", out, want), ("grad_features", fx.grad, fr.grad),
                               ("grad_masks", mx.grad, mr.grad)):
            ok, err, atol = within_tolerance(got, exp, torch.float32, terms[name])
            if not ok:
                return f"{'fused' if fused else 'plain'} {name}: max abs error {err:.3g} > {atol:.3g}"
    return None


def stage_status(out: Path, rehearse: bool) -> int:
    import carafe_kernels
    status = carafe_kernels.backend_status()
    # On a GPU every backend must run; in a rehearsal cuda cannot, and triton runs in its interpreter.
    expected = {"reference", "cpu", "triton"} | (set() if rehearse else {"cuda"})
    results = {}
    for name, why in status.items():
        device = "cpu" if name == "cpu" or (rehearse and name in ("reference", "triton")) else "cuda"
        if name == "cuda" and rehearse:
            results[name] = {"status": "skipped", "reason": "rehearsal: needs a GPU"}
        elif why is not None:
            results[name] = ({"status": "failed", "reason": f"should run here but is unavailable: {why}"}
                             if name in expected else {"status": "skipped", "reason": why})
        else:
            try:
                problem = _small_call(name, device)
            except Exception as exc:  # a backend that raises is this stage's finding, not a crash
                problem = f"{type(exc).__name__}: {exc}"
            results[name] = ({"status": "ok", "device": device} if problem is None
                             else {"status": "failed", "device": device, "reason": problem})
        print(f"  {name:10s} {results[name]['status']}: {results[name].get('reason', results[name].get('device'))}")
    (out / "status.json").write_text(json.dumps(results, indent=1) + "\n")
    failed = [name for name, r in results.items() if r["status"] == "failed"]
    if failed:
        print(f"FAILED: backend(s) {', '.join(failed)} should run here but do not")
    return 1 if failed else 0


def smoke_cases(backend: str, rehearse: bool) -> list[tuple]:
    """(N, C, H, W, k, G, s, dtype name, fused, channels_last) cases of the smoke stage for a backend."""
    cases = []
    ks = [(5, 2), (3, 2), (1, 1), (3, 4), (5, 4), (7, 1), (7, 2), (7, 4), (9, 3), (11, 2), (5, 8)]
    if backend == "triton":
        # Each new shape compiles (and on a GPU autotunes) Triton kernels: a few cases cover it; the
        # test stage has the rest.
        ks = [(5, 2), (3, 4)] if not rehearse else [(3, 2)]
    for fused in (False, True):
        C, H, W = (4, 3, 5) if backend == "triton" and rehearse else (16, 9, 13)
        cases += [(2, C, H, W, k, 2, s, "fp32", fused, False) for (k, s) in ks]
        cases.append((2, C, H, W, 5, 1, 2, "bf16", fused, True))
        cases.append((2, C, H, W, 3, 2, 2, "fp32", fused, True))
        if backend != "triton":
            cases.append((2, 16, 9, 13, 5, 4, 2, "fp64", fused, False))
            cases.append((2, 16, 9, 13, 5, 1, 2, "fp16", fused, False))
            if not rehearse:  # the split channel reduction of the CUDA kernels
                cases.append((1, 256, 33, 70, 5, 1, 2, "fp32", fused, False))
        cases.append((0, 8, 5, 5, 5, 1, 2, "fp32", fused, False))            # empty batch
    return cases


def down_smoke_cases(backend: str, rehearse: bool) -> list[tuple]:
    """The same for the down ops (carafe_down, carafe_down_fused), on the backends that have them: H, W
    that s does not divide, the templated and generic kernels' (k, s), the dtypes, channels_last."""
    cases = []
    ks = [(5, 2), (3, 2), (3, 3), (1, 1), (7, 2), (5, 4), (9, 2), (11, 3), (3, 8)]
    for fused in (False, True):
        cases += [(2, 16, 9, 13, k, 2, s, "fp32", fused, False) for (k, s) in ks]
        cases.append((2, 16, 9, 13, 5, 1, 2, "bf16", fused, True))
        cases.append((2, 16, 9, 13, 3, 2, 3, "fp32", fused, True))
        cases.append((2, 16, 9, 13, 5, 4, 2, "fp64", fused, False))
        cases.append((2, 16, 9, 13, 5, 1, 2, "fp16", fused, False))
        if not rehearse:  # the split channel reduction of the CUDA kernels
            cases.append((1, 256, 65, 139, 5, 1, 2, "fp32", fused, False))
        cases.append((0, 8, 5, 5, 5, 1, 2, "fp32", fused, False))            # empty batch
    return cases


def stage_smoke(out: Path, rehearse: bool) -> int:
    import torch

    import carafe_kernels
    from carafe_kernels import carafe, carafe_down, carafe_down_fused, carafe_fused
    from carafe_kernels.contract import down_output_size
    from carafe_kernels.reference import (carafe_down_fused_reference, carafe_down_reference,
                                          carafe_fused_reference, carafe_reference)
    from carafe_kernels.registry import BACKENDS

    # op -> (function, its float64 reference) by (down, fused)
    ops = {(False, False): (carafe, carafe_reference), (False, True): (carafe_fused, carafe_fused_reference),
           (True, False): (carafe_down, carafe_down_reference),
           (True, True): (carafe_down_fused, carafe_down_fused_reference)}
    dtypes = {"fp32": torch.float32, "fp64": torch.float64, "fp16": torch.float16, "bf16": torch.bfloat16}
    # On a GPU the two GPU backends; in a rehearsal the cpu backend stands in for cuda, and Triton runs in
    # its interpreter when it can.
    backends = ["cpu", "triton"] if rehearse else ["cuda", "triton"]
    device_of = {"cpu": "cpu", "cuda": "cuda", "triton": "cpu" if rehearse else "cuda"}
    status = carafe_kernels.backend_status()
    record: dict = {"checks": 0, "failures": [], "skipped": []}

    def check(tag, got, want, dtype, terms):
        record["checks"] += 1
        ok, err, atol = within_tolerance(got, want, dtype, terms)
        print(f"  {'ok  ' if ok else 'FAIL'} {tag}: max abs err {err:.3e} (atol {atol:.3e})", flush=True)
        if not ok:
            record["failures"].append(tag)

    for backend in backends:
        if status[backend] is not None:
            record["skipped"].append(f"{backend}: {status[backend]}")
            print(f"{backend}: skipped: {status[backend]}")
            continue
        dev = device_of[backend]
        print(f"correctness vs the float64 reference (backend={backend!r}, {dev}):")
        # The down ops too where the backend has them (a backend gaining them is checked from then on).
        cases = [(False, case) for case in smoke_cases(backend, rehearse)]
        if BACKENDS[backend].carafe_down is not None:
            cases += [(True, case) for case in down_smoke_cases(backend, rehearse)]
        for down, (N, C, H, W, k, G, s, dname, fused, channels_last) in cases:
            if backend == "triton" and dname == "fp64":
                continue
            dtype = dtypes[dname]
            fn, reference = ops[down, fused]
            gen = torch.Generator().manual_seed(0)
            f = torch.randn(N, C, H, W, generator=gen, dtype=torch.float64)
            if down:  # masks and logits alike (N, G*k*k, ceil(H/s), ceil(W/s))
                Ho, Wo = down_output_size(H, s), down_output_size(W, s)
                m = (torch.randn(N, G * k * k, Ho, Wo, generator=gen, dtype=torch.float64) if fused
                     else torch.rand(N, G * k * k, Ho, Wo, generator=gen, dtype=torch.float64))
            else:
                Ho, Wo = H * s, W * s
                m = (torch.randn(N, G * k * k * s * s, H, W, generator=gen, dtype=torch.float64) if fused
                     else torch.rand(N, G * k * k, Ho, Wo, generator=gen, dtype=torch.float64))
            go = torch.randn(N, C, Ho, Wo, generator=gen, dtype=torch.float64)
            fx, mx = f.to(dev, dtype), m.to(dev, dtype)
            # The rounded inputs are the reference's inputs, so only the kernel's arithmetic is measured.
            fr = fx.detach().double().cpu().requires_grad_()
            mr = mx.detach().double().cpu().requires_grad_()
            reference(fr, mr, k, G, s).backward(go.to(dtype).double())
            want = reference(fr.detach(), mr.detach(), k, G, s)
            if channels_last:
                fx, mx = fx.to(memory_format=torch.channels_last), mx.to(memory_format=torch.channels_last)
            fx.requires_grad_()
            mx.requires_grad_()
            got = fn(fx, mx, k, G, s, backend=backend)
            got.backward(go.to(dev, dtype))
            tag = (f"{backend} {'down ' if down else ''}{'fused' if fused else 'plain'} "
                   f"N{N}-C{C}-H{H}-W{W}-k{k}-g{G}-s{s} {dname}{' channels_last' if channels_last else ''}")
            terms = summed_terms(k, G, s, C, fused, down)
            check(tag + " out", got, want, dtype, terms["out"])
            check(tag + " grad_features", fx.grad, fr.grad, dtype, terms["grad_features"])
            check(tag + " grad_masks", mx.grad, mr.grad, dtype, terms["grad_masks"])
            # The GPU backends (cuda, triton) read channels_last without a copy and return the input's
            # layout (the cpu backend, the cuda stand-in of a rehearsal, returns contiguous NCHW). Only
            # the output tells: autograd gives a leaf's .grad the leaf's layout whatever the kernel returned.
            if channels_last and got.numel() and backend != "cpu":
                if not got.is_contiguous(memory_format=torch.channels_last):
                    print(f"  FAIL {tag}: the output is not channels_last like its input")
                    record["failures"].append(tag + " output layout")

        print(f"determinism ({backend}: two backward passes, bitwise):")
        shape = (1, 8, 6, 7) if rehearse else (2, 128, 40, 40)
        with _deterministic():
            for down in (False, True) if BACKENDS[backend].carafe_down is not None else (False,):
                for fused in (False, True):
                    N, C, H, W = shape
                    # k = 5, s = 2: up to (2H, 2W), down to (ceil(H/2), ceil(W/2)); masks and logits
                    Ho, Wo = ((H + 1) // 2, (W + 1) // 2) if down else (2 * H, 2 * W)
                    gen = torch.Generator().manual_seed(1)
                    f = torch.randn(N, C, H, W, generator=gen).to(dev)
                    m = (torch.randn(N, 25, Ho, Wo, generator=gen) if down and fused
                         else torch.randn(N, 25 * 4, H, W, generator=gen) if fused
                         else torch.rand(N, 25, Ho, Wo, generator=gen)).to(dev)
                    go = torch.randn(N, C, Ho, Wo, generator=gen).to(dev)
                    fn = ops[down, fused][0]
                    grads = []
                    for _ in range(2):
                        fx, mx = f.clone().requires_grad_(), m.clone().requires_grad_()
                        fn(fx, mx, 5, 1, 2, backend=backend).backward(go)
                        grads.append((fx.grad, mx.grad))
                    same = all(torch.equal(a, b) for a, b in zip(*grads))
                    record["checks"] += 1
                    name = f"{'down ' if down else ''}{'fused' if fused else 'plain'}"
                    print(f"  {'ok  ' if same else 'FAIL'} {backend} {name} backward bitwise identical")
                    if not same:
                        record["failures"].append(f"{backend} {name} determinism")

    if rehearse:
        record["skipped"].append("cuda offsets beyond 2^31 elements: rehearsal: needs a GPU (about 8 GB)")
    elif status["cuda"] is None:
        print("offsets beyond 2^31 elements (bf16 output of 2^31+ elements, last channels checked):")
        try:
            N, C, H, W, k, s = 1, 520, 1024, 1024, 5, 2
            f = torch.randn(N, C, H, W, device="cuda", dtype=torch.bfloat16)
            logits = torch.randn(N, k * k * s * s, H, W, device="cuda", dtype=torch.bfloat16)
            out_big = carafe_fused(f, logits, k, 1, s, backend="cuda")
            tail = carafe_fused_reference(f[:, -2:].double(), logits.double(), k, 1, s)
            check("cuda fused forward >2^31 elements, last 2 channels", out_big[:, -2:], tail, torch.bfloat16, k * k)
            go = torch.randn_like(out_big)
            del out_big, tail
            # both gradients (output_mask): the mask kernel runs at these offsets too, only gf is checked
            gf, _ = torch.ops.carafe_kernels.carafe_fused_backward(go, f, logits, k, 1, s, [True, True])
            fr = f[:, -2:].double().requires_grad_()
            carafe_fused_reference(fr, logits.double(), k, 1, s).backward(go[:, -2:].double())
            check("cuda fused backward >2^31 elements, grad_features of the last 2 channels", gf[:, -2:], fr.grad,
                  torch.bfloat16, k * k * s * s)
            del f, logits, go, gf, fr
            torch.cuda.empty_cache()
        except torch.OutOfMemoryError as exc:
            record["skipped"].append(f"cuda offsets beyond 2^31 elements: out of memory: {exc}")
    (out / "smoke.json").write_text(json.dumps(record, indent=1) + "\n")
    for why in record["skipped"]:
        print("skipped:", why)
    if record["failures"]:
        print(f"FAILED: {len(record['failures'])} of {record['checks']} smoke checks: {record['failures']}")
    return 1 if record["failures"] else 0


class _deterministic:
    """torch.use_deterministic_algorithms(True) for a block, restored after."""

    def __enter__(self):
        import torch
        self.before = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)

    def __exit__(self, *exc):
        import torch
        torch.use_deterministic_algorithms(self.before)


# ---------------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------------

class Driver:
    def __init__(self, args):
        self.args = args
        self.out = Path(args.outdir).resolve()
        self.rehearse = args.rehearse
        self.started = time.monotonic()
        self.budget = args.budget
        self.limits = dict(args.limit)
        self.only = set(args.only.split(",")) if args.only else None
        self.wheel_site = str(self.out / "wheel-site") if args.wheel else None
        self.summary = {"schema": 1, "mode": "rehearsal" if self.rehearse else "gpu", "budget_s": self.budget,
                        "started_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                        "commit": _git("rev-parse", "HEAD"), "dirty": bool(_git("status", "--porcelain")),
                        "wheel": args.wheel, "stages": [], "ok": None, "seconds": 0}

    # -- environment of the stage processes ----------------------------------------------------------
    def env(self, **extra) -> dict:
        env = dict(os.environ)
        env.pop("TRITON_INTERPRET", None)  # on a GPU the Triton stages must run the kernels, not the interpreter
        paths = ([self.wheel_site] if self.wheel_site else []) + [str(REPO)]
        if env.get("PYTHONPATH"):
            paths.append(env["PYTHONPATH"])
        env.update(PYTHONPATH=os.pathsep.join(paths), PYTHONUNBUFFERED="1", **extra)
        return env

    def python(self, *argv: str) -> list[str]:
        # -P: the working directory is not put first on sys.path, so with --wheel the unpacked wheel's
        # carafe_kernels (first on PYTHONPATH) is imported, not the checkout's sources without a binary.
        return [sys.executable, "-P", *argv]

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.started)

    # -- running and recording --------------------------------------------------------------------
    def record(self, entry: dict) -> None:
        self.summary["stages"].append(entry)
        self.write_summary()
        line = f"=== [{entry['name']}] {entry['status']}"
        if "seconds" in entry:
            line += f" ({entry['seconds']:.0f}s)"
        if entry.get("reason"):
            line += f": {entry['reason']}"
        if entry.get("tests"):
            line += " " + ", ".join(f"{v} {k}" for k, v in entry["tests"].items() if v)
        print(line, flush=True)

    def write_summary(self) -> None:
        self.summary["seconds"] = round(time.monotonic() - self.started, 1)
        tmp = self.out / "summary.json.tmp"
        tmp.write_text(json.dumps(self.summary, indent=1) + "\n")
        tmp.replace(self.out / "summary.json")

    def skip(self, name: str, reason: str) -> None:
        self.record({"name": name, "status": "skipped", "reason": reason})

    def run(self, name: str, argv: list[str], env: dict | None = None, events: bool = False) -> dict:
        cap = self.limits.get(name, dict((n, c) for n, c, _ in STAGES)[name])
        limit = min(cap, self.left() - RESERVE)
        if limit < 5:
            entry = {"name": name, "status": "skipped", "reason": "out of time (budget spent by earlier stages)"}
            self.record(entry)
            return entry
        log_path = self.out / f"{name}.log"
        events_path = self.out / f"{name}.events.jsonl"
        env = env or self.env()
        if events:
            env["GPU_CHECK_EVENTS"] = str(events_path)
        t0 = time.monotonic()
        with open(log_path, "w") as log:
            log.write(f"=== [{name}] limit {limit:.0f}s: {shlex.join(argv)}\n")
            log.flush()
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env,
                                    start_new_session=True)
            try:
                rc = proc.wait(timeout=limit)
                status = "ok" if rc == 0 else "failed"
            except subprocess.TimeoutExpired:
                rc, status = None, "timeout"
                _kill_group(proc)
        entry = {"name": name, "status": status, "seconds": round(time.monotonic() - t0, 1),
                 "limit_s": round(limit), "rc": rc, "log": log_path.name}
        if events:
            counts, reasons, failures = count_events(events_path)
            entry.update(tests=counts, skip_reasons=reasons, failed_tests=failures[:50])
            if status == "ok" and counts["passed"] == 0:
                entry.update(status="failed", reason="no test passed")
        details = self.out / f"{name}.json"
        if details.exists():
            entry["details"] = json.loads(details.read_text())
        if status != "ok":
            tail = log_path.read_text(errors="replace").splitlines()[-25:]
            print("\n".join(f"    | {line}" for line in tail))
        self.record(entry)
        return entry

    def wanted(self, name: str) -> bool:
        """Whether --only lets this stage run; a stage left out is recorded as skipped."""
        if self.only is not None and name not in self.only:
            if name not in ("env", "wheel"):
                self.skip(name, "not in --only")
            return False
        return True

    # -- the stages ----------------------------------------------------------------------------------
    def main(self) -> int:
        self.out.mkdir(parents=True, exist_ok=True)
        pyrun = [*self.python("-m", "benchmarks.gpu_check"), "stage"]
        common = ["--out", str(self.out)] + (["--rehearse"] if self.rehearse else [])
        env_ok = True
        if self.args.wheel:
            # Whatever --only says: every later stage imports the wheel's carafe_kernels.
            if not self.unpack_wheel():
                for name in ("env", "build", "status", "smoke", "gpu-tests", "bench", "rest"):
                    self.skip(name, "the wheel stage failed: nothing would test that wheel")
                return self.finish()
        else:
            self.skip("wheel", "no --wheel given")
        if self.wanted("env"):
            env_ok = self.run("env", pyrun + ["env"] + common
                              + (["--wheel-site", self.wheel_site] if self.wheel_site else []))["status"] == "ok"
        else:
            self.skip("env", "not in --only")
        if not env_ok and not self.rehearse:
            # Nothing GPU-related can work (or the wrong carafe_kernels would be tested): no build either.
            for name in ("build", "status", "smoke", "gpu-tests", "bench", "rest"):
                self.skip(name, "the env stage failed (see env.log): no usable CUDA device or wrong import")
            return self.finish()
        if not self.wanted("build"):
            pass
        elif self.args.wheel:
            self.skip("build", "--wheel: the prebuilt extension is used, nothing is built")
        elif self.rehearse:
            self.skip("build", "rehearsal: nvcc for the GPU's arch needs a GPU; the extension already built here "
                               "is used")
        else:
            self.build()
        # CARAFE_TRITON_AUTOTUNE=0 everywhere but bench: one Triton config per kernel and shape. Checking
        # correctness does not need the fastest config, and timing 8 candidates x 3 kernels for every new
        # shape does not fit the budget; bench autotunes (and checks each autotuned row before timing it).
        interp = {"TRITON_INTERPRET": "1"} if self.rehearse else {}
        interp["CARAFE_TRITON_AUTOTUNE"] = "0"
        if self.wanted("status"):
            self.run("status", pyrun + ["status"] + common, env=self.env(**interp))
        if self.wanted("smoke"):
            self.run("smoke", pyrun + ["smoke"] + common, env=self.env(**interp))
        if self.wanted("gpu-tests"):
            selection = REHEARSAL_TEST_ARGS if self.rehearse else GPU_TEST_ARGS
            self.run("gpu-tests", self.python("-m", "pytest", "-p", "benchmarks.gpu_check", "-rfEs", "-q",
                                              *selection), env=self.env(CARAFE_TRITON_AUTOTUNE="0"), events=True)
        if self.wanted("bench"):
            bench_args = shlex.split(self.args.bench_args) if self.args.bench_args else (
                REHEARSAL_BENCH_ARGS if self.rehearse else BENCH_ARGS)
            self.run("bench", self.python("-m", "benchmarks.carafe", *bench_args,
                                          "--jsonl", str(self.out / "bench.jsonl"),
                                          "--json", str(self.out / "bench.json")))
            rows = _count_lines(self.out / "bench.jsonl")
            self.summary["stages"][-1]["rows"] = rows
            self.write_summary()
        if self.wanted("rest"):
            if self.rehearse:
                self.skip("rest", "rehearsal: the rest of the suite is CI's own run")
            else:
                # Everything the gpu-tests stage did not run (its events name what it ran), slow ones aside.
                env = self.env(GPU_CHECK_DESELECT=str(self.out / "gpu-tests.events.jsonl"), CARAFE_TRITON_AUTOTUNE="0")
                self.run("rest", self.python("-m", "pytest", "-p", "benchmarks.gpu_check", "-rfEs", "-q",
                                             "-m", "not slow", "tests"), env=env, events=True)
        return self.finish()

    def unpack_wheel(self) -> bool:
        t0 = time.monotonic()
        site = Path(self.wheel_site)
        try:
            if site.exists():
                raise RuntimeError(f"{site} already exists; give a fresh OUTDIR (nothing is overwritten)")
            with zipfile.ZipFile(self.args.wheel) as wheel:
                names = wheel.namelist()
                if not any(n.startswith("carafe_kernels/_C") and n.endswith((".so", ".pyd")) for n in names):
                    raise RuntimeError(f"{self.args.wheel} has no compiled extension carafe_kernels/_C*.so")
                wheel.extractall(site)
            # The tests come from this checkout: the wheel's Python sources must be this checkout's.
            sources = [n for n in names if n.endswith(".py") and n.split("/")[0] in ("carafe_kernels", "cares")]
            differ = [n for n in sources if not (REPO / n).is_file() or (REPO / n).read_bytes() != (site / n).read_bytes()]
            if differ:
                raise RuntimeError(f"the wheel was built from other sources than this checkout: {differ[:10]}")
            entry = {"name": "wheel", "status": "ok", "reason": f"unpacked into {site}"}
        except (OSError, zipfile.BadZipFile, RuntimeError) as exc:
            entry = {"name": "wheel", "status": "failed", "reason": str(exc)}
        entry["seconds"] = round(time.monotonic() - t0, 1)
        self.record(entry)
        return entry["status"] == "ok"

    def build(self) -> None:
        env_json = self.out / "env.json"
        arch = json.loads(env_json.read_text()).get("arch") if env_json.exists() else None
        env = self.env(TORCH_CUDA_ARCH_LIST=arch or "9.0", CARAFE_FORCE_CUDA="1",
                       MAX_JOBS=os.environ.get("MAX_JOBS", str(os.cpu_count() or 4)))
        self.run("build", self.python("setup.py", "build_ext", "--inplace"), env=env)

    def finish(self) -> int:
        required = {name for name, _, req in STAGES if req}
        bad = [s["name"] for s in self.summary["stages"]
               if s["status"] == "failed" or (s["status"] == "timeout" and s["name"] in required)
               or (s["status"] == "skipped" and s.get("reason", "").startswith("out of time") and s["name"] in required)]
        self.summary["ok"] = not bad
        self.summary["failed_stages"] = bad
        self.write_summary()
        print(f"=== summary ({self.summary['seconds']:.0f}s of {self.budget}s): "
              f"{'ok' if not bad else 'FAILED: ' + ', '.join(bad)}; {self.out / 'summary.json'}", flush=True)
        return 0 if not bad else 1




def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM the stage's process group (pytest, compilers, workers), then SIGKILL what is left."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _count_lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def _git(*argv: str) -> str | None:
    try:
        return subprocess.run(["git", *argv], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def _limit(text: str) -> tuple[str, float]:
    name, _, seconds = text.partition("=")
    if name not in {n for n, _, _ in STAGES} or not seconds:
        raise argparse.ArgumentTypeError(f"--limit takes STAGE=SECONDS with STAGE one of "
                                         f"{', '.join(n for n, _, _ in STAGES)}; got {text!r}")
    try:
        return name, float(seconds)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--limit {text!r}: {seconds!r} is not a number of seconds") from None


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["stage"]:
        parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check stage")
        parser.add_argument("stage", choices=["env", "status", "smoke"])
        parser.add_argument("--out", required=True)
        parser.add_argument("--rehearse", action="store_true")
        parser.add_argument("--wheel-site")
        args = parser.parse_args(argv[1:])
        out = Path(args.out)
        if args.stage == "env":
            return stage_env(out, args.rehearse, args.wheel_site)
        return {"status": stage_status, "smoke": stage_smoke}[args.stage](out, args.rehearse)

    parser = argparse.ArgumentParser(prog="bash benchmarks/gpu_check.sh", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("outdir", help="where the logs, summary.json and bench.jsonl go")
    parser.add_argument("--rehearse", action="store_true", help="run every stage on a CPU-only machine")
    parser.add_argument("--wheel", help="a prebuilt wheel: unpacked into OUTDIR/wheel-site, nothing is built")
    parser.add_argument("--budget", type=float, default=float(os.environ.get("GPU_CHECK_BUDGET", DEFAULT_BUDGET)),
                        help=f"seconds for the whole check (default {DEFAULT_BUDGET}, or $GPU_CHECK_BUDGET)")
    parser.add_argument("--only", help="comma list of stages to run (e.g. bench for a second call)")
    parser.add_argument("--limit", type=_limit, action="append", default=[],
                        help="STAGE=SECONDS: this stage's cap instead of its default")
    parser.add_argument("--bench-args", help="arguments of python -m benchmarks.carafe instead of the default")
    args = parser.parse_args(argv)
    if args.only:
        unknown = set(args.only.split(",")) - {n for n, _, _ in STAGES}
        if unknown:
            parser.error(f"--only: unknown stage(s) {sorted(unknown)}; stages: {', '.join(n for n, _, _ in STAGES)}")
    if args.budget <= 0:
        parser.error(f"--budget must be positive, got {args.budget}")
    if args.wheel and not Path(args.wheel).is_file():
        parser.error(f"--wheel {args.wheel}: no such file")
    if args.wheel and sys.version_info < (3, 11):
        parser.error("--wheel needs Python >= 3.11 (python -P keeps the checkout off sys.path)")
    return Driver(args).main()


if __name__ == "__main__":
    sys.exit(main())
