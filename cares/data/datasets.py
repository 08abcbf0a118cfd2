"""Datasets of real slices (image folders, NIfTI volumes) and `build_dataset`, which picks one.

Layouts `build_dataset(source, split)` recognises, tried in this order:

1. "synthetic": `SyntheticCT`; splits train / val / test / unlabeled are disjoint random streams
   with 64 / 16 / 16 / 32 slices by default (keyword `num_samples` overrides).
2. A NIfTI file (`.nii` / `.nii.gz`): the axial slices of that volume (split is ignored).
3. A folder. The data folder is `<source>/<split>` when that exists, else `<source>` itself.
   Inside it, images are in `Imgs/` or `images/` and masks in `GT/` or `masks/`
   (COVID-SemiSeg uses Imgs + GT); when neither image folder exists the data folder itself
   holds the images (a plain folder of slices or volumes, with any masks in its GT/ or masks/
   sub-folder). The image folder holds either 2-D images (.jpg .jpeg .png .bmp .tif .tiff)
   or NIfTI volumes, not both.
   - 2-D images pair with masks by file stem (`Imgs/12.jpg` <-> `GT/12.png`).
   - A NIfTI volume `<dir>/<name>.nii[.gz]` takes the first mask that exists of
     `<dir>/<name>_mask.nii[.gz]`, `<dir>/masks/<name>.nii[.gz]`, the mask folder beside the
     image folder (`GT/` or `masks/`) `<name>.nii[.gz]`. Files ending in `_mask` are never
     treated as volumes.

split "unlabeled" or labeled=False give items without masks (mask folders are not needed).
Labeled data must have a mask for every image and an image for every mask; errors name the
stems that have no partner.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from .base import SliceDataset, check_common_arguments
from .io import IMAGE_SUFFIXES, as_path, image_size_of, load_image, load_mask
from .nifti import (DEFAULT_WINDOW_LEVEL, DEFAULT_WINDOW_WIDTH, NIFTI_SUFFIXES, is_nifti_path,
                    nifti_geometry, nifti_stem, read_nifti, window_hu)
from .synthetic import SyntheticCT
from .transforms import AugmentConfig

IMAGE_FOLDER_NAMES = ("Imgs", "images")
MASK_FOLDER_NAMES = ("GT", "masks")
UNLABELED_SPLIT = "unlabeled"

# Synthetic splits: (random stream, default number of slices). Streams keep the splits disjoint.
SYNTHETIC_SPLITS = {"train": (0, 64), "val": (1, 16), "test": (2, 16), "unlabeled": (3, 32)}

DATA_DIR_ENV = "CARES_DATA_DIR"
_REPO_ROOT = Path(__file__).resolve().parents[2]


def default_data_dir() -> Path | None:
    """The COVID-SemiSeg root: $CARES_DATA_DIR if set, else `<repo>/../shared/data/covid-semiseg`.
    None when that folder does not exist (tests use this to skip)."""
    configured = os.environ.get(DATA_DIR_ENV)
    candidate = Path(configured) if configured else _REPO_ROOT.parent / "shared" / "data" / "covid-semiseg"
    return candidate if candidate.is_dir() else None


def _short_list(names, limit: int = 10) -> str:
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _files_by_stem(folder: Path, suffixes: tuple[str, ...], what: str) -> dict[str, Path]:
    """{stem: path} of the files in folder whose names end in one of suffixes (case-insensitive).
    Two files with one stem (12.jpg and 12.png) would make the pairing ambiguous: an error."""
    by_stem: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.name.startswith("."):
            continue
        suffix = path.suffix.lower()
        if suffix not in suffixes:
            continue
        if path.stem in by_stem:
            raise ValueError(f"{what} folder {str(folder)!r} holds two files with stem {path.stem!r}: "
                             f"{by_stem[path.stem].name} and {path.name}")
        by_stem[path.stem] = path
    return by_stem


class ImageFolderDataset(SliceDataset):
    """2-D slices from an image folder and (optionally) a mask folder, paired by file stem.

    image_dir:  folder of .jpg/.jpeg/.png/.bmp/.tif/.tiff slices (any size, gray or colour)
    mask_dir:   folder of masks with the same stems (0/255 PNGs, binarised at > 128); None or
                labeled=False for unlabeled data
    Items are sorted by stem in natural order (numbers by value: 2 before 10).
    Image/mask sizes are checked up front from the file headers.
    """

    def __init__(self, image_dir, mask_dir=None, image_size: int | None = 256,
                 augment: bool | AugmentConfig = False, seed: int = 0, labeled: bool = True):
        super().__init__(image_size=image_size, augment=augment, seed=seed, labeled=labeled)
        image_dir = _existing_dir(image_dir, "image_dir")
        images = _files_by_stem(image_dir, IMAGE_SUFFIXES, "image")
        if not images:
            raise FileNotFoundError(f"image folder {str(image_dir)!r} holds no images "
                                    f"({' '.join('*' + s for s in IMAGE_SUFFIXES)})")
        self.image_dir = image_dir
        self.mask_dir = None
        self.stems = _sorted_stems(images)
        self.image_paths = [images[stem] for stem in self.stems]
        self.mask_paths: list[Path] | None = None
        if labeled and mask_dir is not None:
            self.mask_dir = _existing_dir(mask_dir, "mask_dir")
            masks = _files_by_stem(self.mask_dir, IMAGE_SUFFIXES, "mask")
            _check_pairs(set(images), set(masks), image_dir, self.mask_dir)
            self.mask_paths = [masks[stem] for stem in self.stems]
            self._check_sizes()
        elif labeled:
            raise ValueError(f"labeled=True needs a mask_dir for the images in {str(image_dir)!r}; "
                             "pass labeled=False for unlabeled data")

    def _check_sizes(self) -> None:
        mismatched = []
        for image_path, mask_path in zip(self.image_paths, self.mask_paths):
            image_hw, mask_hw = image_size_of(image_path), image_size_of(mask_path)
            if image_hw != mask_hw:
                mismatched.append(f"{image_path.name} is {image_hw[0]}x{image_hw[1]} but "
                                  f"{mask_path.name} is {mask_hw[0]}x{mask_hw[1]}")
        if mismatched:
            raise ValueError(f"image and mask sizes (H x W) differ in {str(self.image_dir)!r} / "
                             f"{str(self.mask_dir)!r}: " + "; ".join(mismatched[:10])
                             + (f"; ... ({len(mismatched)} pairs in all)" if len(mismatched) > 10 else ""))

    def __len__(self) -> int:
        return len(self.image_paths)

    def load_slice(self, index: int) -> tuple[np.ndarray, np.ndarray | None, str]:
        image = load_image(self.image_paths[index])
        mask = load_mask(self.mask_paths[index]) if self.mask_paths is not None else None
        return image, mask, self.stems[index]


class NiftiSliceDataset(SliceDataset):
    """The axial slices of one or more NIfTI volumes, named `<volume>_z<index>`.

    volume_paths: list of .nii / .nii.gz files (see `read_nifti` for the axis convention:
                  slice z is the file's plane z, rows along Y, columns along X)
    mask_paths:   matching mask volumes (same shape; voxels > 0 are lesion), or None
    window:       (width, level) in HU for `window_hu`, the lung window by default; None scales
                  each volume by its own min and max instead (for volumes that are not CT in HU)
    cache_volumes: how many decoded volumes to keep in memory; reading slices volume by volume
                  (no shuffling) needs 1, shuffled training over many volumes decodes often.
    Attributes `slices` (item -> (volume number, z)), `shapes` ((D, H, W) per volume) and
    `affines` (per volume) let prediction code stack slices back into volumes for `write_nifti`.
    """

    def __init__(self, volume_paths, mask_paths=None, image_size: int | None = 256,
                 augment: bool | AugmentConfig = False, seed: int = 0, labeled: bool = True,
                 window: tuple[float, float] | None = (DEFAULT_WINDOW_WIDTH, DEFAULT_WINDOW_LEVEL),
                 cache_volumes: int = 2):
        super().__init__(image_size=image_size, augment=augment, seed=seed, labeled=labeled)
        self.volume_paths = [Path(p) for p in volume_paths]
        if not self.volume_paths:
            raise ValueError("volume_paths is empty: no NIfTI volumes to read")
        if labeled and mask_paths is None:
            raise ValueError("labeled=True needs mask_paths; pass labeled=False for unlabeled volumes")
        self.mask_paths = [Path(p) for p in mask_paths] if (labeled and mask_paths is not None) else None
        if self.mask_paths is not None and len(self.mask_paths) != len(self.volume_paths):
            raise ValueError(f"got {len(self.volume_paths)} volumes but {len(self.mask_paths)} masks")
        if window is not None:
            if not (isinstance(window, (tuple, list)) and len(window) == 2):
                raise TypeError(f"window must be (width, level) in HU or None, got {window!r}")
            window_hu(np.zeros(1), *window)          # validates width and level now, not mid-epoch
        self.window = window
        if isinstance(cache_volumes, bool) or not isinstance(cache_volumes, int) or cache_volumes < 1:
            raise ValueError(f"cache_volumes must be a positive int, got {cache_volumes!r}")
        self.cache_volumes = cache_volumes
        self._cache: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}

        self.slices: list[tuple[int, int]] = []          # (volume number, z) of each item
        self.shapes: list[tuple[int, int, int]] = []     # (D, H, W) of each volume
        self.affines: list[np.ndarray] = []              # 4x4 affine of each volume, for write_nifti
        for number, path in enumerate(self.volume_paths):
            shape, affine = nifti_geometry(path)
            if self.mask_paths is not None:
                mask_shape = nifti_geometry(self.mask_paths[number])[0]
                if mask_shape != shape:
                    raise ValueError(f"volume {str(path)!r} has (D, H, W) {shape} but its mask "
                                     f"{str(self.mask_paths[number])!r} has {mask_shape}")
            self.shapes.append(shape)
            self.affines.append(affine)
            self.slices.extend((number, z) for z in range(shape[0]))

    def __len__(self) -> int:
        return len(self.slices)

    def _volume(self, number: int) -> tuple[np.ndarray, np.ndarray | None]:
        """(image volume in [0, 1] (D, H, W), bool mask volume or None), decoded once and cached."""
        if number not in self._cache:
            volume, _ = read_nifti(self.volume_paths[number])
            if self.window is not None:
                image = window_hu(volume, *self.window)
            else:
                low, high = float(volume.min()), float(volume.max())
                image = ((volume - low) / (high - low) if high > low else np.zeros_like(volume)).astype(np.float32)
            mask = read_nifti(self.mask_paths[number])[0] > 0 if self.mask_paths is not None else None
            while len(self._cache) >= self.cache_volumes:
                self._cache.pop(next(iter(self._cache)))   # drop the oldest
            self._cache[number] = (image, mask)
        return self._cache[number]

    def load_slice(self, index: int) -> tuple[np.ndarray, np.ndarray | None, str]:
        number, z = self.slices[index]
        image, mask = self._volume(number)
        return image[z], (None if mask is None else mask[z]), f"{nifti_stem(self.volume_paths[number])}_z{z}"


# ----------------------------------------------------------------------------------------------
# Layout detection
# ----------------------------------------------------------------------------------------------

def _existing_dir(path, what: str) -> Path:
    path = as_path(path, what)
    if not path.is_dir():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist or is not a folder")
    return path


def _natural_key(stem: str) -> list:
    """Sort key that orders digit runs by value: 'slice_2' < 'slice_10', '9' < '10'."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", stem)]


def _sorted_stems(by_stem: dict[str, Path]) -> list[str]:
    return sorted(by_stem, key=_natural_key)


def _check_pairs(image_stems: set[str], mask_stems: set[str], image_dir: Path, mask_dir: Path) -> None:
    images_alone, masks_alone = image_stems - mask_stems, mask_stems - image_stems
    if not mask_stems:
        raise FileNotFoundError(f"mask folder {str(mask_dir)!r} holds no masks; pass labeled=False "
                                "for unlabeled data")
    if images_alone or masks_alone:
        problems = []
        if images_alone:
            problems.append(f"images without a mask in {str(mask_dir)!r}: {_short_list(images_alone)}")
        if masks_alone:
            problems.append(f"masks without an image in {str(image_dir)!r}: {_short_list(masks_alone)}")
        raise ValueError("image/mask pairs are incomplete (matched by file stem); " + "; ".join(problems))


def _first_existing(folder: Path, names) -> Path | None:
    for name in names:
        if (folder / name).is_dir():
            return folder / name
    return None


def _nifti_files(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir()
                   if p.is_file() and is_nifti_path(p) and not nifti_stem(p).endswith("_mask")),
                  key=lambda p: _natural_key(p.name))


def _has_slices(folder: Path) -> bool:
    return any(p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES for p in folder.iterdir())


def find_nifti_mask(volume_path: Path, mask_dir: Path | None = None) -> Path | None:
    """The mask of a volume by the rule in the module docstring, or None when none exists."""
    stem, folder = nifti_stem(volume_path), volume_path.parent
    candidates = [folder / f"{stem}_mask{suffix}" for suffix in NIFTI_SUFFIXES]
    candidates += [folder / "masks" / f"{stem}{suffix}" for suffix in NIFTI_SUFFIXES]
    if mask_dir is not None:
        candidates += [mask_dir / f"{stem}{suffix}" for suffix in NIFTI_SUFFIXES]
    return next((c for c in candidates if c.is_file()), None)


def _nifti_dataset(volumes: list[Path], mask_dir: Path | None, labeled: bool, **options) -> NiftiSliceDataset:
    mask_paths = None
    if labeled:
        found = {volume: find_nifti_mask(volume, mask_dir) for volume in volumes}
        missing = [nifti_stem(v) for v, m in found.items() if m is None]
        if missing:
            raise ValueError(f"no mask found for NIfTI volumes {_short_list(missing)} (looked for "
                             "<name>_mask.nii[.gz] beside the volume, masks/<name>.nii[.gz] beside it"
                             + (f", and {str(mask_dir)!r}/<name>.nii[.gz]" if mask_dir else "")
                             + "); pass labeled=False for unlabeled volumes")
        mask_paths = list(found.values())
    return NiftiSliceDataset(volumes, mask_paths, labeled=labeled, **options)


def _synthetic(split: str, image_size, augment, seed, labeled, num_samples=None) -> SyntheticCT:
    if split not in SYNTHETIC_SPLITS:
        raise ValueError(f"unknown synthetic split {split!r}; expected one of {sorted(SYNTHETIC_SPLITS)}")
    stream, default_count = SYNTHETIC_SPLITS[split]
    return SyntheticCT(default_count if num_samples is None else num_samples, image_size=image_size,
                       seed=seed, labeled=labeled and split != UNLABELED_SPLIT, augment=augment,
                       stream=stream)


def build_dataset(source, split: str = "train", image_size: int | None = 256,
                  augment: bool | AugmentConfig = False, seed: int = 0, labeled: bool = True,
                  **options) -> SliceDataset:
    """Build the dataset of one split of `source` (see the module docstring for the layouts).

    source:  "synthetic", or a path (str / os.PathLike) to a data root, folder or NIfTI file
    split:   "train", "val", "test", "unlabeled", or any sub-folder name of a data root
    image_size, augment, seed, labeled: as in `SliceDataset`
    options: `num_samples=` for synthetic data; `window=` and `cache_volumes=` for NIfTI data
    Items: {"image": (1, S, S) float32 in [0, 1], "mask": (1, S, S) float32 in {0, 1} (labeled
    only), "name": str, "orig_size": (h, w)}.
    """
    check_common_arguments(image_size, augment, seed, labeled)
    if not isinstance(split, str) or not split:
        raise TypeError(f"split must be a non-empty str, got {split!r}")
    common = dict(image_size=image_size, augment=augment, seed=seed)

    if isinstance(source, str) and source == "synthetic":
        unknown = set(options) - {"num_samples"}
        if unknown:
            raise TypeError(f"unknown option(s) for synthetic data: {sorted(unknown)}; only num_samples")
        return _synthetic(split, labeled=labeled, **common, **options)
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"source must be 'synthetic' or a path (str / os.PathLike), got {type(source).__name__}")
    if "num_samples" in options:
        raise TypeError("num_samples applies to source='synthetic' only")
    unknown = set(options) - {"window", "cache_volumes"}
    if unknown:
        raise TypeError(f"unknown option(s) for build_dataset: {sorted(unknown)}")

    root = Path(source)
    labeled = labeled and split != UNLABELED_SPLIT
    if not root.exists():
        raise FileNotFoundError(f"data source {str(root)!r} does not exist")
    if root.is_file():
        if not is_nifti_path(root):
            raise ValueError(f"data source {str(root)!r} is a file but not a NIfTI volume (.nii / .nii.gz); "
                             "pass a folder for 2-D slices")
        return _nifti_dataset([root], None, labeled, **common, **options)

    data_dir = root / split if (root / split).is_dir() else root
    named_image_dir = _first_existing(data_dir, IMAGE_FOLDER_NAMES)
    mask_dir = _first_existing(data_dir, MASK_FOLDER_NAMES)
    if named_image_dir is None and data_dir == root and _first_existing(root, tuple(SYNTHETIC_SPLITS)):
        present = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise FileNotFoundError(f"data root {str(root)!r} has no {split!r} split (folders there: "
                                f"{', '.join(present)})")
    image_dir = named_image_dir or data_dir       # without Imgs/ or images/: a plain folder of files

    volumes = _nifti_files(image_dir)
    if volumes:
        if _has_slices(image_dir):
            raise ValueError(f"folder {str(image_dir)!r} mixes NIfTI volumes and 2-D images; keep one kind")
        return _nifti_dataset(volumes, mask_dir, labeled, **common, **options)
    if options:
        raise TypeError(f"option(s) {sorted(options)} apply to NIfTI data only, and {str(image_dir)!r} "
                        "holds no NIfTI volumes")
    if named_image_dir is None and not _has_slices(image_dir):
        contents = "is empty" if not any(image_dir.iterdir()) else "holds no 2-D images or NIfTI volumes"
        raise ValueError(f"unknown data layout at {str(root)!r} (split {split!r}): expected "
                         "<root>/<split>/Imgs + GT, <root>/<split>/images + masks, the same folders "
                         f"directly under <root>, or a folder of 2-D images or NIfTI volumes; "
                         f"{str(image_dir)!r} {contents}")
    if labeled and mask_dir is None:
        raise FileNotFoundError(f"no mask folder (GT/ or masks/) beside the images in {str(image_dir)!r}; "
                                "pass labeled=False (or split='unlabeled') for unlabeled data")
    # An empty Imgs/ or images/ folder is reported by ImageFolderDataset.
    return ImageFolderDataset(image_dir, mask_dir if labeled else None, labeled=labeled, **common)
