"""Which samples each training step sees: k-fold splits and the per-epoch sample order.

Both are pure functions of (seed, epoch, sizes): nothing here has state to save, which is what lets
`--resume` reproduce the data order of an uninterrupted run from the epoch number alone.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset, Sampler, Subset

from cares.runtime import derive_seed

# derive_seed tag of the epoch order's stream (apart from augmentation's (seed, epoch, index) streams).
_ORDER_TAG = 0x4F524452


def kfold_split(num_samples: int, folds: int, fold: int, seed: int = 0) -> tuple[list[int], list[int]]:
    """(train indices, validation indices) of fold `fold` of a seeded K-fold split.

    The samples are shuffled once with `seed` and cut into `folds` near-equal parts; part `fold` is
    the validation set, the rest the training set. Every sample is validated in exactly one fold.
    """
    if folds < 2:
        raise ValueError(f"folds must be >= 2 for cross-validation, got {folds}")
    if not 0 <= fold < folds:
        raise ValueError(f"fold must be in [0, {folds - 1}], got {fold}")
    if num_samples < folds:
        raise ValueError(f"cannot split {num_samples} samples into {folds} folds")
    order = np.random.default_rng(seed).permutation(num_samples)
    parts = np.array_split(order, folds)
    validation = sorted(int(i) for i in parts[fold])
    training = sorted(int(i) for k, part in enumerate(parts) if k != fold for i in part)
    return training, validation


class EpochSampler(Sampler[int]):
    """This process's sample order for one epoch; call `set_epoch(e)` before each epoch.

    The dataset is ConcatDataset([labelled, pseudo-labelled]) with `num_labelled` and `num_pseudo`
    items. Each epoch uses every labelled sample plus `num_labelled` pseudo-labelled ones (the
    semi-supervised schedule: as many pseudo labels as real ones, drawn afresh each epoch, without
    replacement when there are enough), shuffled together. Randomness comes from a generator seeded
    with derive_seed(seed, tag, epoch) only, so runs with nearby seeds get unrelated orders.

    With world_size > 1 it does what torch's DistributedSampler does: the epoch's list is padded by
    repeating its start to a multiple of world_size, and process `rank` takes every world_size-th
    sample from position rank on, so every process runs the same number of steps.
    """

    def __init__(self, num_labelled: int, num_pseudo: int = 0, *, seed: int = 0, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1):
        if num_labelled < 1:
            raise ValueError(f"the training set is empty (num_labelled={num_labelled})")
        if num_pseudo < 0:
            raise ValueError(f"num_pseudo must be >= 0, got {num_pseudo}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size - 1}], got {rank}")
        self.num_labelled, self.num_pseudo = num_labelled, num_pseudo
        self.seed, self.shuffle = seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def epoch_indices(self) -> list[int]:
        """The whole epoch's order (all processes), before it is split across processes."""
        generator = torch.Generator().manual_seed(derive_seed(self.seed, _ORDER_TAG, self.epoch))
        indices = torch.arange(self.num_labelled)
        if self.num_pseudo:
            if self.num_pseudo >= self.num_labelled:
                drawn = torch.randperm(self.num_pseudo, generator=generator)[: self.num_labelled]
            else:
                drawn = torch.randint(self.num_pseudo, (self.num_labelled,), generator=generator)
            indices = torch.cat([indices, self.num_labelled + drawn])
        if self.shuffle:
            indices = indices[torch.randperm(len(indices), generator=generator)]
        return indices.tolist()

    def __iter__(self):
        indices = self.epoch_indices()
        padding = -len(indices) % self.world_size
        indices += (indices * (padding // len(indices) + 1))[:padding]
        return iter(indices[self.rank::self.world_size])

    def __len__(self) -> int:
        total = self.num_labelled * (2 if self.num_pseudo else 1)
        return -(-total // self.world_size)


def leaf_datasets(dataset: Dataset):
    """The datasets inside Subset / ConcatDataset wrappers (the dataset itself when unwrapped)."""
    if isinstance(dataset, Subset):
        yield from leaf_datasets(dataset.dataset)
    elif isinstance(dataset, ConcatDataset):
        for part in dataset.datasets:
            yield from leaf_datasets(part)
    else:
        yield dataset


def dataset_files(*datasets: Dataset | None) -> list:
    """The files the datasets read: their leaves' image, mask and volume paths (none for synthetic
    data), for the check that an output folder holds none of a command's inputs (runtime.check_apart)."""
    files = []
    for dataset in datasets:
        if dataset is None:
            continue
        for leaf in leaf_datasets(dataset):
            for attribute in ("image_paths", "mask_paths", "volume_paths"):
                files.extend(getattr(leaf, attribute, None) or ())
    return files


def set_dataset_epoch(dataset: Dataset, epoch: int) -> None:
    """Call set_epoch(epoch) on every augmenting dataset inside Subset / ConcatDataset wrappers
    (augmentation of item i in epoch e is then a function of (seed, e, i), in any worker)."""
    for leaf in leaf_datasets(dataset):
        if hasattr(leaf, "set_epoch"):
            leaf.set_epoch(epoch)


def cache_in_memory(dataset: Dataset) -> None:
    """Decode every slice of the datasets inside Subset / ConcatDataset wrappers once and keep them in
    memory (see cares.data.SliceDataset.cache_in_memory); datasets without a cache are left as they are."""
    for leaf in leaf_datasets(dataset):
        if hasattr(leaf, "cache_in_memory"):
            leaf.cache_in_memory()
