"""`cares demo`: train CARes-UNet for a few minutes on synthetic CT, evaluate it, write a report.

No data to download: cares.data's synthetic slices (lungs, vessels, ground-glass lesions). Steps:

    1. cares train     CARes-UNet on the synthetic train split, validated on the val split,
                       for --epochs or until --minutes of training have passed
    2. cares evaluate  best.pt on the synthetic test split (both protocols, Fig. 6 figure)
    3. report.md       metrics table, loss curve, qualitative figure, model complexity

Output (--out, default runs/demo): report.md, loss_curve.png, qualitative.png, metrics.json,
metrics.md, train/ (the run folder: checkpoints, log.csv, config.yaml). --overwrite replaces only the
files an earlier demo wrote there, as its .cares-owner.json records (cares.runtime.claim_output).

On CPU the demo uses a narrower CARes-UNet (the base_channels option), and small
images, so that it ends within 10 minutes on 2 cores; --quick shrinks everything for tests.
"""
from __future__ import annotations

import dataclasses
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

HELP = ("Train CARes-UNet for a few minutes on synthetic CT slices (no download), evaluate it on a "
        "synthetic test split and write report.md with a metrics table, loss curve, qualitative figure "
        "and complexity line into --out. Ends within 10 minutes on 2 CPU cores; --quick for a smoke test.")

# What the demo writes into --out itself (see cares.runtime.claim_output); metrics.json, metrics.md,
# qualitative.png and figures/ there are `cares evaluate`'s.
OWNER = "cares demo"
OUTPUT_ENTRIES = ("train", "report.md", "loss_curve.png")

# Option name of the CARes-UNet width (channels of the first encoder block; the paper's is 64).
WIDTH_OPTION = "base_channels"


@dataclass(frozen=True)
class DemoPlan:
    """How big the demo run is."""
    image_size: int
    width: int            # CARes-UNet base width, when the model takes one (the paper's: 64)
    train_samples: int
    eval_samples: int
    epochs: int
    minutes: float        # training time budget (see --time-limit of cares train)
    batch_size: int
    optimizer: str
    lr: float
    num_workers: int


# CPU: 96x96 slices and width 8 keep a step cheap; Adam at 3e-3 learns the synthetic lesions within
# a few hundred steps, where the paper's Ranger at 5e-4 (made for 1200 epochs) has barely started.
# 160 training slices: with 64 the best validation epoch came early and the test Dice trailed it.
# The time budget keeps the whole demo, start-up and evaluation included, under 10 minutes on
# 2 cores even when the machine is busy; an idle machine finishes all epochs sooner.
CPU_PLAN = DemoPlan(image_size=96, width=8, train_samples=160, eval_samples=32, epochs=50, minutes=6.5,
                    batch_size=8, optimizer="adam", lr=3e-3, num_workers=1)
QUICK_PLAN = DemoPlan(image_size=32, width=4, train_samples=8, eval_samples=4, epochs=1, minutes=0.5,
                      batch_size=4, optimizer="adam", lr=3e-3, num_workers=0)
GPU_PLAN = DemoPlan(image_size=256, width=64, train_samples=256, eval_samples=32, epochs=60, minutes=8.0,
                    batch_size=8, optimizer="ranger", lr=1e-3, num_workers=min(8, os.cpu_count() or 1))


def add_arguments(parser) -> None:
    from cares.runtime import DEVICE_CHOICES
    parser.add_argument("--out", default="runs/demo", metavar="DIR", help="folder for report.md and everything else")
    parser.add_argument("--quick", action="store_true", help="a tiny run that finishes in well under a minute (tests)")
    parser.add_argument("--device", choices=DEVICE_CHOICES, default="auto", help="auto = cuda when available")
    parser.add_argument("--epochs", type=int, default=None, metavar="N", help="override the plan's epochs")
    parser.add_argument("--minutes", type=float, default=None, metavar="M", help="override the training time budget")
    parser.add_argument("--seed", type=int, default=0, help="seed of the run")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier demo in --out: only what a demo wrote there (its train/, "
                             "report.md, loss_curve.png and evaluation files), never a folder it did not write")


def run_demo(out="runs/demo", *, quick: bool = False, device: str = "auto", epochs: int | None = None,
             minutes: float | None = None, seed: int = 0, overwrite: bool = False) -> dict:
    """Train, evaluate and write the report; returns {"report", "metrics", "seconds", "epochs"}."""
    from cares.complexity import count_compute, count_parameters
    from cares.config import resolve_config
    from cares.runtime import claim_output, resolve_device
    from cares.evaluate import OUTPUT_ENTRIES as EVALUATE_ENTRIES, OWNER as EVALUATE_OWNER, evaluate
    from cares.inference import load_trained_model
    from cares.train import train

    started = time.monotonic()
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    out = Path(out)
    torch_device = resolve_device(device)
    plan = QUICK_PLAN if quick else (GPU_PLAN if torch_device.type == "cuda" else CPU_PLAN)
    if epochs is not None:
        plan = dataclasses.replace(plan, epochs=epochs)
    if minutes is not None:
        plan = dataclasses.replace(plan, minutes=minutes)
    run_dir = out / "train"
    # --overwrite replaces only what an earlier demo wrote (its ownership record says so): never a
    # train/ of `cares train`, nor a dataset root's train/. evaluate's outputs are checked now too, so
    # that a refusal comes before the training minutes, not after them.
    claim = claim_output(out, OWNER, OUTPUT_ENTRIES, mode="replace" if overwrite else "new",
                         remedy="pass --overwrite to replace them, or choose another --out")
    claim_output(out, EVALUATE_OWNER, EVALUATE_ENTRIES, mode="update")
    claim.take()

    options = {WIDTH_OPTION: plan.width}
    config = resolve_config(dict(
        data="synthetic", val_split="val", synthetic_samples=plan.train_samples, image_size=plan.image_size,
        model="cares_unet", model_options=options, epochs=plan.epochs, batch_size=plan.batch_size,
        optimizer=plan.optimizer, lr=plan.lr, scheduler="cosine", time_limit=plan.minutes,
        device=str(torch_device.type), seed=seed, out=str(run_dir), num_workers=plan.num_workers,
        amp="bf16" if torch_device.type == "cuda" else "off"))
    result = train(config)
    checkpoint = result.best_checkpoint or result.last_checkpoint
    metrics = evaluate(checkpoint, "synthetic", "test", out, device=torch_device.type, figures=4,
                       synthetic_samples=plan.eval_samples, batch_size=plan.batch_size)

    model, _, _ = load_trained_model(checkpoint, "cpu")
    parameters, _ = count_parameters(model)
    flops = count_compute(model, torch.zeros(1, 1, plan.image_size, plan.image_size)).flops
    shutil.copyfile(run_dir / "loss_curve.png", out / "loss_curve.png")
    seconds = time.monotonic() - started
    report = write_report(out, config, result, metrics, plan, parameters, flops, seconds, torch_device, quick,
                          load_before)
    return {"report": report, "metrics": metrics, "seconds": seconds, "epochs": result.epochs_done}


def write_report(out: Path, config, result, metrics, plan: DemoPlan, parameters: int, flops: int,
                 seconds: float, device: torch.device, quick: bool, load_average: float | None) -> Path:
    from cares.evaluate import metrics_markdown
    from cares.inference import model_spec
    width = config.model_options.get(WIDTH_OPTION, 64)
    threshold_dice = metrics["protocols"]["threshold"]["dice_mean"]
    infnet_dice = metrics["protocols"]["infnet"]["dice_mean"]
    lines = [
        "# CARes-UNet demo on synthetic CT",
        "",
        f"Trained CARes-UNet (CARAFE upsampling, residual blocks; base width {width}, the paper's is 64) "
        f"on {config.synthetic_samples} synthetic {plan.image_size}x{plan.image_size} slices for "
        f"{result.epochs_done} epoch(s) (plan: {plan.epochs}, budget {plan.minutes} min) with "
        f"{plan.optimizer} lr {plan.lr:g}, batch {plan.batch_size}, cosine schedule, validating on the "
        f"val split; evaluated the best checkpoint (validation Dice {result.best_val_dice:.4f}) on "
        f"{metrics['num_images']} test slices. Whole demo: {seconds / 60:.1f} min on {device.type} "
        f"({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
        + (f", load average {load_average:.1f} at the start" if load_average is not None else "") + ").",
        "",
        f"**Test Dice {threshold_dice:.3f}** (threshold 0.5) / {infnet_dice:.3f} (Inf-Net protocol).",
        "",
        "## Metrics",
        "",
        metrics_markdown(metrics),
        "About a fifth of the synthetic slices have no lesion. On those the Inf-Net toolbox scores Dice, "
        "Sen and Spe 0 whatever the prediction (its rule when there is no true positive), while the "
        "threshold protocol scores an empty prediction 1; hence the gap between the two Dice columns.",
        "",
        "## Training curve",
        "",
        "![loss curve](loss_curve.png)",
        "",
        "## Qualitative results (as in the paper's Fig. 6)",
        "",
        "![qualitative](qualitative.png)",
        "",
        "TP white, FP red, FN blue, TN black.",
        "",
        "## Complexity",
        "",
        f"`{model_spec(config.model, config.model_options)}`: {parameters / 1e6:.3f} M parameters, "
        f"{flops / 1e9:.3f} GFLOPs (2 x multiply-adds) at 1x1x{plan.image_size}x{plan.image_size}.",
        "",
        "## Reproduce",
        "",
        f"`cares demo --out {out}{' --quick' if quick else ''}`; the run folder `train/` holds "
        "config.yaml, log.csv and the checkpoints (`cares evaluate --checkpoint train/best.pt ...`).",
        "",
    ]
    from cares.runtime import atomic_write_bytes
    return atomic_write_bytes(out / "report.md", "\n".join(lines).encode())


def run(args) -> int:
    try:
        summary = run_demo(args.out, quick=args.quick, device=args.device, epochs=args.epochs,
                           minutes=args.minutes, seed=args.seed, overwrite=args.overwrite)
    except (ValueError, FileNotFoundError) as err:
        print(f"cares demo: error: {err}", file=sys.stderr)
        return 2
    dice = summary["metrics"]["protocols"]["threshold"]["dice_mean"]
    print(f"demo finished in {summary['seconds'] / 60:.1f} min ({summary['epochs']} epochs): test Dice "
          f"{dice:.3f} (threshold 0.5); report: {summary['report']}")
    return 0
