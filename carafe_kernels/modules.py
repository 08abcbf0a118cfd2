"""nn.Module wrappers with mmcv's names and constructor arguments, so code switches by import, and the
downsampler CARAFEDownPack (CARAFE++; mmcv has none), built the same way as CARAFEPack."""
from __future__ import annotations

import torch
from torch import nn

from .contract import check_int as _check_int
from .functional import carafe, carafe_down_fused, carafe_fused
from .registry import BACKENDS, requested_backend

__all__ = ["CARAFE", "CARAFENaive", "CARAFEPack", "CARAFEDownPack"]


def _refuse_torchscript(module: nn.Module) -> nn.Module:
    # torch.jit.script calls this first; the backend dispatch behind forward is Python, so scripting would
    # fail deep inside with an unrelated message (e.g. on the keyword-only backend argument).
    raise TypeError(f"{type(module).__name__} does not support torch.jit.script (TorchScript cannot follow "
                    "its backend dispatch). Use torch.export.export, torch.compile, or "
                    "torch.onnx.export(..., dynamo=True) instead; see carafe_kernels.onnx.")


class CARAFE(nn.Module):
    """CARAFE reassembly with given (already normalised) masks; mmcv's ``CARAFE``.

    Args:
        kernel_size: reassembly kernel size k (odd).
        group_size: G, the number of mask groups (divides the channels).
        scale_factor: integer upsampling ratio s.
        backend: "auto" (default), "reference", "cpu", "cuda" or "triton".

    Shape:
        features (N, C, H, W), masks (N, G*k*k, H*s, W*s) -> (N, C, H*s, W*s).
    """

    def __init__(self, kernel_size: int, group_size: int, scale_factor: int, *, backend: str = "auto"):
        super().__init__()
        self.kernel_size = _check_int("kernel_size", kernel_size, odd=True)
        self.group_size = _check_int("group_size", group_size)
        self.scale_factor = _check_int("scale_factor", scale_factor)
        requested_backend(backend)  # fail early on an unknown name
        self.backend = backend

    __prepare_scriptable__ = _refuse_torchscript

    def forward(self, features: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        return carafe(features, masks, self.kernel_size, self.group_size, self.scale_factor, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"kernel_size={self.kernel_size}, group_size={self.group_size}, "
                f"scale_factor={self.scale_factor}, backend={self.backend!r}")


class CARAFENaive(CARAFE):
    """mmcv's ``CARAFENaive``: :class:`CARAFE` on the pure-PyTorch reference backend (see
    :func:`carafe_naive`); same constructor (kernel_size, group_size, scale_factor) and forward."""

    def __init__(self, kernel_size: int, group_size: int, scale_factor: int):
        super().__init__(kernel_size, group_size, scale_factor, backend="reference")


class CARAFEPack(nn.Module):
    """The complete CARAFE upsampler (Wang et al., ICCV 2019), mmcv's ``CARAFEPack``.

    A 1x1 channel compressor, a content encoder predicting ``up_group*up_kernel**2*scale_factor**2``
    logits per low-res pixel, then the fused op (pixel shuffle + softmax + reassembly in one kernel).
    Parameter names (``channel_compressor``, ``content_encoder``) and initialisation (Xavier-uniform
    convs, content encoder N(0, 0.001)) follow mmcv, so an mmcv state_dict loads unchanged.

    Args:
        channels: input channels C.
        scale_factor: upsampling ratio s.
        up_kernel: reassembly kernel size k (odd), default 5.
        up_group: mask groups G, default 1.
        encoder_kernel: content-encoder kernel size, default 3.
        encoder_dilation: content-encoder dilation, default 1.
        compressed_channels: channels after the compressor, default 64.
        backend: "auto" (default), "reference", "cpu", "cuda" or "triton".

    Shape:
        (N, C, H, W) -> (N, C, H*s, W*s).

    Example:
        >>> up = CARAFEPack(64, scale_factor=2)
        >>> up(torch.randn(1, 64, 16, 16)).shape
        torch.Size([1, 64, 32, 32])
    """

    def __init__(self, channels: int, scale_factor: int, up_kernel: int = 5, up_group: int = 1,
                 encoder_kernel: int = 3, encoder_dilation: int = 1, compressed_channels: int = 64,
                 *, backend: str = "auto"):
        super().__init__()
        _set_pack_settings(self, channels, scale_factor, ("up_kernel", up_kernel), ("up_group", up_group),
                           encoder_kernel, encoder_dilation, compressed_channels)
        requested_backend(backend)
        self.backend = backend
        # The encoder predicts the s*s sub-pixels' kernels at each input position (stride 1).
        _add_kernel_prediction_convs(
            self, self.up_kernel * self.up_kernel * self.up_group * self.scale_factor * self.scale_factor, stride=1)

    def init_weights(self) -> None:
        _init_carafe_convs(self.channel_compressor, self.content_encoder)

    __prepare_scriptable__ = _refuse_torchscript

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.content_encoder(self.channel_compressor(x))
        return carafe_fused(x, logits, self.up_kernel, self.up_group, self.scale_factor, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, scale_factor={self.scale_factor}, up_kernel={self.up_kernel}, "
                f"up_group={self.up_group}, backend={self.backend!r}")


def _set_pack_settings(pack: nn.Module, channels, scale_factor, kernel: tuple[str, object], group: tuple[str, object],
                       encoder_kernel, encoder_dilation, compressed_channels) -> None:
    """Checks CARAFEPack's / CARAFEDownPack's shared arguments and sets them as attributes; `kernel` and
    `group` are (name, value): up_kernel/up_group or down_kernel/down_group, mmcv's names."""
    (kernel_name, kernel_value), (group_name, group_value) = kernel, group
    pack.channels = _check_int("channels", channels)
    pack.scale_factor = _check_int("scale_factor", scale_factor)
    setattr(pack, kernel_name, _check_int(kernel_name, kernel_value, odd=True))
    groups = _check_int(group_name, group_value)
    setattr(pack, group_name, groups)
    pack.encoder_kernel = _check_int("encoder_kernel", encoder_kernel, odd=True)
    pack.encoder_dilation = _check_int("encoder_dilation", encoder_dilation)
    pack.compressed_channels = _check_int("compressed_channels", compressed_channels)
    if pack.channels % groups != 0:
        raise ValueError(f"{group_name}={group_value} must divide channels={channels}")


def _add_kernel_prediction_convs(pack: nn.Module, logits: int, stride: int) -> None:
    """The kernel prediction module: a 1x1 channel compressor, then a content encoder giving `logits`
    channels at `stride` (padding keeps ceil(H/stride)), initialised as mmcv does."""
    pack.channel_compressor = nn.Conv2d(pack.channels, pack.compressed_channels, 1)
    pack.content_encoder = nn.Conv2d(
        pack.compressed_channels, logits, pack.encoder_kernel, stride=stride,
        padding=(pack.encoder_kernel - 1) * pack.encoder_dilation // 2, dilation=pack.encoder_dilation)
    pack.init_weights()


def _init_carafe_convs(channel_compressor: nn.Conv2d, content_encoder: nn.Conv2d) -> None:
    """mmcv's CARAFEPack initialisation: Xavier-uniform weights, zero biases, then the content encoder's
    weights N(0, 0.001): near-zero logits start every reassembly kernel close to a uniform average."""
    for m in (channel_compressor, content_encoder):
        nn.init.xavier_uniform_(m.weight)
        nn.init.zeros_(m.bias)
    nn.init.normal_(content_encoder.weight, std=0.001)


class CARAFEDownPack(nn.Module):
    """Content-aware downsampling (CARAFE++, Wang et al., TPAMI 2021, arXiv 2012.04733), the
    counterpart of :class:`CARAFEPack`.

    A 1x1 channel compressor (C -> compressed_channels), a content encoder run at stride s that predicts
    ``down_group * down_kernel**2`` logits per output pixel, then :func:`carafe_down_fused` (softmax over
    each group's k*k taps + reassembly of the k x k window centred on input pixel (s*i, s*j)). The
    encoder has padding ``(encoder_kernel - 1) * encoder_dilation // 2``, so its output, like the
    reassembly's, is ceil(H/s) x ceil(W/s): the size of a stride-s convolution with padding k // 2.
    Parameter names and initialisation (Xavier-uniform convs, zero biases, content encoder N(0, 0.001))
    are those of CARAFEPack (mmcv's style), so a fresh module starts close to a k x k average pooling.

    Defaults: the structure is CARAFE's kernel prediction module (compressor, content encoder, softmax)
    with the encoder at stride s. The parts of the CARAFE++ paper that could be read when this was
    written (its abstract and introduction) do not give the downsampling hyper-parameters, so the
    defaults are the CARAFE upsampler's published settings, which CARAFEPack uses too: down_kernel 5
    (k_up), encoder_kernel 3 (k_encoder), compressed_channels 64 (C_m), one group; scale_factor 2, the
    stride-2 stages it is meant to replace. Whether CARAFE++ uses other values for downsampling (another
    k_down, k_encoder or C_m) is not confirmed.

    Runs on every backend: "cpu", "cuda", "triton" and "reference" (see :func:`carafe_down`).

    Args:
        channels: input channels C.
        scale_factor: downsampling stride s, default 2.
        down_kernel: reassembly kernel size k (odd), default 5.
        down_group: mask groups G (divides channels), default 1.
        encoder_kernel: content-encoder kernel size (odd), default 3.
        encoder_dilation: content-encoder dilation, default 1.
        compressed_channels: channels after the compressor, default 64.
        backend: "auto" (default), "cpu", "cuda", "triton" or "reference"; a backend without the down op
            (none today) is a ValueError here.

    Shape:
        (N, C, H, W) -> (N, C, ceil(H/s), ceil(W/s)).

    Example:
        >>> down = CARAFEDownPack(64)
        >>> down(torch.randn(1, 64, 15, 16)).shape
        torch.Size([1, 64, 8, 8])
    """

    def __init__(self, channels: int, scale_factor: int = 2, down_kernel: int = 5, down_group: int = 1,
                 encoder_kernel: int = 3, encoder_dilation: int = 1, compressed_channels: int = 64,
                 *, backend: str = "auto"):
        super().__init__()
        _set_pack_settings(self, channels, scale_factor, ("down_kernel", down_kernel), ("down_group", down_group),
                           encoder_kernel, encoder_dilation, compressed_channels)
        requested_backend(backend)
        if backend != "auto" and BACKENDS[backend].carafe_down_fused is None:
            # Known now, whatever the machine: refused here rather than at the first forward (a cares
            # model built with carafe_backend=cpu would otherwise fail one training step in).
            raise ValueError(f"CARAFEDownPack: backend={backend!r} has no carafe_down kernel yet; use "
                             f"'auto' or {[name for name, b in BACKENDS.items() if b.carafe_down_fused]}")
        self.backend = backend
        # The encoder runs at stride s: one set of kernels per output position.
        _add_kernel_prediction_convs(self, self.down_kernel * self.down_kernel * self.down_group,
                                     stride=self.scale_factor)

    def init_weights(self) -> None:
        _init_carafe_convs(self.channel_compressor, self.content_encoder)

    __prepare_scriptable__ = _refuse_torchscript

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.content_encoder(self.channel_compressor(x))
        return carafe_down_fused(x, logits, self.down_kernel, self.down_group, self.scale_factor,
                                 backend=self.backend)

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, scale_factor={self.scale_factor}, down_kernel={self.down_kernel}, "
                f"down_group={self.down_group}, backend={self.backend!r}")
