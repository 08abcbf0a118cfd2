"""ONNX export of CARAFE: the ops rewritten into standard tensor operations while an exporter traces.

``torch.onnx.export(model, args, dynamo=True)`` of ``CARAFEPack``, of ``CARAFE``, or of any model that
holds one (every ``cares`` model) works without extra arguments, whatever backend the model was built
with: while ``torch.onnx.is_in_onnx_export()`` is true, ``carafe``/``carafe_fused`` emit the
decomposition below instead of a ``carafe_kernels`` op (all backends compute the same function, so the
exported graph is the same for every backend choice). It consists of conv2d, reshapes, permutes,
softmax and matmul, which every exporter translates to standard ONNX operators (Conv, Reshape,
Transpose, Softmax, MatMul; opset 18 by default), so onnxruntime or any ONNX runtime runs the model,
with dynamic batch and spatial size. No exporter-private registry is touched.

A program captured *outside* an export (``torch.export.export(model, ...)``) contains the
``carafe_kernels`` ops; ``ep.run_decompositions(carafe_kernels.onnx.decomposition_table())`` rewrites
them the same way before ``torch.onnx.export(ep)``.

The decomposition: two candidates (DECOMPOSITIONS), measured by ``python -m benchmarks.onnx_carafe``
(README, "ONNX export"):
  matmul (default): patches (N, G, H, W, k*k, Cg) by a depthwise convolution with a constant one-hot
      kernel (the "unfold" ONNX lacks), masks (N, G, H, W, s*s, k*k), out = masks @ patches: about 30
      ONNX nodes per CARAFE (Conv, Reshape, Transpose, Softmax, MatMul);
  windows: the reference backend (carafe_kernels/reference.py), k*k*s*s multiply-adds of shifted
      windows: 2.6x faster for the CARAFE op in onnxruntime, but ~490 nodes per CARAFE, which makes
      exports with dynamic shapes about 8x slower (71 s against 9 s for the demo's CARes-UNet on the
      idle 2-core machine; benchmarks/results/onnx-cpu*.json); the export is what every `cares export`
      user waits for, so matmul is the default.
(A third, k*k broadcast multiplies at output size, was 4x slower than both in onnxruntime: dropped.)

``torch.jit.script`` is not supported: the backend choice is Python; see CARAFEPack.__prepare_scriptable__.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from .reference import (carafe_down_fused_reference, carafe_down_reference, carafe_reference,
                        normalize_mask_logits)

__all__ = ["carafe_matmul", "carafe_fused_matmul", "decomposition_table", "export_call", "use_decomposition",
           "DECOMPOSITIONS"]


def _patches(features: torch.Tensor, kernel_size: int, group_size: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, G, H, W, k*k, Cg), tap t = ky*k + kx, zero padding."""
    k, r = kernel_size, (kernel_size - 1) // 2
    N, C, H, W = features.shape
    one_hot = torch.eye(k * k, dtype=features.dtype, device=features.device).view(k * k, 1, k, k)
    taps = F.conv2d(features.reshape(N * C, 1, H, W), one_hot, padding=r)          # (N*C, k*k, H, W)
    return taps.view(N, group_size, C // group_size, k * k, H, W).permute(0, 1, 4, 5, 3, 2)


def _reassemble(features: torch.Tensor, masks: torch.Tensor, kernel_size: int, group_size: int,
                scale_factor: int) -> torch.Tensor:
    """masks (N, G, H, W, s*s, k*k) @ patches -> (N, C, H*s, W*s)."""
    s = scale_factor
    N, C, H, W = features.shape
    out = torch.matmul(masks, _patches(features, kernel_size, group_size))          # (N, G, H, W, s*s, Cg)
    out = out.view(N, group_size, H, W, s, s, C // group_size).permute(0, 1, 6, 2, 4, 3, 5)
    return out.reshape(N, C, H * s, W * s)


def carafe_matmul(features: torch.Tensor, masks: torch.Tensor, kernel_size: int, group_size: int,
                  scale_factor: int) -> torch.Tensor:
    """carafe() as convolution-unfold + batched matmul (the export decomposition); masks (N, G*k*k, H*s, W*s)."""
    k, G, s = kernel_size, group_size, scale_factor
    N, _, H, W = features.shape
    m = masks.reshape(N, G, k * k, H, s, W, s).permute(0, 1, 3, 5, 4, 6, 2)         # (N, G, H, W, s, s, k*k)
    return _reassemble(features, m.reshape(N, G, H, W, s * s, k * k), k, G, s)


def carafe_fused_matmul(features: torch.Tensor, mask_logits: torch.Tensor, kernel_size: int, group_size: int,
                        scale_factor: int) -> torch.Tensor:
    """carafe_fused() likewise; logit channel (g*k*k + t)*s*s + i*s + j is tap t of group g at sub-pixel (i, j)."""
    k, G, s = kernel_size, group_size, scale_factor
    N, _, H, W = features.shape
    m = mask_logits.reshape(N, G, k * k, s * s, H, W).permute(0, 1, 4, 5, 3, 2)    # (N, G, H, W, s*s, k*k)
    return _reassemble(features, m.softmax(dim=-1), k, G, s)


def _fused(carafe_fn):
    def carafe_fused_fn(features, mask_logits, kernel_size, group_size, scale_factor):
        masks = normalize_mask_logits(mask_logits, kernel_size, group_size, scale_factor)
        return carafe_fn(features, masks, kernel_size, group_size, scale_factor)
    return carafe_fused_fn


# name -> (carafe, carafe_fused): the candidates benchmarks/onnx_carafe.py times in onnxruntime.
DECOMPOSITIONS = {
    "matmul": (carafe_matmul, carafe_fused_matmul),
    "windows": (carafe_reference, _fused(carafe_reference)),  # the reference backend: k*k*s*s multiply-adds
}
_selected = ["matmul"]  # see the module docstring for why


@contextlib.contextmanager
def use_decomposition(name: str):
    """Exports inside this context use DECOMPOSITIONS[name] (for the benchmark and tests)."""
    if name not in DECOMPOSITIONS:
        raise ValueError(f"unknown decomposition {name!r}; choose one of {sorted(DECOMPOSITIONS)}")
    previous = _selected[0]
    _selected[0] = name
    try:
        yield
    finally:
        _selected[0] = previous


# The downsampling ops export as the reference computes them: k*k strided slices (ONNX Slice with
# steps) multiplied by the tap's masks and summed. Plain tensor operations already, and k*k terms rather
# than the upsampling reference's k*k*s*s, so there is no second candidate to choose between.
_DOWN_EXPORTS = {"carafe_down": carafe_down_reference, "carafe_down_fused": carafe_down_fused_reference}


def export_call(op: str, features: torch.Tensor, masks: torch.Tensor, kernel_size: int, group_size: int,
                scale_factor: int) -> torch.Tensor:
    """What op ("carafe", "carafe_fused", "carafe_down" or "carafe_down_fused") computes while
    torch.onnx.export traces (arguments already validated)."""
    if op in _DOWN_EXPORTS:
        return _DOWN_EXPORTS[op](features, masks, kernel_size, group_size, scale_factor)
    return DECOMPOSITIONS[_selected[0]][int(op == "carafe_fused")](features, masks, kernel_size, group_size,
                                                                   scale_factor)


def decomposition_table() -> dict:
    """{carafe_kernels op: decomposition} for ``ExportedProgram.run_decompositions`` (a program captured
    outside an export); empty where the compiled extension (and so its ops) is absent."""
    from . import _native

    if not _native.HAS_NATIVE:
        return {}
    ops = torch.ops.carafe_kernels
    carafe, carafe_fused = DECOMPOSITIONS[_selected[0]]
    return {ops.carafe.default: carafe, ops.carafe_fused.default: carafe_fused}
