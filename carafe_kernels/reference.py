"""Pure-PyTorch CARAFE: any device, any float dtype, autograd by PyTorch.

This is the test oracle (run in float64 on CPU) and the fallback backend. It is memory-lean: it never
builds the ``C*k*k*(H*s)*(W*s)`` unfold tensor. Instead, for each of the ``s*s`` sub-pixel positions
(i, j) it accumulates, over the ``k*k`` taps, a shifted view of the zero-padded low-res features times
that tap's masks at (i, j): every term is an elementwise multiply-add over contiguous (H, W) planes,
which vectorises. The s*s low-res partial outputs are interleaved into the output at the end. Peak
extra memory is a few output-sized tensors (measured in tests/test_reference.py).

The functions here do no argument checking: ``carafe_kernels.functional`` validates before calling.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .contract import down_output_size

__all__ = ["carafe_reference", "carafe_fused_reference", "normalize_mask_logits", "normalize_mask_logits_jvp",
           "carafe_unfold", "down_output_size", "carafe_down_reference", "carafe_down_fused_reference",
           "normalize_down_mask_logits", "normalize_down_mask_logits_jvp", "carafe_down_unfold"]


def normalize_mask_logits(mask_logits: torch.Tensor, kernel_size: int, group_size: int,
                          scale_factor: int) -> torch.Tensor:
    """(N, G*k*k*s*s, H, W) encoder logits -> (N, G*k*k, H*s, W*s) masks: pixel shuffle, then a softmax
    over the k*k taps of each group (exactly what mmcv's ``CARAFEPack.kernel_normalizer`` does)."""
    return _shuffle_taps(_grouped_taps(mask_logits, kernel_size, group_size, scale_factor).softmax(dim=2))


def _grouped_taps(mask_logits: torch.Tensor, kernel_size: int, group_size: int, scale_factor: int) -> torch.Tensor:
    """(N, G*k*k*s*s, H, W) -> (N, G, k*k, s, s, H, W), a view: channel (g*k*k + t)*s*s + i*s + j is tap t
    of group g at sub-pixel (i, j), the order pixel_shuffle implies."""
    n, _, h, w = mask_logits.shape
    s = scale_factor
    return mask_logits.reshape(n, group_size, kernel_size * kernel_size, s, s, h, w)


def _shuffle_taps(taps: torch.Tensor) -> torch.Tensor:
    """(N, G, k*k, s, s, H, W) -> (N, G*k*k, H*s, W*s): the pixel shuffle, by permute. NB: not
    F.pixel_shuffle, whose backward returns a wrongly shaped gradient for an empty batch (torch 2.13:
    "PixelShuffleBackward0 returned an invalid gradient ... [0, ...]")."""
    n, g, k2, s, _, h, w = taps.shape
    return taps.permute(0, 1, 2, 5, 3, 6, 4).reshape(n, g * k2, h * s, w * s)  # via (N, G, k*k, H, s, W, s)


def normalize_mask_logits_jvp(mask_logits: torch.Tensor, tangent: torch.Tensor, kernel_size: int,
                              group_size: int, scale_factor: int) -> torch.Tensor:
    """The tangent of normalize_mask_logits at mask_logits in the direction tangent, (N, G*k*k, H*s, W*s):
    the softmax's derivative p * (dz - sum_t p * dz) over each group's k*k taps, then the same shuffle.
    Computed in float32 (at least) and returned in tangent's dtype. The native ops' forward-mode rule
    (carafe_kernels/ops.py) uses it: carafe_fused's jvp needs the normalised masks' tangent."""
    dtype = torch.promote_types(tangent.dtype, torch.float32)
    p = _grouped_taps(mask_logits, kernel_size, group_size, scale_factor).softmax(dim=2, dtype=dtype)
    dz = _grouped_taps(tangent, kernel_size, group_size, scale_factor).to(dtype)
    dp = p * (dz - (p * dz).sum(dim=2, keepdim=True))
    return _shuffle_taps(dp).to(tangent.dtype)


def carafe_reference(features: torch.Tensor, masks: torch.Tensor, kernel_size: int, group_size: int,
                     scale_factor: int) -> torch.Tensor:
    """out[n, c, y, x] = sum_{ky,kx} features[n, c, y//s + ky - r, x//s + kx - r] * masks[n, g*k*k + ky*k + kx, y, x]."""
    k, G, s = kernel_size, group_size, scale_factor
    N, C, H, W = features.shape
    r = (k - 1) // 2
    Cg = C // G
    padded = F.pad(features, (r, r, r, r)).view(N, G, Cg, H + 2 * r, W + 2 * r)
    # One view per tap, taken once: each is used s*s times, and autograd then keeps a single slice node per tap.
    windows = [padded[:, :, :, ky:ky + H, kx:kx + W] for ky in range(k) for kx in range(k)]  # (N, G, Cg, H, W)
    # masks (N, G*k*k, H*s, W*s) -> (s, s, k*k, N, G, 1, H, W): each (i, j, tap) slice contiguous over (H, W).
    # NB: unbind, not indexing per (i, j, tap): autograd's backward of an unbind is one stack, while each
    # index would zero-fill and add a full masks-sized gradient.
    sub_pixel_masks = masks.reshape(N, G, k * k, H, s, W, s).permute(4, 6, 2, 0, 1, 3, 5).contiguous().unsqueeze(5)
    partial_outputs = []  # s*s tensors (N, G, Cg, H, W), in (i, j) order
    for masks_i in sub_pixel_masks.unbind(0):
        for masks_ij in masks_i.unbind(0):
            acc = None
            for window, tap_mask in zip(windows, masks_ij.unbind(0)):
                acc = window * tap_mask if acc is None else acc.addcmul(window, tap_mask)
            partial_outputs.append(acc)
    # (N, G, Cg, H, W, s*s) -> (N, G, Cg, H, s, W, s): sub-pixel (i, j) of low-res (h, w) is output (h*s+i, w*s+j).
    out = torch.stack(partial_outputs, dim=-1).view(N, G, Cg, H, W, s, s).permute(0, 1, 2, 3, 5, 4, 6)
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


# --------------------------------------------------------------------------------------------------
# Content-aware downsampling (CARAFE++)
# --------------------------------------------------------------------------------------------------

def normalize_down_mask_logits(mask_logits: torch.Tensor, kernel_size: int, group_size: int) -> torch.Tensor:
    """(N, G*k*k, Ho, Wo) logits -> masks of the same shape: a softmax over each group's k*k taps."""
    n, _, ho, wo = mask_logits.shape
    k2 = kernel_size * kernel_size
    return mask_logits.reshape(n, group_size, k2, ho, wo).softmax(dim=2).reshape(n, group_size * k2, ho, wo)


def normalize_down_mask_logits_jvp(mask_logits: torch.Tensor, tangent: torch.Tensor, kernel_size: int,
                                   group_size: int, scale_factor: int) -> torch.Tensor:
    """The tangent of normalize_down_mask_logits at mask_logits in the direction tangent: the softmax's
    derivative p * (dz - sum_t p * dz) over each group's k*k taps, computed in float32 (at least) and
    returned in tangent's dtype (normalize_mask_logits_jvp without the shuffle). scale_factor is unused
    (the down logits are not shuffled); it is taken so that both jvps have the op's signature."""
    n, _, ho, wo = mask_logits.shape
    k2 = kernel_size * kernel_size
    dtype = torch.promote_types(tangent.dtype, torch.float32)
    p = mask_logits.reshape(n, group_size, k2, ho, wo).softmax(dim=2, dtype=dtype)
    dz = tangent.reshape(n, group_size, k2, ho, wo).to(dtype)
    dp = p * (dz - (p * dz).sum(dim=2, keepdim=True))
    return dp.reshape(tangent.shape).to(tangent.dtype)


def carafe_down_reference(features: torch.Tensor, masks: torch.Tensor, kernel_size: int, group_size: int,
                          scale_factor: int) -> torch.Tensor:
    """out[n, c, i, j] = sum_{ky,kx} features[n, c, s*i + ky - r, s*j + kx - r] * masks[n, g*k*k + ky*k + kx, i, j].

    One strided view of the zero-padded features per tap, multiplied by that tap's masks and accumulated
    into the (N, G, C/G, Ho, Wo) output: no unfold intermediate, the zero-padded input and two output-sized tensors at most."""
    k, G, s = kernel_size, group_size, scale_factor
    N, C, H, W = features.shape
    r = (k - 1) // 2
    Ho, Wo = down_output_size(H, s), down_output_size(W, s)
    padded = F.pad(features, (r, r, r, r)).view(N, G, C // G, H + 2 * r, W + 2 * r)
    # masks (N, G*k*k, Ho, Wo) -> (N, G, 1, k*k, Ho, Wo); tap t's masks are the view [:, :, :, t].
    # NB: one select per tap, not an unbind of the taps (which would give one backward node instead of
    # k*k): with unbind, torch.compile's Inductor (torch 2.13) computed a wrong features gradient when
    # G > 1 and the masks come from a softmax, as in carafe_down_fused (tests/test_carafe_down.py).
    group_masks = masks.reshape(N, G, 1, k * k, Ho, Wo)
    acc = None
    for tap in range(k * k):
        ky, kx = divmod(tap, k)
        tap_mask = group_masks[:, :, :, tap]
        # Rows s*i + ky for i < Ho: the last one, s*(Ho-1) + ky <= H - 1 + 2r, lies inside the padding.
        window = padded[:, :, :, ky:ky + s * (Ho - 1) + 1:s, kx:kx + s * (Wo - 1) + 1:s]
        acc = window * tap_mask if acc is None else acc.addcmul(window, tap_mask)
    return acc.reshape(N, C, Ho, Wo)


def carafe_down_fused_reference(features: torch.Tensor, mask_logits: torch.Tensor, kernel_size: int,
                                group_size: int, scale_factor: int) -> torch.Tensor:
    """carafe_down(features, softmax over each group's taps of mask_logits): what every fused kernel computes."""
    masks = normalize_down_mask_logits(mask_logits, kernel_size, group_size)
    return carafe_down_reference(features, masks, kernel_size, group_size, scale_factor)


def carafe_down_unfold(features: torch.Tensor, masks: torch.Tensor, kernel_size: int, group_size: int,
                       scale_factor: int) -> torch.Tensor:
    """The unofficial implementations' formulation: F.unfold at stride s (a (N, C*k*k, Ho*Wo) intermediate),
    multiply, sum. Only the baseline for tests and benchmarks."""
    k, G, s = kernel_size, group_size, scale_factor
    N, C, H, W = features.shape
    Ho, Wo = down_output_size(H, s), down_output_size(W, s)
    unfolded = F.unfold(features, k, padding=(k - 1) // 2, stride=s).view(N, G, C // G, k * k, Ho, Wo)
    return torch.einsum("ngckyx,ngkyx->ngcyx", unfolded, masks.view(N, G, k * k, Ho, Wo)).reshape(N, C, Ho, Wo)
