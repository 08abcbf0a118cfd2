"""The one list of CARAFE backends: what each runs on, why it may be unavailable, and its limits.

``select_backend`` turns a requested name (argument or the CARAFE_BACKEND environment variable) into a
backend that can run the call, or raises an error that says why. ``"auto"`` tries, per device type, the
order in AUTO_ORDER (fastest first, as measured in benchmarks/results/) and logs each skip reason once.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable

import torch

from . import _native
from . import ops as _ops
from .contract import MAX_KERNEL_SIZE, MAX_SCALE_FACTOR, NATIVE_DTYPES, TRITON_DTYPES
from .reference import carafe_down_fused_reference, carafe_down_reference, carafe_fused_reference, carafe_reference

__all__ = ["Backend", "BackendUnavailableError", "BACKENDS", "AUTO_ORDER", "backend_status", "select_backend"]

log = logging.getLogger("carafe_kernels")

# Fastest first, per device type. CPU: the C++ kernels beat the reference by >10x at every benchmarked
# shape (benchmarks/results/cpu.json). CUDA: the CUDA C++ kernels first, then Triton (kernels written to
# the same design; swap when the H200 results say otherwise). Triton on CPU runs only in its interpreter,
# which is for testing, so "auto" never picks it there.
AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "cpu": ("cpu", "reference"),
    "cuda": ("cuda", "triton", "reference"),
}


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run this call; the message says why."""


# eq=False: a Backend is hashed by identity (the availability cache's key; hashing its fields would
# cost a microsecond per call).
@dataclass(frozen=True, eq=False)
class Backend:
    name: str
    # Device types it runs on; a function of the environment for Triton (its interpreter runs on CPU).
    device_types: Callable[[], tuple[str, ...]]
    # None when usable on this machine, otherwise the reason. Asked once per process (per value of
    # TRITON_INTERPRET): see reason().
    unavailable_reason: Callable[[], str | None]
    # The implementations: (features, masks_or_logits, kernel_size, group_size, scale_factor) -> out.
    carafe: Callable[..., torch.Tensor]
    carafe_fused: Callable[..., torch.Tensor]
    max_kernel_size: int | None = None
    max_scale_factor: int | None = None
    dtypes: tuple[torch.dtype, ...] = NATIVE_DTYPES
    # True when its ops have their own autocast kernels (carafe_kernels/ops.py), so the caller need not
    # cast under torch.autocast; the reference has none and is given cast inputs.
    own_autocast: bool = False
    # Content-aware downsampling (CARAFE++), same signature; None where the backend has no kernel for it.
    carafe_down: Callable[..., torch.Tensor] | None = None
    carafe_down_fused: Callable[..., torch.Tensor] | None = None

    def reason(self) -> str | None:
        """unavailable_reason(), cached: it imports modules and probes devices, which a call should not
        repeat. The Triton answer depends on TRITON_INTERPRET, so that is part of the key."""
        key = (self, os.environ.get("TRITON_INTERPRET"))
        try:
            return _REASONS[key]
        except KeyError:
            reason = _REASONS[key] = self.unavailable_reason()
            return reason

    def call_unsupported_reason(self, features: torch.Tensor, kernel_size: int, scale_factor: int,
                                dtype: torch.dtype | None = None, op: str = "carafe") -> str | None:
        """Why this backend cannot run this particular call, or None. dtype: the dtype the call will run
        in, when not features.dtype (the autocast dtype). op: the Backend field naming the operation
        ("carafe", "carafe_fused", "carafe_down", "carafe_down_fused")."""
        if getattr(self, op) is None:
            # Said first: building or installing the backend would not help.
            having = [name for name, backend in BACKENDS.items() if getattr(backend, op) is not None]
            return f"has no {op} kernel yet (the backends that have one: {', '.join(repr(n) for n in having)})"
        reason = self.reason()
        if reason is not None:
            return reason
        device_types = self.device_types()
        if features.device.type not in device_types:
            return f"runs on {'/'.join(device_types)} tensors, got a {features.device.type} tensor"
        dtype = features.dtype if dtype is None else dtype
        if dtype not in self.dtypes:
            return f"does not support dtype {dtype}"
        if self.max_kernel_size is not None and kernel_size > self.max_kernel_size:
            return f"supports kernel_size <= {self.max_kernel_size}, got {kernel_size}"
        if self.max_scale_factor is not None and scale_factor > self.max_scale_factor:
            return f"supports scale_factor <= {self.max_scale_factor}, got {scale_factor}"
        return None


_REASONS: dict[tuple[Backend, str | None], str | None] = {}


def clear_cache() -> None:
    """Forget the cached availability answers (for tests that change the environment)."""
    _REASONS.clear()


def _native_op(name: str) -> Callable[..., torch.Tensor]:
    """Calls torch.ops.carafe_kernels.<name>.default, looked up on the first call (the ops exist only
    when the extension is loaded) and kept. Under a torch.func transform it applies the op's
    autograd.Function instead, which the transforms need to meet in Python (carafe_kernels/ops.py)."""
    op = apply = None
    transforms_active = torch._C._are_functorch_transforms_active

    def call(*args):
        nonlocal op, apply
        if op is None:
            op = getattr(torch.ops.carafe_kernels, name).default
            apply = _ops.rule(op).apply
        if transforms_active():
            return apply(*args)
        return op(*args)
    call.__name__ = f"carafe_kernels_{name}"
    return call


def _triton_module():
    from . import triton as triton_backend  # imported lazily: Triton is optional and slow to import
    return triton_backend


def _triton_reason() -> str | None:
    try:
        return _triton_module().unavailable_reason()
    except ImportError as exc:
        return f"carafe_kernels.triton could not be imported ({exc})"


def _triton_device_types() -> tuple[str, ...]:
    return ("cpu",) if os.environ.get("TRITON_INTERPRET") == "1" else ("cuda",)


def _triton_call(name: str) -> Callable[..., torch.Tensor]:
    """Calls the Triton op directly: the registry has already checked availability (which loads the
    ops), so carafe_kernels.triton.<name>'s own check would be the second one."""
    return _native_op(f"triton_{name}")


def _always_available() -> str | None:
    return None


BACKENDS: dict[str, Backend] = {
    b.name: b for b in (
        Backend("reference", lambda: ("cpu", "cuda", "mps", "xpu", "meta"), _always_available,
                carafe_reference, carafe_fused_reference, carafe_down=carafe_down_reference,
                carafe_down_fused=carafe_down_fused_reference),
        Backend("cpu", lambda: ("cpu",), _native.cpu_unavailable_reason, _native_op("carafe"),
                _native_op("carafe_fused"), max_kernel_size=MAX_KERNEL_SIZE, max_scale_factor=MAX_SCALE_FACTOR,
                own_autocast=True, carafe_down=_native_op("carafe_down"),
                carafe_down_fused=_native_op("carafe_down_fused")),
        Backend("cuda", lambda: ("cuda",), _native.cuda_unavailable_reason, _native_op("carafe"),
                _native_op("carafe_fused"), max_kernel_size=MAX_KERNEL_SIZE, max_scale_factor=MAX_SCALE_FACTOR,
                own_autocast=True, carafe_down=_native_op("carafe_down"),
                carafe_down_fused=_native_op("carafe_down_fused")),
        Backend("triton", _triton_device_types, _triton_reason, _triton_call("carafe"),
                _triton_call("carafe_fused"), max_kernel_size=MAX_KERNEL_SIZE, max_scale_factor=MAX_SCALE_FACTOR,
                dtypes=TRITON_DTYPES, own_autocast=True, carafe_down=_triton_call("carafe_down"),
                carafe_down_fused=_triton_call("carafe_down_fused")),
    )
}


def backend_status() -> dict[str, str | None]:
    """Every backend name mapped to None when it is usable on this machine, or the reason it is not."""
    return {name: backend.reason() for name, backend in BACKENDS.items()}


_logged: set[str] = set()


def _log_once(message: str) -> None:
    if message not in _logged and not torch.compiler.is_compiling():
        _logged.add(message)
        log.info(message)


def requested_backend(backend: str) -> str:
    """The effective request: an explicit argument wins, then CARAFE_BACKEND, then "auto"."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    source = ""
    if backend == "auto":
        backend = os.environ.get("CARAFE_BACKEND", "auto") or "auto"
        source = " from the environment variable CARAFE_BACKEND"  # say where it came from: no argument named it
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}{source}; choose one of {['auto', *BACKENDS]}")
    return backend


def select_backend(backend: str, features: torch.Tensor, kernel_size: int, scale_factor: int,
                   dtype: torch.dtype | None = None, op: str = "carafe") -> Backend:
    """The backend that will run this call of op (a Backend implementation field: "carafe",
    "carafe_fused", "carafe_down", "carafe_down_fused") in dtype (default features.dtype). An explicit
    name runs or raises BackendUnavailableError."""
    name = requested_backend(backend)
    if name != "auto":
        chosen = BACKENDS[name]
        reason = chosen.call_unsupported_reason(features, kernel_size, scale_factor, dtype, op)
        if reason is not None:
            raise BackendUnavailableError(f"CARAFE backend {name!r} cannot run this call: {reason}")
        return chosen
    for candidate in AUTO_ORDER.get(features.device.type, ("reference",)):
        chosen = BACKENDS[candidate]
        reason = chosen.call_unsupported_reason(features, kernel_size, scale_factor, dtype, op)
        if reason is None:
            return chosen
        _log_once(f"carafe_kernels: backend {candidate!r} skipped: {reason}")
    return BACKENDS["reference"]
