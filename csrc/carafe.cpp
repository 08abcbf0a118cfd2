// The schemas of every carafe_kernels op, declared once. Kernels attach per device in
// cpu/carafe_cpu.cpp (CPU) and cuda/carafe_cuda.cpp (CUDA); autograd, fake tensors and autocast
// are registered from Python (carafe_kernels/ops.py), so every caller of the dispatcher gets them.
//
// (cpu/carafe_cpu.cpp adds one introspection op, _cpu_kernel_isa() -> str, the instruction set its
// kernels were dispatched to; it belongs to the CPU library and is not part of the CARAFE contract.)
//
// Contract (see DESIGN.md §1), k = kernel_size, G = group_size, s = scale_factor:
//   features    (N, C, H, W)
//   masks       (N, G*k*k, H*s, W*s)        normalised reassembly kernels (mmcv semantics)
//   mask_logits (N, G*k*k*s*s, H, W)        content-encoder output; channel (g*k*k + t)*s*s + i*s + j
//                                           is tap t of group g for sub-pixel (i, j)
//   output      (N, C, H*s, W*s)
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing carafe_kernels._C runs the static initialisers below that register the ops;
// the module itself exposes nothing.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(carafe_kernels, m) {
  m.def("carafe(Tensor features, Tensor masks, int kernel_size, int group_size, int scale_factor) -> Tensor");
  m.def(
      "carafe_backward(Tensor grad_output, Tensor features, Tensor masks, int kernel_size, int group_size, "
      "int scale_factor) -> (Tensor grad_features, Tensor grad_masks)");
  m.def(
      "carafe_fused(Tensor features, Tensor mask_logits, int kernel_size, int group_size, int scale_factor) "
      "-> Tensor");
  m.def(
      "carafe_fused_backward(Tensor grad_output, Tensor features, Tensor mask_logits, int kernel_size, "
      "int group_size, int scale_factor) -> (Tensor grad_features, Tensor grad_mask_logits)");
}
