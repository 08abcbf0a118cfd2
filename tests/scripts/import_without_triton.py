"""`import carafe_kernels` works without Triton (carafe_kernels.triton imports it lazily; torch itself
may try to, guarded); the backend then says why, and "auto" still works. Run in a fresh interpreter by
tests/test_triton.py::test_import_without_triton_installed."""
import sys

sys.modules["triton"] = None  # as if Triton were not installed: `import triton` raises ImportError

import torch  # noqa: E402

import carafe_kernels  # noqa: E402, F401
from carafe_kernels import backend_status, carafe  # noqa: E402

assert "Triton is not installed" in backend_status()["triton"], backend_status()["triton"]
out = carafe(torch.randn(1, 2, 3, 3), torch.rand(1, 9, 6, 6), 3, 1, 2)
assert out.shape == (1, 2, 6, 6)
