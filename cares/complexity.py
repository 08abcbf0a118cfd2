"""Model complexity: parameters, multiply-adds, FLOPs, torchstat-style MAdd and CPU latency
(`python -m cares complexity`, the paper's Table 4).

Definitions (also printed under every markdown table):

* params / trainable params: number of parameter elements (all / requires_grad).
* MACs: multiply-accumulates of one forward pass, counted by ``torch.utils.flop_counter.FlopCounterMode``:
  convolutions and transposed convolutions (no bias, BatchNorm, activations, pooling or interpolation:
  FlopCounterMode's conventions), plus each CARAFE reassembly as N*C*Hout*Wout*k_up^2 (its content
  encoder and compressor are convolutions and are counted as such); a content-aware downsampling
  (CARAFEDownPack) likewise as N*C*Hout*Wout*k_down^2 at its ceil(H/s) x ceil(W/s) output.
* FLOPs = 2 x MACs, the convention of FlopCounterMode and of the CARAFE paper.
* MAdd: torchstat's definition (github.com/Swall0w/torchstat, compute_madd.py): multiplications and
  additions counted separately per leaf layer, so a length-n dot product is n + (n - 1), plus 1 for a
  bias; BatchNorm 4 per element; ReLU 1 per element; max-pool (k^2 - 1) per output; softmax 3n - 1;
  here also CARAFE: (2 k_up^2 - 1) per output element plus its mask softmax (3 k_up^2 - 1 per output
  position and group), the same per output for content-aware downsampling. Interpolation, pixel
  shuffle, max-unpooling, concatenation, residual additions
  and dropout count 0, as in torchstat. Unlike torchstat, counts are multiplied by the batch size.

CARAFE is counted exactly once whatever backend runs: the native ops (torch.ops.carafe_kernels.*) carry
FLOP formulas that FlopCounterMode applies; the pure-PyTorch reference backend is elementwise work that
FlopCounterMode does not see, so for every CARAFEPack (CARAFEDownPack) call in which no carafe op reached
the dispatcher a forward hook adds ``carafe_flops`` (``carafe_down_flops``) instead.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from carafe_kernels import (BackendUnavailableError, CARAFEDownPack, CARAFEPack, backend_status, carafe_down_flops,
                            carafe_flops)
from carafe_kernels.reference import down_output_size

from .models import ABLATION_VARIANTS, MODEL_NAMES, build_model, parse_model_spec

__all__ = ["ComplexityRow", "ComputeCount", "count_parameters", "count_compute", "measure_latency",
           "parse_input_size", "complexity_report", "format_markdown", "format_text", "DEFAULT_MODELS",
           "HELP", "add_arguments", "run"]

HELP = "Parameters, MACs, FLOPs, MAdd and CPU latency of every model (the paper's Table 4)."

DEFAULT_INPUT_SHAPE = (1, 1, 256, 256)
DEFAULT_MODELS: tuple[str, ...] = (*MODEL_NAMES, *ABLATION_VARIANTS)

DEFINITIONS = (
    "- **Params**: parameter elements (all; trainable = requires_grad).\n"
    "- **MACs**: multiply-accumulates of one forward pass, counted with `torch.utils.flop_counter."
    "FlopCounterMode` (convolutions and transposed convolutions; bias, BatchNorm, activations, pooling "
    "and interpolation are not counted), plus each CARAFE reassembly as N·C·H_out·W_out·k_up² "
    "(its compressor and content encoder are convolutions, counted as such); content-aware downsampling "
    "(CARAFEDownPack) likewise as N·C·H_out·W_out·k_down² at its output size. CARAFE is counted once "
    "whatever backend runs: by the FLOP formulas registered for the `carafe_kernels` ops, or, when the "
    "pure-PyTorch reference backend runs, by a forward hook with `carafe_flops` (`carafe_down_flops`).\n"
    "- **FLOPs** = 2 × MACs (the convention of FlopCounterMode and of the CARAFE paper).\n"
    "- **MAdd**: torchstat's definition — multiplications and additions counted separately per leaf "
    "layer: conv/deconv n + (n−1) (+1 with bias) per output for an n-term dot product, BatchNorm 4 and "
    "ReLU 1 per element, max-pool k²−1 per output, softmax 3n−1; CARAFE 2k_up²−1 per output element plus "
    "its mask softmax (3k_up²−1 per output position), the same for content-aware downsampling. "
    "Interpolation, pixel shuffle, unpooling, "
    "concatenation, residual additions and dropout count 0 (as in torchstat); counts include the batch.\n"
    "- **Latency**: median wall time of forward passes on this machine's CPU (eval mode, `torch.no_grad`, "
    "after warm-up runs).")


@dataclass
class ComputeCount:
    """Operation counts of one forward pass; ``carafe_counted_by`` says where CARAFE's came from:
    "op formula" (native op seen by FlopCounterMode), "forward hook" (reference backend), "both"
    (some calls each way) or "-" (the model has no CARAFE)."""
    flops: int
    madd: int
    carafe_counted_by: str

    @property
    def macs(self) -> int:
        return self.flops // 2


@dataclass
class ComplexityRow:
    """One report row. ``latency_ms`` is None when latency was not measured."""
    model: str
    input_shape: tuple[int, ...]
    params: int
    trainable_params: int
    macs: int
    flops: int
    madd: int
    latency_ms: float | None
    carafe_counted_by: str


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter elements."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


# ---- torchstat-style MAdd of one leaf layer call (batch included) ---------------------------------

def _conv_madd(module: nn.Conv2d | nn.ConvTranspose2d, inputs: torch.Tensor, output: torch.Tensor) -> int:
    multiplies = module.kernel_size[0] * module.kernel_size[1] * (inputs.shape[1] // module.groups)
    adds = multiplies - 1 + (0 if module.bias is None else 1)
    # torchstat: a conv does its dot products per output position; a transposed conv per input position.
    positions = output.shape[2:] if isinstance(module, nn.Conv2d) else inputs.shape[2:]
    return (multiplies + adds) * inputs.shape[0] * output.shape[1] * math.prod(positions)


def _pool_madd(module: nn.MaxPool2d | nn.AvgPool2d, output: torch.Tensor) -> int:
    kernel = module.kernel_size if isinstance(module.kernel_size, tuple) else (module.kernel_size,) * 2
    taps = kernel[0] * kernel[1]
    per_output = taps - 1 if isinstance(module, nn.MaxPool2d) else taps
    return per_output * output.numel()


def carafe_madd(features_shape, kernel_size: int, group_size: int, scale_factor: int) -> int:
    """torchstat-style MAdd of one CARAFE reassembly: k^2 multiplies + (k^2 - 1) adds per output
    element, plus the mask softmax over k^2 taps (k^2 exps, k^2 - 1 adds, k^2 divides) per output
    position and group."""
    n, c, h, w = features_shape
    return _reassembly_madd(n * (h * scale_factor) * (w * scale_factor), c, kernel_size, group_size)


def carafe_down_madd(features_shape, kernel_size: int, group_size: int, scale_factor: int) -> int:
    """carafe_madd for content-aware downsampling: the same per output element and position, at the
    ceil(H/s) x ceil(W/s) output."""
    n, c, h, w = features_shape
    output_positions = n * down_output_size(h, scale_factor) * down_output_size(w, scale_factor)
    return _reassembly_madd(output_positions, c, kernel_size, group_size)


def _reassembly_madd(output_positions: int, channels: int, kernel_size: int, group_size: int) -> int:
    taps = kernel_size * kernel_size
    return output_positions * (channels * (2 * taps - 1) + group_size * (3 * taps - 1))


def _leaf_madd(module: nn.Module, inputs: tuple, output) -> int:
    """MAdd of one call of a leaf layer, 0 for layers torchstat does not count."""
    first = inputs[0]
    if isinstance(output, tuple):  # MaxPool2d(return_indices=True)
        output = output[0]
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        return _conv_madd(module, first, output)
    if isinstance(module, nn.BatchNorm2d):
        return 4 * first.numel()
    if isinstance(module, (nn.ReLU, nn.ReLU6)):
        return first.numel()
    if isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)):
        return _pool_madd(module, output)
    if isinstance(module, nn.Softmax):
        return 3 * first.numel() - 1
    if isinstance(module, nn.Linear):
        return output.numel() * (2 * first.shape[-1] - 1 + (0 if module.bias is None else 1))
    return 0


def _carafe_op_flops(mode: FlopCounterMode) -> int:
    """FLOPs FlopCounterMode has attributed to carafe_kernels ops so far (0 when only the reference
    backend ran, which never calls them)."""
    global_counts = mode.get_flop_counts().get("Global", {})
    return sum(count for op, count in global_counts.items() if str(op).startswith("carafe_kernels"))


def count_compute(model: nn.Module, example: torch.Tensor) -> ComputeCount:
    """FLOPs (FlopCounterMode + CARAFE counted exactly once) and torchstat-style MAdd of
    ``model(example)``. Runs one forward pass under ``torch.no_grad`` in the model's current mode;
    ``example`` may live on the meta device (shapes only, no compute)."""
    mode = FlopCounterMode(display=False)
    madd = 0
    hook_flops = 0
    counted_by: set[str] = set()
    carafe_before: dict[int, int] = {}

    def leaf_hook(module, inputs, output):
        nonlocal madd
        madd += _leaf_madd(module, inputs, output)

    def carafe_pre_hook(module, inputs):
        carafe_before[id(module)] = _carafe_op_flops(mode)

    def carafe_hook(module: CARAFEPack | CARAFEDownPack, inputs, output):
        nonlocal madd, hook_flops
        features_shape = inputs[0].shape
        if isinstance(module, CARAFEDownPack):
            k, G, count_flops, count_madd = module.down_kernel, module.down_group, carafe_down_flops, carafe_down_madd
        else:
            k, G, count_flops, count_madd = module.up_kernel, module.up_group, carafe_flops, carafe_madd
        madd += count_madd(features_shape, k, G, module.scale_factor)
        if _carafe_op_flops(mode) > carafe_before.pop(id(module)):
            counted_by.add("op formula")
        else:  # the reference backend ran: FlopCounterMode saw only elementwise ops
            hook_flops += count_flops(features_shape, k, module.scale_factor)
            counted_by.add("forward hook")

    handles = []
    try:
        for module in model.modules():
            if isinstance(module, (CARAFEPack, CARAFEDownPack)):
                handles.append(module.register_forward_pre_hook(carafe_pre_hook))
                handles.append(module.register_forward_hook(carafe_hook))
            elif not any(True for _ in module.children()):
                handles.append(module.register_forward_hook(leaf_hook))
        with mode, torch.no_grad():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    label = "both" if len(counted_by) == 2 else (counted_by.pop() if counted_by else "-")
    return ComputeCount(flops=mode.get_total_flops() + hook_flops, madd=madd, carafe_counted_by=label)


def measure_latency(model: nn.Module, example: torch.Tensor, repeats: int = 5, warmup: int = 1) -> float:
    """Median forward time in milliseconds (eval mode, no_grad) after ``warmup`` untimed runs."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    model.eval()
    times = []
    with torch.no_grad():
        for index in range(warmup + repeats):
            start = time.perf_counter()
            model(example)
            if index >= warmup:
                times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


def parse_input_size(text: str | int | tuple) -> tuple[int, int, int, int]:
    """"256" -> (1, 1, 256, 256); "H,W" -> (1, 1, H, W); "N,C,H,W" (also with x) as given."""
    if isinstance(text, int):
        values = [text]
    elif isinstance(text, (tuple, list)):
        values = list(text)
    elif isinstance(text, str):
        try:
            values = [int(part) for part in text.replace("x", ",").split(",") if part.strip()]
        except ValueError:
            raise ValueError(f"input size must be integers like '256' or '1,1,256,256', "
                             f"got {text!r}") from None
    else:
        raise TypeError(f"input size must be a str, int or tuple, got {type(text).__name__}")
    if len(values) == 1:
        values = [1, 1, values[0], values[0]]
    elif len(values) == 2:
        values = [1, 1, *values]
    if len(values) != 4 or any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in values):
        raise ValueError(f"input size must be S, 'H,W' or 'N,C,H,W' with positive integers, got {text!r}")
    return tuple(values)


def check_models(models, input_shape: tuple[int, int, int, int]) -> None:
    """Raise ValueError, before any work, unless every model spec builds (name, options and their values)
    and takes ``input_shape`` (H and W divisible by the model's size_multiple). Built on the meta device:
    no memory, no work."""
    for spec in models:
        try:
            with torch.device("meta"):
                model = build_model(spec, in_channels=input_shape[1])
        except (TypeError, ValueError) as err:
            raise ValueError(f"--models {spec}: {err}") from None
        if hasattr(model, "check_size"):
            model.check_size(*input_shape[2:], what=f"--input-size {input_shape[2]}x{input_shape[3]} for {spec}")


def _count_on(device: str, spec: str, input_shape: tuple[int, ...]) -> tuple[ComputeCount, int, int]:
    """(operation counts, total params, trainable params) of the model built on ``device``."""
    with torch.device(device):
        model = build_model(spec, in_channels=input_shape[1]).eval()
        example = torch.zeros(input_shape)
    return (count_compute(model, example), *count_parameters(model))


def complexity_report(models=DEFAULT_MODELS, input_shape=DEFAULT_INPUT_SHAPE, *, latency: bool = True,
                      repeats: int = 5, warmup: int = 1, log=None) -> list[ComplexityRow]:
    """One ComplexityRow per model spec (names of cares.models, optionally with [key=value] options).

    Counts run on the meta device (shapes only: instant at any size); a model whose CARAFE backend
    cannot run there (an explicit ``carafe_backend``) is counted on the CPU instead. Latency builds the
    model on the CPU with random weights.
    """
    input_shape = parse_input_size(input_shape)
    if latency and (repeats < 1 or warmup < 0):
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    check_models(models, input_shape)
    rows = []
    for spec in models:
        if log:
            log(f"{spec}: counting")
        try:
            counts, total, trainable = _count_on("meta", spec, input_shape)
        except (NotImplementedError, BackendUnavailableError):
            counts, total, trainable = _count_on("cpu", spec, input_shape)
        latency_ms = None
        if latency:
            if log:
                log(f"{spec}: timing {warmup} + {repeats} forward passes")
            model = build_model(spec, in_channels=input_shape[1])
            latency_ms = measure_latency(model, torch.randn(input_shape), repeats=repeats, warmup=warmup)
            del model
        rows.append(ComplexityRow(model=spec, input_shape=tuple(input_shape), params=total,
                                  trainable_params=trainable, macs=counts.macs, flops=counts.flops,
                                  madd=counts.madd, latency_ms=latency_ms,
                                  carafe_counted_by=counts.carafe_counted_by))
    return rows


_COLUMNS = ("Model", "Params (M)", "Trainable (M)", "MACs (G)", "FLOPs (G)", "MAdd (G)", "Latency (ms)")


def _cells(row: ComplexityRow) -> tuple[str, ...]:
    latency = "-" if row.latency_ms is None else f"{row.latency_ms:.0f}"
    return (row.model, f"{row.params / 1e6:.2f}", f"{row.trainable_params / 1e6:.2f}",
            f"{row.macs / 1e9:.2f}", f"{row.flops / 1e9:.2f}", f"{row.madd / 1e9:.2f}", latency)


def format_text(rows: list[ComplexityRow]) -> str:
    """An aligned plain-text table."""
    table = [_COLUMNS, *(_cells(row) for row in rows)]
    widths = [max(len(line[i]) for line in table) for i in range(len(_COLUMNS))]
    return "\n".join("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w)
                               in enumerate(zip(line, widths))) for line in table)


def _environment_line() -> str:
    usable = [name for name, reason in backend_status().items() if reason is None]
    forced = os.environ.get("CARAFE_BACKEND")
    # Latency on a shared machine depends on what else runs: record the load next to the numbers.
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads of {os.cpu_count()} cores, "
            f"1-minute load average {load:.1f}; CARAFE backends usable here: {', '.join(usable)}"
            + (f" (CARAFE_BACKEND={forced})" if forced else ""))


def format_markdown(rows: list[ComplexityRow], command: str | None = None,
                    latency_runs: tuple[int, int] | None = None) -> str:
    """A markdown document: the command, the table, the definitions and the environment.
    ``latency_runs`` = (timed runs, warm-up runs) when latency was measured."""
    lines = []
    if command:
        lines += [f"Command: `{command}`", ""]
    if rows:
        shape = " x ".join(str(v) for v in rows[0].input_shape)
        lines += [f"Model complexity at input {shape} (N x C x H x W).", ""]
    lines.append("| " + " | ".join(_COLUMNS) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(_COLUMNS) - 1)) + "|")
    lines += ["| " + " | ".join(_cells(row)) + " |" for row in rows]
    counted = sorted({row.carafe_counted_by for row in rows} - {"-"})
    lines += ["", DEFINITIONS, "",
              "`res_unet` is the same network as `cares_unet[upsampler=deconv]`; `cares_unet[upsampler=...]` "
              "rows are the upsampler ablation (identical except for the four upsamplers); "
              "`cares_unet[downsampler=carafe]` replaces the encoder's four stride-2 conv-BN-ReLUs with "
              "content-aware downsampling (CARAFEDownPack).", "",
              f"Environment: {_environment_line()}."
              + (f" CARAFE reassembly counted by: {', '.join(counted)}." if counted else "")
              + (f" Latency: median of {latency_runs[0]} runs after {latency_runs[1]} warm-up run(s)."
                 if latency_runs else "")]
    return "\n".join(lines) + "\n"


# ---- command line ------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input-size", default="1,1,256,256",
                        help="N,C,H,W, or H,W, or one size S for 1,1,S,S")
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS),
                        help="comma-separated model specs (name or name[key=value]); default: every model, "
                             "the upsampler ablation and the CARAFE downsampler variant")
    parser.add_argument("--json", metavar="PATH", help="write the rows as a JSON list to PATH")
    parser.add_argument("--markdown", metavar="PATH", nargs="?", const="-",
                        help="print a markdown document (table, definitions, command) instead of the plain "
                             "table, or write it to PATH")
    parser.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
    parser.add_argument("--repeats", type=int, default=5, help="timed forward passes per model (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed forward passes before timing")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads for the latency runs (default: torch's default)")


def _split_models(text: str) -> list[str]:
    """Split a comma list, keeping commas inside [...] (e.g. 'cares_unet[upsampler=deconv,x=1],unet')."""
    specs, depth, current = [], 0, ""
    for char in text:
        depth += (char == "[") - (char == "]")
        if char == "," and depth == 0:
            specs.append(current)
            current = ""
        else:
            current += char
    specs.append(current)
    return [spec.strip() for spec in specs if spec.strip()]


def _checked_arguments(args: argparse.Namespace) -> tuple[list[str], tuple[int, int, int, int]]:
    """(model specs, input shape), or a ValueError naming the flag: everything is checked before any work."""
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if not args.no_latency and (args.repeats < 1 or args.warmup < 0):
        raise ValueError(f"need --repeats >= 1 and --warmup >= 0, got {args.repeats} and {args.warmup}")
    models = _split_models(args.models)
    if not models:
        raise ValueError(f"--models named no model: {args.models!r}")
    try:
        input_shape = parse_input_size(args.input_size)
    except ValueError as err:
        raise ValueError(f"--input-size: {err}") from None
    check_models(models, input_shape)
    return models, input_shape


def run(args: argparse.Namespace) -> int:
    try:
        models, input_shape = _checked_arguments(args)
    except ValueError as err:
        print(f"cares complexity: error: {err}", file=sys.stderr)
        return 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    rows = complexity_report(models, input_shape, latency=not args.no_latency,
                             repeats=args.repeats, warmup=args.warmup, log=log)
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        from carafe_kernels.provenance import machine_info
        provenance = machine_info()  # commit, torch version and machine, in every row: the file stays a list
        path.write_text(json.dumps([{**asdict(row), "provenance": provenance} for row in rows], indent=2) + "\n")
        log(f"wrote {path}")
    if args.markdown:
        is_cli = sys.argv[1:2] == ["complexity"]
        command = "python -m cares " + shlex.join(sys.argv[1:]) if is_cli else None
        latency_runs = None if args.no_latency else (args.repeats, args.warmup)
        document = format_markdown(rows, command, latency_runs)
        if args.markdown == "-":
            print(document, end="")
        else:
            path = Path(args.markdown)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(document)
            log(f"wrote {path}")
    if args.markdown != "-":
        print(format_text(rows))
    return 0
