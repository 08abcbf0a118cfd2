// The schemas of every carafe_kernels op, declared once. Kernels attach per device in
// cpu/carafe_cpu.cpp (CPU) and cuda/carafe_cuda.cpp (CUDA); autograd, fake tensors and autocast
// are registered from Python (carafe_kernels/ops.py), so every caller of the dispatcher gets them.
//
// The same schemas are in carafe_kernels/contract.py (SCHEMAS), for the ops defined in Python (Triton
// and the tests' stand-in); tests/test_ops.py checks that every registered op matches them.
//
// Introspection ops, not part of the CARAFE contract: _native_limits() -> [max kernel_size, max
// scale_factor] (carafe_common.h; tests compare it with carafe_kernels/contract.py), and in
// cpu/carafe_cpu.cpp _cpu_kernel_isa() (the instruction set the CPU kernels were dispatched to) and
// _cpu_last_call_threads() (threads that ran the last CPU call).
//
// Contract (docs/design.md#the-contract), k = kernel_size, G = group_size, s = scale_factor:
//   features    (N, C, H, W)
//   masks       (N, G*k*k, H*s, W*s)        normalised reassembly kernels (mmcv semantics)
//   mask_logits (N, G*k*k*s*s, H, W)        content-encoder output; channel (g*k*k + t)*s*s + i*s + j
//                                           is tap t of group g for sub-pixel (i, j)
//   output      (N, C, H*s, W*s)
//   output_mask (backward ops) which of (grad_features, grad_masks) to compute, as ATen's
//               convolution_backward: a gradient not asked for is neither computed nor allocated, and
//               its slot holds an undefined tensor (None in Python). Default both: callers and
//               compiled graphs written before the argument existed keep working
//
// Built on PyTorch's stable ABI (docs/design.md#the-build): one binary serves every torch from the
// target (carafe_kernels/_abi.py) up, and every Python from 3.10 up (Py_LIMITED_API, an abi3 wheel).
#include <Python.h>
#include <torch/csrc/stable/library.h>

#include <cstdint>
#include <vector>

#include "carafe_common.h"

extern "C" {
// Importing carafe_kernels._C runs the static initialisers below that register the ops;
// the module itself exposes nothing. (PyModule_Create is part of the limited API.)
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace {
std::vector<int64_t> native_limits() { return {carafe::kMaxKernelSize, carafe::kMaxScaleFactor}; }
}  // namespace

STABLE_TORCH_LIBRARY(carafe_kernels, m) {
  m.def("carafe(Tensor features, Tensor masks, int kernel_size, int group_size, int scale_factor) -> Tensor");
  m.def(
      "carafe_backward(Tensor grad_output, Tensor features, Tensor masks, int kernel_size, int group_size, "
      "int scale_factor, bool[2] output_mask=[True, True]) -> (Tensor grad_features, Tensor grad_masks)");
  m.def(
      "carafe_fused(Tensor features, Tensor mask_logits, int kernel_size, int group_size, int scale_factor) "
      "-> Tensor");
  m.def(
      "carafe_fused_backward(Tensor grad_output, Tensor features, Tensor mask_logits, int kernel_size, "
      "int group_size, int scale_factor, bool[2] output_mask=[True, True]) -> (Tensor grad_features, "
      "Tensor grad_mask_logits)");
  // Content-aware downsampling (CARAFE++): masks and mask_logits alike (N, G*k*k, ceil(H/s), ceil(W/s)),
  // output (N, C, ceil(H/s), ceil(W/s)); the backward ops take the same output_mask as the up ones.
  m.def("carafe_down(Tensor features, Tensor masks, int kernel_size, int group_size, int scale_factor) -> Tensor");
  m.def(
      "carafe_down_backward(Tensor grad_output, Tensor features, Tensor masks, int kernel_size, int group_size, "
      "int scale_factor, bool[2] output_mask=[True, True]) -> (Tensor grad_features, Tensor grad_masks)");
  m.def(
      "carafe_down_fused(Tensor features, Tensor mask_logits, int kernel_size, int group_size, int scale_factor) "
      "-> Tensor");
  m.def(
      "carafe_down_fused_backward(Tensor grad_output, Tensor features, Tensor mask_logits, int kernel_size, "
      "int group_size, int scale_factor, bool[2] output_mask=[True, True]) -> (Tensor grad_features, "
      "Tensor grad_mask_logits)");
  m.def("_native_limits() -> int[]");
}

STABLE_TORCH_LIBRARY_IMPL(carafe_kernels, CompositeExplicitAutograd, m) {
  m.impl("_native_limits", TORCH_BOX(&native_limits));
}
