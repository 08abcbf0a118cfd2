"""The oracle itself: carafe_kernels.reference against carafe_kernels.naive, scalar loops written straight
from the definition (docs/design.md#the-contract), against the unfold formulation, and against algebraic invariants. The
invariants are cheap, so they run on every backend too.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import OPS, TOLERANCES, backend_cases, make_inputs, run_op, shape_id

from benchmarks.machine import peak_memory_bytes
from carafe_kernels import carafe
from carafe_kernels.naive import carafe_fused_naive, carafe_naive, normalize_mask_logits_naive
from carafe_kernels.reference import (
    carafe_fused_reference,
    carafe_reference,
    carafe_unfold,
    normalize_mask_logits,
)

BACKENDS = backend_cases()
EXACT = dict(rtol=1e-12, atol=1e-12)


SCALAR_SHAPES = [(1, 1, 1, 1, 1, 1, 1), (1, 2, 1, 1, 3, 1, 2), (2, 4, 3, 5, 3, 2, 2), (1, 2, 4, 3, 5, 1, 3),
                 (1, 3, 3, 4, 7, 3, 1), (2, 4, 2, 2, 3, 4, 4)]


@pytest.mark.parametrize("shape", SCALAR_SHAPES, ids=lambda p: shape_id(*p))
def test_reference_matches_scalar_loop(shape):
    N, C, H, W, k, G, s = shape
    features, masks = make_inputs(*shape, fused=False, dtype=torch.float64)
    torch.testing.assert_close(carafe_reference(features, masks, k, G, s), carafe_naive(features, masks, k, G, s),
                               **EXACT)


@pytest.mark.parametrize("shape", SCALAR_SHAPES, ids=lambda p: shape_id(*p))
def test_fused_reference_matches_scalar_loop(shape):
    N, C, H, W, k, G, s = shape
    features, logits = make_inputs(*shape, fused=True, dtype=torch.float64)
    masks = normalize_mask_logits_naive(logits, k, G, s)
    torch.testing.assert_close(normalize_mask_logits(logits, k, G, s), masks, **EXACT)
    torch.testing.assert_close(carafe_fused_reference(features, logits, k, G, s),
                               carafe_fused_naive(features, logits, k, G, s), **EXACT)


def test_normalize_matches_pixel_shuffle_then_softmax():
    """normalize_mask_logits is exactly mmcv's kernel_normalizer: pixel_shuffle, then softmax per group."""
    k, G, s = 3, 2, 2
    logits = torch.randn(2, G * k * k * s * s, 4, 5, dtype=torch.float64)
    shuffled = F.pixel_shuffle(logits, s)
    n, c, h, w = shuffled.shape
    expected = shuffled.view(n, G, k * k, h, w).softmax(dim=2).view(n, c, h, w)
    torch.testing.assert_close(normalize_mask_logits(logits, k, G, s), expected, **EXACT)


@pytest.mark.parametrize("shape", [(2, 8, 5, 6, 5, 2, 2), (1, 3, 4, 4, 3, 1, 3), (1, 4, 3, 3, 7, 4, 1)],
                         ids=lambda p: shape_id(*p))
def test_unfold_baseline_matches_reference(shape):
    N, C, H, W, k, G, s = shape
    features, masks = make_inputs(*shape, fused=False, dtype=torch.float64)
    torch.testing.assert_close(carafe_unfold(features, masks, k, G, s), carafe_reference(features, masks, k, G, s),
                               **EXACT)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
def test_reference_keeps_dtype(dtype):
    features, logits = make_inputs(1, 4, 3, 3, 3, 2, 2, fused=True, dtype=dtype)
    assert carafe_fused_reference(features, logits, 3, 2, 2).dtype == dtype


def test_reference_runs_on_meta_tensors():
    """Shape inference without data: the reference on the meta device (and through the public API)."""
    features = torch.empty(2, 8, 5, 7, device="meta")
    logits = torch.empty(2, 2 * 25 * 9, 5, 7, device="meta")
    out = carafe_fused_reference(features, logits, 5, 2, 3)
    assert out.shape == (2, 8, 15, 21) and out.device.type == "meta"
    masks = torch.empty(2, 2 * 25, 15, 21, device="meta")
    assert carafe(features, masks, 5, 2, 3, backend="reference").shape == (2, 8, 15, 21)


def _peak_cpu_bytes(fn) -> int:
    """Peak bytes allocated on the CPU while fn runs, measured as the benchmarks measure it."""
    return peak_memory_bytes(fn, "cpu")


def test_reference_is_memory_lean():
    """The reference never builds the k*k-fold unfold tensor: its forward peak is a few output sizes,
    the unfold formulation's at least k*k output sizes."""
    N, C, H, W, k, G, s = 1, 32, 12, 12, 5, 1, 2
    features, logits = make_inputs(N, C, H, W, k, G, s, fused=True)
    out_bytes = N * C * H * s * W * s * 4
    lean = _peak_cpu_bytes(lambda: carafe_fused_reference(features, logits, k, G, s))
    unfold = _peak_cpu_bytes(lambda: carafe_unfold(features, normalize_mask_logits(logits, k, G, s), k, G, s))
    assert lean <= 6 * out_bytes, f"reference forward peaks at {lean / out_bytes:.1f} output sizes"
    assert unfold >= k * k * out_bytes, f"unfold forward peaks at {unfold / out_bytes:.1f} output sizes"


# --- invariants, on every backend ---------------------------------------------------------------------

@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("s", [1, 2, 3])
@pytest.mark.parametrize("op", OPS)
def test_k1_unit_masks_is_nearest_upsampling(op, s, backend, device):
    """k=1 with unit masks (plain), or any logits (fused: a softmax over one tap is 1), is nearest
    upsampling."""
    N, C, H, W, G = 2, 6, 4, 5, 3
    features = torch.randn(N, C, H, W, device=device)
    second = (torch.randn(N, G * s * s, H, W, device=device) if op == "fused"
              else torch.ones(N, G, H * s, W * s, device=device))
    out = run_op(op, backend, features, second, 1, G, s)
    torch.testing.assert_close(out, F.interpolate(features, scale_factor=s, mode="nearest"), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("k", [1, 3, 5, 7])
@pytest.mark.parametrize("op", OPS)
def test_s1_uniform_masks_is_average_pooling(op, k, backend, device):
    """s=1 with uniform masks 1/k^2 (plain), or constant logits (fused), is k x k average pooling with
    zero padding that counts the padding (count_include_pad=True)."""
    N, C, H, W, G = 2, 4, 6, 5, 2
    features = torch.randn(N, C, H, W, device=device, dtype=torch.float64
                           if backend == "reference" else torch.float32)
    if op == "fused":
        second = torch.full((N, G * k * k, H, W), 0.7, device=device, dtype=features.dtype)
    else:
        second = torch.full((N, G * k * k, H, W), 1.0 / (k * k), device=device, dtype=features.dtype)
    out = run_op(op, backend, features, second, k, G, 1)
    expected = F.avg_pool2d(features, k, stride=1, padding=(k - 1) // 2, count_include_pad=True)
    torch.testing.assert_close(out, expected, **TOLERANCES[torch.float32])


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_linear_in_features(op, backend, device):
    """carafe(a*f1 + b*f2, m) == a*carafe(f1, m) + b*carafe(f2, m) (for the fused op too: the softmax
    acts on the logits only)."""
    shape = N, C, H, W, k, G, s = 2, 8, 5, 6, 5, 2, 2
    f1, second = make_inputs(*shape, fused=op == "fused", device=device, seed=1)
    f2, _ = make_inputs(*shape, fused=op == "fused", device=device, seed=2)
    a, b = 0.75, -1.5
    combined = run_op(op, backend, a * f1 + b * f2, second, k, G, s)
    separate = a * run_op(op, backend, f1, second, k, G, s) + b * run_op(op, backend, f2, second, k, G, s)
    torch.testing.assert_close(combined, separate, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_linear_in_masks(backend, device):
    shape = N, C, H, W, k, G, s = 2, 8, 5, 6, 3, 4, 3
    features, m1 = make_inputs(*shape, fused=False, device=device, seed=1)
    _, m2 = make_inputs(*shape, fused=False, device=device, seed=2)
    combined = carafe(features, 2 * m1 - m2, k, G, s, backend=backend)
    separate = 2 * carafe(features, m1, k, G, s, backend=backend) - carafe(features, m2, k, G, s, backend=backend)
    torch.testing.assert_close(combined, separate, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_groups_are_independent(backend, device):
    """Group g's channels use only mask channels g*k*k .. (g+1)*k*k - 1: running each group alone with
    G=1 gives the same result."""
    shape = N, C, H, W, k, G, s = 1, 6, 4, 4, 3, 3, 2
    features, masks = make_inputs(*shape, fused=False, device=device)
    out = carafe(features, masks, k, G, s, backend=backend)
    Cg = C // G
    for g in range(G):
        alone = carafe(features[:, g * Cg:(g + 1) * Cg], masks[:, g * k * k:(g + 1) * k * k], k, 1, s, backend=backend)
        torch.testing.assert_close(out[:, g * Cg:(g + 1) * Cg], alone, rtol=1e-6, atol=1e-6)
