"""Building blocks shared by every model in cares.models: one class per idea.

* ``ConvBNReLU``          3x3 (or kxk) conv without bias -> BatchNorm -> ReLU.
* ``ResidualBlock``       two 3x3 conv-BN with a skip (ResNet's basic block; CARes-UNet's residual block).
* ``ConvResidualBlock``   ConvBNReLU then ResidualBlock: every encoder/decoder stage of CARes-UNet.
* ``SegmentationModel``   base class: checks the input and says which spatial multiple a model needs.

Activations are ``nn.ReLU`` modules rather than ``F.relu`` calls so that hook-based counters
(the torchstat-style MAdd in ``cares.complexity``) see them.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

__all__ = ["ConvBNReLU", "ResidualBlock", "ConvResidualBlock", "SegmentationModel", "check_positive_int"]


def check_positive_int(name: str, value) -> int:
    """``value`` as an int >= 1, or a TypeError/ValueError that names the argument."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def check_base_channels(value) -> int:
    """The width option of the U-Net-shaped models: an even int >= 2 (widths are halved on the way up)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 2 or value % 2:
        raise ValueError(f"base_channels must be an even int >= 2, got {value!r}")
    return value


class ConvBNReLU(nn.Sequential):
    """Conv (no bias: BatchNorm's shift makes it redundant) -> BatchNorm -> ReLU.

    Shape: (N, in_channels, H, W) -> (N, out_channels, H / stride, W / stride) ("same" padding).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1):
        super().__init__(OrderedDict(
            conv=nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride,
                           padding=kernel_size // 2, bias=False),
            bn=nn.BatchNorm2d(out_channels),
            relu=nn.ReLU(inplace=True),
        ))


class ResidualBlock(nn.Module):
    """ResNet's basic block: relu(shortcut(x) + bn(conv(relu(bn(conv(x)))))) with 3x3 convs.

    The shortcut is the identity when the shape is kept (the only case CARes-UNet uses), else a
    strided 1x1 conv-BN projection (ResNet-34's first block of a stage). The projection is built only
    when forward uses it.

    Args:
        in_channels: input channels.
        out_channels: output channels (default: in_channels).
        stride: stride of the first conv (2 halves H and W).
        residual: False drops the shortcut, leaving conv-BN-ReLU-conv-BN-ReLU (the "CA-UNet" ablation,
            which keeps every parameter of the residual version).

    Shape: (N, in_channels, H, W) -> (N, out_channels, H / stride, W / stride).
    """

    def __init__(self, in_channels: int, out_channels: int | None = None, stride: int = 1,
                 residual: bool = True):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.residual = residual
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU(inplace=True)
        if residual and (stride != 1 or in_channels != out_channels):
            self.shortcut = nn.Sequential(OrderedDict(
                conv=nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                bn=nn.BatchNorm2d(out_channels),
            ))
        else:
            self.shortcut = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        if self.residual:
            out = out + (x if self.shortcut is None else self.shortcut(x))
        return self.relu2(out)


class ConvResidualBlock(nn.Sequential):
    """One CARes-UNet stage: ConvBNReLU(in -> out, stride) then ResidualBlock(out).

    With ``stride=2`` and in == out it is the encoder's downsampling step.

    Shape: (N, in_channels, H, W) -> (N, out_channels, H / stride, W / stride).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, residual: bool = True):
        super().__init__(OrderedDict(
            conv=ConvBNReLU(in_channels, out_channels, stride=stride),
            block=ResidualBlock(out_channels, residual=residual),
        ))


class SegmentationModel(nn.Module):
    """Base class of every model here: (N, in_channels, H, W) -> (N, num_classes, H, W) logits.

    ``size_multiple`` is what H and W must be divisible by (2 ** number of downsamplings);
    ``check_input`` raises a ValueError naming the shape it saw instead of failing deep inside a layer.
    """

    size_multiple: int = 1

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.in_channels = check_positive_int("in_channels", in_channels)
        self.num_classes = check_positive_int("num_classes", num_classes)

    def check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{type(self).__name__} expects a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"{type(self).__name__} expects input of shape (N, {self.in_channels}, H, W), "
                             f"got {tuple(x.shape)}")
        self.check_size(*x.shape[-2:], what=f"input shape {tuple(x.shape)}")

    def check_size(self, height: int, width: int, what: str | None = None) -> None:
        """Raise ValueError unless an input of height x width fits (both divisible by size_multiple):
        checked by forward, and beforehand by the commands that pick a size (train, export, complexity)."""
        if height % self.size_multiple or width % self.size_multiple:
            bad = height if height % self.size_multiple else width
            lower = max(bad // self.size_multiple, 1) * self.size_multiple
            raise ValueError(f"{type(self).__name__} needs H and W divisible by {self.size_multiple}, got "
                             f"{what or f'{height}x{width}'} (e.g. {lower} or {lower + self.size_multiple} fit)")
