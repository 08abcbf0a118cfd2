"""`cares pseudo-label`: the semi-supervised step of the paper (Semi-CARes-UNet).

1. The supervised model predicts every unlabeled slice.
2. A prediction is kept as a pseudo label only when the model is confident about it: the mean over
   pixels of the binary entropy of its probability map,

       H(p) = -p log_b(p) - (1 - p) log_b(1 - p),     mean over the slice's pixels,

   is below --entropy-threshold (0.6 by default). The log base b is --log-base, 2 by default, which
   makes the largest possible entropy (p = 0.5 everywhere) exactly 1; with base e it is ln 2 = 0.693.
3. Kept slices are written in a COVID-SemiSeg-like layout that `cares train --pseudo DIR` reads:
       DIR/Imgs/<name>.png   the slice as the model saw it (8-bit gray; NIfTI slices windowed)
       DIR/GT/<name>.png     the pseudo mask, probability >= 0.5, as 0/255, at the slice's own size
   and DIR/summary.json says how many were kept and each slice's entropy.
   A slice that cannot be predicted (unreadable, NaN/inf pixels) is listed under "failures" by name;
   the others are still labelled, and the command exits with status 1.

Then `cares train --pseudo DIR ...` trains on the labelled set plus, each epoch, as many pseudo-
labelled slices as labelled ones, drawn afresh every epoch.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

HELP = ("Semi-supervised step: predict unlabeled slices and keep a prediction as a pseudo label when its "
        "mean per-pixel binary entropy is below --entropy-threshold (log base --log-base; base 2 makes the "
        "maximum 1). Writes DIR/Imgs, DIR/GT and DIR/summary.json; then `cares train --pseudo DIR`.")

# What the command writes into --out (see cares.runtime.claim_output).
OWNER = "cares pseudo-label"
OUTPUT_ENTRIES = ("Imgs", "GT", "summary.json")

DEFAULT_ENTROPY_THRESHOLD = 0.6
DEFAULT_LOG_BASE = 2.0


def parse_log_base(text: str) -> float:
    """'2', '10', 'e' (natural log) -> the base as a float."""
    import argparse
    try:
        base = math.e if str(text).lower() == "e" else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--log-base must be a number > 0 other than 1, or 'e'; got {text!r}") from None
    if not base > 0 or base == 1:
        raise argparse.ArgumentTypeError(f"--log-base must be > 0 and not 1, got {text!r}")
    return base


def mean_binary_entropy(probability: np.ndarray, log_base: float = DEFAULT_LOG_BASE) -> float:
    """Mean over pixels of -p log_b p - (1-p) log_b (1-p); 0 for a map of 0s and 1s, log_b(2) at 0.5."""
    if not log_base > 0 or log_base == 1:
        raise ValueError(f"log_base must be > 0 and not 1, got {log_base}")
    p = np.asarray(probability, dtype=np.float64)
    if p.size == 0:
        raise ValueError("probability map is empty")
    # x log x -> 0 as x -> 0: clipping at a tiny epsilon gives that limit without 0 * -inf = nan.
    p = np.clip(p, 1e-12, 1.0 - 1e-12)
    entropy = -(p * np.log(p) + (1.0 - p) * np.log1p(-p)) / math.log(log_base)
    return float(entropy.mean())


def is_confident(probability: np.ndarray, entropy_threshold: float = DEFAULT_ENTROPY_THRESHOLD,
                 log_base: float = DEFAULT_LOG_BASE) -> tuple[bool, float]:
    """(keep?, mean entropy): keep when the mean binary entropy is strictly below the threshold."""
    entropy = mean_binary_entropy(probability, log_base)
    return entropy < entropy_threshold, entropy


def add_arguments(parser) -> None:
    from cares.evaluate import add_inference_arguments
    add_inference_arguments(parser)
    parser.add_argument("--input", required=True, metavar="SOURCE",
                        help="unlabeled slices: a folder of images/volumes, a dataset root with an 'unlabeled' "
                             "split (e.g. COVID-SemiSeg), or 'synthetic'")
    parser.add_argument("--split", default="unlabeled", metavar="NAME",
                        help="split of --input to read when it is a dataset root")
    parser.add_argument("--out", required=True, metavar="DIR", help="pseudo-label folder (Imgs/, GT/, summary.json)")
    parser.add_argument("--entropy-threshold", type=float, default=DEFAULT_ENTROPY_THRESHOLD,
                        help="keep a slice when its mean per-pixel binary entropy is below this")
    parser.add_argument("--log-base", type=parse_log_base, default=DEFAULT_LOG_BASE,
                        help="base of the entropy's logarithm: 2 (max entropy 1), e, 10, ...")
    parser.add_argument("--threshold", type=float, default=0.5, help="probability at or above which a pixel is lesion")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the Imgs/, GT/ and summary.json of an earlier pseudo-label in --out (never "
                             "files it did not write, nor its own --input)")


def pseudo_label(checkpoint, source, out, *, split: str = "unlabeled",
                 entropy_threshold: float = DEFAULT_ENTROPY_THRESHOLD, log_base: float = DEFAULT_LOG_BASE,
                 threshold: float = 0.5, tta: bool = False, batch_size: int = 4, device: str = "auto",
                 amp: str = "off", num_workers: int = 0, overwrite: bool = False) -> dict[str, Any]:
    """Write the confident pseudo labels of `split` of `source` into `out`; returns summary.json's content."""
    from cares.data import save_png
    from cares.evaluate import native_size_dataset
    from cares.inference import SafeItems, describe_checkpoint, load_trained_model, predict_probabilities
    from cares.runtime import atomic_write_bytes, check_output_dir, claim_output, progress
    from cares.sampling import dataset_files

    if not entropy_threshold > 0:
        raise ValueError(f"--entropy-threshold must be > 0, got {entropy_threshold}")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"--threshold must be in [0, 1], got {threshold}")
    out = check_output_dir(out)  # an unusable --out is reported before the model is loaded
    model, state, torch_device = load_trained_model(checkpoint, device)
    image_size = state["input"]["image_size"]
    dataset = native_size_dataset(source, split, image_size, labeled=False)
    # --out may not hold the slices being labelled (--input R --split unlabeled --out R/unlabeled would
    # replace R/unlabeled/Imgs), and --overwrite replaces only an earlier pseudo-label's own outputs.
    claim = claim_output(out, OWNER, OUTPUT_ENTRIES, mode="replace" if overwrite else "new",
                         inputs=[("--checkpoint", checkpoint), ("--input", source)],
                         input_files=[("--input", f) for f in dataset_files(dataset)],
                         remedy="pass --overwrite to replace them, or choose another --out")
    claim.take()   # only now that everything has been checked
    image_dir, mask_dir = out / "Imgs", out / "GT"
    image_dir.mkdir()
    mask_dir.mkdir()
    print(f"pseudo-labelling {len(dataset)} slices of {source} [{split}] with "
          f"{describe_checkpoint(state, checkpoint)}", file=sys.stderr)

    images, failures = [], []
    predictions = predict_probabilities(model, SafeItems(dataset, lambda i: item_name(dataset, i)),
                                        image_size=image_size, device=torch_device, batch_size=batch_size,
                                        tta=tta, amp=amp, num_workers=num_workers, skip_failed=True)
    for item, probability in progress(predictions, total=len(dataset), desc="pseudo-label", unit="slice"):
        if probability is None:
            print(f"cares pseudo-label: {item['name']}: failed: {item['error']}", file=sys.stderr)
            failures.append({"name": item["name"], "error": item["error"]})
            continue
        keep, entropy = is_confident(probability, entropy_threshold, log_base)
        mask = probability >= threshold
        images.append({"name": item["name"], "entropy": entropy, "kept": keep,
                       "lesion_fraction": float(mask.mean())})
        if keep:
            save_png(image_dir / f"{item['name']}.png", item["image"][0].numpy().clip(0.0, 1.0))
            save_png(mask_dir / f"{item['name']}.png", mask)

    kept = sum(row["kept"] for row in images)
    summary = {
        "checkpoint": str(checkpoint), "input": str(source), "split": split,
        "total": len(images) + len(failures), "kept": kept, "rejected": len(images) - kept,
        "failed": len(failures),
        "entropy_threshold": entropy_threshold, "log_base": log_base,
        "max_entropy": math.log(2) / math.log(log_base),
        "rule": "keep when mean over pixels of -p log_b p - (1-p) log_b (1-p) < entropy_threshold",
        "mask_threshold": threshold, "tta": tta,
        "images": images, "failures": failures,
    }
    atomic_write_bytes(out / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
    return summary


def item_name(dataset, index: int) -> str:
    """Item `index`'s name without loading it (for reporting a slice that cannot be read)."""
    from cares.sampling import leaf_datasets
    leaf = next(leaf_datasets(dataset))
    if hasattr(leaf, "stems"):
        return leaf.stems[index]
    if hasattr(leaf, "slices") and hasattr(leaf, "volume_paths"):
        from cares.data.nifti import nifti_stem
        number, z = leaf.slices[index]
        return f"{nifti_stem(leaf.volume_paths[number])}_z{z}"
    return f"item {index}"


def run(args) -> int:
    try:
        summary = pseudo_label(args.checkpoint, args.input, args.out, split=args.split,
                               entropy_threshold=args.entropy_threshold, log_base=args.log_base,
                               threshold=args.threshold, tta=args.tta, batch_size=args.batch_size,
                               device=args.device, amp=args.amp, num_workers=args.num_workers,
                               overwrite=args.overwrite)
    except (ValueError, OSError) as err:
        print(f"cares pseudo-label: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({k: summary[k] for k in ("total", "kept", "rejected", "failed", "entropy_threshold",
                                              "log_base")}))
    print(f"kept {summary['kept']} of {summary['total']} slices; wrote {Path(args.out) / 'Imgs'}, GT/ and "
          "summary.json", file=sys.stderr)
    if summary["failed"]:
        print(f"{summary['failed']} slice(s) failed: " + ", ".join(f["name"] for f in summary["failures"]),
              file=sys.stderr)
        return 1
    return 0
