"""`cares predict`: segment new CT slices or volumes with a trained checkpoint.

Inputs (--input, a file or a folder of files):
    2-D slices  .png .jpg .jpeg .bmp .tif .tiff (gray or colour; read as gray / 255, as in training)
    volumes     .nii .nii.gz, windowed with the checkpoint's HU window and predicted slice by slice

Outputs (--out), named after the whole input file name, extension included, so inputs that share a
stem (scan.png and scan.jpg, vol.nii and vol.nii.gz) never overwrite each other:
    probabilities/<file>.png       soft map, 8-bit: round(255 * p), so 0-255 stands for 0-1
    masks/<file>.png               binary mask (p >= --threshold) as 0/255
    probabilities/<file>.nii.gz    for volumes: the soft maps as uint8 0-255
    masks/<file>.nii.gz            for volumes: the mask as uint8 0/1, with the source's affine, so
                                   it overlays the scan in any NIfTI viewer
    manifest.json                  every input of this run -> its outputs, or why it failed

A file that cannot be predicted (unreadable, NaN/inf pixels, non-finite output) is reported by name;
the others are still predicted, and the command exits with status 1. Files from earlier runs in
--out are left alone and are not in manifest.json. --out may not hold the inputs, nor probabilities/,
masks/ or manifest.json that an earlier `cares predict` did not write (cares.runtime.claim_output).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cares.data.nifti import DEFAULT_WINDOW_LEVEL, DEFAULT_WINDOW_WIDTH

# What the command writes into --out (see cares.runtime.claim_output).
OWNER = "cares predict"
OUTPUT_ENTRIES = ("probabilities", "masks", "manifest.json")

HELP = ("Predict lesion masks with a checkpoint for PNG/JPG slices or NIfTI volumes (a file or a folder). "
        "Writes soft probability maps stored as 8-bit 0-255 (= probability 0-1) and binary masks at each "
        "input's own size, named after the whole input file name, plus manifest.json; NIfTI masks keep the "
        "source affine. Model and input size come from the checkpoint; NIfTI volumes are windowed to the "
        f"checkpoint's HU window (cares trains with width {DEFAULT_WINDOW_WIDTH:g}, level "
        f"{DEFAULT_WINDOW_LEVEL:g}). A file that fails is reported by name, the rest are still predicted, "
        "and the exit status is 1.")


def add_arguments(parser) -> None:
    from cares.evaluate import add_inference_arguments
    add_inference_arguments(parser, workers=False)  # inputs are read lazily, file by file
    parser.add_argument("--input", required=True, metavar="PATH",
                        help="an image (.png/.jpg/...) or NIfTI volume (.nii/.nii.gz), or a folder of them")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="folder for probabilities/, masks/ and manifest.json")
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


def output_names(paths: list[Path]) -> dict[Path, str]:
    """The name each input's outputs get: its whole file name (scan.png, scan.jpg and vol.nii.gz stay
    apart). Names that differ only in letter case (Scan.png, scan.png) would collide on a
    case-insensitive file system, so the later ones get a "~2", "~3" suffix."""
    names, taken = {}, {}
    for path in paths:
        key = path.name.lower()
        count = taken.get(key, 0) + 1
        taken[key] = count
        names[path] = path.name if count == 1 else f"{path.name}~{count}"
    return names


class _Report:
    """The manifest of one run: what each input produced, or why it failed."""

    def __init__(self, out: Path):
        self.out, self.entries = out, []

    def ok(self, path: Path, probability: Path, mask: Path) -> None:
        self.entries.append({"input": str(path), "status": "ok",
                             "probability": str(probability.relative_to(self.out)),
                             "mask": str(mask.relative_to(self.out))})

    def failed(self, path: Path, error: str) -> None:
        print(f"cares predict: {path}: failed: {error}", file=sys.stderr)
        self.entries.append({"input": str(path), "status": "failed", "error": error})

    @property
    def failures(self) -> list[dict[str, Any]]:
        return [e for e in self.entries if e["status"] == "failed"]


def predict(checkpoint, input_path, out, *, threshold: float = 0.5, tta: bool = False, batch_size: int = 4,
            device: str = "auto", amp: str = "off") -> dict[str, Any]:
    """Write soft maps and masks for every input (see the module docstring); returns manifest.json's
    content: {"inputs": [{"input", "status": "ok", "probability", "mask"} or {"input", "status":
    "failed", "error"}], "written", "failed", ...}."""
    from cares.data import load_image, read_nifti, save_png, window_hu, write_nifti
    from cares.inference import (describe_checkpoint, failed_item, load_trained_model, predict_probabilities,
                                 probability_to_uint8)
    from cares.runtime import atomic_write_bytes, claim_output, progress

    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"--threshold must be in [0, 1], got {threshold}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    images, volumes = find_inputs(input_path)
    # Files of an earlier predict in --out are overwritten when an input has the same name; anything
    # else there, and the inputs themselves, never.
    claim = claim_output(out, OWNER, OUTPUT_ENTRIES, mode="update",
                         inputs=[("--checkpoint", checkpoint), ("--input", input_path)],
                         input_files=[("--input", p) for p in images + volumes])
    out = claim.folder
    model, state, torch_device = load_trained_model(checkpoint, device)
    claim.take()
    settings = state["input"]
    print(f"predicting with {describe_checkpoint(state, checkpoint)}: {len(images)} slice(s), "
          f"{len(volumes)} volume(s)", file=sys.stderr)
    run = dict(image_size=settings["image_size"], device=torch_device, batch_size=batch_size, tta=tta, amp=amp)
    names = output_names(images + volumes)
    report = _Report(out)
    files = progress(images + volumes, total=len(images) + len(volumes), desc="predict", unit="file")

    # 2-D slices: read lazily, one batch in memory at a time; an unreadable file becomes a failed item.
    def slices():
        for path in files:
            try:
                yield {"image": torch.from_numpy(load_image(path))[None], "name": path.name, "path": path}
            except (ValueError, OSError) as err:
                yield {**failed_item(path.name, err), "path": path}
            if path is images[-1]:
                return  # the volumes that follow are read below, from the same progress iterator

    if images:
        for item, probability in predict_probabilities(model, slices(), skip_failed=True, **run):
            if probability is None:
                report.failed(item["path"], item["error"])
                continue
            name = names[item["path"]]
            report.ok(item["path"], save_png(out / "probabilities" / f"{name}.png", probability_to_uint8(probability)),
                      save_png(out / "masks" / f"{name}.png", probability >= threshold))

    # Volumes: windowed as training data is (cares.data's NIfTI datasets), predicted slice by slice.
    for path in files:
        try:
            volume, affine = read_nifti(path)
            windowed = window_hu(volume, settings["window_width"], settings["window_level"])
            items = ({"image": torch.from_numpy(windowed[z])[None], "name": f"slice {z}"} for z in range(len(windowed)))
            probabilities = np.stack([p for _, p in predict_probabilities(model, items, **run)])
        except (ValueError, OSError, RuntimeError) as err:  # ItemError (NaN slices, diverged output) is a ValueError
            report.failed(path, str(err))
            continue
        name = names[path]
        report.ok(path, write_nifti(out / "probabilities" / f"{name}.nii.gz", probability_to_uint8(probabilities), affine),
                  write_nifti(out / "masks" / f"{name}.nii.gz", (probabilities >= threshold).astype(np.uint8), affine))

    manifest = {"checkpoint": str(checkpoint), "input": str(input_path), "threshold": threshold, "tta": tta,
                "written": len(report.entries) - len(report.failures), "failed": len(report.failures),
                "inputs": report.entries}
    atomic_write_bytes(out / "manifest.json", (json.dumps(manifest, indent=2) + "\n").encode())
    return manifest


def run(args) -> int:
    try:
        manifest = predict(args.checkpoint, args.input, args.out, threshold=args.threshold, tta=args.tta,
                           batch_size=args.batch_size, device=args.device, amp=args.amp)
    except (ValueError, OSError) as err:
        print(f"cares predict: error: {err}", file=sys.stderr)
        return 2
    summary = f"wrote masks and soft maps for {manifest['written']} input(s) under {args.out} (see manifest.json)"
    if manifest["failed"]:
        failed = ", ".join(Path(e["input"]).name for e in manifest["inputs"] if e["status"] == "failed")
        print(f"{summary}; {manifest['failed']} input(s) failed: {failed}", file=sys.stderr)
        return 1
    print(summary, file=sys.stderr)
    return 0
