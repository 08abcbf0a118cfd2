"""Content-aware downsampling (CARAFE++) as a public op: carafe_down / carafe_down_fused on every backend
that has them (the float64 reference, the cpu kernels and the Triton kernels), through the contract, the
registry and the call plans, and the CARAFEDownPack module.

The Triton cases run on CPU only under Triton's interpreter, in their own process (it must be on before
Triton is imported), and there they compute in float32 (the kernels have no float64):
    TRITON_INTERPRET=1 python -m pytest -m triton tests/test_carafe_down.py

Every backend runs the op suite as CARAFE's does (tests/test_carafe.py): forward and both gradients
against the float64 oracle (odd sizes, groups, k wider than the image, s = 1 and 3, every dtype), gradcheck,
memory layouts (channels_last, strided, transposed), empty tensors, determinism (and thread-count
independence for the cpu kernels), NaN locality, every autodiff mode, autocast, torch.compile, and for
the native ops torch.library.opcheck, schemas, the C++ argument checks and FLOP formulas. The reference
against the scalar-loop definition is tests/test_reference_down.py.
"""
from __future__ import annotations

import dataclasses
import math
import re

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from conftest import TOLERANCES, assert_close_to_oracle, backend_cases, max_abs_err, to_layout

import carafe_kernels
from carafe_kernels import (BackendUnavailableError, CARAFEDownPack, backend_status, carafe_down, carafe_down_flops,
                            carafe_down_fused)
from carafe_kernels.contract import SCHEMAS
from carafe_kernels.naive import carafe_down_fused_naive, carafe_down_naive
from carafe_kernels.reference import (carafe_down_fused_reference, carafe_down_reference, carafe_down_unfold,
                                      down_output_size, normalize_down_mask_logits)
from carafe_kernels.registry import BACKENDS, select_backend

OPS = {"plain": carafe_down, "fused": carafe_down_fused}
REFERENCE = {"plain": carafe_down_reference, "fused": carafe_down_fused_reference}
SECOND = {"plain": "masks", "fused": "mask_logits"}
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
       torch.float16: dict(rtol=2e-3, atol=2e-3)}

# The (backend, device) cases whose backend has the down ops (unavailable ones are skipped with the reason);
# Triton on CPU under its interpreter too (the shapes here are small enough for it).
BACKEND_CASES = [case for case in backend_cases(include_triton_interpret=True)
                 if BACKENDS[case.values[0]].carafe_down is not None]
NATIVE_CASES = [case for case in BACKEND_CASES if case.values[0] != "reference"]
NATIVE_REASON = backend_status()["cpu"]
needs_native = pytest.mark.skipif(NATIVE_REASON is not None, reason=f"native ops unavailable: {NATIVE_REASON}")

# (N, C, H, W, k, G, s)
ODD = (2, 4, 7, 5, 3, 2, 2)           # sizes s does not divide
S3 = (1, 6, 8, 7, 5, 3, 3)
BIG_K = (1, 2, 3, 2, 7, 1, 2)         # window wider than the image
S1 = (2, 3, 5, 6, 3, 1, 1)
ONE_PIXEL = (1, 2, 1, 1, 3, 1, 2)
K11_S4 = (1, 3, 13, 10, 11, 1, 4)     # the largest kernel: taps reach 2 output columns either side
S8 = (1, 2, 17, 9, 5, 2, 8)           # the largest scale factor, ragged last row and column
K1 = (2, 4, 6, 9, 1, 2, 2)
MMCV_LIKE = (2, 64, 6, 6, 5, 4, 2)
# Several tasks, channel blocks (> 16 channels per group) and vectors per row in the cpu kernels.
MULTI_BLOCK = (2, 40, 24, 37, 5, 2, 2)
SHAPES = [ODD, S3, BIG_K, S1, ONE_PIXEL, (1, 1, 1, 1, 1, 1, 1)]
ORACLE_SHAPES = SHAPES + [K11_S4, S8, K1, MMCV_LIKE, MULTI_BLOCK]
DTYPE_CASES = ([(shape, torch.float32) for shape in ORACLE_SHAPES]
               + [(shape, torch.float64) for shape in (ODD, S3, K11_S4, MMCV_LIKE)]
               + [(shape, dtype) for dtype in (torch.bfloat16, torch.float16) for shape in (ODD, S3, MMCV_LIKE,
                                                                                          MULTI_BLOCK)])
DTYPE_NAMES = {torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16", torch.float16: "fp16"}


def shape_id(shape):
    return "N{}-C{}-H{}-W{}-k{}-g{}-s{}".format(*shape)


def make_inputs(N, C, H, W, k, G, s, *, op="plain", dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(N, C, H, W, generator=generator, dtype=torch.float64)
    second = torch.randn(N, G * k * k, down_output_size(H, s), down_output_size(W, s), generator=generator,
                         dtype=torch.float64)
    if op == "plain":
        second = normalize_down_mask_logits(second, k, G)
    return features.to(dtype), second.to(dtype)


def naive(op, features, second, k, G, s):
    fn = carafe_down_naive if op == "plain" else carafe_down_fused_naive
    return fn(features.double(), second.double(), k, G, s)


def forward_backward(fn, features, second, grad_out=None):
    """(out, grad_features, grad_second) of fn on leaf copies of the inputs (layouts kept), for grad_out
    (default: a fixed random tensor)."""
    features = features.detach().requires_grad_(True)
    second = second.detach().requires_grad_(True)
    out = fn(features, second)
    if grad_out is None:
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1234), dtype=torch.float64).to(out)
    grads = torch.autograd.grad(out, (features, second), grad_out)
    return (out.detach(), *grads)


def oracle(op, features, second, k, G, s):
    """The float64 reference's forward and gradients on the same (rounded) values."""
    return forward_backward(lambda f, m: REFERENCE[op](f, m, k, G, s), features.detach().double(),
                            second.detach().double())


def on(backend, op, k, G, s):
    return lambda f, m: OPS[op](f, m, k, G, s, backend=backend)


def exact_dtype(backend):
    """The dtype of the exact comparisons (autodiff against the reference): float64 where the backend
    computes in it, else float32 (Triton), compared with exact_tolerance."""
    return torch.float64 if torch.float64 in BACKENDS[backend].dtypes else torch.float32


def exact_tolerance(dtype):
    return dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)


def skip_unless_computes_in(backend, dtype):
    if dtype not in BACKENDS[backend].dtypes:
        pytest.skip(f"the {backend} kernels have no {dtype} (the registry refuses the call)")


# --- the op against the definition ------------------------------------------------------------------

@pytest.mark.parametrize("backend, device", BACKEND_CASES)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("op", OPS)
def test_matches_the_float64_definition(op, shape, backend, device):
    N, C, H, W, k, G, s = shape
    features, second = make_inputs(*shape, op=op)
    out = OPS[op](features.to(device), second.to(device), k, G, s, backend=backend)
    assert out.shape == (N, C, math.ceil(H / s), math.ceil(W / s)) and out.dtype == torch.float32
    torch.testing.assert_close(out.double().cpu(), naive(op, features, second, k, G, s), **TOL[torch.float32])


@pytest.mark.parametrize("backend, device", BACKEND_CASES)
@pytest.mark.parametrize("case", DTYPE_CASES, ids=lambda c: f"{shape_id(c[0])}-{DTYPE_NAMES[c[1]]}")
@pytest.mark.parametrize("op", OPS)
def test_forward_and_gradients_match_oracle(op, case, backend, device):
    """Output and both gradients within the suite's tolerance table of the float64 oracle; in fp16/bf16
    also at most 2x the error of the reference run in the same dtype (docs/design.md#test-tolerances)."""
    shape, dtype = case
    skip_unless_computes_in(backend, dtype)
    N, C, H, W, k, G, s = shape
    features, second = make_inputs(*shape, op=op, dtype=dtype)
    got = forward_backward(on(backend, op, k, G, s), features.to(device), second.to(device))
    want = oracle(op, features, second, k, G, s)
    errors = [None] * 3
    if dtype in (torch.float16, torch.bfloat16) and backend != "reference":
        same_dtype = forward_backward(on("reference", op, k, G, s), features, second)
        errors = [max_abs_err(a, b) for a, b in zip(same_dtype, want)]
    for g, w, e, what in zip(got, want, errors, ("output", "grad features", f"grad {SECOND[op]}")):
        assert_close_to_oracle(g.cpu(), w, dtype, what, e)


@pytest.mark.parametrize("backend, device", BACKEND_CASES)
@pytest.mark.parametrize("shape", [ODD, S3, (1, 2, 5, 4, 5, 1, 2)], ids=shape_id)
@pytest.mark.parametrize("op", OPS)
def test_gradcheck(op, shape, backend, device):
    N, C, H, W, k, G, s = shape
    dtype = exact_dtype(backend)
    features, second = make_inputs(*shape, op=op, dtype=dtype)
    inputs = (features.to(device).requires_grad_(), second.to(device).requires_grad_())
    if dtype == torch.float64:
        assert torch.autograd.gradcheck(on(backend, op, k, G, s), inputs)
    else:
        # float32 (Triton): finite differences with a larger step and tolerance (the plain op is bilinear,
        # the fused one smooth), along random directions (fast_mode: a few calls, for the interpreter).
        with pytest.warns(UserWarning, match="not a double precision"):
            assert torch.autograd.gradcheck(on(backend, op, k, G, s), inputs, eps=1e-3, atol=1e-3, rtol=1e-3,
                                            fast_mode=True)


@pytest.mark.parametrize("backend, device", BACKEND_CASES)
def test_fused_equals_plain_of_softmaxed_logits(backend, device):
    N, C, H, W, k, G, s = S3
    features, logits = make_inputs(*S3, op="fused")
    features, logits = features.to(device), logits.to(device)
    masks = logits.view(N, G, k * k, *logits.shape[2:]).softmax(dim=2).view_as(logits)
    torch.testing.assert_close(carafe_down_fused(features, logits, k, G, s, backend=backend),
                               carafe_down(features, masks, k, G, s, backend=backend))


@pytest.mark.parametrize("backend, device", BACKEND_CASES)
def test_uniform_masks_give_average_pooling(backend, device):
    """The documented semantics on a case with a known answer: masks 1/k^2 everywhere are
    avg_pool2d(k, stride=s, padding=k//2, count_include_pad=True)."""
    features = torch.randn(2, 3, 9, 8, device=device)
    masks = torch.full((2, 25, 5, 4), 1 / 25, device=device)
    torch.testing.assert_close(carafe_down(features, masks, 5, 1, 2, backend=backend),
                               F.avg_pool2d(features, 5, stride=2, padding=2, count_include_pad=True))


LAYOUTS = [("channels_last", "channels_last"), ("strided", "strided"), ("transposed", "transposed"),
           ("channels_last", "strided"), ("contiguous", "channels_last")]


@pytest.mark.parametrize("backend, device", BACKEND_CASES)
@pytest.mark.parametrize("layouts", LAYOUTS, ids=lambda p: f"{p[0]}-{p[1]}")
@pytest.mark.parametrize("op", OPS)
def test_memory_layouts(op, layouts, backend, device):
    """channels_last, strided (a view into a NaN-filled buffer: a kernel that ignores strides reads NaN)
    and transposed inputs give the contiguous result and gradients."""
    N, C, H, W, k, G, s = S3
    features, second = make_inputs(*S3, op=op)
    f, m = to_layout(features.to(device), layouts[0]), to_layout(second.to(device), layouts[1])
    got = forward_backward(on(backend, op, k, G, s), f, m)
    want = oracle(op, features, second, k, G, s)
    for g, w, what in zip(got, want, ("output", "grad features", "grad masks")):
        assert_close_to_oracle(g.cpu(), w, torch.float32, what)


@pytest.mark.parametrize("backend, device", BACKEND_CASES)
@pytest.mark.parametrize("op", OPS)
def test_channels_last_grad_output(op, backend, device):
    """A channels_last gradient arriving from the next layer (a conv's) gives the same gradients."""
    N, C, H, W, k, G, s = ODD
    features, second = make_inputs(*ODD, op=op)
    features, second = features.to(device), second.to(device)
    grad = torch.randn(N, C, 4, 3, device=device)
    want = forward_backward(on(backend, op, k, G, s), features, second, grad)
    got = forward_backward(on(backend, op, k, G, s), features, second,
                           grad.contiguous(memory_format=torch.channels_last))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("backend, device", BACKEND_CASES)
@pytest.mark.parametrize("empty", ["N0", "C0", "H0"])
@pytest.mark.parametrize("op", OPS)
def test_empty_tensors(op, empty, backend, device):
    N, C, H = {"N0": (0, 4, 5), "C0": (2, 0, 5), "H0": (2, 4, 0)}[empty]
    G = 2 if C else 1
    features = torch.randn(N, C, H, 7, device=device, requires_grad=True)
    second = torch.randn(N, G * 9, down_output_size(H, 2), 4, device=device, requires_grad=True)
    out = OPS[op](features, second, 3, G, 2, backend=backend)
    assert out.shape == (N, C, down_output_size(H, 2), 4)
    out.sum().backward()
    assert features.grad.shape == features.shape and second.grad.shape == second.shape
    assert not second.grad.any()  # C = 0: no channel contributes to the masks' gradient


@pytest.mark.parametrize("backend, device", BACKEND_CASES)
@pytest.mark.parametrize("op", OPS)
def test_deterministic(op, backend, device):
    """Two forward+backward runs are bitwise equal (the backward is a gather, no atomics)."""
    N, C, H, W, k, G, s = MULTI_BLOCK
    features, second = make_inputs(*MULTI_BLOCK, op=op)
    features, second = features.to(device), second.to(device)
    first = forward_backward(on(backend, op, k, G, s), features, second)
    again = forward_backward(on(backend, op, k, G, s), features, second)
    for a, b, what in zip(first, again, ("output", "grad features", "grad masks")):
        assert torch.equal(a, b), f"{what} differs between two identical runs"


@pytest.mark.parametrize("op", OPS)
def test_cpu_results_do_not_depend_on_the_thread_count(op):
    """The cpu kernels' tasks own disjoint outputs with a fixed summation order: 1 and 2 threads give the
    same bits (a shape large enough to be split among threads)."""
    if NATIVE_REASON is not None:
        pytest.skip(f"native ops unavailable: {NATIVE_REASON}")
    shape = N, C, H, W, k, G, s = (2, 64, 64, 64, 5, 2, 2)
    features, second = make_inputs(*shape, op=op)
    previous = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(forward_backward(on("cpu", op, k, G, s), features, second))
            if threads == 2:
                assert torch.ops.carafe_kernels._cpu_last_call_threads() == 2
    finally:
        torch.set_num_threads(previous)
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend, device", BACKEND_CASES)
@pytest.mark.parametrize("pixel", [(0, 1, 3, 2), (1, 4, 0, 0), (1, 7, 6, 8), (0, 0, 5, 7)],
                         ids=["interior", "corner", "far-corner", "odd-row-and-column"])
@pytest.mark.parametrize("op", OPS)
def test_nan_spreads_only_within_its_windows(op, pixel, backend, device):
    """A NaN feature pixel makes exactly the outputs whose k x k window contains it NaN: same batch and
    channel, |s*i - y0| <= r and |s*j - x0| <= r. No other output is touched."""
    shape = N, C, H, W, k, G, s = (2, 8, 7, 9, 3, 2, 2)
    features, second = make_inputs(*shape, op=op)
    n0, c0, y0, x0 = pixel
    features[n0, c0, y0, x0] = float("nan")
    out = OPS[op](features.to(device), second.to(device), k, G, s, backend=backend).cpu()
    r = (k - 1) // 2
    rows = (torch.arange(down_output_size(H, s)) * s - y0).abs() <= r
    cols = (torch.arange(down_output_size(W, s)) * s - x0).abs() <= r
    expected = torch.zeros(out.shape, dtype=torch.bool)
    expected[n0, c0] = rows[:, None] & cols[None, :]
    assert torch.equal(torch.isnan(out), expected)


@pytest.mark.parametrize("backend, device", NATIVE_CASES)
def test_masks_of_padded_taps_contribute_nothing(backend, device):
    """The contract's zero padding in the kernels: a tap outside the image contributes zero, whatever its
    mask holds (an inf there must not turn into 0 * inf = NaN; the CARAFE cpu kernels do the same). The
    reference multiplies its zero-padded features, so it is not run here."""
    features, masks = make_inputs(*ODD)
    masks = masks.clone()
    masks[:, 0, 0, :] = float("inf")   # tap (0, 0) of output row 0 reads feature row -1
    masks[:, 8, :, -1] = float("inf")  # tap (2, 2) of the last column reads column 2*2 + 1 = 5 = W
    out = carafe_down(features.to(device), masks.to(device), 3, 2, 2, backend=backend).cpu()
    finite = masks.masked_fill(torch.isinf(masks), 0.0)
    torch.testing.assert_close(out, carafe_down(features, finite, 3, 2, 2, backend="reference"))


# --- every autodiff mode (tests/test_autodiff.py for CARAFE) ------------------------------------------------

@pytest.mark.parametrize("backend, device", BACKEND_CASES)
@pytest.mark.parametrize("op", OPS)
def test_forward_mode_ad_and_func_transforms(op, backend, device):
    """jvp (torch.func and dual tensors), grad, vjp, jacrev, jacfwd and vmap against the float64 reference,
    which PyTorch differentiates itself."""
    N, C, H, W, k, G, s = ODD
    dtype = exact_dtype(backend)
    primals = tuple(t.to(device) for t in make_inputs(*ODD, op=op, dtype=dtype))
    tangents = tuple(t.to(device) for t in make_inputs(*ODD, op=op, dtype=dtype, seed=1))
    fn = on(backend, op, k, G, s)

    def ref(f, m):
        return REFERENCE[op](f, m, k, G, s)

    exact = exact_tolerance(dtype)
    out, tangent = torch.func.jvp(fn, primals, tangents)
    ref_out, ref_tangent = torch.func.jvp(ref, primals, tangents)
    assert ref_tangent.abs().max() > 0.1
    torch.testing.assert_close(out, ref_out, **exact)
    torch.testing.assert_close(tangent, ref_tangent, **exact)
    with fwAD.dual_level():
        dual = fwAD.unpack_dual(fn(*(fwAD.make_dual(p, t) for p, t in zip(primals, tangents)))).tangent
    torch.testing.assert_close(dual, ref_tangent, **exact)
    weight = torch.randn(out.shape, dtype=dtype, generator=torch.Generator().manual_seed(3)).to(device)
    for got, want in zip(torch.func.grad(lambda f, m: (fn(f, m) * weight).sum(), argnums=(0, 1))(*primals),
                         torch.func.grad(lambda f, m: (ref(f, m) * weight).sum(), argnums=(0, 1))(*primals)):
        torch.testing.assert_close(got, want, **exact)
    small = tuple(t.to(device) for t in make_inputs(1, 2, 3, 3, 3, 1, 2, op=op, dtype=dtype))
    for jac in (torch.func.jacrev, torch.func.jacfwd):
        for got, want in zip(jac(lambda f, m: OPS[op](f, m, 3, 1, 2, backend=backend), argnums=(0, 1))(*small),
                             jac(lambda f, m: REFERENCE[op](f, m, 3, 1, 2), argnums=(0, 1))(*small)):
            torch.testing.assert_close(got, want, **exact)
    batched = torch.stack([primals[0], primals[0].flip(0)]), torch.stack([primals[1], primals[1].flip(0)])
    torch.testing.assert_close(torch.vmap(fn)(*batched), torch.vmap(ref)(*batched), **exact)


@pytest.mark.parametrize("backend, device", BACKEND_CASES)
def test_double_backward_of_the_plain_op(backend, device):
    """The plain op's backward is bilinear: double backward matches the reference's."""
    N, C, H, W, k, G, s = ODD
    dtype = exact_dtype(backend)
    features, masks = (t.to(device) for t in make_inputs(*ODD, dtype=dtype))

    def second_order(fn):
        f, m = features.clone().requires_grad_(True), masks.clone().requires_grad_(True)
        out = fn(f, m)
        weight = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device).view_as(out)
        gf, gm = torch.autograd.grad((out * out * weight).sum(), (f, m), create_graph=True)
        return torch.autograd.grad((gf * gf).sum() + (gm * f.mean()).sum(), (f, m))

    for got, want in zip(second_order(on(backend, "plain", k, G, s)),
                         second_order(lambda f, m: carafe_down_reference(f, m, k, G, s))):
        torch.testing.assert_close(got, want, **exact_tolerance(dtype))


@pytest.mark.parametrize("backend, device", NATIVE_CASES)
def test_second_order_through_the_fused_op_is_refused(backend, device):
    """No silent wrong answer: the fused backward has no derivative, and says which calls do."""
    features, logits = (t.to(device).requires_grad_(True)
                        for t in make_inputs(*ODD, op="fused", dtype=exact_dtype(backend)))
    out = carafe_down_fused(features, logits, 3, 2, 2, backend=backend)
    grads = torch.autograd.grad(out.square().sum(), (features, logits), create_graph=True)
    with pytest.raises(NotImplementedError, match=r"through the fused CARAFE op are not supported; use carafe_down\("
                                                  r"features, carafe_kernels.reference.normalize_down_mask_logits"):
        torch.autograd.grad(grads[0].sum() + grads[1].sum(), (features, logits))


# --- autocast --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend, device", BACKEND_CASES)
@pytest.mark.parametrize("op", OPS)
def test_autocast_casts_to_the_region_dtype(op, backend, device):
    N, C, H, W, k, G, s = ODD
    features, second = make_inputs(*ODD, op=op)
    features = features.to(device).requires_grad_()
    second = second.to(device, torch.bfloat16).requires_grad_()
    with torch.autocast(device, dtype=torch.bfloat16):
        out = OPS[op](features, second, k, G, s, backend=backend)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert features.grad.dtype == torch.float32 and second.grad.dtype == torch.bfloat16
    torch.testing.assert_close(out.double().cpu(), naive(op, features.detach().bfloat16(), second.detach(), k, G, s),
                               **TOL[torch.bfloat16])


@pytest.mark.parametrize("backend, device", BACKEND_CASES)
@pytest.mark.parametrize("op", OPS)
def test_autocast_leaves_float64_alone(op, backend, device):
    skip_unless_computes_in(backend, torch.float64)
    N, C, H, W, k, G, s = ODD
    features, second = (t.to(device) for t in make_inputs(*ODD, op=op, dtype=torch.float64))
    expected = OPS[op](features, second, k, G, s, backend=backend)
    with torch.autocast(device, dtype=torch.bfloat16):
        out = OPS[op](features, second, k, G, s, backend=backend)
        assert out.dtype == torch.float64
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
        with pytest.raises(TypeError, match="float64 inputs are not cast .* must both be float64 or neither"):
            OPS[op](features, second.float(), k, G, s, backend=backend)


# --- bad inputs -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["auto", "reference", "cpu"])
@pytest.mark.parametrize("op", OPS)
def test_bad_arguments_name_the_argument_and_shapes(op, backend):
    if backend == "cpu" and NATIVE_REASON is not None:
        pytest.skip(f"native ops unavailable: {NATIVE_REASON}")
    fn, name = OPS[op], SECOND[op]
    features, second = make_inputs(*ODD, op=op)  # features (2, 4, 7, 5), second (2, 18, 4, 3)
    cases = [
        (dict(features=features.numpy()), TypeError, "features must be a torch.Tensor, got ndarray"),
        (dict(second=[1.0]), TypeError, f"{name} must be a torch.Tensor, got list"),
        (dict(features=features[0]), ValueError, r"features must be 4-D \(N, C, H, W\), got shape \(4, 7, 5\)"),
        (dict(features=features.int()), TypeError, "features must be a floating-point tensor, got dtype torch.int32"),
        (dict(second=second.double()), TypeError, f"features and {name} must have the same dtype"),
        (dict(second=second[:1]), ValueError, rf"{name} batch 1 != features batch 2"),
        (dict(second=second[:, :9]), ValueError,
         re.escape(f"{name} must have G*k*k = 2*3*3 = 18 channels, got shape (2, 9, 4, 3) (features (2, 4, 7, 5))")),
        (dict(second=second[:, :, :3]), ValueError,
         re.escape(f"{name} must be ceil(7/2)xceil(5/2) = 4x3 spatially for features (2, 4, 7, 5) and "
                   "scale_factor=2, got shape (2, 18, 3, 3)")),
        (dict(k=2), ValueError, "kernel_size must be odd, got 2"),
        (dict(k="3"), TypeError, "kernel_size must be an int, got str"),
        (dict(G=3), ValueError, re.escape("group_size=3 must divide the channels of features (2, 4, 7, 5)")),
        (dict(G=0), ValueError, "group_size must be >= 1, got 0"),
        (dict(s=0), ValueError, "scale_factor must be >= 1, got 0"),
        (dict(s=2.5), ValueError, "scale_factor must be an integer, got 2.5"),
        (dict(backend="nosuch"), ValueError, "unknown backend 'nosuch'"),
    ]
    for change, error, message in cases:
        args = dict(features=features, second=second, k=3, G=2, s=2, backend=backend) | change
        with pytest.raises(error, match=message):
            fn(args["features"], args["second"], args["k"], args["G"], args["s"], backend=args["backend"])


@needs_native
def test_cpu_backend_limits_are_reported():
    features, masks = make_inputs(1, 2, 9, 9, 13, 1, 2)
    with pytest.raises(BackendUnavailableError, match=r"'cpu' cannot run this call: supports kernel_size <= 11, "
                                                      "got 13"):
        carafe_down(features, masks, 13, 1, 2, backend="cpu")
    features, masks = make_inputs(1, 2, 9, 9, 3, 1, 9)
    with pytest.raises(BackendUnavailableError, match="supports scale_factor <= 8, got 9"):
        carafe_down(features, masks, 3, 1, 9, backend="cpu")
    # auto falls back to the reference beyond the limits
    torch.testing.assert_close(carafe_down(features, masks, 3, 1, 9),
                               carafe_down(features, masks, 3, 1, 9, backend="reference"), rtol=0, atol=0)


@pytest.fixture
def without_down_kernel(monkeypatch):
    """A backend without the down ops. Every backend has them today, so the refusal (for a backend added
    later, or registered by a user) is checked on a stand-in: the triton entry with its down ops removed
    (and no plan cached from an earlier call). Returns (its name, the backends that have the op)."""
    name = "triton"
    monkeypatch.setitem(BACKENDS, name, dataclasses.replace(BACKENDS[name], carafe_down=None, carafe_down_fused=None))
    monkeypatch.setattr(carafe_kernels.functional, "_PLANS", {})
    return name, [other for other, backend in BACKENDS.items() if backend.carafe_down is not None]


def test_every_backend_has_the_down_ops():
    assert all(b.carafe_down is not None and b.carafe_down_fused is not None for b in BACKENDS.values())


@pytest.mark.parametrize("op", OPS)
def test_a_backend_without_the_op_refuses_it(op, without_down_kernel):
    backend, having = without_down_kernel
    features, second = make_inputs(*ODD, op=op)
    name = "carafe_down" if op == "plain" else "carafe_down_fused"
    with pytest.raises(BackendUnavailableError,
                       match=re.escape(f"CARAFE backend '{backend}' cannot run this call: has no {name} kernel yet "
                                       f"(the backends that have one: {', '.join(repr(n) for n in having)})")):
        OPS[op](features, second, 3, 2, 2, backend=backend)
    torch._dynamo.reset()
    with pytest.raises(BackendUnavailableError, match="has no carafe_down kernel yet"):
        torch.compile(lambda f, m: carafe_down(f, m, 3, 2, 2, backend=backend), fullgraph=True)(features, second)
    with pytest.raises(ValueError, match=re.escape(f"backend={backend!r} has no carafe_down kernel yet; "
                                                   f"use 'auto' or {having}")):
        CARAFEDownPack(8, backend=backend)


def test_auto_picks_the_cpu_kernels_and_the_environment_variable_is_read(monkeypatch):
    """backend="auto" runs the down ops on the cpu kernels where they are built (else the reference);
    CARAFE_BACKEND names the backend as the argument does."""
    features, masks = make_inputs(*ODD)
    expected = "cpu" if NATIVE_REASON is None else "reference"
    torch.testing.assert_close(carafe_down(features, masks, 3, 2, 2),
                               carafe_down(features, masks, 3, 2, 2, backend=expected), rtol=0, atol=0)
    monkeypatch.setenv("CARAFE_BACKEND", "reference")
    assert select_backend("auto", features, 3, 2, op="carafe_down").name == "reference"
    torch.testing.assert_close(carafe_down(features, masks, 3, 2, 2),
                               carafe_down(features, masks, 3, 2, 2, backend="reference"), rtol=0, atol=0)
    monkeypatch.setenv("CARAFE_BACKEND", "cudnn")
    with pytest.raises(ValueError, match="unknown backend 'cudnn' from the environment variable CARAFE_BACKEND"):
        carafe_down(features, masks, 3, 2, 2)


# --- the native ops: opcheck, schemas, the C++ checks, FLOP formulas ---------------------------------------

DOWN_OPS = ["carafe_down", "carafe_down_backward", "carafe_down_fused", "carafe_down_fused_backward"]
OPCHECK_CASES = [(ODD, torch.float32, "contiguous"), (S3, torch.float64, "channels_last"),
                 ((0, 4, 3, 3, 3, 1, 2), torch.float32, "contiguous")]


def _native(name):
    return getattr(torch.ops.carafe_kernels, name).default


def _op_args(name, shape, dtype, layout, output_mask=None):
    """Arguments of op `name`; a backward op gets output_mask when given (else the schema's default)."""
    N, C, H, W, k, G, s = shape
    features, second = make_inputs(*shape, op="fused" if "fused" in name else "plain", dtype=dtype)
    features, second = to_layout(features, layout), to_layout(second, layout)
    if name.endswith("_backward"):
        grad = to_layout(torch.randn(N, C, down_output_size(H, s), down_output_size(W, s), dtype=dtype), layout)
        return (grad, features, second, k, G, s) + (() if output_mask is None else (list(output_mask),))
    return (features.requires_grad_(True), second.requires_grad_(True), k, G, s)


@needs_native
@pytest.mark.parametrize("case", OPCHECK_CASES, ids=lambda c: f"{shape_id(c[0])}-{DTYPE_NAMES[c[1]]}-{c[2]}")
@pytest.mark.parametrize("name", DOWN_OPS)
def test_opcheck(name, case):
    torch.library.opcheck(_native(name), _op_args(name, *case))


@needs_native
@pytest.mark.parametrize("name", DOWN_OPS)
def test_schema_is_the_contracts(name):
    assert str(_native(name)._schema) == f"carafe_kernels::{name}{SCHEMAS[name]}"


@needs_native
@pytest.mark.parametrize("op", OPS)
def test_direct_op_calls_are_checked_in_cpp(op):
    """torch.ops callers skip the Python checks: the C++ ops check again (a ValueError naming the argument)."""
    name = "carafe_down" if op == "plain" else "carafe_down_fused"
    features, second = make_inputs(*ODD, op=op)
    with pytest.raises(ValueError, match=re.escape(
            f"carafe_kernels::{name}: {SECOND[op]} must have shape [2, 18, 4, 3] (N, G*k*k, ceil(H/s), ceil(W/s)) "
            "for features [2, 4, 7, 5], kernel_size=3, group_size=2, scale_factor=2; got [2, 18, 3, 3]")):
        _native(name)(features, second[:, :, :3], 3, 2, 2)
    with pytest.raises(ValueError, match=re.escape(
            f"carafe_kernels::{name}_backward: grad_output must have the output's shape "
            "(N, C, ceil(H/s), ceil(W/s)) = [2, 4, 4, 3], got [2, 4, 14, 10]")):
        _native(name + "_backward")(torch.randn(2, 4, 14, 10), features, second, 3, 2, 2)
    with pytest.raises(ValueError, match="kernel_size must be odd and in \\[1, 11\\]"):
        _native(name)(features, second, 4, 2, 2)


# --- output_mask: the down backward ops compute only what is asked, as the up ones (tests/test_ops.py) -----

OUTPUT_MASKS = [pytest.param((True, False), id="features-only"), pytest.param((False, True), id="masks-only"),
                pytest.param((False, False), id="none")]
DOWN_BACKWARD_OPS = ["carafe_down_backward", "carafe_down_fused_backward"]
# Several row blocks per task with halo rows at both borders, channel blocks of 16 and a remainder
# (C/G = 20), s = 3, the largest kernel and the largest scale factor with ragged last rows and columns.
MASK_SHAPES = [MULTI_BLOCK, S3, K11_S4, S8, ODD]


@needs_native
@pytest.mark.parametrize("output_mask", OUTPUT_MASKS)
@pytest.mark.parametrize("name", DOWN_BACKWARD_OPS)
def test_opcheck_output_mask(name, output_mask):
    """The fake kernels and AOT dispatch agree with the kernels on the None slots."""
    torch.library.opcheck(_native(name), _op_args(name, ODD, torch.float32, "contiguous", output_mask))


@needs_native
@pytest.mark.parametrize("output_mask", OUTPUT_MASKS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", MASK_SHAPES, ids=shape_id)
@pytest.mark.parametrize("name", DOWN_BACKWARD_OPS)
def test_output_mask_gives_the_full_backwards_gradients(name, shape, dtype, output_mask):
    """Each gradient asked for is bitwise the one of a call that asks for both (the kernels are
    deterministic); the other slot is None (the kernel returned an undefined tensor: nothing allocated)."""
    args = _op_args(name, shape, dtype, "contiguous", (True, True))
    full = _native(name)(*args)
    got = _native(name)(*args[:-1], list(output_mask))
    for wanted, g, f in zip(output_mask, got, full):
        if wanted:
            assert torch.equal(g, f)
            assert g.stride() == f.stride()
        else:
            assert g is None


@needs_native
@pytest.mark.parametrize("name", DOWN_BACKWARD_OPS)
def test_output_mask_defaults_to_both(name):
    """A call without output_mask computes both gradients; the fake kernel agrees."""
    args = _op_args(name, ODD, torch.float32, "contiguous")
    full = _native(name)(*args, [True, True])
    for got, want in zip(_native(name)(*args), full):
        assert torch.equal(got, want)
    torch.library.opcheck(_native(name), args)


@needs_native
@pytest.mark.parametrize("name", DOWN_BACKWARD_OPS)
def test_output_mask_of_another_length_is_refused(name):
    """The schema's bool[2] is not enforced by the dispatcher: the kernels and the fake kernels check it."""
    args = _op_args(name, ODD, torch.float32, "contiguous")
    for bad in ([True], [True, True, False]):
        with pytest.raises(ValueError, match=f"output_mask must have 2 elements .* got {len(bad)}"):
            _native(name)(*args, bad)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        with pytest.raises(ValueError, match="output_mask must have 2 elements .* got 1"):
            _native(name)(*fake, [True])


class _BackwardCalls(torch.utils._python_dispatch.TorchDispatchMode):
    """Records each call of a down backward op: its output_mask and what it returned."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.__name__.startswith(tuple(DOWN_BACKWARD_OPS)):
            self.calls.append((list(args[6]), out))
        return out


@needs_native
@pytest.mark.parametrize("needs", [(True, False), (False, True)], ids=["features-only", "masks-only"])
@pytest.mark.parametrize("op", OPS)
def test_autograd_asks_the_kernel_only_for_the_needed_gradient(op, needs):
    """With one input not requiring grad, autograd calls the down backward op once with that output_mask
    (register_carafe_op_family(..., down=True) passes it as for the up ops); the gradient equals the full
    backward's bitwise."""
    name = "carafe_down" if op == "plain" else "carafe_down_fused"
    features, second, k, G, s = _op_args(name, ODD, torch.float32, "contiguous")
    N, C, H, W = features.shape
    grad_out = torch.randn(N, C, down_output_size(H, s), down_output_size(W, s))
    expected = _native(name + "_backward")(grad_out, features.detach(), second.detach(), k, G, s, [True, True])
    features.requires_grad_(needs[0])
    second.requires_grad_(needs[1])
    wanted = 0 if needs[0] else 1
    with _BackwardCalls() as recorder:
        out = _native(name)(features, second, k, G, s)
        (grad,) = torch.autograd.grad(out, ((features, second)[wanted],), grad_out)
    assert len(recorder.calls) == 1
    output_mask, returned = recorder.calls[0]
    assert output_mask == list(needs)
    assert returned[1 - wanted] is None and returned[wanted] is not None
    assert torch.equal(grad, expected[wanted])


@needs_native
@pytest.mark.parametrize("logits_grad", [True, False], ids=["both-gradients", "features-only"])
def test_flop_counter_counts_the_native_ops(logits_grad):
    """The forward and each gradient the backward's output_mask asks for: one multiply-add per tap per
    output element each."""
    from torch.utils.flop_counter import FlopCounterMode
    N, C, H, W, k, G, s = ODD
    features, logits = make_inputs(*ODD, op="fused")
    features.requires_grad_(True)
    logits.requires_grad_(logits_grad)
    with FlopCounterMode(display=False) as mode:
        carafe_down_fused(features, logits, k, G, s, backend="cpu").sum().backward()
    assert mode.get_total_flops() == (3 if logits_grad else 2) * carafe_down_flops(features.shape, k, s)


# --- torch.compile ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend, device", BACKEND_CASES)
def test_compile_fullgraph_matches_eager_and_bad_calls_raise_the_eager_error(backend, device):
    torch._dynamo.reset()
    N, C, H, W, k, G, s = ODD
    features, logits = (t.to(device) for t in make_inputs(*ODD, op="fused"))

    def fn(f, lg):
        return carafe_down_fused(f, lg, k, G, s, backend=backend) * 2

    def fwd_bwd(fun):
        f, lg = features.clone().requires_grad_(), logits.clone().requires_grad_()
        out = fun(f, lg)
        out.sum().backward()
        return out.detach(), f.grad, lg.grad

    for a, b in zip(fwd_bwd(torch.compile(fn, fullgraph=True)), fwd_bwd(fn)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

    torch._dynamo.reset()
    bad = logits[:, :, :3]
    message = re.escape("mask_logits must be ceil(7/2)xceil(5/2) = 4x3 spatially")
    with pytest.raises(ValueError, match=message):
        fn(features, bad)
    with pytest.raises(ValueError, match=message):
        torch.compile(fn, fullgraph=True)(features, bad)


@pytest.mark.parametrize("backend, device", BACKEND_CASES)
def test_compile_dynamic_shapes_bad_call_names_the_op(backend, device):
    torch._dynamo.reset()
    features, logits = (t.to(device) for t in make_inputs(*ODD, op="fused"))
    dynamic = torch.compile(lambda f, lg: carafe_down_fused(f, lg, 3, 2, 2, backend=backend), fullgraph=True,
                            dynamic=True)
    torch.testing.assert_close(dynamic(features, logits), carafe_down_fused(features, logits, 3, 2, 2))
    with pytest.raises(ValueError, match=r"carafe_down_fused: invalid arguments \(kernel_size=3, group_size=2, "
                                         r"scale_factor=2\)"):
        dynamic(features, logits[:, :, :3])


def test_compile_downpack_matches_eager():
    torch._dynamo.reset()
    torch.manual_seed(0)
    module = CARAFEDownPack(8, compressed_channels=16, down_kernel=3)
    x = torch.randn(2, 8, 7, 6)
    torch.testing.assert_close(torch.compile(module, fullgraph=True)(x), module(x), rtol=1e-5, atol=1e-5)


# --- FLOPs -------------------------------------------------------------------------------------------------

def test_flops_formula():
    assert carafe_down_flops((2, 8, 7, 5), 5, 2) == 2 * 2 * 8 * 4 * 3 * 25
    assert carafe_down_flops((1, 3, 16, 16), 3, 1) == 2 * 3 * 16 * 16 * 9


# --- CARAFEDownPack ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("size, s", [((16, 16), 2), ((15, 9), 2), ((10, 11), 3), ((1, 1), 2)])
def test_downpack_output_size_is_a_strided_convs(size, s):
    module = CARAFEDownPack(4, scale_factor=s, compressed_channels=8)
    conv = torch.nn.Conv2d(4, 4, 5, stride=s, padding=2)
    x = torch.randn(2, 4, *size)
    assert module(x).shape == conv(x).shape == (2, 4, math.ceil(size[0] / s), math.ceil(size[1] / s))


def test_downpack_parameters_defaults_and_init():
    torch.manual_seed(0)
    module = CARAFEDownPack(32)
    assert (module.scale_factor, module.down_kernel, module.down_group, module.encoder_kernel,
            module.compressed_channels) == (2, 5, 1, 3, 64)
    assert module.channel_compressor.weight.shape == (64, 32, 1, 1)
    assert module.content_encoder.weight.shape == (25, 64, 3, 3)
    assert module.content_encoder.stride == (2, 2) and module.content_encoder.padding == (1, 1)
    assert sum(p.numel() for p in module.parameters()) == (32 * 64 + 64) + (64 * 25 * 9 + 25)
    # mmcv's CARAFEPack initialisation: zero biases, Xavier-uniform compressor, encoder N(0, 0.001).
    assert not module.channel_compressor.bias.any() and not module.content_encoder.bias.any()
    bound = math.sqrt(6 / (32 + 64))
    assert module.channel_compressor.weight.abs().max() <= bound
    assert module.channel_compressor.weight.abs().max() > bound / 2
    assert 0.0005 < module.content_encoder.weight.std() < 0.002
    # So a fresh module is close to 5x5 average pooling (zeros counted).
    x = torch.randn(1, 32, 8, 8)
    torch.testing.assert_close(module(x), F.avg_pool2d(x, 5, stride=2, padding=2), rtol=0.05, atol=0.05)


def test_downpack_groups_and_gradients():
    torch.manual_seed(0)
    module = CARAFEDownPack(8, down_group=4, compressed_channels=8, down_kernel=3)
    assert module.content_encoder.out_channels == 4 * 9
    x = torch.randn(2, 8, 7, 7, requires_grad=True)
    out = module(x)
    assert out.shape == (2, 8, 4, 4)
    out.sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in module.parameters())


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(channels=0), ValueError, "channels must be >= 1, got 0"),
    (dict(down_kernel=4), ValueError, "down_kernel must be odd, got 4"),
    (dict(down_group=3), ValueError, "down_group=3 must divide channels=8"),
    (dict(encoder_kernel=2), ValueError, "encoder_kernel must be odd, got 2"),
    (dict(scale_factor="2"), TypeError, "scale_factor must be an int, got str"),
    (dict(backend="gpu"), ValueError, "unknown backend 'gpu'"),
])
def test_downpack_bad_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        CARAFEDownPack(**({"channels": 8} | kwargs))


def test_downpack_refuses_torchscript():
    with pytest.raises(TypeError, match="CARAFEDownPack does not support torch.jit.script"):
        torch.jit.script(CARAFEDownPack(4))


def test_exported_from_the_package():
    for name in ("carafe_down", "carafe_down_fused", "CARAFEDownPack", "carafe_down_flops"):
        assert name in carafe_kernels.__all__ and hasattr(carafe_kernels, name)


def test_unfold_baseline_agrees():
    """The unfold formulation (the benchmark baseline) computes the public op's function."""
    N, C, H, W, k, G, s = S3
    features, masks = make_inputs(*S3)
    torch.testing.assert_close(carafe_down(features, masks, k, G, s), carafe_down_unfold(features, masks, k, G, s))
