// What this library was built for, read by carafe_kernels/_native.py after loading it:
//   _stable_abi_target() -> int   the TORCH_TARGET_VERSION it was compiled for (0x020a000000000000 for
//                                 torch 2.10): the oldest torch it runs on. It uses only the stable C shim
//                                 of that release (tests/test_stable_abi.py checks the symbols), so it
//                                 loads on that torch and every later one; _native.py refuses an older
//                                 torch with that reason before loading (the shim symbols would be missing).
//   _built_with_torch() -> str    the torch whose headers compiled it, for reports only: with the stable
//                                 ABI it no longer has to match the running torch.
#include <torch/csrc/stable/library.h>
#include <torch/headeronly/version.h>

#include <cstdint>
#include <string>

#ifndef TORCH_TARGET_VERSION
#error "build with -DTORCH_TARGET_VERSION=... (setup.py passes the target of carafe_kernels/_abi.py)"
#endif

namespace {

int64_t stable_abi_target() { return static_cast<int64_t>(TORCH_TARGET_VERSION); }

std::string built_with_torch() {
  return TORCH_VERSION;  // "MAJOR.MINOR.PATCH" of the headers (torch's local tag, e.g. +cpu, is not in them)
}

}  // namespace

STABLE_TORCH_LIBRARY_FRAGMENT(carafe_kernels, m) {
  m.def("_stable_abi_target() -> int");
  m.def("_built_with_torch() -> str");
}

STABLE_TORCH_LIBRARY_IMPL(carafe_kernels, CompositeExplicitAutograd, m) {
  m.impl("_stable_abi_target", TORCH_BOX(&stable_abi_target));
  m.impl("_built_with_torch", TORCH_BOX(&built_with_torch));
}
