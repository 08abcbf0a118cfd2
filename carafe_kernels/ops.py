"""Python-side registrations for the C++ ops declared in csrc/carafe.cpp: fake (meta) kernels for
torch.compile/export, autograd, autocast and FLOP formulas. They attach to the ops themselves, so every
caller of ``torch.ops.carafe_kernels.*`` gets them. Nothing here runs when the library is not loaded.

``register_carafe_op_family`` is shared with the Triton backend, whose ops have the same signatures.
"""
from __future__ import annotations

import torch
from torch.utils.flop_counter import register_flop_formula

from ._native import HAS_NATIVE

__all__ = ["carafe_flops", "register_carafe_op_family"]


def carafe_flops(features_shape, kernel_size: int, scale_factor: int) -> int:
    """FLOPs of one CARAFE reassembly, counting a multiply-add as 2 (torch.utils.flop_counter's and the
    CARAFE paper's convention): 2 * N * C * (H*s) * (W*s) * k*k. The mask softmax is not counted."""
    n, c, h, w = features_shape
    return 2 * n * c * (h * scale_factor) * (w * scale_factor) * kernel_size * kernel_size


def _output_like(features: torch.Tensor, scale_factor: int) -> torch.Tensor:
    n, c, h, w = features.shape
    return features.new_empty((n, c, h * scale_factor, w * scale_factor))


def _register_autocast(qualname: str, device_type: str) -> None:
    """Under torch.autocast, run the op in the autocast dtype (like a convolution): mixed
    fp32/fp16/bf16 inputs are cast to it, so the kernels always see one dtype."""
    op = torch._library.utils.lookup_op(qualname)
    key_name = "Autocast" + torch._C._dispatch_key_for_device(device_type)
    key = getattr(torch._C.DispatchKey, key_name)

    def cast_and_call(*args):
        dtype = torch.get_autocast_dtype(device_type)
        args = tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point()
                     and a.device.type == device_type else a for a in args)
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(key)):
            return op(*args)

    if op.has_kernel_for_dispatch_key(key):
        op.py_kernels.pop(key, None)
    op.py_impl(key)(cast_and_call)  # seen by torch.compile's tracing
    ns, name = qualname.split("::")
    lib = torch.library.Library(ns, "FRAGMENT")
    lib.impl(name, lambda _keyset, *args: cast_and_call(*args), key_name, with_keyset=True)
    _LIBS.append(lib)


_LIBS: list = []  # keep the Library objects alive: their registrations die with them


def register_carafe_op_family(forward_qualname: str, backward_qualname: str) -> None:
    """Fake kernels, autograd, autocast and FLOP formulas for one (forward, backward) op pair with the
    signatures  forward(features, masks_or_logits, k, G, s) -> out  and
    backward(grad_out, features, masks_or_logits, k, G, s) -> (grad_features, grad_masks_or_logits)."""
    # register_flop_formula takes the OpOverloadPacket (torch.ops.ns.name), not lookup_op's OpOverload.
    forward_op = torch._library.utils.lookup_op(forward_qualname).overloadpacket
    backward_op = torch._library.utils.lookup_op(backward_qualname).overloadpacket

    @torch.library.register_fake(forward_qualname)
    def _forward_fake(features, masks, kernel_size, group_size, scale_factor):
        return _output_like(features, scale_factor)

    @torch.library.register_fake(backward_qualname)
    def _backward_fake(grad_output, features, masks, kernel_size, group_size, scale_factor):
        return torch.empty_like(features, memory_format=torch.contiguous_format), \
            torch.empty_like(masks, memory_format=torch.contiguous_format)

    def setup_context(ctx, inputs, output):
        features, masks, kernel_size, group_size, scale_factor = inputs
        ctx.save_for_backward(features, masks)
        ctx.args = (kernel_size, group_size, scale_factor)

    def backward(ctx, grad_output):
        features, masks = ctx.saved_tensors
        grad_features, grad_masks = backward_op(grad_output.contiguous(), features, masks, *ctx.args)
        return grad_features, grad_masks, None, None, None

    torch.library.register_autograd(forward_qualname, backward, setup_context=setup_context)

    def no_double_backward(ctx, *grads):
        raise NotImplementedError(
            f"{backward_qualname} has no derivative: double backward through CARAFE is not supported; "
            "use backend='reference' if you need higher-order gradients")

    def backward_setup_context(ctx, inputs, output):
        pass

    torch.library.register_autograd(backward_qualname, no_double_backward, setup_context=backward_setup_context)

    for device_type in ("cpu", "cuda"):
        _register_autocast(forward_qualname, device_type)

    @register_flop_formula(forward_op)
    def _forward_flops(features_shape, masks_shape, kernel_size, group_size, scale_factor, *args, **kwargs):
        return carafe_flops(features_shape, kernel_size, scale_factor)

    @register_flop_formula(backward_op)
    def _backward_flops(grad_shape, features_shape, masks_shape, kernel_size, group_size, scale_factor,
                        *args, **kwargs):
        # grad_features (a gather) and grad_masks (a reduction over channels): one multiply-add each per
        # tap per output element.
        return 2 * carafe_flops(features_shape, kernel_size, scale_factor)


if HAS_NATIVE:
    register_carafe_op_family("carafe_kernels::carafe", "carafe_kernels::carafe_backward")
    register_carafe_op_family("carafe_kernels::carafe_fused", "carafe_kernels::carafe_fused_backward")
