"""`cares export`: a trained checkpoint as an ONNX model for deployment (onnxruntime, TensorRT, ...).

The exported model takes ``image`` (batch, in_channels, height, width), float32, with dynamic batch and
spatial size (height and width as in training: multiples of the model's total downsampling, its
``size_multiple``, which the command prints; onnxruntime fails inside the graph on other sizes), and
returns ``logits`` (batch, num_classes, height, width); sigmoid them for probabilities. It uses only
standard ONNX operators: CARAFE is exported as plain tensor operations (carafe_kernels.onnx), whatever
CARAFE backend the checkpoint was trained with. After writing, the model is run once in onnxruntime
(when installed) on a random input and compared with PyTorch.
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch

HELP = ("Export a checkpoint to ONNX (dynamic batch and spatial size, standard operators only; CARAFE "
        "included) and check it in onnxruntime against PyTorch. The model takes the sizes the PyTorch model "
        "takes: H and W multiples of its size multiple (16 for the U-Nets, 32 for segnet, fcn and "
        "unet_resnet34), printed at export; onnxruntime fails on other sizes.")

# What the command writes (see cares.runtime.claim_output): the --out file, in its folder.
OWNER = "cares export"

DYNAMIC_AXES = {0: "batch", 2: "height", 3: "width"}
# Relative error above which the onnxruntime check fails: fp32 reorderings stay orders of magnitude below.
MAX_RELATIVE_ERROR = 1e-4


def add_arguments(parser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="CKPT", help="best.pt or last.pt written by `cares train`")
    parser.add_argument("--format", choices=("onnx",), default="onnx", help="the export format")
    parser.add_argument("--out", required=True, metavar="FILE", help="where to write the model (e.g. model.onnx)")
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset version")
    parser.add_argument("--no-verify", action="store_true", help="skip the onnxruntime comparison")


def export_onnx(model: torch.nn.Module, example: torch.Tensor, out, *, opset: int = 18) -> Path:
    """Writes ``model`` (eval mode) as ONNX with dynamic batch and spatial size; returns the path."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation and pytree notices
        program = torch.onnx.export(model, (example,), dynamo=True, opset_version=opset, input_names=["image"],
                                    output_names=["logits"], dynamic_shapes=(DYNAMIC_AXES,), verbose=False)
    program.save(str(out))
    return out


def verify_onnx(path, model: torch.nn.Module, example: torch.Tensor) -> float:
    """Max relative error of onnxruntime's output against PyTorch's on ``example``."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"image": example.numpy()})[0])
    with torch.inference_mode():
        expected = model(example)
    return float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-12))


def check_out_file(out) -> Path:
    """Raise ValueError unless --out can be written as a file (checked before the export, which takes a while)."""
    from cares.runtime import check_output_dir
    out = Path(out)
    if out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a folder; give the file to write, e.g. {str(out / 'model.onnx')!r}")
    check_output_dir(out.parent, "--out's folder")
    return out


def run(args) -> int:
    from cares.checkpoint import build_model_from_checkpoint, load_checkpoint
    from cares.runtime import claim_output

    try:
        out = check_out_file(args.out)
        # The model file may replace only an earlier export's (never the checkpoint, nor a user's file).
        claim = claim_output(out.parent, OWNER, (out.name,), mode="update", flag="--out's folder",
                             inputs=[("--checkpoint", args.checkpoint)])
        state = load_checkpoint(args.checkpoint)
        model = build_model_from_checkpoint(state, "cpu", args.checkpoint)
        size = state["input"]["image_size"]
        multiple = getattr(model, "size_multiple", 1)
        if hasattr(model, "check_size"):
            model.check_size(size, size, what=f"the checkpoint's image size {size}x{size}")
    except (ValueError, OSError) as err:
        print(f"cares export: error: {err}", file=sys.stderr)
        return 2
    example = torch.randn(2, state["model"]["in_channels"], size, size, generator=torch.Generator().manual_seed(0))
    claim.take()
    path = export_onnx(model, example, out, opset=args.opset)
    print(f"wrote {path} (input 'image' (batch, {state['model']['in_channels']}, height, width) with height and "
          f"width multiples of {multiple}, output 'logits'; exported at {size}x{size})")
    if args.no_verify:
        return 0
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        print("onnxruntime is not installed: not verified (pip install onnxruntime)")
        return 0
    error = verify_onnx(path, model, example)
    print(f"onnxruntime vs PyTorch: max relative error {error:.1e} (limit {MAX_RELATIVE_ERROR:.0e})")
    return 0 if error <= MAX_RELATIVE_ERROR else 1
