"""Shared test settings: the (backend, device) cases every CARAFE test is parametrised over, the one
tolerance table, readable shape ids, and the input/oracle helpers the test files share.
Unavailable backends are skipped with the reason backend_status() gives."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

try:
    import carafe_kernels  # noqa: F401
except ModuleNotFoundError:  # running `pytest` from a checkout that is not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from carafe_kernels import backend_status, carafe, carafe_fused  # noqa: E402
from carafe_kernels.reference import carafe_fused_reference, carafe_reference  # noqa: E402

# (rtol, atol) of a backend's result against the float64 oracle, by the dtype the backend ran in.
# For fp16/bf16 the tests also require the error to be at most 2x that of the reference run in the
# same dtype (docs/design.md#test-tolerances); these bounds are the outer safety net.
TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=1e-2, atol=1e-2),
    torch.bfloat16: dict(rtol=5e-2, atol=5e-2),
}

TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HAS_CUDA = torch.cuda.is_available()


def _case(backend: str, device: str, *, extra_reason: str | None = None):
    reason = backend_status()[backend] or extra_reason
    if device == "cuda" and not HAS_CUDA:
        reason = reason or "no CUDA device"
    marks = [pytest.mark.skipif(reason is not None, reason=f"{backend}: {reason}")]
    if backend == "triton":
        marks.append(pytest.mark.triton)
    return pytest.param(backend, device, id=f"{backend}-{device}", marks=marks)


def backend_cases(*, include_triton_interpret: bool = False) -> list:
    """pytest params of (backend, device). The Triton interpreter on CPU is slow, so the general suite
    skips it (tests/test_triton.py covers it on small shapes) unless include_triton_interpret."""
    cases = [_case("reference", "cpu"), _case("cpu", "cpu"), _case("reference", "cuda"), _case("cuda", "cuda")]
    if HAS_CUDA:
        cases.append(_case("triton", "cuda"))
    elif TRITON_INTERPRET and include_triton_interpret:
        cases.append(_case("triton", "cpu"))
    else:
        cases.append(_case("triton", "cuda", extra_reason=None if TRITON_INTERPRET else
                           "no CUDA device and TRITON_INTERPRET is not set"))
    return cases


def native_backend_cases() -> list:
    """The backend_cases() whose backends are compiled kernels (everything but the reference)."""
    return [case for case in backend_cases() if case.values[0] != "reference"]


def shape_id(N, C, H, W, k, G, s) -> str:
    """Readable test ids such as N2-C64-H7-W5-k5-g4-s2."""
    return f"N{N}-C{C}-H{H}-W{W}-k{k}-g{G}-s{s}"


# ---------------------------------------------------------------------------------------------------
# Inputs, the oracle and error measures shared by the test files.
# ---------------------------------------------------------------------------------------------------

OPS = ("plain", "fused")


def mask_shape(N, C, H, W, k, G, s, *, fused: bool) -> tuple[int, int, int, int]:
    """Shape of the second input: masks (N, G*k*k, H*s, W*s) or logits (N, G*k*k*s*s, H, W)."""
    return (N, G * k * k * s * s, H, W) if fused else (N, G * k * k, H * s, W * s)


def make_inputs(N, C, H, W, k, G, s, *, fused: bool, dtype=torch.float32, device="cpu", seed: int = 0):
    """Random (features, masks_or_logits), float64 values rounded to dtype. Plain masks are softmax-
    normalised (realistic magnitudes ~1/k^2, as CARAFEPack feeds them); fused logits are N(0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(N, C, H, W, generator=gen, dtype=torch.float64)
    second = torch.randn(*mask_shape(N, C, H, W, k, G, s, fused=fused), generator=gen, dtype=torch.float64)
    if not fused:
        n, c, h, w = second.shape
        second = second.view(n, G, k * k, h, w).softmax(dim=2).view(n, c, h, w)
    return features.to(device=device, dtype=dtype), second.to(device=device, dtype=dtype)


def run_op(op: str, backend: str, features, second, k, G, s):
    """The public function of op ("plain" -> carafe, "fused" -> carafe_fused) on an explicit backend."""
    fn = carafe_fused if op == "fused" else carafe
    return fn(features, second, k, G, s, backend=backend)


def reference_op(op: str):
    return carafe_fused_reference if op == "fused" else carafe_reference


def forward_backward(fn, features, second, grad_out=None):
    """(out, grad_features, grad_second) of fn(features, second) for grad_out (default: a fixed random
    tensor), on leaf copies of the inputs (their layout kept)."""
    features = features.detach().requires_grad_(True)
    second = second.detach().requires_grad_(True)
    out = fn(features, second)
    if grad_out is None:
        gen = torch.Generator().manual_seed(1234)
        grad_out = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out)
    grad_features, grad_second = torch.autograd.grad(out, (features, second), grad_out, allow_unused=True)
    return out.detach(), grad_features, grad_second


def gradient_of_one(fn, features, second, wanted: int, grad_out):
    """The gradient of fn(features, second) for grad_out w.r.t. features (wanted=0) or second (1) alone:
    the other input does not require grad, so the backward computes only this one (output_mask)."""
    leaves = (features.detach().requires_grad_(wanted == 0), second.detach().requires_grad_(wanted == 1))
    (grad,) = torch.autograd.grad(fn(*leaves), (leaves[wanted],), grad_out)
    return grad


def oracle(op: str, features, second, k, G, s, grad_out=None):
    """Float64 CPU reference of forward and both gradients, on the same (already rounded) input values."""
    f64 = features.detach().to("cpu", torch.float64)
    m64 = second.detach().to("cpu", torch.float64)
    g64 = None if grad_out is None else grad_out.detach().to("cpu", torch.float64)
    ref = reference_op(op)
    return forward_backward(lambda f, m: ref(f, m, k, G, s), f64, m64, g64)


def max_abs_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| in float64 (0 for empty tensors); NaN anywhere counts as infinite."""
    if actual.numel() == 0:
        return 0.0
    diff = (actual.detach().to("cpu", torch.float64) - expected.detach().to("cpu", torch.float64)).abs()
    return float("inf") if torch.isnan(diff).any() else float(diff.max())


def assert_close_to_oracle(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str,
                           reference_err: float | None = None) -> None:
    """actual (computed in dtype) vs the float64 oracle: within TOLERANCES[dtype], and for fp16/bf16 also
    at most 2x the error of the reference run in the same dtype (reference_err) plus one ulp-scale slack."""
    assert actual.dtype == dtype, f"{what}: dtype {actual.dtype}, expected {dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    # atol scales with the tensor's largest magnitude (at least 1): mask gradients are sums over the C/G
    # channels of a group and grow with them, and a low-precision sum's error grows with its size.
    scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.detach().to("cpu", torch.float64), expected.to(torch.float64),
                               rtol=tol["rtol"], atol=tol["atol"] * scale,
                               msg=lambda m: f"{what} ({dtype}, atol scaled by {scale:.3g}): {m}")
    if reference_err is not None:
        err = max_abs_err(actual, expected)
        # Slack: one unit in the last place of the largest value, so a reference that happens to be
        # exact on tiny shapes does not make the bound zero.
        slack = torch.finfo(dtype).eps * scale
        assert err <= 2 * reference_err + slack, (
            f"{what} ({dtype}): max error {err:.3g} vs the float64 oracle exceeds 2x the reference's "
            f"{reference_err:.3g} in the same dtype")


def to_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values in another memory layout: contiguous, channels_last, strided (a view of every
    other column of a wider buffer: no dense stride pattern at all) or transposed (H and W swapped in
    memory)."""
    if layout == "contiguous":
        return t.contiguous()
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "strided":
        n, c, h, w = t.shape
        buf = torch.full((n, c, h, 2 * w), float("nan"), dtype=t.dtype, device=t.device)
        buf[..., ::2] = t
        out = buf[..., ::2]
        assert not out.is_contiguous() or t.numel() <= 1
        return out
    if layout == "transposed":
        return t.transpose(2, 3).contiguous().transpose(2, 3)
    raise ValueError(layout)


@pytest.fixture
def single_thread():
    """Run a test on one intra-op thread (the test machine is shared), restoring the count after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
