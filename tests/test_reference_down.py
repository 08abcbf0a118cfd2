"""Content-aware downsampling (CARAFE++): the lean reference against the scalar-loop definition
(carafe_kernels.naive) and the unfold formulation, its gradients, and its memory."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from benchmarks.machine import peak_memory_bytes
from carafe_kernels.naive import carafe_down_fused_naive, carafe_down_naive
from carafe_kernels.reference import (carafe_down_fused_reference, carafe_down_reference, carafe_down_unfold,
                                      down_output_size, normalize_down_mask_logits)

EXACT = dict(rtol=1e-12, atol=1e-12)
# (N, C, H, W, k, G, s): odd sizes that s does not divide, k = 1, k larger than the image, groups.
SHAPES = [(1, 1, 1, 1, 1, 1, 1), (1, 2, 5, 4, 3, 1, 2), (2, 4, 7, 5, 3, 2, 2), (1, 2, 4, 3, 5, 1, 3),
          (1, 3, 6, 7, 7, 3, 2), (2, 4, 9, 9, 3, 4, 4), (1, 2, 2, 3, 5, 2, 1)]


def inputs(N, C, H, W, k, G, s, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(N, C, H, W, dtype=dtype, generator=generator)
    logits = torch.randn(N, G * k * k, down_output_size(H, s), down_output_size(W, s), dtype=dtype,
                         generator=generator)
    return features, logits


def shape_id(shape):
    return "N{}-C{}-H{}-W{}-k{}-g{}-s{}".format(*shape)


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_reference_matches_the_definition_and_unfold(shape):
    N, C, H, W, k, G, s = shape
    features, logits = inputs(*shape)
    masks = normalize_down_mask_logits(logits, k, G)
    expected = carafe_down_naive(features, masks, k, G, s)
    assert expected.shape == (N, C, -(-H // s), -(-W // s))
    torch.testing.assert_close(carafe_down_reference(features, masks, k, G, s), expected, **EXACT)
    torch.testing.assert_close(carafe_down_unfold(features, masks, k, G, s), expected, **EXACT)
    torch.testing.assert_close(carafe_down_fused_reference(features, logits, k, G, s),
                               carafe_down_fused_naive(features, logits, k, G, s), **EXACT)


@pytest.mark.parametrize("s", [1, 2, 3])
def test_output_size_is_that_of_a_strided_convolution(s):
    for size in range(1, 12):
        conv = F.conv2d(torch.zeros(1, 1, size, size), torch.zeros(1, 1, 5, 5), stride=s, padding=2)
        assert down_output_size(size, s) == conv.shape[-1]


def test_uniform_masks_are_average_pooling_with_zero_padding():
    """Masks of 1/k^2 everywhere: each output is the mean of its k x k window, zeros counted."""
    features, _ = inputs(2, 3, 8, 6, 3, 1, 2)
    masks = torch.full((2, 9, 4, 3), 1 / 9, dtype=torch.float64)
    expected = F.avg_pool2d(features, 3, stride=2, padding=1, count_include_pad=True)
    torch.testing.assert_close(carafe_down_reference(features, masks, 3, 1, 2), expected, **EXACT)


@pytest.mark.parametrize("shape", [(1, 2, 5, 4, 3, 1, 2), (1, 4, 5, 5, 3, 2, 2)], ids=shape_id)
def test_gradcheck(shape):
    N, C, H, W, k, G, s = shape
    features, logits = inputs(*shape)
    features.requires_grad_(True)
    logits.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda f, m: carafe_down_reference(f, m, k, G, s), (features, logits))
    assert torch.autograd.gradgradcheck(lambda f, m: carafe_down_fused_reference(f, m, k, G, s), (features, logits))


def test_reference_memory_is_the_padded_input_and_two_outputs_not_unfold():
    features, logits = inputs(2, 64, 64, 64, 5, 1, 2, dtype=torch.float32)
    masks = normalize_down_mask_logits(logits, 5, 1)
    out_bytes = 2 * 64 * 32 * 32 * 4
    padded_bytes = 2 * 64 * 68 * 68 * 4
    lean = peak_memory_bytes(lambda: carafe_down_reference(features, masks, 5, 1, 2), "cpu")
    unfold = peak_memory_bytes(lambda: carafe_down_unfold(features, masks, 5, 1, 2), "cpu")
    assert lean <= padded_bytes + 2 * out_bytes           # the zero-padded copy, the sum and one product
    assert unfold >= 20 * out_bytes                       # k*k = 25 output-sized slices
