"""FCN-8s (Long et al., CVPR 2015) on a VGG-16-BN encoder.

    pool3, pool4, pool5 = VGG-16 stages 3, 4, 5 (each ending in a 2x2 max-pool)   strides 8, 16, 32
    fc6 = 7x7 conv 512 -> 4096, ReLU, dropout; fc7 = 1x1 conv 4096 -> 4096, ReLU, dropout
    score = 1x1 conv 4096 -> num_classes
    score = up2(score) + score_pool4(pool4)          (1x1 conv 512 -> num_classes)
    score = up2(score) + score_pool3(pool3)          (1x1 conv 256 -> num_classes)
    logits = up8(score)

The up-samplers are transposed convs (4x4 stride 2, and 16x16 stride 8) initialised to bilinear
interpolation, as in the paper. Unlike the original Caffe model (conv1 padded by 100, outputs
cropped), every layer is padded so sizes line up exactly for inputs divisible by 32.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from .blocks import SegmentationModel
from .vgg import VGG16_STAGES, vgg16_encoder

__all__ = ["FCN8s", "bilinear_kernel_"]

FC_CHANNELS = 4096


@torch.no_grad()
def bilinear_kernel_(deconv: nn.ConvTranspose2d) -> None:
    """Initialise a transposed conv (C -> C channels, square kernel) to per-channel bilinear upsampling."""
    kernel_size = deconv.kernel_size[0]
    factor = (kernel_size + 1) // 2
    center = factor - 1 if kernel_size % 2 == 1 else factor - 0.5
    positions = torch.arange(kernel_size, dtype=deconv.weight.dtype, device=deconv.weight.device)
    taps = 1 - (positions - center).abs() / factor
    kernel = taps[:, None] * taps[None, :]
    deconv.weight.zero_()
    for channel in range(min(deconv.in_channels, deconv.out_channels)):
        deconv.weight[channel, channel] = kernel


class FCN8s(SegmentationModel):
    """FCN-8s. Shape: (N, in_channels, H, W) -> (N, num_classes, H, W); H and W divisible by 32."""

    size_multiple = 32

    def __init__(self, in_channels: int = 1, num_classes: int = 1, dropout: float = 0.5):
        super().__init__(in_channels, num_classes)
        self.stages = vgg16_encoder(in_channels)
        self.pool = nn.MaxPool2d(2, stride=2)
        self.classifier = nn.Sequential(OrderedDict(
            fc6=nn.Conv2d(VGG16_STAGES[-1][0], FC_CHANNELS, 7, padding=3),
            relu6=nn.ReLU(inplace=True),
            drop6=nn.Dropout2d(dropout),
            fc7=nn.Conv2d(FC_CHANNELS, FC_CHANNELS, 1),
            relu7=nn.ReLU(inplace=True),
            drop7=nn.Dropout2d(dropout),
            score=nn.Conv2d(FC_CHANNELS, num_classes, 1),
        ))
        pool3_channels, pool4_channels = VGG16_STAGES[2][0], VGG16_STAGES[3][0]
        self.score_pool4 = nn.Conv2d(pool4_channels, num_classes, 1)
        self.score_pool3 = nn.Conv2d(pool3_channels, num_classes, 1)
        self.upscore2 = nn.ConvTranspose2d(num_classes, num_classes, 4, stride=2, padding=1, bias=False)
        self.upscore_pool4 = nn.ConvTranspose2d(num_classes, num_classes, 4, stride=2, padding=1, bias=False)
        self.upscore8 = nn.ConvTranspose2d(num_classes, num_classes, 16, stride=8, padding=4, bias=False)
        for deconv in (self.upscore2, self.upscore_pool4, self.upscore8):
            bilinear_kernel_(deconv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        pooled = []
        for stage in self.stages:
            x = self.pool(stage(x))
            pooled.append(x)
        pool3, pool4, pool5 = pooled[2], pooled[3], pooled[4]
        score = self.upscore2(self.classifier(pool5)) + self.score_pool4(pool4)
        score = self.upscore_pool4(score) + self.score_pool3(pool3)
        return self.upscore8(score)
