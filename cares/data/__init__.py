"""Data for CARes-UNet: CT slices and lesion masks as uniform dataset items.

Every dataset item is a dict
    "image":     float32 tensor (1, S, S) in [0, 1]
    "mask":      float32 tensor (1, S, S) in {0, 1}   (absent for unlabeled data)
    "name":      str: file stem, `<volume>_z<index>` for NIfTI slices, `synthetic_<i>`
    "orig_size": (h, w) of the slice before resizing

Entry point: `build_dataset(source, split, image_size, augment, seed, labeled)`, where source is
"synthetic" or a path (COVID-SemiSeg root, image/mask folders, NIfTI volumes; see
`cares.data.datasets` for the layout rules). Modules:
    io          load_image, load_mask, save_png
    nifti       read_nifti, window_hu, write_nifti (nibabel optional; axis convention documented)
    transforms  resize_image, resize_mask, augment_pair, augment_batch, draw_augment, AugmentConfig,
                item_generator
    device_batches  DeviceBatches: a cached training set kept on the device, batched and augmented there
    synthetic   SyntheticCT
    datasets    ImageFolderDataset, NiftiSliceDataset, build_dataset, default_data_dir
"""
from . import transforms
from .base import SliceDataset
from .datasets import (ImageFolderDataset, NiftiSliceDataset, build_dataset, default_data_dir,
                       find_nifti_mask)
from .io import load_image, load_mask, save_png
from .nifti import read_nifti, window_hu, write_nifti
from .synthetic import SyntheticCT, render_synthetic_slice
from .device_batches import DeviceBatches
from .transforms import (AugmentConfig, AugmentDraw, augment_batch, augment_pair, draw_augment, item_generator,
                         resize_image, resize_mask)

__all__ = [
    "AugmentConfig", "AugmentDraw", "DeviceBatches", "ImageFolderDataset", "NiftiSliceDataset", "SliceDataset", "SyntheticCT",
    "augment_batch", "augment_pair", "build_dataset", "default_data_dir", "draw_augment", "find_nifti_mask", "item_generator",
    "load_image", "load_mask", "read_nifti", "render_synthetic_slice", "resize_image", "resize_mask",
    "save_png", "transforms", "window_hu", "write_nifti",
]
