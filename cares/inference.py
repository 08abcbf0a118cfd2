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

from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from cares.checkpoint import build_model_from_checkpoint, load_checkpoint
from cares.data.transforms import resize_image
from cares.runtime import autocast_context, resolve_device

def load_trained_model(checkpoint_path, device: str | torch.device = "auto"
                       ) -> tuple[torch.nn.Module, dict[str, Any], torch.device]:
    """(model in eval mode, checkpoint dict, device) from a checkpoint written by `cares train`.
    The checkpoint's model name, options and input settings stand in for any command-line flags."""
    device = resolve_device(device) if isinstance(device, str) else device
    state = load_checkpoint(checkpoint_path)
    return build_model_from_checkpoint(state, device, checkpoint_path), state, device


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


class ItemError(ValueError):
    """One input could not be predicted (unreadable, non-finite pixels, non-finite output)."""


def failed_item(name: str, error: BaseException | str) -> dict:
    """An item standing for an input that could not be read: predict_probabilities with
    skip_failed=True passes it through as (item, None) instead of predicting it."""
    return {"name": name, "error": str(error)}


def _item_label(item: dict) -> str:
    return repr(item.get("name", "<unnamed item>"))


@torch.no_grad()
def predict_probabilities(model: torch.nn.Module, items: Dataset | Iterable[dict], *, image_size: int,
                          device: torch.device, batch_size: int = 4, tta: bool = False, amp: str = "off",
                          num_workers: int = 0, channels_last: bool = False, skip_failed: bool = False
                          ) -> Iterator[tuple[dict, np.ndarray | None]]:
    """Yield (item, probability float32 (h, w) in [0, 1]) for each item, in order.

    items: a Dataset or an iterable of dicts with "image" (1, h, w) float in [0, 1] (any h, w).
    image_size: the side S the model was trained at; each image is resized to S x S for the model
        and the probability map is resized back to (h, w) bilinearly.
    tta: average the probabilities over the four flips (identity, horizontal, vertical, both).
    Non-finite values never become a silent "no lesion" map: an image holding NaN/inf pixels, or a
    probability map that comes out non-finite (a diverged model), raises ItemError naming the item.
    skip_failed: instead of raising, yield (item, None) with item["error"] set for such items and for
        failed_item() placeholders, and keep predicting the others (a batch with a bad item still
        predicts its good ones).
    The model is put in eval mode and left there.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    model.eval()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def failure(item: dict, message: str):
        if not skip_failed:
            raise ItemError(f"{_item_label(item)}: {message}")
        return {**item, "error": message}, None

    for batch in _batches(items, batch_size, num_workers):
        results: list[tuple[dict, np.ndarray | None] | None] = [None] * len(batch)
        good = []
        for position, item in enumerate(batch):
            if "error" in item:
                results[position] = failure(item, item["error"])
            elif not bool(torch.isfinite(item["image"]).all()):
                results[position] = failure(item, "the image holds NaN or infinite values")
            else:
                good.append(position)
        if good:
            images = torch.stack([resize_image(batch[i]["image"].float(), image_size) for i in good])
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
            finite = torch.isfinite(probabilities).flatten(1).all(1).tolist()
            for position, probability, ok in zip(good, probabilities, finite):
                item = batch[position]
                if not ok:
                    results[position] = failure(item, "the model's output is NaN or infinite (are the "
                                                      "checkpoint's weights finite?)")
                    continue
                height, width = item["image"].shape[-2:]
                if (height, width) != (image_size, image_size):
                    probability = F.interpolate(probability[None], size=(height, width), mode="bilinear",
                                                align_corners=False)[0]
                results[position] = (item, probability[0].clamp_(0.0, 1.0).cpu().numpy())
        yield from results


class SafeItems(Dataset):
    """A Dataset wrapper whose items never raise: an item that fails to load becomes failed_item(name,
    error), for predict_probabilities(skip_failed=True). `names(i)` gives item i's name without loading it."""

    def __init__(self, dataset: Dataset, names=None):
        self.dataset = dataset
        self.names = names

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        try:
            return self.dataset[index]
        except Exception as err:  # any unreadable file: report it by name, go on with the others
            name = self.names(index) if self.names is not None else f"item {index}"
            return failed_item(name, f"{type(err).__name__}: {err}")


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
