"""`cares evaluate`: score a checkpoint on a labelled split, as the paper's Table 1 does.

Writes into --out:
    metrics.json    per image and mean +- std over images, under both protocols
    metrics.md      the same means as a markdown table
    qualitative.png Fig. 6-style comparison of the first --figures images (image, ground truth,
                    prediction: TP white, FP red, FN blue, TN black); figures/<name>.png one per image

Protocols (see cares.metrics):
    infnet     the Inf-Net evaluation toolbox: the map is min-max normalised, Dice/Sen/Spe/E-measure
               are averaged over 256 thresholds, S-measure (alpha 0.5) and MAE on the normalised map.
               The map is first rounded to 8 bits, as the toolbox reads saved PNGs.
    threshold  plain metrics of probability >= 0.5; S-measure and MAE on the raw map.

Each probability map is resized back to its ground truth's own size (bilinearly) before anything is
measured, so the scores do not depend on the training resolution.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

HELP = ("Evaluate a checkpoint on a labelled split: Dice, sensitivity, specificity, S-measure, E-measure "
        "and MAE per image and as mean +- std, under the Inf-Net toolbox protocol and at threshold 0.5, "
        "each at the ground truth's own size. Writes metrics.json, metrics.md and Fig. 6-style figures.")

# What the command writes into --out (see cares.runtime.claim_output).
OWNER = "cares evaluate"
OUTPUT_ENTRIES = ("metrics.json", "metrics.md", "qualitative.png", "figures")

METRIC_TITLES = {"dice": "Dice", "sensitivity": "Sen", "specificity": "Spe", "s_measure": "S-alpha",
                 "e_measure": "E-mean", "mae": "MAE"}
PROTOCOL_NOTES = {
    "infnet": "Inf-Net toolbox: 8-bit map min-max normalised; Dice/Sen/Spe/E-mean averaged over 256 "
              "thresholds; S-alpha (alpha 0.5) and MAE on the normalised map",
    "threshold": "probability >= 0.5; S-alpha and MAE on the raw probability map",
}


def add_inference_arguments(parser, *, workers: bool = True) -> None:
    """Flags shared by evaluate, predict and pseudo-label (the model comes from the checkpoint)."""
    parser.add_argument("--checkpoint", required=True, metavar="CKPT",
                        help="best.pt or last.pt written by `cares train` (it records model and input size)")
    from cares.runtime import AMP_CHOICES, DEVICE_CHOICES
    parser.add_argument("--device", choices=DEVICE_CHOICES, default="auto", help="auto = cuda when available")
    parser.add_argument("--batch-size", type=int, default=4, metavar="N", help="images per forward pass")
    parser.add_argument("--amp", choices=AMP_CHOICES, default="off",
                        help="mixed-precision inference (auto = bf16 where the device computes it fast)")
    parser.add_argument("--tta", action="store_true", help="average the probabilities over horizontal/vertical flips")
    if workers:
        parser.add_argument("--num-workers", type=int, default=0, metavar="N", help="DataLoader worker processes")


def add_arguments(parser) -> None:
    add_inference_arguments(parser)
    parser.add_argument("--data", required=True, metavar="SOURCE",
                        help="'synthetic' or a dataset folder (COVID-SemiSeg root, image/mask folders, NIfTI)")
    parser.add_argument("--split", default="test", metavar="NAME", help="split of --data to evaluate")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for metrics.json, metrics.md, figures")
    parser.add_argument("--figures", type=int, default=8, metavar="N",
                        help="draw the Fig. 6 comparison for the first N images (0: none)")


def native_size_dataset(source, split: str, image_size: int, labeled: bool = True,
                        synthetic_samples: int | None = None):
    """The split's slices at their own size (the model input is resized in cares.inference);
    synthetic slices have no size of their own and are rendered at the training size."""
    from cares.data import build_dataset
    if source == "synthetic":
        options = {} if synthetic_samples is None else {"num_samples": synthetic_samples}
        return build_dataset(source, split=split, image_size=image_size, labeled=labeled, **options)
    return build_dataset(source, split=split, image_size=None, labeled=labeled)


def evaluate(checkpoint, data, split: str = "test", out=None, *, tta: bool = False, batch_size: int = 4,
             device: str = "auto", amp: str = "off", figures: int = 8, num_workers: int = 0,
             synthetic_samples: int | None = None) -> dict[str, Any]:
    """Score `checkpoint` on `split` of `data`; write metrics.json, metrics.md and figures into `out`
    (when given). Returns the metrics.json content. synthetic_samples: slices in a synthetic split."""
    from cares.figures import qualitative_figure
    from cares.inference import describe_checkpoint, load_trained_model, predict_probabilities
    from cares.metrics import PROTOCOLS, image_metrics, summarize
    from cares.runtime import atomic_write_bytes, claim_output, progress
    from cares.sampling import dataset_files

    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    if figures < 0:
        raise ValueError(f"--figures must be >= 0, got {figures}")
    model, state, torch_device = load_trained_model(checkpoint, device)
    image_size = state["input"]["image_size"]
    dataset = native_size_dataset(data, split, image_size, synthetic_samples=synthetic_samples)
    claim = None
    if out is not None:  # checked before the inference time, not after it
        claim = claim_output(out, OWNER, OUTPUT_ENTRIES, mode="update",
                             inputs=[("--checkpoint", checkpoint), ("--data", data)],
                             input_files=[("--data", f) for f in dataset_files(dataset)])
    print(f"evaluating {describe_checkpoint(state, checkpoint)} on {data} [{split}], {len(dataset)} images",
          file=sys.stderr)

    rows, examples = [], []
    predictions = predict_probabilities(model, dataset, image_size=image_size, device=torch_device,
                                        batch_size=batch_size, tta=tta, amp=amp, num_workers=num_workers)
    for item, probability in progress(predictions, total=len(dataset), desc="evaluate", unit="image"):
        if "mask" not in item:
            raise ValueError(f"{data} [{split}] has no ground truth masks; evaluate needs a labelled split")
        truth = item["mask"][0].numpy() > 0.5
        # The toolbox reads 8-bit PNG maps; scoring the 8-bit map gives its numbers exactly.
        eight_bit = np.rint(probability * 255.0).astype(np.uint8)
        rows.append({"name": item["name"], "size": list(truth.shape),
                     "infnet": image_metrics(eight_bit, truth, protocol="infnet"),
                     "threshold": image_metrics(probability, truth, protocol="threshold")})
        if len(examples) < figures:
            examples.append((item["name"], item["image"][0].numpy(), truth, probability))

    if not rows:
        raise ValueError(f"{data} [{split}] holds no images")
    from carafe_kernels.provenance import machine_info
    result = {
        "checkpoint": str(checkpoint),
        "model": {"name": state["model"]["name"], "options": state["model"]["options"],
                  "epoch": state.get("epoch"), "image_size": image_size},
        "data": str(data), "split": split, "tta": tta, "num_images": len(rows),
        "protocols": {p: summarize([row[p] for row in rows]) for p in PROTOCOLS},
        "protocol_notes": PROTOCOL_NOTES,
        "provenance": machine_info(),  # commit, torch version and machine of this result
        "per_image": rows,
    }
    if claim is not None:
        out = claim.take()
        atomic_write_bytes(out / "metrics.json", (json.dumps(result, indent=2) + "\n").encode())
        atomic_write_bytes(out / "metrics.md", metrics_markdown(result).encode())
        if examples:
            for example in examples:
                qualitative_figure(out / "figures" / f"{example[0]}.png", [example])
            qualitative_figure(out / "qualitative.png", examples)
    return result


def metrics_markdown(result: dict[str, Any]) -> str:
    """A markdown table of mean +- std per protocol, with the protocol definitions under it."""
    from cares.inference import model_spec
    model = result["model"]
    lines = [f"Model `{model_spec(model['name'], model['options'])}` (epoch {model['epoch']}, "
             f"{model['image_size']}x{model['image_size']} input) on `{result['data']}` [{result['split']}], "
             f"{result['num_images']} images{', flip TTA' if result['tta'] else ''}; mean +- std over images.",
             "",
             "| protocol | " + " | ".join(METRIC_TITLES.values()) + " |",
             "|---|" + "---|" * len(METRIC_TITLES)]
    for protocol, summary in result["protocols"].items():
        cells = [f"{summary[f'{m}_mean']:.4f} +- {summary[f'{m}_std']:.4f}" for m in METRIC_TITLES]
        lines.append(f"| {protocol} | " + " | ".join(cells) + " |")
    lines.append("")
    lines += [f"- **{p}**: {note}" for p, note in result["protocol_notes"].items()]
    return "\n".join(lines) + "\n"


def run(args) -> int:
    try:
        result = evaluate(args.checkpoint, args.data, args.split, args.out, tta=args.tta, batch_size=args.batch_size,
                          device=args.device, amp=args.amp, figures=args.figures, num_workers=args.num_workers)
    except (ValueError, OSError) as err:
        print(f"cares evaluate: error: {err}", file=sys.stderr)
        return 2
    print(metrics_markdown(result))
    print(f"wrote {Path(args.out) / 'metrics.json'}, metrics.md and figures", file=sys.stderr)
    return 0
