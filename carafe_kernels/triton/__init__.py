"""Triton backend for CARAFE: fused Triton kernels for the forward and an atomic-free backward.

Contract with carafe_kernels.registry: ``unavailable_reason() -> str | None``,
``carafe(features, masks, k, G, s)`` and ``carafe_fused(features, mask_logits, k, G, s)``, and the
content-aware downsampling ``carafe_down`` / ``carafe_down_fused`` (same arguments); they call the
dispatcher ops ``torch.ops.carafe_kernels.triton_carafe`` / ``triton_carafe_fused`` /
``triton_carafe_down`` / ``triton_carafe_down_fused`` (see ops.py; defined with
``torch.library.triton_op``, which needs torch >= 2.6), so autograd, torch.compile, fake tensors and
autocast attach to the ops.

Triton is optional: this package imports nothing from it until the ops are first needed, so
``import carafe_kernels`` works without Triton installed. On CPU tensors the kernels run only in
Triton's interpreter, which must be switched on (TRITON_INTERPRET=1) before Triton is imported.
Supported: float16, bfloat16, float32 (fp32 accumulation); odd kernel_size <= 11; scale_factor <= 8
(carafe_kernels.contract holds these limits for every compiled backend).
"""
from __future__ import annotations

import importlib.util
import os

import torch

from ..contract import MAX_KERNEL_SIZE, MAX_SCALE_FACTOR

__all__ = ["unavailable_reason", "carafe", "carafe_fused", "carafe_down", "carafe_down_fused", "MAX_KERNEL_SIZE",
           "MAX_SCALE_FACTOR"]

_MIN_TORCH = (2, 6)

_ops_module = None
_import_error: str | None = None


def _interpret_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def _environment_reason() -> str | None:
    if _torch_version() < _MIN_TORCH:
        return f"needs torch >= {_MIN_TORCH[0]}.{_MIN_TORCH[1]} for torch.library.triton_op, found {torch.__version__}"
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed (pip install triton, or carafe-kernels[triton])"
    if not _interpret_requested() and not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False) and TRITON_INTERPRET=1 is not set"
    return None


def _load_ops() -> str | None:
    """Import (once) the module that defines and registers the Triton ops; the reason it failed, or None."""
    global _ops_module, _import_error
    if _ops_module is None and _import_error is None:
        try:
            from . import ops as ops_module
        except Exception as exc:  # a broken or too old Triton: report it, never break carafe_kernels
            _import_error = f"carafe_kernels.triton.ops could not be imported ({type(exc).__name__}: {exc})"
        else:
            _ops_module = ops_module
    return _import_error


def unavailable_reason() -> str | None:
    """None when the Triton kernels can run here, otherwise why not. Imports Triton (once) when the
    environment allows it, so a broken installation is reported here rather than at the first call."""
    reason = _environment_reason() or _load_ops()
    if reason is not None:
        return reason
    interpret = _interpret_requested()
    if _ops_module._k.INTERPRET != interpret:
        was = "on" if _ops_module._k.INTERPRET else "off"
        return (f"the kernels were built with the Triton interpreter {was}, but TRITON_INTERPRET is now "
                f"{'1' if interpret else 'unset'}; set it before carafe_kernels.triton is first used")
    return None


def _ops():
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"the Triton CARAFE backend is unavailable: {reason}")
    return _ops_module


def carafe(features: torch.Tensor, masks: torch.Tensor, kernel_size: int, group_size: int,
           scale_factor: int) -> torch.Tensor:
    """CARAFE with normalised masks (N, G*k*k, H*s, W*s) on the Triton kernels."""
    _ops()
    return torch.ops.carafe_kernels.triton_carafe(features, masks, kernel_size, group_size, scale_factor)


def carafe_fused(features: torch.Tensor, mask_logits: torch.Tensor, kernel_size: int, group_size: int,
                 scale_factor: int) -> torch.Tensor:
    """Pixel shuffle + per-group softmax + CARAFE from encoder logits (N, G*k*k*s*s, H, W), fused."""
    _ops()
    return torch.ops.carafe_kernels.triton_carafe_fused(features, mask_logits, kernel_size, group_size,
                                                        scale_factor)


def carafe_down(features: torch.Tensor, masks: torch.Tensor, kernel_size: int, group_size: int,
                scale_factor: int) -> torch.Tensor:
    """Content-aware downsampling with normalised masks (N, G*k*k, ceil(H/s), ceil(W/s)) on the Triton kernels."""
    _ops()
    return torch.ops.carafe_kernels.triton_carafe_down(features, masks, kernel_size, group_size, scale_factor)


def carafe_down_fused(features: torch.Tensor, mask_logits: torch.Tensor, kernel_size: int, group_size: int,
                      scale_factor: int) -> torch.Tensor:
    """Per-group softmax of mask_logits (N, G*k*k, ceil(H/s), ceil(W/s)) + content-aware downsampling, fused."""
    _ops()
    return torch.ops.carafe_kernels.triton_carafe_down_fused(features, mask_logits, kernel_size, group_size,
                                                             scale_factor)
