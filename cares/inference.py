"""Running a trained model over slices: the one place that turns images into probability maps.

`predict_probabilities` is used by validation during training, `cares evaluate`, `cares predict`,
`cares pseudo-label` and `cares demo`, so every one of them resizes, normalises, flips and
resamples in the same way:

    item["image"] (1, h, w) in [0, 1]  --bilinear (antialiased) resize-->  (1, S, S)
        --model--> logits --sigmoid--> probability (S, S)   [--tta: mean over the 4 flips]
        --bilinear resize back--> probability (h, w)

where S is the training image size recorded in the checkpoint and (h, w) the item's own size, so
metrics are measured against the ground truth at its own resolution.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from cares.checkpoint import build_model_from_checkpoint, load_checkpoint
from cares.data.transforms import resize_image
from cares.distributed import resolve_device

AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def cpu_has_fast_bf16() -> bool:
    """True when this CPU computes bf16 natively (AVX512-BF16 or AMX), where oneDNN's bf16 convolutions
    beat fp32 ones. Measured on such a 2-core machine (CARes-UNet width 16, 256x256, batch 4, one
    training step): fp32 NCHW 14.7 s, bf16 autocast + channels_last 5.9 s."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):   # a torch without oneDNN, or one that renamed the probe
        return False


def resolve_amp(amp: str, device: torch.device) -> str:
    """--amp auto -> bf16 where the device computes it fast (CUDA with bf16, CPUs with native bf16), else
    off; other choices are returned as they are."""
    if amp != "auto":
        return amp
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "off"
    return "bf16" if device.type == "cpu" and cpu_has_fast_bf16() else "off"


def resolve_channels_last(channels_last: bool | None, amp: str, device: torch.device) -> bool:
    """channels_last None (auto) -> on when bf16 autocast runs (oneDNN and cuDNN's fast bf16 convolutions
    want NHWC), off otherwise."""
    if channels_last is not None:
        return channels_last
    return resolve_amp(amp, device) == "bf16"


def autocast_context(device: torch.device, amp: str):
    """torch.autocast for --amp fp16 | bf16 (| auto, see resolve_amp), a no-op context for off."""
    amp = resolve_amp(amp, device)
    if amp == "off":
        return contextlib.nullcontext()
    if amp not in AMP_DTYPES:
        raise ValueError(f"--amp must be auto, off, fp16 or bf16, got {amp!r}")
    return torch.autocast(device_type=device.type, dtype=AMP_DTYPES[amp])


def load_trained_model(checkpoint_path, device: str | torch.device = "auto"
                       ) -> tuple[torch.nn.Module, dict[str, Any], torch.device]:
    """(model in eval mode, checkpoint dict, device) from a checkpoint written by `cares train`.
    The checkpoint's model name, options and input settings stand in for any command-line flags."""
    device = resolve_device(device) if isinstance(device, str) else device
    state = load_checkpoint(checkpoint_path)
    return build_model_from_checkpoint(state, device), state, device


def _collate_as_list(items: list[dict]) -> list[dict]:
    # Items may differ in size (slices at their own resolution), so they are resized per batch below.
    return items


def _batches(items: Dataset | Iterable[dict], batch_size: int, num_workers: int) -> Iterator[list[dict]]:
    if isinstance(items, Dataset):
        yield from DataLoader(items, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                              collate_fn=_collate_as_list)
        return
    batch: list[dict] = []
    for item in items:
        batch.append(item)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


FLIPS = ((), (-1,), (-2,), (-2, -1))  # identity, horizontal, vertical, both


@torch.no_grad()
def predict_probabilities(model: torch.nn.Module, items: Dataset | Iterable[dict], *, image_size: int,
                          device: torch.device, batch_size: int = 4, tta: bool = False, amp: str = "off",
                          num_workers: int = 0, channels_last: bool = False
                          ) -> Iterator[tuple[dict, np.ndarray]]:
    """Yield (item, probability float32 (h, w) in [0, 1]) for each item, in order.

    items: a Dataset or an iterable of dicts with "image" (1, h, w) float in [0, 1] (any h, w).
    image_size: the side S the model was trained at; each image is resized to S x S for the model
        and the probability map is resized back to (h, w) bilinearly.
    tta: average the probabilities over the four flips (identity, horizontal, vertical, both).
    The model is put in eval mode and left there.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    model.eval()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    for batch in _batches(items, batch_size, num_workers):
        images = torch.stack([resize_image(item["image"].float(), image_size) for item in batch])
        images = images.to(device, non_blocking=True).contiguous(memory_format=memory_format)
        flips = FLIPS if tta else FLIPS[:1]
        probabilities = torch.zeros(images.shape[0], 1, image_size, image_size, device=device)
        for dims in flips:
            flipped = images.flip(dims) if dims else images
            with autocast_context(device, amp):
                logits = model(flipped)
            probability = torch.sigmoid(logits.float()[:, :1])
            probabilities += probability.flip(dims) if dims else probability
        probabilities /= len(flips)
        for item, probability in zip(batch, probabilities):
            height, width = item["image"].shape[-2:]
            if (height, width) != (image_size, image_size):
                probability = F.interpolate(probability[None], size=(height, width), mode="bilinear",
                                            align_corners=False)[0]
            yield item, probability[0].clamp_(0.0, 1.0).cpu().numpy()


def probability_to_uint8(probability: np.ndarray) -> np.ndarray:
    """Soft map for an 8-bit PNG: round(255 * p)."""
    return np.rint(np.clip(probability, 0.0, 1.0) * 255.0).astype(np.uint8)


def model_spec(name: str, options: dict[str, Any]) -> str:
    """'cares_unet[upsampler=deconv]': the bracket form cares.models.build_model also reads."""
    listed = ",".join(f"{key}={value}" for key, value in options.items())
    return f"{name}[{listed}]" if listed else name


def describe_checkpoint(state: dict[str, Any], path: str | Path) -> str:
    """One line naming what a checkpoint holds (printed by evaluate and predict)."""
    model, inputs = state["model"], state["input"]
    return (f"{path}: {model_spec(model['name'], model['options'])}, {inputs['image_size']}x"
            f"{inputs['image_size']} input, epoch {state.get('epoch')}")
