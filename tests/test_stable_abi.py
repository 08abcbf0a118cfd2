"""The compiled libraries stay on PyTorch's stable ABI (docs/design.md#the-build): every torch symbol
they need is a C function of the stable shim (aoti_torch_*, torch_*), never an ATen/c10 C++ symbol,
whose mangled name and layout change between torch releases. This is what lets one build run on every
torch from the target (carafe_kernels/_abi.py) up, so a regression (an <ATen/...> include, a c10 call)
fails here rather than on a user's newer torch.

Also: the CPU library _C needs none of torch's CUDA libraries (it must load beside a CPU-only torch),
nor libtorch_python (the Python side is the limited API: the wheel is abi3)."""
from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from carafe_kernels._abi import STABLE_ABI_TARGET, target_version_macro

# Undefined symbols that name a C++ entity of torch's libraries (demangled).
TORCH_CXX = re.compile(r"(^|[^\w:])(c10|at|torch|caffe2|aten)::")
# torch's C symbols that are the stable shim.
STABLE_SHIM = re.compile(r"^(aoti_torch_|torch_)")
# Libraries the CPU library must not need.
CUDA_OR_PYTHON_LIBS = re.compile(r"^lib(c10_cuda|torch_cuda|cudart|torch_python)\b")


def abi_violations(undefined: list[str]) -> list[str]:
    """The demangled undefined symbols that are torch C++ symbols, i.e. not the stable C shim."""
    return [s for s in undefined if TORCH_CXX.search(s) and not STABLE_SHIM.match(s)]


def _library(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    return Path(spec.origin) if spec is not None and spec.origin else None


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} (binutils) is not installed")
    return path


def undefined_symbols(lib: Path) -> list[str]:
    out = subprocess.run([_tool("nm"), "-D", "--undefined-only", "--demangle", str(lib)], capture_output=True,
                         text=True, check=True).stdout
    # lines: "                 U name" (weak: "w name")
    return [line.split(None, 1)[1].strip() for line in out.splitlines() if line.strip()]


def needed_libraries(lib: Path) -> list[str]:
    out = subprocess.run([_tool("readelf"), "-d", str(lib)], capture_output=True, text=True, check=True).stdout
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out)


LIBRARIES = ["carafe_kernels._C", "carafe_kernels._C_cuda"]


@pytest.mark.parametrize("module", LIBRARIES)
def test_library_needs_only_the_stable_c_shim(module):
    lib = _library(module)
    if lib is None:
        pytest.skip(f"{module} is not built")
    undefined = undefined_symbols(lib)
    assert any(STABLE_SHIM.match(s) for s in undefined), f"{lib} uses no stable shim function: not a torch build?"
    bad = abi_violations(undefined)
    assert not bad, (f"{lib.name} needs {len(bad)} ATen/c10 C++ symbol(s) outside the stable C shim, so it is "
                     f"tied to the torch release it was built with: {bad[:10]}")


def test_cpu_library_loads_without_torchs_cuda_or_python_libraries():
    lib = _library("carafe_kernels._C")
    if lib is None:
        pytest.skip("carafe_kernels._C is not built")
    assert ".abi3." in lib.name, f"{lib.name} is not a limited-API (abi3) module"
    needed = needed_libraries(lib)
    assert not [n for n in needed if CUDA_OR_PYTHON_LIBS.match(n)], needed


def test_the_check_catches_torch_cxx_symbols():
    """The rule itself: what a non-stable build needs (taken from the pre-port library) is caught, the
    stable shim and the C++ runtime are not."""
    assert abi_violations([
        "c10::detail::torchCheckFail(char const*, char const*, unsigned int, char const*)",
        "at::_ops::empty_memory_format::call(c10::ArrayRef<c10::SymInt>, std::optional<c10::ScalarType>)",
        "torch::Library::_def(c10::FunctionSchema&&, c10::OperatorName*, std::vector<at::Tag>, _RegisterOrVerify)",
        "at::get_num_threads()",
    ]) == [
        "c10::detail::torchCheckFail(char const*, char const*, unsigned int, char const*)",
        "at::_ops::empty_memory_format::call(c10::ArrayRef<c10::SymInt>, std::optional<c10::ScalarType>)",
        "torch::Library::_def(c10::FunctionSchema&&, c10::OperatorName*, std::vector<at::Tag>, _RegisterOrVerify)",
        "at::get_num_threads()",
    ]
    assert abi_violations(["aoti_torch_get_sizes", "torch_parallel_for", "torch_call_dispatcher",
                           "std::runtime_error::runtime_error(char const*)", "PyModule_Create2",
                           "cudaDeviceGetAttribute"]) == []


def test_target_version_macro_is_torchs_encoding():
    # torch/csrc/stable/version.h: ((major) << 56) | ((minor) << 48); 0x020a000000000000 is 2.10.
    assert target_version_macro((2, 10)) == "0x020a000000000000"
    assert target_version_macro((2, 13)) == "0x020d000000000000"
    assert STABLE_ABI_TARGET >= (2, 10)
