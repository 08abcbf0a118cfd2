"""Options of the pytest-benchmark suite (benchmarks/test_bench_carafe.py).

    pytest benchmarks/ --benchmark-only                          # the tiny preset, timed
    pytest benchmarks/ --benchmark-disable                       # CI: every case runs once, untimed
    pytest benchmarks/ --benchmark-only --carafe-shapes target,fpn --carafe-dtypes fp32,bf16
Environment equivalents: CARAFE_BENCH_SHAPES, CARAFE_BENCH_DTYPES, CARAFE_BENCH_MODES, CARAFE_BENCH_OPS,
CARAFE_BENCH_BACKENDS, CARAFE_BENCH_THREADS.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

try:
    import carafe_kernels  # noqa: F401
except ModuleNotFoundError:  # a checkout that is not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

OPTIONS = {
    "shapes": ("tiny", "shape presets and/or ids (see benchmarks/shapes.py)"),
    "dtypes": ("fp32", "fp32, bf16, fp16, fp64"),
    "modes": ("fwd,bwd,fwdbwd", "fwd, bwd, fwdbwd"),
    "ops": ("fused,plain", "fused, plain"),
    "backends": ("all", "'all' (every backend usable here) or a comma list"),
    "threads": ("2", "CPU threads"),
}


def _machine_report(threads: int) -> tuple[str, str | None]:
    from benchmarks.machine import load_warning, machine_info, machine_line

    info = machine_info(threads=threads)
    return machine_line(info), load_warning(info)


def pytest_report_header(config):
    """The machine line, and the CLI's warning when the machine is busy (timings then unreliable)."""
    line, warning = _machine_report(int(config.getoption("--carafe-threads")))
    return [line] + ([warning] if warning else [])


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    # Repeated at the end, beside the timing table, where it is read; only when something was timed.
    if config.getoption("benchmark_disable", default=False) or not terminalreporter.stats.get("passed"):
        return
    _, warning = _machine_report(int(config.getoption("--carafe-threads")))
    if warning:
        terminalreporter.write_line(warning, yellow=True, bold=True)


def pytest_benchmark_update_machine_info(config, machine_info):
    """A saved run (--benchmark-save) carries this project's machine record beside pytest-benchmark's own:
    the CPU model, the instruction set the CPU kernels ran, torch, threads and the git sha, so each row
    kept in benchmarks/results/pytest-benchmark says which CPU it belongs to."""
    from benchmarks.machine import machine_info as carafe_machine_info

    machine_info["carafe"] = carafe_machine_info(threads=int(config.getoption("--carafe-threads")))


def pytest_addoption(parser):
    group = parser.getgroup("carafe", "CARAFE benchmark cases")
    for name, (default, help_text) in OPTIONS.items():
        env = f"CARAFE_BENCH_{name.upper()}"
        group.addoption(f"--carafe-{name}", default=os.environ.get(env, default),
                        help=f"{help_text} (default: ${env} or {default!r})")
