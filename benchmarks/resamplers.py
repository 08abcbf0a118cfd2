"""x2 resamplers side by side: what CARAFE costs against the upsamplers people pick instead.

    python -m benchmarks.resamplers [--shapes dysample,cares] [--threads 2] [--json FILE]

Upsampling, (N, C, H, W) -> (N, C, 2H, 2W), each as the module a network would hold:
    carafe           CARAFEPack(C, 2): 1x1 compressor to 64 channels, 3x3 content encoder, fused
                     softmax + reassembly (k5, G1), on the `cpu` backend (and `cuda`/`triton` on a GPU)
    dysample_lp/pl   DySample (ICCV 2023), groups 4, static scope, both styles (benchmarks/dysample.py)
    bilinear, nearest  F.interpolate (no parameters)
    deconv           ConvTranspose2d(C, C, 2, stride 2)
    subpixel         Conv2d(C, 4C, 3, padding 1) + PixelShuffle(2) (ESPCN)
Shapes: `dysample` is the feature map of DySample's latency comparison (256 channels, 120x120, batch 1);
`cares` the four CARes-UNet decoder upsamplers at the paper's width 64, batch 4, 256x256 input.

Downsampling, (N, C, H, W) -> (N, C, H/2, W/2), at the `cares` preset's four encoder stages (the input of
each stride-2 stage: 64 channels at 256x256 ... 512 at 32x32, batch 4):
    carafe_down      CARAFEDownPack(C, 2) as cares_unet[downsampler=carafe] builds it: 1x1 compressor to
                     min(64, C) channels, 3x3 content encoder at stride 2, fused softmax + reassembly (k5,
                     G1), on the `cpu` backend
    carafe_down_unfold  the same module with the unofficial implementations' reassembly: softmax, then
                     F.unfold at stride 2 (a (N, C*k*k, H/2*W/2) intermediate) and a weighted sum
    strided_conv     Conv2d(C, C, 3, stride 2, padding 1) (the paper's encoder stage, without BN/ReLU)
    maxpool, avgpool MaxPool2d(2), AvgPool2d(2) (no parameters; counted as 4 FLOPs per output element)

The reassembly alone, at the same four shapes (what the kernels replace; the convolutions around it are the
same in both modules above): logits (N, 25, H/2, W/2) stand for the content encoder's output and get a gradient
too, so forward+backward computes the gradients of both inputs:
    carafe_down_fused  the fused softmax + reassembly op on the `cpu` backend (and `cuda`/`triton` on a GPU)
    unfold           softmax, then carafe_kernels.reference.carafe_down_unfold
Their rows carry "budget_bytes", the size of the output plus the inputs: forward+backward without a k*k-fold
intermediate allocates the output and one gradient per input, and forward the output only.

For each: forward and forward+backward (gradients of the input and the parameters) median time, the peak
memory one call allocates (benchmarks/machine.py), parameters and FLOPs (torch.utils.flop_counter, which
knows convolutions and the CARAFE ops; grid_sample and interpolation are added by hand: 4 multiply-adds
per output element for a bilinear sample, none for nearest). Rows are written to --json as they are
measured, so a stopped run keeps what it measured.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.dysample import DySample
from benchmarks.machine import load_warning, machine_info, machine_line, peak_memory_bytes, time_fn, torch_threads

SHAPES = {
    "dysample": [(1, 256, 120, 120)],
    "cares": [(4, 1024, 16, 16), (4, 512, 32, 32), (4, 256, 64, 64), (4, 128, 128, 128)],
    "tiny": [(1, 16, 8, 8)],
}
# The downsamplers' input shapes per preset (presets without downsampling shapes have no down rows).
DOWN_SHAPES = {
    "cares": [(4, 64, 256, 256), (4, 128, 128, 128), (4, 256, 64, 64), (4, 512, 32, 32)],
    "tiny": [(1, 16, 8, 8)],
}
MODES = ("fwd", "fwdbwd")


class Interpolate(nn.Module):
    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode

    def forward(self, x):
        return F.interpolate(x, scale_factor=2, mode=self.mode, **({"align_corners": False}
                                                                   if self.mode == "bilinear" else {}))


def upsamplers(channels: int, carafe_backends: list[str]) -> dict[str, Callable[[], nn.Module]]:
    """name -> a constructor of the x2 upsampler for `channels` channels."""
    from carafe_kernels import CARAFEPack
    makers: dict[str, Callable[[], nn.Module]] = {
        f"carafe:{backend}": (lambda backend=backend: CARAFEPack(channels, 2, backend=backend))
        for backend in carafe_backends}
    makers.update({
        "dysample_lp": lambda: DySample(channels, 2, "lp"),
        "dysample_pl": lambda: DySample(channels, 2, "pl"),
        "bilinear": lambda: Interpolate("bilinear"),
        "nearest": lambda: Interpolate("nearest"),
        "deconv": lambda: nn.ConvTranspose2d(channels, channels, 2, stride=2),
        "subpixel": lambda: nn.Sequential(nn.Conv2d(channels, 4 * channels, 3, padding=1), nn.PixelShuffle(2)),
    })
    return makers


class UnfoldDownPack(nn.Module):
    """CARAFEDownPack's layers with the reassembly the unofficial CARAFE++ implementations write: softmax
    over each group's taps, then carafe_kernels.reference.carafe_down_unfold (F.unfold at stride s)."""

    def __init__(self, pack: nn.Module):
        super().__init__()
        self.pack = pack

    def forward(self, x):
        from carafe_kernels.reference import carafe_down_unfold, normalize_down_mask_logits
        p = self.pack
        logits = p.content_encoder(p.channel_compressor(x))
        masks = normalize_down_mask_logits(logits, p.down_kernel, p.down_group)
        return carafe_down_unfold(x, masks, p.down_kernel, p.down_group, p.scale_factor)


def downsamplers(channels: int, carafe_backends: list[str]) -> dict[str, Callable[[], nn.Module]]:
    """name -> a constructor of the x2 downsampler for `channels` channels."""
    from carafe_kernels import CARAFEDownPack

    def pack(backend="auto"):
        return CARAFEDownPack(channels, 2, compressed_channels=min(64, channels), backend=backend)

    makers: dict[str, Callable[[], nn.Module]] = {
        f"carafe_down:{backend}": (lambda backend=backend: pack(backend)) for backend in carafe_backends}
    makers.update({
        "carafe_down_unfold": lambda: UnfoldDownPack(pack("reference")),
        "strided_conv": lambda: nn.Conv2d(channels, channels, 3, stride=2, padding=1),
        "maxpool": lambda: nn.MaxPool2d(2),
        "avgpool": lambda: nn.AvgPool2d(2),
    })
    return makers


class DownReassembly(nn.Module):
    """The down reassembly alone, on learnable logits of the content encoder's output shape (N, G*k*k, Ho, Wo):
    the fused op on a backend, or the unfold formulation (softmax, then carafe_down_unfold)."""

    def __init__(self, logits_shape, backend: str | None, kernel_size: int = 5, group_size: int = 1):
        super().__init__()
        self.logits = nn.Parameter(torch.randn(logits_shape, generator=torch.Generator().manual_seed(1)))
        self.backend, self.kernel_size, self.group_size = backend, kernel_size, group_size

    def forward(self, x):
        from carafe_kernels import carafe_down_fused
        from carafe_kernels.reference import carafe_down_unfold, normalize_down_mask_logits
        k, G = self.kernel_size, self.group_size
        if self.backend is not None:
            return carafe_down_fused(x, self.logits, k, G, 2, backend=self.backend)
        return carafe_down_unfold(x, normalize_down_mask_logits(self.logits, k, G), k, G, 2)


def down_reassemblies(shape, carafe_backends: list[str]) -> dict[str, Callable[[], nn.Module]]:
    """name -> a constructor of the reassembly-only module at input `shape` (k5, G1, s2)."""
    n, _, h, w = shape
    logits_shape = (n, 25, -(-h // 2), -(-w // 2))
    makers: dict[str, Callable[[], nn.Module]] = {
        f"carafe_down_fused:{backend}": (lambda backend=backend: DownReassembly(logits_shape, backend))
        for backend in carafe_backends}
    makers["unfold"] = lambda: DownReassembly(logits_shape, None)
    return makers


def uncounted_flops(name: str, out_elements: int) -> int:
    """FLOPs torch's counter does not see: bilinear sampling (grid_sample, interpolate) at 4 multiply-adds
    per output element; 2x2 pooling at 4 operations per output element."""
    if name.startswith("dysample") or name == "bilinear":
        return 8 * out_elements
    return 4 * out_elements if name in ("maxpool", "avgpool") else 0


def count_flops(module: nn.Module, x: torch.Tensor, backward: bool) -> int:
    with FlopCounterMode(display=False) as counter:
        out = module(x)
        if backward:
            out.backward(torch.ones_like(out))
    module.zero_grad(set_to_none=True)
    x.grad = None
    return counter.get_total_flops()


def step(module: nn.Module, x: torch.Tensor, grad_out: torch.Tensor, mode: str) -> Callable[[], object]:
    if mode == "fwd":
        def forward():
            with torch.no_grad():
                return module(x)
        return forward

    def forward_backward():
        x.grad = None
        module.zero_grad(set_to_none=True)
        module(x).backward(grad_out)
    return forward_backward


def carafe_backends(device: str) -> list[str]:
    from carafe_kernels import backend_status
    wanted = ["cpu"] if device == "cpu" else ["cuda", "triton"]
    status = backend_status()
    return [b for b in wanted if status.get(b) is None]


def run(args) -> dict:
    device = args.device
    info = machine_info(threads=args.threads)
    print(machine_line(info))
    if device == "cpu" and load_warning(info):
        print(load_warning(info))
    backends = carafe_backends(device)
    result = {"schema": 1, "machine": info, "args": vars(args), "carafe_backends": backends, "rows": []}
    names = [n.strip() for n in args.shapes.split(",") if n.strip()]
    unknown = [n for n in names if n not in SHAPES]
    if unknown:
        raise SystemExit(f"--shapes: unknown {unknown}; choose from {', '.join(SHAPES)}")
    print(f"{'shape':>22} {'resampler':>18} {'mode':>7} {'ms':>9} {'x carafe':>8} {'peak MB':>8} "
          f"{'params':>10} {'GFLOP':>8}")
    for preset in names:
        for direction, shapes, makers in (("up", SHAPES[preset], upsamplers),
                                          ("down", DOWN_SHAPES.get(preset, []), downsamplers)):
            for shape in shapes:
                _measure(result, args, preset, shape, direction, makers(shape[1], backends))
        for shape in DOWN_SHAPES.get(preset, []):
            _measure(result, args, preset, shape, "down_op", down_reassemblies(shape, backends))
    return result


def _measure(result: dict, args, preset: str, shape, direction: str, makers: dict) -> None:
    """Times every resampler of `makers` at one input shape and appends its rows (an upsampler's rows
    name it under "upsampler", a downsampler's under "downsampler", a reassembly-only row (direction
    "down_op") under "op"; "vs_carafe" is relative to the first CARAFE row: carafe:<backend>,
    carafe_down:<backend> or carafe_down_fused:<backend>)."""
    device = args.device
    n, c, h, w = shape
    shape_id = f"N{n}-C{c}-H{h}-W{w}"
    torch.manual_seed(0)
    x = torch.randn(n, c, h, w, device=device, requires_grad=True)
    out_h, out_w = (2 * h, 2 * w) if direction == "up" else (-(-h // 2), -(-w // 2))
    key = "op" if direction == "down_op" else f"{direction}sampler"
    grad_out = torch.randn(n, c, out_h, out_w, device=device)
    out_elements = grad_out.numel()
    reference_ms: dict[str, float] = {}
    for name, make in makers.items():
        module = make().to(device)
        # A reassembly-only module's logits stand for an input, not for parameters.
        params = 0 if direction == "down_op" else sum(p.numel() for p in module.parameters())
        input_bytes = x.numel() * x.element_size() + (
            module.logits.numel() * module.logits.element_size() if direction == "down_op" else 0)
        for mode in MODES:
            fn = step(module, x, grad_out, mode)
            timing = time_fn(fn, device, threads=args.threads, min_run_time=args.min_run_time)
            peak = peak_memory_bytes(fn, device)
            flops = count_flops(module, x, mode == "fwdbwd") + uncounted_flops(name, out_elements) * (
                1 if mode == "fwd" else 3)
            if name.startswith(("carafe:", "carafe_down:", "carafe_down_fused:")) and mode not in reference_ms:
                reference_ms[mode] = timing["ms"]
            row = {"preset": preset, "shape": shape_id, "N": n, "C": c, "H": h, "W": w, "scale": 2,
                   "direction": direction, key: name, "mode": mode, "device": device,
                   "threads": args.threads, **timing,
                   "peak_bytes": peak, "out_bytes": out_elements * x.element_size(), "params": params,
                   "flops": flops,
                   "vs_carafe": timing["ms"] / reference_ms[mode] if mode in reference_ms else None}
            if direction == "down_op":
                row["budget_bytes"] = out_elements * x.element_size() + input_bytes
            result["rows"].append(row)
            ratio = "" if row["vs_carafe"] is None else f"{row['vs_carafe']:.2f}x"
            print(f"{shape_id:>22} {name:>18} {mode:>7} {timing['ms']:9.3f} {ratio:>8} "
                  f"{peak / 2**20:8.1f} {params:10d} {flops / 1e9:8.3f}", flush=True)
            if args.json:
                _write(args.json, result)


def _write(path: str, result: dict) -> None:
    """Atomically (re)write the results file, so it always holds every row measured so far."""
    temporary = f"{path}.tmp{os.getpid()}"
    with open(temporary, "w") as stream:
        json.dump(result, stream, indent=1)
        stream.write("\n")
    os.replace(temporary, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.resamplers", description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="dysample,cares", help=f"comma-separated: {', '.join(SHAPES)}")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="CPU torch threads")
    parser.add_argument("--min-run-time", type=float, default=1.0, help="seconds of timing per row")
    parser.add_argument("--json", help="write the results here (row by row)")
    args = parser.parse_args(argv)
    if args.threads < 1 or not math.isfinite(args.min_run_time) or args.min_run_time <= 0:
        parser.error("--threads must be >= 1 and --min-run-time > 0")
    with torch_threads(args.threads):
        run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
