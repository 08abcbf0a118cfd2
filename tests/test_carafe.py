"""Every CARAFE backend against the float64 reference: forward and both gradients of `carafe` (plain)
and `carafe_fused` on a grid of shapes, dtypes and memory layouts; gradcheck; determinism; autocast;
NaN locality; torch.compile (forward mode, torch.func and second order: tests/test_autodiff.py).
Parametrised over the registry's (backend, device) cases; a backend that cannot run here is skipped
with the reason backend_status() gives.

Oracle: carafe_kernels.reference in float64 on CPU, run on the same (already rounded) input values.
Reference vs a scalar loop and the algebraic invariants live in tests/test_reference.py; bad inputs in
tests/test_validation.py; the op registrations (opcheck) in tests/test_ops.py.
"""
from __future__ import annotations

import os

import pytest
import torch
from conftest import (
    OPS,
    TOLERANCES,
    assert_close_to_oracle,
    backend_cases,
    forward_backward,
    gradient_of_one,
    make_inputs,
    max_abs_err,
    native_backend_cases,
    oracle,
    reference_op,
    run_op,
    shape_id,
    to_layout,
)

import carafe_kernels
from carafe_kernels import CARAFEPack, carafe, carafe_fused
from carafe_kernels.reference import normalize_mask_logits

BACKENDS = backend_cases()
DTYPE_NAMES = {torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16", torch.float16: "fp16"}

# (N, C, H, W, k, G, s)
TINY = (1, 1, 1, 1, 1, 1, 1)
ONE_PIXEL = (1, 2, 1, 1, 3, 1, 2)         # every tap but the centre falls outside the image
ODD = (2, 4, 3, 5, 3, 1, 2)
GROUPS = (2, 8, 7, 5, 5, 4, 2)
K7_BIG_WINDOW = (1, 6, 5, 4, 7, 2, 3)     # the window is wider than the image
S4 = (1, 4, 4, 3, 5, 2, 4)
S1 = (2, 3, 6, 6, 3, 1, 1)
G4_S3 = (1, 12, 9, 11, 5, 4, 3)
K1_G2 = (2, 4, 5, 7, 1, 2, 2)
EMPTY = (0, 4, 5, 5, 3, 1, 2)
MMCV = (2, 64, 3, 3, 5, 4, 2)             # mmcv's own test case
# Several blocks/tiles/threads' worth of work in every backend (CUDA/Triton grids, CPU parallel_for).
MULTI_BLOCK = (2, 64, 20, 24, 5, 2, 2)

SHAPES = [TINY, ONE_PIXEL, ODD, GROUPS, K7_BIG_WINDOW, S4, S1, G4_S3, K1_G2, EMPTY, MMCV, MULTI_BLOCK]
# Every shape in fp32; a subset in the other dtypes.
DTYPE_CASES = ([(shape, torch.float32) for shape in SHAPES]
               + [(shape, torch.float64) for shape in (ODD, GROUPS, EMPTY, MMCV)]
               + [(shape, dtype) for dtype in (torch.bfloat16, torch.float16)
                  for shape in (ODD, GROUPS, G4_S3, MMCV, MULTI_BLOCK)]
               # the other kernel sizes and scales in bf16: the cpu kernels' bf16 forward pairs taps
               # (AVX512-BF16 dot products), differently for each k
               + [(shape, torch.bfloat16) for shape in (K7_BIG_WINDOW, S4, S1, K1_G2)])


def _case_id(case) -> str:
    shape, dtype = case
    return f"{shape_id(*shape)}-{DTYPE_NAMES[dtype]}"


def _run(op, backend, k, G, s):
    return lambda f, m: run_op(op, backend, f, m, k, G, s)


_ORACLES: dict = {}


def _cached_oracle(op, shape, dtype, *, with_reference_errors: bool):
    """(oracle results, errors of the reference run in dtype or Nones) for the inputs make_inputs(shape)
    gives; computed once per (op, shape, dtype) and shared by every backend (the float64 reference is
    the slowest part of this file)."""
    N, C, H, W, k, G, s = shape
    features, second = make_inputs(*shape, fused=op == "fused", dtype=dtype)
    key = (op, shape, dtype)
    if key not in _ORACLES:
        _ORACLES[key] = oracle(op, features, second, k, G, s)
    want = _ORACLES[key]
    if not with_reference_errors:
        return want, (None, None, None)
    if key + ("errors",) not in _ORACLES:
        # The same computation by the reference in the same dtype: the error budget (docs/design.md#test-tolerances).
        ref = reference_op(op)
        got = forward_backward(lambda f, m: ref(f, m, k, G, s), features, second)
        _ORACLES[key + ("errors",)] = tuple(max_abs_err(a, b) for a, b in zip(got, want))
    return want, _ORACLES[key + ("errors",)]


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("case", DTYPE_CASES, ids=_case_id)
@pytest.mark.parametrize("op", OPS)
def test_forward_and_gradients_match_oracle(op, case, backend, device):
    shape, dtype = case
    N, C, H, W, k, G, s = shape
    features, second = make_inputs(*shape, fused=op == "fused", dtype=dtype, device=device)
    out, grad_f, grad_m = forward_backward(_run(op, backend, k, G, s), features, second)
    # For the reference itself the 2x bound would compare it with itself: TOLERANCES only.
    (want_out, want_f, want_m), ref_errs = _cached_oracle(
        op, shape, dtype, with_reference_errors=dtype in (torch.float16, torch.bfloat16) and backend != "reference")

    assert out.device.type == device
    assert_close_to_oracle(out, want_out, dtype, "output", ref_errs[0])
    assert_close_to_oracle(grad_f, want_f, dtype, "grad features", ref_errs[1])
    assert_close_to_oracle(grad_m, want_m, dtype, "grad masks" if op == "plain" else "grad logits", ref_errs[2])


LAYOUT_SHAPES = [GROUPS, G4_S3]
# (features layout, masks/logits layout)
LAYOUTS = [("channels_last", "channels_last"), ("strided", "strided"), ("transposed", "transposed"),
           ("channels_last", "strided"), ("strided", "channels_last")]


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("layouts", LAYOUTS, ids=lambda p: f"{p[0]}-{p[1]}")
@pytest.mark.parametrize("shape", LAYOUT_SHAPES, ids=lambda p: shape_id(*p))
@pytest.mark.parametrize("op", OPS)
def test_memory_layouts(op, shape, layouts, backend, device):
    """Non-contiguous and channels_last inputs give the values of contiguous ones (the "strided" layout is
    a view into a NaN-filled buffer, so a kernel that ignores strides reads NaN). The layout returned is
    each backend's: channels_last from cuda and triton for channels_last features (tests/test_ops.py,
    tests/test_triton.py), contiguous otherwise."""
    N, C, H, W, k, G, s = shape
    features, second = make_inputs(*shape, fused=op == "fused", device=device)
    features, second = to_layout(features, layouts[0]), to_layout(second, layouts[1])
    out, grad_f, grad_m = forward_backward(_run(op, backend, k, G, s), features, second)
    want = oracle(op, features, second, k, G, s)
    for got, expected, what in zip((out, grad_f, grad_m), want, ("output", "grad features", "grad masks")):
        assert_close_to_oracle(got, expected, torch.float32, what)


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("grad_layout", ["expanded", "channels_last", "strided"])
@pytest.mark.parametrize("op", OPS)
def test_grad_output_layouts(op, grad_layout, backend, device):
    """The incoming gradient may be an expanded scalar (out.sum().backward()) or any strided tensor."""
    N, C, H, W, k, G, s = GROUPS
    features, second = make_inputs(*GROUPS, fused=op == "fused", device=device)
    shape = (N, C, H * s, W * s)
    if grad_layout == "expanded":
        grad_out = torch.ones((), device=device).expand(shape)
    else:
        grad_out = to_layout(torch.randn(shape, device=device), grad_layout)
    got = forward_backward(_run(op, backend, k, G, s), features, second, grad_out)
    want = oracle(op, features, second, k, G, s, grad_out)
    for g, w, what in zip(got, want, ("output", "grad features", "grad masks")):
        assert_close_to_oracle(g, w, torch.float32, what)


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("shape", [ODD, GROUPS, K7_BIG_WINDOW, G4_S3, MULTI_BLOCK], ids=lambda p: shape_id(*p))
def test_fused_equals_plain_of_normalized_masks(shape, backend, device):
    """carafe_fused(f, logits) == carafe(f, softmax_per_group(pixel_shuffle(logits))), forward and the
    gradients (the plain side's logits gradient flows through pixel_shuffle and softmax by autograd)."""
    N, C, H, W, k, G, s = shape
    features, logits = make_inputs(*shape, fused=True, device=device)
    fused = forward_backward(lambda f, lg: carafe_fused(f, lg, k, G, s, backend=backend), features, logits)
    plain = forward_backward(
        lambda f, lg: carafe(f, normalize_mask_logits(lg, k, G, s), k, G, s, backend=backend), features, logits)
    for a, b, what in zip(fused, plain, ("output", "grad features", "grad logits")):
        torch.testing.assert_close(a, b, **TOLERANCES[torch.float32], msg=lambda m: f"{what}: {m}")


# --- gradcheck (float64) ------------------------------------------------------------------------------

GRADCHECK_SHAPES = [(1, 2, 3, 4, 3, 1, 2), (2, 4, 2, 3, 3, 2, 3), (1, 2, 2, 3, 5, 1, 1)]


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("shape", GRADCHECK_SHAPES, ids=lambda p: shape_id(*p))
@pytest.mark.parametrize("op", OPS)
def test_gradcheck(op, shape, backend, device):
    N, C, H, W, k, G, s = shape
    features, second = make_inputs(*shape, fused=op == "fused", dtype=torch.float64, device=device)
    features.requires_grad_(True)
    second.requires_grad_(True)
    # The reference's autograd is PyTorch's own: its Jacobian is checked by random projections
    # (fast_mode; the full check takes minutes for the fused op). The kernels get the full comparison.
    assert torch.autograd.gradcheck(_run(op, backend, k, G, s), (features, second), eps=1e-6, atol=1e-5,
                                    fast_mode=backend == "reference")


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_gradcheck_mmcv_case(backend, device):
    """mmcv's own gradcheck (tests/test_ops/test_carafe.py): features (2, 64, 3, 3), sigmoid masks
    (2, 100, 6, 6), k=5, G=4, s=2, with its eps and atol."""
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(2, 64, 3, 3, generator=gen, dtype=torch.float64).to(device).requires_grad_(True)
    masks = torch.randn(2, 100, 6, 6, generator=gen, dtype=torch.float64).sigmoid().to(device).requires_grad_(True)
    # fast_mode (random projections of the Jacobian): the full Jacobian has 8352 inputs x 4608 outputs
    # and takes minutes on 2 busy cores; the full comparison runs on the smaller shapes above.
    assert torch.autograd.gradcheck(_run("plain", backend, 5, 4, 2), (features, masks), eps=1e-4, atol=1e-4,
                                    fast_mode=True)


def test_gradgradcheck_reference():
    """The pure-PyTorch reference supports higher-order gradients (the native backends do not)."""
    features, logits = make_inputs(1, 2, 2, 3, 3, 1, 2, fused=True, dtype=torch.float64)
    features.requires_grad_(True)
    logits.requires_grad_(True)
    assert torch.autograd.gradgradcheck(
        lambda f, lg: carafe_fused(f, lg, 3, 1, 2, backend="reference"), (features, logits), fast_mode=True)


# --- determinism, NaN locality, autocast --------------------------------------------------------------

@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_deterministic(op, backend, device):
    """Two forward+backward runs are bitwise equal (the backward is a gather, no atomics)."""
    N, C, H, W, k, G, s = MULTI_BLOCK
    features, second = make_inputs(*MULTI_BLOCK, fused=op == "fused", device=device)
    grad_out = torch.randn(N, C, H * s, W * s, device=device)
    first = forward_backward(_run(op, backend, k, G, s), features, second, grad_out)
    again = forward_backward(_run(op, backend, k, G, s), features, second, grad_out)
    for a, b, what in zip(first, again, ("output", "grad features", "grad masks")):
        assert torch.equal(a, b), f"{what} differs between two identical runs"


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("wanted", [0, 1], ids=["features-only", "masks-only"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op", OPS)
def test_backward_of_one_input_equals_the_full_backwards(op, dtype, wanted, backend, device):
    """With one input not requiring grad, the backward computes only its gradient (the ops' output_mask,
    docs/design.md#the-call-path): bitwise the full backward's for the compiled kernels (deterministic,
    the same summation order); the reference (PyTorch's autograd) within rounding."""
    N, C, H, W, k, G, s = MULTI_BLOCK
    features, second = make_inputs(*MULTI_BLOCK, fused=op == "fused", dtype=dtype, device=device)
    grad_out = torch.randn(N, C, H * s, W * s, device=device).to(dtype)
    fn = _run(op, backend, k, G, s)
    full = forward_backward(fn, features, second, grad_out)
    grad = gradient_of_one(fn, features, second, wanted, grad_out)
    if backend == "reference":
        torch.testing.assert_close(grad, full[1 + wanted])
    else:
        assert torch.equal(grad, full[1 + wanted])


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("pixel", [(0, 1, 3, 2), (1, 4, 0, 0), (1, 7, 6, 7)], ids=["interior", "corner", "far-corner"])
@pytest.mark.parametrize("op", OPS)
def test_nan_spreads_only_within_its_windows(op, pixel, dtype, backend, device):
    """A NaN feature pixel makes exactly the outputs whose k x k window contains it NaN: same batch and
    channel, low-res position within r of it. No other output (channel, batch, tile) is touched. (bf16:
    the cpu kernels pair adjacent taps there; the pixel just outside a window must not leak in.)"""
    shape = N, C, H, W, k, G, s = (2, 8, 7, 8, 3, 2, 2)
    features, second = make_inputs(*shape, fused=op == "fused", dtype=dtype, device=device)
    n0, c0, y0, x0 = pixel
    features[n0, c0, y0, x0] = float("nan")
    out = run_op(op, backend, features, second, k, G, s).cpu()
    r = (k - 1) // 2
    ys = torch.arange(H * s) // s
    xs = torch.arange(W * s) // s
    window = ((ys - y0).abs() <= r)[:, None] & ((xs - x0).abs() <= r)[None, :]
    expected = torch.zeros(N, C, H * s, W * s, dtype=torch.bool)
    expected[n0, c0] = window
    assert torch.equal(torch.isnan(out), expected)


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("pixel", [(0, 1, 5, 9), (1, 4, 0, 0), (1, 7, 13, 41)], ids=["interior", "corner", "far-corner"])
@pytest.mark.parametrize("op", OPS)
def test_grad_output_nan_spreads_only_within_its_window(op, pixel, dtype, backend, device):
    """A NaN in grad_output at output pixel (Y, X) makes exactly the feature gradients of its k x k window
    NaN (same batch and channel, low-res positions within r of (Y // s, X // s)), at a width that is not a
    multiple of any vector length and at the image's far corner: the grad_features gather reads the
    padded columns around each row and no more."""
    shape = N, C, H, W, k, G, s = (2, 8, 7, 21, 5, 2, 2)
    features, second = make_inputs(*shape, fused=op == "fused", dtype=dtype, device=device)
    grad_out = torch.ones(N, C, H * s, W * s, dtype=dtype, device=device)
    n0, c0, Y, X = pixel
    grad_out[n0, c0, Y, X] = float("nan")
    _, grad_features, _ = forward_backward(lambda f, m: run_op(op, backend, f, m, k, G, s), features, second,
                                           grad_out)
    r = (k - 1) // 2
    window = (((torch.arange(H) - Y // s).abs() <= r)[:, None]
              & ((torch.arange(W) - X // s).abs() <= r)[None, :])
    expected = torch.zeros(N, C, H, W, dtype=torch.bool)
    expected[n0, c0] = window
    assert torch.equal(torch.isnan(grad_features.cpu()), expected)


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_autocast_mixed_dtypes(op, backend, device):
    """Under torch.autocast(bf16), fp32 features with bf16 masks/logits run in bf16 (like a conv) and
    the gradients come back in each input's own dtype."""
    N, C, H, W, k, G, s = GROUPS
    features, second = make_inputs(*GROUPS, fused=op == "fused", device=device)
    features = features.requires_grad_(True)
    second = second.to(torch.bfloat16).requires_grad_(True)
    with torch.autocast(device, dtype=torch.bfloat16):
        out = run_op(op, backend, features, second, k, G, s)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert features.grad.dtype == torch.float32 and second.grad.dtype == torch.bfloat16
    want = oracle(op, features.to(torch.bfloat16), second, k, G, s)[0]
    torch.testing.assert_close(out.double().cpu(), want, **TOLERANCES[torch.bfloat16])


@pytest.mark.parametrize("backend, device", [c for c in BACKENDS if c.values[0] != "triton"])  # (no fp64)
@pytest.mark.parametrize("op", OPS)
def test_autocast_leaves_float64_alone(op, backend, device):
    """As PyTorch's autocast does: float64 inputs stay float64 under torch.autocast(bf16) (they were cut
    to bf16), with the float64 result; one float64 input with a float32 one is refused."""
    N, C, H, W, k, G, s = GROUPS
    features, second = make_inputs(*GROUPS, fused=op == "fused", dtype=torch.float64, device=device)
    expected = run_op(op, backend, features, second, k, G, s)
    with torch.autocast(device, dtype=torch.bfloat16):
        out = run_op(op, backend, features, second, k, G, s)
        assert out.dtype == torch.float64
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
        with pytest.raises(TypeError, match="float64 inputs are not cast .* must both be float64 or neither, "
                                            "got torch.float64 and torch.float32"):
            run_op(op, backend, features, second.float(), k, G, s)


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_mixed_dtypes_outside_autocast_raise(op, backend, device):
    N, C, H, W, k, G, s = ODD
    features, second = make_inputs(*ODD, fused=op == "fused", device=device)
    name = "mask_logits" if op == "fused" else "masks"
    with pytest.raises(TypeError, match=f"features and {name} must have the same dtype"):
        run_op(op, backend, features, second.to(torch.bfloat16), k, G, s)


# --- torch.compile (slow on CPU: few cases) -----------------------------------------------------------

@pytest.mark.parametrize("backend, device", BACKENDS)
def test_compile_fused_matches_eager(backend, device):
    """torch.compile(fullgraph=True) through the public carafe_fused: validation and backend choice trace
    without graph breaks; forward and both gradients equal eager."""
    torch._dynamo.reset()
    N, C, H, W, k, G, s = ODD
    features, logits = make_inputs(*ODD, fused=True, device=device)

    def fn(f, lg):
        return carafe_fused(f, lg, k, G, s, backend=backend)

    eager = forward_backward(fn, features, logits)
    compiled = forward_backward(torch.compile(fn, fullgraph=True), features, logits)
    for a, b, what in zip(compiled, eager, ("output", "grad features", "grad logits")):
        torch.testing.assert_close(a, b, **TOLERANCES[torch.float32], msg=lambda m: f"{what}: {m}")


def test_compile_carafepack_matches_eager():
    """CARAFEPack (backend "auto": the fastest usable one) under torch.compile(fullgraph=True)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    module = CARAFEPack(8, scale_factor=2, up_kernel=3, compressed_channels=16)
    x = torch.randn(2, 8, 5, 6)

    def run(m):
        x_ = x.clone().requires_grad_(True)
        out = m(x_)
        out.backward(torch.ones_like(out))
        grads = [x_.grad] + [p.grad.clone() for p in module.parameters()]
        module.zero_grad(set_to_none=True)
        return out.detach(), grads

    eager_out, eager_grads = run(module)
    compiled_out, compiled_grads = run(torch.compile(module, fullgraph=True))
    torch.testing.assert_close(compiled_out, eager_out, **TOLERANCES[torch.float32])
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


# --- 64-bit offsets -------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("CARAFE_TEST_LARGE") != "1",
                    reason="needs ~25 GB (set CARAFE_TEST_LARGE=1; meant for a large GPU)")
@pytest.mark.parametrize("backend, device", native_backend_cases())
def test_large_tensor_offsets(backend, device):
    """Element offsets beyond 2**31 (mmcv's backward overflows int32 on large inputs).

    fp16 features (1, 9, 8192, 8192) with k=3, s=2: the logits (1, 36, 8192, 8192) and the output
    (1, 9, 16384, 16384) both hold > 2**31 elements. Checked on the last rows (whose offsets are the
    largest) against the reference on a crop. A CPU test of this size would need ~25 GB and minutes,
    so it is opt-in; smaller shapes cannot reach 2**31 in any index product the kernels form.
    """
    k, G, s = 3, 1, 2
    gen = torch.Generator(device=device).manual_seed(0)
    features = torch.randn(1, 9, 8192, 8192, device=device, dtype=torch.float16, generator=gen)
    logits = torch.randn(1, 36, 8192, 8192, device=device, dtype=torch.float16, generator=gen)
    features.requires_grad_(True)
    logits.requires_grad_(True)
    out = carafe_fused(features, logits, k, G, s, backend=backend)
    assert out.numel() > 2**31 and logits.numel() > 2**31
    rows = 8
    H = features.shape[2]
    crop_f = features.detach()[:, :, H - rows:].double().requires_grad_(True)
    crop_l = logits.detach()[:, :, H - rows:].double().requires_grad_(True)
    want = carafe_kernels.reference.carafe_fused_reference(crop_f, crop_l, k, G, s)
    r = (k - 1) // 2
    valid = slice(r * s, None)  # crop rows whose window does not reach the crop's top edge
    torch.testing.assert_close(out[:, :, (H - rows) * s:][:, :, valid].double(), want[:, :, valid],
                               **TOLERANCES[torch.float16])
    grad_out = torch.zeros_like(out)
    grad_out[:, :, -2:] = 1  # only the last output rows: their gradients live at the largest offsets
    grad_f, grad_l = torch.autograd.grad(out, (features, logits), grad_out)
    del out
    want_f, want_l = torch.autograd.grad(want, (crop_f, crop_l), grad_out[:, :, (H - rows) * s:].double())
    torch.testing.assert_close(grad_f[:, :, H - rows:].double(), want_f, **TOLERANCES[torch.float16])
    torch.testing.assert_close(grad_l[:, :, H - rows:].double(), want_l, **TOLERANCES[torch.float16])


CPU_REASON = carafe_kernels.backend_status()["cpu"]


@pytest.mark.skipif(CPU_REASON is not None, reason=f"cpu: {CPU_REASON}")
@pytest.mark.parametrize("op", OPS)
def test_cpu_tiny_calls_stay_on_one_thread(op):
    """A tiny call runs inline: fanning it out costs a wake-up per thread, and on a loaded machine a
    wait for the scheduler (docs/design.md#cost-model-and-floor). A large one still uses every thread."""
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for shape, expected in (((2, 16, 8, 8, 5, 1, 2), 1), ((2, 64, 64, 64, 5, 1, 2), 2)):
            N, C, H, W, k, G, s = shape
            features, second = make_inputs(*shape, fused=op == "fused")
            features.requires_grad_(True)
            out = run_op(op, "cpu", features, second, k, G, s)
            assert torch.ops.carafe_kernels._cpu_last_call_threads() == expected, (shape, "forward")
            out.sum().backward()
            assert torch.ops.carafe_kernels._cpu_last_call_threads() == expected, (shape, "backward")
    finally:
        torch.set_num_threads(previous)
