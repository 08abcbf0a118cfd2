"""The Triton CARAFE ops: ``torch.ops.carafe_kernels.triton_carafe``, ``triton_carafe_backward``,
``triton_carafe_fused`` and ``triton_carafe_fused_backward``, same signatures as the C++ ops.

They are defined with ``torch.library.triton_op`` and launch the kernels through
``torch.library.wrap_triton``, so ``torch.compile(fullgraph=True)`` traces into them (Inductor sees the
kernels) and ``torch.export`` keeps them as ops. Both need torch >= 2.6, the project's minimum.
Autograd, fake kernels, autocast and FLOP formulas come from
``carafe_kernels.ops.register_carafe_op_family``, as for the C++ ops. Its fake kernel (an empty output
of the right shape) replaces the one triton_op derives from the Python body: same result, without
tracing kernel launches.

Under the Triton interpreter (TRITON_INTERPRET=1, CPU tensors) ``wrap_triton`` returns the raw
interpreted kernel, which cannot run on fake or functional tensors, so there the ops are plain
``torch.library.custom_op``s (opaque to torch.compile, still fully traceable and differentiable).

The Python fragments share the ``carafe_kernels`` namespace that csrc/carafe.cpp defines with
TORCH_LIBRARY; the op names do not collide with the C++ ones, and this works with or without the
compiled extension loaded (CARAFE_NO_NATIVE=1).
"""
from __future__ import annotations

import torch
import triton
from torch import Tensor
from torch.library import custom_op, triton_op, wrap_triton

from ..ops import register_carafe_op_family
from . import MAX_KERNEL_SIZE, MAX_SCALE_FACTOR
from . import kernels as _k

__all__ = ["triton_carafe", "triton_carafe_backward", "triton_carafe_fused", "triton_carafe_fused_backward"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_NS = "carafe_kernels"


def _define(name: str):
    if _k.INTERPRET:
        return custom_op(f"{_NS}::{name}", mutates_args=())
    return triton_op(f"{_NS}::{name}", mutates_args=())


def _check(op: str, features: Tensor, masks: Tensor, k: int, G: int, s: int, *, fused: bool,
           grad_output: Tensor | None = None) -> None:
    """ValueError naming the bad argument (the public API validates first; this guards direct op calls
    and the limits that are specific to the Triton kernels)."""
    what = "mask_logits" if fused else "masks"
    if features.dim() != 4 or masks.dim() != 4:
        raise ValueError(f"{op}: features and {what} must be 4-D, got {tuple(features.shape)} and "
                         f"{tuple(masks.shape)}")
    if k < 1 or k % 2 == 0 or k > MAX_KERNEL_SIZE:
        raise ValueError(f"{op}: kernel_size must be odd and in [1, {MAX_KERNEL_SIZE}] for the Triton "
                         f"backend, got {k}")
    if s < 1 or s > MAX_SCALE_FACTOR:
        raise ValueError(f"{op}: scale_factor must be in [1, {MAX_SCALE_FACTOR}] for the Triton backend, got {s}")
    N, C, H, W = features.shape
    if G < 1 or C % G != 0:
        raise ValueError(f"{op}: group_size={G} must divide the {C} channels of features {tuple(features.shape)}")
    if features.dtype not in _DTYPES:
        raise ValueError(f"{op}: the Triton backend supports float16, bfloat16 and float32, got {features.dtype}")
    if masks.dtype != features.dtype:
        raise ValueError(f"{op}: features and {what} must have the same dtype, got {features.dtype} and "
                         f"{masks.dtype}")
    if masks.device != features.device:
        raise ValueError(f"{op}: features and {what} must be on the same device, got {features.device} and "
                         f"{masks.device}")
    expected = (N, G * k * k * s * s, H, W) if fused else (N, G * k * k, H * s, W * s)
    if tuple(masks.shape) != expected:
        raise ValueError(f"{op}: {what} must have shape {expected} for features {tuple(features.shape)}, "
                         f"kernel_size={k}, group_size={G}, scale_factor={s}; got {tuple(masks.shape)}")
    if H * s * W * s >= 2 ** 31:
        raise ValueError(f"{op}: an output plane of {H * s} x {W * s} pixels exceeds the kernels' 32-bit "
                         "in-plane offsets")
    if grad_output is not None and (tuple(grad_output.shape) != (N, C, H * s, W * s)
                                    or grad_output.dtype != features.dtype):
        raise ValueError(f"{op}: grad_output must be {(N, C, H * s, W * s)} of dtype {features.dtype}, got "
                         f"{tuple(grad_output.shape)} of {grad_output.dtype}")


# The four op bodies differ only in their names and the fused flag, so the checks and the launches
# live in _forward / _backward; the op functions stay separate because their signatures are the
# schemas (argument names included: masks vs mask_logits), which must match the C++ ops'.
def _forward(op: str, features: Tensor, masks: Tensor, k: int, G: int, s: int, fused: bool) -> Tensor:
    _check(op, features, masks, k, G, s, fused=fused)
    features = features.contiguous()
    masks = masks.contiguous()
    N, C, H, W = features.shape
    out = features.new_empty((N, C, H * s, W * s))
    if out.numel() == 0:
        return out
    Cg = C // G

    def grid(meta):
        return (N * G * triton.cdiv(Cg, meta["BLOCK_C"]) * triton.cdiv(H * W, meta["BLOCK_P"]),)

    wrap_triton(_k.carafe_fwd_kernel)[grid](
        features, masks, out, C, H, W, G, k, s, _k.next_pow2(s * s), fused)
    return out


def _backward(op: str, grad_output: Tensor, features: Tensor, masks: Tensor, k: int, G: int, s: int,
              fused: bool) -> tuple[Tensor, Tensor]:
    _check(op, features, masks, k, G, s, fused=fused, grad_output=grad_output)
    grad_output = grad_output.contiguous()
    features = features.contiguous()
    masks = masks.contiguous()
    N, C, H, W = features.shape
    grad_features = torch.empty_like(features)
    grad_masks = torch.empty_like(masks)
    if N == 0 or H == 0 or W == 0:
        return grad_features, grad_masks
    if C == 0:
        return grad_features, grad_masks.zero_()
    Cg = C // G
    ss_pad = _k.next_pow2(s * s)
    # fp32 accumulator of dL/dmask for the channel-block reduction: the output itself when it is fp32
    # (ACC_IN_GRAD; a 1-element placeholder goes in dp's slot, so no two kernel arguments alias, which
    # torch.compile's functionalisation of the kernel's mutations requires).
    acc_in_grad = masks.dtype == torch.float32
    dp = features.new_empty((1,) if acc_in_grad else masks.shape, dtype=torch.float32)
    # logsumexp of the fused softmax, written by the mask kernel, read by the features kernel.
    lse = features.new_empty((N, G * s * s, H, W) if fused else (1,), dtype=torch.float32)

    def mask_grid(meta):
        return (N * G * triton.cdiv(H * W, meta["BLOCK_P"]),)

    def feat_grid(meta):
        return (N * G * triton.cdiv(Cg, meta["BLOCK_C"]) * triton.cdiv(H * W, meta["BLOCK_P"]),)

    wrap_triton(_k.carafe_bwd_mask_kernel)[mask_grid](
        grad_output, features, masks, dp, grad_masks, lse, C, H, W, G, k, s, ss_pad, fused, acc_in_grad)
    wrap_triton(_k.carafe_bwd_feat_kernel)[feat_grid](
        grad_output, masks, lse, grad_features, C, H, W, G, k, s, ss_pad, fused)
    return grad_features, grad_masks


@_define("triton_carafe")
def triton_carafe(features: Tensor, masks: Tensor, kernel_size: int, group_size: int,
                  scale_factor: int) -> Tensor:
    return _forward("triton_carafe", features, masks, kernel_size, group_size, scale_factor, False)


@_define("triton_carafe_backward")
def triton_carafe_backward(grad_output: Tensor, features: Tensor, masks: Tensor, kernel_size: int,
                           group_size: int, scale_factor: int) -> tuple[Tensor, Tensor]:
    return _backward("triton_carafe_backward", grad_output, features, masks, kernel_size, group_size, scale_factor,
                     False)


@_define("triton_carafe_fused")
def triton_carafe_fused(features: Tensor, mask_logits: Tensor, kernel_size: int, group_size: int,
                        scale_factor: int) -> Tensor:
    return _forward("triton_carafe_fused", features, mask_logits, kernel_size, group_size, scale_factor, True)


@_define("triton_carafe_fused_backward")
def triton_carafe_fused_backward(grad_output: Tensor, features: Tensor, mask_logits: Tensor, kernel_size: int,
                                 group_size: int, scale_factor: int) -> tuple[Tensor, Tensor]:
    return _backward("triton_carafe_fused_backward", grad_output, features, mask_logits, kernel_size, group_size,
                     scale_factor, True)


register_carafe_op_family(f"{_NS}::triton_carafe", f"{_NS}::triton_carafe_backward")
register_carafe_op_family(f"{_NS}::triton_carafe_fused", f"{_NS}::triton_carafe_fused_backward")
