"""Pure-PyTorch CARAFE: any device, any float dtype, autograd by PyTorch.

This is the test oracle (run in float64 on CPU) and the fallback backend. It is memory-lean: it never
builds the ``C*k*k*(H*s)*(W*s)`` unfold tensor. Instead it walks the ``k*k`` taps, and for each tap
multiplies a shifted view of the zero-padded features (one value per low-res position, broadcast over
its ``s*s`` sub-pixels) with that tap's masks and accumulates into the output. Peak extra memory is
about two output-sized tensors.

The functions here do no argument checking: ``carafe_kernels.functional`` validates before calling.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["carafe_reference", "carafe_fused_reference", "normalize_mask_logits", "carafe_unfold"]


def normalize_mask_logits(mask_logits: torch.Tensor, kernel_size: int, group_size: int,
                          scale_factor: int) -> torch.Tensor:
    """(N, G*k*k*s*s, H, W) encoder logits -> (N, G*k*k, H*s, W*s) masks: pixel shuffle, then a softmax
    over the k*k taps of each group (exactly what mmcv's ``CARAFEPack.kernel_normalizer`` does)."""
    n, _, h, w = mask_logits.shape
    k2, s = kernel_size * kernel_size, scale_factor
    # pixel_shuffle by view + permute: channel (g*k*k + t)*s*s + i*s + j -> tap t of group g at
    # sub-pixel (i, j). NB: not F.pixel_shuffle, whose backward returns a wrongly shaped gradient for an
    # empty batch (torch 2.13: "PixelShuffleBackward0 returned an invalid gradient ... [0, ...]").
    masks = mask_logits.reshape(n, group_size, k2, s, s, h, w).softmax(dim=2)
    masks = masks.permute(0, 1, 2, 5, 3, 6, 4)  # (N, G, k*k, H, s, W, s)
    return masks.reshape(n, group_size * k2, h * s, w * s)


def carafe_reference(features: torch.Tensor, masks: torch.Tensor, kernel_size: int, group_size: int,
                     scale_factor: int) -> torch.Tensor:
    """out[n, c, y, x] = sum_{ky,kx} features[n, c, y//s + ky - r, x//s + kx - r] * masks[n, g*k*k + ky*k + kx, y, x]."""
    k, G, s = kernel_size, group_size, scale_factor
    N, C, H, W = features.shape
    r = (k - 1) // 2
    Cg = C // G
    # Output laid out as (N, G, Cg, H, s, W, s): the s*s sub-pixels of one low-res position side by side,
    # so one low-res feature value broadcasts over its sub-pixels without materialising an upsampled copy.
    padded = F.pad(features, (r, r, r, r)).view(N, G, Cg, H + 2 * r, W + 2 * r)
    # NB: unbind, not masks6[:, :, t] per tap: autograd's backward of one unbind is one stack, while
    # k*k selects would each zero-fill and add a full masks-sized gradient (k**4 memory traffic).
    taps = masks.reshape(N, G, k * k, H, s, W, s).unbind(2)
    out = None
    for ky in range(k):
        for kx in range(k):
            window = padded[:, :, :, ky:ky + H, kx:kx + W].unsqueeze(4).unsqueeze(6)  # (N, G, Cg, H, 1, W, 1)
            tap = taps[ky * k + kx].unsqueeze(2)                                         # (N, G, 1, H, s, W, s)
            term = window * tap
            out = term if out is None else out + term
    return out.reshape(N, C, H * s, W * s)


def carafe_fused_reference(features: torch.Tensor, mask_logits: torch.Tensor, kernel_size: int,
                           group_size: int, scale_factor: int) -> torch.Tensor:
    """carafe(features, normalize_mask_logits(mask_logits)): the semantics every fused kernel must meet."""
    masks = normalize_mask_logits(mask_logits, kernel_size, group_size, scale_factor)
    return carafe_reference(features, masks, kernel_size, group_size, scale_factor)


def carafe_unfold(features: torch.Tensor, masks: torch.Tensor, kernel_size: int, group_size: int,
                  scale_factor: int) -> torch.Tensor:
    """The formulation people write today (unfold, nearest-upsample, multiply, sum). It materialises a
    (N, C*k*k, H*s, W*s) tensor: kept only as the baseline for tests and benchmarks, never used as a backend."""
    k, G, s = kernel_size, group_size, scale_factor
    N, C, H, W = features.shape
    r = (k - 1) // 2
    unfolded = F.unfold(features, k, padding=r).view(N, C * k * k, H, W)
    unfolded = F.interpolate(unfolded, scale_factor=s, mode="nearest")
    unfolded = unfolded.view(N, G, C // G, k * k, H * s, W * s)
    return torch.einsum("ngckyx,ngkyx->ngcyx", unfolded,
                        masks.view(N, G, k * k, H * s, W * s)).reshape(N, C, H * s, W * s)
