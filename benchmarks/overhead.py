"""What the public API adds to a direct op call, at a tiny shape where the kernel costs little.

    python -m benchmarks.overhead [--threads 1] [--min-run-time 1]

Times ``carafe_fused(features, logits, k, G, s, backend=...)`` with backend "cpu" and with the default
"auto" (validation, backend selection, the op) against
``torch.ops.carafe_kernels.carafe_fused(features, logits, k, G, s)`` (the dispatcher and the kernel),
both with torch.utils.benchmark, interleaved in rounds so that a change in machine load hits both,
and prints the ratio of the medians. The goal (docs/design.md#the-call-path) is at most 1.2x.
"""
from __future__ import annotations

import argparse
import statistics
import sys

import torch
import torch.utils.benchmark as torch_benchmark

from carafe_kernels import backend_status, carafe_fused
from carafe_kernels.provenance import machine_info, machine_line

SHAPE = (1, 4, 4, 4, 3, 1, 2)  # N, C, H, W, k, G, s: a few microseconds of kernel work


def measure(threads: int = 1, min_run_time: float = 1.0, rounds: int = 5, backend: str = "cpu") -> dict:
    """{"public_us", "direct_us", "ratio", ...}: medians over `rounds` interleaved rounds."""
    N, C, H, W, k, G, s = SHAPE
    features = torch.randn(N, C, H, W)
    logits = torch.randn(N, G * k * k * s * s, H, W)
    op = torch.ops.carafe_kernels.carafe_fused
    stmts = {
        "public": lambda: carafe_fused(features, logits, k, G, s, backend=backend),
        "direct": lambda: op(features, logits, k, G, s),
    }
    times: dict[str, list[float]] = {name: [] for name in stmts}
    for _ in range(rounds):
        for name, fn in stmts.items():
            timer = torch_benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads)
            times[name].append(timer.blocked_autorange(min_run_time=min_run_time / rounds).median * 1e6)
    public, direct = statistics.median(times["public"]), statistics.median(times["direct"])
    return {"shape": SHAPE, "backend": backend, "threads": threads, "public_us": public, "direct_us": direct,
            "ratio": public / direct, "rounds": times}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.overhead", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--min-run-time", type=float, default=2.0, help="seconds of timing in all (default 2)")
    args = parser.parse_args(argv)
    reason = backend_status()["cpu"]
    if reason is not None:
        print(f"the cpu backend is unavailable ({reason}); nothing to compare")
        return 1
    print(machine_line(machine_info(threads=args.threads)))
    for backend in ("cpu", "auto"):  # named, and the default (which also reads CARAFE_BACKEND)
        r = measure(args.threads, args.min_run_time, backend=backend)
        print(f"carafe_fused at N{SHAPE[0]}-C{SHAPE[1]}-H{SHAPE[2]}-W{SHAPE[3]}-k{SHAPE[4]}-g{SHAPE[5]}-s{SHAPE[6]}, "
              f"backend={backend!r}, {args.threads} thread(s): public {r['public_us']:.1f} us, "
              f"torch.ops {r['direct_us']:.1f} us, ratio {r['ratio']:.2f}x (goal <= 1.2x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
