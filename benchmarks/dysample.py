"""DySample (Liu, Lu, Fu, Cao, "Learning to Upsample by Learning to Sample", ICCV 2023), written from the
paper as a baseline for benchmarks/resamplers.py. It is not part of the package.

DySample upsamples by point sampling: a 1x1 convolution predicts, for each of the s*s output positions of a
low-resolution pixel and each of `groups` channel groups, an (x, y) offset; the offset, scaled by a static
scope factor of 0.25 (the paper's default: it keeps neighbouring sampling points from overlapping), is
added to the position the output pixel would have under plain bilinear upsampling, and the features are
sampled there bilinearly with `grid_sample`.

Two styles:
  lp  "linear, then pixel shuffle": the 1x1 conv runs on the low-resolution input and predicts
      2 * groups * s^2 offset channels, which a pixel shuffle arranges at the output resolution;
  pl  "pixel shuffle, then linear": the input is pixel-shuffled to (C / s^2, sH, sW) first, a 1x1 conv
      predicts 2 * groups offsets per output pixel, and a pixel unshuffle brings them back into the
      lp layout. Fewer parameters; needs C divisible by s^2.
The offset conv starts at N(0, 0.001) with zero bias, so a fresh DySample is bilinear upsampling.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

STATIC_SCOPE = 0.25


class DySample(nn.Module):
    """(N, C, H, W) -> (N, C, H*scale, W*scale) by content-dependent bilinear point sampling."""

    def __init__(self, channels: int, scale: int = 2, style: str = "lp", groups: int = 4):
        super().__init__()
        if style not in ("lp", "pl"):
            raise ValueError(f"style must be 'lp' or 'pl', got {style!r}")
        if channels % groups:
            raise ValueError(f"channels ({channels}) must be divisible by groups ({groups})")
        if style == "pl" and channels % (scale * scale):
            raise ValueError(f"style 'pl' needs channels ({channels}) divisible by scale^2 ({scale * scale})")
        self.scale, self.style, self.groups = scale, style, groups
        if style == "lp":
            self.offset = nn.Conv2d(channels, 2 * groups * scale * scale, 1)
        else:
            self.offset = nn.Conv2d(channels // (scale * scale), 2 * groups, 1)
        nn.init.normal_(self.offset.weight, std=0.001)
        nn.init.zeros_(self.offset.bias)

    def sub_pixel_position(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Where each of the s*s sub-pixels of a low-res pixel sits relative to the pixel's centre, in
        low-res pixel units ((i + 0.5) / s - 0.5 for i < s), laid out as the offset channels are:
        (x or y, group, sub-pixel row * s + sub-pixel column). Computed in the input's dtype (a float32
        buffer would round 1/3 before a float64 module saw it)."""
        s, g = self.scale, self.groups
        centres = (torch.arange(s, dtype=dtype, device=device) + 0.5) / s - 0.5
        sub_y, sub_x = torch.meshgrid(centres, centres, indexing="ij")
        position = torch.stack([sub_x.flatten(), sub_y.flatten()])                 # (2, s*s)
        return position[:, None, :].expand(2, g, s * s).reshape(1, -1, 1, 1)

    def offsets(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 2 * groups * s^2, H, W): x offsets for every (group, sub-pixel), then y offsets."""
        if self.style == "lp":
            return self.offset(x) * STATIC_SCOPE
        return F.pixel_unshuffle(self.offset(F.pixel_shuffle(x, self.scale)), self.scale) * STATIC_SCOPE

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        s, g = self.scale, self.groups
        position = self.offsets(x) + self.sub_pixel_position(x.dtype, x.device)    # low-res pixel units
        # Absolute sampling points at the output resolution: the low-res pixel centres plus the positions.
        centre_x = torch.arange(w, dtype=x.dtype, device=x.device) + 0.5
        centre_y = torch.arange(h, dtype=x.dtype, device=x.device) + 0.5
        position = position.view(n, 2, g * s * s, h, w)
        x_points = position[:, 0] + centre_x.view(1, 1, 1, w)
        y_points = position[:, 1] + centre_y.view(1, 1, h, 1)
        # grid_sample's normalised coordinates (align_corners=False: -1 and 1 are the outer pixel edges).
        grid = torch.stack([2 * x_points / w - 1, 2 * y_points / h - 1], dim=1)    # (n, 2, g*s*s, h, w)
        grid = F.pixel_shuffle(grid.reshape(n, 2 * g * s * s, h, w), s)            # (n, 2*g, s*h, s*w)
        grid = grid.view(n, 2, g, s * h, s * w).permute(0, 2, 3, 4, 1).reshape(n * g, s * h, s * w, 2)
        sampled = F.grid_sample(x.reshape(n * g, c // g, h, w), grid, mode="bilinear", padding_mode="border",
                                align_corners=False)
        return sampled.view(n, c, s * h, s * w)
