"""`cares pseudo-label`: the semi-supervised step of Semi-CARes-UNet (the paper's rule, and this project's).

1. The supervised model predicts every unlabeled slice.
2. Each prediction gets a reliability score, the binary entropy of its probability map,

       H(p) = -p log_b(p) - (1 - p) log_b(1 - p),

   averaged over a region of the slice (--score):
     mean    over every pixel: the paper's rule. On CT slices the background, which the model gets
             right, is nearly all of the image, so every slice scores low and the filter keeps
             almost everything (1600 of 1600 COVID-SemiSeg slices at threshold 0.6).
     lesion  over the predicted lesion and its border only: the pixels within --border (a fraction of
             the slice's side) of a pixel with p >= 0.5, plus every pixel the model does not call
             background with confidence (p >= 0.1). That is where a pseudo label can be wrong, so the
             score tells a clean lesion from a doubtful one whatever the lesion's size. A slice whose
             region is empty is predicted lesion-free: --empty keep|drop says what to do with it.
   The log base b is --log-base, 2 by default, which makes the largest possible entropy (p = 0.5) 1.
   With --shape-prior SPLIT, a pseudo mask must also look like a real one: a slice is rejected when its
   predicted lesion covers more of the slice, or more of the image's outer border, than any ground-truth
   mask of SPLIT (the labelled slices) does. Entropy measures the model's doubt, not its error: on
   slices unlike the labelled ones (another scanner or window) a model can be confidently wrong, and on
   COVID-SemiSeg it labels the whole body wall of 1119 "coronacases" slices as lesion, with low entropy.
3. A slice is kept when its score is below --entropy-threshold (0.6 by default); with --keep-fraction F,
   only the F most reliable of those (lowest scores) are kept, as ST++ (Yang et al., CVPR 2022) keeps
   its most reliable half.
4. Kept slices are written in a COVID-SemiSeg-like layout that `cares train --pseudo DIR` reads:
       DIR/Imgs/<name>.png   the slice as the model saw it (8-bit gray; NIfTI slices windowed)
       DIR/GT/<name>.png     the pseudo mask, probability >= 0.5, as 0/255, at the slice's own size
   and DIR/summary.json says how many were kept and each slice's score.
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
        "binary entropy, averaged over every pixel (--score mean, the paper's rule) or over the predicted lesion "
        "and its border (--score lesion), is below --entropy-threshold (log base --log-base; base 2 makes the "
        "maximum 1), optionally only the --keep-fraction most reliable. Writes DIR/Imgs, DIR/GT and "
        "DIR/summary.json; then `cares train --pseudo DIR`.")

# What the command writes into --out (see cares.runtime.claim_output).
OWNER = "cares pseudo-label"
OUTPUT_ENTRIES = ("Imgs", "GT", "summary.json")

DEFAULT_ENTROPY_THRESHOLD = 0.6
DEFAULT_LOG_BASE = 2.0
SCORES = ("mean", "lesion")                 # where the entropy is averaged (see the module docstring)
EMPTY_POLICIES = ("keep", "drop")           # lesion score: what happens to a slice predicted lesion-free
DEFAULT_BORDER = 0.02                       # lesion score: the border's width, a fraction of the shorter side
# Lesion score: pixels at or above this probability are not confidently background, so they count too.
UNSURE_PROBABILITY = 0.1


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


def lesion_region(probability: np.ndarray, threshold: float = 0.5, border: float = DEFAULT_BORDER) -> np.ndarray:
    """The lesion score's region (bool, the map's shape): within round(border * min(H, W)) pixels (a square
    neighbourhood) of a pixel >= threshold, plus every pixel >= UNSURE_PROBABILITY."""
    import torch
    import torch.nn.functional as F
    p = np.asarray(probability, dtype=np.float32)
    if p.ndim != 2:
        raise ValueError(f"probability map must be 2-D (H, W), got shape {p.shape}")
    radius = int(round(border * min(p.shape)))
    lesion = torch.from_numpy(p >= threshold).float()[None, None]
    if radius > 0:
        lesion = F.max_pool2d(lesion, 2 * radius + 1, stride=1, padding=radius)
    return (lesion[0, 0].numpy() > 0) | (p >= UNSURE_PROBABILITY)


def reliability_score(probability: np.ndarray, score: str = "mean", log_base: float = DEFAULT_LOG_BASE,
                      threshold: float = 0.5, border: float = DEFAULT_BORDER) -> float | None:
    """The slice's mean binary entropy over every pixel ("mean") or over its lesion_region ("lesion");
    None when the lesion region is empty (the slice is predicted lesion-free)."""
    if score == "mean":
        return mean_binary_entropy(probability, log_base)
    if score != "lesion":
        raise ValueError(f"score must be one of {list(SCORES)}, got {score!r}")
    region = lesion_region(probability, threshold, border)
    if not region.any():
        return None
    return mean_binary_entropy(np.asarray(probability)[region], log_base)


def mask_shape(mask: np.ndarray) -> tuple[float, float]:
    """(lesion fraction, fraction of the image's outer border pixels that are lesion) of a 2-D bool mask."""
    mask = np.asarray(mask, dtype=bool)
    border = np.concatenate([mask[0], mask[-1], mask[1:-1, 0], mask[1:-1, -1]])
    return float(mask.mean()), float(border.mean())


def shape_limits(source, split: str) -> dict[str, float]:
    """The largest lesion fraction and border coverage among the ground-truth masks of `split` of `source`."""
    from cares.evaluate import native_size_dataset
    dataset = native_size_dataset(source, split, image_size=256, labeled=True)
    if len(dataset) == 0:
        raise ValueError(f"--shape-prior split {split!r} of {source!r} holds no labelled slices")
    shapes = [mask_shape(dataset[i]["mask"][0].numpy() > 0.5) for i in range(len(dataset))]
    return {"split": split, "slices": len(shapes), "max_lesion_fraction": max(f for f, _ in shapes),
            "max_border_fraction": max(b for _, b in shapes)}


def below_threshold(score: float, entropy_threshold: float | None) -> bool:
    """The paper's rule on a slice's reliability score (an entropy): keep when it is strictly below the
    threshold; None means no threshold."""
    return entropy_threshold is None or score < entropy_threshold


def _threshold_or_none(text: str) -> float | None:
    import argparse
    if str(text).lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--entropy-threshold must be a number or 'none', got {text!r}") from None


def add_arguments(parser) -> None:
    from cares.evaluate import add_inference_arguments
    add_inference_arguments(parser)
    parser.add_argument("--input", required=True, metavar="SOURCE",
                        help="unlabeled slices: a folder of images/volumes, a dataset root with an 'unlabeled' "
                             "split (e.g. COVID-SemiSeg), or 'synthetic'")
    parser.add_argument("--split", default="unlabeled", metavar="NAME",
                        help="split of --input to read when it is a dataset root")
    parser.add_argument("--out", required=True, metavar="DIR", help="pseudo-label folder (Imgs/, GT/, summary.json)")
    parser.add_argument("--entropy-threshold", type=_threshold_or_none, default=DEFAULT_ENTROPY_THRESHOLD,
                        help="keep a slice when its score (mean binary entropy) is below this; 'none': no threshold")
    parser.add_argument("--score", choices=SCORES, default="mean",
                        help="where the entropy is averaged: every pixel (mean, the paper's) or the predicted lesion "
                             "and its border (lesion)")
    parser.add_argument("--keep-fraction", type=float, metavar="F",
                        help="then keep only the fraction F of the passing slices with the lowest scores")
    parser.add_argument("--empty", choices=EMPTY_POLICIES, default="keep",
                        help="--score lesion: keep or drop slices predicted lesion-free")
    parser.add_argument("--shape-prior", metavar="SPLIT",
                        help="a labelled split of --input (e.g. train): reject a pseudo mask that covers more of the "
                             "slice, or of its outer border, than any of that split's ground-truth masks")
    parser.add_argument("--border", type=float, default=DEFAULT_BORDER, metavar="FRACTION",
                        help="--score lesion: width of the border around the predicted lesion, as a fraction of "
                             "the slice's shorter side")
    parser.add_argument("--log-base", type=parse_log_base, default=DEFAULT_LOG_BASE,
                        help="base of the entropy's logarithm: 2 (max entropy 1), e, 10, ...")
    parser.add_argument("--threshold", type=float, default=0.5, help="probability at or above which a pixel is lesion")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the Imgs/, GT/ and summary.json of an earlier pseudo-label in --out (never "
                             "files it did not write, nor its own --input)")


def pseudo_label(checkpoint, source, out, *, split: str = "unlabeled",
                 entropy_threshold: float | None = DEFAULT_ENTROPY_THRESHOLD, log_base: float = DEFAULT_LOG_BASE,
                 score: str = "mean", keep_fraction: float | None = None, empty: str = "keep",
                 border: float = DEFAULT_BORDER, shape_prior: str | None = None, threshold: float = 0.5, tta: bool = False, batch_size: int = 4,
                 device: str = "auto", amp: str = "off", num_workers: int = 0,
                 overwrite: bool = False) -> dict[str, Any]:
    """Write the reliable pseudo labels of `split` of `source` into `out`; returns summary.json's content.

    score, keep_fraction, empty, border: the selection rule (module docstring); the defaults are the
    paper's (mean entropy below entropy_threshold). entropy_threshold None: no threshold. shape_prior: a
    labelled split of `source` whose masks bound the pseudo masks' lesion fraction and border coverage."""
    from cares.data import save_png
    from cares.evaluate import native_size_dataset
    from cares.inference import SafeItems, describe_checkpoint, load_trained_model, predict_probabilities
    from cares.runtime import atomic_write_bytes, check_output_dir, claim_output, progress
    from cares.sampling import dataset_files

    if entropy_threshold is not None and not entropy_threshold > 0:
        raise ValueError(f"--entropy-threshold must be > 0, got {entropy_threshold}")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"--threshold must be in [0, 1], got {threshold}")
    if score not in SCORES:
        raise ValueError(f"--score must be one of {list(SCORES)}, got {score!r}")
    if keep_fraction is not None and not 0.0 < keep_fraction <= 1.0:
        raise ValueError(f"--keep-fraction must be in (0, 1], got {keep_fraction}")
    if empty not in EMPTY_POLICIES:
        raise ValueError(f"--empty must be one of {list(EMPTY_POLICIES)}, got {empty!r}")
    if not 0.0 <= border < 0.5:
        raise ValueError(f"--border must be in [0, 0.5) (a fraction of the slice's side), got {border}")
    out = check_output_dir(out)  # an unusable --out is reported before the model is loaded
    limits = shape_limits(source, shape_prior) if shape_prior is not None else None
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

    images, failures, candidates = [], [], []
    predictions = predict_probabilities(model, SafeItems(dataset, lambda i: item_name(dataset, i)),
                                        image_size=image_size, device=torch_device, batch_size=batch_size,
                                        tta=tta, amp=amp, num_workers=num_workers, skip_failed=True)
    for item, probability in progress(predictions, total=len(dataset), desc="pseudo-label", unit="slice"):
        if probability is None:
            print(f"cares pseudo-label: {item['name']}: failed: {item['error']}", file=sys.stderr)
            failures.append({"name": item["name"], "error": item["error"]})
            continue
        value = reliability_score(probability, score, log_base, threshold, border)
        mask = probability >= threshold
        lesion_fraction, border_fraction = mask_shape(mask)
        row = {"name": item["name"], "entropy": value, "kept": False, "lesion_fraction": lesion_fraction,
               "border_fraction": border_fraction}
        if limits is not None and (lesion_fraction > limits["max_lesion_fraction"]
                                   or border_fraction > limits["max_border_fraction"]):
            row["rejected_because"] = f"unlike every mask of the --shape-prior split {shape_prior!r}"
        elif value is None and empty == "drop":
            row["rejected_because"] = "predicted lesion-free"
        elif value is not None and not below_threshold(value, entropy_threshold):
            row["rejected_because"] = "entropy at or above the threshold"
        else:
            # Kept as 8-bit pixels (what save_png writes) until the ranking is known; slices are small.
            pixels = np.rint(item["image"][0].numpy().clip(0.0, 1.0) * 255.0).astype(np.uint8)
            candidates.append((0.0 if value is None else value, len(images), pixels, mask))
        images.append(row)
    if keep_fraction is not None:
        # The most reliable first (ties by order of the split, so the choice is reproducible).
        candidates.sort(key=lambda c: (c[0], c[1]))
        keep = int(round(keep_fraction * len(candidates)))
        for _, index, _, _ in candidates[keep:]:
            images[index]["rejected_because"] = "not among the --keep-fraction most reliable"
        candidates = candidates[:keep]
    for _, index, pixels, mask in sorted(candidates, key=lambda c: c[1]):
        images[index]["kept"] = True
        save_png(image_dir / f"{images[index]['name']}.png", pixels)
        save_png(mask_dir / f"{images[index]['name']}.png", mask)

    kept = sum(row["kept"] for row in images)
    summary = {
        "checkpoint": str(checkpoint), "input": str(source), "split": split,
        "total": len(images) + len(failures), "kept": kept, "rejected": len(images) - kept,
        "failed": len(failures),
        "score": score, "entropy_threshold": entropy_threshold, "keep_fraction": keep_fraction, "empty": empty,
        "border": border, "shape_prior": limits, "log_base": log_base, "max_entropy": math.log(2) / math.log(log_base),
        "rule": _rule(score, entropy_threshold, keep_fraction, empty, limits),
        "mask_threshold": threshold, "tta": tta,
        "images": images, "failures": failures,
    }
    atomic_write_bytes(out / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
    return summary


def _rule(score: str, entropy_threshold: float | None, keep_fraction: float | None, empty: str,
          limits: dict[str, Any] | None) -> str:
    region = "every pixel" if score == "mean" else "the predicted lesion and its border"
    parts = [f"score = mean over {region} of -p log_b p - (1-p) log_b (1-p)"]
    if limits is not None:
        parts.append(f"reject when the mask covers more than {limits['max_lesion_fraction']:.3f} of the slice or "
                     f"{limits['max_border_fraction']:.3f} of its border (the largest in {limits['split']!r})")
    if entropy_threshold is not None:
        parts.append(f"keep when score < {entropy_threshold}")
    if score == "lesion":
        parts.append(f"slices predicted lesion-free: {empty}")
    if keep_fraction is not None:
        parts.append(f"then keep the {keep_fraction:g} most reliable (lowest scores)")
    return "; ".join(parts)


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
                               score=args.score, keep_fraction=args.keep_fraction, empty=args.empty,
                               border=args.border, shape_prior=args.shape_prior, threshold=args.threshold, tta=args.tta, batch_size=args.batch_size,
                               device=args.device, amp=args.amp, num_workers=args.num_workers,
                               overwrite=args.overwrite)
    except (ValueError, OSError) as err:
        print(f"cares pseudo-label: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({k: summary[k] for k in ("total", "kept", "rejected", "failed", "score", "entropy_threshold",
                                              "keep_fraction", "empty", "log_base")}))
    print(f"kept {summary['kept']} of {summary['total']} slices; wrote {Path(args.out) / 'Imgs'}, GT/ and "
          "summary.json", file=sys.stderr)
    if summary["failed"]:
        print(f"{summary['failed']} slice(s) failed: " + ", ".join(f["name"] for f in summary["failures"]),
              file=sys.stderr)
        return 1
    return 0
