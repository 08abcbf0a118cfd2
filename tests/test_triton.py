"""The Triton backend (carafe_kernels/triton) against the float64 reference, and its op registrations.

On CPU these run only in Triton's interpreter, which must be on before Triton is imported:

    TRITON_INTERPRET=1 python -m pytest -m triton tests/test_triton.py

(shapes are tiny: the interpreter runs each program in numpy, one at a time). On a CUDA machine the same
file runs on CUDA tensors and adds the GPU-only checks (half-precision error on larger shapes,
torch.compile with Inductor, large shapes, 64-bit offsets). Without TRITON_INTERPRET and without CUDA
every test is skipped with the reason ``carafe_kernels.triton.unavailable_reason()`` gives.
"""
from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import (
    OPS,
    assert_close_to_oracle,
    forward_backward,
    gradient_of_one,
    make_inputs,
    max_abs_err,
    oracle,
    run_op,
    shape_id,
)

import carafe_kernels
from carafe_kernels import (BackendUnavailableError, CARAFEDownPack, CARAFEPack, backend_status, carafe,
                            carafe_down, carafe_down_flops, carafe_down_fused, carafe_flops, carafe_fused)
from carafe_kernels import triton as triton_backend
from carafe_kernels.contract import SCHEMAS, down_output_size
from carafe_kernels.reference import normalize_down_mask_logits

TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
REASON = backend_status()["triton"]
ON_GPU = HAS_CUDA and REASON is None
REPO = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.triton,
              pytest.mark.skipif(REASON is not None, reason=f"Triton backend unavailable: {REASON}")]
gpu_only = pytest.mark.skipif(not ON_GPU, reason="GPU-only check (the interpreter is too slow for it, or it "
                                                 "measures GPU behaviour); runs with a CUDA device")

OPS_NS = torch.ops.carafe_kernels
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}

# (N, C, H, W, k, G, s): tiny, but covering k in 1/3/5/7 (and the limits 11/8), s in 1/2/3/4, G in 1/2/4,
# odd sizes, a window wider than the image, more channels than one channel block (the mask-gradient
# reduction loop), more positions than one position block, and an empty batch.
SHAPES = [
    (1, 1, 1, 1, 1, 1, 1),      # everything 1
    (2, 4, 3, 5, 3, 2, 2),      # odd sizes, two groups
    (1, 8, 4, 3, 5, 4, 3),      # G=4, s=3 (sub-pixel axis padded 9 -> 16)
    (1, 6, 3, 4, 7, 2, 1),      # k=7 window wider than the image, s=1
    (2, 3, 5, 7, 1, 1, 2),      # k=1
    (1, 20, 3, 4, 3, 1, 2),     # 20 channels per group: several channel blocks
    (1, 2, 9, 9, 3, 1, 2),      # 81 positions: several position blocks
    (1, 4, 3, 2, 5, 2, 4),      # s=4
    (1, 2, 2, 3, 11, 1, 8),     # the limits: k=11, s=8
    (0, 4, 3, 3, 3, 1, 2),      # empty batch
]
# Larger shapes for the GPU: several blocks of every kind, realistic channel counts.
GPU_SHAPES = [
    (2, 64, 33, 40, 5, 1, 2),
    (2, 96, 17, 23, 5, 4, 2),
    (1, 256, 24, 24, 5, 1, 2),
    (1, 32, 16, 16, 7, 2, 4),
    (1, 16, 9, 11, 11, 1, 8),
]


def _ids(shapes):
    return [shape_id(*shape) for shape in shapes]


def _triton(op, k, G, s):
    return lambda f, m: run_op(op, "triton", f, m, k, G, s)


DOWN_OPS = {"plain": carafe_down, "fused": carafe_down_fused}


def _triton_down(op, k, G, s):
    return lambda f, m: DOWN_OPS[op](f, m, k, G, s, backend="triton")


def make_down_inputs(N, C, H, W, k, G, s, *, op, dtype=torch.float32, seed=0):
    """(features, masks or logits (N, G*k*k, ceil(H/s), ceil(W/s))) on DEVICE, float64 values rounded to
    dtype; plain masks softmax-normalised, as make_inputs does for CARAFE."""
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(N, C, H, W, generator=gen, dtype=torch.float64)
    second = torch.randn(N, G * k * k, down_output_size(H, s), down_output_size(W, s), generator=gen,
                         dtype=torch.float64)
    if op == "plain":
        second = normalize_down_mask_logits(second, k, G)
    return features.to(DEVICE, dtype), second.to(DEVICE, dtype)


def _down_oracle(op, features, second, k, G, s, grad_out):
    """The float64 reference's output and gradients for the down op on the same (rounded) values."""
    fn = carafe_down_fused if op == "fused" else carafe_down
    return forward_backward(lambda f, m: fn(f, m, k, G, s, backend="reference"),
                            features.detach().cpu().double(), second.detach().cpu().double(),
                            grad_out.detach().cpu().double())


def _check_against_oracle(op, shape, dtype, *, device=DEVICE, layout=None):
    N, C, H, W, k, G, s = shape
    features, second = make_inputs(*shape, fused=op == "fused", dtype=dtype, device=device)
    if layout is not None:
        features, second = layout(features), layout(second)
    got = forward_backward(_triton(op, k, G, s), features, second)
    want = oracle(op, features, second, k, G, s)
    reference_errs = [None] * 3
    if dtype != torch.float32:
        # docs/design.md#test-tolerances: error vs the float64 oracle at most 2x that of the reference
        # run in the same dtype.
        ref = forward_backward(lambda f, m: run_op(op, "reference", f, m, k, G, s), features, second)
        reference_errs = [max_abs_err(r, w) for r, w in zip(ref, want)]
    for what, actual, expected, ref_err in zip(("output", "grad features", f"grad {op} masks"), got, want,
                                               reference_errs):
        assert_close_to_oracle(actual, expected, dtype, f"{shape_id(*shape)} {what}", ref_err)


# --------------------------------------------------------------------------------------------------
# Correctness against the float64 oracle
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES, ids=_ids(SHAPES))
@pytest.mark.parametrize("op", OPS)
def test_forward_and_gradients_match_oracle_fp32(op, shape):
    _check_against_oracle(op, shape, torch.float32)


HALF_SHAPES = [(2, 4, 3, 5, 3, 2, 2), (1, 20, 3, 4, 3, 1, 2)]


@pytest.mark.parametrize("shape", HALF_SHAPES, ids=_ids(HALF_SHAPES))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=DTYPE_NAMES.get)
@pytest.mark.parametrize("op", OPS)
def test_half_dtypes_within_2x_of_reference(op, dtype, shape):
    _check_against_oracle(op, shape, dtype)


def test_non_contiguous_inputs():
    """channels_last features and masks, and strided (sliced) ones."""
    for op in OPS:
        _check_against_oracle(op, (1, 4, 3, 5, 3, 2, 2), torch.float32,
                              layout=lambda t: t.contiguous(memory_format=torch.channels_last))
        _check_against_oracle(op, (1, 4, 3, 5, 3, 2, 2), torch.float32, layout=lambda t: t[:, :, :, :].transpose(
            2, 3).contiguous().transpose(2, 3))


CL_SHAPES = [(2, 4, 3, 5, 3, 2, 2), (1, 8, 4, 3, 5, 4, 3), (1, 6, 3, 4, 7, 2, 1)]


@pytest.mark.parametrize("shape", CL_SHAPES, ids=_ids(CL_SHAPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_NAMES.get)
@pytest.mark.parametrize("op", OPS)
def test_channels_last_is_read_in_place_and_returned(op, dtype, shape, monkeypatch):
    # cares' CUDA default is bf16 + channels_last: the kernels read those tensors without a copy and
    # return the output and gradients in the same layout.
    N, C, H, W, k, G, s = shape
    cl = torch.channels_last
    features, second = (t.contiguous(memory_format=cl) for t in
                        make_inputs(*shape, fused=op == "fused", dtype=dtype, device=DEVICE))
    grad_out = torch.randn(N, C, H * s, W * s, dtype=dtype, device=DEVICE).contiguous(memory_format=cl)
    from carafe_kernels.triton import ops as triton_ops
    pointers = []
    real_wrap = triton_ops.wrap_triton

    def wrap(kernel):
        launcher = real_wrap(kernel)

        class Recording:
            def __getitem__(self, grid):
                def launch(*args):
                    pointers.append({a.data_ptr() for a in args if isinstance(a, torch.Tensor)})
                    return launcher[grid](*args)
                return launch
        return Recording()

    monkeypatch.setattr(triton_ops, "wrap_triton", wrap)
    got = forward_backward(_triton(op, k, G, s), features, second, grad_out)
    assert len(pointers) == 3                  # forward, mask gradient, features gradient
    # the kernels got the caller's tensors, not copies
    assert features.data_ptr() in pointers[0] and second.data_ptr() in pointers[0]
    assert {features.data_ptr(), second.data_ptr(), grad_out.data_ptr()} <= pointers[1]
    assert {second.data_ptr(), grad_out.data_ptr()} <= pointers[2]
    for what, tensor in zip(("output", "grad features", "grad masks"), got):
        assert tensor.is_contiguous(memory_format=cl), f"{what} is not channels_last"
    want = oracle(op, features, second, k, G, s, grad_out)
    ref = forward_backward(lambda f, m: run_op(op, "reference", f, m, k, G, s), features, second, grad_out)
    for what, actual, expected, reference in zip(("output", "grad features", "grad masks"), got, want, ref):
        assert_close_to_oracle(actual, expected, dtype, f"{shape_id(*shape)} channels_last {what}",
                               None if dtype == torch.float32 else max_abs_err(reference, expected))


def test_extreme_logits_stay_finite():
    """The fused softmax subtracts the running max: logits of +-80 (exp overflows fp32 without it) and
    -inf on some taps give finite, correct probabilities."""
    shape = (1, 2, 3, 3, 3, 1, 2)
    features, logits = make_inputs(*shape, fused=True, device=DEVICE)
    logits = logits * 80
    logits[:, ::3] = float("-inf")  # a third of the taps of every sub-pixel masked out entirely
    got = forward_backward(_triton("fused", 3, 1, 2), features, logits)
    want = oracle("fused", features, logits, 3, 1, 2)
    for what, actual, expected in zip(("output", "grad features", "grad logits"), got, want):
        assert torch.isfinite(actual).all(), what
        torch.testing.assert_close(actual.double().cpu(), expected, rtol=1e-5, atol=1e-5, msg=what)


def test_backward_is_deterministic():
    """No atomics: two backward passes are bitwise equal."""
    shape = (1, 20, 5, 4, 3, 2, 2) if not ON_GPU else (2, 128, 32, 32, 5, 2, 2)
    N, C, H, W, k, G, s = shape
    for op in OPS:
        features, second = make_inputs(*shape, fused=op == "fused", device=DEVICE)
        first = forward_backward(_triton(op, k, G, s), features, second)
        again = forward_backward(_triton(op, k, G, s), features, second)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


def _launch_recorder(monkeypatch):
    """Records (kernel, inside the device context) for every launch of carafe_kernels.triton.ops."""
    from carafe_kernels.triton import ops as triton_ops
    launches, inside = [], []
    real_guard, real_wrap = triton_ops._on_device, triton_ops.wrap_triton

    @contextlib.contextmanager
    def guard(tensor):
        with real_guard(tensor):
            inside.append(tensor.device)
            try:
                yield
            finally:
                inside.pop()

    def wrap(kernel):
        launches.append((kernel, list(inside)))
        return real_wrap(kernel)

    monkeypatch.setattr(triton_ops, "_on_device", guard)
    monkeypatch.setattr(triton_ops, "wrap_triton", wrap)
    return launches


def test_every_launch_runs_under_the_tensors_device(monkeypatch):
    launches = _launch_recorder(monkeypatch)
    for op in OPS:
        features, second = make_inputs(1, 4, 3, 3, 3, 2, 2, fused=op == "fused", device=DEVICE)
        forward_backward(_triton(op, 3, 2, 2), features, second)
        features, second = make_down_inputs(1, 4, 5, 5, 3, 2, 2, op=op)
        forward_backward(_triton_down(op, 3, 2, 2), features, second)
    assert len(launches) == 12                                    # forward + two backward kernels, per op
    assert all(devices == [features.device] for _, devices in launches)


@pytest.mark.parametrize("wanted", [0, 1], ids=["features-only", "masks-only"])
@pytest.mark.parametrize("shape", [(2, 4, 3, 5, 3, 2, 2), (1, 20, 3, 4, 3, 1, 2), (1, 8, 4, 3, 5, 4, 3)],
                         ids=lambda p: shape_id(*p))
@pytest.mark.parametrize("op", OPS)
def test_backward_of_one_input_launches_only_its_kernels(op, shape, wanted, monkeypatch):
    """With one input not requiring grad the backward launches the kernel of the other gradient alone
    (the fused features-only backward also runs the mask kernel, for the logsumexp only:
    GRAD_MASKS=False), and that gradient is bitwise the one of the full backward."""
    from carafe_kernels.triton import kernels

    N, C, H, W, k, G, s = shape
    features, second = make_inputs(*shape, fused=op == "fused", device=DEVICE)
    grad_out = torch.randn(N, C, H * s, W * s, device=DEVICE)
    full = forward_backward(_triton(op, k, G, s), features, second, grad_out)
    launches = _launch_recorder(monkeypatch)
    grad = gradient_of_one(_triton(op, k, G, s), features, second, wanted, grad_out)
    assert torch.equal(grad, full[1 + wanted])
    forward_kernel, mask_kernel, feat_kernel = kernels.launchers()
    backward = [mask_kernel] if wanted else ([mask_kernel, feat_kernel] if op == "fused" else [feat_kernel])
    assert [kernel for kernel, _ in launches] == [forward_kernel, *backward]


def test_device_context_is_the_tensors_device():
    from carafe_kernels.triton.ops import _on_device

    class OnSecondGpu:  # what a CUDA tensor on cuda:1 answers; entering the context would need the GPU
        is_cuda = True
        device = torch.device("cuda", 1)

    context = _on_device(OnSecondGpu())
    assert isinstance(context, torch.cuda.device) and context.idx == 1
    assert isinstance(_on_device(torch.zeros(1)), contextlib.nullcontext)


def test_deterministic_request_launches_fixed_configs(monkeypatch):
    from carafe_kernels.triton import kernels
    fixed = kernels.launchers(deterministic=True)
    assert all(len(kernel.configs) == 1 for kernel in fixed)      # nothing timed: the same choice everywhere
    assert kernels.launchers(deterministic=False) == (kernels.carafe_fwd_kernel, kernels.carafe_bwd_mask_kernel,
                                                      kernels.carafe_bwd_feat_kernel)
    fixed_down = kernels.launchers(deterministic=True, down=True)
    assert all(len(kernel.configs) == 1 for kernel in fixed_down)
    assert fixed_down[:2] == fixed[:2] and fixed_down[2] is not fixed[2]   # the down ops' own gather
    assert kernels.launchers(deterministic=False, down=True) == (
        kernels.carafe_fwd_kernel, kernels.carafe_bwd_mask_kernel, kernels.carafe_down_bwd_feat_kernel)
    launches = _launch_recorder(monkeypatch)
    features, second = make_inputs(1, 4, 3, 3, 3, 2, 2, fused=True, device=DEVICE)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        forward_backward(_triton("fused", 3, 2, 2), features, second)
    finally:
        torch.use_deterministic_algorithms(before)
    assert [kernel for kernel, _ in launches] == list(fixed)
    launches.clear()
    monkeypatch.setenv("CARAFE_TRITON_AUTOTUNE", "0")             # the GPU check's test stages
    forward_backward(_triton("fused", 3, 2, 2), features, second)
    assert [kernel for kernel, _ in launches] == list(fixed)


# --------------------------------------------------------------------------------------------------
# The ops: registrations, limits, public API
# --------------------------------------------------------------------------------------------------

def _op_args(name, shape=None, dtype=torch.float32, output_mask=(True, True)):
    """Arguments of op `name`: the default shape is (1, 4, 3, 3, 3, 2, 2) for CARAFE, (1, 4, 5, 6, 3, 2, 2)
    (odd, s does not divide it) for the down ops."""
    down = "_down" in name
    N, C, H, W, k, G, s = shape = shape or ((1, 4, 5, 6, 3, 2, 2) if down else (1, 4, 3, 3, 3, 2, 2))
    fused = "fused" in name
    if down:
        features, second = make_down_inputs(*shape, op="fused" if fused else "plain", dtype=dtype)
    else:
        features, second = make_inputs(*shape, fused=fused, dtype=dtype, device=DEVICE)
    if name.endswith("_backward"):
        out_h, out_w = (down_output_size(H, s), down_output_size(W, s)) if down else (H * s, W * s)
        grad = torch.randn(N, C, out_h, out_w, dtype=dtype, device=DEVICE)
        return (grad, features, second, k, G, s, list(output_mask))
    return (features.requires_grad_(), second.requires_grad_(), k, G, s)


OP_NAMES = ["triton_carafe", "triton_carafe_fused", "triton_carafe_backward", "triton_carafe_fused_backward",
            "triton_carafe_down", "triton_carafe_down_fused", "triton_carafe_down_backward",
            "triton_carafe_down_fused_backward"]
BACKWARD_OP_NAMES = [name for name in OP_NAMES if name.endswith("_backward")]


@pytest.mark.parametrize("name", OP_NAMES)
def test_opcheck(name):
    """Schema, autograd registration, fake tensor and AOT dispatch (dynamic shapes) of every op. All four
    utilities work in the interpreter too (there the ops are custom_ops, see carafe_kernels/triton/ops.py)."""
    triton_backend._ops()
    op = getattr(OPS_NS, name).default
    torch.library.opcheck(op, _op_args(name))


@pytest.mark.parametrize("output_mask", [(True, False), (False, True), (False, False)],
                         ids=["features-only", "masks-only", "none"])
@pytest.mark.parametrize("name", BACKWARD_OP_NAMES)
def test_opcheck_output_mask(name, output_mask):
    """The backward ops' None slots (a gradient not asked for) agree between the op and its fake kernel."""
    triton_backend._ops()
    torch.library.opcheck(getattr(OPS_NS, name).default, _op_args(name, output_mask=output_mask))


@pytest.mark.parametrize("name", BACKWARD_OP_NAMES)
def test_output_mask_defaults_to_both(name):
    triton_backend._ops()
    args = _op_args(name)
    op = getattr(OPS_NS, name).default
    for got, want in zip(op(*args[:-1]), op(*args)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("name", OP_NAMES)
def test_schema_is_the_contracts(name):
    """The Triton ops have the schemas of carafe_kernels.contract.SCHEMAS, like the C++ ops."""
    triton_backend._ops()
    base = name.removeprefix("triton_")
    assert str(getattr(OPS_NS, name).default._schema) == f"carafe_kernels::{name}{SCHEMAS[base]}"


def test_ops_registered_next_to_native_ops():
    """The Triton ops live in the carafe_kernels namespace whether or not the C++ library (which defines
    it with TORCH_LIBRARY) is loaded; see also test_namespace_shared_with_torch_library."""
    triton_backend._ops()
    for name in OP_NAMES:
        assert hasattr(OPS_NS, name)
    if carafe_kernels._native.HAS_NATIVE:
        assert hasattr(OPS_NS, "carafe") and hasattr(OPS_NS, "carafe_fused_backward")


def test_public_api_and_module_use_the_triton_ops():
    shape = (1, 4, 3, 5, 3, 2, 2)
    N, C, H, W, k, G, s = shape
    features, masks = make_inputs(*shape, fused=False, device=DEVICE)
    _, logits = make_inputs(*shape, fused=True, device=DEVICE)
    assert torch.equal(carafe(features, masks, k, G, s, backend="triton"),
                       OPS_NS.triton_carafe(features, masks, k, G, s))
    assert torch.equal(carafe_fused(features, logits, k, G, s, backend="triton"),
                       OPS_NS.triton_carafe_fused(features, logits, k, G, s))
    pack = CARAFEPack(C, s, up_kernel=k, up_group=G, backend="triton").to(DEVICE)
    ref = CARAFEPack(C, s, up_kernel=k, up_group=G, backend="reference").to(DEVICE)
    ref.load_state_dict(pack.state_dict())
    torch.testing.assert_close(pack(features), ref(features), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(k=13), ValueError, "kernel_size must be odd and in"),
    (dict(k=4), ValueError, "kernel_size must be odd and in"),
    (dict(s=9), ValueError, "scale_factor must be in"),
    (dict(dtype=torch.float64), TypeError, "features must be one of float16, bfloat16, float32"),
], ids=["k13", "k4", "s9", "fp64"])
def test_ops_raise_beyond_limits(kwargs, exc, match):
    """The contract's exception types (TypeError for a dtype, as the C++ ops raise)."""
    k, s, dtype = kwargs.get("k", 3), kwargs.get("s", 2), kwargs.get("dtype", torch.float32)
    features = torch.randn(1, 2, 3, 3, dtype=dtype, device=DEVICE)
    masks = torch.rand(1, k * k, 3 * s, 3 * s, dtype=dtype, device=DEVICE)
    logits = torch.randn(1, k * k * s * s, 3, 3, dtype=dtype, device=DEVICE)
    triton_backend._ops()
    with pytest.raises(exc, match=match):
        OPS_NS.triton_carafe(features, masks, k, 1, s)
    with pytest.raises(exc, match=match):
        OPS_NS.triton_carafe_fused(features, logits, k, 1, s)


def test_ops_raise_value_error_on_bad_shapes():
    triton_backend._ops()
    features = torch.randn(1, 4, 3, 3, device=DEVICE)
    with pytest.raises(ValueError, match="masks must be 6x6 spatially"):
        OPS_NS.triton_carafe(features, torch.rand(1, 9, 5, 6, device=DEVICE), 3, 1, 2)
    with pytest.raises(ValueError, match="group_size=3 must divide"):
        OPS_NS.triton_carafe(features, torch.rand(1, 27, 6, 6, device=DEVICE), 3, 3, 2)
    with pytest.raises(TypeError, match="same dtype"):
        OPS_NS.triton_carafe(features, torch.rand(1, 9, 6, 6, device=DEVICE).half(), 3, 1, 2)


def test_public_api_reports_unsupported_calls():
    """The registry keeps calls outside the Triton limits from reaching the kernels, with the reason."""
    features = torch.randn(1, 2, 3, 3, device=DEVICE)
    with pytest.raises(BackendUnavailableError, match="kernel_size <= 11"):
        carafe(features, torch.rand(1, 169, 6, 6, device=DEVICE), 13, 1, 2, backend="triton")
    with pytest.raises(BackendUnavailableError, match="scale_factor <= 8"):
        carafe(features, torch.rand(1, 9, 27, 27, device=DEVICE), 3, 1, 9, backend="triton")
    with pytest.raises(BackendUnavailableError, match="dtype"):
        carafe(features.double(), torch.rand(1, 9, 6, 6, device=DEVICE, dtype=torch.float64), 3, 1, 2,
               backend="triton")


def test_autocast_runs_in_the_autocast_dtype():
    features, masks = make_inputs(1, 4, 3, 3, 3, 2, 2, fused=False, device=DEVICE)
    triton_backend._ops()
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        out = OPS_NS.triton_carafe(features, masks.half(), 3, 2, 2)  # mixed inputs are cast, like a conv
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double().cpu(), oracle("plain", features, masks, 3, 2, 2)[0],
                               rtol=5e-2, atol=5e-2)


def test_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode
    features, logits = make_inputs(1, 4, 3, 3, 3, 2, 2, fused=True, device=DEVICE)
    with FlopCounterMode(display=False) as counter:
        carafe_fused(features, logits, 3, 2, 2, backend="triton")
    assert counter.get_total_flops() == carafe_flops(features.shape, 3, 2)


# --------------------------------------------------------------------------------------------------
# Content-aware downsampling (carafe_down, carafe_down_fused): the op suite of tests/test_carafe_down.py
# runs over the triton backend too (oracle in every dtype, layouts, empty tensors, determinism, autodiff,
# autocast, torch.compile); here what is particular to the Triton kernels.
# --------------------------------------------------------------------------------------------------

# (N, C, H, W, k, G, s): ragged last row and column, s = 3 with a 9-phase axis padded to 16, k = 11 with
# taps reaching two output pixels either side, s = 8, more channels than one channel block.
DOWN_SHAPES = [(2, 4, 7, 5, 3, 2, 2), (1, 6, 8, 7, 5, 3, 3), (1, 3, 13, 10, 11, 1, 4), (1, 2, 17, 9, 5, 2, 8),
               (1, 20, 6, 5, 3, 1, 2)]


@pytest.mark.parametrize("wanted", [0, 1], ids=["features-only", "masks-only"])
@pytest.mark.parametrize("shape", DOWN_SHAPES[:3], ids=_ids(DOWN_SHAPES[:3]))
@pytest.mark.parametrize("op", OPS)
def test_down_backward_of_one_input_launches_only_its_kernels(op, shape, wanted, monkeypatch):
    """As for CARAFE: the kernel of the gradient asked for alone (the fused features-only backward also
    runs the mask kernel for the logsumexp), giving bitwise the full backward's gradient."""
    from carafe_kernels.triton import kernels

    N, C, H, W, k, G, s = shape
    features, second = make_down_inputs(*shape, op=op)
    grad_out = torch.randn(N, C, down_output_size(H, s), down_output_size(W, s), device=DEVICE)
    full = forward_backward(_triton_down(op, k, G, s), features, second, grad_out)
    launches = _launch_recorder(monkeypatch)
    grad = gradient_of_one(_triton_down(op, k, G, s), features, second, wanted, grad_out)
    assert torch.equal(grad, full[1 + wanted])
    forward_kernel, mask_kernel, feat_kernel = kernels.launchers(down=True)
    assert feat_kernel.fn is kernels._carafe_down_bwd_feat
    backward = [mask_kernel] if wanted else ([mask_kernel, feat_kernel] if op == "fused" else [feat_kernel])
    assert [kernel for kernel, _ in launches] == [forward_kernel, *backward]


@pytest.mark.parametrize("shape", DOWN_SHAPES[:2], ids=_ids(DOWN_SHAPES[:2]))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_NAMES.get)
@pytest.mark.parametrize("op", OPS)
def test_down_channels_last_is_read_in_place_and_returned(op, dtype, shape, monkeypatch):
    N, C, H, W, k, G, s = shape
    cl = torch.channels_last
    features, second = (t.contiguous(memory_format=cl) for t in make_down_inputs(*shape, op=op, dtype=dtype))
    grad_out = torch.randn(N, C, down_output_size(H, s), down_output_size(W, s), dtype=dtype,
                           device=DEVICE).contiguous(memory_format=cl)
    from carafe_kernels.triton import ops as triton_ops
    pointers = []
    real_wrap = triton_ops.wrap_triton

    def wrap(kernel):
        launcher = real_wrap(kernel)

        class Recording:
            def __getitem__(self, grid):
                def launch(*args):
                    pointers.append({a.data_ptr() for a in args if isinstance(a, torch.Tensor)})
                    return launcher[grid](*args)
                return launch
        return Recording()

    monkeypatch.setattr(triton_ops, "wrap_triton", wrap)
    got = forward_backward(_triton_down(op, k, G, s), features, second, grad_out)
    assert len(pointers) == 3                  # forward, mask gradient, features gradient
    assert features.data_ptr() in pointers[0] and second.data_ptr() in pointers[0]
    assert {features.data_ptr(), second.data_ptr(), grad_out.data_ptr()} <= pointers[1]
    assert {second.data_ptr(), grad_out.data_ptr()} <= pointers[2]
    for what, tensor in zip(("output", "grad features", "grad masks"), got):
        assert tensor.is_contiguous(memory_format=cl), f"{what} is not channels_last"
    want = _down_oracle(op, features, second, k, G, s, grad_out)
    ref = forward_backward(lambda f, m: DOWN_OPS[op](f, m, k, G, s, backend="reference"), features, second,
                           grad_out)
    for what, actual, expected, reference in zip(("output", "grad features", "grad masks"), got, want, ref):
        assert_close_to_oracle(actual, expected, dtype, f"{shape_id(*shape)} channels_last {what}",
                               None if dtype == torch.float32 else max_abs_err(reference, expected))


def test_down_extreme_logits_stay_finite():
    """The fused softmax subtracts the running max: logits of +-80 and -inf on some taps give finite,
    correct probabilities in the forward and in both gradients (the gather recomputes them from lse)."""
    shape = (1, 2, 7, 6, 3, 1, 2)
    features, logits = make_down_inputs(*shape, op="fused")
    logits = logits * 80
    logits[:, ::3] = float("-inf")  # a third of the taps of every output pixel masked out entirely
    grad_out = torch.randn(1, 2, 4, 3, device=DEVICE)
    got = forward_backward(_triton_down("fused", 3, 1, 2), features, logits, grad_out)
    want = _down_oracle("fused", features, logits, 3, 1, 2, grad_out)
    for what, actual, expected in zip(("output", "grad features", "grad logits"), got, want):
        assert torch.isfinite(actual).all(), what
        torch.testing.assert_close(actual.double().cpu(), expected, rtol=1e-5, atol=1e-5, msg=what)


@pytest.mark.parametrize("shape", DOWN_SHAPES, ids=_ids(DOWN_SHAPES))
@pytest.mark.parametrize("op", OPS)
def test_down_gather_visits_every_reading_pair_once(op, shape):
    """grad features of every pixel is the sum over exactly the (output pixel, tap) pairs that read it:
    a grad_output of ones and masks of ones (plain) make it the count of such pairs, which a direct
    count gives (catches a gather that misses or doubles a phase, or reads a tap outside [0, k))."""
    N, C, H, W, k, G, s = shape
    Ho, Wo = down_output_size(H, s), down_output_size(W, s)
    r = (k - 1) // 2
    features = torch.randn(N, C, H, W, device=DEVICE, requires_grad=True)
    masks = torch.ones(N, G * k * k, Ho, Wo, device=DEVICE)
    if op == "fused":
        masks = torch.zeros_like(masks)  # uniform softmax: every tap 1/k^2
    out = DOWN_OPS[op](features, masks, k, G, s, backend="triton")
    (grad,) = torch.autograd.grad(out, features, torch.ones_like(out))
    # rows: how many (i, ky) with s*i + ky - r = y; columns alike; the count is their product
    rows = torch.zeros(H)
    for i in range(Ho):
        for ky in range(k):
            if 0 <= s * i + ky - r < H:
                rows[s * i + ky - r] += 1
    cols = torch.zeros(W)
    for j in range(Wo):
        for kx in range(k):
            if 0 <= s * j + kx - r < W:
                cols[s * j + kx - r] += 1
    expected = (rows[:, None] * cols[None, :]).expand(N, C, H, W) / (k * k if op == "fused" else 1)
    torch.testing.assert_close(grad.cpu(), expected.float(), rtol=1e-6, atol=1e-6)


def test_down_public_api_and_module_use_the_triton_ops():
    shape = (1, 4, 7, 6, 3, 2, 2)
    N, C, H, W, k, G, s = shape
    features, masks = make_down_inputs(*shape, op="plain")
    _, logits = make_down_inputs(*shape, op="fused")
    assert torch.equal(carafe_down(features, masks, k, G, s, backend="triton"),
                       OPS_NS.triton_carafe_down(features, masks, k, G, s))
    assert torch.equal(carafe_down_fused(features, logits, k, G, s, backend="triton"),
                       OPS_NS.triton_carafe_down_fused(features, logits, k, G, s))
    assert torch.equal(triton_backend.carafe_down_fused(features, logits, k, G, s),
                       OPS_NS.triton_carafe_down_fused(features, logits, k, G, s))
    pack = CARAFEDownPack(C, s, down_kernel=k, down_group=G, compressed_channels=8, backend="triton").to(DEVICE)
    ref = CARAFEDownPack(C, s, down_kernel=k, down_group=G, compressed_channels=8, backend="reference").to(DEVICE)
    ref.load_state_dict(pack.state_dict())
    torch.testing.assert_close(pack(features), ref(features), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(k=13), ValueError, "kernel_size must be odd and in"),
    (dict(k=4), ValueError, "kernel_size must be odd and in"),
    (dict(s=9), ValueError, "scale_factor must be in"),
    (dict(dtype=torch.float64), TypeError, "features must be one of float16, bfloat16, float32"),
    (dict(masks_h=3), ValueError, re.escape("must be ceil(5/2)xceil(5/2) = 3x3 spatially")),
], ids=["k13", "k4", "s9", "fp64", "shape"])
@pytest.mark.parametrize("name", ["triton_carafe_down", "triton_carafe_down_fused"])
def test_down_ops_raise_on_bad_calls(name, kwargs, exc, match):
    """Direct op calls skip the public checks: the ops check again, with the contract's exception types."""
    k, s, dtype = kwargs.get("k", 3), kwargs.get("s", 2), kwargs.get("dtype", torch.float32)
    features = torch.randn(1, 2, 5, 5, dtype=dtype, device=DEVICE)
    masks_h = kwargs.get("masks_h", down_output_size(5, s)) - (1 if "masks_h" in kwargs else 0)
    masks = torch.rand(1, k * k, masks_h, down_output_size(5, s), dtype=dtype, device=DEVICE)
    triton_backend._ops()
    with pytest.raises(exc, match=match):
        getattr(OPS_NS, name)(features, masks, k, 1, s)
    grad = torch.randn(1, 2, down_output_size(5, s), down_output_size(5, s), dtype=dtype, device=DEVICE)
    with pytest.raises(exc, match=match):
        getattr(OPS_NS, name + "_backward")(grad, features, masks, k, 1, s)


def test_down_backward_checks_grad_output():
    triton_backend._ops()
    args = _op_args("triton_carafe_down_backward")
    with pytest.raises(ValueError, match=re.escape("grad_output must have the output's shape (1, 4, 3, 3)")):
        OPS_NS.triton_carafe_down_backward(torch.randn(1, 4, 10, 12, device=DEVICE), *args[1:])


@pytest.mark.parametrize("down", [False, True], ids=["carafe", "down"])
def test_planes_beyond_32_bit_offsets_are_refused(down):
    """The kernels' in-plane offsets are int32: the largest plane a launch indexes (CARAFE's output, the
    down ops' features) must stay below 2**31 pixels; checked on meta tensors (shapes only, no memory)."""
    from carafe_kernels.triton.ops import _check
    H, W = (2 ** 16, 2 ** 15) if down else (2 ** 15, 2 ** 14)
    features = torch.empty(1, 1, H, W, device="meta")
    masks = torch.empty(1, 9, *((down_output_size(H, 2), down_output_size(W, 2)) if down else (2 * H, 2 * W)),
                        device="meta")
    what = f"a features plane of {H} x {W}" if down else f"an output plane of {2 * H} x {2 * W}"
    with pytest.raises(ValueError, match=f"op: {what} pixels exceeds the kernels' 32-bit in-plane offsets"):
        _check("op", features, masks, 3, 1, 2, fused=False, down=down)
    _check("op", features[:, :, :H // 2], masks[:, :, :masks.shape[2] // 2], 3, 1, 2, fused=False, down=down)


def test_down_public_api_reports_unsupported_calls():
    features = torch.randn(1, 2, 9, 9, device=DEVICE)
    with pytest.raises(BackendUnavailableError, match="kernel_size <= 11"):
        carafe_down(features, torch.rand(1, 169, 5, 5, device=DEVICE), 13, 1, 2, backend="triton")
    with pytest.raises(BackendUnavailableError, match="dtype"):
        carafe_down(features.double(), torch.rand(1, 9, 5, 5, device=DEVICE, dtype=torch.float64), 3, 1, 2,
                    backend="triton")


def test_down_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode
    features, logits = make_down_inputs(1, 4, 7, 6, 3, 2, 2, op="fused")
    features.requires_grad_(True)
    with FlopCounterMode(display=False) as counter:
        carafe_down_fused(features, logits, 3, 2, 2, backend="triton").sum().backward()
    assert counter.get_total_flops() == 2 * carafe_down_flops(features.shape, 3, 2)  # forward + grad features


# --------------------------------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------------------------------

# On a GPU: Inductor, which sees the kernels through triton_op/wrap_triton. In the interpreter the ops
# are opaque custom_ops; both the AOT-autograd path and Inductor (CPU codegen around the op) still run.
COMPILE_BACKENDS = ["inductor"] if ON_GPU else ["aot_eager", "inductor"]


@pytest.mark.parametrize("compile_backend", COMPILE_BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_torch_compile_fullgraph_matches_eager(op, compile_backend):
    shape = (2, 64, 17, 23, 5, 2, 2) if ON_GPU else (1, 4, 3, 5, 3, 2, 2)
    N, C, H, W, k, G, s = shape
    torch._dynamo.reset()
    features, second = make_inputs(*shape, fused=op == "fused", device=DEVICE)

    def fn(f, m):
        return run_op(op, "triton", f, m, k, G, s) * 2.0

    compiled = torch.compile(fn, fullgraph=True, backend=compile_backend)
    eager = forward_backward(fn, features, second)
    got = forward_backward(compiled, features, second)
    for a, b in zip(got, eager):
        # Inductor may autotune to another block shape than eager: same maths, another summation order.
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# Availability, optional Triton, namespace sharing (each in a fresh interpreter process where needed)
# --------------------------------------------------------------------------------------------------

SCRIPTS = Path(__file__).resolve().parent / "scripts"


def _run_script(name: str, *args: str, **env_overrides) -> subprocess.CompletedProcess:
    """Runs tests/scripts/<name> in a fresh interpreter (env_overrides: None removes a variable)."""
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for key, value in env_overrides.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    proc = subprocess.run([sys.executable, str(SCRIPTS / name), *args], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    return proc


def test_unavailable_reason_without_triton(monkeypatch):
    import importlib.util
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **kw: None if name == "triton" else real_find_spec(name, *a, **kw))
    assert "Triton is not installed" in triton_backend.unavailable_reason()


@pytest.mark.skipif(HAS_CUDA, reason="needs a machine without a CUDA device")
def test_unavailable_reason_without_cuda_or_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    assert "TRITON_INTERPRET=1 is not set" in triton_backend.unavailable_reason()


def test_import_without_triton_installed():
    """`import carafe_kernels` works without Triton; the backend says why and "auto" still works."""
    _run_script("import_without_triton.py")


def test_namespace_shared_with_torch_library():
    """The Triton ops live in the carafe_kernels namespace that TORCH_LIBRARY defines (simulated)."""
    _run_script("namespace_shared_with_torch_library.py", DEVICE, CARAFE_NO_NATIVE="1")


@pytest.mark.skipif(ON_GPU, reason="on a GPU the real torch.compile and kernel runs cover this")
def test_compiled_path_without_gpu():
    """What the interpreter cannot show: the triton_op path that torch.compile takes on a GPU (traced with
    fake tensors), and that the kernels compile for sm_90 (H100/H200) without register spills."""
    pytest.importorskip("triton.backends.nvidia")
    _run_script("triton_sm90_compile.py", TRITON_INTERPRET=None, CARAFE_NO_NATIVE="1", TRITON_DEFAULT_FP_FUSION="1")


# --------------------------------------------------------------------------------------------------
# GPU-only
# --------------------------------------------------------------------------------------------------

# Every GPU shape in fp32, the k=5/s=2 ones (the common CARAFE setting) also in fp16 and bf16. Each new
# (shape, dtype) autotunes, which compiles every config: the matrix is kept small for that reason.
GPU_CASES = ([(shape, torch.float32) for shape in GPU_SHAPES]
             + [(shape, dtype) for dtype in (torch.float16, torch.bfloat16) for shape in GPU_SHAPES[:3]])


@gpu_only
@pytest.mark.parametrize("case", GPU_CASES, ids=[f"{shape_id(*c[0])}-{DTYPE_NAMES[c[1]]}" for c in GPU_CASES])
@pytest.mark.parametrize("op", OPS)
def test_larger_shapes_on_gpu(op, case):
    shape, dtype = case
    _check_against_oracle(op, shape, dtype)


@gpu_only
@pytest.mark.slow
def test_64bit_offsets_on_gpu():
    """An output of more than 2**31 elements (mmcv's backward overflows int32 here): the last image of
    the batch, whose offsets all exceed 2**31, is checked against the reference run on that image."""
    C, H, W, k, G, s = 64, 256, 256, 5, 1, 2
    N = (2 ** 31) // (C * H * s * W * s) + 2             # enough images to pass 2**31 output elements
    # bf16: features + grad, logits + grad + fp32 accumulator, output + its grad
    needed = 2 * (2 * N * C * H * W + 4 * N * G * k * k * s * s * H * W + 2 * N * C * H * s * W * s)
    free, _ = torch.cuda.mem_get_info()
    if free < needed * 1.5:
        pytest.skip(f"needs about {needed * 1.5 / 2**30:.0f} GiB of free GPU memory")
    gen = torch.Generator(device="cuda").manual_seed(0)
    features = torch.randn(N, C, H, W, device="cuda", dtype=torch.bfloat16, generator=gen)
    logits = torch.randn(N, G * k * k * s * s, H, W, device="cuda", dtype=torch.bfloat16, generator=gen)
    features.requires_grad_(True)
    logits.requires_grad_(True)
    out = carafe_fused(features, logits, k, G, s, backend="triton")
    assert out.numel() > 2 ** 31
    grad = torch.ones_like(out)
    out.backward(grad)
    last = slice(N - 1, N)
    f_last = features.detach()[last].float().requires_grad_(True)
    l_last = logits.detach()[last].float().requires_grad_(True)
    ref = carafe_fused(f_last, l_last, k, G, s, backend="reference")
    ref.backward(grad[last].float())
    torch.testing.assert_close(out[last].float(), ref, rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(features.grad[last].float(), f_last.grad, rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(logits.grad[last].float(), l_last.grad, rtol=5e-2, atol=5e-2)
