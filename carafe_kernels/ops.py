"""Python-side registrations for the C++ ops declared in csrc/carafe.cpp: fake (meta) kernels for
torch.compile/export, autograd, autocast and FLOP formulas. They attach to the ops themselves, so every
caller of ``torch.ops.carafe_kernels.*`` gets them. Nothing here runs when the library is not loaded.

``register_carafe_op_family`` is shared with the Triton backend, whose ops have the same signatures.
"""
from __future__ import annotations

import torch
from torch.utils.flop_counter import register_flop_formula

from ._native import HAS_NATIVE
from .contract import NATIVE_DTYPES, check_arguments

__all__ = ["carafe_flops", "register_carafe_op_family", "AUTOCAST_ERROR"]


def carafe_flops(features_shape, kernel_size: int, scale_factor: int) -> int:
    """FLOPs of one CARAFE reassembly, counting a multiply-add as 2 (torch.utils.flop_counter's and the
    CARAFE paper's convention): 2 * N * C * (H*s) * (W*s) * k*k. The mask softmax is not counted."""
    n, c, h, w = features_shape
    return 2 * n * c * (h * scale_factor) * (w * scale_factor) * kernel_size * kernel_size


def _output_like(features: torch.Tensor, scale_factor: int,
                 memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    n, c, h, w = features.shape
    return torch.empty((n, c, h * scale_factor, w * scale_factor), dtype=features.dtype, device=features.device,
                       memory_format=memory_format)


def follow_channels_last(features: torch.Tensor) -> torch.memory_format:
    """The memory format of kernels that read channels_last in place: channels_last when the features
    are (and not also NCHW-contiguous, as 1x1 images or one channel are), else contiguous NCHW. Their
    output and both gradients are returned in it."""
    if features.is_contiguous(memory_format=torch.channels_last) and not features.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def _always_nchw(features: torch.Tensor) -> torch.memory_format:
    return torch.contiguous_format


# Why not torch.library.register_autocast: it casts to one dtype fixed at registration, while these
# ops follow the dtype of the enclosing torch.autocast region (bf16 or fp16 on CPU, fp16 or bf16 on
# CUDA), as aten::conv2d does. So this is register_autocast's own body (torch 2.13, torch/library.py)
# with the dtype read at call time. It uses three private APIs, as register_autocast does:
# torch._library.utils.lookup_op, OpOverload.py_kernels / py_impl (the kernel torch.compile's tracing
# sees) and torch._C._ExcludeDispatchKeyGuard. If a torch upgrade removes one, the ops still work
# outside autocast, AUTOCAST_ERROR says why, carafe_kernels.functional casts the inputs itself, and
# tests/test_ops.py::test_autocast_registration_works fails loudly.
AUTOCAST_ERROR: str | None = None


def _register_autocast(qualname: str, device_type: str) -> None:
    """Under torch.autocast, run the op in the autocast dtype (like a convolution): mixed
    fp32/fp16/bf16 inputs are cast to it, so the kernels always see one dtype."""
    global AUTOCAST_ERROR
    try:
        op = torch._library.utils.lookup_op(qualname)
        key_name = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        key = getattr(torch._C.DispatchKey, key_name)
        exclude = torch._C.DispatchKeySet(key)
        guard = torch._C._ExcludeDispatchKeyGuard

        def cast_and_call(*args):
            dtype = torch.get_autocast_dtype(device_type)
            args = tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point()
                         and a.device.type == device_type else a for a in args)
            with guard(exclude):
                return op(*args)

        if op.has_kernel_for_dispatch_key(key):
            op.py_kernels.pop(key, None)
        op.py_impl(key)(cast_and_call)  # seen by torch.compile's tracing
        ns, name = qualname.split("::")
        lib = torch.library.Library(ns, "FRAGMENT")
        lib.impl(name, lambda _keyset, *args: cast_and_call(*args), key_name, with_keyset=True)
        _LIBS.append(lib)
    except (AttributeError, TypeError, RuntimeError) as exc:  # a torch whose internals moved
        AUTOCAST_ERROR = (f"autocast kernels could not be registered for {qualname} on {device_type} "
                          f"({type(exc).__name__}: {exc}); carafe_kernels.functional casts the inputs instead")


def _packet(qualname: str):
    namespace, name = qualname.split("::")
    return getattr(getattr(torch.ops, namespace), name)


_LIBS: list = []  # keep the Library objects alive: their registrations die with them


def register_carafe_op_family(forward_qualname: str, backward_qualname: str, *,
                              dtypes: tuple[torch.dtype, ...] = NATIVE_DTYPES,
                              layout=_always_nchw) -> None:
    """Fake kernels, autograd, autocast and FLOP formulas for one (forward, backward) op pair with the
    schemas of contract.SCHEMAS:  forward(features, masks_or_logits, k, G, s) -> out  and
    backward(grad_out, features, masks_or_logits, k, G, s) -> (grad_features, grad_masks_or_logits).
    dtypes: what the kernels compute in (the fake kernels refuse the others, as the real ones do).
    layout: features -> the memory format of the output and gradients the kernels return (the fake
    kernels must give the real ones' strides): _always_nchw, or follow_channels_last."""
    # register_flop_formula takes the OpOverloadPacket (torch.ops.ns.name).
    forward_op = _packet(forward_qualname)
    backward_op = _packet(backward_qualname)

    fused = forward_qualname.endswith("_fused")

    # The fake kernels check what the real ones check (contract.check_arguments, with torch._check for
    # symbolic shapes), so torch.compile and torch.export report a bad call where eager would.
    @torch.library.register_fake(forward_qualname)
    def _forward_fake(features, masks, kernel_size, group_size, scale_factor):
        check_arguments(features, masks, kernel_size, group_size, scale_factor, fused=fused, op=forward_qualname,
                        dtypes=dtypes, limits=True)
        return _output_like(features, scale_factor, layout(features))

    @torch.library.register_fake(backward_qualname)
    def _backward_fake(grad_output, features, masks, kernel_size, group_size, scale_factor):
        check_arguments(features, masks, kernel_size, group_size, scale_factor, fused=fused, op=backward_qualname,
                        dtypes=dtypes, limits=True, grad_output=grad_output)
        return torch.empty_like(features, memory_format=layout(features)), \
            torch.empty_like(masks, memory_format=layout(features))

    def setup_context(ctx, inputs, output):
        features, masks, kernel_size, group_size, scale_factor = inputs
        ctx.save_for_backward(features, masks)
        ctx.args = (kernel_size, group_size, scale_factor)

    def backward(ctx, grad_output):
        # Only the gradients autograd asks for are returned, and none is computed when neither is asked
        # for. NB: the backward kernels compute both gradients in one pass, so asking for one costs
        # about as much as asking for both.
        need_features, need_masks = ctx.needs_input_grad[:2]
        if not (need_features or need_masks):
            return None, None, None, None, None
        features, masks = ctx.saved_tensors
        # grad_output as it comes: each op brings it to the layout it computes in (a channels_last
        # gradient stays channels_last for kernels that read it in place).
        grad_features, grad_masks = backward_op(grad_output, features, masks, *ctx.args)
        return (grad_features if need_features else None), (grad_masks if need_masks else None), None, None, None

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
