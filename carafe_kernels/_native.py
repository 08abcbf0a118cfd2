"""Loads the compiled library (carafe_kernels._C), which registers the C++ ops with the dispatcher.

``import carafe_kernels`` must work where the extension was not built: then HAS_NATIVE is False and
NATIVE_ERROR says why, and the registry reports it through ``backend_status()``.
"""
from __future__ import annotations

import os
import re
import warnings

import torch

HAS_NATIVE = False
NATIVE_ERROR: str | None = None
REBUILD = "rebuild it against the installed torch with `pip install --no-build-isolation .` (or -e)"


def _release(version: str) -> tuple[int, ...] | None:
    """(major, minor, patch) of a torch version string ("2.14.1+cu130" -> (2, 14, 1))."""
    m = re.match(r"(\d+)\.(\d+)\.(\d+)", version)
    return tuple(int(g) for g in m.groups()) if m else None


def version_mismatch(built_with: str, running: str) -> str | None:
    """Why an extension compiled against torch ``built_with`` cannot be used with torch ``running``, or
    None. C++ extensions have no stable ABI across torch releases, so the release must be the same; the
    local tag (+cpu, +cu130) is not compared: the headers do not record it."""
    if _release(built_with) is not None and _release(built_with) == _release(running):
        return None
    return (f"the compiled extension carafe_kernels._C was built against torch {built_with}, but torch "
            f"{running} is running; {REBUILD}")


def _load() -> tuple[str | None, bool]:
    """Imports the extension (running its op registrations). Returns why it cannot be used (None if it
    can) and whether that deserves a warning: an extension that was never built is a supported
    pure-Python install, a built one that cannot be used is a broken install the user should hear about."""
    import importlib.util

    if importlib.util.find_spec("carafe_kernels._C") is None:
        return ("the compiled extension carafe_kernels._C is not built; install with "
                "`pip install --no-build-isolation .` (or -e) to build it"), False
    return _check_built_extension(), True


def _check_built_extension() -> str | None:
    try:
        from . import _C  # noqa: F401  (importing runs the TORCH_LIBRARY registrations)
    except (ImportError, OSError) as exc:
        # An extension built against another torch typically fails here with "undefined symbol".
        return f"the compiled extension carafe_kernels._C could not be loaded ({exc}); {REBUILD}"
    try:
        built_with = torch.ops.carafe_kernels._built_with_torch()
    except (AttributeError, RuntimeError):
        return f"the compiled extension carafe_kernels._C predates its build-version record; {REBUILD}"
    return version_mismatch(built_with, torch.__version__)


if os.environ.get("CARAFE_NO_NATIVE", "0").lower() in ("1", "true", "yes", "on"):
    NATIVE_ERROR = "CARAFE_NO_NATIVE is set"
else:
    NATIVE_ERROR, _warn = _load()
    HAS_NATIVE = NATIVE_ERROR is None
    if NATIVE_ERROR is not None and _warn:
        warnings.warn(f"carafe_kernels: native backends unavailable: {NATIVE_ERROR}", RuntimeWarning,
                      stacklevel=2)


def _has_kernel(device_key: str) -> bool:
    return HAS_NATIVE and torch._C._dispatch_has_kernel_for_dispatch_key("carafe_kernels::carafe", device_key)


HAS_NATIVE_CPU = _has_kernel("CPU")
HAS_NATIVE_CUDA = _has_kernel("CUDA")


def cpu_unavailable_reason() -> str | None:
    """Why the native CPU kernels cannot run here, or None."""
    if not HAS_NATIVE:
        return NATIVE_ERROR
    if not HAS_NATIVE_CPU:
        return "the extension was built without CPU kernels (csrc/cpu/ missing from the build)"
    return None


def cuda_unavailable_reason() -> str | None:
    """Why the native CUDA kernels cannot run here, or None."""
    if not HAS_NATIVE:
        return NATIVE_ERROR
    if not HAS_NATIVE_CUDA:
        return ("the extension was built without CUDA kernels (they need a CUDA build of torch and a CUDA "
                "toolkit at build time; setup.py prints why it skipped them)")
    if not torch.cuda.is_available():
        return "torch.cuda.is_available() is False"
    return None
