"""Loads the compiled library (carafe_kernels._C), which registers the C++ ops with the dispatcher.

``import carafe_kernels`` must work where the extension was not built: then HAS_NATIVE is False and
NATIVE_ERROR says why, and the registry reports it through ``backend_status()``.
"""
from __future__ import annotations

import os

import torch

HAS_NATIVE = False
NATIVE_ERROR: str | None = None

if os.environ.get("CARAFE_NO_NATIVE", "0").lower() in ("1", "true", "yes", "on"):
    NATIVE_ERROR = "CARAFE_NO_NATIVE is set"
else:
    import importlib.util

    if importlib.util.find_spec("carafe_kernels._C") is None:
        NATIVE_ERROR = ("the compiled extension carafe_kernels._C is not built; install with "
                        "`pip install --no-build-isolation .` (or -e) to build it")
    else:
        try:
            from . import _C  # noqa: F401  (importing runs the TORCH_LIBRARY registrations)
        except ImportError as exc:
            NATIVE_ERROR = (f"the compiled extension carafe_kernels._C could not be loaded ({exc}); "
                            "rebuild it against the installed torch with `pip install --no-build-isolation .`")
        else:
            HAS_NATIVE = True


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
        return ("the extension was built without CUDA kernels (needs a CUDA build of torch and nvcc at "
                "install time, or CARAFE_FORCE_CUDA=1)")
    if not torch.cuda.is_available():
        return "torch.cuda.is_available() is False"
    return None
