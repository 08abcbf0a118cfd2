"""CARes-UNet (Xu et al., "CARes-UNet: Content-aware residual UNet for lesion segmentation of COVID-19
from chest CT images", Med Phys 2021) and its ablations CA-UNet (no residual connections) and Res-UNet
(transposed-conv upsampling).

Architecture, as in the authors' released code (github.com/zylye123/CARes-UNet, model.py), with
channels c = 64, 128, 256, 512 and every "block" = 3x3 conv-BN-ReLU + residual block::

    x1 = block(in -> 64)                                    256 x 256   (for a 256 x 256 input)
    x2 = block(64 -> 128)(down(64))                         128
    x3 = block(128 -> 256)(down(128))                        64
    x4 = block(256 -> 512)(down(256))                        32
    x5 = block(512 -> 1024)(down(512))     bottleneck        16
    d4 = block(1024 -> 512)(cat[x4, up(x5)])                 32
    d3 = block(512 -> 256)(cat[x3, up(d4)])                  64
    d2 = block(256 -> 128)(cat[x2, up(d3)])                 128
    d1 = block(128 -> 64)(cat[x1, up(d2)])                  256
    logits = conv1x1(64 -> num_classes)(d1)

down(c) = stride-2 3x3 conv-BN-ReLU (c -> c) + residual block; up(C) = CARAFE (compress C -> 64, 3x3
content encoder, k_up 5, scale 2) then a 1x1 conv C -> C/2 (with bias) at the upsampled resolution.
Convs followed by BatchNorm have no bias. The network returns logits (the released code applies a
sigmoid in forward; here the loss and the inference code apply it).

Differences from the released code, both deliberate:
* Its residual block also builds a 1x1 conv-BN projection that forward never runs (every residual
  block there keeps its channel count): 2.10 M parameters. It is not built here, so the released
  56.52 M parameters become 54.42 M. Forward is unchanged.
* Its head has 2 output channels followed by a sigmoid; here num_classes (default 1) logits.

At 1 x 1 x 256 x 256 this gives 54.42 M parameters and 157.97 GFLOPs (FlopCounterMode convention,
FLOPs = 2 x multiply-adds, CARAFE reassembly counted as 2*N*C*Hout*Wout*k_up^2), the paper's figures;
tests/test_complexity.py checks both.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from carafe_kernels import CARAFEDownPack, CARAFEPack

from .blocks import BilinearUpsample2x, ConvResidualBlock, ResidualBlock, SegmentationModel, check_base_channels

__all__ = ["CAResUNet", "UPSAMPLERS", "DOWNSAMPLERS", "make_upsampler", "make_downsampler", "CARAFEUpsampler"]

# Encoder widths are base_channels times these; the bottleneck is 16 x base_channels (the paper: 64 -> 1024).
ENCODER_WIDTH_MULTIPLIERS = (1, 2, 4, 8)
BOTTLENECK_WIDTH_MULTIPLIER = 16
PAPER_BASE_CHANNELS = 64
CARAFE_COMPRESSED_CHANNELS = 64
UPSAMPLERS = ("carafe", "deconv", "subpixel", "bilinear")
DOWNSAMPLERS = ("conv", "carafe")  # the paper's stride-2 conv first (the default)


class CARAFEUpsampler(nn.Sequential):
    """CARAFE x2 (CARAFEPack: compress to 64 channels, 3x3 content encoder, k_up 5) then a 1x1 conv
    halving the channels, as in the released code (the conv runs after upsampling). Narrow models
    (fewer than 64 channels here) compress to their own width rather than expanding.

    Shape: (N, C, H, W) -> (N, C // 2, 2H, 2W).
    """

    def __init__(self, channels: int, backend: str = "auto"):
        super().__init__(OrderedDict(
            carafe=CARAFEPack(channels, scale_factor=2, up_kernel=5, up_group=1, encoder_kernel=3,
                              encoder_dilation=1,
                              compressed_channels=min(CARAFE_COMPRESSED_CHANNELS, channels), backend=backend),
            reduce=nn.Conv2d(channels, channels // 2, 1),
        ))


def make_upsampler(kind: str, channels: int, carafe_backend: str = "auto") -> nn.Module:
    """A x2 upsampler (N, C, H, W) -> (N, C // 2, 2H, 2W) for the paper's upsampler ablation.

    * ``carafe``: CARAFEUpsampler (CARAFE then 1x1 conv C -> C/2).
    * ``deconv``: 2x2 transposed conv with stride 2, C -> C/2 (U-Net's up-convolution).
    * ``subpixel``: sub-pixel convolution (Shi et al., ESPCN): 3x3 conv C -> 4 * C/2, pixel shuffle.
    * ``bilinear``: bilinear interpolation then the same 1x1 conv C -> C/2 as the CARAFE variant.
    """
    if kind == "carafe":
        return CARAFEUpsampler(channels, backend=carafe_backend)
    if kind == "deconv":
        return nn.ConvTranspose2d(channels, channels // 2, kernel_size=2, stride=2)
    if kind == "subpixel":
        return nn.Sequential(OrderedDict(
            conv=nn.Conv2d(channels, (channels // 2) * 4, 3, padding=1),
            shuffle=nn.PixelShuffle(2),
        ))
    if kind == "bilinear":
        return nn.Sequential(OrderedDict(
            interpolate=BilinearUpsample2x(),  # deterministic under --deterministic, on CUDA too
            reduce=nn.Conv2d(channels, channels // 2, 1),
        ))
    raise ValueError(f"upsampler must be one of {UPSAMPLERS}, got {kind!r}")


def make_downsampler(kind: str, channels: int, residual: bool = True, carafe_backend: str = "auto") -> nn.Module:
    """An encoder x2 downsampling stage (N, C, H, W) -> (N, C, H/2, W/2).

    * ``conv`` (the paper's): stride-2 3x3 conv-BN-ReLU, then a residual block.
    * ``carafe``: the stride-2 conv-BN-ReLU replaced by content-aware downsampling (CARAFE++,
      CARAFEDownPack: compress to 64 channels, or the stage's width when narrower, as the upsampler
      does; 3x3 content encoder at stride 2; 5x5 reassembly kernels), then the same residual block.
      The downsampling is a content-weighted average of each 5x5 window, so the stage no longer mixes
      channels before its residual block (which does).
    """
    if kind == "conv":
        return ConvResidualBlock(channels, channels, stride=2, residual=residual)
    if kind == "carafe":
        return nn.Sequential(OrderedDict(
            carafe=CARAFEDownPack(channels, scale_factor=2, down_kernel=5, down_group=1, encoder_kernel=3,
                                  compressed_channels=min(CARAFE_COMPRESSED_CHANNELS, channels),
                                  backend=carafe_backend),
            block=ResidualBlock(channels, residual=residual),
        ))
    raise ValueError(f"downsampler must be one of {DOWNSAMPLERS}, got {kind!r}")


class CAResUNet(SegmentationModel):
    """CARes-UNet and its ablations; see the module docstring for the layer list.

    Args:
        in_channels: input channels (1 for CT).
        num_classes: output logit channels.
        residual: False removes the residual connections (CA-UNet).
        upsampler: "carafe" (default), "deconv", "subpixel" or "bilinear" (see make_upsampler).
        downsampler: "conv" (default, the paper's stride-2 convolutions) or "carafe" (content-aware
            downsampling, CARAFE++; see make_downsampler).
        carafe_backend: CARAFE backend passed to CARAFEPack and CARAFEDownPack ("auto", "reference", "cpu", ...).
        base_channels: width of the first encoder block (the paper's 64); encoder blocks have
            base_channels x (1, 2, 4, 8) channels, the bottleneck 16 x base_channels. Narrower models
            are for quick runs on a CPU (the demo, tests).

    Shape: (N, in_channels, H, W) -> (N, num_classes, H, W) logits; H and W divisible by 16.
    """

    size_multiple = 16

    def __init__(self, in_channels: int = 1, num_classes: int = 1, *, residual: bool = True,
                 upsampler: str = "carafe", downsampler: str = "conv", carafe_backend: str = "auto",
                 base_channels: int = PAPER_BASE_CHANNELS):
        super().__init__(in_channels, num_classes)
        if upsampler not in UPSAMPLERS:
            raise ValueError(f"upsampler must be one of {UPSAMPLERS}, got {upsampler!r}")
        if downsampler not in DOWNSAMPLERS:
            raise ValueError(f"downsampler must be one of {DOWNSAMPLERS}, got {downsampler!r}")
        if not isinstance(residual, bool):
            raise TypeError(f"residual must be a bool, got {type(residual).__name__} ({residual!r})")
        check_base_channels(base_channels)
        self.upsampler = upsampler
        self.downsampler = downsampler
        encoder_channels = tuple(base_channels * m for m in ENCODER_WIDTH_MULTIPLIERS)
        bottleneck_channels = base_channels * BOTTLENECK_WIDTH_MULTIPLIER

        self.encoders = nn.ModuleList()
        self.downsamplers = nn.ModuleList()
        previous = in_channels
        for channels in encoder_channels:
            self.encoders.append(ConvResidualBlock(previous, channels, residual=residual))
            self.downsamplers.append(make_downsampler(downsampler, channels, residual, carafe_backend))
            previous = channels
        self.bottleneck = ConvResidualBlock(previous, bottleneck_channels, residual=residual)

        # Decoder, deepest first: upsample C -> C/2, concatenate the skip (C/2), block C -> C/2.
        self.upsamplers = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for channels in (bottleneck_channels, *reversed(encoder_channels[1:])):
            self.upsamplers.append(make_upsampler(upsampler, channels, carafe_backend))
            self.decoders.append(ConvResidualBlock(channels, channels // 2, residual=residual))
        self.head = nn.Conv2d(encoder_channels[0], num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        skips = []
        for encoder, downsample in zip(self.encoders, self.downsamplers):
            x = encoder(x)
            skips.append(x)
            x = downsample(x)
        x = self.bottleneck(x)
        for upsample, decoder, skip in zip(self.upsamplers, self.decoders, reversed(skips)):
            x = decoder(torch.cat([skip, upsample(x)], dim=1))
        return self.head(x)
