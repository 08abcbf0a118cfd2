"""NIfTI volumes (`.nii`, `.nii.gz`): reading CT, windowing Hounsfield units, writing masks back.

nibabel is optional: this module imports without it and raises an ImportError that says how to
install it the first time a NIfTI function is called.

Axis convention
---------------
nibabel hands out voxel arrays indexed (X, Y, Z) in the file's voxel order, and axial CT slices run
along Z. This package works with stacks of 2-D slices instead, so

    volume = data.transpose(2, 1, 0)        # (X, Y, Z) -> (D, H, W) = (Z, Y, X)

i.e. slice `volume[z]` is the file's axial plane z with rows along Y and columns along X. No flips
are applied, so `write_nifti(path, mask, affine)` with the affine from `read_nifti` stores voxel
(z, y, x) of the mask at file voxel (x, y, z): a predicted mask written back overlays its source
scan in any NIfTI viewer. (Slices may look mirrored or rotated compared with a viewer's
radiological display; that does not matter to the network, and the round trip is exact.)
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .io import _check_path, as_path

NIFTI_SUFFIXES = (".nii.gz", ".nii")

# Lung window (width 1500 HU, level -650 HU) that shows lungs, vessels and ground-glass opacities.
DEFAULT_WINDOW_WIDTH = 1500.0
DEFAULT_WINDOW_LEVEL = -650.0


def _nibabel():
    try:
        import nibabel
    except ImportError as err:
        raise ImportError("reading or writing NIfTI files needs nibabel: `pip install nibabel` "
                          "(or install this package with the `nifti` extra, "
                          "`pip install carafe-kernels[nifti]`)") from err
    return nibabel


def is_nifti_path(path) -> bool:
    """True when the file name ends in .nii or .nii.gz (case-insensitive)."""
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def nifti_stem(path) -> str:
    """File name without the .nii / .nii.gz ending: 'case_01.nii.gz' -> 'case_01'."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(path).stem


def _check_nifti_path(path, what: str) -> Path:
    path = _check_path(path, what)
    if not is_nifti_path(path):
        raise ValueError(f"{what} {str(path)!r} is not a NIfTI file (expected .nii or .nii.gz)")
    return path


def _load(path: Path, what: str):
    nibabel = _nibabel()
    try:
        return nibabel.load(str(path))
    except Exception as err:  # nibabel raises several unrelated types for damaged files
        raise ValueError(f"cannot read {what} {str(path)!r}: {err}") from err


def nifti_geometry(path) -> tuple[tuple[int, int, int], np.ndarray]:
    """((D, H, W) = (Z, Y, X), 4x4 affine) of a 3-D NIfTI file, read from its header only."""
    path = _check_nifti_path(path, "NIfTI file")
    image = _load(path, "NIfTI file")
    if len(image.shape) != 3:
        raise ValueError(f"NIfTI file {str(path)!r} has shape {image.shape}; expected a 3-D (X, Y, Z) "
                         "volume (4-D series are not supported)")
    x, y, z = image.shape
    if min(x, y, z) == 0:
        raise ValueError(f"NIfTI file {str(path)!r} has shape {image.shape}: it holds no voxels "
                         f"({z} slices of {y}x{x}), nothing to read")
    return (z, y, x), np.asarray(image.affine, dtype=np.float64)


def read_nifti(path) -> tuple[np.ndarray, np.ndarray]:
    """Read a 3-D NIfTI volume.

    Returns (volume, affine): volume is float32 (D, H, W) = (Z, Y, X) with the file's scaling
    (scl_slope / scl_inter) applied, so CT comes out in Hounsfield units; affine is the 4x4
    voxel-to-world matrix, to pass to `write_nifti` unchanged.
    """
    nifti_geometry(path)                          # checks the path and that the volume is 3-D
    image = _load(Path(path), "NIfTI file")
    try:
        data = np.asarray(image.get_fdata(dtype=np.float32))
    except Exception as err:
        raise ValueError(f"cannot read the voxels of NIfTI file {str(path)!r}: {err}") from err
    volume = np.ascontiguousarray(data.transpose(2, 1, 0))
    return volume, np.asarray(image.affine, dtype=np.float64)


def window_hu(volume, width: float = DEFAULT_WINDOW_WIDTH, level: float = DEFAULT_WINDOW_LEVEL) -> np.ndarray:
    """Map Hounsfield units to [0, 1] through a display window: level - width/2 -> 0,
    level + width/2 -> 1, finite values outside clipped. NaN and +-inf voxels become NaN (clipping
    would turn inf into a plausible 0 or 1), so the slice is refused as non-finite downstream.
    Returns float32 of the input's shape."""
    if not np.isfinite(width) or width <= 0:
        raise ValueError(f"window width must be a positive number of HU, got {width}")
    if not np.isfinite(level):
        raise ValueError(f"window level must be a finite number of HU, got {level}")
    volume = np.asarray(volume, dtype=np.float32)
    low = level - width / 2.0
    windowed = np.clip((volume - low) / width, 0.0, 1.0).astype(np.float32)
    return np.where(np.isfinite(volume), windowed, np.float32(np.nan))


def write_nifti(path, mask, affine) -> Path:
    """Write a (D, H, W) = (Z, Y, X) mask as a uint8 NIfTI volume with the given 4x4 affine.

    The inverse of `read_nifti`'s axis order, so a mask predicted slice by slice on a volume read
    with `read_nifti` lands on the voxels it was predicted for. bool masks are stored as 0/1.
    """
    nibabel = _nibabel()
    path = as_path(path, "path")
    if not is_nifti_path(path):
        raise ValueError(f"path {str(path)!r} must end in .nii or .nii.gz")
    if hasattr(mask, "detach"):  # a torch tensor
        mask = mask.detach().cpu().numpy()
    mask = np.asarray(mask)
    if mask.ndim != 3:
        raise ValueError(f"write_nifti expects a (D, H, W) mask, got shape {mask.shape}")
    if mask.dtype == np.bool_:
        mask = mask.astype(np.uint8)
    if mask.dtype != np.uint8:
        raise TypeError(f"write_nifti expects a uint8 or bool mask, got dtype {mask.dtype}")
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"affine must be a 4x4 matrix, got shape {affine.shape}")
    image = nibabel.Nifti1Image(np.ascontiguousarray(mask.transpose(2, 1, 0)), affine)
    image.set_data_dtype(np.uint8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nibabel.save(image, str(path))
    return path
