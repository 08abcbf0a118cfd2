"""carafe(), carafe_fused() and the downsampling carafe_down(), carafe_down_fused(): validate once
(carafe_kernels.contract), pick a backend from the registry, call it.

The call path is kept thin: the arguments are checked once here (the C++ ops check again, in C++, for
callers of torch.ops that skip this module), and a repeated call with the same metadata reuses the
outcome (_PLANS); under torch.autocast the inputs are cast once, by the op's own autocast kernel, or
here for the reference backend, which has none; backend availability is asked once per process
(registry.Backend.reason). benchmarks/overhead.py measures what this adds to a direct torch.ops call.
"""
from __future__ import annotations

import os

import torch
from torch.fx.experimental.symbolic_shapes import has_static_value

from . import ops as _ops
from .contract import check_arguments, check_int, output_shape
from .registry import BackendUnavailableError, select_backend

__all__ = ["carafe", "carafe_fused", "carafe_naive", "carafe_down", "carafe_down_fused"]

# The four operations, by the name of their implementation field on registry.Backend. A call's op
# decides its argument checks: whether the second input is logits ("..._fused") and whether it
# downsamples ("carafe_down...").
_FUSED = {"carafe": False, "carafe_fused": True, "carafe_down": False, "carafe_down_fused": True}
_DOWN = {"carafe": False, "carafe_fused": False, "carafe_down": True, "carafe_down_fused": True}


# CARAFE_BACKEND is read on every "auto" call (a change takes effect at the next call), and that read is
# part of the plan's key. os.environ.get encodes the name and decodes the value each time, about 0.8 us of
# a 12 us small call; os.environ's own bytes dict (CPython's os._Environ, kept in step by os.environ's
# setters and putenv) answers the same question without either. Other Pythons use os.environ.get.
if isinstance(getattr(os.environ, "_data", None), dict) and hasattr(os.environ, "encodekey"):
    _BACKEND_VARIABLE = os.environ.encodekey("CARAFE_BACKEND")

    def _backend_variable():
        return os.environ._data.get(_BACKEND_VARIABLE)
else:  # pragma: no cover - not CPython
    def _backend_variable():
        return os.environ.get("CARAFE_BACKEND")


# Whether torch.autocast is on for any device type (private, so looked up with a fallback that is
# always right: "maybe", then the per-device question decides).
_any_autocast_enabled = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype when torch.autocast is enabled for this device type, else None. Device types
    without autocast (meta, ...) give None: ``torch.is_autocast_enabled`` raises for them."""
    if device_type in ("cpu", "cuda") or torch.amp.is_autocast_available(device_type):
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    return None


def _autocast_for(op: str, features, masks, autocast: torch.dtype | None) -> torch.dtype | None:
    """The dtype torch.autocast runs this call in, or None when it does not cast it. PyTorch's autocast
    leaves float64 alone, and so does this: float64 inputs run in float64. One float64 input with a
    lower-precision one would then reach the kernels in two dtypes, so that is refused."""
    if autocast is None or not (isinstance(features, torch.Tensor) and isinstance(masks, torch.Tensor)):
        return autocast  # (a non-tensor is reported by _check_call)
    f64 = features.dtype == torch.float64, masks.dtype == torch.float64
    if f64[0] and f64[1]:
        return None
    if f64[0] or f64[1]:
        m = "mask_logits" if _FUSED[op] else "masks"
        raise TypeError(f"under torch.autocast float64 inputs are not cast (as PyTorch's autocast leaves float64 "
                        f"alone), so features and {m} must both be float64 or neither, got {features.dtype} and "
                        f"{masks.dtype}")
    return autocast


def _plan(op: str, features, masks, kernel_size, group_size, scale_factor, backend: str,
          autocast: torch.dtype | None):
    """Validates one call and picks its backend: (backend, the dtype to cast the inputs to or None, k, G, s).
    The cast is for backends without their own autocast kernels, to _autocast_for(...)."""
    autocast = _autocast_for(op, features, masks, autocast)
    k, G, s = _check_call(op, features, masks, kernel_size, group_size, scale_factor, autocast)
    chosen = select_backend(backend, features, k, s, autocast, op)
    # The reference has no autocast kernel (it would promote mixed inputs to float32): cast for it.
    cast = autocast is not None and not (chosen.own_autocast and _ops.AUTOCAST_ERROR is None)
    return chosen, (autocast if cast else None), k, G, s


def _check_call(op: str, features, masks, kernel_size, group_size, scale_factor,
                autocast: torch.dtype | None) -> tuple[int, int, int]:
    """Validates one call's arguments (the contract, whatever the backend); returns (k, G, s)."""
    fused = _FUSED[op]
    masks_name = "mask_logits" if fused else "masks"
    if not isinstance(features, torch.Tensor):
        raise TypeError(f"features must be a torch.Tensor, got {type(features).__name__}")
    if not isinstance(masks, torch.Tensor):
        raise TypeError(f"{masks_name} must be a torch.Tensor, got {type(masks).__name__}")
    k = check_int("kernel_size", kernel_size, odd=True)
    G = check_int("group_size", group_size)
    s = check_int("scale_factor", scale_factor)
    # Under autocast both inputs run in the autocast dtype (like a convolution), so they may differ.
    check_arguments(features, masks, k, G, s, fused=fused, same_dtype=autocast is None, down=_DOWN[op])
    return k, G, s


# The outcome of _plan depends only on the call's metadata (shapes, dtypes, devices, ints, the backend
# request and the autocast state), never on tensor values, so it is kept per metadata: a repeated call
# (every training step) skips re-validation and re-selection. Bounded; not used while torch.compile
# traces (symbolic shapes). The Triton backend's availability also depends on TRITON_INTERPRET,
# which is stored with it and compared.
_PLANS: dict[tuple, tuple] = {}
_MAX_PLANS = 1024


def _run(op: str, features, masks, kernel_size, group_size, scale_factor, backend) -> torch.Tensor:
    if (type(kernel_size) is int and type(group_size) is int and type(scale_factor) is int and type(backend) is str
            and isinstance(features, torch.Tensor) and isinstance(masks, torch.Tensor)
            and not torch.compiler.is_compiling()):
        # Tensor.device builds a new object per access, and asking the autocast state for one device type
        # costs more than asking whether any is on (the common case: none), so both are asked once.
        device = features.device
        autocast = _autocast_dtype(device.type) if _any_autocast_enabled() else None
        key = (op, features.shape, masks.shape, features.dtype, masks.dtype, device, masks.device,
               kernel_size, group_size, scale_factor, backend,
               _backend_variable() if backend == "auto" else None, autocast)
        plan = _PLANS.get(key)
        if plan is None or (plan[-1] is not None and plan[-1] != os.environ.get("TRITON_INTERPRET")):
            if len(_PLANS) >= _MAX_PLANS:
                _PLANS.clear()
            chosen, cast, k, G, s = _plan(op, features, masks, kernel_size, group_size, scale_factor, backend,
                                          autocast)
            impl = getattr(chosen, op)
            triton_env = os.environ.get("TRITON_INTERPRET") if chosen.name == "triton" else None
            plan = _PLANS[key] = (impl, cast, triton_env)
        impl, cast_to, _ = plan
    elif torch.onnx.is_in_onnx_export():
        # torch.onnx.export(dynamo=True) traces with torch.export, so is_compiling() sent it here: one
        # standard-op graph for every backend, none of which has to run. (Asked only off the fast path:
        # is_in_onnx_export costs about 1 us, more than a tenth of a small call.)
        return _export_call(op, features, masks, kernel_size, group_size, scale_factor)
    else:  # torch.compile tracing, integral floats, numpy ints, or bad arguments (which raise here)
        autocast = _autocast_dtype(features.device.type) if isinstance(features, torch.Tensor) else None
        try:
            chosen, cast_to, kernel_size, group_size, scale_factor = _plan(
                op, features, masks, kernel_size, group_size, scale_factor, backend, autocast)
        except (TypeError, ValueError, BackendUnavailableError) as exc:
            if not torch.compiler.is_compiling():
                raise
            return _raise_when_run(exc, op, features, masks, kernel_size, group_size, scale_factor)
        impl = getattr(chosen, op)
    if cast_to:
        features, masks = features.to(cast_to), masks.to(cast_to)
    return impl(features, masks, kernel_size, group_size, scale_factor)


# torch.compile: an exception raised while Dynamo traces is a graph break, which fullgraph=True turns
# into torch._dynamo.exc.Unsupported ("Observed exception"), not the documented ValueError (torch 2.13:
# Dynamo cannot put a raise into a graph, and torch._check* or a fake kernel's error fail the same
# way). So a bad call found while tracing becomes this op in the graph: it raises the same exception,
# with the same message, when the compiled code runs, as eager would at that call.
_ERRORS = {cls.__name__: cls for cls in (TypeError, ValueError, BackendUnavailableError)}


@torch.library.custom_op("carafe_kernels::invalid_call", mutates_args=())
def _invalid_call(anchor: torch.Tensor, error: str, message: str, out_shape: list[int]) -> torch.Tensor:
    raise _ERRORS[error](message)


@_invalid_call.register_fake
def _invalid_call_fake(anchor, error, message, out_shape):
    # What the call would have returned (the code after it traces on), as far as the arguments say.
    return anchor.new_empty(out_shape)


# The op is never differentiated (it raises first), but torch.compile traces a backward for every op on
# a path that requires grad.
torch.library.register_autograd("carafe_kernels::invalid_call", lambda ctx, grad: (None, None, None, None))


def _raise_when_run(exc: Exception, op: str, features, masks, kernel_size, group_size,
                    scale_factor) -> torch.Tensor:
    message = exc.args[0]
    if isinstance(features, torch.Tensor):
        anchor, out_shape = features, list(features.shape)
        if features.dim() == 4 and type(scale_factor) is int and scale_factor >= 1:
            out_shape = list(output_shape(features.shape, scale_factor, down=_DOWN[op]))
        shapes = (*features.shape, *(masks.shape if isinstance(masks, torch.Tensor) else ()))
        if not all(has_static_value(d) for d in shapes):  # (Dynamo answers this one while tracing)
            # torch.compile with dynamic shapes: a message naming symbolic sizes cannot go into the
            # graph, so this one names what is known while tracing.
            message = (f"{op}: invalid arguments (kernel_size={kernel_size}, "
                       f"group_size={group_size}, scale_factor={scale_factor}) for the input shapes; torch.compile "
                       "traced them with dynamic shapes, so call it eagerly for the message naming them")
    else:
        anchor, out_shape = torch.empty(0), [0]
    return _invalid_call(anchor, type(exc).__name__, message, out_shape)


def _export_call(op: str, features, masks, kernel_size, group_size, scale_factor) -> torch.Tensor:
    """The call while torch.onnx.export traces: validated as always, then the ONNX decomposition
    (carafe_kernels.onnx), in the autocast dtype when autocast is on."""
    from .onnx import export_call
    autocast = _autocast_dtype(features.device.type) if isinstance(features, torch.Tensor) else None
    autocast = _autocast_for(op, features, masks, autocast)
    k, G, s = _check_call(op, features, masks, kernel_size, group_size, scale_factor, autocast)
    if autocast is not None:
        features, masks = features.to(autocast), masks.to(autocast)
    return export_call(op, features, masks, k, G, s)


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
    return _run("carafe", features, masks, kernel_size, group_size, scale_factor, backend)


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
    return _run("carafe_fused", features, mask_logits, kernel_size, group_size, scale_factor, backend)


def carafe_down(features: torch.Tensor, masks: torch.Tensor, kernel_size: int, group_size: int,
                scale_factor: int, *, backend: str = "auto") -> torch.Tensor:
    """Content-aware downsampling (CARAFE++, Wang et al., TPAMI 2021): reassembly at stride s.

    ``out[n, c, i, j] = sum_{ky, kx} features[n, c, s*i + ky - r, s*j + kx - r] * masks[n, g*k*k + ky*k + kx, i, j]``
    for ``i < ceil(H/s)``, ``j < ceil(W/s)``, with ``g = c // (C // G)``, ``r = (k - 1) // 2`` and zero
    padding: each output pixel is a content-weighted sum of the k x k window centred on input pixel
    (s*i, s*j), so the output size is that of a stride-s convolution with padding k // 2. The masks
    are used as given (see :func:`carafe_down_fused` for the op that normalises them).

    Runs on the ``cpu`` backend (fused, vectorised C++ kernels; ``backend="auto"`` picks it for CPU
    tensors), on the ``cuda`` backend (CUDA kernels, picked by "auto" for CUDA tensors; compiled and
    checked in a host emulation, not yet run on a GPU), on the ``triton`` backend (tested in Triton's
    interpreter) and on the pure-PyTorch ``reference`` backend (any device).

    Args:
        features: (N, C, H, W) float tensor.
        masks: (N, G*k*k, ceil(H/s), ceil(W/s)) reassembly kernels, same dtype and device.
        kernel_size: k, odd, >= 1.
        group_size: G, divides C.
        scale_factor: the stride s, integer >= 1.
        backend: "auto", "cpu", "cuda", "triton" or "reference"; "auto" also reads CARAFE_BACKEND.

    Returns:
        (N, C, ceil(H/s), ceil(W/s)) tensor of the input dtype.

    Raises:
        TypeError / ValueError naming the bad argument; BackendUnavailableError for a backend without
        this op.

    Example:
        >>> f = torch.randn(2, 64, 15, 16); m = torch.rand(2, 25, 8, 8)
        >>> carafe_down(f, m, kernel_size=5, group_size=1, scale_factor=2).shape
        torch.Size([2, 64, 8, 8])
    """
    return _run("carafe_down", features, masks, kernel_size, group_size, scale_factor, backend)


def carafe_down_fused(features: torch.Tensor, mask_logits: torch.Tensor, kernel_size: int, group_size: int,
                      scale_factor: int, *, backend: str = "auto") -> torch.Tensor:
    """Per-group softmax over the k*k taps + :func:`carafe_down`, in one op.

    Equals ``carafe_down(features, softmax(mask_logits.view(N, G, k*k, Ho, Wo), dim=2).view_as(mask_logits),
    k, G, s)``: channel ``g*k*k + ky*k + kx`` of the logits is tap (ky, kx) of group g.

    Args:
        features: (N, C, H, W) float tensor.
        mask_logits: (N, G*k*k, ceil(H/s), ceil(W/s)) content-encoder output (unnormalised), same dtype
            and device.
        kernel_size, group_size, scale_factor, backend: as in :func:`carafe_down`.

    Returns:
        (N, C, ceil(H/s), ceil(W/s)) tensor of the input dtype.

    Example:
        >>> f = torch.randn(2, 64, 16, 16); logits = torch.randn(2, 25, 8, 8)
        >>> carafe_down_fused(f, logits, 5, 1, 2).shape
        torch.Size([2, 64, 8, 8])
    """
    return _run("carafe_down_fused", features, mask_logits, kernel_size, group_size, scale_factor, backend)


def carafe_naive(features: torch.Tensor, masks: torch.Tensor, kernel_size: int, group_size: int,
                 scale_factor: int) -> torch.Tensor:
    """mmcv's ``carafe_naive``: the same function as :func:`carafe` (mmcv keeps it as the simple
    reference kernel beside the optimised one); here it runs the pure-PyTorch reference backend, on any
    device, with autograd by PyTorch."""
    return carafe(features, masks, kernel_size, group_size, scale_factor, backend="reference")
