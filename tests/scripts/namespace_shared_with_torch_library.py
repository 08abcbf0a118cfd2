"""csrc/carafe.cpp defines the carafe_kernels namespace with TORCH_LIBRARY (a DEF library); the Triton
ops are Python FRAGMENTs in it. Simulated without the extension (CARAFE_NO_NATIVE=1): a DEF library
with the C++ schema first, then the Triton ops, both usable. Run in a fresh interpreter by
tests/test_triton.py::test_namespace_shared_with_torch_library; argv[1] is the device."""
import importlib.util
import sys
from pathlib import Path

import torch

# The schemas, from carafe_kernels/contract.py loaded on its own: importing the package would register
# the ops before the DEF library below exists, which is the order this script must not have.
spec = importlib.util.spec_from_file_location(
    "contract", Path(__file__).resolve().parents[2] / "carafe_kernels" / "contract.py")
contract = importlib.util.module_from_spec(spec)
spec.loader.exec_module(contract)

lib = torch.library.Library("carafe_kernels", "DEF")  # what TORCH_LIBRARY(carafe_kernels, m) does
lib.define("carafe" + contract.SCHEMAS["carafe"])

import carafe_kernels  # noqa: E402
from carafe_kernels import carafe  # noqa: E402

device = sys.argv[1]
assert not carafe_kernels._native.HAS_NATIVE
f = torch.randn(1, 2, 3, 3, device=device)
m = torch.rand(1, 9, 6, 6, device=device)
out = carafe(f, m, 3, 1, 2, backend="triton")
ref = carafe(f, m, 3, 1, 2, backend="reference")
torch.testing.assert_close(out, ref)
assert hasattr(torch.ops.carafe_kernels, "carafe") and hasattr(torch.ops.carafe_kernels, "triton_carafe")
