// Torch glue for the CARAFE CUDA kernels (carafe_kernels.cu for NCHW, carafe_kernels_nhwc.cu for
// channels_last): argument checks (csrc/carafe_checks.h, shared with the CPU glue), the memory format of
// a call, the device guard, the current stream, dtype dispatch (fp32, fp64, fp16, bf16), empty-tensor
// early returns, the workspaces (from the caching allocator), and the CUDA registrations of the eight ops
// declared in csrc/carafe.cpp (carafe, carafe_fused, the down ops carafe_down, carafe_down_fused, and
// their backward ops). Autograd, fake tensors and autocast attach in carafe_kernels/ops.py.
//
// Memory format (docs/design.md#channels_last-on-cuda): channels_last features (and not also contiguous
// NCHW: the rule of carafe_kernels.ops.follow_channels_last, which the fake kernels use for CUDA tensors)
// run the channels_last kernels, which read them in place; masks / logits and grad_output are brought to
// channels_last (a copy only when they are not already), and the output and both gradients are
// allocated channels_last. cares' CUDA default is bf16 + channels_last, so a CARAFE layer then costs
// no layout copy, and the next convolution gets the layout it wants. Any other features (contiguous,
// or strided otherwise) are made contiguous NCHW, with every other tensor, for the NCHW kernels; so are
// channels_last images too large for the channels_last kernels (2^31 elements in one image), whose
// results are then copied to channels_last, so the returned format follows the rule in every case.
//
// A library of its own (carafe_kernels._C_cuda, docs/design.md#the-build), on PyTorch's stable ABI like
// the CPU one: it needs torch's CUDA libraries and the CUDA runtime, so carafe_kernels/_native.py loads
// it only when the running torch has CUDA, and the CPU library _C loads beside any torch, a CPU-only
// one included. The current stream comes from aoti_torch_get_current_cuda_stream (the stable C shim's
// CUDA part, declared under USE_CUDA; accelerator::Stream::nativeHandle only exists from torch 2.13).
#include <Python.h>
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/MemoryFormat.h>

#include <atomic>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include <cuda_runtime_api.h>

#include "carafe_checks.h"
#include "cuda/carafe_kernels.h"

extern "C" {
// Importing carafe_kernels._C_cuda (after carafe_kernels._C, which declares the ops) runs the CUDA
// registrations below; the module itself exposes nothing.
PyMODINIT_FUNC PyInit__C_cuda(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C_cuda", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace carafe {
namespace {

// A failed CUDA runtime call as a RuntimeError naming the call (C10_CUDA_CHECK is not in the stable ABI).
void cuda_check(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("carafe_kernels (cuda): ") + what + " failed: " + cudaGetErrorString(err));
}

cuda::DType to_kernel_dtype(ScalarType t) {
  switch (t) {
    case ScalarType::Float: return cuda::DType::kFloat32;
    case ScalarType::Double: return cuda::DType::kFloat64;
    case ScalarType::Half: return cuda::DType::kFloat16;
    case ScalarType::BFloat16: return cuda::DType::kBFloat16;
    default: fail("carafe_kernels (cuda): unsupported dtype ", DtypeName{t});
  }
}

// Multiprocessors of a device, cached; from the CUDA runtime (the stable ABI has no device properties).
int multiprocessor_count(int32_t device) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cache[kMaxDevices] = {};
  if (device >= 0 && device < kMaxDevices) {
    const int cached = cache[device].load(std::memory_order_relaxed);
    if (cached > 0) return cached;
  }
  int count = 0;
  cuda_check(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
  if (device >= 0 && device < kMaxDevices) cache[device].store(count, std::memory_order_relaxed);
  return count;
}

// The current stream of `device` (torch's, so the kernels are ordered with the caller's work).
cuda::LaunchParams launch_params(int32_t device) {
  void* stream = nullptr;
  if (aoti_torch_get_current_cuda_stream(device, &stream) != AOTI_TORCH_SUCCESS)
    throw std::runtime_error("carafe_kernels (cuda): could not get the current CUDA stream");
  cuda::LaunchParams lp;
  lp.stream = static_cast<cudaStream_t>(stream);
  lp.num_sms = multiprocessor_count(device);
  return lp;
}

// The shared checks (csrc/carafe_checks.h), then the limits only these kernels have (32-bit in-plane
// offsets), which cuda::unsupported_reason states. down: the content-aware downsampling ops.
Shape check_args(const char* op, const Tensor& features, const Tensor& masks, int64_t k, int64_t G, int64_t s,
                 bool fused, bool down) {
  const Shape p = check_inputs(op, torch::headeronly::DeviceType::CUDA, features, masks, fused, k, G, s, down);
  const char* why = cuda::unsupported_reason(p, down);
  CARAFE_CHECK(why == nullptr, op, ": ", (why ? why : ""), " (features ", sizes_of(features), ", kernel_size=", k,
               ", scale_factor=", s, ")");
  return p;
}

// Whether t is contiguous in channels_last order: torch's own rule (c10's
// compute_channels_last_contiguous_2d, what Tensor.is_contiguous(memory_format=torch.channels_last) says),
// in which a dimension of size 1 may have any stride. Computed from the strides: the stable ABI has no
// call for it, and a dispatcher round trip per tensor would cost more than the check.
bool is_channels_last_contiguous(const Tensor& t) {
  const auto sizes = t.sizes();
  const auto strides = t.strides();
  if (sizes.size() != 4) return false;
  int64_t expected = 1;
  for (const int d : {1, 3, 2, 0}) {
    if (sizes[d] == 1) continue;
    if (strides[d] != expected) return false;
    expected *= sizes[d];
  }
  return true;
}

// The memory format a call returns: channels_last when the features are channels_last and not also
// contiguous NCHW (1x1 images, one channel, and empty tensors are both, and take the NCHW kernels),
// exactly carafe_kernels.ops.follow_channels_last, so the fake kernels give the strides returned here.
bool returns_channels_last(const Tensor& features) {
  return !features.is_contiguous() && is_channels_last_contiguous(features);
}

// t in channels_last order, copied only when it is not already.
Tensor contiguous_channels_last(const Tensor& t) {
  return is_channels_last_contiguous(t) ? t
                                        : torch::stable::contiguous(t, torch::headeronly::MemoryFormat::ChannelsLast);
}

// A new channels_last tensor of `sizes` on the device of `like` (the caching allocator, current stream).
Tensor empty_channels_last(const Tensor& like, const std::vector<int64_t>& sizes) {
  return torch::stable::empty(torch::headeronly::IntHeaderOnlyArrayRef(sizes.data(), sizes.size()),
                              like.scalar_type(), std::nullopt, like.device(), std::nullopt,
                              torch::headeronly::MemoryFormat::ChannelsLast);
}

// A byte workspace on the device of `like`, or none for 0 bytes.
std::optional<Tensor> workspace_like(const Tensor& like, size_t bytes) {
  if (bytes == 0) return std::nullopt;
  return empty_nchw(like, {static_cast<int64_t>(bytes)}, ScalarType::Byte);
}

// An NCHW result of the NCHW kernels in the memory format the call returns: channels_last features whose
// images the channels_last kernels cannot index (2^31 elements or more in one image of a tensor, where
// cuda::carafe_nhwc_unsupported_reason says so) run there, with two copies, and still return channels_last.
Tensor in_format_of_call(const Tensor& result, bool channels_last) {
  return channels_last && result.defined()
             ? torch::stable::contiguous(result, torch::headeronly::MemoryFormat::ChannelsLast) : result;
}

Tensor forward(const Tensor& features, const Tensor& masks, int64_t k, int64_t G, int64_t s, bool fused,
               bool down) {
  const char* op = down ? (fused ? "carafe_down_fused" : "carafe_down") : (fused ? "carafe_fused" : "carafe");
  const Shape p = check_args(op, features, masks, k, G, s, fused, down);
  const int32_t device = features.get_device_index();
  const torch::stable::accelerator::DeviceGuard guard(device);
  const std::vector<int64_t> out_sizes = down ? std::vector<int64_t>{p.N, p.C, p.down_H(), p.down_W()}
                                              : std::vector<int64_t>{p.N, p.C, p.Ho(), p.Wo()};
  const bool channels_last = returns_channels_last(features);
  if (channels_last && cuda::carafe_nhwc_unsupported_reason(p, down) == nullptr) {
    // Non-empty features (an empty tensor is contiguous NCHW too), so a non-empty output: no early return.
    const Tensor m = contiguous_channels_last(masks);
    Tensor out = empty_channels_last(features, out_sizes);
    const cuda::DType dtype = to_kernel_dtype(features.scalar_type());
    const cuda::LaunchParams lp = launch_params(device);
    const size_t ws_bytes = cuda::carafe_nhwc_forward_workspace_bytes(p, dtype, fused, down);
    const std::optional<Tensor> workspace = workspace_like(features, ws_bytes);
    cuda_check(cuda::carafe_nhwc_forward(p, dtype, fused, down, features.const_data_ptr(), m.const_data_ptr(),
                                         out.mutable_data_ptr(), workspace ? workspace->mutable_data_ptr() : nullptr,
                                         ws_bytes, lp),
               op);
    return out;
  }
  const Tensor f = contiguous_nchw(features);
  const Tensor m = contiguous_nchw(masks);
  Tensor out = empty_nchw(f, out_sizes);
  if (out.numel() == 0) return out;
  const auto launch = down ? cuda::carafe_down_forward : cuda::carafe_forward;
  cuda_check(launch(p, to_kernel_dtype(f.scalar_type()), fused, f.const_data_ptr(), m.const_data_ptr(),
                    out.mutable_data_ptr(), launch_params(device)),
             op);
  return in_format_of_call(out, channels_last);
}

std::tuple<Tensor, Tensor> backward(const Tensor& grad_output, const Tensor& features,
                                    const Tensor& masks, int64_t k, int64_t G, int64_t s, bool fused, bool down,
                                    const std::vector<bool>& output_mask) {
  const char* op = down ? (fused ? "carafe_down_fused_backward" : "carafe_down_backward")
                        : (fused ? "carafe_fused_backward" : "carafe_backward");
  const Shape p = check_args(op, features, masks, k, G, s, fused, down);
  check_grad_output(op, grad_output, features, p, down);
  const OutputMask want = check_output_mask(op, output_mask);
  const int32_t device = features.get_device_index();
  const torch::stable::accelerator::DeviceGuard guard(device);
  // A gradient not asked for is neither allocated nor computed: an undefined tensor (None in Python)
  // in its slot, a null pointer for the launcher, which then skips its kernels.
  Tensor grad_features, grad_masks;
  if (!(want.features || want.masks)) return {grad_features, grad_masks};
  const bool channels_last = returns_channels_last(features);
  if (channels_last && cuda::carafe_nhwc_unsupported_reason(p, down) == nullptr) {
    // Non-empty features (see forward); both gradients channels_last, like the features.
    const Tensor go = contiguous_channels_last(grad_output);
    const Tensor m = contiguous_channels_last(masks);
    if (want.features) grad_features = empty_channels_last(features, sizes_of(features).v);
    if (want.masks) grad_masks = empty_channels_last(m, sizes_of(m).v);
    const cuda::DType dtype = to_kernel_dtype(features.scalar_type());
    const size_t ws_bytes = cuda::carafe_nhwc_backward_workspace_bytes(p, dtype, fused, down, want.masks);
    const std::optional<Tensor> workspace = workspace_like(features, ws_bytes);
    void* gf = want.features ? grad_features.mutable_data_ptr() : nullptr;
    void* gm = want.masks ? grad_masks.mutable_data_ptr() : nullptr;
    cuda_check(cuda::carafe_nhwc_backward(p, dtype, fused, down, go.const_data_ptr(), features.const_data_ptr(),
                                          m.const_data_ptr(), gf, gm, workspace ? workspace->mutable_data_ptr() : nullptr,
                                          ws_bytes, launch_params(device)),
               op);
    return {grad_features, grad_masks};
  }
  const Tensor go = contiguous_nchw(grad_output);
  const Tensor f = contiguous_nchw(features);
  const Tensor m = contiguous_nchw(masks);
  if (want.features) grad_features = empty_nchw(f, sizes_of(f).v);
  if (want.masks) grad_masks = empty_nchw(m, sizes_of(m).v);
  if (f.numel() == 0) {
    // No channels (or no pixels): the mask gradient is a sum over nothing.
    if (want.masks) torch::stable::zero_(grad_masks);
    return {grad_features, grad_masks};
  }
  const cuda::LaunchParams lp = launch_params(device);
  const cuda::DType dtype = to_kernel_dtype(f.scalar_type());
  const size_t ws_bytes = (down ? cuda::carafe_down_backward_workspace_bytes : cuda::carafe_backward_workspace_bytes)(
      p, dtype, fused, want.masks, lp);
  // The workspace comes from torch's caching allocator, on the current stream like the kernels.
  const std::optional<Tensor> workspace = workspace_like(f, ws_bytes);
  const auto launch = down ? cuda::carafe_down_backward : cuda::carafe_backward;
  cuda_check(launch(p, dtype, fused, go.const_data_ptr(), f.const_data_ptr(), m.const_data_ptr(),
                    want.features ? grad_features.mutable_data_ptr() : nullptr,
                    want.masks ? grad_masks.mutable_data_ptr() : nullptr,
                    workspace ? workspace->mutable_data_ptr() : nullptr, ws_bytes, lp),
             op);
  return {in_format_of_call(grad_features, channels_last), in_format_of_call(grad_masks, channels_last)};
}

Tensor carafe_cuda(const Tensor& features, const Tensor& masks, int64_t kernel_size, int64_t group_size,
                   int64_t scale_factor) {
  return forward(features, masks, kernel_size, group_size, scale_factor, /*fused=*/false, /*down=*/false);
}

Tensor carafe_fused_cuda(const Tensor& features, const Tensor& mask_logits, int64_t kernel_size,
                         int64_t group_size, int64_t scale_factor) {
  return forward(features, mask_logits, kernel_size, group_size, scale_factor, /*fused=*/true, /*down=*/false);
}

std::tuple<Tensor, Tensor> carafe_backward_cuda(const Tensor& grad_output, const Tensor& features,
                                                const Tensor& masks, int64_t kernel_size,
                                                int64_t group_size, int64_t scale_factor,
                                                std::vector<bool> output_mask) {
  return backward(grad_output, features, masks, kernel_size, group_size, scale_factor, /*fused=*/false,
                  /*down=*/false, output_mask);
}

std::tuple<Tensor, Tensor> carafe_fused_backward_cuda(const Tensor& grad_output,
                                                      const Tensor& features,
                                                      const Tensor& mask_logits, int64_t kernel_size,
                                                      int64_t group_size, int64_t scale_factor,
                                                      std::vector<bool> output_mask) {
  return backward(grad_output, features, mask_logits, kernel_size, group_size, scale_factor, /*fused=*/true,
                  /*down=*/false, output_mask);
}

// The down ops (content-aware downsampling): masks and mask_logits alike (N, G*k*k, ceil(H/s), ceil(W/s)),
// grad_output and out (N, C, ceil(H/s), ceil(W/s)).
Tensor carafe_down_cuda(const Tensor& features, const Tensor& masks, int64_t kernel_size, int64_t group_size,
                        int64_t scale_factor) {
  return forward(features, masks, kernel_size, group_size, scale_factor, /*fused=*/false, /*down=*/true);
}

Tensor carafe_down_fused_cuda(const Tensor& features, const Tensor& mask_logits, int64_t kernel_size,
                              int64_t group_size, int64_t scale_factor) {
  return forward(features, mask_logits, kernel_size, group_size, scale_factor, /*fused=*/true, /*down=*/true);
}

std::tuple<Tensor, Tensor> carafe_down_backward_cuda(const Tensor& grad_output, const Tensor& features,
                                                     const Tensor& masks, int64_t kernel_size, int64_t group_size,
                                                     int64_t scale_factor, std::vector<bool> output_mask) {
  return backward(grad_output, features, masks, kernel_size, group_size, scale_factor, /*fused=*/false,
                  /*down=*/true, output_mask);
}

std::tuple<Tensor, Tensor> carafe_down_fused_backward_cuda(const Tensor& grad_output, const Tensor& features,
                                                           const Tensor& mask_logits, int64_t kernel_size,
                                                           int64_t group_size, int64_t scale_factor,
                                                           std::vector<bool> output_mask) {
  return backward(grad_output, features, mask_logits, kernel_size, group_size, scale_factor, /*fused=*/true,
                  /*down=*/true, output_mask);
}

}  // namespace
}  // namespace carafe

STABLE_TORCH_LIBRARY_IMPL(carafe_kernels, CUDA, m) {
  m.impl("carafe", TORCH_BOX(&carafe::carafe_cuda));
  m.impl("carafe_backward", TORCH_BOX(&carafe::carafe_backward_cuda));
  m.impl("carafe_fused", TORCH_BOX(&carafe::carafe_fused_cuda));
  m.impl("carafe_fused_backward", TORCH_BOX(&carafe::carafe_fused_backward_cuda));
  m.impl("carafe_down", TORCH_BOX(&carafe::carafe_down_cuda));
  m.impl("carafe_down_backward", TORCH_BOX(&carafe::carafe_down_backward_cuda));
  m.impl("carafe_down_fused", TORCH_BOX(&carafe::carafe_down_fused_cuda));
  m.impl("carafe_down_fused_backward", TORCH_BOX(&carafe::carafe_down_fused_backward_cuda));
}
