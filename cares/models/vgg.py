"""The VGG-16 encoder shared by SegNet and FCN-8s: five stages of 3x3 conv-BN-ReLU (2, 2, 3, 3, 3 convs at
64, 128, 256, 512, 512 channels), each followed by a 2x2 max-pool in the models that use it.

BatchNorm follows every conv (VGG-16-BN): the baselines are trained from scratch here, without the
ImageNet weights the original FCN and SegNet started from, and BN is what makes that train reliably.
"""
from __future__ import annotations

from torch import nn

from .blocks import ConvBNReLU

__all__ = ["VGG16_STAGES", "vgg_stage", "vgg16_encoder"]

VGG16_STAGES = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))  # (channels, convs)


def vgg_stage(in_channels: int, out_channels: int, convs: int) -> nn.Sequential:
    """``convs`` 3x3 conv-BN-ReLU, the first in_channels -> out_channels, the rest keeping out_channels."""
    return nn.Sequential(*(ConvBNReLU(in_channels if index == 0 else out_channels, out_channels)
                           for index in range(convs)))


def vgg16_encoder(in_channels: int) -> nn.ModuleList:
    """The five VGG16_STAGES as a ModuleList, the first taking ``in_channels`` (pooling is the model's)."""
    stages, previous = nn.ModuleList(), in_channels
    for channels, convs in VGG16_STAGES:
        stages.append(vgg_stage(previous, channels, convs))
        previous = channels
    return stages
