"""Loads the compiled libraries, which register the C++ ops with the dispatcher: carafe_kernels._C
(schemas, CPU kernels) on every torch at or above the stable-ABI target (carafe_kernels/_abi.py), and
carafe_kernels._C_cuda (CUDA kernels) where that torch has CUDA.

``import carafe_kernels`` must work where the extension was not built: then HAS_NATIVE is False and
NATIVE_ERROR says why, and the registry reports it through ``backend_status()``.
"""
from __future__ import annotations

import os
import re
import warnings

import torch

from ._abi import STABLE_ABI_TARGET

HAS_NATIVE = False
NATIVE_ERROR: str | None = None
# Why the CUDA library (carafe_kernels._C_cuda) is not loaded, when the CPU one is.
CUDA_LIBRARY_ERROR: str | None = None
REINSTALL = "reinstall with `pip install .` (or `pip install --no-build-isolation .`, -e for a checkout)"


def _release(version: str) -> tuple[int, ...] | None:
    """(major, minor, patch) of a torch version string ("2.14.1+cu130" -> (2, 14, 1))."""
    m = re.match(r"(\d+)\.(\d+)\.(\d+)", version)
    return tuple(int(g) for g in m.groups()) if m else None


def below_abi_target(running: str, target: tuple[int, int] = STABLE_ABI_TARGET) -> str | None:
    """Why the compiled extension cannot run on torch ``running``, or None. It is built on PyTorch's
    stable ABI for ``target`` (carafe_kernels/_abi.py), so it runs on that release and every later one,
    whatever torch compiled it; an older torch lacks stable-shim functions it calls."""
    release = _release(running)
    if release is None or release[:2] >= target:
        return None
    return (f"torch {running} is older than {target[0]}.{target[1]}, the oldest release whose stable ABI the "
            f"compiled extension carafe_kernels._C needs; upgrade torch to >= {target[0]}.{target[1]} for the "
            "native kernels (the reference and Triton backends work on this torch)")


def _load() -> tuple[str | None, bool]:
    """Imports the extension (running its op registrations). Returns why it cannot be used (None if it
    can) and whether that deserves a warning: an extension that was never built is a supported
    pure-Python install, and so is a torch below the stable-ABI target (the dependency allows it: the
    other backends run there); a built one that cannot be used is a broken install the user should hear
    about."""
    import importlib.util

    if importlib.util.find_spec("carafe_kernels._C") is None:
        return ("the compiled extension carafe_kernels._C is not built; install with `pip install .` to "
                "build it"), False
    too_old = below_abi_target(torch.__version__)
    if too_old is not None:
        return too_old, False
    return _check_built_extension(), True


def _check_built_extension() -> str | None:
    try:
        from . import _C  # noqa: F401  (importing runs the STABLE_TORCH_LIBRARY registrations)
    except (ImportError, OSError) as exc:
        return f"the compiled extension carafe_kernels._C could not be loaded ({exc}); {REINSTALL}"
    try:
        target = torch.ops.carafe_kernels._stable_abi_target()
    except (AttributeError, RuntimeError):
        # In a checkout built in place, a pre-port build (_C.cpython-3XX-*.so) is found before the new
        # _C.abi3.so, whose suffix Python tries later, so reinstalling alone does not replace it: name it.
        return (f"the compiled extension {_C.__file__} predates the stable-ABI build (it has no "
                f"_stable_abi_target op); delete that file if it is an old build beside a newer one, or "
                f"{REINSTALL}")
    try:
        has_down = torch._C._dispatch_has_kernel_for_dispatch_key("carafe_kernels::carafe_down", "CPU")
    except RuntimeError:            # "operator carafe_kernels::carafe_down does not exist"
        has_down = False
    if not has_down:
        # A build from before the content-aware downsampling kernels: ops.py registers their autograd and
        # fake kernels, and the registry routes carafe_down to them, so it would fail at the first call.
        return (f"the compiled extension {_C.__file__} predates the carafe_down kernels (a stale build); "
                f"{REINSTALL}")
    # The number the library was compiled with must be the one this package checks against.
    built_for = (target >> 56 & 0xFF, target >> 48 & 0xFF)
    if built_for != STABLE_ABI_TARGET:
        return (f"the compiled extension carafe_kernels._C targets torch {built_for[0]}.{built_for[1]}, but this "
                f"package expects {STABLE_ABI_TARGET[0]}.{STABLE_ABI_TARGET[1]} (a stale build); {REINSTALL}")
    return None


def _load_cuda_library() -> str | None:
    """Loads carafe_kernels._C_cuda (the CUDA kernels' registrations) where torch has CUDA. It links
    torch's CUDA libraries and the CUDA runtime, which a CPU-only torch does not have: that is why it is
    a library of its own, and why it is not even tried there."""
    import importlib.util

    if torch.version.cuda is None:
        return "torch is a CPU-only build"
    if importlib.util.find_spec("carafe_kernels._C_cuda") is None:
        return ("the extension was built without CUDA kernels (they need a CUDA build of torch and a CUDA "
                "toolkit at build time; setup.py prints why it skipped them)")
    try:
        from . import _C_cuda
    except (ImportError, OSError) as exc:
        return f"the CUDA library carafe_kernels._C_cuda could not be loaded ({exc}); {REINSTALL}"
    if not torch._C._dispatch_has_kernel_for_dispatch_key("carafe_kernels::carafe_down", "CUDA"):
        # A CUDA library from before the down CUDA kernels beside a current _C (which declares the op):
        # the registry routes carafe_down on CUDA tensors to the cuda backend, so it would fail at the
        # first call.
        return f"the CUDA library {_C_cuda.__file__} predates the carafe_down kernels (a stale build); {REINSTALL}"
    return None


if os.environ.get("CARAFE_NO_NATIVE", "0").lower() in ("1", "true", "yes", "on"):
    NATIVE_ERROR = "CARAFE_NO_NATIVE is set"
else:
    NATIVE_ERROR, _warn = _load()
    HAS_NATIVE = NATIVE_ERROR is None
    if NATIVE_ERROR is not None and _warn:
        warnings.warn(f"carafe_kernels: native backends unavailable: {NATIVE_ERROR}", RuntimeWarning,
                      stacklevel=2)
    if HAS_NATIVE:
        CUDA_LIBRARY_ERROR = _load_cuda_library()
        # A CUDA torch with a CUDA library that does not load is a broken install (a CUDA major version
        # that differs from torch's, typically): say so once, as for _C.
        if CUDA_LIBRARY_ERROR is not None and "could not be loaded" in CUDA_LIBRARY_ERROR:
            warnings.warn(f"carafe_kernels: native CUDA backend unavailable: {CUDA_LIBRARY_ERROR}",
                          RuntimeWarning, stacklevel=2)


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
        return CUDA_LIBRARY_ERROR or "the CUDA library registered no CUDA kernels"
    if not torch.cuda.is_available():
        return "torch.cuda.is_available() is False"
    return None
