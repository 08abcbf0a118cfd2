"""Benchmark every CARAFE backend against the baselines people use today.

    python -m benchmarks.carafe --backends all --shapes cares,fpn --modes fwd,bwd,fwdbwd \\
        --dtypes fp32,bf16 --json out.json [--plot out.png]
    python -m benchmarks.carafe --shapes target --threads 2          # the CPU targets
    python -m benchmarks.carafe --from-json out.json --plot out.png   # re-print / re-plot a run
    python -m benchmarks.carafe --from-json run-1.json run-2.json run-3.json   # each row's median

Rows, for each op (--ops; "fused" = carafe_fused, the default; "plain" = carafe), shape, dtype and mode:
    <backend>         each requested backend ("all": every backend usable on the device; the reference
                      is always timed, as the "x ref" baseline)
    unfused:<backend> fused op only: F.pixel_shuffle + softmax (mmcv's kernel_normalizer) + the plain
                      carafe op of that backend (for every native backend)
    unfold            the formulation people write today: carafe_kernels.reference.carafe_unfold (after
                      normalize_mask_logits for the fused op); it materialises a k*k-fold tensor, and is
                      skipped (with a note) where that would not fit in --max-baseline-gb
Every row is checked against the float64 reference (output and both gradients) before it is timed; a
row that fails is skipped, loudly, and listed in the JSON. The timed rows pass a consistency gate
(docs/design.md#benchmarks): an implementation with a part slower than the whole (fwd or bwd above
fwdbwd) or a p20-p80 spread above --spread-limit is re-timed in a fresh process (--retime times) and
otherwise marked INVALID, never shown as a result.

Columns: ms median (p20-p80); GB/s = least bytes / time; floor% = floor / time, where
floor = max(FLOPs / FMA rate, least bytes / bandwidth) (docs/design.md#cost-model-and-floor; ceilings
from benchmarks/machine.py);
"x clone" = time / the time of cloning an output-sized tensor of the row's dtype, measured in the same run
(a fresh allocation, its first touch and one read + write of the output's size: what any out-of-place op
pays before its arithmetic; the bandwidth ceiling above copies into an existing buffer and does not);
peak memory of one call (and in output sizes); speedups vs unfold, vs the reference backend, and (fused
op) vs the same backend's unfused pipeline.

Least bytes (b bytes per element; M = masks/logits elements = N*G*k*k*s*s*H*W; O = N*C*H*s*W*s):
    fwd           b * (N*C*H*W + M + O)            read features, masks/logits; write output
    bwd           b * (O + 2*N*C*H*W + 2*M)        read grad_out, features, masks/logits; write both grads
    fwdbwd        the sum of fwd and bwd
    bwd_features  b * (O + M + N*C*H*W)            read grad_out, masks/logits; write grad features
    bwd_masks     b * (O + N*C*H*W + M), + M fused read grad_out, features (the logits: the softmax
                                                   backward); write grad masks/logits
bwd and fwdbwd both call torch.autograd.grad(..., retain_graph=True), so they are timed the same way.
bwd_features and bwd_masks (not in the default --modes) are bwd with only the features, or only the
masks/logits, requiring grad: the backward that computes only what is asked (the ops' output_mask); the
"x bwd" column is the same implementation's full bwd time over theirs.
FLOPs: fwd 2*O*k*k (one multiply-add per tap per output element), bwd twice that, fwdbwd three times,
bwd_features and bwd_masks once.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

try:
    import carafe_kernels  # noqa: F401
except ModuleNotFoundError:  # run from a checkout that is not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from carafe_kernels import carafe, carafe_fused  # noqa: E402
from carafe_kernels.reference import (  # noqa: E402
    carafe_fused_reference,
    carafe_reference,
    carafe_unfold,
    normalize_mask_logits,
)
from carafe_kernels.registry import BACKENDS  # noqa: E402

from .machine import (  # noqa: E402
    load_warning,
    machine_info,
    machine_line,
    measure_peaks,
    peak_memory_bytes,
    time_fn,
    torch_threads,
)
from .shapes import PRESETS, Shape, parse_shapes  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
MODES = ("fwd", "bwd", "fwdbwd", "bwd_features", "bwd_masks")
# The backward modes that ask for one gradient: the input (0: features, 1: masks/logits) that requires grad.
PARTIAL_BACKWARD = {"bwd_features": 0, "bwd_masks": 1}
OPS = ("fused", "plain")
# Correctness check before timing: max |error| / max(1, max |oracle|) against the float64 reference.
CHECK_TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


# --- cost model ----------------------------------------------------------------------------------------

def least_bytes(shape: Shape, mode: str, element_bytes: int, op: str = "fused") -> int:
    N, C, H, W, k, G, s = shape.N, shape.C, shape.H, shape.W, shape.k, shape.G, shape.s
    features, masks, out = N * C * H * W, N * G * k * k * s * s * H * W, N * C * H * s * W * s
    forward = features + masks + out
    backward = out + 2 * features + 2 * masks
    elements = {"fwd": forward, "bwd": backward, "fwdbwd": forward + backward,
                "bwd_features": out + masks + features,
                # the plain op's mask gradient needs no masks; the fused one reads the logits' softmax
                "bwd_masks": out + features + masks + (masks if op == "fused" else 0)}
    return element_bytes * elements[mode]


def flops(shape: Shape, mode: str) -> int:
    forward = 2 * shape.N * shape.C * shape.H * shape.s * shape.W * shape.s * shape.k * shape.k
    return forward * {"fwd": 1, "bwd": 2, "fwdbwd": 3, "bwd_features": 1, "bwd_masks": 1}[mode]


def floor_ms(shape: Shape, mode: str, element_bytes: int, peaks: dict, op: str = "fused") -> float:
    compute = flops(shape, mode) / (peaks["gflops"] * 1e9)
    memory = least_bytes(shape, mode, element_bytes, op) / (peaks["gbps"] * 1e9)
    return max(compute, memory) * 1e3


# --- what is timed -------------------------------------------------------------------------------------

def impl_fn(op: str, impl: str, shape: Shape) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """(features, masks_or_logits) -> output for one row."""
    k, G, s = shape.k, shape.G, shape.s
    if impl == "unfold":
        if op == "fused":
            return lambda f, lg: carafe_unfold(f, normalize_mask_logits(lg, k, G, s), k, G, s)
        return lambda f, m: carafe_unfold(f, m, k, G, s)
    if impl.startswith("unfused:"):
        backend = impl.split(":", 1)[1]

        def unfused(f, lg):  # mmcv's CARAFEPack.kernel_normalizer, then the plain op
            masks = F.pixel_shuffle(lg, s)
            n, c, h, w = masks.shape
            masks = masks.view(n, G, k * k, h, w).softmax(dim=2).view(n, c, h, w)
            return carafe(f, masks, k, G, s, backend=backend)
        return unfused
    if op == "fused":
        return lambda f, lg: carafe_fused(f, lg, k, G, s, backend=impl)
    return lambda f, m: carafe(f, m, k, G, s, backend=impl)


def make_inputs(op: str, shape: Shape, dtype: torch.dtype, device: str, seed: int = 0, layout: str = "contiguous"):
    """(features, masks_or_logits, grad_out): N(0, 1) features and logits; softmax-normalised masks;
    layout "channels_last" gives all three in that memory format (cares' CUDA default)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    features = torch.randn(shape.N, shape.C, shape.H, shape.W, device=device, dtype=dtype, generator=gen)
    second = torch.randn(shape.second_shape(op == "fused"), device=device, dtype=dtype, generator=gen)
    if op == "plain":
        n, c, h, w = second.shape
        second = second.view(n, shape.G, shape.k * shape.k, h, w).softmax(dim=2).view(n, c, h, w)
    grad_out = torch.randn(shape.out_shape, device=device, dtype=dtype, generator=gen)
    if layout == "channels_last":
        return tuple(t.contiguous(memory_format=torch.channels_last) for t in (features, second, grad_out))
    return features, second, grad_out


def _append_jsonl(path: str | None, rows: list[dict]) -> None:
    """Append rows to a JSON-lines file as soon as they are measured, so a run that is killed (a time
    limit) keeps them; --json is written only at the end."""
    if path:
        with open(path, "a") as f:
            for row in rows:
                f.write(json.dumps(row, default=str) + "\n")


def mode_fn(fn, mode: str, features, second, grad_out) -> Callable[[], object]:
    """The callable timed for a mode. fwd: no autograd graph; bwd: the backward of a graph built once;
    fwdbwd: both. bwd and fwdbwd run the backward the same way (retain_graph=True; bwd needs it to
    run the same graph again), so fwdbwd - bwd is the forward with autograd recording. bwd_features /
    bwd_masks: bwd with only that input requiring grad."""
    if mode == "fwd":
        f, m = features.detach(), second.detach()

        def forward():
            with torch.no_grad():
                return fn(f, m)
        return forward
    if mode in PARTIAL_BACKWARD:
        wanted = PARTIAL_BACKWARD[mode]
        f = features.detach().requires_grad_(wanted == 0)
        m = second.detach().requires_grad_(wanted == 1)
        out = fn(f, m)
        return lambda: torch.autograd.grad(out, ((f, m)[wanted],), grad_out, retain_graph=True)
    f = features.detach().requires_grad_(True)
    m = second.detach().requires_grad_(True)
    if mode == "bwd":
        out = fn(f, m)
        return lambda: torch.autograd.grad(out, (f, m), grad_out, retain_graph=True)
    return lambda: torch.autograd.grad(fn(f, m), (f, m), grad_out, retain_graph=True)


class Oracle:
    """Float64 reference results (output and both gradients) per (op, shape, dtype), computed once."""

    def __init__(self):
        self._cache: dict = {}

    def get(self, op, shape, dtype, features, second, grad_out):
        key = (op, shape, dtype)
        if key not in self._cache:
            ref = carafe_fused_reference if op == "fused" else carafe_reference
            f = features.detach().double().requires_grad_(True)
            m = second.detach().double().requires_grad_(True)
            out = ref(f, m, shape.k, shape.G, shape.s)
            grads = torch.autograd.grad(out, (f, m), grad_out.double())
            self._cache = {key: (out.detach(), *grads)}  # one at a time: they can be large
        return self._cache[key]


def check_impl(op, impl, shape, dtype, features, second, grad_out, oracle: Oracle, need_grads: bool,
               partial: tuple[str, ...] = ()) -> str | None:
    """None when impl matches the float64 reference (output, and gradients when need_grads; and the one
    gradient of each partial-backward mode in `partial`), else why not."""
    fn = impl_fn(op, impl, shape)
    names, got = ["output"], []
    try:
        f = features.detach().requires_grad_(need_grads)
        m = second.detach().requires_grad_(need_grads)
        out = fn(f, m)
        got = [out]
        if need_grads:
            got += list(torch.autograd.grad(out, (f, m), grad_out))
            names += ["grad features", "grad masks"]
        for mode in partial:
            wanted = PARTIAL_BACKWARD[mode]
            f = features.detach().requires_grad_(wanted == 0)
            m = second.detach().requires_grad_(wanted == 1)
            got += list(torch.autograd.grad(fn(f, m), ((f, m)[wanted],), grad_out))
            names.append(f"{mode}: grad {('features', 'masks')[wanted]}")
    except Exception as exc:  # noqa: BLE001 -- any failure is reported and the row skipped
        return f"raised {type(exc).__name__}: {exc}"
    full = oracle.get(op, shape, dtype, features, second, grad_out)
    want = list(full[:len(names) - len(partial)]) + [full[1 + PARTIAL_BACKWARD[mode]] for mode in partial]
    for name, a, b in zip(names, got, want):
        if a.dtype != dtype or a.shape != b.shape:
            return f"{name}: {a.dtype} {tuple(a.shape)}, expected {dtype} {tuple(b.shape)}"
        err = (a.double() - b).abs().max().item() if a.numel() else 0.0
        scale = max(1.0, b.abs().max().item() if b.numel() else 1.0)
        if not err / scale <= CHECK_TOL[dtype]:  # also catches NaN
            return f"{name}: max error {err:.3g} (scale {scale:.3g}) > tolerance {CHECK_TOL[dtype]:g}"
    return None


# --- the consistency gate ------------------------------------------------------------------------------

SPREAD_LIMIT = 1.5  # p80 / p20 above this: the machine was not steady while the row was timed


def inconsistencies(rows: list[dict], spread_limit: float = SPREAD_LIMIT) -> dict[str, str]:
    """{impl: why} for the impls whose rows (one op, shape, dtype; any modes) cannot all be right: a
    part slower than the whole (fwd or bwd above fwdbwd), or a p20-p80 spread above spread_limit."""
    problems: dict[str, list[str]] = {}
    by_impl: dict[str, dict[str, dict]] = {}
    for row in rows:
        by_impl.setdefault(row["impl"], {})[row["mode"]] = row
    for impl, modes in by_impl.items():
        whole = modes.get("fwdbwd")
        for part in ("fwd", "bwd", *PARTIAL_BACKWARD):
            if whole is not None and part in modes and modes[part]["ms"] > whole["ms"]:
                problems.setdefault(impl, []).append(
                    f"{part} {_fmt_ms(modes[part]['ms'])} ms > fwdbwd {_fmt_ms(whole['ms'])} ms")
        for mode, row in modes.items():
            if row["p20"] > 0 and row["p80"] / row["p20"] > spread_limit:
                problems.setdefault(impl, []).append(
                    f"{mode} p20-p80 spread {row['p80'] / row['p20']:.2f}x > {spread_limit:g}x")
    return {impl: "; ".join(why) for impl, why in problems.items()}


def retime_in_fresh_process(args, op: str, shape: Shape, dtype_name: str, modes: list[str], impls: list[str],
                            backends: list[str], peaks: dict, layout: str = "contiguous") -> list[dict]:
    """The rows of `impls` timed again by `python -m benchmarks.carafe` in a new process (fresh
    allocator and thread pool state; the machine's load may also have changed)."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "retime.json"
        cmd = [sys.executable, "-m", "benchmarks.carafe", "--shapes", shape.id, "--ops", op, "--dtypes", dtype_name,
               "--modes", ",".join(modes), "--backends", ",".join(backends), "--impls", ",".join(impls),
               "--device", args.device, "--threads", str(args.threads), "--min-run-time", str(args.min_run_time),
               "--peak-gbps", str(peaks["gbps"]), "--peak-gflops", str(peaks["gflops"]), "--retime", "0",
               "--spread-limit", str(args.spread_limit), "--layouts", layout, "--json", str(out)]
        if args.max_baseline_gb:
            cmd += ["--max-baseline-gb", str(args.max_baseline_gb)]
        proc = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True)
        if proc.returncode != 0 or not out.exists():
            print(f"   !! the re-timing process failed ({proc.returncode}): {proc.stderr[-500:]}")
            return []
        rows = json.loads(out.read_text())["rows"]
    for row in rows:
        row.pop("invalid", None)  # the caller judges the merged rows
    return rows


def gate_block(args, block: list[dict], op, shape, dtype_name, modes, backends, peaks,
               layout: str = "contiguous") -> None:
    """Re-times inconsistent impls in fresh processes (up to args.retime times), then marks what is still
    inconsistent INVALID (row["invalid"] = why): such rows are listed, never reported as results."""
    problems = inconsistencies(block, args.spread_limit)
    attempt = 0
    while problems and attempt < args.retime:
        attempt += 1
        for impl, why in problems.items():
            print(f"   re-timing {impl} at {op} {shape.id} {dtype_name} in a fresh process ({why})", flush=True)
        fresh = retime_in_fresh_process(args, op, shape, dtype_name, modes, sorted(problems), backends, peaks,
                                        layout)
        replacements = {(row["impl"], row["mode"]): row for row in fresh}
        for i, row in enumerate(block):
            new = replacements.get((row["impl"], row["mode"]))
            if new is not None:
                block[i] = {**new, "preset": row["preset"], "retimed": attempt}
        problems = inconsistencies(block, args.spread_limit)
    for row in block:
        if row["impl"] in problems:
            row["invalid"] = problems[row["impl"]]


def regate(rows: list[dict], spread_limit: float = SPREAD_LIMIT) -> None:
    """Marks the inconsistent rows of a results file INVALID (files written before the gate existed,
    or judged with another --spread-limit); nothing is re-timed."""
    blocks: dict[tuple, list[dict]] = {}
    for row in rows:
        blocks.setdefault((row["op"], row["shape"], row["dtype"], row.get("device"), row.get("layout", "contiguous")),
                          []).append(row)
    for block in blocks.values():
        problems = inconsistencies(block, spread_limit)
        for row in block:
            if row["impl"] in problems:
                row["invalid"] = problems[row["impl"]]


def median_over_runs(runs: list[list[dict]]) -> list[dict]:
    """Each row's median over repeated runs of the same rows (a noisy machine: run the CLI several times):
    the row, all columns, of the run whose time is the (lower) median among the runs where the row is
    valid, plus `runs` (how many) and `ms_range` (their fastest and slowest time). A row invalid in every
    run stays invalid."""
    def key(row):
        return (row["op"], row["shape"], row["dtype"], row["mode"], row["impl"], row.get("device"),
                row.get("layout", "contiguous"))

    seen: dict[tuple, list[dict]] = {}
    for rows in runs:
        for row in rows:
            seen.setdefault(key(row), []).append(row)
    merged = []
    for versions in seen.values():
        valid = sorted((r for r in versions if not r.get("invalid")), key=lambda r: r["ms"])
        if not valid:
            merged.append(dict(versions[0], runs=len(versions)))
            continue
        merged.append(dict(valid[(len(valid) - 1) // 2], runs=len(valid),
                           ms_range=[valid[0]["ms"], valid[-1]["ms"]]))
    return merged


def print_ranges(rows: list[dict]) -> None:
    print("Times over the runs (median row above; fastest - slowest run):")
    for row in rows:
        if row.get("ms_range"):
            lo, hi = row["ms_range"]
            print(f"  {row['op']} {row['shape']} {row['dtype']} {row['mode']} {row['impl']}: {row['ms']:.3f} ms "
                  f"over {row['runs']} runs ({lo:.3f} - {hi:.3f})")


# --- the run -------------------------------------------------------------------------------------------

@dataclass
class Plan:
    device: str
    backends: list[str]
    notes: list[str]


def resolve_backends(spec: str, device: str, probe_shape: Shape) -> Plan:
    probe = torch.empty(1, probe_shape.C, 1, 1, device=device)
    notes = []
    if spec == "all":
        names = []
        for name, backend in BACKENDS.items():
            reason = backend.call_unsupported_reason(probe, probe_shape.k, probe_shape.s)
            if name == "triton" and device == "cpu" and reason is None:
                reason = "the Triton interpreter on CPU is for testing, not timing (name it to time it anyway)"
            if reason is None:
                names.append(name)
            else:
                notes.append(f"backend {name!r} not benchmarked: {reason}")
    else:
        names = [n.strip() for n in spec.split(",") if n.strip()]
        for name in names:
            if name not in BACKENDS:
                raise SystemExit(f"unknown backend {name!r}; choose from all, {', '.join(BACKENDS)}")
        usable = []
        for name in names:
            reason = BACKENDS[name].call_unsupported_reason(probe, probe_shape.k, probe_shape.s)
            if reason is None:
                usable.append(name)
            else:
                notes.append(f"!! requested backend {name!r} cannot run on {device}: {reason} -- skipped")
        names = usable
    if "reference" not in names:
        names.append("reference")  # the "x ref" baseline
    return Plan(device, names, notes)


def _available_bytes(device: str) -> int:
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        return free
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30


def unfold_bytes(shape: Shape, element_bytes: int) -> int:
    """The unfold formulation's largest intermediate: (N, C*k*k, H*s, W*s), plus the low-res unfold."""
    N, C, k, s = shape.N, shape.C, shape.k, shape.s
    return element_bytes * N * C * k * k * shape.H * shape.W * (s * s + 1)


LAYOUTS = ("contiguous", "channels_last")


def run(args) -> dict:
    device = args.device
    try:
        shapes = parse_shapes(args.shapes)
    except ValueError as exc:
        raise SystemExit(f"--shapes: {exc}") from None
    if not shapes:
        raise SystemExit("--shapes: no shapes given")
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    layouts = [lay.strip() for lay in args.layouts.split(",") if lay.strip()]
    for name, values, allowed in (("--ops", ops, OPS), ("--modes", modes, MODES), ("--dtypes", dtypes, DTYPES),
                                  ("--layouts", layouts, LAYOUTS)):
        bad = [v for v in values if v not in allowed]
        if bad:
            raise SystemExit(f"{name}: unknown {bad}; choose from {', '.join(allowed)}")

    info = machine_info(threads=args.threads)
    print(machine_line(info))
    if device == "cpu" and load_warning(info):
        print(load_warning(info))
    if args.peak_gbps and args.peak_gflops:
        peaks = {"gbps": args.peak_gbps, "gflops": args.peak_gflops, "source": "given", "method": "command line"}
    else:
        measured = measure_peaks(device, threads=args.threads)
        peaks = {**measured, "gbps": args.peak_gbps or measured["gbps"],
                 "gflops": args.peak_gflops or measured["gflops"]}
        if args.peak_gbps or args.peak_gflops:
            peaks["source"] = "measured, partly overridden"
    print(f"Ceilings: {peaks['gbps']:.1f} GB/s copy bandwidth, {peaks['gflops']:.1f} GFLOP/s fp32 FMA rate "
          f"({peaks['source']}: {peaks['method']})")

    plan = resolve_backends(args.backends, device, shapes[0][1])
    for note in plan.notes:
        print(note)
    print(f"Backends: {', '.join(plan.backends)} | ops: {','.join(ops)} | modes: {','.join(modes)} | "
          f"dtypes: {','.join(dtypes)} | device: {device} | threads: {args.threads}")
    budget = args.max_baseline_gb * 1e9 if args.max_baseline_gb else 0.4 * _available_bytes(device)

    rows: list[dict] = []
    failures: list[dict] = []
    oracle = Oracle()
    for op in ops:
        for preset, shape in shapes:
            for dtype_name, layout in itertools.product(dtypes, layouts):
                dtype = DTYPES[dtype_name]
                element_bytes = torch.finfo(dtype).bits // 8
                impls = list(plan.backends)
                if op == "fused":
                    impls += [f"unfused:{b}" for b in plan.backends if b != "reference"]
                impls.append("unfold")
                if args.impls:  # a re-timing run: only these
                    impls = [impl for impl in impls if impl in args.impls.split(",")]
                features, second, grad_out = make_inputs(op, shape, dtype, device, layout=layout)
                clone_ms = output_clone_ms(grad_out, device, args)
                need_grads = any(m != "fwd" for m in modes)
                for impl in list(impls):
                    if impl == "unfold" and unfold_bytes(shape, element_bytes) * (3 if need_grads else 1) > budget:
                        why = (f"its {unfold_bytes(shape, element_bytes) / 1e9:.1f} GB intermediate exceeds the "
                               f"baseline budget {budget / 1e9:.1f} GB (--max-baseline-gb)")
                        print(f"   note: unfold skipped at {op} {shape.id} {dtype_name}: {why}")
                        failures.append({"op": op, "shape": shape.id, "dtype": dtype_name, "impl": impl,
                                         "reason": why, "kind": "skipped"})
                        impls.remove(impl)
                        continue
                    reason = check_impl(op, impl, shape, dtype, features, second, grad_out, oracle, need_grads,
                                        tuple(m for m in modes if m in PARTIAL_BACKWARD))
                    if reason is not None:
                        print(f"!! {impl} FAILED the correctness check at {op} {shape.id} {dtype_name}: {reason} "
                              "-- not timed", flush=True)
                        failures.append({"op": op, "shape": shape.id, "dtype": dtype_name, "impl": impl,
                                         "reason": reason, "kind": "failed check"})
                        impls.remove(impl)
                block: list[dict] = []
                for mode in modes:
                    for impl in impls:
                        fn = mode_fn(impl_fn(op, impl, shape), mode, features, second, grad_out)
                        timing = time_fn(fn, device, threads=args.threads, min_run_time=args.min_run_time)
                        peak = peak_memory_bytes(mode_fn(impl_fn(op, impl, shape), mode, features, second,
                                                         grad_out), device)
                        out_bytes = math.prod(shape.out_shape) * element_bytes
                        row = {
                            "op": op, "preset": preset, "shape": shape.id, **shape.as_dict(), "dtype": dtype_name,
                            "layout": layout, "mode": mode, "impl": impl, "device": device,
                            "threads": args.threads,
                            **timing,
                            "bytes": least_bytes(shape, mode, element_bytes, op), "flops": flops(shape, mode),
                            "floor_ms": floor_ms(shape, mode, element_bytes, peaks, op),
                            "peak_bytes": peak, "out_bytes": out_bytes,
                            "out_clone_ms": clone_ms, "vs_clone": timing["ms"] / clone_ms,
                        }
                        block.append(row)
                gate_block(args, block, op, shape, dtype_name, modes, plan.backends, peaks, layout)
                _add_partial_speedups(block)
                for mode in modes:
                    group = [row for row in block if row["mode"] == mode]
                    for row in group:
                        row["gbps"] = row["bytes"] / (row["ms"] * 1e-3) / 1e9
                        row["floor_fraction"] = row["floor_ms"] / row["ms"]
                    _add_speedups(group)
                    print_table(group, header=not rows)
                    rows.extend(group)
                    _append_jsonl(args.jsonl, group)
                del features, second, grad_out
    result = {"schema": 1, "machine": info, "peaks": peaks, "args": vars(args), "backends": plan.backends,
              "notes": plan.notes, "rows": rows, "skipped": failures}
    result["targets"] = evaluate_targets(rows)
    return result


def output_clone_ms(output_like: torch.Tensor, device: str, args) -> float:
    """Median ms of cloning an output-sized tensor (fresh allocation included): the cost beside the kernel."""
    return time_fn(output_like.clone, device, threads=args.threads, min_run_time=args.min_run_time)["ms"]


def _add_partial_speedups(block: list[dict]) -> None:
    """vs_bwd of the bwd_features / bwd_masks rows: the same implementation's full bwd time over theirs."""
    full = {row["impl"]: row["ms"] for row in block if row["mode"] == "bwd" and not row.get("invalid")}
    for row in block:
        if row["mode"] in PARTIAL_BACKWARD and row["impl"] in full and not row.get("invalid"):
            row["vs_bwd"] = full[row["impl"]] / row["ms"]


def _add_speedups(group: list[dict]) -> None:
    times = {row["impl"]: row["ms"] for row in group if not row.get("invalid")}
    for row in group:
        row["vs_unfold"] = times["unfold"] / row["ms"] if "unfold" in times else None
        row["vs_reference"] = times["reference"] / row["ms"] if "reference" in times else None
        unfused = times.get(f"unfused:{row['impl']}")
        row["vs_unfused"] = unfused / row["ms"] if unfused else None


# --- output --------------------------------------------------------------------------------------------

COLUMNS = [("op", 5), ("shape", 26), ("dtype", 7), ("mode", 6), ("impl", 17), ("ms (p20-p80)", 26),
           ("GB/s", 7), ("floor%", 7), ("peak MB (xout)", 16), ("x unfold", 8), ("x ref", 7), ("x unfused", 9),
           ("x bwd", 6), ("x clone", 7)]


def _fmt_ms(v: float) -> str:
    return f"{v:.3f}" if v < 100 else f"{v:.1f}"


def _fmt_x(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def format_row(row: dict) -> list[str]:
    # "cl": channels_last inputs (rows written before --layouts have no layout: contiguous)
    dtype = row["dtype"] + (" cl" if row.get("layout") == "channels_last" else "")
    if row.get("invalid"):  # listed, never shown as a result
        return [row["op"], row["shape"], dtype, row["mode"], row["impl"], "INVALID", "-", "-", "-", "-",
                "-", "-", "-", "-"]
    return [row["op"], row["shape"], dtype, row["mode"], row["impl"],
            f"{_fmt_ms(row['ms'])} ({_fmt_ms(row['p20'])}-{_fmt_ms(row['p80'])})",
            f"{row['gbps']:.1f}", f"{100 * row['floor_fraction']:.1f}",
            f"{row['peak_bytes'] / 2**20:.1f} ({row['peak_bytes'] / row['out_bytes']:.2f})",
            _fmt_x(row["vs_unfold"]), _fmt_x(row["vs_reference"]), _fmt_x(row["vs_unfused"]),
            _fmt_x(row.get("vs_bwd")), _fmt_x(row.get("vs_clone"))]


def print_table(rows: list[dict], header: bool = True) -> None:
    if header:
        print("  ".join(name.ljust(width) for name, width in COLUMNS))
        print("  ".join("-" * width for _, width in COLUMNS))
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, (_, width) in zip(format_row(row), COLUMNS)), flush=True)


TARGET = PRESETS["target"][0]


def evaluate_targets(rows: list[dict]) -> list[dict]:
    """The CPU targets (issue 2) at the target shape, fp32, when those rows were measured."""
    def find(impl, mode, op="fused"):
        for row in rows:
            if (row["shape"] == TARGET.id and row["dtype"] == "fp32" and row["op"] == op and row["mode"] == mode
                    and row["impl"] == impl and row["device"] == "cpu" and not row.get("invalid")):
                return row
        return None

    targets = []

    def add(name, row, value, passed, detail):
        if row is not None and value is not None:
            targets.append({"target": name, "value": value, "passed": bool(passed), "detail": detail,
                            "threads": row["threads"]})

    fwd, fwdbwd = find("cpu", "fwd"), find("cpu", "fwdbwd")
    ref, unfold = find("reference", "fwd"), find("unfold", "fwd")
    if fwd:
        add("cpu fused fwd >= 30x unfold", fwd, fwd["vs_unfold"], (fwd["vs_unfold"] or 0) >= 30,
            f"{_fmt_x(fwd['vs_unfold'])}x")
        add("cpu fused fwd allocates <= the output", fwd, fwd["peak_bytes"] / fwd["out_bytes"],
            fwd["peak_bytes"] <= fwd["out_bytes"],
            f"peak {fwd['peak_bytes'] / 2**20:.2f} MiB, output {fwd['out_bytes'] / 2**20:.2f} MiB")
    if fwdbwd:
        add("cpu fused fwd+bwd >= 15x unfold", fwdbwd, fwdbwd["vs_unfold"], (fwdbwd["vs_unfold"] or 0) >= 15,
            f"{_fmt_x(fwdbwd['vs_unfold'])}x")
    if ref:
        add("reference fwd >= 3x unfold", ref, ref["vs_unfold"], (ref["vs_unfold"] or 0) >= 3,
            f"{_fmt_x(ref['vs_unfold'])}x")
        if unfold:
            k2 = TARGET.k * TARGET.k
            add("reference fwd without the k*k-fold intermediate", ref, ref["peak_bytes"] / ref["out_bytes"],
                ref["peak_bytes"] < k2 * ref["out_bytes"] / 2,
                f"reference peak {ref['peak_bytes'] / ref['out_bytes']:.2f} outputs, "
                f"unfold {unfold['peak_bytes'] / unfold['out_bytes']:.2f} outputs")
    return targets


def print_targets(targets: list[dict]) -> None:
    if not targets:
        return
    print(f"\nTargets at {TARGET.id}, fp32, CPU:")
    for t in targets:
        print(f"  [{'PASS' if t['passed'] else 'FAIL'}] {t['target']}: {t['detail']} ({t['threads']} threads)")


def print_invalid(rows: list[dict]) -> None:
    invalid = [row for row in rows if row.get("invalid")]
    if invalid:
        print("\nINVALID (a part slower than fwdbwd, or a wide p20-p80 spread, after any re-timing; not results):")
        for row in invalid:
            print(f"  {row['impl']} at {row['op']} {row['shape']} {row['dtype']} {row['mode']}: {row['invalid']}")


def print_skipped(skipped: list[dict]) -> None:
    if skipped:
        print("\nNot timed:")
        for s in skipped:
            print(f"  {s['impl']} at {s['op']} {s['shape']} {s['dtype']}: {s['kind']}: {s['reason']}")


def plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["impl"] != "unfold" and not r.get("invalid")]
    labels = [f"{r['op']} {r['shape']} {r['dtype']} {r['mode']}\n{r['impl']}" for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(14, max(4.0, 0.32 * len(rows) + 1.5)), sharey=True)
    ys = range(len(rows))
    axes[0].barh(ys, [r["vs_unfold"] or 0 for r in rows], color="tab:blue")
    axes[0].set_xscale("log")
    axes[0].axvline(1, color="k", lw=0.8)
    axes[0].set_xlabel("speedup vs the unfold formulation (log)")
    axes[1].barh(ys, [100 * r["floor_fraction"] for r in rows], color="tab:green")
    axes[1].set_xlabel("% of the floor (docs/design.md#cost-model-and-floor)")
    axes[0].set_yticks(list(ys), labels, fontsize=6)
    axes[0].invert_yaxis()
    fig.suptitle(machine_line(result["machine"]), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    print(f"plot written to {path}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.carafe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", default="all", help="'all' (every backend usable on the device) or a "
                        f"comma list of {', '.join(BACKENDS)} (default: all)")
    parser.add_argument("--shapes", default="target", help="comma list of presets "
                        f"({', '.join(PRESETS)}) and/or ids like N2-C256-H44-W44-k5-g1-s2 (default: target)")
    parser.add_argument("--ops", default="fused", help="comma list of fused, plain (default: fused)")
    parser.add_argument("--modes", default="fwd,bwd,fwdbwd", help="comma list of fwd, bwd, fwdbwd, bwd_features, "
                        "bwd_masks (default: fwd,bwd,fwdbwd)")
    parser.add_argument("--dtypes", default="fp32", help="comma list of fp32, bf16, fp16, fp64 (default: fp32)")
    parser.add_argument("--layouts", default="contiguous", help="comma list of contiguous, channels_last: the "
                        "memory format of the inputs and grad_output (default: contiguous)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        choices=["cpu", "cuda"], help="default: cuda when available")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("CARAFE_BENCH_THREADS", 2)),
                        help="CPU threads (torch.set_num_threads and the timer; default 2)")
    parser.add_argument("--min-run-time", type=float, help="seconds of timing per row (default: 1 on CPU, "
                        "0.25 on a GPU, where do_bench's samples are many and short)")
    parser.add_argument("--peak-gbps", type=float, help="memory bandwidth ceiling, GB/s (default: measured)")
    parser.add_argument("--peak-gflops", type=float, help="fp32 FMA-rate ceiling, GFLOP/s (default: measured)")
    parser.add_argument("--max-baseline-gb", type=float,
                        help="skip the unfold baseline where its intermediate exceeds this (default: 40%% of "
                             "the available memory)")
    parser.add_argument("--retime", type=int, default=2,
                        help="re-time an inconsistent implementation (a part slower than fwdbwd, or a p20-p80 "
                             "spread above --spread-limit) in a fresh process up to this many times before "
                             "marking it INVALID (default 2; 0: mark at once)")
    parser.add_argument("--spread-limit", type=float, default=SPREAD_LIMIT,
                        help=f"largest p80/p20 ratio of a valid row (default {SPREAD_LIMIT})")
    parser.add_argument("--impls", help=argparse.SUPPRESS)  # re-timing runs: time only these rows
    parser.add_argument("--json", help="write machine, versions, git sha, ceilings and every row here")
    parser.add_argument("--jsonl", help="append every row to this JSON-lines file as soon as it is measured "
                        "(kept if the run is killed)")
    parser.add_argument("--plot", help="draw speedups and fractions of the floor to this image (matplotlib)")
    parser.add_argument("--from-json", nargs="+", metavar="JSON",
                        help="re-print (and --plot) a previous run instead of running; several runs of the "
                        "same rows: each row's median over them (median_over_runs)")
    args = parser.parse_args(argv)

    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error("--plot needs matplotlib, which is not installed "
                         "(pip install matplotlib, or the project's [plot] extra)")
    if args.from_json:
        results = [json.loads(Path(path).read_text()) for path in args.from_json]
        for result in results:
            regate(result["rows"], args.spread_limit)
            print(machine_line(result["machine"]))
        result = results[0]
        if len(results) > 1:
            merged = median_over_runs([r["rows"] for r in results])
            result = dict(result, rows=merged, targets=evaluate_targets(merged),
                          skipped=[s for r in results for s in r.get("skipped", [])])
            print(f"Each row: the median of {len(results)} runs")
        print_table(result["rows"])
        if len(results) > 1:
            print_ranges(result["rows"])
    else:
        if args.device == "cuda" and not torch.cuda.is_available():
            parser.error("--device cuda: torch.cuda.is_available() is False")
        if args.min_run_time is None:
            args.min_run_time = 0.25 if args.device == "cuda" else 1.0
        if args.jsonl:
            Path(args.jsonl).parent.mkdir(parents=True, exist_ok=True)
        with torch_threads(args.threads):
            result = run(args)
    print_targets(result.get("targets", []))
    print_invalid(result.get("rows", []))
    print_skipped(result.get("skipped", []))
    if args.json and not args.from_json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1, default=str) + "\n")
        print(f"results written to {args.json}")
    if args.plot:
        plot(result, args.plot)
    return 1 if any(s["kind"] == "failed check" for s in result.get("skipped", [])) else 0


if __name__ == "__main__":
    sys.exit(main())
