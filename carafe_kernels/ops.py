"""Python-side registrations for the C++ ops declared in csrc/carafe.cpp: fake (meta) kernels for
torch.compile/export, autograd, autocast and FLOP formulas. They attach to the ops themselves, so every
caller of ``torch.ops.carafe_kernels.*`` gets them. Nothing here runs when the library is not loaded.

``register_carafe_op_family`` is shared with the Triton backend, whose ops have the same signatures.
"""
from __future__ import annotations

import warnings

import torch
import torch.autograd.forward_ad as _forward_ad
from torch.utils.flop_counter import register_flop_formula

from ._native import HAS_NATIVE
from .contract import NATIVE_DTYPES, check_arguments, check_output_mask, output_shape
from .reference import down_output_size, normalize_down_mask_logits_jvp, normalize_mask_logits_jvp

__all__ = ["carafe_flops", "carafe_down_flops", "register_carafe_op_family", "rule", "AUTOCAST_ERROR"]


def carafe_flops(features_shape, kernel_size: int, scale_factor: int) -> int:
    """FLOPs of one CARAFE reassembly, counting a multiply-add as 2 (torch.utils.flop_counter's and the
    CARAFE paper's convention): 2 * N * C * (H*s) * (W*s) * k*k. The mask softmax is not counted."""
    n, c, h, w = features_shape
    return 2 * n * c * (h * scale_factor) * (w * scale_factor) * kernel_size * kernel_size


def carafe_down_flops(features_shape, kernel_size: int, scale_factor: int) -> int:
    """FLOPs of one content-aware downsampling (carafe_down), same convention as carafe_flops:
    2 * N * C * ceil(H/s) * ceil(W/s) * k*k (one multiply-add per tap per output element). The mask
    softmax is not counted."""
    n, c, h, w = features_shape
    ho, wo = down_output_size(h, scale_factor), down_output_size(w, scale_factor)
    return 2 * n * c * ho * wo * kernel_size * kernel_size


def _output_like(features: torch.Tensor, scale_factor: int,
                 memory_format: torch.memory_format = torch.contiguous_format, *, down: bool = False) -> torch.Tensor:
    return torch.empty(output_shape(features.shape, scale_factor, down=down), dtype=features.dtype,
                       device=features.device, memory_format=memory_format)


def follow_channels_last(features: torch.Tensor) -> torch.memory_format:
    """The memory format of kernels that read channels_last in place: channels_last when the features
    are (and not also NCHW-contiguous, as 1x1 images or one channel are), else contiguous NCHW. Their
    output and both gradients are returned in it."""
    if features.is_contiguous(memory_format=torch.channels_last) and not features.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def _always_nchw(features: torch.Tensor) -> torch.memory_format:
    return torch.contiguous_format


def native_layout(features: torch.Tensor) -> torch.memory_format:
    """The memory format the C++ ops return: the CUDA kernels read channels_last features in place and
    return channels_last (follow_channels_last, csrc/cuda/carafe_cuda.cpp), the CPU kernels return
    contiguous NCHW. The fake kernels follow the features' device type, as the dispatcher does."""
    return follow_channels_last(features) if features.device.type == "cuda" else torch.contiguous_format


# Why not torch.library.register_autocast: it casts to one dtype fixed at registration, while these
# ops follow the dtype of the enclosing torch.autocast region (bf16 or fp16 on CPU, fp16 or bf16 on
# CUDA), as aten::conv2d does. So this is register_autocast's own body (torch 2.13, torch/library.py)
# with the dtype read at call time. It uses three private APIs, as register_autocast does:
# torch._library.utils.lookup_op, OpOverload.py_kernels / py_impl (the kernel torch.compile's tracing
# sees) and torch._C._ExcludeDispatchKeyGuard. If a torch upgrade removes one, the ops still work
# outside autocast, AUTOCAST_ERROR says why, carafe_kernels.functional casts the inputs itself, and
# tests/test_ops.py::test_autocast_registration_works fails loudly.
AUTOCAST_ERROR: str | None = None

# What autocast casts: the floating dtypes but float64, as PyTorch's own autocast does (at::autocast's
# is_eligible): float64 is asked for on purpose, and stays float64.
AUTOCAST_ELIGIBLE = (torch.float32, torch.float16, torch.bfloat16)


def _register_autocast(qualname: str, device_type: str) -> None:
    """Under torch.autocast, run the op in the autocast dtype (like a convolution): mixed
    fp32/fp16/bf16 inputs are cast to it, so the kernels always see one dtype; float64 is not cast."""
    global AUTOCAST_ERROR
    try:
        op = torch._library.utils.lookup_op(qualname)
        key_name = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        key = getattr(torch._C.DispatchKey, key_name)
        exclude = torch._C.DispatchKeySet(key)
        guard = torch._C._ExcludeDispatchKeyGuard

        def cast_and_call(*args):
            dtype = torch.get_autocast_dtype(device_type)
            args = tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.dtype in AUTOCAST_ELIGIBLE
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


# Why not torch.library.register_autograd: the autograd.Function it generates (torch 2.13,
# torch/_library/autograd.py) has no setup_context staticmethod, no jvp and no vmap rule, and it runs the
# op below autograd whenever no input requires grad. So forward-mode AD (torch.autograd.forward_ad,
# torch.func.jvp) silently dropped the tangent (a zero or None derivative), and every torch.func
# transform (grad, vjp, jacrev, ...) raised "must override the setup_context staticmethod" (pytorch
# issues 168393, 170834, 179652). So each op gets its own autograd.Function (a "rule", _RULES) with:
#   * forward mode: CARAFE is bilinear, d carafe(F, M) = carafe(dF, M) + carafe(F, dM), so the jvp is
#     two calls of the op itself; for the fused op, carafe_fused(dF, L) + carafe(F, dM) with dM the
#     softmax's tangent (reference.normalize_mask_logits_jvp);
#   * double backward and forward-over-reverse for the plain op (its backward is bilinear too, see
#     BackwardRule); the fused op's backward refuses them;
#   * setup_context and generate_vmap_rule, which torch.func needs.
# The rules call each other through .apply, so the derivatives are differentiable in turn.
#
# torch.func transforms must meet the rule at the Python level: a torch.func transform that reaches the
# op's Autograd kernel cannot apply an autograd.Function from there ("could not find kernel for
# HigherOrderOperator custom_function_call at dispatch key AutogradCPU"). So carafe_kernels.functional
# calls rule(op).apply under a transform (registry._native_op), and a direct torch.ops call under
# torch.func.grad/jvp/... is refused with a message that says so.
_RULES: dict = {}


def rule(op) -> type[torch.autograd.Function]:
    """The autograd.Function of a registered CARAFE op (an OpOverload): what to call under torch.func."""
    return _RULES[op]


def _register_autograd(forward_op, backward_op, plain_op, *, fused: bool, down: bool = False) -> None:
    """Autograd kernels (reverse mode, forward mode, torch.func) for one (forward, backward) op pair.
    plain_op: the family's unfused forward op, whose rule is registered already (the fused jvp uses it).
    down: the content-aware downsampling ops (their logits are softmaxed without a pixel shuffle)."""
    logits_jvp = normalize_down_mask_logits_jvp if down else normalize_mask_logits_jvp

    class CarafeRule(torch.autograd.Function):
        generate_vmap_rule = True

        @staticmethod
        def forward(features, masks, kernel_size, group_size, scale_factor):
            with torch._C._AutoDispatchBelowAutograd():
                return forward_op(features, masks, kernel_size, group_size, scale_factor)

        @staticmethod
        def setup_context(ctx, inputs, output):
            features, masks, kernel_size, group_size, scale_factor = inputs
            ctx.save_for_backward(features, masks)
            ctx.save_for_forward(features, masks)
            ctx.args = (kernel_size, group_size, scale_factor)

        @staticmethod
        def backward(ctx, grad_output):
            # Only the gradients autograd asks for are computed: they are the backward op's output_mask
            # (as ATen's convolution_backward), so the kernels skip the other one and its allocation.
            need_features, need_masks = ctx.needs_input_grad[:2]
            if not (need_features or need_masks):
                return None, None, None, None, None
            features, masks = ctx.saved_tensors
            # grad_output as it comes: each op brings it to the layout it computes in (a channels_last
            # gradient stays channels_last for kernels that read it in place).
            grad_features, grad_masks = BackwardRule.apply(grad_output, features, masks, *ctx.args,
                                                           need_features, need_masks)
            return grad_features, grad_masks, None, None, None

        @staticmethod
        def jvp(ctx, d_features, d_masks, *_):
            features, masks = ctx.saved_tensors
            tangent = None
            if d_features is not None:
                tangent = CarafeRule.apply(d_features, masks, *ctx.args)
            if d_masks is not None:
                if fused:
                    d_masks = logits_jvp(masks, d_masks, *ctx.args)
                part = _RULES[plain_op].apply(features, d_masks, *ctx.args)
                tangent = part if tangent is None else tangent + part
            return tangent

    class BackwardRule(torch.autograd.Function):
        """The backward op. For the plain op it is B(g, X, Y) = (B_F(g, Y), B_M(g, X)): grad_features
        depends only on the masks, grad_masks only on the features, each linear in both arguments. So
        its vjp for cotangents (u, v) is  g: carafe(u, M) + carafe(F, v),  (F, M): B(g, u, v),  and
        its jvp is B(dg, F, M) + B(g, dF, dM). The op's output_mask (which of the two it computes; the
        other output is None) is passed on to every B it calls: the vjp's B(g, u, v) computes what
        autograd asks of F and M, the jvp's Bs what this call computed. NB: it is two bool arguments
        here, not the op's list: generate_vmap_rule flattens a list argument into pytree leaves, which
        breaks its jvp rule's bookkeeping (torch 2.13: "treespec.unflatten(leaves): leaves has length 7
        but the spec refers to a pytree that holds 8 items")."""
        generate_vmap_rule = True

        @staticmethod
        def forward(grad_output, features, masks, kernel_size, group_size, scale_factor, want_features, want_masks):
            with torch._C._AutoDispatchBelowAutograd():
                return backward_op(grad_output, features, masks, kernel_size, group_size, scale_factor,
                                   [want_features, want_masks])

        @staticmethod
        def setup_context(ctx, inputs, output):
            grad_output, features, masks, kernel_size, group_size, scale_factor, want_features, want_masks = inputs
            ctx.save_for_backward(grad_output, features, masks)
            ctx.save_for_forward(grad_output, features, masks)
            ctx.args = (kernel_size, group_size, scale_factor)
            ctx.output_mask = (want_features, want_masks)

        @staticmethod
        def backward(ctx, u, v):
            if fused:
                _no_second_order(backward_op)
            grad_output, features, masks = ctx.saved_tensors
            need_grad_output, need_features, need_masks = ctx.needs_input_grad[:3]
            u = torch.zeros_like(features) if u is None else u.contiguous()
            v = torch.zeros_like(masks) if v is None else v.contiguous()
            grad_grad = grad_features = grad_masks = None
            if need_grad_output:
                grad_grad = CarafeRule.apply(u, masks, *ctx.args) + CarafeRule.apply(features, v, *ctx.args)
            if need_features or need_masks:
                grad_features, grad_masks = BackwardRule.apply(grad_output, u, v, *ctx.args, need_features,
                                                               need_masks)
            return grad_grad, grad_features, grad_masks, None, None, None, None, None

        @staticmethod
        def jvp(ctx, d_grad_output, d_features, d_masks, *_):
            if fused:
                _no_second_order(backward_op)
            grad_output, features, masks = ctx.saved_tensors
            d_grad_output = torch.zeros_like(grad_output) if d_grad_output is None else d_grad_output
            d_features = torch.zeros_like(features) if d_features is None else d_features
            d_masks = torch.zeros_like(masks) if d_masks is None else d_masks
            mask = ctx.output_mask
            a = BackwardRule.apply(d_grad_output.contiguous(), features, masks, *ctx.args, *mask)
            b = BackwardRule.apply(grad_output, d_features, d_masks, *ctx.args, *mask)
            return tuple(None if x is None else x + y for x, y in zip(a, b))

    _RULES[forward_op] = CarafeRule
    _RULES[backward_op] = BackwardRule
    for op, op_rule, tensor_count in ((forward_op, CarafeRule, 2), (backward_op, BackwardRule, 3)):
        _register_autograd_kernel(op, op_rule)
        _register_vmap(op, tensor_count)


def _register_vmap(op, tensor_count: int) -> None:
    """torch.vmap rule for op: every CARAFE op is independent per sample, so the vmapped dimension folds
    into the batch N (one kernel call) instead of PyTorch's per-sample loop ("There is a performance
    drop because we have not yet implemented the batching rule")."""

    def batched(info, in_dims, *args):
        size = info.batch_size
        tensors = [t.movedim(d, 0) if d is not None else t.expand(size, *t.shape)
                   for t, d in zip(args[:tensor_count], in_dims[:tensor_count])]
        n = tensors[0].shape[1]
        out = op(*(t.reshape(size * n, *t.shape[2:]) for t in tensors), *args[tensor_count:])
        if isinstance(out, torch.Tensor):
            return out.reshape(size, n, *out.shape[1:]), 0
        # None: a gradient the backward op's output_mask did not ask for
        return (tuple(None if o is None else o.reshape(size, n, *o.shape[1:]) for o in out),
                tuple(None if o is None else 0 for o in out))

    torch.library.register_vmap(op._schema.name, batched, lib=_LIBS[-1])


def _no_second_order(op) -> None:
    plain, normalize = (("carafe_down", "normalize_down_mask_logits(mask_logits, k, G)") if "carafe_down" in op._name
                        else ("carafe", "normalize_mask_logits(mask_logits, k, G, s)"))
    raise NotImplementedError(
        f"{op._name} has no derivative: double backward and forward-over-reverse (e.g. torch.func.hessian) "
        f"through the fused CARAFE op are not supported; use {plain}(features, "
        f"carafe_kernels.reference.{normalize}, k, G, s) (the plain op supports them) or backend='reference'")


def _register_autograd_kernel(op, op_rule) -> None:
    """Registers op_rule.apply as op's Autograd kernel (where torch.library.register_autograd puts its
    generated one). Without grad and without dual tensors the op runs below autograd directly, as
    register_autograd's kernel does: the inference path pays two cheap checks more."""
    apply = op_rule.apply
    after_autograd = torch._C._after_autograd_keyset
    below_autograd = torch._C._AutoDispatchBelowAutograd
    is_grad_enabled, any_requires_grad = torch._C.is_grad_enabled, torch._C._any_requires_grad
    transforms_active = torch._C._are_functorch_transforms_active
    op_path = "torch.ops." + op._name.replace("::", ".")

    def autograd_kernel(keyset, *args):
        if (is_grad_enabled() and any_requires_grad(*args)) or _forward_ad._current_level >= 0:
            if transforms_active():
                raise NotImplementedError(
                    f"torch.func transforms (grad, vjp, jacrev, jvp, jacfwd, hessian) cannot differentiate a "
                    f"direct call of {op_path}: call carafe_kernels.carafe / carafe_fused / carafe_down / "
                    f"carafe_down_fused (or "
                    f"carafe_kernels.ops.rule(op).apply), which support them")
            return apply(*args)
        with below_autograd():
            return op.redispatch(keyset & after_autograd, *args)

    namespace, name = op._schema.name.split("::")
    lib = torch.library.Library(namespace, "FRAGMENT")
    with warnings.catch_warnings():
        # The Triton ops are torch.library.custom_op / triton_op ops, which come with register_autograd's
        # kernel: replacing it is the point, so PyTorch's "Overriding a previously registered kernel"
        # warning (shown to every user of the Triton backend) says nothing to act on.
        warnings.filterwarnings("ignore", message="(?s).*Overriding a previously registered kernel",
                                category=UserWarning)
        lib.impl(name, autograd_kernel, "Autograd", with_keyset=True)
    _LIBS.append(lib)


def _packet(qualname: str):
    namespace, name = qualname.split("::")
    return getattr(getattr(torch.ops, namespace), name)


_LIBS: list = []  # keep the Library objects alive: their registrations die with them


def register_carafe_op_family(forward_qualname: str, backward_qualname: str, *,
                              dtypes: tuple[torch.dtype, ...] = NATIVE_DTYPES,
                              layout=_always_nchw, down: bool = False) -> None:
    """Fake kernels, autograd, autocast and FLOP formulas for one (forward, backward) op pair with the
    schemas of contract.SCHEMAS:  forward(features, masks_or_logits, k, G, s) -> out  and
    backward(grad_out, features, masks_or_logits, k, G, s, output_mask) -> (grad_features,
    grad_masks_or_logits), None in the slot of a gradient output_mask ([features, masks]) does not ask for.
    dtypes: what the kernels compute in (the fake kernels refuse the others, as the real ones do).
    layout: features -> the memory format of the output and gradients the kernels return (the fake
    kernels must give the real ones' strides): _always_nchw, follow_channels_last (Triton) or native_layout
    (the C++ ops: channels_last on CUDA, NCHW on CPU). down: the content-aware
    downsampling ops (carafe_down, carafe_down_fused), whose masks/logits and output are (.., ceil(H/s),
    ceil(W/s)) (contract.check_arguments(..., down=True)) and whose FLOPs are carafe_down_flops."""
    # register_flop_formula takes the OpOverloadPacket (torch.ops.ns.name).
    forward_op = _packet(forward_qualname)
    backward_op = _packet(backward_qualname)

    fused = forward_qualname.endswith("_fused")

    # The fake kernels check what the real ones check (contract.check_arguments, with torch._check for
    # symbolic shapes), so torch.compile and torch.export report a bad call where eager would.
    @torch.library.register_fake(forward_qualname)
    def _forward_fake(features, masks, kernel_size, group_size, scale_factor):
        check_arguments(features, masks, kernel_size, group_size, scale_factor, fused=fused, op=forward_qualname,
                        dtypes=dtypes, limits=True, down=down)
        return _output_like(features, scale_factor, layout(features), down=down)

    @torch.library.register_fake(backward_qualname)
    def _backward_fake(grad_output, features, masks, kernel_size, group_size, scale_factor,
                       output_mask=(True, True)):
        check_arguments(features, masks, kernel_size, group_size, scale_factor, fused=fused, op=backward_qualname,
                        dtypes=dtypes, limits=True, grad_output=grad_output, down=down)
        want_features, want_masks = check_output_mask(output_mask, backward_qualname)
        # None (an undefined tensor) in the slot of a gradient not asked for, as the kernels return
        return (torch.empty_like(features, memory_format=layout(features)) if want_features else None,
                torch.empty_like(masks, memory_format=layout(features)) if want_masks else None)

    _register_autograd(torch._library.utils.lookup_op(forward_qualname),
                       torch._library.utils.lookup_op(backward_qualname),
                       # the family's unfused op, registered first (its rule is in _RULES)
                       torch._library.utils.lookup_op(forward_qualname.removesuffix("_fused")), fused=fused,
                       down=down)

    for device_type in ("cpu", "cuda"):
        _register_autocast(forward_qualname, device_type)

    flops = carafe_down_flops if down else carafe_flops

    @register_flop_formula(forward_op)
    def _forward_flops(features_shape, masks_shape, kernel_size, group_size, scale_factor, *args, **kwargs):
        return flops(features_shape, kernel_size, scale_factor)

    @register_flop_formula(backward_op)
    def _backward_flops(grad_shape, features_shape, masks_shape, kernel_size, group_size, scale_factor,
                        output_mask=(True, True), *args, **kwargs):
        # NB: the flop counter leaves out arguments equal to their schema default (output_mask [True, True])
        # grad_features (a gather) and grad_masks (a reduction over channels): one multiply-add each per
        # tap per output element, for each gradient output_mask asks for.
        return sum(map(bool, output_mask)) * flops(features_shape, kernel_size, scale_factor)


if HAS_NATIVE:
    register_carafe_op_family("carafe_kernels::carafe", "carafe_kernels::carafe_backward", layout=native_layout)
    register_carafe_op_family("carafe_kernels::carafe_fused", "carafe_kernels::carafe_fused_backward",
                              layout=native_layout)
    register_carafe_op_family("carafe_kernels::carafe_down", "carafe_kernels::carafe_down_backward", down=True,
                              layout=native_layout)
    register_carafe_op_family("carafe_kernels::carafe_down_fused", "carafe_kernels::carafe_down_fused_backward",
                              down=True, layout=native_layout)
