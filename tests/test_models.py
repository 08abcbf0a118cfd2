"""cares.models: every model trains a step on CPU and keeps the input size; the registry and the
ablation variants behave as documented."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from carafe_kernels import CARAFEDownPack, CARAFEPack
from cares.models import (ABLATION_VARIANTS, DOWNSAMPLERS, MODEL_NAMES, UPSAMPLERS, CAResUNet, build_model,
                          model_options, parse_model_spec)
from cares.models.fcn import bilinear_kernel_

ALL_SPECS = (*MODEL_NAMES, *ABLATION_VARIANTS)


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("spec", ALL_SPECS)
def test_forward_backward_keeps_size_and_reaches_every_parameter(spec):
    torch.manual_seed(0)
    model = build_model(spec, in_channels=1, num_classes=1)
    images = torch.randn(2, 1, 64, 64)
    logits = model(images)
    assert logits.shape == (2, 1, 64, 64)
    assert torch.isfinite(logits).all()
    logits.square().mean().backward()
    # "No module that forward never runs": every parameter must get a gradient.
    unused = [name for name, p in model.named_parameters() if p.grad is None]
    assert not unused, f"{spec}: parameters forward never uses: {unused}"


@pytest.mark.parametrize("spec", ["unet_resnet34", "cares_unet[upsampler=bilinear]"])
def test_in_channels_and_num_classes_are_honoured(spec):
    model = build_model(spec, in_channels=3, num_classes=4).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 4, 32, 32)


def _state_shapes(model: nn.Module, *, exclude_prefix: str | None = None) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in model.state_dict().items()
            if exclude_prefix is None or not key.startswith(exclude_prefix)}


def test_upsampler_variants_differ_only_in_the_upsamplers():
    with torch.device("meta"):
        variants = {kind: build_model("cares_unet", upsampler=kind) for kind in UPSAMPLERS}
    baseline = _state_shapes(variants["carafe"], exclude_prefix="upsamplers.")
    assert baseline  # the encoder/decoder/head are there
    for kind, model in variants.items():
        assert _state_shapes(model, exclude_prefix="upsamplers.") == baseline, kind
    upsampler_keys = {kind: frozenset(_state_shapes(m).keys() - baseline.keys())
                      for kind, m in variants.items()}
    assert len(set(upsampler_keys.values())) == len(UPSAMPLERS)  # and the upsamplers do differ


def test_ablation_specs_equal_keyword_options():
    with torch.device("meta"):
        from_spec = build_model("cares_unet[upsampler=subpixel]")
        from_keyword = build_model("cares_unet", upsampler="subpixel")
        res_unet = build_model("res_unet")
        deconv = build_model("cares_unet[upsampler=deconv]")
    assert _state_shapes(from_spec) == _state_shapes(from_keyword)
    assert _state_shapes(res_unet) == _state_shapes(deconv)


def test_cares_unet_structure_matches_the_paper():
    model = build_model("cares_unet")
    carafes = [m for m in model.modules() if isinstance(m, CARAFEPack)]
    assert [c.channels for c in carafes] == [1024, 512, 256, 128]
    for carafe in carafes:
        assert (carafe.compressed_channels, carafe.encoder_kernel, carafe.up_kernel, carafe.scale_factor) \
            == (64, 3, 5, 2)
    assert [up.reduce.out_channels for up in model.upsamplers] == [512, 256, 128, 64]
    assert model.head.kernel_size == (1, 1) and model.head.in_channels == 64
    assert sum(p.numel() for p in model.parameters()) == 54_417_489


def test_carafe_backend_option_reaches_every_carafepack():
    model = build_model("cares_unet", carafe_backend="reference")
    backends = {m.backend for m in model.modules() if isinstance(m, CARAFEPack)}
    assert backends == {"reference"}
    with pytest.raises(ValueError, match="backend"):
        build_model("cares_unet", carafe_backend="no-such-backend")


def test_cares_unet_downsampler_option():
    """downsampler=carafe replaces each encoder stride-2 conv-BN-ReLU with CARAFEDownPack and keeps
    everything else; the paper's stride-2 convolutions stay the default."""
    assert "cares_unet[downsampler=carafe]" in ABLATION_VARIANTS and DOWNSAMPLERS == ("conv", "carafe")
    assert "downsampler" in model_options("cares_unet") and "downsampler" in model_options("ca_unet")
    with torch.device("meta"):
        paper, down = build_model("cares_unet"), build_model("cares_unet[downsampler=carafe]")
        assert _state_shapes(build_model("cares_unet", downsampler="conv")) == _state_shapes(paper)
        narrow = build_model("ca_unet", downsampler="carafe", base_channels=16, carafe_backend="reference")
    assert not any(isinstance(m, CARAFEDownPack) for m in paper.modules())
    packs = [m for m in down.modules() if isinstance(m, CARAFEDownPack)]
    assert [p.channels for p in packs] == [64, 128, 256, 512]
    for pack in packs:
        assert (pack.scale_factor, pack.down_kernel, pack.encoder_kernel, pack.compressed_channels) == (2, 5, 3, 64)
    assert [p.compressed_channels for p in narrow.modules() if isinstance(p, CARAFEDownPack)] == [16, 32, 64, 64]
    assert {p.backend for p in narrow.modules() if isinstance(p, (CARAFEPack, CARAFEDownPack))} == {"reference"}
    # Only the downsamplers' stride-2 convs (and their BatchNorms) differ.
    assert _state_shapes(down, exclude_prefix="downsamplers.") == _state_shapes(paper, exclude_prefix="downsamplers.")
    paper_down, carafe_down = (_state_shapes(m.downsamplers) for m in (paper, down))
    assert {k for k in paper_down if ".block." not in k} == {
        f"{i}.conv.{part}" for i in range(4) for part in ("conv.weight", "bn.weight", "bn.bias", "bn.running_mean",
                                                          "bn.running_var", "bn.num_batches_tracked")}
    assert {k for k in carafe_down if ".block." not in k} == {
        f"{i}.carafe.{part}" for i in range(4) for part in ("channel_compressor.weight", "channel_compressor.bias",
                                                            "content_encoder.weight", "content_encoder.bias")}
    assert {k: v for k, v in paper_down.items() if ".block." in k} == \
        {k: v for k, v in carafe_down.items() if ".block." in k}
    # Every backend has the down kernel: an explicit one is accepted when the model is built (whether it
    # can run here is checked when it runs; a backend without the kernel is refused by CARAFEDownPack,
    # tests/test_carafe_down.py).
    build_model("cares_unet[downsampler=carafe,carafe_backend=triton]", base_channels=4)
    build_model("cares_unet[downsampler=carafe,carafe_backend=cuda]", base_channels=4)
    build_model("cares_unet[carafe_backend=cuda]", base_channels=4)  # (the upsamplers alone: checked when run)
    with pytest.raises(ValueError, match="downsampler must be one of \\('conv', 'carafe'\\), got 'maxpool'"):
        build_model("cares_unet[downsampler=maxpool]")


def test_ca_unet_is_cares_unet_without_the_residual_connections():
    torch.manual_seed(0)
    cares, ca = build_model("cares_unet").eval(), build_model("ca_unet").eval()
    ca.load_state_dict(cares.state_dict())  # identical parameters, strict key match
    images = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(cares(images), ca(images))
        for block in (m for m in ca.modules() if hasattr(m, "residual")):
            block.residual = True
        assert torch.allclose(cares(images), ca(images))


def test_fcn_upsamplers_start_as_bilinear_interpolation():
    deconv = nn.ConvTranspose2d(1, 1, 16, stride=8, padding=4, bias=False)
    bilinear_kernel_(deconv)
    with torch.no_grad():
        upsampled = deconv(torch.ones(1, 1, 6, 6))
    assert upsampled.shape == (1, 1, 48, 48)
    # Away from the zero-padded border a constant map stays constant.
    assert torch.allclose(upsampled[..., 8:-8, 8:-8], torch.ones(1, 1, 32, 32))


def test_parse_model_spec():
    assert parse_model_spec("unet") == ("unet", {})
    assert parse_model_spec("cares_unet[upsampler=deconv, carafe_backend=reference]") == \
        ("cares_unet", {"upsampler": "deconv", "carafe_backend": "reference"})
    assert parse_model_spec("fcn[dropout=0.1]") == ("fcn", {"dropout": 0.1})
    assert "upsampler" in model_options("cares_unet")
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        parse_model_spec("nope")
    with pytest.raises(ValueError, match="key=value"):
        parse_model_spec("cares_unet[upsampler]")
    with pytest.raises(ValueError, match="name\\[key=value"):
        parse_model_spec("cares_unet[upsampler=deconv")


def test_build_model_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown model"):
        build_model("unet3d")
    with pytest.raises(TypeError, match="does not take options \\['upsampler'\\]"):
        build_model("unet", upsampler="carafe")
    with pytest.raises(ValueError, match="both in the model spec"):
        build_model("cares_unet[upsampler=deconv]", upsampler="bilinear")
    with pytest.raises(ValueError, match="upsampler must be one of .* got 'nearest'"):
        build_model("cares_unet", upsampler="nearest")
    with pytest.raises(ValueError, match="in_channels must be >= 1, got 0"):
        build_model("unet", in_channels=0)
    with pytest.raises(TypeError, match="num_classes must be an int"):
        build_model("segnet", num_classes=1.5)


@pytest.mark.parametrize("spec, multiple", [("cares_unet", 16), ("unet", 16), ("unet_resnet34", 32),
                                            ("segnet", 32), ("fcn", 32)])
def test_bad_input_shapes_raise_value_error_naming_the_shape(spec, multiple):
    with torch.device("meta"):
        model = build_model(spec)
        with pytest.raises(ValueError, match=f"divisible by {multiple}, got input shape \\(1, 1, 40, 64\\)"):
            model(torch.empty(1, 1, 40, 64))
        with pytest.raises(ValueError, match="\\(N, 1, H, W\\), got \\(1, 3, 64, 64\\)"):
            model(torch.empty(1, 3, 64, 64))


def test_cares_unet_rejects_non_bool_residual():
    with pytest.raises(TypeError, match="residual must be a bool"):
        CAResUNet(residual="no")


@pytest.mark.parametrize("name", ["cares_unet", "ca_unet"])
def test_base_channels_scales_every_block(name):
    model = build_model(name, base_channels=8)
    x = torch.randn(2, 1, 32, 32)
    assert model(x).shape == (2, 1, 32, 32)
    narrow = sum(p.numel() for p in model.parameters())
    # Convolution weights scale with width squared: 8x narrower is far below 1/8 of the paper's 54.42 M.
    assert narrow < 54.42e6 / 40
    carafe_packs = [m for m in model.modules() if isinstance(m, CARAFEPack)]
    assert [m.channels for m in carafe_packs] == [128, 64, 32, 16]
    # Narrow upsamplers compress to their own width rather than expanding to 64 channels.
    assert [m.compressed_channels for m in carafe_packs] == [64, 64, 32, 16]


@pytest.mark.parametrize("bad", [0, 3, -2, 2.0, True])
@pytest.mark.parametrize("name", ["cares_unet", "unet"])
def test_base_channels_rejects_bad_values(bad, name):
    with pytest.raises(ValueError, match="base_channels"):
        build_model(name, base_channels=bad)


def test_unet_width_option_keeps_the_paper_model_by_default():
    # The original U-Net (1 input channel, 1 class): 31.04 M parameters; width 16 is 1/16 of the convolutions.
    assert sum(p.numel() for p in build_model("unet").parameters()) == 31_036_481
    narrow = build_model("unet", base_channels=16)
    assert [block.conv1.conv.out_channels for block in narrow.encoders] == [16, 32, 64, 128, 256]
    assert narrow(torch.randn(2, 1, 32, 32)).shape == (2, 1, 32, 32)


def test_register_model_adds_and_removes_a_builder():
    from cares.models import register_model, unregister_model

    register_model("my_test_model", lambda in_channels, num_classes, *, width=4: nn.Conv2d(in_channels, num_classes, 1))
    try:
        assert build_model("my_test_model[width=8]").out_channels == 1
        with pytest.raises(ValueError, match="already registered"):
            register_model("my_test_model", nn.Identity)
    finally:
        unregister_model("my_test_model")
    with pytest.raises(ValueError, match="unknown model"):
        build_model("my_test_model")
    with pytest.raises(ValueError, match="built-in"):
        unregister_model("cares_unet")


@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 1, 1, 1), (1, 2, 2, 3)])
def test_deterministic_bilinear_upsample_equals_interpolate(shape):
    from cares.models.blocks import BilinearUpsample2x, bilinear_upsample_2x
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    want = torch.nn.functional.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    got = bilinear_upsample_2x(x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-14)
    grad = torch.randn_like(want)
    torch.testing.assert_close(torch.autograd.grad(got, x, grad)[0], torch.autograd.grad(want, x, grad)[0],
                               rtol=0, atol=1e-13)
    cl = x.detach().contiguous(memory_format=torch.channels_last)
    if shape[1] > 1 and shape[2] * shape[3] > 1:
        assert bilinear_upsample_2x(cl).is_contiguous(memory_format=torch.channels_last)
    before = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        torch.testing.assert_close(BilinearUpsample2x()(x), want, rtol=0, atol=1e-14)
    finally:
        torch.use_deterministic_algorithms(before)


def test_deterministic_max_unpool_equals_max_unpool():
    from cares.models.blocks import MaxUnpool2x
    x = torch.randn(2, 3, 6, 4, requires_grad=True)
    pooled, indices = torch.nn.MaxPool2d(2, stride=2, return_indices=True)(x)
    want = torch.nn.MaxUnpool2d(2, stride=2)(pooled, indices)
    before = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        with pytest.raises(RuntimeError, match="deterministic"):   # torch's own, even on the CPU
            torch.nn.MaxUnpool2d(2, stride=2)(pooled, indices)
        got = MaxUnpool2x()(pooled, indices)
        assert torch.equal(got, want)
        grad = torch.randn_like(want)
        assert torch.equal(torch.autograd.grad(got, x, grad, retain_graph=True)[0], torch.autograd.grad(want, x, grad)[0])
    finally:
        torch.use_deterministic_algorithms(before)


def test_nondeterministic_layers_by_device():
    from cares.models.blocks import nondeterministic_layers
    net = torch.nn.Sequential(torch.nn.Upsample(scale_factor=2, mode="bilinear"), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.MaxUnpool2d(2), torch.nn.Upsample(scale_factor=2, mode="nearest"))
    assert nondeterministic_layers(net, "cuda") == ["0 (Upsample, mode bilinear)", "1 (AdaptiveAvgPool2d)",
                                                    "2 (MaxUnpool2d)"]
    assert nondeterministic_layers(net, "cpu") == ["2 (MaxUnpool2d)"]
    for name in MODEL_NAMES + ABLATION_VARIANTS:  # cares' own models all train under --deterministic, CUDA too
        assert nondeterministic_layers(build_model(name), "cuda") == [], name
