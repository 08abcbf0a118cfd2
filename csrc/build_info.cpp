// The torch version this library was compiled against. A C++ extension is tied to the torch headers it
// was built with (no stable ABI across torch releases): carafe_kernels/_native.py compares this with the
// running torch and turns a mismatch into a clear reason in backend_status() instead of a wrong symbol
// or a crash later.
#include <torch/library.h>
#include <torch/version.h>

#include <string>

namespace {

std::string built_with_torch() {
  return TORCH_VERSION;  // "MAJOR.MINOR.PATCH" of the headers (torch's local tag, e.g. +cpu, is not in them)
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(carafe_kernels, m) {
  m.def("_built_with_torch() -> str", &built_with_torch);
}
