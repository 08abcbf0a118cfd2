"""The machine a benchmark ran on, its two ceilings (memory bandwidth, FMA rate), and how we time and
measure memory.

Timing
  CPU: torch.utils.benchmark.Timer.blocked_autorange (the given thread count), topped up with single
       runs until there are at least `min_samples` samples; median, p20 and p80 of the per-run times.
  GPU: triton.testing.do_bench(quantiles=[0.5, 0.2, 0.8]) when Triton imports, else CUDA events
       around each of ~100 runs after a warm-up.

Peak memory (bytes allocated by one call above what was allocated before it; includes its outputs)
  CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats.
  CPU:  the profiler's allocation events (torch.profiler with profile_memory=True): a running sum of
       every CPU allocation and free in time order, whose maximum is the peak. It sees every allocation
       made through c10's CPU allocator (all tensors), on every thread; not memory malloc'ed privately
       by a library (oneDNN scratch, OpenMP stacks). tracemalloc would see neither.

Ceilings (for the floor of docs/design.md#cost-model-and-floor: max(FLOPs / FMA rate, bytes / bandwidth))
  bandwidth: a large fp32 copy (dst.copy_(src), 256 MiB each on CPU, 1 GiB on GPU): bytes read +
             written per second;
  FMA rate:  a large fp32 matmul (TF32 off on GPU): 2*M*N*K / time.
  Measured once per run, or given with --peak-gbps / --peak-gflops.
"""
from __future__ import annotations

import contextlib
import os
import statistics

import torch
import torch.utils.benchmark as torch_benchmark

from carafe_kernels.provenance import machine_info, machine_line

__all__ = ["machine_info", "machine_line", "load_warning", "measure_peaks", "time_fn", "peak_memory_bytes",
           "torch_threads"]


@contextlib.contextmanager
def torch_threads(threads: int):
    """torch's intra-op thread count set to `threads` inside, and the previous count restored after, so
    a benchmark does not leave its setting to whatever runs next in the process (the tests)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)

def load_warning(info: dict) -> str | None:
    """A warning when the machine was busy (1-minute load above the usable CPUs) as the run started."""
    load, cpus = info.get("loadavg_1min"), info.get("usable_cpus")
    if load is not None and cpus and load > cpus:
        return (f"!! the 1-minute load average ({load:.1f}) exceeds the {cpus} usable CPUs: other processes "
                "compete for the cores, so CPU timings (multi-threaded ones most) are unreliable")
    return None


# --- timing --------------------------------------------------------------------------------------------

def _quantiles(times_s: list[float]) -> tuple[float, float, float]:
    """(median, p20, p80) in ms."""
    ms = sorted(t * 1e3 for t in times_s)
    if len(ms) == 1:
        return ms[0], ms[0], ms[0]
    deciles = statistics.quantiles(ms, n=10, method="inclusive")
    return statistics.median(ms), deciles[1], deciles[7]


def time_fn(fn, device: str, *, threads: int = 2, min_run_time: float = 1.0, min_samples: int = 5) -> dict:
    """{"ms": median, "p20": ..., "p80": ..., "samples": n, "timer": ...} of fn() on device."""
    if device == "cuda":
        return _time_cuda(fn, min_run_time)
    timer = torch_benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads)
    measurement = timer.blocked_autorange(min_run_time=min_run_time)
    times = list(measurement.times)
    while len(times) < min_samples:
        times.extend(timer.timeit(1).times)
    median, p20, p80 = _quantiles(times)
    return {"ms": median, "p20": p20, "p80": p80, "samples": len(times),
            "timer": "torch.utils.benchmark.Timer.blocked_autorange"}


def _time_cuda(fn, min_run_time: float) -> dict:
    try:
        import triton.testing
    except ImportError:
        triton = None
    if triton is not None:
        median, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8], rep=int(min_run_time * 1000))
        return {"ms": median, "p20": p20, "p80": p80, "samples": None, "timer": "triton.testing.do_bench"}
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    times: list[float] = []
    total = 0.0
    while total < min_run_time or len(times) < 10:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        elapsed = start.elapsed_time(end) / 1e3
        times.append(elapsed)
        total += elapsed
    median, p20, p80 = _quantiles(times)
    return {"ms": median, "p20": p20, "p80": p80, "samples": len(times), "timer": "CUDA events"}


# --- memory --------------------------------------------------------------------------------------------

def peak_memory_bytes(fn, device: str) -> int:
    """Peak bytes allocated during one fn() above the allocation level before it (see module doc)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    current = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        current += event.nbytes()
        peak = max(peak, current)
    return peak


# --- ceilings ------------------------------------------------------------------------------------------

def measure_peaks(device: str, *, threads: int = 2, min_run_time: float = 0.5) -> dict:
    """Measured copy bandwidth (GB/s, read + write) and fp32 matmul rate (GFLOP/s) on device."""
    if device == "cuda":
        elements, n = 256 * 2**20, 8192
        previous_tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
    else:
        elements, n = 64 * 2**20, 2048
    try:
        src = torch.randn(elements, device=device)
        dst = torch.empty_like(src)
        copy = time_fn(lambda: dst.copy_(src), device, threads=threads, min_run_time=min_run_time)
        del src, dst
        a = torch.randn(n, n, device=device)
        b = torch.randn(n, n, device=device)
        out = torch.empty(n, n, device=device)
        matmul = time_fn(lambda: torch.mm(a, b, out=out), device, threads=threads, min_run_time=min_run_time)
    finally:
        if device == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = previous_tf32
    return {
        "gbps": 2 * elements * 4 / (copy["ms"] * 1e-3) / 1e9,
        "gflops": 2 * n**3 / (matmul["ms"] * 1e-3) / 1e9,
        "source": "measured",
        "method": f"fp32 copy of {elements * 4 // 2**20} MiB (read+write); fp32 matmul {n}^3",
    }
