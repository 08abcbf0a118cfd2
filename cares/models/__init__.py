"""Model registry: ``build_model(name, in_channels=1, num_classes=1, **options)``.

Every model maps (N, in_channels, H, W) -> (N, num_classes, H, W) logits (apply a sigmoid for
probabilities) and subclasses ``SegmentationModel`` (``size_multiple``: what H and W must divide by).

Names (``MODEL_NAMES``):
    cares_unet      CARes-UNet (Xu et al. 2021): residual blocks + CARAFE upsampling.
                    options: upsampler ("carafe", "deconv", "subpixel", "bilinear"), downsampler
                    ("conv", the paper's stride-2 convolutions, or "carafe", content-aware downsampling),
                    carafe_backend, base_channels (the paper's 64).
    ca_unet         CARes-UNet without residual connections. options: upsampler, downsampler,
                    carafe_backend, base_channels.
    res_unet        CARes-UNet with 2x2 transposed-conv upsampling (= cares_unet[upsampler=deconv]).
    unet            plain U-Net (transposed-conv upsampling, BatchNorm). options: base_channels.
    unet_resnet34   U-Net decoder on a ResNet-34 encoder (written here; no pretrained weights).
    segnet          SegNet (VGG-16-BN encoder, max-unpooling decoder).
    fcn             FCN-8s (VGG-16-BN encoder). options: dropout.

A name may carry options in brackets, the form used for the report's ablation rows:
``build_model("cares_unet[upsampler=deconv]")`` == ``build_model("cares_unet", upsampler="deconv")``.
"""
from __future__ import annotations

import inspect
import re
from typing import Any, Callable

from .blocks import SegmentationModel
from .cares_unet import DOWNSAMPLERS, UPSAMPLERS, CAResUNet
from .fcn import FCN8s
from .resnet import UNetResNet34
from .segnet import SegNet
from .unet import UNet

__all__ = ["MODEL_NAMES", "ABLATION_VARIANTS", "UPSAMPLERS", "DOWNSAMPLERS", "build_model", "register_model",
           "unregister_model", "parse_model_spec", "parse_model_option",
           "model_options", "SegmentationModel", "CAResUNet", "UNet", "UNetResNet34", "SegNet", "FCN8s"]


def _cares_unet(in_channels: int, num_classes: int, *, upsampler: str = "carafe", downsampler: str = "conv",
                carafe_backend: str = "auto", base_channels: int = 64) -> CAResUNet:
    return CAResUNet(in_channels, num_classes, upsampler=upsampler, downsampler=downsampler,
                     carafe_backend=carafe_backend, base_channels=base_channels)


def _ca_unet(in_channels: int, num_classes: int, *, upsampler: str = "carafe", downsampler: str = "conv",
             carafe_backend: str = "auto", base_channels: int = 64) -> CAResUNet:
    return CAResUNet(in_channels, num_classes, residual=False, upsampler=upsampler, downsampler=downsampler,
                     carafe_backend=carafe_backend, base_channels=base_channels)


def _res_unet(in_channels: int, num_classes: int) -> CAResUNet:
    return CAResUNet(in_channels, num_classes, upsampler="deconv")


def _fcn(in_channels: int, num_classes: int, *, dropout: float = 0.5) -> FCN8s:
    return FCN8s(in_channels, num_classes, dropout=dropout)


_BUILDERS: dict[str, Callable[..., SegmentationModel]] = {
    "cares_unet": _cares_unet,
    "ca_unet": _ca_unet,
    "res_unet": _res_unet,
    "unet": UNet,
    "unet_resnet34": UNetResNet34,
    "segnet": SegNet,
    "fcn": _fcn,
}

MODEL_NAMES: tuple[str, ...] = tuple(_BUILDERS)  # the built-in models (register_model adds more)


def register_model(name: str, builder: Callable[..., SegmentationModel], *, overwrite: bool = False) -> None:
    """Make ``build_model(name, in_channels, num_classes, **options)`` call ``builder`` with those
    arguments (its keyword parameters are the model's options). For models of your own, and tests."""
    if not isinstance(name, str) or not _SPEC.match(name) or "[" in name:
        raise ValueError(f"model name must be letters, digits and underscores, got {name!r}")
    if not callable(builder):
        raise TypeError(f"builder must be callable, got {type(builder).__name__}")
    if name in _BUILDERS and not overwrite:
        raise ValueError(f"model {name!r} is already registered (pass overwrite=True to replace it)")
    _BUILDERS[name] = builder


def unregister_model(name: str) -> None:
    """Remove a model added with register_model (built-in models cannot be removed)."""
    if name in MODEL_NAMES:
        raise ValueError(f"{name!r} is a built-in model")
    _BUILDERS.pop(name, None)

# The paper's upsampler ablation, as model specs (the carafe row is plain "cares_unet"), then the encoder
# downsampler variants (the paper's stride-2 conv row is plain "cares_unet" too).
ABLATION_VARIANTS: tuple[str, ...] = (
    *(f"cares_unet[upsampler={kind}]" for kind in UPSAMPLERS if kind != "carafe"),
    *(f"cares_unet[downsampler={kind}]" for kind in DOWNSAMPLERS if kind != "conv"),
)

_SPEC = re.compile(r"^\s*(?P<name>[A-Za-z0-9_]+)\s*(?:\[(?P<options>[^\]]*)\])?\s*$")


def _parse_value(text: str) -> Any:
    """Bracket option values: true/false -> bool, integers -> int, decimals -> float, else the string."""
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return text


def parse_model_option(text: str, *, context: str = "") -> tuple[str, Any]:
    """"key=value" -> (key, value), the value read by the one rule every option source shares (bracket
    specs, --model-option, cares reproduce): true/false -> bool, integers -> int, decimals -> float,
    anything else the string. Raises ValueError for text that is not key=value."""
    key, sep, value = str(text).partition("=")
    if not sep or not key.strip() or not value.strip():
        raise ValueError(f"model option must be key=value, got {text!r}{context}")
    return key.strip(), _parse_value(value.strip())


def parse_model_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"cares_unet[upsampler=deconv,carafe_backend=reference]"`` -> ("cares_unet", {options}).

    A plain name gives an empty dict. Raises ValueError for a malformed spec or an unknown name.
    """
    if not isinstance(spec, str):
        raise TypeError(f"model name must be a str, got {type(spec).__name__} ({spec!r})")
    match = _SPEC.match(spec)
    if match is None:
        raise ValueError(f"model spec must look like 'name' or 'name[key=value,...]', got {spec!r}")
    name = match["name"]
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r} (from {spec!r}); choose one of {list(_BUILDERS)}")
    options: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in (match["options"] or "").split(","))):
        key, value = parse_model_option(item, context=f" in {spec!r}")
        options[key] = value
    return name, options


def model_options(name: str) -> tuple[str, ...]:
    """The keyword options ``build_model`` accepts for the model ``name``."""
    parameters = inspect.signature(_BUILDERS[name]).parameters
    return tuple(p for p in parameters if p not in ("in_channels", "num_classes"))


def build_model(name: str, in_channels: int = 1, num_classes: int = 1, **options: Any) -> SegmentationModel:
    """Build a model by name (optionally ``name[key=value,...]``) with the given input/output channels.

    Raises:
        ValueError: unknown name, malformed spec, or an option given both in brackets and as a keyword.
        TypeError: an option the model does not take.
    """
    model_name, spec_options = parse_model_spec(name)
    clashing = sorted(set(spec_options) & set(options))
    if clashing:
        raise ValueError(f"options {clashing} given both in the model spec {name!r} and as keywords")
    options = {**spec_options, **options}
    allowed = model_options(model_name)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(f"model {model_name!r} does not take options {unknown}; it takes {list(allowed)}")
    return _BUILDERS[model_name](in_channels, num_classes, **options)
