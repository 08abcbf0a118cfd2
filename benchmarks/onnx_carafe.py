"""onnxruntime (CPU) latency of exported CARAFE: the two export decompositions of carafe_kernels.onnx,
and whole models, each beside PyTorch eager on the same machine.

    python -m benchmarks.onnx_carafe                       # CARAFEPack shapes + CARes-UNet, both decompositions
    python -m benchmarks.onnx_carafe --cases cares-unet-demo --decompositions matmul
    python -m benchmarks.onnx_carafe --threads 1 --json out.json

Every case is exported with torch.onnx.export(dynamo=True) with dynamic batch and spatial size, run in
onnxruntime's CPU provider (intra-op threads = --threads) and checked against PyTorch (max relative
error printed; the export's own wall time too); times are medians over >= --min-time seconds of repeated runs.
"""
from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
import warnings

import torch

from benchmarks.machine import load_warning
from carafe_kernels import CARAFEPack
from carafe_kernels.onnx import DECOMPOSITIONS, use_decomposition
from carafe_kernels.provenance import machine_info, machine_line

DYNAMIC = {0: "batch", 2: "height", 3: "width"}


def _median_seconds(fn, min_time: float) -> float:
    fn()  # warm-up
    times, start = [], time.perf_counter()
    while time.perf_counter() - start < min_time or len(times) < 5:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def export_onnx(model: torch.nn.Module, example: torch.Tensor) -> bytes:
    """The model as ONNX bytes, dynamic batch and spatial size."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, (example,), dynamo=True, dynamic_shapes=(DYNAMIC,), verbose=False)
    buffer = io.BytesIO()
    program.save(buffer)
    return buffer.getvalue()


def ort_session(onnx_bytes: bytes, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])


def compare(model: torch.nn.Module, example: torch.Tensor, threads: int, min_time: float) -> dict:
    start = time.perf_counter()
    onnx_bytes = export_onnx(model, example)
    export_s = time.perf_counter() - start
    session = ort_session(onnx_bytes, threads)
    feed = {session.get_inputs()[0].name: example.numpy()}
    with torch.inference_mode():
        expected = model(example)
        eager_s = _median_seconds(lambda: model(example), min_time)
    got = torch.from_numpy(session.run(None, feed)[0])
    ort_s = _median_seconds(lambda: session.run(None, feed), min_time)
    return {"export_s": export_s, "ort_ms": ort_s * 1e3, "eager_ms": eager_s * 1e3,
            "max_rel_err": float((got - expected).abs().max() / expected.abs().max()),
            "onnx_nodes": len(__import__("onnx").load_from_string(onnx_bytes).graph.node)}


def cases(names: list[str]):
    """(label, model factory, input) for each requested case."""
    torch.manual_seed(0)
    for name in names:
        if name == "carafepack-cares":   # CARes-UNet's deepest CARAFE at the demo's 96x96 input, width 64
            yield name, lambda: CARAFEPack(512, 2, compressed_channels=64), torch.randn(1, 512, 6, 6)
        elif name == "carafepack-target":  # the N2-C256-H44-W44 shape of the CPU benchmarks
            yield name, lambda: CARAFEPack(256, 2), torch.randn(2, 256, 44, 44)
        elif name == "cares-unet":       # the paper's model (base width 64) on one 256x256 CT slice
            from cares.models import build_model
            yield name, lambda: build_model("cares_unet"), torch.randn(1, 1, 256, 256)
        elif name == "cares-unet-demo":  # the demo's model (base width 8) on 4 96x96 slices
            from cares.models import build_model
            yield name, lambda: build_model("cares_unet", base_channels=8), torch.randn(4, 1, 96, 96)
        else:
            raise SystemExit(f"unknown case {name!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="carafepack-cares,carafepack-target,cares-unet")
    parser.add_argument("--decompositions", default=",".join(DECOMPOSITIONS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--min-time", type=float, default=2.0, help="seconds of timed runs per measurement")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    info = machine_info(args.threads)
    print(machine_line(info))
    warning = load_warning(info)
    if warning:
        print(warning)
    rows = []
    for label, factory, example in cases(args.cases.split(",")):
        model = factory().eval()
        for decomposition in args.decompositions.split(","):
            with use_decomposition(decomposition):
                row = {"case": label, "shape": list(example.shape), "decomposition": decomposition,
                       **compare(model, example, args.threads, args.min_time)}
            rows.append(row)
            print(f"{label:18s} {str(tuple(example.shape)):20s} {decomposition:8s} onnxruntime "
                  f"{row['ort_ms']:8.2f} ms   eager {row['eager_ms']:8.2f} ms   max rel err "
                  f"{row['max_rel_err']:.1e}   {row['onnx_nodes']} nodes   export {row['export_s']:.0f} s", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "threads": args.threads, "load_warning": warning, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
