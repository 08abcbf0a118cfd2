"""carafe() and carafe_fused(): validate the arguments, pick a backend from the registry, call it."""
from __future__ import annotations

import numbers

import torch

from .registry import select_backend

__all__ = ["carafe", "carafe_fused", "carafe_naive"]


def _check_int(name: str, value, *, odd: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, float)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"{name} must be an integer, got {value}")
        value = int(value)
    value = int(value)
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    if odd and value % 2 == 0:
        raise ValueError(f"{name} must be odd, got {value}")
    return value


def _check_tensor(name: str, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dim() != 4:
        raise ValueError(f"{name} must be 4-D (N, C, H, W), got shape {tuple(value.shape)}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    return value


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype when torch.autocast is enabled for this device type, else None. Device types
    without autocast (meta, ...) give None: ``torch.is_autocast_enabled`` raises for them."""
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _autocast_inputs(features: torch.Tensor, masks: torch.Tensor):
    """Under torch.autocast, both inputs in the autocast dtype (like a convolution), whatever the
    backend: the C++/Triton ops also do this in their Autocast kernels (ops.py), the pure-PyTorch
    reference would otherwise promote mixed inputs to float32."""
    dtype = _autocast_dtype(features.device.type)
    if dtype is None:
        return features, masks
    return features.to(dtype), masks.to(dtype)


def _validate(features, masks, kernel_size, group_size, scale_factor, *, fused: bool):
    """Checks every argument; returns (kernel_size, group_size, scale_factor) as ints."""
    masks_name = "mask_logits" if fused else "masks"
    features = _check_tensor("features", features)
    masks = _check_tensor(masks_name, masks)
    k = _check_int("kernel_size", kernel_size, odd=True)
    G = _check_int("group_size", group_size)
    s = _check_int("scale_factor", scale_factor)
    N, C, H, W = features.shape
    if C % G != 0:
        raise ValueError(f"group_size={G} must divide the channels of features {tuple(features.shape)}")
    if fused:
        expected = (N, G * k * k * s * s, H, W)
        what = f"G*k*k*s*s = {G}*{k}*{k}*{s}*{s}"
    else:
        expected = (N, G * k * k, H * s, W * s)
        what = f"G*k*k = {G}*{k}*{k}"
    if masks.shape[0] != N:
        raise ValueError(f"{masks_name} batch {masks.shape[0]} != features batch {N} "
                         f"(features {tuple(features.shape)}, {masks_name} {tuple(masks.shape)})")
    if masks.shape[1] != expected[1]:
        raise ValueError(f"{masks_name} must have {what} = {expected[1]} channels, got shape "
                         f"{tuple(masks.shape)} (features {tuple(features.shape)})")
    if tuple(masks.shape[2:]) != expected[2:]:
        raise ValueError(f"{masks_name} must be {expected[2]}x{expected[3]} spatially for features "
                         f"{tuple(features.shape)} and scale_factor={s}, got shape {tuple(masks.shape)}")
    if features.device != masks.device:
        raise ValueError(f"features and {masks_name} must be on the same device, got {features.device} "
                         f"and {masks.device}")
    if features.dtype != masks.dtype and _autocast_dtype(features.device.type) is None:
        raise TypeError(f"features and {masks_name} must have the same dtype (outside torch.autocast), "
                        f"got {features.dtype} and {masks.dtype}")
    return k, G, s


def carafe(features: torch.Tensor, masks: torch.Tensor, kernel_size: int, group_size: int,
           scale_factor: int, *, backend: str = "auto") -> torch.Tensor:
    """Content-aware reassembly of features (CARAFE), mmcv's ``carafe`` semantics.

    ``out[n, c, y, x] = sum_{ky, kx} features[n, c, y//s + ky - r, x//s + kx - r] * masks[n, g*k*k + ky*k + kx, y, x]``
    with ``g = c // (C // G)``, ``r = (k - 1) // 2`` and zero padding. The masks are used as given (the
    caller normalises them; see :func:`carafe_fused` for the op that does).

    Args:
        features: (N, C, H, W) float tensor (fp16, bf16, fp32 or fp64).
        masks: (N, G*k*k, H*s, W*s) reassembly kernels, same dtype and device.
        kernel_size: k, odd, >= 1.
        group_size: G, divides C.
        scale_factor: s, integer >= 1.
        backend: "auto", "reference", "cpu", "cuda" or "triton"; "auto" also reads CARAFE_BACKEND.

    Returns:
        (N, C, H*s, W*s) tensor of the input dtype.

    Raises:
        TypeError / ValueError naming the bad argument; BackendUnavailableError when an explicitly
        requested backend cannot run the call.

    Example:
        >>> f = torch.randn(2, 64, 8, 8); m = torch.rand(2, 25, 16, 16)
        >>> carafe(f, m, kernel_size=5, group_size=1, scale_factor=2).shape
        torch.Size([2, 64, 16, 16])
    """
    k, G, s = _validate(features, masks, kernel_size, group_size, scale_factor, fused=False)
    features, masks = _autocast_inputs(features, masks)
    if torch.onnx.is_in_onnx_export():  # the exported graph is the same for every backend
        from .onnx import export_call
        return export_call(False, features, masks, k, G, s)
    return select_backend(backend, features, k, s).carafe(features, masks, k, G, s)


def carafe_fused(features: torch.Tensor, mask_logits: torch.Tensor, kernel_size: int, group_size: int,
                 scale_factor: int, *, backend: str = "auto") -> torch.Tensor:
    """Pixel shuffle + per-group softmax over the k*k taps + CARAFE reassembly, in one op.

    Equals ``carafe(features, softmax_per_group(pixel_shuffle(mask_logits, s)), k, G, s)``; the
    normalised masks are never written to memory by the native kernels. Encoder channel
    ``(g*k*k + t)*s*s + i*s + j`` holds tap t of group g for sub-pixel (i, j), the order pixel_shuffle implies.

    Args:
        features: (N, C, H, W) float tensor.
        mask_logits: (N, G*k*k*s*s, H, W) content-encoder output (unnormalised), same dtype and device.
        kernel_size, group_size, scale_factor, backend: as in :func:`carafe`.

    Returns:
        (N, C, H*s, W*s) tensor of the input dtype.

    Example:
        >>> f = torch.randn(2, 64, 8, 8); logits = torch.randn(2, 25 * 4, 8, 8)
        >>> carafe_fused(f, logits, 5, 1, 2).shape
        torch.Size([2, 64, 16, 16])
    """
    k, G, s = _validate(features, mask_logits, kernel_size, group_size, scale_factor, fused=True)
    features, mask_logits = _autocast_inputs(features, mask_logits)
    if torch.onnx.is_in_onnx_export():  # the exported graph is the same for every backend
        from .onnx import export_call
        return export_call(True, features, mask_logits, k, G, s)
    return select_backend(backend, features, k, s).carafe_fused(features, mask_logits, k, G, s)


def carafe_naive(features: torch.Tensor, masks: torch.Tensor, kernel_size: int, group_size: int,
                 scale_factor: int) -> torch.Tensor:
    """mmcv's ``carafe_naive``: the same function as :func:`carafe` (mmcv keeps it as the simple
    reference kernel beside the optimised one); here it runs the pure-PyTorch reference backend, on any
    device, with autograd by PyTorch."""
    return carafe(features, masks, kernel_size, group_size, scale_factor, backend="reference")
