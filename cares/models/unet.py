"""The plain U-Net baseline (Ronneberger et al., MICCAI 2015) in its common modern form: "same" padding
(so the output keeps the input size) and BatchNorm after every conv.

    encoder: double_conv(in -> 64), then 4 x [maxpool 2, double_conv(c -> 2c)] up to 1024 channels
    decoder: 4 x [2x2 transposed conv stride 2 (C -> C/2), concatenate the skip, double_conv(C -> C/2)]
    head:    1x1 conv 64 -> num_classes (logits)

The widths above are the original's (base_channels=64); base_channels=16 gives 16 ... 256, for
comparisons with a CARes-UNet of the same width.

double_conv = two 3x3 conv-BN-ReLU.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from .blocks import ConvBNReLU, SegmentationModel, check_base_channels

__all__ = ["UNet", "double_conv"]

UNET_WIDTH_MULTIPLIERS = (1, 2, 4, 8, 16)
PAPER_BASE_CHANNELS = 64


def double_conv(in_channels: int, out_channels: int) -> nn.Sequential:
    """Two 3x3 conv-BN-ReLU: (N, in_channels, H, W) -> (N, out_channels, H, W)."""
    return nn.Sequential(OrderedDict(
        conv1=ConvBNReLU(in_channels, out_channels),
        conv2=ConvBNReLU(out_channels, out_channels),
    ))


class UNet(SegmentationModel):
    """Plain U-Net. Shape: (N, in_channels, H, W) -> (N, num_classes, H, W); H, W divisible by 16."""

    size_multiple = 16

    def __init__(self, in_channels: int = 1, num_classes: int = 1, *, base_channels: int = PAPER_BASE_CHANNELS):
        super().__init__(in_channels, num_classes)
        widths = tuple(check_base_channels(base_channels) * m for m in UNET_WIDTH_MULTIPLIERS)
        self.encoders = nn.ModuleList()
        previous = in_channels
        for channels in widths:
            self.encoders.append(double_conv(previous, channels))
            previous = channels
        self.pool = nn.MaxPool2d(2)
        self.upsamplers = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for channels in reversed(widths[1:]):
            self.upsamplers.append(nn.ConvTranspose2d(channels, channels // 2, kernel_size=2, stride=2))
            self.decoders.append(double_conv(channels, channels // 2))
        self.head = nn.Conv2d(widths[0], num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        skips = []
        for index, encoder in enumerate(self.encoders):
            if index > 0:
                x = self.pool(x)
            x = encoder(x)
            skips.append(x)
        skips.pop()  # the bottleneck output is x itself, not a skip
        for upsample, decoder, skip in zip(self.upsamplers, self.decoders, reversed(skips)):
            x = decoder(torch.cat([skip, upsample(x)], dim=1))
        return self.head(x)
