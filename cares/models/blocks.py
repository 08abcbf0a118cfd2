"""Building blocks shared by every model in cares.models: one class per idea.

* ``ConvBNReLU``          3x3 (or kxk) conv without bias -> BatchNorm -> ReLU.
* ``ResidualBlock``       two 3x3 conv-BN with a skip (ResNet's basic block; CARes-UNet's residual block).
* ``ConvResidualBlock``   ConvBNReLU then ResidualBlock: every encoder/decoder stage of CARes-UNet.
* ``SegmentationModel``   base class: checks the input and says which spatial multiple a model needs.
* ``BilinearUpsample2x``, ``MaxUnpool2x``: nn.Upsample(x2, bilinear) and nn.MaxUnpool2d(2, 2) that
  keep working under ``torch.use_deterministic_algorithms(True)`` (``cares train --deterministic``),
  where torch has no deterministic CUDA bilinear backward and no deterministic max-unpool at all.
  ``nondeterministic_layers`` lists the layers of a model that would still raise.

Activations are ``nn.ReLU`` modules rather than ``F.relu`` calls so that hook-based counters
(the torchstat-style MAdd in ``cares.complexity``) see them.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

__all__ = ["ConvBNReLU", "ResidualBlock", "ConvResidualBlock", "SegmentationModel", "check_positive_int",
           "BilinearUpsample2x", "MaxUnpool2x", "bilinear_upsample_2x", "nondeterministic_layers"]


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


# ---------------------------------------------------------------------------------------------------
# Layers with a deterministic path
# ---------------------------------------------------------------------------------------------------

def bilinear_upsample_2x(x: torch.Tensor) -> torch.Tensor:
    """F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False) from slices and weighted
    sums, whose backward is deterministic on every device (torch's CUDA bilinear backward accumulates
    with atomics and raises under torch.use_deterministic_algorithms). With align_corners=False, output
    2i samples input i - 1/4 and 2i + 1 samples i + 1/4, clamped at the border: along each axis
    out[2i] = x[i-1]/4 + 3x[i]/4, out[2i+1] = 3x[i]/4 + x[i+1]/4 on the edge-replicated input."""
    def along(t: torch.Tensor, dim: int) -> torch.Tensor:
        size = t.shape[dim]
        first, last = t.narrow(dim, 0, 1), t.narrow(dim, size - 1, 1)
        padded = torch.cat([first, t, last], dim=dim)               # edge replication (the clamp)
        before, centre, after = (padded.narrow(dim, offset, size) for offset in (0, 1, 2))
        even = 0.25 * before + 0.75 * centre
        odd = 0.75 * centre + 0.25 * after
        stacked = torch.stack([even, odd], dim=dim + 1)              # (..., size, 2, ...) -> interleaved
        shape = list(t.shape)
        shape[dim] = 2 * size
        return stacked.reshape(shape)

    out = along(along(x, 3), 2)
    return out.contiguous(memory_format=torch.channels_last) if _is_channels_last(x) else out


def _is_channels_last(x: torch.Tensor) -> bool:
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


class BilinearUpsample2x(nn.Upsample):
    """nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False); under deterministic algorithms
    it computes the same values with bilinear_upsample_2x, whose backward is deterministic. The switch
    is on the setting, not the device, so CPU tests run the path that CUDA takes."""

    def __init__(self):
        super().__init__(scale_factor=2, mode="bilinear", align_corners=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.are_deterministic_algorithms_enabled():
            return bilinear_upsample_2x(x)
        return super().forward(x)


class MaxUnpool2x(nn.MaxUnpool2d):
    """nn.MaxUnpool2d(2, stride=2) for the indices of a MaxPool2d(2, stride=2, return_indices=True).
    torch's max-unpool raises under deterministic algorithms on every device (it assumes indices may
    repeat); the indices of a non-overlapping 2x2 pool never do, so there a scatter into zeros
    (deterministic, its backward a gather) gives the same result."""

    def __init__(self):
        super().__init__(2, stride=2)

    def forward(self, x: torch.Tensor, indices: torch.Tensor, output_size=None) -> torch.Tensor:
        if not torch.are_deterministic_algorithms_enabled():
            return super().forward(x, indices, output_size)
        N, C, H, W = x.shape
        out_h, out_w = (2 * H, 2 * W) if output_size is None else tuple(output_size)[-2:]
        flat = x.new_zeros(N, C, out_h * out_w).scatter(2, indices.reshape(N, C, H * W), x.reshape(N, C, H * W))
        out = flat.view(N, C, out_h, out_w)
        return out.contiguous(memory_format=torch.channels_last) if _is_channels_last(x) else out


# Layers torch refuses to run (or to differentiate) under deterministic algorithms, by device type
# (torch.use_deterministic_algorithms' documentation), that cares' models do not replace above.
_NONDETERMINISTIC = {
    "cuda": (nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool2d, nn.AvgPool3d,
             nn.FractionalMaxPool2d, nn.FractionalMaxPool3d, nn.ReflectionPad1d, nn.ReflectionPad2d,
             nn.ReflectionPad3d, nn.MaxUnpool1d, nn.MaxUnpool2d, nn.MaxUnpool3d),
    "cpu": (nn.MaxUnpool1d, nn.MaxUnpool2d, nn.MaxUnpool3d),
}
_LINEAR_MODES = ("linear", "bilinear", "bicubic", "trilinear")


def nondeterministic_layers(model: nn.Module, device: torch.device | str) -> list[str]:
    """The layers of model ("name (Type)") that raise under torch.use_deterministic_algorithms(True) on
    device when trained; empty when the model can train deterministically there. Checked by module
    type: a functional call inside a forward (F.interpolate) is not seen."""
    device_type = torch.device(device).type
    found = []
    for name, module in model.named_modules():
        if isinstance(module, (BilinearUpsample2x, MaxUnpool2x)):
            continue
        bad = isinstance(module, _NONDETERMINISTIC.get(device_type, ()))
        if device_type == "cuda" and isinstance(module, nn.Upsample) and module.mode in _LINEAR_MODES:
            bad = True
        if bad:
            detail = f", mode {module.mode}" if isinstance(module, nn.Upsample) else ""
            found.append(f"{name or 'the model'} ({type(module).__name__}{detail})")
    return found
