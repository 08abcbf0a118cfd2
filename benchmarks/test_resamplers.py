"""benchmarks/resamplers.py and its DySample baseline: the layer is right, and a tiny run writes every row."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from benchmarks import resamplers
from benchmarks.dysample import STATIC_SCOPE, DySample


@pytest.mark.parametrize("style, scale, groups", [("lp", 2, 4), ("pl", 2, 4), ("lp", 3, 2), ("pl", 2, 1)])
def test_dysample_with_zero_offsets_is_bilinear_upsampling(style, scale, groups):
    x = torch.randn(2, 36, 5, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    module = DySample(36, scale, style, groups).double()
    torch.nn.init.zeros_(module.offset.weight)
    expected = F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
    torch.testing.assert_close(module(x), expected)


@pytest.mark.parametrize("style", ["lp", "pl"])
def test_dysample_offset_moves_the_sampling_point_of_its_group_and_axis(style):
    """A constant x offset of one low-res pixel on group 0 shifts group 0's output by `scale` output
    pixels (interior columns); the other group and the y axis are untouched."""
    scale, groups, channels = 2, 2, 8
    x = torch.randn(1, channels, 6, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    module = DySample(channels, scale, style, groups).double()
    torch.nn.init.zeros_(module.offset.weight)
    with torch.no_grad():
        bias = module.offset.bias
        per_axis_group = bias.numel() // (2 * groups)    # offset channels per (axis, group)
        bias[:per_axis_group] = 1.0 / STATIC_SCOPE          # axis x, group 0: +1 low-res pixel
    out = module(x)
    plain = F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
    half = channels // groups
    torch.testing.assert_close(out[:, :half, :, 2:-4], plain[:, :half, :, 2 + scale:-4 + scale])
    torch.testing.assert_close(out[:, half:], plain[:, half:])


def test_dysample_refuses_bad_configurations():
    with pytest.raises(ValueError, match="style"):
        DySample(8, style="xy")
    with pytest.raises(ValueError, match="divisible by groups"):
        DySample(6, groups=4)
    with pytest.raises(ValueError, match="scale\\^2"):
        DySample(6, style="pl", groups=2)


def test_tiny_run_writes_every_row(tmp_path, capsys):
    out = tmp_path / "resamplers.json"
    assert resamplers.main(["--shapes", "tiny", "--min-run-time", "0.01", "--threads", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["machine"]["torch"] == torch.__version__ and result["carafe_backends"] == ["cpu"]
    up = [row for row in result["rows"] if row["direction"] == "up"]
    down = [row for row in result["rows"] if row["direction"] == "down"]
    names = {row["upsampler"] for row in up}
    assert names == {"carafe:cpu", "dysample_lp", "dysample_pl", "bilinear", "nearest", "deconv", "subpixel"}
    assert len(up) == 2 * len(names)
    rows = {(row["upsampler"], row["mode"]): row for row in up}
    for (name, mode), row in rows.items():
        assert row["ms"] > 0 and row["peak_bytes"] >= 0 and row["vs_carafe"] > 0
        assert (row["flops"] > 0) == (name != "nearest"), name
    assert rows["bilinear", "fwd"]["params"] == rows["nearest", "fwd"]["params"] == 0
    assert rows["carafe:cpu", "fwd"]["vs_carafe"] == 1.0
    # Forward+backward costs more FLOPs than forward, and the CARAFE op's own formula is counted.
    assert rows["carafe:cpu", "fwdbwd"]["flops"] > rows["carafe:cpu", "fwd"]["flops"]
    assert "carafe:cpu" in capsys.readouterr().out
    # The downsampling rows: carafe_down (fused cpu), its unfold formulation, strided conv, pooling.
    down_names = {row["downsampler"] for row in down}
    assert down_names == {"carafe_down:cpu", "carafe_down_unfold", "strided_conv", "maxpool", "avgpool"}
    assert len(down) == 2 * len(down_names)
    drows = {(row["downsampler"], row["mode"]): row for row in down}
    assert drows["carafe_down:cpu", "fwd"]["vs_carafe"] == 1.0
    assert all(row["ms"] > 0 and row["flops"] > 0 and (row["H"], row["W"]) == (8, 8) for row in down)
    # the same module (and parameters) with the unfold reassembly; FLOPs counted by the op's formula vs einsum
    assert drows["carafe_down_unfold", "fwd"]["params"] == drows["carafe_down:cpu", "fwd"]["params"] > 0
    assert drows["carafe_down:cpu", "fwdbwd"]["flops"] > drows["carafe_down:cpu", "fwd"]["flops"]
    assert drows["maxpool", "fwd"]["params"] == 0 and drows["strided_conv", "fwd"]["params"] == 16 * 16 * 9 + 16
    # The reassembly alone: the fused op against the unfold formulation, on inputs (features, logits).
    ops = {(row["op"], row["mode"]): row for row in result["rows"] if row["direction"] == "down_op"}
    assert set(ops) == {(name, mode) for name in ("carafe_down_fused:cpu", "unfold") for mode in ("fwd", "fwdbwd")}
    budget = 4 * (16 * 4 * 4 + 16 * 8 * 8 + 25 * 4 * 4)     # fp32 output + features + logits
    assert all(row["budget_bytes"] == budget and row["params"] == 0 for row in ops.values())
    assert ops["carafe_down_fused:cpu", "fwd"]["vs_carafe"] == 1.0
    # the unfold formulation's k*k-fold intermediate is over budget; the fused op is not
    assert ops["unfold", "fwdbwd"]["peak_bytes"] > budget >= ops["carafe_down_fused:cpu", "fwdbwd"]["peak_bytes"]
