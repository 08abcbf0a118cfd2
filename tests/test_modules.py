"""CARAFE and CARAFEPack: mmcv's names, shapes and initialisation, so mmcv checkpoints load unchanged."""
from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from conftest import TOLERANCES, backend_cases, make_inputs

from carafe_kernels import CARAFE, CARAFEPack, carafe
from carafe_kernels.reference import carafe_fused_reference

BACKENDS = backend_cases()


def mmcv_state_dict(channels, scale_factor, up_kernel=5, up_group=1, encoder_kernel=3, compressed_channels=64):
    """What mmcv.ops.CARAFEPack(...).state_dict() holds (its parameter names and shapes)."""
    gen = torch.Generator().manual_seed(0)
    encoder_out = up_kernel * up_kernel * up_group * scale_factor * scale_factor
    return OrderedDict([
        ("channel_compressor.weight", torch.randn(compressed_channels, channels, 1, 1, generator=gen)),
        ("channel_compressor.bias", torch.randn(compressed_channels, generator=gen)),
        ("content_encoder.weight", torch.randn(encoder_out, compressed_channels, encoder_kernel, encoder_kernel,
                                               generator=gen)),
        ("content_encoder.bias", torch.randn(encoder_out, generator=gen)),
    ])


@pytest.mark.parametrize("kwargs", [
    dict(channels=64, scale_factor=2),
    dict(channels=32, scale_factor=3, up_kernel=3, up_group=2, encoder_kernel=5, compressed_channels=16),
    dict(channels=12, scale_factor=4, up_kernel=7, up_group=4, encoder_kernel=1, compressed_channels=8),
], ids=["defaults", "k3-g2-s3-enc5", "k7-g4-s4-enc1"])
def test_state_dict_matches_mmcv(kwargs):
    module = CARAFEPack(**kwargs)
    expected = mmcv_state_dict(**kwargs)
    got = module.state_dict()
    assert list(got) == list(expected)
    for name, tensor in expected.items():
        assert got[name].shape == tensor.shape, name
    module.load_state_dict(expected, strict=True)
    for name, tensor in expected.items():
        assert torch.equal(module.state_dict()[name], tensor), name


def test_init_follows_mmcv():
    """Xavier-uniform convs with zero biases, then the content encoder re-drawn from N(0, 0.001)."""
    torch.manual_seed(0)
    module = CARAFEPack(64, 2)
    weight = module.content_encoder.weight.detach()
    assert weight.shape == (100, 64, 3, 3)
    assert 0.0009 < float(weight.std()) < 0.0011
    assert abs(float(weight.mean())) < 1e-4
    assert torch.count_nonzero(module.content_encoder.bias) == 0
    assert torch.count_nonzero(module.channel_compressor.bias) == 0
    compressor = module.channel_compressor.weight.detach()
    bound = (6.0 / (64 + 64)) ** 0.5  # xavier_uniform: fan_in = fan_out = 64 for a 1x1 conv 64 -> 64
    assert float(compressor.abs().max()) <= bound
    assert float(compressor.std()) > 0.5 * bound / 3 ** 0.5


def test_encoder_dilation_keeps_spatial_size():
    module = CARAFEPack(8, 2, up_kernel=3, encoder_dilation=2, compressed_channels=4)
    assert module.content_encoder.dilation == (2, 2) and module.content_encoder.padding == (2, 2)
    assert module(torch.randn(1, 8, 5, 6)).shape == (1, 8, 10, 12)


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_carafepack_forward_equals_its_definition(backend, device):
    """compressor -> encoder -> pixel shuffle + softmax + reassembly, against the float64 reference."""
    torch.manual_seed(0)
    module = CARAFEPack(16, 2, up_kernel=5, up_group=2, compressed_channels=8, backend=backend).to(device)
    torch.nn.init.normal_(module.content_encoder.weight, std=0.3)  # non-trivial masks
    x = torch.randn(2, 16, 7, 5, device=device)
    out = module(x)
    ref = module.double().cpu()
    x64 = x.double().cpu()
    expected = carafe_fused_reference(x64, ref.content_encoder(ref.channel_compressor(x64)), 5, 2, 2)
    torch.testing.assert_close(out.double().cpu(), expected, **TOLERANCES[torch.float32])


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_carafe_module_equals_functional(backend, device):
    features, masks = make_inputs(2, 8, 4, 5, 3, 2, 2, fused=False, device=device)
    module = CARAFE(3, 2, 2, backend=backend)
    torch.testing.assert_close(module(features, masks), carafe(features, masks, 3, 2, 2, backend=backend),
                               rtol=0, atol=0)


def test_extra_repr():
    assert repr(CARAFE(5, 4, 2)) == "CARAFE(kernel_size=5, group_size=4, scale_factor=2, backend='auto')"
    module = CARAFEPack(64, 2, up_group=2, backend="reference")
    assert module.extra_repr() == "channels=64, scale_factor=2, up_kernel=5, up_group=2, backend='reference'"
    text = repr(module)
    assert "(channel_compressor): Conv2d(64, 64, kernel_size=(1, 1)" in text
    assert "(content_encoder): Conv2d(64, 200, kernel_size=(3, 3)" in text


def test_modules_have_no_buffers_and_mmcv_attributes():
    module = CARAFEPack(32, 2, up_kernel=3, up_group=4, compressed_channels=16)
    assert list(dict(module.named_buffers())) == []
    for name, value in dict(channels=32, scale_factor=2, up_kernel=3, up_group=4, encoder_kernel=3,
                            encoder_dilation=1, compressed_channels=16).items():
        assert getattr(module, name) == value
    plain = CARAFE(5, 4, 2)
    assert (plain.kernel_size, plain.group_size, plain.scale_factor) == (5, 4, 2)
