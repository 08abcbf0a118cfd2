// Torch glue for the CARAFE CUDA kernels (carafe_kernels.cu): argument checks (csrc/carafe_checks.h,
// shared with the CPU glue), contiguous inputs (strided and channels_last inputs are copied to NCHW), the device
// guard, the current stream, dtype dispatch (fp32, fp64, fp16, bf16), empty-tensor early returns, the
// backward's workspace (from the caching allocator), and the CUDA registrations of the four ops
// declared in csrc/carafe.cpp. Autograd, fake tensors and autocast attach in carafe_kernels/ops.py.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <atomic>
#include <tuple>
#include <vector>

#include <cuda_runtime_api.h>

#include "carafe_checks.h"
#include "cuda/carafe_kernels.h"

namespace carafe {
namespace {

cuda::DType to_kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cuda::DType::kFloat32;
    case at::kDouble: return cuda::DType::kFloat64;
    case at::kHalf: return cuda::DType::kFloat16;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    default: TORCH_CHECK_TYPE(false, "carafe_kernels (cuda): unsupported dtype ", t);
  }
}

// Multiprocessors of a device, cached (c10 headers only: ATen/cuda/CUDAContext.h would pull in the
// cuBLAS/cuSPARSE headers for one number).
int multiprocessor_count(c10::DeviceIndex device) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cache[kMaxDevices] = {};
  if (device >= 0 && device < kMaxDevices) {
    const int cached = cache[device].load(std::memory_order_relaxed);
    if (cached > 0) return cached;
  }
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  if (device >= 0 && device < kMaxDevices) cache[device].store(count, std::memory_order_relaxed);
  return count;
}

// The current stream of the current device (set by the caller's CUDAGuard).
cuda::LaunchParams launch_params() {
  const c10::cuda::CUDAStream stream = c10::cuda::getCurrentCUDAStream();
  cuda::LaunchParams lp;
  lp.stream = stream.stream();
  lp.num_sms = multiprocessor_count(stream.device_index());
  return lp;
}

// The shared checks (csrc/carafe_checks.h), then the limits only these kernels have (32-bit in-plane
// offsets), which cuda::unsupported_reason states.
Shape check_args(const char* op, const at::Tensor& features, const at::Tensor& masks, int64_t k, int64_t G,
                 int64_t s, bool fused) {
  const Shape p = check_inputs(op, "cuda", features, masks, fused, k, G, s);
  const char* why = cuda::unsupported_reason(p);
  TORCH_CHECK_VALUE(why == nullptr, op, ": ", (why ? why : ""), " (features ", features.sizes(), ", kernel_size=", k,
                    ", scale_factor=", s, ")");
  return p;
}

at::Tensor forward(const at::Tensor& features, const at::Tensor& masks, int64_t k, int64_t G, int64_t s,
                   bool fused) {
  const char* op = fused ? "carafe_fused" : "carafe";
  const Shape p = check_args(op, features, masks, k, G, s, fused);
  const c10::cuda::CUDAGuard guard(features.device());
  const at::Tensor f = features.contiguous();
  const at::Tensor m = masks.contiguous();
  at::Tensor out = at::empty({p.N, p.C, p.Ho(), p.Wo()}, f.options());
  if (out.numel() == 0) return out;
  C10_CUDA_CHECK(cuda::carafe_forward(p, to_kernel_dtype(f.scalar_type()), fused, f.const_data_ptr(),
                                      m.const_data_ptr(), out.mutable_data_ptr(), launch_params()));
  return out;
}

std::tuple<at::Tensor, at::Tensor> backward(const at::Tensor& grad_output, const at::Tensor& features,
                                            const at::Tensor& masks, int64_t k, int64_t G, int64_t s, bool fused) {
  const char* op = fused ? "carafe_fused_backward" : "carafe_backward";
  const Shape p = check_args(op, features, masks, k, G, s, fused);
  check_grad_output(op, grad_output, features, p);
  const c10::cuda::CUDAGuard guard(features.device());
  const at::Tensor go = grad_output.contiguous();
  const at::Tensor f = features.contiguous();
  const at::Tensor m = masks.contiguous();
  at::Tensor grad_features = at::empty(f.sizes(), f.options());
  at::Tensor grad_masks = at::empty(m.sizes(), m.options());
  if (f.numel() == 0) {
    // No channels (or no pixels): the mask gradient is a sum over nothing.
    grad_masks.zero_();
    return {grad_features, grad_masks};
  }
  const cuda::LaunchParams lp = launch_params();
  const cuda::DType dtype = to_kernel_dtype(f.scalar_type());
  const size_t ws_bytes = cuda::carafe_backward_workspace_bytes(p, dtype, fused, lp);
  at::Tensor workspace;
  if (ws_bytes > 0) workspace = at::empty({static_cast<int64_t>(ws_bytes)}, f.options().dtype(at::kByte));
  C10_CUDA_CHECK(cuda::carafe_backward(p, dtype, fused, go.const_data_ptr(), f.const_data_ptr(), m.const_data_ptr(),
                                       grad_features.mutable_data_ptr(), grad_masks.mutable_data_ptr(),
                                       ws_bytes > 0 ? workspace.mutable_data_ptr() : nullptr, ws_bytes, lp));
  return {grad_features, grad_masks};
}

at::Tensor carafe_cuda(const at::Tensor& features, const at::Tensor& masks, int64_t kernel_size, int64_t group_size,
                       int64_t scale_factor) {
  return forward(features, masks, kernel_size, group_size, scale_factor, /*fused=*/false);
}

at::Tensor carafe_fused_cuda(const at::Tensor& features, const at::Tensor& mask_logits, int64_t kernel_size,
                             int64_t group_size, int64_t scale_factor) {
  return forward(features, mask_logits, kernel_size, group_size, scale_factor, /*fused=*/true);
}

std::tuple<at::Tensor, at::Tensor> carafe_backward_cuda(const at::Tensor& grad_output, const at::Tensor& features,
                                                        const at::Tensor& masks, int64_t kernel_size,
                                                        int64_t group_size, int64_t scale_factor) {
  return backward(grad_output, features, masks, kernel_size, group_size, scale_factor, /*fused=*/false);
}

std::tuple<at::Tensor, at::Tensor> carafe_fused_backward_cuda(const at::Tensor& grad_output,
                                                              const at::Tensor& features,
                                                              const at::Tensor& mask_logits, int64_t kernel_size,
                                                              int64_t group_size, int64_t scale_factor) {
  return backward(grad_output, features, mask_logits, kernel_size, group_size, scale_factor, /*fused=*/true);
}

}  // namespace
}  // namespace carafe

TORCH_LIBRARY_IMPL(carafe_kernels, CUDA, m) {
  m.impl("carafe", &carafe::carafe_cuda);
  m.impl("carafe_backward", &carafe::carafe_backward_cuda);
  m.impl("carafe_fused", &carafe::carafe_fused_cuda);
  m.impl("carafe_fused_backward", &carafe::carafe_fused_backward_cuda);
}
