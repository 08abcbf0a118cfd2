// Argument checks of the carafe_kernels ops, shared by the CPU and CUDA glue (the kernels themselves
// are torch-free and include only carafe_common.h). The Python side of the same contract is
// carafe_kernels/contract.py: the same limits (tests/test_registry.py compares them through the
// _native_limits op) and the same exception kinds: TypeError for a dtype, ValueError for a shape, a
// value or a device. Direct torch.ops calls skip the Python validation, so every shape the kernels
// index with is checked here.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/safe_numerics.h>

#include <cstdint>
#include <initializer_list>
#include <vector>

#include "carafe_common.h"

namespace carafe {

inline bool supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// The product of `factors`, or a ValueError naming `op` when it overflows int64.
inline int64_t checked_mul(const char* op, std::initializer_list<int64_t> factors) {
  int64_t product = 1;
  for (int64_t f : factors)
    TORCH_CHECK_VALUE(!c10::mul_overflows(product, f, &product), op, ": shape arithmetic overflows int64");
  return product;
}

// Checks features and masks (mask_logits when `fused`) of one call on `device` ("cpu" or "cuda")
// against the contract (docs/design.md#the-contract) and the native limits; returns the call's Shape.
inline Shape check_inputs(const char* op, const char* device, const at::Tensor& features, const at::Tensor& masks,
                          bool fused, int64_t k, int64_t G, int64_t s) {
  const char* masks_name = fused ? "mask_logits" : "masks";
  const c10::DeviceType device_type = c10::Device(device).type();
  TORCH_CHECK_VALUE(features.dim() == 4, op, ": features must be 4-D (N, C, H, W), got shape ", features.sizes());
  TORCH_CHECK_VALUE(masks.dim() == 4, op, ": ", masks_name, " must be 4-D, got shape ", masks.sizes());
  TORCH_CHECK_VALUE(features.device().type() == device_type && masks.device() == features.device(), op,
                    ": the ", device, " kernels need features and ", masks_name, " on the same ", device,
                    " device, got ", features.device(), " and ", masks.device());
  const auto dtype = features.scalar_type();
  TORCH_CHECK_TYPE(supported_dtype(dtype), op, ": features must be float32, float64, float16 or bfloat16, got ",
                   dtype);
  TORCH_CHECK_TYPE(masks.scalar_type() == dtype, op, ": features and ", masks_name,
                   " must have the same dtype, got ", dtype, " and ", masks.scalar_type());
  TORCH_CHECK_VALUE(k >= 1 && k % 2 == 1 && k <= kMaxKernelSize, op, ": kernel_size must be odd and in [1, ",
                    kMaxKernelSize, "] for the native kernels, got ", k);
  TORCH_CHECK_VALUE(s >= 1 && s <= kMaxScaleFactor, op, ": scale_factor must be in [1, ", kMaxScaleFactor,
                    "] for the native kernels, got ", s);
  const int64_t N = features.size(0), C = features.size(1), H = features.size(2), W = features.size(3);
  TORCH_CHECK_VALUE(G >= 1 && C % G == 0, op, ": group_size=", G, " must be >= 1 and divide the channels of features ",
                    features.sizes());
  const std::vector<int64_t> expected =
      fused ? std::vector<int64_t>{N, checked_mul(op, {G, k, k, s, s}), H, W}
            : std::vector<int64_t>{N, checked_mul(op, {G, k, k}), checked_mul(op, {H, s}), checked_mul(op, {W, s})};
  TORCH_CHECK_VALUE(masks.sizes() == at::IntArrayRef(expected), op, ": ", masks_name, " must have shape ",
                    at::IntArrayRef(expected), fused ? " (N, G*k*k*s*s, H, W)" : " (N, G*k*k, H*s, W*s)",
                    " for features ", features.sizes(), ", kernel_size=", k, ", group_size=", G, ", scale_factor=", s,
                    "; got ", masks.sizes());
  checked_mul(op, {N, C, H, s, W, s});  // the output's element count
  return Shape{N, C, H, W, k, G, s};
}

// grad_output of a backward op: the output's shape (N, C, H*s, W*s), dtype and device.
inline void check_grad_output(const char* op, const at::Tensor& grad_output, const at::Tensor& features,
                              const Shape& p) {
  TORCH_CHECK_VALUE(grad_output.device() == features.device(), op, ": grad_output must be on ", features.device(),
                    ", got ", grad_output.device());
  TORCH_CHECK_TYPE(grad_output.scalar_type() == features.scalar_type(), op, ": grad_output must have the dtype of ",
                   "features (", features.scalar_type(), "), got ", grad_output.scalar_type());
  const std::vector<int64_t> expected{p.N, p.C, p.Ho(), p.Wo()};
  TORCH_CHECK_VALUE(grad_output.sizes() == at::IntArrayRef(expected), op,
                    ": grad_output must have the output's shape (N, C, H*s, W*s) = ", at::IntArrayRef(expected),
                    ", got ", grad_output.sizes());
}

}  // namespace carafe
