// Launchers of the CARAFE CUDA kernels (carafe_kernels.cu). They take raw pointers and no torch
// headers, so nvcc compiles and checks the kernels on any machine, and a host compiler can build the
// same file as an emulation (CARAFE_CUDA_EMULATION, used by tests/test_cuda_build.py to check the
// index maths on CPU). The torch glue (carafe_cuda.cpp) validates arguments, makes tensors contiguous,
// allocates outputs and the backward workspace, and calls these on the current stream. The
// carafe_nhwc_* launchers at the end (carafe_kernels_nhwc.cu) take the same tensors in channels_last
// memory order.
//
// Layouts (contiguous NCHW), k = kernel_size, G = group_size, s = scale_factor, see docs/design.md#the-contract:
//   features    (N, C, H, W)
//   masks       (N, G*k*k, H*s, W*s)      normalised reassembly kernels (carafe)
//   mask_logits (N, G*k*k*s*s, H, W)      encoder output (carafe_fused); channel (g*k*k + t)*s*s + i*s + j
//   output      (N, C, H*s, W*s)
// and for the content-aware downsampling ops (carafe_down, carafe_down_fused), Ho = ceil(H/s), Wo = ceil(W/s):
//   masks, mask_logits  (N, G*k*k, Ho, Wo)   one layout (the down logits are not shuffled)
//   output              (N, C, Ho, Wo)
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

#include "carafe_common.h"

namespace carafe {
namespace cuda {

// The kernels accept kernel_size <= kMaxKernelSize and scale_factor <= kMaxScaleFactor (carafe_common.h).

enum class DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

struct LaunchParams {
  cudaStream_t stream = nullptr;
  int num_sms = 1;                    // multiprocessors of the device: sizes the channel split
  int64_t max_blocks = 2147483647;    // cap on gridDim.x; the kernels grid-stride over the rest
  // cap on the items of one launch of the channels_last kernels (at most 2^31 - 1, their 32-bit item
  // index); a call with more runs as several launches of whole images. The tests lower it.
  int64_t max_launch_items = 2147483647;
};

// nullptr when the kernels can run this shape, else a static message saying why not
// (even or too large kernel_size, scale_factor out of range, G not dividing C, a plane too large
// for the 32-bit in-plane offsets). The launchers check it too and return cudaErrorInvalidValue.
// `down`: for the down ops, whose largest plane is the features' (H x W).
const char* unsupported_reason(const Shape& p, bool down = false);

// output = carafe(features, masks) or, when fused, carafe_fused(features, mask_logits).
cudaError_t carafe_forward(const Shape& p, DType dtype, bool fused, const void* features, const void* masks,
                           void* output, const LaunchParams& launch);

// Bytes of device workspace carafe_backward needs (0 when none); pass at least this many. grad_masks:
// whether that call computes the mask gradient (a features-only call needs less).
size_t carafe_backward_workspace_bytes(const Shape& p, DType dtype, bool fused, bool grad_masks,
                                       const LaunchParams& launch);

// (grad_features, grad_masks) of carafe, or (grad_features, grad_mask_logits) of carafe_fused, from
// grad_output (N, C, H*s, W*s). Every element of both gradients is written; no atomics, so the
// result is bitwise deterministic. A null grad_features or grad_masks is a gradient not asked for (the
// ops' output_mask): nothing computes it, and the other one is bitwise what a call with both gives.
// When N*C*H*W == 0 nothing is launched: the caller zero-fills grad_masks (a sum over no channels) itself.
cudaError_t carafe_backward(const Shape& p, DType dtype, bool fused, const void* grad_output, const void* features,
                            const void* masks, void* grad_features, void* grad_masks, void* workspace,
                            size_t workspace_bytes, const LaunchParams& launch);

// The same three for the down ops: out = carafe_down(features, masks) or carafe_down_fused(features,
// mask_logits); grad_output (N, C, Ho, Wo); same workspace, output_mask and determinism contract.
cudaError_t carafe_down_forward(const Shape& p, DType dtype, bool fused, const void* features, const void* masks,
                                void* output, const LaunchParams& launch);
size_t carafe_down_backward_workspace_bytes(const Shape& p, DType dtype, bool fused, bool grad_masks,
                                            const LaunchParams& launch);
cudaError_t carafe_down_backward(const Shape& p, DType dtype, bool fused, const void* grad_output,
                                 const void* features, const void* masks, void* grad_features, void* grad_masks,
                                 void* workspace, size_t workspace_bytes_given, const LaunchParams& launch);

// ---- channels_last (carafe_kernels_nhwc.cu) ---------------------------------------------------------
// The same ops on channels_last tensors: every tensor argument and result of a call is contiguous in
// channels_last order (NHWC in memory: features [n][h][w][c], masks [n][y][x][g*k*k + t], up logits
// [n][h][w][(g*k*k + t)*s*s + i*s + j], output and grad_output [n][y][x][c]); the logical shapes are those
// above. down selects the down ops. The fused forward needs a workspace as well (the softmax
// probabilities, computed once per pixel and group); the backward's output_mask and determinism
// contract are carafe_backward's.
//
// carafe_nhwc_unsupported_reason: unsupported_reason(p, down), and also a static message when one image
// of any tensor has 2^31 elements or more (these kernels index one launch's items in 32 bits; such a
// call runs on the NCHW kernels). The launchers check it too and return cudaErrorInvalidValue.
const char* carafe_nhwc_unsupported_reason(const Shape& p, bool down);
size_t carafe_nhwc_forward_workspace_bytes(const Shape& p, DType dtype, bool fused, bool down);
cudaError_t carafe_nhwc_forward(const Shape& p, DType dtype, bool fused, bool down, const void* features,
                                const void* masks, void* output, void* workspace, size_t workspace_bytes,
                                const LaunchParams& launch);
size_t carafe_nhwc_backward_workspace_bytes(const Shape& p, DType dtype, bool fused, bool down, bool grad_masks);
cudaError_t carafe_nhwc_backward(const Shape& p, DType dtype, bool fused, bool down, const void* grad_output,
                                 const void* features, const void* masks, void* grad_features, void* grad_masks,
                                 void* workspace, size_t workspace_bytes, const LaunchParams& launch);

}  // namespace cuda
}  // namespace carafe
