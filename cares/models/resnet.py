"""U-Net with a ResNet-34 encoder (the "UNet-ResNet34" baseline), written here: no torchvision, no
downloaded weights (trained from scratch like every other model).

ResNet-34 (He et al., CVPR 2016) adapted to ``in_channels`` inputs (the stem conv takes 1 channel for CT
instead of 3); the classification head (avgpool + fc) is dropped. Stages and output strides::

    stem   7x7 conv stride 2 (in -> 64)-BN-ReLU            stride 2,  64 ch   (skip)
    layer1 maxpool 3x3/2, 3 basic blocks                   stride 4,  64 ch   (skip)
    layer2 4 basic blocks, first strided                   stride 8,  128 ch  (skip)
    layer3 6 basic blocks, first strided                   stride 16, 256 ch  (skip)
    layer4 3 basic blocks, first strided                   stride 32, 512 ch

Decoder (the layout of segmentation_models_pytorch's Unet, decoder channels 256-128-64-32-16): five
steps of [nearest x2 upsampling, concatenate the skip of that resolution (none at full resolution),
two 3x3 conv-BN-ReLU], then a 3x3 conv head to num_classes logits.
"""
from __future__ import annotations

import torch
from torch import nn

from .blocks import ConvBNReLU, ResidualBlock, SegmentationModel
from .unet import double_conv

__all__ = ["ResNet34Encoder", "UNetResNet34"]

RESNET34_STAGES = ((64, 3), (128, 4), (256, 6), (512, 3))  # (channels, basic blocks)
DECODER_CHANNELS = (256, 128, 64, 32, 16)


class ResNet34Encoder(nn.Module):
    """ResNet-34 features. forward returns [stem, layer1, layer2, layer3, layer4] at strides 2..32.

    Shape: (N, in_channels, H, W) -> list of (N, 64, H/2, W/2), (N, 64, H/4, W/4), (N, 128, H/8, W/8),
    (N, 256, H/16, W/16), (N, 512, H/32, W/32).
    """

    def __init__(self, in_channels: int = 1):
        super().__init__()
        self.stem = ConvBNReLU(in_channels, 64, kernel_size=7, stride=2)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layers = nn.ModuleList()
        previous = 64
        for index, (channels, blocks) in enumerate(RESNET34_STAGES):
            stride = 1 if index == 0 else 2
            stage = [ResidualBlock(previous, channels, stride=stride)]
            stage += [ResidualBlock(channels) for _ in range(blocks - 1)]
            self.layers.append(nn.Sequential(*stage))
            previous = channels
        self.out_channels = (64, *(channels for channels, _ in RESNET34_STAGES))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = [self.stem(x)]
        x = self.maxpool(features[0])
        for layer in self.layers:
            x = layer(x)
            features.append(x)
        return features


class UNetResNet34(SegmentationModel):
    """U-Net decoder on ResNet34Encoder. Shape: (N, in_channels, H, W) -> (N, num_classes, H, W);
    H and W divisible by 32."""

    size_multiple = 32

    def __init__(self, in_channels: int = 1, num_classes: int = 1):
        super().__init__(in_channels, num_classes)
        self.encoder = ResNet34Encoder(in_channels)
        # Skips for the decoder steps, deepest first: layer3, layer2, layer1, stem, none (full resolution).
        skip_channels = (*reversed(self.encoder.out_channels[:-1]), 0)
        self.decoders = nn.ModuleList()
        previous = self.encoder.out_channels[-1]
        for skip, channels in zip(skip_channels, DECODER_CHANNELS):
            self.decoders.append(double_conv(previous + skip, channels))
            previous = channels
        self.upsample = nn.Upsample(scale_factor=2, mode="nearest")
        self.head = nn.Conv2d(previous, num_classes, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        features = self.encoder(x)
        x = features.pop()
        skips = list(reversed(features)) + [None]
        for decoder, skip in zip(self.decoders, skips):
            x = self.upsample(x)
            if skip is not None:
                x = torch.cat([x, skip], dim=1)
            x = decoder(x)
        return self.head(x)
