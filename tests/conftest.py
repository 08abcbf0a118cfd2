"""Shared test settings: the (backend, device) cases every CARAFE test is parametrised over, and the
one tolerance table. Unavailable backends are skipped with the reason backend_status() gives."""
from __future__ import annotations

import os

import pytest
import torch

from carafe_kernels import backend_status

# (rtol, atol) of a backend's result against the float64 oracle, by the dtype the backend ran in.
# For fp16/bf16 the tests also require the error to be at most 2x that of the reference run in the
# same dtype (DESIGN §4); these bounds are the outer safety net.
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


def shape_id(N, C, H, W, k, G, s) -> str:
    """Readable test ids such as N2-C64-H7-W5-k5-g4-s2."""
    return f"N{N}-C{C}-H{H}-W{W}-k{k}-g{G}-s{s}"
