"""cares.complexity: FLOPs follow FlopCounterMode's convention, CARAFE is counted exactly once whatever
backend runs, and the CARes-UNet row reproduces the paper's figures."""
from __future__ import annotations

import argparse
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula

from carafe_kernels import (CARAFEDownPack, CARAFEPack, backend_status, carafe, carafe_down, carafe_down_flops,
                            carafe_flops, carafe_fused)
from carafe_kernels.reference import carafe_down_unfold
from cares import complexity
from cares.complexity import (DEFAULT_MODELS, complexity_report, count_compute, measure_latency,
                              parse_input_size)
from cares.models import ABLATION_VARIANTS, MODEL_NAMES


pytestmark = pytest.mark.usefixtures("single_thread")


def carafe_by_unfold_einsum(features: torch.Tensor, masks: torch.Tensor, k: int, s: int) -> torch.Tensor:
    """CARAFE (one mask group) as unfold + nearest upsampling + einsum: the only arithmetic is the
    einsum, a batched matmul that FlopCounterMode counts."""
    n, c, h, w = features.shape
    patches = F.unfold(features, k, padding=(k - 1) // 2).view(n, c, k * k, h, w)
    patches = patches.repeat_interleave(s, dim=3).repeat_interleave(s, dim=4)
    return torch.einsum("nckyx,nkyx->ncyx", patches, masks)


@pytest.mark.parametrize("n, c, h, w, k, s", [(1, 8, 5, 7, 5, 2), (2, 3, 4, 4, 3, 3)])
def test_carafe_flops_matches_flopcounter_on_a_matmul_decomposition(n, c, h, w, k, s):
    torch.manual_seed(0)
    features = torch.randn(n, c, h, w, dtype=torch.float64)
    masks = torch.rand(n, k * k, h * s, w * s, dtype=torch.float64)
    with FlopCounterMode(display=False) as mode:
        decomposed = carafe_by_unfold_einsum(features, masks, k, s)
    # The decomposition is CARAFE ...
    torch.testing.assert_close(decomposed, carafe(features, masks, k, 1, s, backend="reference"))
    # ... and its counted FLOPs are the formula.
    assert mode.get_total_flops() == carafe_flops((n, c, h, w), k, s) == 2 * n * c * (h * s) * (w * s) * k * k


@pytest.mark.parametrize("n, c, h, w, k, s", [(1, 8, 5, 7, 5, 2), (2, 3, 9, 4, 3, 3)])
def test_carafe_down_flops_matches_flopcounter_on_the_unfold_formulation(n, c, h, w, k, s):
    torch.manual_seed(0)
    features = torch.randn(n, c, h, w, dtype=torch.float64)
    masks = torch.rand(n, k * k, -(-h // s), -(-w // s), dtype=torch.float64)
    with FlopCounterMode(display=False) as mode:
        decomposed = carafe_down_unfold(features, masks, k, 1, s)  # unfold (uncounted) + one einsum
    torch.testing.assert_close(decomposed, carafe_down(features, masks, k, 1, s))
    assert mode.get_total_flops() == carafe_down_flops((n, c, h, w), k, s)


def _conv_flops(n, c_in, c_out, h, w, k):
    return 2 * n * c_out * h * w * c_in * k * k


def _carafepack_count(backend: str, device: str = "cpu"):
    with torch.device(device):
        torch.manual_seed(0)
        pack = CARAFEPack(16, scale_factor=2, backend=backend)
        features = torch.randn(2, 16, 6, 5)
    return count_compute(pack, features)


def _expected_carafepack_flops():
    compressor = _conv_flops(2, 16, 64, 6, 5, 1)
    encoder = _conv_flops(2, 64, 25 * 4, 6, 5, 3)
    return compressor + encoder + carafe_flops((2, 16, 6, 5), 5, 2)


def test_carafe_counted_once_with_the_reference_backend():
    counts = _carafepack_count("reference")
    assert counts.flops == _expected_carafepack_flops()
    assert counts.carafe_counted_by == "forward hook"
    # Shapes alone decide the count: the meta device gives the same.
    assert _carafepack_count("auto", device="meta").flops == counts.flops


@pytest.mark.skipif(backend_status()["cpu"] is not None,
                    reason=f"native CPU CARAFE backend unavailable: {backend_status()['cpu']}")
def test_carafe_counted_once_with_the_native_backend():
    native = _carafepack_count("cpu")
    assert native.carafe_counted_by == "op formula"
    assert native.flops == _carafepack_count("reference").flops == _expected_carafepack_flops()
    assert native.madd == _carafepack_count("reference").madd


# A stand-in for a native CARAFE op: a dispatcher op in a carafe_kernels* namespace with a FLOP formula,
# so the "op formula" path of count_compute is exercised even where the C++ extension is not built.
@torch.library.custom_op("carafe_kernels_testing::carafe_fused", mutates_args=())
def _stand_in_carafe_fused(features: torch.Tensor, mask_logits: torch.Tensor, kernel_size: int,
                           group_size: int, scale_factor: int) -> torch.Tensor:
    return carafe_fused(features, mask_logits, kernel_size, group_size, scale_factor, backend="reference")


@register_flop_formula(torch.ops.carafe_kernels_testing.carafe_fused)
def _stand_in_flops(features_shape, masks_shape, kernel_size, group_size, scale_factor, *args, **kwargs):
    return carafe_flops(features_shape, kernel_size, scale_factor)


class StandInNativeCARAFEPack(CARAFEPack):
    def forward(self, x):
        logits = self.content_encoder(self.channel_compressor(x))
        return torch.ops.carafe_kernels_testing.carafe_fused(x, logits, self.up_kernel, self.up_group,
                                                             self.scale_factor)


def test_carafe_counted_once_when_a_carafe_op_reaches_the_dispatcher():
    torch.manual_seed(0)
    pack = StandInNativeCARAFEPack(16, scale_factor=2)
    counts = count_compute(pack, torch.randn(2, 16, 6, 5))
    assert counts.carafe_counted_by == "op formula"
    assert counts.flops == _carafepack_count("reference").flops == _expected_carafepack_flops()
    # Mixed: one module counted by the op formula, one by the hook.
    mixed = nn.Sequential(StandInNativeCARAFEPack(16, 2), CARAFEPack(16, 2, backend="reference"))
    mixed_counts = count_compute(mixed, torch.randn(2, 16, 6, 5))
    assert mixed_counts.carafe_counted_by == "both"
    second = _conv_flops(2, 16, 64, 12, 10, 1) + _conv_flops(2, 64, 100, 12, 10, 3) \
        + carafe_flops((2, 16, 12, 10), 5, 2)
    assert mixed_counts.flops == _expected_carafepack_flops() + second


def test_madd_follows_torchstat_rules():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                          nn.ConvTranspose2d(4, 2, 2, stride=2, bias=False))
    counts = count_compute(model.eval(), torch.zeros(2, 3, 8, 8))
    conv = (27 + 27) * 2 * 4 * 8 * 8          # 27 multiplies, 26 adds + 1 bias add per output
    batchnorm = 4 * 2 * 4 * 8 * 8
    relu = 2 * 4 * 8 * 8
    maxpool = 3 * 2 * 4 * 4 * 4               # k*k - 1 comparisons per output
    deconv = (16 + 15) * 2 * 2 * 4 * 4        # torchstat: per input position, 4*2*2 multiplies
    assert counts.madd == conv + batchnorm + relu + maxpool + deconv
    assert counts.flops == _conv_flops(2, 3, 4, 8, 8, 3) + 2 * (2 * 4 * 4 * 4) * 2 * 2 * 2
    assert counts.macs == counts.flops // 2 and counts.carafe_counted_by == "-"


def test_cares_unet_row_reproduces_the_paper():
    """54.42 M parameters and 157.97 GFLOPs at 1 x 1 x 256 x 256 (the released code without its unused
    branches). Counted on the meta device, so no arithmetic runs."""
    (row,) = complexity_report(["cares_unet"], (1, 1, 256, 256), latency=False)
    assert row.params == pytest.approx(54.42e6, rel=0.005)
    assert row.trainable_params == row.params
    assert row.flops == pytest.approx(157.97e9, rel=0.01)
    assert row.macs * 2 == row.flops
    assert row.carafe_counted_by in ("forward hook", "op formula")
    assert row.latency_ms is None


def test_upsampler_ablation_rows_count_only_the_upsampler_difference():
    rows = {row.model: row for row in complexity_report(
        ["cares_unet", "cares_unet[upsampler=bilinear]"], 64, latency=False)}
    carafe_row, bilinear_row = rows["cares_unet"], rows["cares_unet[upsampler=bilinear]"]
    # Same 1x1 halving convs; CARAFE adds compressor + content encoder + reassembly.
    compressors = sum(c * 64 + 64 for c in (1024, 512, 256, 128))
    encoders = 4 * (64 * 100 * 9 + 100)
    assert carafe_row.params - bilinear_row.params == compressors + encoders
    low_res = {1024: 4, 512: 8, 256: 16, 128: 32}  # side of each upsampler's input for a 64x64 image
    reassembly = sum(carafe_flops((1, c, side, side), 5, 2) for c, side in low_res.items())
    convs = sum(_conv_flops(1, c, 64, side, side, 1) + _conv_flops(1, 64, 100, side, side, 3)
                for c, side in low_res.items())
    assert carafe_row.flops - bilinear_row.flops == reassembly + convs


def test_downsampler_row_counts_only_the_downsampler_difference():
    """cares_unet[downsampler=carafe]: the four stride-2 conv-BN-ReLUs become CARAFEDownPack
    (compressor + stride-2 content encoder + reassembly counted by carafe_down_flops)."""
    rows = {row.model: row for row in complexity_report(
        ["cares_unet", "cares_unet[downsampler=carafe]"], 64, latency=False)}
    conv_row, carafe_row = rows["cares_unet"], rows["cares_unet[downsampler=carafe]"]
    widths = (64, 128, 256, 512)
    strided_convs = sum(9 * c * c + 2 * c for c in widths)       # 3x3 conv (no bias) + BatchNorm
    packs = sum(c * 64 + 64 + 64 * 25 * 9 + 25 for c in widths)  # compressor + content encoder
    assert conv_row.params - carafe_row.params == strided_convs - packs
    inputs = {64: 64, 128: 32, 256: 16, 512: 8}  # side of each downsampler's input for a 64x64 image
    conv_flops = sum(_conv_flops(1, c, c, side // 2, side // 2, 3) for c, side in inputs.items())
    pack_flops = sum(_conv_flops(1, c, 64, side, side, 1) + _conv_flops(1, 64, 25, side // 2, side // 2, 3)
                     + carafe_down_flops((1, c, side, side), 5, 2) for c, side in inputs.items())
    assert conv_row.flops - carafe_row.flops == conv_flops - pack_flops
    assert carafe_row.carafe_counted_by in ("forward hook", "both")


def test_carafe_down_pack_counted_by_the_hook():
    with torch.device("meta"):
        pack = CARAFEDownPack(16, down_group=2)
        counts = count_compute(pack, torch.empty(2, 16, 7, 6))
    assert counts.carafe_counted_by == "forward hook"
    assert counts.flops == (_conv_flops(2, 16, 64, 7, 6, 1) + _conv_flops(2, 64, 50, 4, 3, 3)
                            + carafe_down_flops((2, 16, 7, 6), 5, 2))
    positions = 2 * 4 * 3
    conv_madd = (16 + 16) * 2 * 64 * 7 * 6 + (576 + 576) * 2 * 50 * 4 * 3
    assert counts.madd == conv_madd + positions * (16 * (2 * 25 - 1) + 2 * (3 * 25 - 1))


def test_parse_input_size():
    assert parse_input_size("256") == (1, 1, 256, 256)
    assert parse_input_size("1,1,256,256") == (1, 1, 256, 256)
    assert parse_input_size("2x1x64x96") == (2, 1, 64, 96)
    assert parse_input_size("64,96") == (1, 1, 64, 96)
    for bad in ("", "1,1,256", "a,b", "0", "1,1,-2,4"):
        with pytest.raises(ValueError, match="input size"):
            parse_input_size(bad)


def test_measure_latency_is_positive_and_validates():
    model = nn.Conv2d(1, 1, 3)
    assert measure_latency(model, torch.zeros(1, 1, 8, 8), repeats=2, warmup=0) > 0
    with pytest.raises(ValueError, match="repeats"):
        measure_latency(model, torch.zeros(1, 1, 8, 8), repeats=0)


def test_default_models_cover_every_model_and_the_ablation():
    assert set(DEFAULT_MODELS) == set(MODEL_NAMES) | set(ABLATION_VARIANTS)
    assert complexity._split_models("cares_unet[upsampler=deconv,carafe_backend=reference], unet") == \
        ["cares_unet[upsampler=deconv,carafe_backend=reference]", "unet"]


def test_command_writes_json_and_markdown(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    complexity.add_arguments(parser)
    json_path, markdown_path = tmp_path / "out" / "complexity.json", tmp_path / "complexity.md"
    args = parser.parse_args(["--models", "unet_resnet34,cares_unet[upsampler=bilinear]",
                              "--input-size", "32",
                              "--json", str(json_path), "--markdown", str(markdown_path),
                              "--repeats", "1", "--warmup", "0"])
    assert complexity.run(args) == 0
    rows = json.loads(json_path.read_text())
    assert [row["model"] for row in rows] == ["unet_resnet34", "cares_unet[upsampler=bilinear]"]
    for row in rows:
        assert {"model", "params", "macs", "flops", "madd", "latency_ms"} <= row.keys()
        assert row["flops"] == 2 * row["macs"] > 0 and row["latency_ms"] > 0
        assert row["input_shape"] == [1, 1, 32, 32]
        assert row["provenance"]["torch"] == torch.__version__ and "sha" in row["provenance"]["git"]
    document = markdown_path.read_text()
    assert "| Model | Params (M) |" in document and "| unet_resnet34 |" in document
    assert "MAdd" in document and "torchstat" in document
    assert "unet_resnet34" in capsys.readouterr().out  # the plain table still goes to stdout


def test_command_rejects_bad_arguments_before_any_work(capsys):
    """One `error:` line and status 2, as every cares command (tests/test_reliability.py has the rest)."""
    parser = argparse.ArgumentParser()
    complexity.add_arguments(parser)
    for args, message in ((["--models", "unet,resnet99", "--no-latency"], "unknown model 'resnet99'"),
                          (["--models", "unet", "--repeats", "0"], "need --repeats >= 1"),
                          (["--models", "unet", "--input-size", "1,1,64"], "--input-size: input size")):
        assert complexity.run(parser.parse_args(args)) == 2
        err = capsys.readouterr().err
        assert err.startswith("cares complexity: error: ") and message in err and len(err.splitlines()) == 1
