"""A training set kept on the device, batched and augmented there.

The DataLoader path moves every batch from host memory and augments each item on the host, one at a
time; on a GPU that host work, not the model, bounds the step rate of a small network. `DeviceBatches`
decodes the slices once (`SliceDataset.cache_in_memory`), copies them to the device as one (N, 1, S, S)
tensor, and builds each batch there: index, then `augment_batch` (flips, quarter turns, one batched
affine warp, intensity jitter). The host only draws each item's augmentation numbers, from the same
`item_generator(seed, epoch, index)` the DataLoader path uses, so both paths give the same batches in
the same order (values equal up to float rounding of the device's kernels), and an exact resume stays
exact.

Cost: N * S * S * 5 bytes of device memory (image float32, mask bool): 1650 slices at 256 x 256 take
0.54 GB.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch
from torch.utils.data import ConcatDataset, Dataset, Subset

from ..runtime import host_values_to
from .base import SliceDataset
from .transforms import AugmentDraw, augment_batch

# The draw of an item whose dataset does not augment: changes nothing.
_IDENTITY = AugmentDraw(flip_left_right=False, flip_up_down=False, quarter_turns=0, affine=None, intensity=None)


def _leaf_item(dataset: Dataset, index: int) -> tuple[SliceDataset, int]:
    """(the SliceDataset that serves item `index` of `dataset`, its index there), through Subset and
    ConcatDataset wrappers, exactly as their __getitem__ resolves it."""
    while True:
        if isinstance(dataset, Subset):
            dataset, index = dataset.dataset, int(dataset.indices[index])
        elif isinstance(dataset, ConcatDataset):
            part = next(i for i, end in enumerate(dataset.cumulative_sizes) if index < end)
            index -= dataset.cumulative_sizes[part - 1] if part else 0
            dataset = dataset.datasets[part]
        elif isinstance(dataset, SliceDataset):
            return dataset, index
        else:
            raise TypeError(f"data on the device needs cares.data datasets (SliceDataset, possibly inside "
                            f"Subset/ConcatDataset), got {type(dataset).__name__}")


class DeviceBatches:
    """The labelled items of `dataset` on `device`, served as training batches.

    dataset:    a SliceDataset, or Subset/ConcatDataset of them, every one labelled and with a fixed
                image_size (so items stack); each leaf is cached in memory here if it is not already.
    device:     where the slices live and batches are built.
    batch_size: items per batch (the last batch of an epoch may be smaller, as with a DataLoader).

    `epoch_batches(indices)` takes the epoch's item order (e.g. an EpochSampler) and returns an
    iterable of batch dicts {"image": (B, 1, S, S) float32, "mask": (B, 1, S, S) float32,
    "name": list[str]}, all tensors on `device`.
    """

    def __init__(self, dataset: Dataset, device: torch.device | str, batch_size: int):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.device = torch.device(device)
        self.batch_size = batch_size
        self._items = [_leaf_item(dataset, index) for index in range(len(dataset))]
        if not self._items:
            raise ValueError("the training set is empty")
        for leaf in {id(leaf): leaf for leaf, _ in self._items}.values():
            if leaf.image_size is None:
                raise ValueError("data on the device needs a fixed image_size (items of one size stack), "
                                 "got image_size=None")
            if not leaf.labeled:
                raise ValueError("data on the device serves training batches, which need masks; "
                                 f"got an unlabeled dataset of {len(leaf)} slices")
            leaf.cache_in_memory()
        decoded = [leaf.decoded(index) for leaf, index in self._items]
        missing = [name for _, mask, name, _ in decoded if mask is None]
        if missing:
            raise ValueError(f"{len(missing)} training slice(s) have no mask, e.g. {missing[0]!r}")
        self.images = torch.stack([image for image, _, _, _ in decoded]).to(self.device)
        self.masks = torch.stack([mask for _, mask, _, _ in decoded]).to(self.device)
        self.names = [name for _, _, name, _ in decoded]

    def __len__(self) -> int:
        return len(self._items)

    def epoch_batches(self, indices: Iterable[int]) -> "_EpochBatches":
        return _EpochBatches(self, list(indices))

    def batch(self, chunk: Sequence[int]) -> dict:
        """One batch of the given items, indexed and augmented on the device."""
        index = host_values_to(chunk, self.device, torch.int64)
        draws = [leaf.augment_draw(local) for leaf, local in (self._items[i] for i in chunk)]
        images, masks = self.images[index], self.masks[index].float()
        if any(draw is not None for draw in draws):
            images, masks = augment_batch(images, masks, [draw or _IDENTITY for draw in draws])
        return {"image": images, "mask": masks, "name": [self.names[i] for i in chunk]}


class _EpochBatches:
    """One epoch's batches, in order; has a length, so progress bars know the total."""

    def __init__(self, source: DeviceBatches, indices: list[int]):
        self._source, self._indices = source, indices

    def __len__(self) -> int:
        return -(-len(self._indices) // self._source.batch_size)

    def __iter__(self) -> Iterator[dict]:
        size = self._source.batch_size
        for start in range(0, len(self._indices), size):
            yield self._source.batch(self._indices[start:start + size])
