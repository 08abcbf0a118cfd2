"""Content-aware downsampling (CARAFE++) as a public op: carafe_down / carafe_down_fused through the
contract, the registry and the call plans, and the CARAFEDownPack module.

Only the reference backend implements the down ops for now, so the oracle comparisons here check the
public path (validation, backend choice, autocast casts, compile, export) rather than a second kernel;
the reference against the scalar-loop definition is tests/test_reference_down.py.
"""
from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F

import carafe_kernels
from carafe_kernels import (BackendUnavailableError, CARAFEDownPack, carafe_down, carafe_down_flops,
                            carafe_down_fused)
from carafe_kernels.naive import carafe_down_fused_naive, carafe_down_naive
from carafe_kernels.reference import carafe_down_unfold, down_output_size, normalize_down_mask_logits

OPS = {"plain": carafe_down, "fused": carafe_down_fused}
SECOND = {"plain": "masks", "fused": "mask_logits"}
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
       torch.float16: dict(rtol=2e-3, atol=2e-3)}

# (N, C, H, W, k, G, s)
ODD = (2, 4, 7, 5, 3, 2, 2)           # sizes s does not divide
S3 = (1, 6, 8, 7, 5, 3, 3)
BIG_K = (1, 2, 3, 2, 7, 1, 2)         # window wider than the image
S1 = (2, 3, 5, 6, 3, 1, 1)
ONE_PIXEL = (1, 2, 1, 1, 3, 1, 2)
SHAPES = [ODD, S3, BIG_K, S1, ONE_PIXEL, (1, 1, 1, 1, 1, 1, 1)]


def shape_id(shape):
    return "N{}-C{}-H{}-W{}-k{}-g{}-s{}".format(*shape)


def make_inputs(N, C, H, W, k, G, s, *, op="plain", dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(N, C, H, W, generator=generator, dtype=torch.float64)
    second = torch.randn(N, G * k * k, down_output_size(H, s), down_output_size(W, s), generator=generator,
                         dtype=torch.float64)
    if op == "plain":
        second = normalize_down_mask_logits(second, k, G)
    return features.to(dtype), second.to(dtype)


def naive(op, features, second, k, G, s):
    fn = carafe_down_naive if op == "plain" else carafe_down_fused_naive
    return fn(features.double(), second.double(), k, G, s)


# --- the op against the definition ------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("op", OPS)
def test_matches_the_float64_definition(op, shape):
    N, C, H, W, k, G, s = shape
    features, second = make_inputs(*shape, op=op)
    out = OPS[op](features, second, k, G, s)
    assert out.shape == (N, C, math.ceil(H / s), math.ceil(W / s)) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), naive(op, features, second, k, G, s), **TOL[torch.float32])
    # The public op through backend="reference" is the same function.
    torch.testing.assert_close(OPS[op](features, second, k, G, s, backend="reference"), out, rtol=0, atol=0)


@pytest.mark.parametrize("op", OPS)
def test_gradcheck(op):
    N, C, H, W, k, G, s = ODD
    features, second = make_inputs(*ODD, op=op, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda f, m: OPS[op](f, m, k, G, s),
                                    (features.requires_grad_(), second.requires_grad_()))


def test_fused_equals_plain_of_softmaxed_logits():
    N, C, H, W, k, G, s = S3
    features, logits = make_inputs(*S3, op="fused")
    masks = logits.view(N, G, k * k, *logits.shape[2:]).softmax(dim=2).view_as(logits)
    torch.testing.assert_close(carafe_down_fused(features, logits, k, G, s), carafe_down(features, masks, k, G, s))


def test_uniform_masks_give_average_pooling():
    """The documented semantics on a case with a known answer: masks 1/k^2 everywhere are
    avg_pool2d(k, stride=s, padding=k//2, count_include_pad=True)."""
    features = torch.randn(2, 3, 9, 8)
    masks = torch.full((2, 25, 5, 4), 1 / 25)
    torch.testing.assert_close(carafe_down(features, masks, 5, 1, 2),
                               F.avg_pool2d(features, 5, stride=2, padding=2, count_include_pad=True))


@pytest.mark.parametrize("op", OPS)
def test_channels_last_inputs(op):
    N, C, H, W, k, G, s = ODD
    features, second = make_inputs(*ODD, op=op)
    expected = OPS[op](features, second, k, G, s)
    f_cl = features.contiguous(memory_format=torch.channels_last).requires_grad_()
    m_cl = second.contiguous(memory_format=torch.channels_last).requires_grad_()
    out = OPS[op](f_cl, m_cl, k, G, s)
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    f, m = features.clone().requires_grad_(), second.clone().requires_grad_()
    OPS[op](f, m, k, G, s).sum().backward()
    torch.testing.assert_close(f_cl.grad, f.grad)
    torch.testing.assert_close(m_cl.grad, m.grad)


@pytest.mark.parametrize("empty", ["N0", "C0"])
@pytest.mark.parametrize("op", OPS)
def test_empty_tensors(op, empty):
    N, C = (0, 4) if empty == "N0" else (2, 0)
    features = torch.randn(N, C, 5, 7, requires_grad=True)
    second = torch.randn(N, 2 * 9, 3, 4, requires_grad=True) if C else torch.randn(N, 9, 3, 4, requires_grad=True)
    G = 2 if C else 1
    out = OPS[op](features, second, 3, G, 2)
    assert out.shape == (N, C, 3, 4)
    out.sum().backward()
    assert features.grad.shape == features.shape and second.grad.shape == second.shape
    assert not second.grad.any()


@pytest.mark.parametrize("op", OPS)
def test_deterministic(op):
    N, C, H, W, k, G, s = S3
    features, second = make_inputs(*S3, op=op)
    results = []
    for _ in range(2):
        f, m = features.clone().requires_grad_(), second.clone().requires_grad_()
        out = OPS[op](f, m, k, G, s)
        out.backward(torch.ones_like(out))
        results.append((out, f.grad, m.grad))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_forward_mode_ad_and_vmap():
    """The reference is plain PyTorch, so torch.func's jvp and vmap work as for any PyTorch function."""
    N, C, H, W, k, G, s = ODD
    features, logits = make_inputs(*ODD, op="fused", dtype=torch.float64)
    tangents = (torch.randn_like(features), torch.randn_like(logits))

    def fn(f, lg):
        return carafe_down_fused(f, lg, k, G, s)

    out, jvp_out = torch.func.jvp(fn, (features, logits), tangents)
    eps = 1e-6  # central difference in float64
    numeric = (fn(features + eps * tangents[0], logits + eps * tangents[1])
               - fn(features - eps * tangents[0], logits - eps * tangents[1])) / (2 * eps)
    torch.testing.assert_close(jvp_out, numeric, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out, fn(features, logits))

    batched = torch.func.vmap(lambda f, lg: fn(f[None], lg[None])[0])(features, logits)
    torch.testing.assert_close(batched, fn(features, logits))


# --- autocast --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("op", OPS)
def test_autocast_casts_to_the_region_dtype(op):
    N, C, H, W, k, G, s = ODD
    features, second = make_inputs(*ODD, op=op)
    features.requires_grad_()
    second = second.to(torch.bfloat16).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = OPS[op](features, second, k, G, s)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert features.grad.dtype == torch.float32 and second.grad.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), naive(op, features.detach().bfloat16(), second.detach(), k, G, s),
                               **TOL[torch.bfloat16])


@pytest.mark.parametrize("op", OPS)
def test_autocast_leaves_float64_alone(op):
    N, C, H, W, k, G, s = ODD
    features, second = make_inputs(*ODD, op=op, dtype=torch.float64)
    expected = OPS[op](features, second, k, G, s)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = OPS[op](features, second, k, G, s)
        assert out.dtype == torch.float64
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
        with pytest.raises(TypeError, match="float64 inputs are not cast .* must both be float64 or neither"):
            OPS[op](features, second.float(), k, G, s)


# --- bad inputs -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("op", OPS)
def test_bad_arguments_name_the_argument_and_shapes(op):
    fn, name = OPS[op], SECOND[op]
    features, second = make_inputs(*ODD, op=op)  # features (2, 4, 7, 5), second (2, 18, 4, 3)
    cases = [
        (dict(features=features.numpy()), TypeError, "features must be a torch.Tensor, got ndarray"),
        (dict(second=[1.0]), TypeError, f"{name} must be a torch.Tensor, got list"),
        (dict(features=features[0]), ValueError, r"features must be 4-D \(N, C, H, W\), got shape \(4, 7, 5\)"),
        (dict(features=features.int()), TypeError, "features must be a floating-point tensor, got dtype torch.int32"),
        (dict(second=second.double()), TypeError, f"features and {name} must have the same dtype"),
        (dict(second=second[:1]), ValueError, rf"{name} batch 1 != features batch 2"),
        (dict(second=second[:, :9]), ValueError,
         re.escape(f"{name} must have G*k*k = 2*3*3 = 18 channels, got shape (2, 9, 4, 3) (features (2, 4, 7, 5))")),
        (dict(second=second[:, :, :3]), ValueError,
         re.escape(f"{name} must be ceil(7/2)xceil(5/2) = 4x3 spatially for features (2, 4, 7, 5) and "
                   "scale_factor=2, got shape (2, 18, 3, 3)")),
        (dict(k=2), ValueError, "kernel_size must be odd, got 2"),
        (dict(k="3"), TypeError, "kernel_size must be an int, got str"),
        (dict(G=3), ValueError, re.escape("group_size=3 must divide the channels of features (2, 4, 7, 5)")),
        (dict(G=0), ValueError, "group_size must be >= 1, got 0"),
        (dict(s=0), ValueError, "scale_factor must be >= 1, got 0"),
        (dict(s=2.5), ValueError, "scale_factor must be an integer, got 2.5"),
        (dict(backend="nosuch"), ValueError, "unknown backend 'nosuch'"),
    ]
    for change, error, message in cases:
        args = dict(features=features, second=second, k=3, G=2, s=2, backend="auto") | change
        with pytest.raises(error, match=message):
            fn(args["features"], args["second"], args["k"], args["G"], args["s"], backend=args["backend"])


@pytest.mark.parametrize("backend", ["cpu", "cuda", "triton"])
@pytest.mark.parametrize("op", OPS)
def test_native_backends_refuse_until_their_kernels_land(op, backend):
    features, second = make_inputs(*ODD, op=op)
    name = "carafe_down" if op == "plain" else "carafe_down_fused"
    with pytest.raises(BackendUnavailableError,
                       match=rf"CARAFE backend '{backend}' cannot run this call: has no {name} kernel yet"):
        OPS[op](features, second, 3, 2, 2, backend=backend)


def test_auto_picks_the_reference_and_carafe_keeps_its_backend(monkeypatch):
    """backend="auto" (and CARAFE_BACKEND=auto) runs the down op on the reference even where the cpu
    backend exists; an explicit CARAFE_BACKEND=cpu is refused for it, as the argument is."""
    features, masks = make_inputs(*ODD)
    torch.testing.assert_close(carafe_down(features, masks, 3, 2, 2),
                               carafe_down(features, masks, 3, 2, 2, backend="reference"), rtol=0, atol=0)
    monkeypatch.setenv("CARAFE_BACKEND", "cpu")
    with pytest.raises(BackendUnavailableError, match="'cpu' cannot run this call: has no carafe_down kernel"):
        carafe_down(features, masks, 3, 2, 2)


# --- torch.compile ---------------------------------------------------------------------------------------

def test_compile_fullgraph_matches_eager_and_bad_calls_raise_the_eager_error():
    torch._dynamo.reset()
    N, C, H, W, k, G, s = ODD
    features, logits = make_inputs(*ODD, op="fused")

    def fn(f, lg):
        return carafe_down_fused(f, lg, k, G, s) * 2

    def fwd_bwd(fun):
        f, lg = features.clone().requires_grad_(), logits.clone().requires_grad_()
        out = fun(f, lg)
        out.sum().backward()
        return out.detach(), f.grad, lg.grad

    for a, b in zip(fwd_bwd(torch.compile(fn, fullgraph=True)), fwd_bwd(fn)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

    torch._dynamo.reset()
    bad = logits[:, :, :3]
    message = re.escape("mask_logits must be ceil(7/2)xceil(5/2) = 4x3 spatially")
    with pytest.raises(ValueError, match=message):
        fn(features, bad)
    with pytest.raises(ValueError, match=message):
        torch.compile(fn, fullgraph=True)(features, bad)
    torch._dynamo.reset()
    with pytest.raises(BackendUnavailableError, match="has no carafe_down kernel yet"):
        torch.compile(lambda f, m: carafe_down(f, m, k, G, s, backend="cpu"), fullgraph=True)(features, logits)


def test_compile_dynamic_shapes_bad_call_names_the_op():
    torch._dynamo.reset()
    features, logits = make_inputs(*ODD, op="fused")
    dynamic = torch.compile(lambda f, lg: carafe_down_fused(f, lg, 3, 2, 2), fullgraph=True, dynamic=True)
    torch.testing.assert_close(dynamic(features, logits), carafe_down_fused(features, logits, 3, 2, 2))
    with pytest.raises(ValueError, match=r"carafe_down_fused: invalid arguments \(kernel_size=3, group_size=2, "
                                         r"scale_factor=2\)"):
        dynamic(features, logits[:, :, :3])


def test_compile_downpack_matches_eager():
    torch._dynamo.reset()
    torch.manual_seed(0)
    module = CARAFEDownPack(8, compressed_channels=16, down_kernel=3)
    x = torch.randn(2, 8, 7, 6)
    torch.testing.assert_close(torch.compile(module, fullgraph=True)(x), module(x), rtol=1e-5, atol=1e-5)


# --- FLOPs -------------------------------------------------------------------------------------------------

def test_flops_formula():
    assert carafe_down_flops((2, 8, 7, 5), 5, 2) == 2 * 2 * 8 * 4 * 3 * 25
    assert carafe_down_flops((1, 3, 16, 16), 3, 1) == 2 * 3 * 16 * 16 * 9


# --- CARAFEDownPack ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("size, s", [((16, 16), 2), ((15, 9), 2), ((10, 11), 3), ((1, 1), 2)])
def test_downpack_output_size_is_a_strided_convs(size, s):
    module = CARAFEDownPack(4, scale_factor=s, compressed_channels=8)
    conv = torch.nn.Conv2d(4, 4, 5, stride=s, padding=2)
    x = torch.randn(2, 4, *size)
    assert module(x).shape == conv(x).shape == (2, 4, math.ceil(size[0] / s), math.ceil(size[1] / s))


def test_downpack_parameters_defaults_and_init():
    torch.manual_seed(0)
    module = CARAFEDownPack(32)
    assert (module.scale_factor, module.down_kernel, module.down_group, module.encoder_kernel,
            module.compressed_channels) == (2, 5, 1, 3, 64)
    assert module.channel_compressor.weight.shape == (64, 32, 1, 1)
    assert module.content_encoder.weight.shape == (25, 64, 3, 3)
    assert module.content_encoder.stride == (2, 2) and module.content_encoder.padding == (1, 1)
    assert sum(p.numel() for p in module.parameters()) == (32 * 64 + 64) + (64 * 25 * 9 + 25)
    # mmcv's CARAFEPack initialisation: zero biases, Xavier-uniform compressor, encoder N(0, 0.001).
    assert not module.channel_compressor.bias.any() and not module.content_encoder.bias.any()
    bound = math.sqrt(6 / (32 + 64))
    assert module.channel_compressor.weight.abs().max() <= bound
    assert module.channel_compressor.weight.abs().max() > bound / 2
    assert 0.0005 < module.content_encoder.weight.std() < 0.002
    # So a fresh module is close to 5x5 average pooling (zeros counted).
    x = torch.randn(1, 32, 8, 8)
    torch.testing.assert_close(module(x), F.avg_pool2d(x, 5, stride=2, padding=2), rtol=0.05, atol=0.05)


def test_downpack_groups_and_gradients():
    torch.manual_seed(0)
    module = CARAFEDownPack(8, down_group=4, compressed_channels=8, down_kernel=3)
    assert module.content_encoder.out_channels == 4 * 9
    x = torch.randn(2, 8, 7, 7, requires_grad=True)
    out = module(x)
    assert out.shape == (2, 8, 4, 4)
    out.sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in module.parameters())


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(channels=0), ValueError, "channels must be >= 1, got 0"),
    (dict(down_kernel=4), ValueError, "down_kernel must be odd, got 4"),
    (dict(down_group=3), ValueError, "down_group=3 must divide channels=8"),
    (dict(encoder_kernel=2), ValueError, "encoder_kernel must be odd, got 2"),
    (dict(scale_factor="2"), TypeError, "scale_factor must be an int, got str"),
    (dict(backend="gpu"), ValueError, "unknown backend 'gpu'"),
    (dict(backend="cpu"), ValueError, r"backend='cpu' has no carafe_down kernel yet; use 'auto' or \['reference'\]"),
])
def test_downpack_bad_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        CARAFEDownPack(**({"channels": 8} | kwargs))


def test_downpack_refuses_torchscript():
    with pytest.raises(TypeError, match="CARAFEDownPack does not support torch.jit.script"):
        torch.jit.script(CARAFEDownPack(4))


def test_exported_from_the_package():
    for name in ("carafe_down", "carafe_down_fused", "CARAFEDownPack", "carafe_down_flops"):
        assert name in carafe_kernels.__all__ and hasattr(carafe_kernels, name)


def test_unfold_baseline_agrees():
    """The unfold formulation (the benchmark baseline) computes the public op's function."""
    N, C, H, W, k, G, s = S3
    features, masks = make_inputs(*S3)
    torch.testing.assert_close(carafe_down(features, masks, k, G, s), carafe_down_unfold(features, masks, k, G, s))
