"""Reading and writing 2-D slices: grayscale images, binary masks, 8-bit PNG maps.

Conventions used throughout `cares.data`:
    image: float32 numpy array (H, W), values in [0, 1]
    mask:  bool numpy array (H, W); a pixel is lesion when its gray value is above half the file's
           range: > 128 for 8-bit files (COVID-SemiSeg ground truth is stored as 0/255 PNGs), > 32767
           for 16-bit ones
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

# File endings recognised as 2-D images when scanning folders (lower case).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")

# Pillow modes holding 16-bit gray values (divided by 65535 to reach [0, 1]).
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")

MASK_THRESHOLD = 128


def as_path(path, what: str) -> Path:
    """``path`` as a Path; TypeError naming ``what`` when it is not a str or os.PathLike."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{what} must be a str or os.PathLike path, got {type(path).__name__}")
    return Path(path)


def _check_path(path, what: str) -> Path:
    path = as_path(path, what)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist or is not a file")
    return path


def _open(path: Path, what: str) -> Image.Image:
    """Open and fully decode an image, turning Pillow's decode failures into a ValueError that
    names the file (a truncated JPEG otherwise fails later with a message that names nothing)."""
    try:
        picture = Image.open(path)
        picture.load()
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"cannot read {what} {str(path)!r}: {err}") from err
    return picture


def image_size_of(path) -> tuple[int, int]:
    """(height, width) of an image file, read from its header only (cheap)."""
    path = _check_path(path, "image file")
    try:
        with Image.open(path) as picture:
            width, height = picture.size
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"cannot read image file {str(path)!r}: {err}") from err
    return height, width


def load_image(path) -> np.ndarray:
    """Read a 2-D image as grayscale float32 (H, W) in [0, 1].

    Colour images are converted with Pillow's luminance formula; 8-bit images are divided by 255,
    16-bit ones by 65535.
    """
    path = _check_path(path, "image file")
    picture = _open(path, "image file")
    if picture.mode in _SIXTEEN_BIT_MODES:
        gray = np.asarray(picture, dtype=np.float32) / 65535.0
    elif picture.mode == "F":
        raise ValueError(f"image file {str(path)!r} holds floating-point pixels (Pillow mode 'F'); "
                         "save it as 8- or 16-bit grayscale")
    else:
        gray = np.asarray(picture.convert("L"), dtype=np.float32) / 255.0
    if gray.ndim != 2:
        raise ValueError(f"image file {str(path)!r} decoded to shape {gray.shape}, expected (H, W)")
    return np.clip(gray, 0.0, 1.0)


def load_mask(path) -> np.ndarray:
    """Read a binary mask as bool (H, W): True where the gray value is above half its range, i.e. > 128
    for 8-bit files and > 32767 for 16-bit ones (16-bit masks are scaled by their range, never clipped
    to 8 bits, which would turn a 0/65535 mask's lesion into 255 but a 0/1000 one's into nothing).

    Warns when the file has non-zero pixels but none above half its range (a 0/1 or 0/100 label map,
    say): such a mask reads as all-background, which is almost never what was meant.
    """
    path = _check_path(path, "mask file")
    picture = _open(path, "mask file")
    if picture.mode in _SIXTEEN_BIT_MODES:
        gray, half = np.asarray(picture, dtype=np.int64), 65535 // 2
    else:
        gray, half = np.asarray(picture.convert("L")), MASK_THRESHOLD
    mask = gray > half
    if not mask.any() and gray.max(initial=0) > 0:
        warnings.warn(f"mask file {str(path)!r} has non-zero values (at most {int(gray.max())}) but none above "
                      f"half its range ({half}), so it reads as empty. Masks are binarised at half range "
                      "(0/255 for 8-bit, 0/65535 for 16-bit files): rescale it.", stacklevel=2)
    return mask


def save_png(path, array) -> Path:
    """Write a 2-D map as an 8-bit grayscale PNG and return the path (parent folders are created).

    bool arrays are written as 0/255, uint8 arrays as they are, float arrays must lie in [0, 1]
    and are scaled to 0..255 with rounding (a probability map, for example).
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike path, got {type(path).__name__}")
    if hasattr(array, "detach"):  # a torch tensor: move it to numpy without importing torch here
        array = array.detach().cpu().numpy()
    array = np.asarray(array)
    if array.ndim != 2:
        raise ValueError(f"save_png expects a 2-D (H, W) array, got shape {array.shape}")
    if array.dtype == np.bool_:
        pixels = array.astype(np.uint8) * 255
    elif array.dtype == np.uint8:
        pixels = array
    elif np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)) or array.min(initial=0) < 0 or array.max(initial=0) > 1:
            raise ValueError("save_png expects float arrays in [0, 1], got values in "
                             f"[{np.nanmin(array)}, {np.nanmax(array)}]")
        pixels = np.rint(array * 255.0).astype(np.uint8)
    else:
        raise TypeError(f"save_png expects a bool, uint8 or float array, got dtype {array.dtype}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(pixels)).save(path, format="PNG")  # uint8 (H, W) -> mode "L"
    return path
