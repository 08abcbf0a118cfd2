"""SegNet (Badrinarayanan et al., TPAMI 2017): a VGG-16-BN encoder whose max-pool indices drive the
decoder's max-unpooling, and a decoder that mirrors the encoder.

    encoder stage i: vgg_stage, then 2x2 max-pool (indices kept)                 5 stages, /32
    decoder stage i: max-unpool with stage i's indices, then the mirrored convs  deepest first

Each decoder stage has as many 3x3 conv-BN-ReLU as its encoder stage; its last conv maps to the channels
of the next (shallower) stage. The last conv of the last stage is the head: a plain 3x3 conv to
num_classes logits.
"""
from __future__ import annotations

import torch
from torch import nn

from .blocks import ConvBNReLU, MaxUnpool2x, SegmentationModel
from .vgg import VGG16_STAGES, vgg16_encoder, vgg_stage

__all__ = ["SegNet"]


class SegNet(SegmentationModel):
    """SegNet. Shape: (N, in_channels, H, W) -> (N, num_classes, H, W); H and W divisible by 32."""

    size_multiple = 32

    def __init__(self, in_channels: int = 1, num_classes: int = 1):
        super().__init__(in_channels, num_classes)
        self.encoders = vgg16_encoder(in_channels)
        self.pool = nn.MaxPool2d(2, stride=2, return_indices=True)
        self.unpool = MaxUnpool2x()  # runs under --deterministic (torch's max-unpool raises there)

        self.decoders = nn.ModuleList()
        stage_channels = [channels for channels, _ in VGG16_STAGES]
        for index in reversed(range(len(VGG16_STAGES))):
            channels, convs = VGG16_STAGES[index]
            if index == 0:  # the first stage's mirror ends with the head instead of a conv-BN-ReLU
                self.decoders.append(vgg_stage(channels, channels, convs - 1))
            else:
                layers = [ConvBNReLU(channels, channels) for _ in range(convs - 1)]
                layers.append(ConvBNReLU(channels, stage_channels[index - 1]))
                self.decoders.append(nn.Sequential(*layers))
        self.head = nn.Conv2d(stage_channels[0], num_classes, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        pool_indices = []
        for encoder in self.encoders:
            x, indices = self.pool(encoder(x))
            pool_indices.append(indices)
        for decoder, indices in zip(self.decoders, reversed(pool_indices)):
            x = decoder(self.unpool(x, indices))
        return self.head(x)
