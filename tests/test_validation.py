"""Every bad input raises ValueError/TypeError naming the argument (checked with match=), before any
backend runs; backend requests (argument, CARAFE_BACKEND) run or raise an error that says why."""
from __future__ import annotations

import os
import re

import numpy as np
import pytest
import torch

from carafe_kernels import CARAFE, BackendUnavailableError, CARAFEPack, backend_status, carafe, carafe_fused
from carafe_kernels import registry

# A valid call: C=4, k=3, G=2, s=2 on a 3x3 image.
K, G, S = 3, 2, 2


def _good(fused: bool):
    features = torch.randn(1, 4, 3, 3)
    second = torch.randn(1, G * K * K * S * S, 3, 3) if fused else torch.rand(1, G * K * K, 6, 6)
    return features, second


def _call(fused, features, second, k=K, g=G, s=S, **kwargs):
    return (carafe_fused if fused else carafe)(features, second, k, g, s, **kwargs)


# (id, mutate(features, second, fused) -> (features, second, k, G, s), exception, message regex;
#  "{m}" in the regex stands for "masks" or "mask_logits")
BAD_INPUTS = [
    ("features-3d", lambda f, m, fu: (f[0], m, K, G, S), ValueError, r"features must be 4-D .* got shape \(4, 3, 3\)"),
    ("features-5d", lambda f, m, fu: (f[None], m, K, G, S), ValueError, r"features must be 4-D"),
    ("masks-3d", lambda f, m, fu: (f, m[0], K, G, S), ValueError, r"{m} must be 4-D"),
    ("features-int", lambda f, m, fu: (f.long(), m, K, G, S), TypeError, r"features must be a floating-point .*int64"),
    ("features-bool", lambda f, m, fu: (f > 0, m, K, G, S), TypeError, r"features must be a floating-point"),
    ("masks-int", lambda f, m, fu: (f, m.int(), K, G, S), TypeError, r"{m} must be a floating-point"),
    ("masks-complex", lambda f, m, fu: (f, m.to(torch.complex64), K, G, S), TypeError, r"{m} must be a floating-point"),
    ("features-numpy", lambda f, m, fu: (f.numpy(), m, K, G, S), TypeError,
     r"features must be a torch.Tensor, got ndarray"),
    ("features-list", lambda f, m, fu: (f.tolist(), m, K, G, S), TypeError,
     r"features must be a torch.Tensor, got list"),
    ("masks-none", lambda f, m, fu: (f, None, K, G, S), TypeError, r"{m} must be a torch.Tensor, got NoneType"),
    ("kernel-even", lambda f, m, fu: (f, m, 4, G, S), ValueError, r"kernel_size must be odd, got 4"),
    ("kernel-zero", lambda f, m, fu: (f, m, 0, G, S), ValueError, r"kernel_size must be >= 1, got 0"),
    ("kernel-negative", lambda f, m, fu: (f, m, -3, G, S), ValueError, r"kernel_size must be >= 1, got -3"),
    ("kernel-str", lambda f, m, fu: (f, m, "3", G, S), TypeError, r"kernel_size must be an int, got str"),
    ("kernel-fraction", lambda f, m, fu: (f, m, 3.5, G, S), ValueError, r"kernel_size must be an integer, got 3.5"),
    ("kernel-tensor", lambda f, m, fu: (f, m, torch.tensor(3), G, S), TypeError, r"kernel_size must be an int"),
    ("scale-fraction", lambda f, m, fu: (f, m, K, G, 1.5), ValueError, r"scale_factor must be an integer, got 1.5"),
    ("scale-zero", lambda f, m, fu: (f, m, K, G, 0), ValueError, r"scale_factor must be >= 1, got 0"),
    ("scale-bool", lambda f, m, fu: (f, m, K, G, True), TypeError, r"scale_factor must be an int, got bool"),
    ("scale-none", lambda f, m, fu: (f, m, K, G, None), TypeError, r"scale_factor must be an int, got NoneType"),
    ("group-zero", lambda f, m, fu: (f, m, K, 0, S), ValueError, r"group_size must be >= 1, got 0"),
    ("group-not-dividing", lambda f, m, fu: (f, m, K, 3, S), ValueError,
     r"group_size=3 must divide the channels of features \(1, 4, 3, 3\)"),
    ("masks-channels", lambda f, m, fu: (f, m[:, :-1], K, G, S), ValueError, r"{m} must have G\*k\*k.* channels"),
    ("masks-channels-for-other-k", lambda f, m, fu: (f, m, 5, G, S), ValueError, r"{m} must have G\*k\*k.* channels"),
    ("masks-spatial", lambda f, m, fu: (f, m[..., :-1], K, G, S), ValueError, r"{m} must be \d+x\d+ spatially"),
    ("masks-spatial-for-other-s", lambda f, m, fu: (f, m, K, G, 1), ValueError,
     r"{m} must have G\*k\*k.* channels|{m} must be 3x3 spatially"),
    ("masks-batch", lambda f, m, fu: (f, torch.cat([m, m]), K, G, S), ValueError, r"{m} batch 2 != features batch 1"),
    ("device-mismatch", lambda f, m, fu: (f, m.to("meta"), K, G, S), ValueError,
     r"features and {m} must be on the same device, got cpu and meta"),
    ("dtype-mismatch", lambda f, m, fu: (f, m.double(), K, G, S), TypeError,
     r"features and {m} must have the same dtype .*float32 and torch.float64"),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=lambda c: c[0])
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_bad_input_raises_naming_the_argument(fused, case):
    _, mutate, exc, pattern = case
    features, second, k, g, s = mutate(*_good(fused), fused)
    pattern = pattern.replace("{m}", "mask_logits" if fused else "masks")
    with pytest.raises(exc, match=pattern):
        _call(fused, features, second, k, g, s)


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_integral_floats_and_numpy_ints_are_accepted(fused):
    features, second = _good(fused)
    expected = _call(fused, features, second, backend="reference")
    got = _call(fused, features, second, np.int64(K), 2.0, np.int32(S), backend="reference")
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_unknown_backend(fused):
    with pytest.raises(ValueError, match=r"unknown backend 'cudnn'; choose one of"):
        _call(fused, *_good(fused), backend="cudnn")
    with pytest.raises(TypeError, match=r"backend must be a str, got int"):
        _call(fused, *_good(fused), backend=1)


@pytest.mark.parametrize("name", ["cpu", "cuda", "triton"])
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_unavailable_backend_raises_with_reason(fused, name):
    """An explicit request for a backend that cannot run here says why (backend_status()'s reason)."""
    reason = backend_status()[name]
    if reason is None:
        pytest.skip(f"{name} is available here")
    pattern = rf"CARAFE backend '{name}' cannot run this call: {re.escape(reason)}"
    with pytest.raises(BackendUnavailableError, match=pattern):
        _call(fused, *_good(fused), backend=name)


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_backend_on_wrong_device_raises(fused):
    """'cuda' on CPU tensors: unavailable here, or available but on the wrong device; both say why."""
    reason = backend_status()["cuda"]
    pattern = re.escape(reason) if reason else r"runs on cuda tensors, got a cpu tensor"
    with pytest.raises(BackendUnavailableError, match=pattern):
        _call(fused, *_good(fused), backend="cuda")


def test_backend_unavailable_error_is_a_runtime_error():
    assert issubclass(BackendUnavailableError, RuntimeError)


def test_validation_runs_before_backend_selection():
    """A bad argument is reported as such even when the requested backend is unavailable."""
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        carafe(torch.randn(1, 4, 3, 3), torch.rand(1, 32, 6, 6), 4, 2, 2, backend="cuda")


# --- CARAFE_BACKEND ---------------------------------------------------------------------------------------

def test_env_var_is_read(monkeypatch):
    monkeypatch.setenv("CARAFE_BACKEND", "cudnn")
    # the message names the variable: the call itself named no backend
    with pytest.raises(ValueError, match="unknown backend 'cudnn' from the environment variable CARAFE_BACKEND; "
                                         "choose one of"):
        carafe_fused(*_good(True), K, G, S)


def test_env_var_selects_backend(monkeypatch):
    features, _ = _good(False)
    monkeypatch.setenv("CARAFE_BACKEND", "reference")
    assert registry.select_backend("auto", features, K, S).name == "reference"
    monkeypatch.setenv("CARAFE_BACKEND", "cuda")
    with pytest.raises(BackendUnavailableError, match="CARAFE backend 'cuda' cannot run this call"):
        carafe(*_good(False), K, G, S)


def test_env_var_change_takes_effect_at_the_next_identical_call(monkeypatch):
    """The planned outcome of a call is cached per metadata; the variable's value is part of that key,
    read on every call (os.environ.__setitem__, setenv and delenv all count)."""
    features, masks = _good(False)
    monkeypatch.delenv("CARAFE_BACKEND", raising=False)
    carafe(features, masks, K, G, S)                       # planned and cached without the variable
    monkeypatch.setenv("CARAFE_BACKEND", "cudnn")
    with pytest.raises(ValueError, match="from the environment variable CARAFE_BACKEND"):
        carafe(features, masks, K, G, S)
    os.environ["CARAFE_BACKEND"] = "reference"
    torch.testing.assert_close(carafe(features, masks, K, G, S), carafe(features, masks, K, G, S, backend="reference"))
    del os.environ["CARAFE_BACKEND"]
    carafe(features, masks, K, G, S)


def test_explicit_argument_beats_env_var(monkeypatch):
    monkeypatch.setenv("CARAFE_BACKEND", "cudnn")
    features, masks = _good(False)
    assert registry.select_backend("reference", features, K, S).name == "reference"
    carafe(features, masks, K, G, S, backend="reference")


def test_empty_env_var_means_auto(monkeypatch):
    monkeypatch.setenv("CARAFE_BACKEND", "")
    features, _ = _good(False)
    expected = "cpu" if backend_status()["cpu"] is None else "reference"
    assert registry.select_backend("auto", features, K, S).name == expected


def test_env_var_reaches_modules(monkeypatch):
    """Modules with backend="auto" read CARAFE_BACKEND when built (failing early) and on every call."""
    monkeypatch.setenv("CARAFE_BACKEND", "cudnn")
    with pytest.raises(ValueError, match="unknown backend 'cudnn'"):
        CARAFEPack(4, 2, up_kernel=3)
    monkeypatch.delenv("CARAFE_BACKEND")
    module = CARAFEPack(4, 2, up_kernel=3)
    monkeypatch.setenv("CARAFE_BACKEND", "cudnn")
    with pytest.raises(ValueError, match="unknown backend 'cudnn'"):
        module(torch.randn(1, 4, 3, 3))


# --- module constructors ------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, kwargs, exc, pattern", [
    ((4, 1, 2), {}, ValueError, "kernel_size must be odd"),
    ((3, 0, 2), {}, ValueError, "group_size must be >= 1"),
    ((3, 1, 1.5), {}, ValueError, "scale_factor must be an integer"),
    ((3, 1, 2), {"backend": "cudnn"}, ValueError, "unknown backend 'cudnn'"),
], ids=["even-kernel", "zero-group", "fractional-scale", "unknown-backend"])
def test_carafe_module_validates_arguments(args, kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        CARAFE(*args, **kwargs)


@pytest.mark.parametrize("kwargs, exc, pattern", [
    (dict(channels=8, scale_factor=2, up_kernel=4), ValueError, "up_kernel must be odd"),
    (dict(channels=8, scale_factor=2, up_group=3), ValueError, "up_group=3 must divide channels=8"),
    (dict(channels=8, scale_factor=0), ValueError, "scale_factor must be >= 1"),
    (dict(channels=0, scale_factor=2), ValueError, "channels must be >= 1"),
    (dict(channels=8, scale_factor=2, encoder_kernel=2), ValueError, "encoder_kernel must be odd"),
    (dict(channels=8, scale_factor=2, compressed_channels="64"), TypeError, "compressed_channels must be an int"),
    (dict(channels=8, scale_factor=2, backend="cudnn"), ValueError, "unknown backend 'cudnn'"),
], ids=["even-up-kernel", "group-not-dividing", "zero-scale", "zero-channels", "even-encoder", "str-channels",
        "unknown-backend"])
def test_carafepack_validates_arguments(kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        CARAFEPack(**kwargs)


def test_carafepack_wrong_input_channels():
    module = CARAFEPack(8, 2, up_kernel=3)
    with pytest.raises(RuntimeError):  # nn.Conv2d's own error, before CARAFE runs
        module(torch.randn(1, 4, 3, 3))


# --- direct op calls (callers of torch.ops skip the Python validation) ---------------------------------------

NATIVE_REASON = backend_status()["cpu"]


@pytest.mark.skipif(NATIVE_REASON is not None, reason=f"cpu: {NATIVE_REASON}")
@pytest.mark.parametrize("args, exc, pattern", [
    ((torch.randn(1, 4, 3, 3), torch.rand(1, 169, 6, 6), 13, 1, 2), ValueError,
     r"kernel_size must be odd and in \[1, 11\] for the native kernels, got 13"),
    ((torch.randn(1, 4, 3, 3), torch.rand(1, 9, 27, 27), 3, 1, 9), ValueError,
     r"scale_factor must be in \[1, 8\] for the native kernels, got 9"),
    # A dtype is a ValueError here, not the contract's TypeError: the stable ABI lets a kernel throw only
    # standard C++ exceptions, and none becomes a TypeError (docs/design.md#the-build). The Python entry
    # points raise the TypeError (test_direct_op_dtype_errors_are_typeerrors_through_the_public_api).
    ((torch.randn(1, 4, 3, 3), torch.rand(1, 9, 6, 6).double(), 3, 1, 2), ValueError,
     r"features and masks must have the same dtype, got float32 and float64"),
    ((torch.randn(1, 4, 3, 3).long(), torch.rand(1, 9, 6, 6).long(), 3, 1, 2), ValueError,
     r"features must be float32, float64, float16 or bfloat16, got Long"),
    ((torch.randn(1, 4, 3, 3), torch.rand(1, 9, 6, 5), 3, 1, 2), ValueError, r"masks must have shape \[1, 9, 6, 6\]"),
], ids=["k13", "s9", "dtype-mismatch", "int-dtype", "masks-shape"])
def test_native_op_checks_with_the_contracts_exception_types(args, exc, pattern):
    """The C++ checks (csrc/carafe_checks.h): a ValueError naming the argument, never a crash, and the
    contract's limits on the cpu backend too (its scratch memory grows as k^3)."""
    with pytest.raises(exc, match=pattern):
        torch.ops.carafe_kernels.carafe(*args)


@pytest.mark.skipif(NATIVE_REASON is not None, reason=f"cpu: {NATIVE_REASON}")
def test_direct_op_dtype_errors_are_typeerrors_through_the_public_api():
    features, masks = torch.randn(1, 4, 3, 3), torch.rand(1, 9, 6, 6).double()
    with pytest.raises(TypeError, match="same dtype"):
        carafe(features, masks, 3, 1, 2, backend="cpu")


@pytest.mark.skipif(NATIVE_REASON is not None, reason=f"cpu: {NATIVE_REASON}")
def test_cpu_backend_limits_and_auto_fallback():
    """Beyond the limits, an explicit 'cpu' says why and 'auto' runs the reference."""
    features, masks = torch.randn(1, 2, 3, 3), torch.rand(1, 169, 6, 6)
    with pytest.raises(BackendUnavailableError,
                       match=r"'cpu' cannot run this call: supports kernel_size <= 11, got 13"):
        carafe(features, masks, 13, 1, 2, backend="cpu")
    assert registry.select_backend("auto", features, 13, 2).name == "reference"
    torch.testing.assert_close(carafe(features, masks, 13, 1, 2),
                               carafe(features, masks, 13, 1, 2, backend="reference"))


def test_repeated_calls_are_validated_once(monkeypatch):
    """The checks and the backend choice depend only on the call's metadata, so a repeated call reuses
    them; any change in that metadata (shape, argument type, environment) is validated anew."""
    from carafe_kernels import functional

    calls = []
    real = functional.check_arguments
    monkeypatch.setattr(functional, "check_arguments", lambda *a, **kw: (calls.append(1), real(*a, **kw)))
    monkeypatch.setattr(functional, "_PLANS", {})
    monkeypatch.delenv("CARAFE_BACKEND", raising=False)
    features, masks = _good(False)
    for _ in range(3):
        carafe(features, masks, K, G, S)
    assert len(calls) == 1
    carafe(features[:, :, :2], masks[:, :, :4], K, G, S)
    assert len(calls) == 2
    with pytest.raises(TypeError, match="kernel_size must be an int, got bool"):
        carafe(features, torch.rand(1, 2, 6, 6), True, G, S)
    with pytest.raises(ValueError, match=r"masks must have G\*k\*k"):
        carafe(features, masks[:, :-1], K, G, S)
    monkeypatch.setenv("CARAFE_BACKEND", "cudnn")
    with pytest.raises(ValueError, match="unknown backend 'cudnn'"):
        carafe(features, masks, K, G, S)


# --- torch.compile(fullgraph=True) -----------------------------------------------------------------------

def test_compiled_bad_call_raises_the_eager_error():
    """Dynamo cannot trace a raise (fullgraph=True made it torch._dynamo.exc.Unsupported): the compiled
    call raises the eager ValueError / TypeError, with the eager message where the shapes are static."""
    torch._dynamo.reset()
    features, masks = _good(False)
    bad_masks = masks[:, :-1]

    def fn(f, m):
        return carafe(f, m, K, G, S) * 2  # code after the call traces on

    eager_message = re.escape("masks must have G*k*k = 2*3*3 = 18 channels, got shape (1, 17, 6, 6)")
    with pytest.raises(ValueError, match=eager_message):
        fn(features, bad_masks)
    for requires_grad in (False, True):  # (each compiled afresh: a changed shape would make it dynamic)
        torch._dynamo.reset()
        with pytest.raises(ValueError, match=eager_message):
            torch.compile(fn, fullgraph=True)(features.detach().requires_grad_(requires_grad), bad_masks)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(fn, fullgraph=True)(features, masks), fn(features, masks))
    torch._dynamo.reset()
    with pytest.raises(TypeError, match="features and masks must have the same dtype"):
        torch.compile(fn, fullgraph=True)(features, masks.double())
    torch._dynamo.reset()
    dynamic = torch.compile(fn, fullgraph=True, dynamic=True)
    with pytest.raises(ValueError, match=r"carafe: invalid arguments \(kernel_size=3, group_size=2, "
                                         r"scale_factor=2\) for the input shapes; torch.compile traced them with "
                                         r"dynamic shapes"):
        dynamic(features.detach(), bad_masks)
