"""Where a result came from: the machine, the software versions and the git commit.

Every results file this project writes (benchmark JSONs, `cares reproduce`'s table, the demo's
metrics) records `machine_info()`, so a number can always be traced to the code and hardware that
produced it.
"""
from __future__ import annotations

import datetime
import os
import platform
import subprocess
from pathlib import Path

import torch

__all__ = ["git_info", "machine_info", "machine_line"]

# The checkout this package was imported from (an editable install or a source tree); in a wheel
# install there is no git repository here and the commit is recorded as None.
ROOT = Path(__file__).resolve().parents[1]


def _cpu_model() -> str:
    """The CPU's model name, with its x86 family and model numbers (which name the generation where a
    virtual machine shows only a generic name, e.g. "AMD EPYC (family 25, model 17)": Zen 4)."""
    try:
        fields = {}
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if not key.strip():
                break  # the first processor's block is enough
            fields.setdefault(key.strip(), value.strip())
        if "model name" in fields:
            if "cpu family" in fields and "model" in fields:
                return f"{fields['model name']} (family {fields['cpu family']}, model {fields['model']})"
            return fields["model name"]
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _physical_cores() -> int | None:
    try:
        cores, phys, core = set(), None, None
        for line in Path("/proc/cpuinfo").read_text().splitlines() + [""]:
            if line.startswith("physical id"):
                phys = line.split(":", 1)[1].strip()
            elif line.startswith("core id"):
                core = line.split(":", 1)[1].strip()
            elif not line.strip():
                if core is not None:
                    cores.add((phys, core))
                phys = core = None
        return len(cores) or None
    except OSError:
        return None


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def git_info() -> dict:
    sha = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"sha": sha, "short": sha[:12] if sha else None, "dirty": bool(status) if status is not None else None}


def machine_info(threads: int | None = None) -> dict:
    """Everything that identifies the run: CPU, cores/threads, GPU, versions, git sha."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "physical_cores": _physical_cores(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": affinity,
        "torch_threads": threads if threads is not None else torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "gpu_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": None,
        "git": git_info(),
        # Other processes competing for the cores make CPU timings unreliable: recorded, and warned about.
        "loadavg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    try:
        import triton
        info["triton"] = triton.__version__
    except Exception:  # noqa: BLE001 -- any import failure means "not available"
        pass
    try:
        import carafe_kernels
        info["carafe_kernels"] = carafe_kernels.__version__
        info["backend_status"] = carafe_kernels.backend_status()
        if info["backend_status"].get("cpu") is None:  # the instruction set the CPU kernels run here
            info["cpu_kernels"] = torch.ops.carafe_kernels._cpu_kernel_isa()
    except Exception as exc:  # noqa: BLE001
        info["carafe_kernels"] = f"import failed: {exc}"
    return info


def machine_line(info: dict) -> str:
    git = info["git"]
    sha = (git["short"] or "?") + (" (dirty)" if git.get("dirty") else "")
    cores = f"{info['physical_cores'] or '?'} cores / {info['logical_cpus']} threads"
    if info["usable_cpus"] != info["logical_cpus"]:
        cores += f", {info['usable_cpus']} usable"
    if info.get("cpu_kernels"):
        cores += f"; CPU kernels {info['cpu_kernels']}"
    return (f"Machine: {info['cpu']} ({cores}; torch threads {info['torch_threads']}) | "
            f"GPU: {info['gpu'] or 'none'} | torch {info['torch']}"
            + (f" (CUDA {info['cuda']})" if info["cuda"] else "")
            + f" | triton {info['triton'] or 'n/a'} | git {sha}"
            + (f" | load {info['loadavg_1min']:.1f}" if info.get("loadavg_1min") is not None else ""))
