"""The backend registry: backend_status(), the "auto" order and its logging, per-call limits."""
from __future__ import annotations

import logging

import pytest
import torch

from carafe_kernels import backend_status, registry
from carafe_kernels.contract import MAX_KERNEL_SIZE, MAX_SCALE_FACTOR
from carafe_kernels.registry import AUTO_ORDER, BACKENDS, Backend, BackendUnavailableError, select_backend


def test_backend_status_keys_and_types():
    status = backend_status()
    assert isinstance(status, dict)
    assert set(status) == {"reference", "cpu", "cuda", "triton"}
    for name, reason in status.items():
        assert reason is None or (isinstance(reason, str) and reason.strip()), f"{name}: {reason!r}"
    assert status["reference"] is None


def test_backend_status_matches_registry():
    assert list(backend_status()) == list(BACKENDS)
    for name, backend in BACKENDS.items():
        assert backend.name == name
        assert callable(backend.carafe) and callable(backend.carafe_fused)
        assert set(backend.device_types()) <= {"cpu", "cuda", "mps", "xpu", "meta"}


def test_auto_order_names_registered_backends():
    for device_type, names in AUTO_ORDER.items():
        assert names and names[-1] == "reference", f"{device_type}: the reference must be the last resort"
        assert set(names) <= set(BACKENDS)


def test_auto_picks_the_first_usable_backend_on_cpu():
    features = torch.randn(1, 4, 3, 3)
    expected = next(name for name in AUTO_ORDER["cpu"]
                    if BACKENDS[name].call_unsupported_reason(features, 3, 2) is None)
    assert select_backend("auto", features, 3, 2).name == expected
    if backend_status()["cpu"] is None:
        assert expected == "cpu"


def test_auto_on_other_devices_falls_back_to_reference():
    features = torch.empty(1, 4, 3, 3, device="meta")
    assert select_backend("auto", features, 3, 2).name == "reference"


def test_auto_logs_each_skip_reason_once(monkeypatch, caplog):
    monkeypatch.setattr(registry, "_logged", set())
    monkeypatch.delenv("CARAFE_BACKEND", raising=False)
    features = torch.randn(1, 4, 3, 3)
    with caplog.at_level(logging.INFO, logger="carafe_kernels"):
        for _ in range(3):
            select_backend("auto", features, 3, 2)
    chosen = select_backend("auto", features, 3, 2).name
    skipped = AUTO_ORDER["cpu"][:AUTO_ORDER["cpu"].index(chosen)]
    messages = [r.getMessage() for r in caplog.records]
    for name in skipped:
        assert sum(f"backend {name!r} skipped" in m for m in messages) == 1, messages
    assert len(messages) == len(skipped)


def _fake_backend(**limits):
    return Backend("fake", lambda: ("cpu",), lambda: None, lambda *a: None, lambda *a: None, **limits)


def test_call_limits_are_reported():
    features = torch.randn(1, 4, 3, 3)
    backend = _fake_backend(max_kernel_size=5, max_scale_factor=4, dtypes=(torch.float32,))
    assert backend.call_unsupported_reason(features, 5, 4) is None
    assert backend.call_unsupported_reason(features, 7, 2) == "supports kernel_size <= 5, got 7"
    assert backend.call_unsupported_reason(features, 3, 8) == "supports scale_factor <= 4, got 8"
    assert backend.call_unsupported_reason(features.double(), 3, 2) == "does not support dtype torch.float64"
    assert backend.call_unsupported_reason(features.to("meta"), 3, 2) == "runs on cpu tensors, got a meta tensor"
    unavailable = Backend("fake", lambda: ("cpu",), lambda: "not built", lambda *a: None, lambda *a: None)
    assert unavailable.call_unsupported_reason(features, 3, 2) == "not built"


def test_explicit_request_over_a_limit_raises(monkeypatch):
    monkeypatch.setitem(BACKENDS, "fake", _fake_backend(max_kernel_size=3))
    with pytest.raises(BackendUnavailableError, match=r"'fake' cannot run this call: supports kernel_size <= 3, got 5"):
        select_backend("fake", torch.randn(1, 4, 3, 3), 5, 2)


@pytest.mark.skipif(backend_status()["cpu"] is not None, reason=f"cpu: {backend_status()['cpu']}")
def test_native_ops_are_registered():
    for name in ("carafe", "carafe_backward", "carafe_fused", "carafe_fused_backward", "carafe_down",
                 "carafe_down_backward", "carafe_down_fused", "carafe_down_fused_backward"):
        assert hasattr(torch.ops.carafe_kernels, name)
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"carafe_kernels::{name}", "CPU")


@pytest.mark.skipif(backend_status()["cpu"] is not None, reason=f"cpu: {backend_status()['cpu']}")
def test_native_limits_equal_the_contract():
    """csrc/carafe_common.h and carafe_kernels/contract.py state the same limits."""
    assert list(torch.ops.carafe_kernels._native_limits()) == [MAX_KERNEL_SIZE, MAX_SCALE_FACTOR]


def test_compiled_backends_use_the_contract_limits():
    for name in ("cpu", "cuda", "triton"):
        assert (BACKENDS[name].max_kernel_size, BACKENDS[name].max_scale_factor) == (MAX_KERNEL_SIZE,
                                                                                    MAX_SCALE_FACTOR), name
    assert BACKENDS["reference"].max_kernel_size is None and BACKENDS["reference"].max_scale_factor is None


def test_availability_is_asked_once(monkeypatch):
    """A call does not re-probe a backend (imports, device queries): the answer is cached."""
    calls = []
    backend = Backend("probe", lambda: ("cpu",), lambda: calls.append(1), lambda *a: None, lambda *a: None)
    monkeypatch.setattr(registry, "_REASONS", {})
    features = torch.randn(1, 4, 3, 3)
    for _ in range(3):
        assert backend.call_unsupported_reason(features, 3, 2) is None
    assert len(calls) == 1
    registry.clear_cache()
    backend.call_unsupported_reason(features, 3, 2)
    assert len(calls) == 2


def test_a_build_without_the_down_ops_is_reported_stale(monkeypatch):
    """A compiled extension from before carafe_down (the op is not registered at all, and asking the
    dispatcher about it raises) is named as a stale build, not an import-time RuntimeError."""
    import torch

    from carafe_kernels import _native
    real = torch._C._dispatch_has_kernel_for_dispatch_key

    def without_down(name, key):
        if name == "carafe_kernels::carafe_down":
            raise RuntimeError("operator carafe_kernels::carafe_down does not exist")
        return real(name, key)
    monkeypatch.setattr(torch._C, "_dispatch_has_kernel_for_dispatch_key", without_down)
    reason = _native._check_built_extension()
    assert reason is not None and "predates the carafe_down kernels" in reason


@pytest.mark.parametrize("has_down", [False, True], ids=["stale", "current"])
def test_a_cuda_library_without_the_down_kernels_is_reported_stale(monkeypatch, has_down):
    """A CUDA library from before the down CUDA kernels, loaded beside a current _C, leaves the cuda
    backend unavailable with a stale-build reason (the registry would route carafe_down to it)."""
    import importlib.machinery
    import sys
    import types

    import torch

    from carafe_kernels import _native
    fake = types.ModuleType("carafe_kernels._C_cuda")
    fake.__file__ = "/site/carafe_kernels/_C_cuda.abi3.so"
    fake.__spec__ = importlib.machinery.ModuleSpec("carafe_kernels._C_cuda", None)
    monkeypatch.setitem(sys.modules, "carafe_kernels._C_cuda", fake)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    real = torch._C._dispatch_has_kernel_for_dispatch_key

    def cuda_kernels(name, key):
        if key == "CUDA":
            return has_down or name != "carafe_kernels::carafe_down"
        return real(name, key)
    monkeypatch.setattr(torch._C, "_dispatch_has_kernel_for_dispatch_key", cuda_kernels)
    reason = _native._load_cuda_library()
    if has_down:
        assert reason is None
    else:
        assert reason is not None and "_C_cuda.abi3.so predates the carafe_down kernels" in reason
