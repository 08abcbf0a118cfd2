"""The CARAFE contract in one place: op schemas, limits, dtype rules and the argument checks.

Every Python entry point checks its arguments here: the public functions (``carafe_kernels.functional``,
which also parses the int arguments), the Triton op bodies and the fake kernels that torch.compile and
torch.export run (``carafe_kernels.ops``). The C++ ops check the same rules in csrc/carafe_checks.h
with the limits of csrc/carafe_common.h; tests/test_registry.py checks that those limits equal the ones
here, and tests/test_ops.py that every registered op has the schema written here.

One exception type per kind of error, on every path: ``TypeError`` for a wrong type or dtype,
``ValueError`` for a wrong shape, value or device. The design notes are docs/design.md.
"""
from __future__ import annotations

import numbers
from typing import Callable

import torch


__all__ = ["MAX_KERNEL_SIZE", "MAX_SCALE_FACTOR", "NATIVE_DTYPES", "TRITON_DTYPES", "SCHEMAS",
           "check_int", "check_arguments", "down_output_size", "expected_second_shape", "output_shape"]

# The largest kernel_size and scale_factor the compiled kernels (CPU, CUDA, Triton) accept. They bound
# the GPU kernels' register tiles and the CPU kernels' per-thread scratch (which grows as
# s*s*k*k*(W + k)); larger calls run on the reference backend. Same numbers as csrc/carafe_common.h.
MAX_KERNEL_SIZE = 11
MAX_SCALE_FACTOR = 8

# dtypes each kind of kernel computes in (fp16/bf16 accumulate in fp32). The reference takes any float.
NATIVE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# The schema of every CARAFE op, without its namespace; csrc/carafe.cpp declares the same for the C++
# ops, the Triton ops (triton_<name>) are defined from these strings, and tests check all of them.
# The backward ops take ATen's convolution_backward output_mask: bool[2] = (grad_features wanted,
# grad_masks wanted); a gradient not asked for is not computed and comes back as None (an undefined
# tensor), see docs/design.md#the-call-path. It defaults to both, so a call written without it (a direct
# caller, or a backward graph that torch.compile cached before it existed) keeps its meaning.
SCHEMAS: dict[str, str] = {
    "carafe": "(Tensor features, Tensor masks, int kernel_size, int group_size, int scale_factor) -> Tensor",
    "carafe_backward": ("(Tensor grad_output, Tensor features, Tensor masks, int kernel_size, int group_size, "
                        "int scale_factor, bool[2] output_mask=[True, True]) -> (Tensor grad_features, "
                        "Tensor grad_masks)"),
    "carafe_fused": ("(Tensor features, Tensor mask_logits, int kernel_size, int group_size, int scale_factor) "
                     "-> Tensor"),
    "carafe_fused_backward": ("(Tensor grad_output, Tensor features, Tensor mask_logits, int kernel_size, "
                              "int group_size, int scale_factor, bool[2] output_mask=[True, True]) "
                              "-> (Tensor grad_features, Tensor grad_mask_logits)"),
    # Content-aware downsampling (CARAFE++): the same signatures (the backward ops with the same output_mask),
    # masks / mask_logits and output of size (ceil(H/s), ceil(W/s)) (expected_second_shape(..., down=True),
    # output_shape(..., down=True)).
    "carafe_down": ("(Tensor features, Tensor masks, int kernel_size, int group_size, int scale_factor) "
                    "-> Tensor"),
    "carafe_down_backward": ("(Tensor grad_output, Tensor features, Tensor masks, int kernel_size, int group_size, "
                             "int scale_factor, bool[2] output_mask=[True, True]) -> (Tensor grad_features, "
                             "Tensor grad_masks)"),
    "carafe_down_fused": ("(Tensor features, Tensor mask_logits, int kernel_size, int group_size, "
                          "int scale_factor) -> Tensor"),
    "carafe_down_fused_backward": ("(Tensor grad_output, Tensor features, Tensor mask_logits, int kernel_size, "
                                   "int group_size, int scale_factor, bool[2] output_mask=[True, True]) "
                                   "-> (Tensor grad_features, Tensor grad_mask_logits)"),
}


def _require(cond, error: type[Exception], message: Callable[[], str]) -> None:
    """Raise error(message()) unless cond. A symbolic condition (fake tensors under torch.compile /
    torch.export with dynamic shapes) goes to torch._check_with, which records it as a guard or a
    runtime assert instead of specialising the shape."""
    if cond is True:
        return
    if isinstance(cond, bool):
        raise error(message())
    torch._check_with(error, cond, message)


def check_int(name: str, value, *, odd: bool = False) -> int:
    """value as an int >= 1 (odd when asked). Integral floats (2.0) and numpy ints are accepted, as
    mmcv accepts them; bools, strings and tensors are not."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, float)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"{name} must be an integer, got {value}")
    value = int(value)
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    if odd and value % 2 == 0:
        raise ValueError(f"{name} must be odd, got {value}")
    return value


def down_output_size(size: int, scale_factor: int) -> int:
    """ceil(size / s): the output size of a stride-s convolution with padding k // 2 (odd k).
    NB: (size + s - 1) // s, not -(-size // s): with symbolic sizes torch.onnx.export writes floor
    division as ONNX's Div, which truncates, so the negative form exported as floor(size / s)."""
    return (size + scale_factor - 1) // scale_factor


def expected_second_shape(features_shape, k: int, G: int, s: int, *, fused: bool, down: bool = False) -> tuple:
    """masks (N, G*k*k, H*s, W*s), or mask_logits (N, G*k*k*s*s, H, W) when fused. The down ops
    (content-aware downsampling): masks or mask_logits alike (N, G*k*k, ceil(H/s), ceil(W/s))."""
    N, _, H, W = features_shape
    if down:
        return (N, G * k * k, down_output_size(H, s), down_output_size(W, s))
    return (N, G * k * k * s * s, H, W) if fused else (N, G * k * k, H * s, W * s)


def output_shape(features_shape, s: int, *, down: bool = False) -> tuple:
    """The op's output shape: (N, C, H*s, W*s), or (N, C, ceil(H/s), ceil(W/s)) for the down ops."""
    N, C, H, W = features_shape
    return (N, C, down_output_size(H, s), down_output_size(W, s)) if down else (N, C, H * s, W * s)


def check_output_mask(output_mask, op: str | None = None) -> tuple[bool, bool]:
    """(grad_features wanted, grad_masks wanted) from a backward op's output_mask (bool[2]); ValueError
    naming the argument for another length (the schema's [2] is not enforced for every caller; the C++
    ops check the same in csrc/carafe_checks.h)."""
    pre = f"{op}: " if op else ""
    if len(output_mask) != 2:
        raise ValueError(f"{pre}output_mask must have 2 elements (grad_features, grad_masks), got "
                         f"{len(output_mask)}")
    return bool(output_mask[0]), bool(output_mask[1])


def _fast_accept(features, masks, k, G, s, fused, dtypes, limits, same_dtype, grad_output, down) -> bool:
    """True when a call with concrete shapes passes every check below, decided with a few cheap
    comparisons (the public API's per-call cost; docs/design.md#the-call-path). False sends the call
    through the checks one by one, which say what is wrong (or pass symbolic shapes to torch._check)."""
    fs, ms = features.shape, masks.shape
    if len(fs) != 4 or len(ms) != 4 or grad_output is not None:
        return False
    N, C, H, W = fs
    if type(N) is not int or type(C) is not int or type(H) is not int or type(W) is not int:
        return False  # symbolic (fake tensors with dynamic shapes)
    dtype = features.dtype
    if dtypes is None:
        if not (features.is_floating_point() and masks.is_floating_point()):
            return False
    elif dtype not in dtypes:
        return False
    if (same_dtype and masks.dtype != dtype) or features.device != masks.device:
        return False
    if k < 1 or k % 2 == 0 or s < 1 or G < 1 or C % G != 0:
        return False
    if limits and (k > MAX_KERNEL_SIZE or s > MAX_SCALE_FACTOR):
        return False
    if down:
        return ms == (N, G * k * k, down_output_size(H, s), down_output_size(W, s))
    expected = (N, G * k * k * s * s, H, W) if fused else (N, G * k * k, H * s, W * s)
    return ms == expected


def check_arguments(features, masks, k: int, G: int, s: int, *, fused: bool, op: str | None = None,
                    dtypes: tuple[torch.dtype, ...] | None = None, limits: bool = False,
                    same_dtype: bool = True, grad_output=None, down: bool = False) -> None:
    """Checks one call against the contract; raises TypeError/ValueError naming the argument and shapes.

    features / masks: the two inputs (masks are mask_logits when fused), any tensors (fake ones too).
    k, G, s: ints. op: prefixes the messages (the op name, for direct op calls). dtypes: the dtypes
    the kernels compute in (None: any floating point). limits: enforce MAX_KERNEL_SIZE and
    MAX_SCALE_FACTOR (the compiled kernels). same_dtype: features and masks must share their dtype
    (False under torch.autocast, which casts both). grad_output: checked against the output's shape
    and dtype when given (backward ops). down: the content-aware downsampling ops (carafe_down,
    carafe_down_fused), whose masks/mask_logits are (N, G*k*k, ceil(H/s), ceil(W/s)).
    """
    if _fast_accept(features, masks, k, G, s, fused, dtypes, limits, same_dtype, grad_output, down):
        return
    pre = f"{op}: " if op else ""
    m = "mask_logits" if fused else "masks"
    for name, t in (("features", features), (m, masks)):
        _require(t.dim() == 4, ValueError,
                 lambda: f"{pre}{name} must be 4-D (N, C, H, W), got shape {tuple(t.shape)}")
        if dtypes is None:
            _require(t.is_floating_point(), TypeError,
                     lambda: f"{pre}{name} must be a floating-point tensor, got dtype {t.dtype}")
    if dtypes is not None:
        _require(features.dtype in dtypes, TypeError,
                 lambda: f"{pre}features must be one of {', '.join(str(d)[6:] for d in dtypes)}, "
                         f"got {features.dtype}")
    if same_dtype:
        _require(features.dtype == masks.dtype, TypeError,
                 lambda: f"{pre}features and {m} must have the same dtype (outside torch.autocast), got "
                         f"{features.dtype} and {masks.dtype}")
    _require(features.device == masks.device, ValueError,
             lambda: f"{pre}features and {m} must be on the same device, got {features.device} and {masks.device}")
    bound = f"in [1, {MAX_KERNEL_SIZE}]" if limits else ">= 1"
    _require(k >= 1 and k % 2 == 1 and (not limits or k <= MAX_KERNEL_SIZE), ValueError,
             lambda: f"{pre}kernel_size must be odd and {bound}, got {k}")
    _require(s >= 1 and (not limits or s <= MAX_SCALE_FACTOR), ValueError,
             lambda: f"{pre}scale_factor must be in [1, {MAX_SCALE_FACTOR}], got {s}" if limits
             else f"{pre}scale_factor must be >= 1, got {s}")
    N, C, H, W = features.shape
    _require(G >= 1 and C % G == 0, ValueError,
             lambda: f"{pre}group_size={G} must divide the channels of features {tuple(features.shape)}")
    N2, C2, H2, W2 = masks.shape
    shapes = f"(features {tuple(features.shape)}, {m} {tuple(masks.shape)})"
    _require(N2 == N, ValueError, lambda: f"{pre}{m} batch {N2} != features batch {N} {shapes}")
    _, C_want, H_want, W_want = expected_second_shape(features.shape, k, G, s, fused=fused, down=down)
    what = f"G*k*k*s*s = {G}*{k}*{k}*{s}*{s}" if fused and not down else f"G*k*k = {G}*{k}*{k}"
    _require(C2 == C_want, ValueError,
             lambda: f"{pre}{m} must have {what} = {C_want} channels, got shape {tuple(masks.shape)} "
                     f"(features {tuple(features.shape)})")
    for got, want in ((H2, H_want), (W2, W_want)):  # one check each: `and` would specialise symbolic sizes
        _require(got == want, ValueError,
                 lambda: f"{pre}{m} must be {f'ceil({H}/{s})xceil({W}/{s}) = ' if down else ''}{H_want}x{W_want} "
                         f"spatially for features {tuple(features.shape)} "
                         f"and scale_factor={s}, got shape {tuple(masks.shape)}")
    if grad_output is not None:
        out_shape = output_shape(features.shape, s, down=down)
        _require(grad_output.dim() == 4, ValueError,
                 lambda: f"{pre}grad_output must have the output's shape {out_shape}, got {tuple(grad_output.shape)}")
        for got, want in zip(grad_output.shape, out_shape):
            _require(got == want, ValueError,
                     lambda: f"{pre}grad_output must have the output's shape {out_shape}, got "
                             f"{tuple(grad_output.shape)}")
        _require(grad_output.dtype == features.dtype, TypeError,
                 lambda: f"{pre}grad_output must have the dtype of features ({features.dtype}), got "
                         f"{grad_output.dtype}")
