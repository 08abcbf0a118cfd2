"""The one item pipeline every dataset shares: load a raw slice, resize, augment, pack a dict.

Subclasses only say how many slices there are and how to load slice i as numpy arrays; this class
turns that into the items the training, evaluation and prediction code consume:

    {"image": float32 tensor (1, S, S) in [0, 1],
     "mask":  float32 tensor (1, S, S) in {0, 1}      (absent for unlabeled data),
     "name":  str,
     "orig_size": (h, w) of the slice before resizing}
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from .transforms import (DEFAULT_AUGMENT, AugmentConfig, AugmentDraw, apply_augment, draw_augment, item_generator,
                         resize_image, resize_mask)


def check_common_arguments(image_size, augment, seed, labeled) -> None:
    """Validate the arguments every dataset takes (shared so the messages are the same)."""
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int)):
        raise TypeError(f"image_size must be an int (or None to keep each slice's size), "
                        f"got {type(image_size).__name__}")
    if image_size is not None and image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    if not isinstance(augment, (bool, AugmentConfig)):
        raise TypeError(f"augment must be a bool or an AugmentConfig, got {type(augment).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if not isinstance(labeled, bool):
        raise TypeError(f"labeled must be a bool, got {type(labeled).__name__}")
    if augment is not False and image_size is None:
        raise ValueError("augment needs square items: give an int image_size (got image_size=None)")


class SliceDataset(Dataset):
    """Base class: subclasses implement `__len__` and `load_slice(index)`.

    image_size: side S of the square items (None keeps each slice's own size; batch those with
                batch_size 1 when sizes vary).
    augment:    False, True (the default `AugmentConfig`) or an `AugmentConfig`.
    seed:       seeds the augmentation: item i of epoch e is augmented with
                `item_generator(seed, e, i)`; call `set_epoch(e)` at the start of each epoch.
    labeled:    False drops the masks (and lets subclasses skip reading them).
    """

    def __init__(self, image_size: int | None = 256, augment: bool | AugmentConfig = False,
                 seed: int = 0, labeled: bool = True):
        check_common_arguments(image_size, augment, seed, labeled)
        self.image_size = image_size
        self.augment_config = DEFAULT_AUGMENT if augment is True else (augment or None)
        self.seed = seed
        self.labeled = labeled
        self.epoch = 0
        self._decoded: list[tuple[torch.Tensor, torch.Tensor | None, str, tuple[int, int]]] | None = None

    def set_epoch(self, epoch: int) -> None:
        """Choose which epoch's augmentations the next items get (reproducible per epoch)."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative int, got {epoch!r}")
        self.epoch = epoch

    def cache_in_memory(self) -> "SliceDataset":
        """Decode and resize every slice now, once, and serve items from memory from then on.

        Training reads each slice once per epoch; decoding a JPEG/PNG and resizing it every time
        costs more than the augmentation. Call it in the main process before a DataLoader starts
        its workers, which then inherit the decoded slices. Items are the same as without the
        cache (decoding and resizing are deterministic; augmentation still runs per item and
        epoch). Masks are kept as bool, images as float32: S*S*5 bytes per slice.
        """
        if self._decoded is None:
            self._decoded = [self._decode(index) for index in range(len(self))]
        return self

    def _decode(self, index: int) -> tuple[torch.Tensor, torch.Tensor | None, str, tuple[int, int]]:
        """(image (1, S, S), bool mask (1, S, S) or None, name, (h, w) before resizing) of slice index."""
        image_array, mask_array, name = self.load_slice(index)
        height, width = image_array.shape
        if mask_array is not None and mask_array.shape != image_array.shape:
            raise ValueError(f"slice {name!r}: image is {image_array.shape[0]}x{image_array.shape[1]} "
                             f"but its mask is {mask_array.shape[0]}x{mask_array.shape[1]} (H x W)")
        image = torch.from_numpy(np.ascontiguousarray(image_array, dtype=np.float32))[None]
        mask = None
        if self.labeled and mask_array is not None:
            mask = torch.from_numpy(np.ascontiguousarray(mask_array, dtype=np.float32))[None]
        if self.image_size is not None:
            image = resize_image(image, self.image_size)
            mask = None if mask is None else resize_mask(mask, self.image_size)
        return image, None if mask is None else mask > 0.5, name, (int(height), int(width))

    def augment_draw(self, index: int) -> AugmentDraw | None:
        """The augmentation of item `index` in the current epoch (None when augmentation is off):
        a function of (seed, epoch, index) only, whoever asks (a DataLoader worker or `DeviceBatches`)."""
        if self.augment_config is None:
            return None
        return draw_augment(item_generator(self.seed, self.epoch, index), self.augment_config)

    def decoded(self, index: int) -> tuple[torch.Tensor, torch.Tensor | None, str, tuple[int, int]]:
        """(image (1, S, S), bool mask (1, S, S) or None, name, (h, w) before resizing) of slice
        `index`, before augmentation: from the cache when `cache_in_memory` ran, else decoded now."""
        index = self._normalise_index(index)
        return self._decoded[index] if self._decoded is not None else self._decode(index)

    def load_slice(self, index: int) -> tuple[np.ndarray, np.ndarray | None, str]:
        """Return (image float32 (H, W) in [0, 1], mask bool (H, W) or None, name) of slice index.
        The mask is None when the dataset is unlabeled."""
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError

    def _normalise_index(self, index) -> int:
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"dataset index must be an int, got {type(index).__name__}")
        length = len(self)
        if not -length <= index < length:
            raise IndexError(f"index {index} is out of range for a dataset of {length} items")
        return int(index) % length

    def __getitem__(self, index) -> dict:
        index = self._normalise_index(index)
        image, mask, name, orig_size = self.decoded(index)
        mask = None if mask is None else mask.float()
        draw = self.augment_draw(index)
        if draw is not None:
            image, mask = apply_augment(image, mask, draw)

        item = {"image": image, "name": name, "orig_size": orig_size}
        if mask is not None:
            item["mask"] = mask
        return item
