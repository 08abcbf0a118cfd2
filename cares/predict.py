"""`cares predict`: segment new CT slices or volumes with a trained checkpoint.

Inputs (--input, a file or a folder of files):
    2-D slices  .png .jpg .jpeg .bmp .tif .tiff (gray or colour; read as gray / 255, as in training)
    volumes     .nii .nii.gz, windowed with the checkpoint's HU window and predicted slice by slice

Outputs (--out):
    probabilities/<stem>.png       soft map, 8-bit (round(255 * p)), at the slice's own size
    masks/<stem>.png               binary mask (p >= --threshold) as 0/255
    probabilities/<stem>.nii.gz    for volumes: the soft maps as uint8 0-255
    masks/<stem>.nii.gz            for volumes: the mask as uint8 0/1, with the source's affine, so
                                   it overlays the scan in any NIfTI viewer
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

HELP = ("Predict lesion masks with a checkpoint for PNG/JPG slices or NIfTI volumes (a file or a folder). "
        "Writes 8-bit soft maps and binary masks at each input's own size; NIfTI masks keep the source "
        "affine. Model, input size and HU window come from the checkpoint.")


def add_arguments(parser) -> None:
    from cares.evaluate import add_inference_arguments
    add_inference_arguments(parser, workers=False)  # inputs are read lazily, file by file
    parser.add_argument("--input", required=True, metavar="PATH",
                        help="an image (.png/.jpg/...) or NIfTI volume (.nii/.nii.gz), or a folder of them")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for probabilities/ and masks/")
    parser.add_argument("--threshold", type=float, default=0.5, help="probability at or above which a pixel is lesion")


def find_inputs(path) -> tuple[list[Path], list[Path]]:
    """(2-D image files, NIfTI files) named by --input, sorted."""
    from cares.data.io import IMAGE_SUFFIXES
    from cares.data.nifti import is_nifti_path
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--input {str(path)!r} does not exist")
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")) if path.is_dir() else [path]
    volumes = [p for p in files if is_nifti_path(p)]
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    if path.is_file() and not (images or volumes):
        raise ValueError(f"--input {str(path)!r} is neither a 2-D image ({', '.join(IMAGE_SUFFIXES)}) "
                         "nor a NIfTI volume (.nii, .nii.gz)")
    if not images and not volumes:
        raise ValueError(f"--input folder {str(path)!r} holds no images or NIfTI volumes")
    return images, volumes


def predict(checkpoint, input_path, out, *, threshold: float = 0.5, tta: bool = False, batch_size: int = 4,
            device: str = "auto", amp: str = "off") -> list[Path]:
    """Write soft maps and masks for every input (see the module docstring); returns the mask paths."""
    from cares.data import load_image, read_nifti, save_png, window_hu, write_nifti
    from cares.data.nifti import nifti_stem
    from cares.inference import (describe_checkpoint, load_trained_model, predict_probabilities,
                                 probability_to_uint8)

    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"--threshold must be in [0, 1], got {threshold}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    images, volumes = find_inputs(input_path)
    model, state, torch_device = load_trained_model(checkpoint, device)
    settings = state["input"]
    print(f"predicting with {describe_checkpoint(state, checkpoint)}: {len(images)} slice(s), "
          f"{len(volumes)} volume(s)", file=sys.stderr)
    out = Path(out)
    run = dict(image_size=settings["image_size"], device=torch_device, batch_size=batch_size, tta=tta, amp=amp)
    written = []

    # 2-D slices: read lazily, one batch in memory at a time.
    slices = ({"image": torch.from_numpy(load_image(path))[None], "name": path.stem} for path in images)
    for item, probability in predict_probabilities(model, slices, **run):
        save_png(out / "probabilities" / f"{item['name']}.png", probability_to_uint8(probability))
        written.append(save_png(out / "masks" / f"{item['name']}.png", probability >= threshold))

    # Volumes: windowed as training data is (cares.data's NIfTI datasets), predicted slice by slice.
    for path in volumes:
        volume, affine = read_nifti(path)
        windowed = window_hu(volume, settings["window_width"], settings["window_level"])
        items = ({"image": torch.from_numpy(windowed[z])[None]} for z in range(len(windowed)))
        probabilities = np.stack([p for _, p in predict_probabilities(model, items, **run)])
        stem = nifti_stem(path)
        write_nifti(out / "probabilities" / f"{stem}.nii.gz", probability_to_uint8(probabilities), affine)
        written.append(write_nifti(out / "masks" / f"{stem}.nii.gz",
                                   (probabilities >= threshold).astype(np.uint8), affine))
    return written


def run(args) -> int:
    try:
        written = predict(args.checkpoint, args.input, args.out, threshold=args.threshold, tta=args.tta,
                          batch_size=args.batch_size, device=args.device, amp=args.amp)
    except (ValueError, FileNotFoundError) as err:
        print(f"cares predict: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {len(written)} mask(s) and soft map(s) under {args.out}", file=sys.stderr)
    return 0
