"""The Triton CARAFE ops: ``torch.ops.carafe_kernels.triton_carafe``, ``triton_carafe_backward``,
``triton_carafe_fused`` and ``triton_carafe_fused_backward``, and the content-aware downsampling ops
``triton_carafe_down``, ``triton_carafe_down_backward``, ``triton_carafe_down_fused`` and
``triton_carafe_down_fused_backward``; same signatures as the C++ ops.

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

import contextlib

import torch
import triton
from torch import Tensor
from torch.library import custom_op, triton_op, wrap_triton

from ..contract import SCHEMAS, TRITON_DTYPES, check_arguments, check_output_mask, down_output_size, output_shape
from ..ops import follow_channels_last as _layout
from ..ops import register_carafe_op_family
from . import kernels as _k

__all__ = ["triton_carafe", "triton_carafe_backward", "triton_carafe_fused", "triton_carafe_fused_backward",
           "triton_carafe_down", "triton_carafe_down_backward", "triton_carafe_down_fused",
           "triton_carafe_down_fused_backward"]

_NS = "carafe_kernels"


def _define(name: str):
    # The schema is given, not inferred from the Python signature: it is the contract's, shared with
    # the C++ ops (tests/test_ops.py checks every registered op against contract.SCHEMAS).
    schema = SCHEMAS[name.removeprefix("triton_")]
    if _k.INTERPRET:
        return custom_op(f"{_NS}::{name}", mutates_args=(), schema=schema)
    return triton_op(f"{_NS}::{name}", mutates_args=(), schema=schema)


def _check(op: str, features: Tensor, masks: Tensor, k: int, G: int, s: int, *, fused: bool, down: bool,
           grad_output: Tensor | None = None) -> None:
    """The contract's checks for a direct op call (the public API has checked already, but callers of
    torch.ops skip it), plus the 32-bit in-plane offsets of these kernels (the largest plane: the
    output's for CARAFE, the features' for the down ops)."""
    check_arguments(features, masks, k, G, s, fused=fused, op=op, dtypes=TRITON_DTYPES, limits=True,
                    grad_output=grad_output, down=down)
    N, C, H, W = features.shape
    plane_h, plane_w = (H, W) if down else (H * s, W * s)
    if plane_h * plane_w >= 2 ** 31:
        raise ValueError(f"{op}: {'a features' if down else 'an output'} plane of {plane_h} x {plane_w} pixels "
                         "exceeds the kernels' 32-bit in-plane offsets")


def _on_device(tensor: Tensor):
    """The context to launch in: Triton launches on torch.cuda.current_device(), not on its arguments'
    device, so a CUDA tensor's device is made current for the launch (tensors on cuda:1 while cuda:0 is
    current would otherwise run on the wrong GPU); a no-op for CPU tensors (the interpreter)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def _positions(features: Tensor, s: int, down: bool) -> int:
    """How many positions the kernels' programs share out per (image, group): the low-res features'
    pixels for CARAFE, the output pixels for the down ops (kernels.py: _position_grid)."""
    _, _, H, W = features.shape
    return down_output_size(H, s) * down_output_size(W, s) if down else H * W


# The eight op bodies differ only in their names and the fused and down flags, so the checks and the
# launches live in _forward / _backward; the op functions stay separate because each is registered
# under its own name and schema (argument names included: masks vs mask_logits).
def _forward(op: str, features: Tensor, masks: Tensor, k: int, G: int, s: int, fused: bool,
             down: bool = False) -> Tensor:
    _check(op, features, masks, k, G, s, fused=fused, down=down)
    layout = _layout(features)
    features = features.contiguous(memory_format=layout)
    masks = masks.contiguous(memory_format=layout)
    N, C, H, W = features.shape
    out = torch.empty(output_shape(features.shape, s, down=down), dtype=features.dtype, device=features.device,
                      memory_format=layout)
    if out.numel() == 0:
        return out
    Cg = C // G
    positions = _positions(features, s, down)

    def grid(meta):
        return (N * G * triton.cdiv(Cg, meta["BLOCK_C"]) * triton.cdiv(positions, meta["BLOCK_P"]),)

    forward_kernel, _, _ = _k.launchers(down=down)
    # The down ops have no sub-pixel axis: SS_PAD = 1.
    ss_pad = 1 if down else _k.next_pow2(s * s)
    with _on_device(features):
        wrap_triton(forward_kernel)[grid](features, masks, out, C, H, W, G, k, s, ss_pad, fused, down,
                                          layout == torch.channels_last)
    return out


def _backward(op: str, grad_output: Tensor, features: Tensor, masks: Tensor, k: int, G: int, s: int,
              fused: bool, output_mask, down: bool = False) -> tuple[Tensor | None, Tensor | None]:
    _check(op, features, masks, k, G, s, fused=fused, down=down, grad_output=grad_output)
    # None: both gradients. The Python default is None, not [True, True] as in the schema, because
    # torch.library.triton_op infers the schema from this signature and takes no list defaults.
    want_features, want_masks = check_output_mask((True, True) if output_mask is None else output_mask, op)
    layout = _layout(features)
    grad_output = grad_output.contiguous(memory_format=layout)
    features = features.contiguous(memory_format=layout)
    masks = masks.contiguous(memory_format=layout)
    N, C, H, W = features.shape
    # A gradient not asked for: no allocation, no kernel, None in its slot.
    grad_features = torch.empty_like(features) if want_features else None
    grad_masks = torch.empty_like(masks) if want_masks else None
    if N == 0 or H == 0 or W == 0 or not (want_features or want_masks):
        return grad_features, grad_masks
    if C == 0:
        return grad_features, (grad_masks.zero_() if want_masks else None)
    Cg = C // G
    positions = _positions(features, s, down)
    # The sub-pixel axis of the mask-gradient kernel (none for the down ops), and the features-gradient
    # kernel's: the s*s sub-pixels of CARAFE, the s*s feature phases of an output pixel for the down ops.
    ss_pad = 1 if down else _k.next_pow2(s * s)
    feat_ss_pad = _k.next_pow2(s * s)
    # fp32 accumulator of dL/dmask for the channel-block reduction: the output itself when it is fp32
    # (ACC_IN_GRAD; a 1-element placeholder goes in dp's slot, so no two kernel arguments alias, which
    # torch.compile's functionalisation of the kernel's mutations requires). Without grad_masks (a fused
    # features-only call runs the mask kernel for lse alone) dp and grad are 1-element placeholders.
    acc_in_grad = want_masks and masks.dtype == torch.float32
    dp = (torch.empty_like(masks, dtype=torch.float32) if want_masks and not acc_in_grad   # laid out like grad_masks
          else features.new_empty((1,), dtype=torch.float32))
    grad_masks_arg = grad_masks if want_masks else masks.new_empty((1,))
    # logsumexp of the fused softmax, written by the mask kernel, read by the features kernel: one per
    # (group, output pixel) for the down ops, per (group, sub-pixel, low-res pixel) for CARAFE.
    lse_shape = (N, G, *masks.shape[2:]) if down else (N, G * s * s, H, W)
    lse = features.new_empty(lse_shape if fused else (1,), dtype=torch.float32)

    def mask_grid(meta):
        return (N * G * triton.cdiv(positions, meta["BLOCK_P"]),)

    def feat_grid(meta):
        return (N * G * triton.cdiv(Cg, meta["BLOCK_C"]) * triton.cdiv(positions, meta["BLOCK_P"]),)

    _, mask_kernel, feat_kernel = _k.launchers(down=down)
    cl = layout == torch.channels_last
    with _on_device(features):
        if want_masks or fused:
            wrap_triton(mask_kernel)[mask_grid](
                grad_output, features, masks, dp, grad_masks_arg, lse, C, H, W, G, k, s, ss_pad, fused, down,
                acc_in_grad, cl, want_masks)
        if want_features:
            wrap_triton(feat_kernel)[feat_grid](
                grad_output, masks, lse, grad_features, C, H, W, G, k, s, feat_ss_pad, fused, cl)
    return grad_features, grad_masks


@_define("triton_carafe")
def triton_carafe(features: Tensor, masks: Tensor, kernel_size: int, group_size: int,
                  scale_factor: int) -> Tensor:
    return _forward("triton_carafe", features, masks, kernel_size, group_size, scale_factor, False)


@_define("triton_carafe_backward")
def triton_carafe_backward(grad_output: Tensor, features: Tensor, masks: Tensor, kernel_size: int,
                           group_size: int, scale_factor: int,
                           output_mask: list[bool] | None = None) -> tuple[Tensor, Tensor]:
    return _backward("triton_carafe_backward", grad_output, features, masks, kernel_size, group_size, scale_factor,
                     False, output_mask)


@_define("triton_carafe_fused")
def triton_carafe_fused(features: Tensor, mask_logits: Tensor, kernel_size: int, group_size: int,
                        scale_factor: int) -> Tensor:
    return _forward("triton_carafe_fused", features, mask_logits, kernel_size, group_size, scale_factor, True)


@_define("triton_carafe_fused_backward")
def triton_carafe_fused_backward(grad_output: Tensor, features: Tensor, mask_logits: Tensor, kernel_size: int,
                                 group_size: int, scale_factor: int,
                                 output_mask: list[bool] | None = None) -> tuple[Tensor, Tensor]:
    return _backward("triton_carafe_fused_backward", grad_output, features, mask_logits, kernel_size, group_size,
                     scale_factor, True, output_mask)


@_define("triton_carafe_down")
def triton_carafe_down(features: Tensor, masks: Tensor, kernel_size: int, group_size: int,
                       scale_factor: int) -> Tensor:
    return _forward("triton_carafe_down", features, masks, kernel_size, group_size, scale_factor, False, down=True)


@_define("triton_carafe_down_backward")
def triton_carafe_down_backward(grad_output: Tensor, features: Tensor, masks: Tensor, kernel_size: int,
                                group_size: int, scale_factor: int,
                                output_mask: list[bool] | None = None) -> tuple[Tensor, Tensor]:
    return _backward("triton_carafe_down_backward", grad_output, features, masks, kernel_size, group_size,
                     scale_factor, False, output_mask, down=True)


@_define("triton_carafe_down_fused")
def triton_carafe_down_fused(features: Tensor, mask_logits: Tensor, kernel_size: int, group_size: int,
                             scale_factor: int) -> Tensor:
    return _forward("triton_carafe_down_fused", features, mask_logits, kernel_size, group_size, scale_factor, True,
                    down=True)


@_define("triton_carafe_down_fused_backward")
def triton_carafe_down_fused_backward(grad_output: Tensor, features: Tensor, mask_logits: Tensor,
                                      kernel_size: int, group_size: int, scale_factor: int,
                                      output_mask: list[bool] | None = None) -> tuple[Tensor, Tensor]:
    return _backward("triton_carafe_down_fused_backward", grad_output, features, mask_logits, kernel_size,
                     group_size, scale_factor, True, output_mask, down=True)


# The Triton kernels read channels_last in place and return it (cares' CUDA default is bf16 + channels_last).
register_carafe_op_family(f"{_NS}::triton_carafe", f"{_NS}::triton_carafe_backward", dtypes=TRITON_DTYPES,
                          layout=_layout)
register_carafe_op_family(f"{_NS}::triton_carafe_fused", f"{_NS}::triton_carafe_fused_backward",
                          dtypes=TRITON_DTYPES, layout=_layout)
register_carafe_op_family(f"{_NS}::triton_carafe_down", f"{_NS}::triton_carafe_down_backward",
                          dtypes=TRITON_DTYPES, layout=_layout, down=True)
register_carafe_op_family(f"{_NS}::triton_carafe_down_fused", f"{_NS}::triton_carafe_down_fused_backward",
                          dtypes=TRITON_DTYPES, layout=_layout, down=True)
