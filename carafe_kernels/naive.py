"""CARAFE as the formula reads: scalar loops over every output element and tap.

The obviously correct definition (docs/design.md#the-contract), kept beside the optimised reference
(carafe_kernels/reference.py), which tests/test_reference.py checks against it on tiny shapes. Slow
(Python loops, N*C*H*s*W*s*k*k scalar multiply-adds) and float64 only; never used as a backend.
"""
from __future__ import annotations

import itertools
import math

import torch

__all__ = ["carafe_naive", "normalize_mask_logits_naive", "carafe_fused_naive", "carafe_down_naive",
           "carafe_down_fused_naive"]


def carafe_naive(features: torch.Tensor, masks: torch.Tensor, k: int, G: int, s: int) -> torch.Tensor:
    """out[n, c, y, x] = sum_{ky, kx} features[n, c, y//s + ky - r, x//s + kx - r] * masks[n, g*k*k + ky*k + kx, y, x],
    g = c // (C // G), r = (k - 1) // 2; one output element at a time, taps outside the image skipped
    (zero padding)."""
    N, C, H, W = features.shape
    r = (k - 1) // 2
    f = features.tolist()
    m = masks.tolist()
    out = torch.zeros(N, C, H * s, W * s, dtype=torch.float64)
    for n, c, y, x in itertools.product(range(N), range(C), range(H * s), range(W * s)):
        g = c // (C // G)
        acc = 0.0
        for ky, kx in itertools.product(range(k), range(k)):
            iy, ix = y // s + ky - r, x // s + kx - r
            if 0 <= iy < H and 0 <= ix < W:
                acc += f[n][c][iy][ix] * m[n][g * k * k + ky * k + kx][y][x]
        out[n, c, y, x] = acc
    return out


def normalize_mask_logits_naive(logits: torch.Tensor, k: int, G: int, s: int) -> torch.Tensor:
    """masks[n, g*k*k + t, y, x] = softmax over t of logits[n, (g*k*k + t)*s*s + (y%s)*s + (x%s), y//s, x//s]:
    the channel order of the contract, written without pixel_shuffle."""
    N, _, H, W = logits.shape
    lg = logits.tolist()
    masks = torch.zeros(N, G * k * k, H * s, W * s, dtype=torch.float64)
    for n, g, y, x in itertools.product(range(N), range(G), range(H * s), range(W * s)):
        sub = (y % s) * s + (x % s)
        values = [lg[n][(g * k * k + t) * s * s + sub][y // s][x // s] for t in range(k * k)]
        top = max(values)
        exps = [math.exp(v - top) for v in values]
        total = sum(exps)
        for t in range(k * k):
            masks[n, g * k * k + t, y, x] = exps[t] / total
    return masks


def carafe_fused_naive(features: torch.Tensor, mask_logits: torch.Tensor, k: int, G: int, s: int) -> torch.Tensor:
    """carafe_naive of the normalised masks: what carafe_fused computes."""
    return carafe_naive(features, normalize_mask_logits_naive(mask_logits, k, G, s), k, G, s)


def carafe_down_naive(features: torch.Tensor, masks: torch.Tensor, k: int, G: int, s: int) -> torch.Tensor:
    """Content-aware downsampling (CARAFE++): out[n, c, i, j] = sum_{ky, kx} features[n, c, s*i + ky - r,
    s*j + kx - r] * masks[n, g*k*k + ky*k + kx, i, j] for i < ceil(H/s), j < ceil(W/s), g = c // (C // G),
    r = (k - 1) // 2; taps outside the image skipped (zero padding)."""
    N, C, H, W = features.shape
    Ho, Wo = -(-H // s), -(-W // s)
    r = (k - 1) // 2
    f = features.tolist()
    m = masks.tolist()
    out = torch.zeros(N, C, Ho, Wo, dtype=torch.float64)
    for n, c, i, j in itertools.product(range(N), range(C), range(Ho), range(Wo)):
        g = c // (C // G)
        acc = 0.0
        for ky, kx in itertools.product(range(k), range(k)):
            iy, ix = s * i + ky - r, s * j + kx - r
            if 0 <= iy < H and 0 <= ix < W:
                acc += f[n][c][iy][ix] * m[n][g * k * k + ky * k + kx][i][j]
        out[n, c, i, j] = acc
    return out


def carafe_down_fused_naive(features: torch.Tensor, mask_logits: torch.Tensor, k: int, G: int, s: int) -> torch.Tensor:
    """carafe_down_naive of the logits softmaxed over each group's k*k taps, one pixel at a time."""
    N, _, Ho, Wo = mask_logits.shape
    lg = mask_logits.tolist()
    masks = torch.zeros(N, G * k * k, Ho, Wo, dtype=torch.float64)
    for n, g, i, j in itertools.product(range(N), range(G), range(Ho), range(Wo)):
        values = [lg[n][g * k * k + t][i][j] for t in range(k * k)]
        top = max(values)
        exps = [math.exp(v - top) for v in values]
        for t in range(k * k):
            masks[n, g * k * k + t, i, j] = exps[t] / sum(exps)
    return carafe_down_naive(features, masks, k, G, s)
