// Index maths shared by the CPU and CUDA kernels. Header-only, torch-free, usable from host and device.
#pragma once
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define CARAFE_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define CARAFE_HOST_DEVICE inline
#endif

namespace carafe {

// The largest kernel_size and scale_factor the native kernels (CPU and CUDA) accept; the Triton
// kernels share them through carafe_kernels/contract.py, and tests/test_registry.py checks that the
// two agree (through the _native_limits op of csrc/carafe.cpp). They bound the CUDA kernels'
// register tiles and the CPU kernels' per-thread scratch, which grows as s*s*k*k*(W + k).
// (Macros as well, so static messages can spell the numbers.)
#define CARAFE_MAX_KERNEL_SIZE 11
#define CARAFE_MAX_SCALE_FACTOR 8
#define CARAFE_STRINGIFY_(x) #x
#define CARAFE_STRINGIFY(x) CARAFE_STRINGIFY_(x)
constexpr int64_t kMaxKernelSize = CARAFE_MAX_KERNEL_SIZE;
constexpr int64_t kMaxScaleFactor = CARAFE_MAX_SCALE_FACTOR;

// Shape of one call. All extents are 64-bit so that offsets never overflow (mmcv's backward
// overflows int32 on large inputs).
struct Shape {
  int64_t N, C, H, W;  // features (low resolution)
  int64_t k, G, s;     // kernel_size, group_size, scale_factor
  CARAFE_HOST_DEVICE int64_t r() const { return (k - 1) / 2; }
  CARAFE_HOST_DEVICE int64_t kk() const { return k * k; }
  CARAFE_HOST_DEVICE int64_t ss() const { return s * s; }
  CARAFE_HOST_DEVICE int64_t Ho() const { return H * s; }
  CARAFE_HOST_DEVICE int64_t Wo() const { return W * s; }
  CARAFE_HOST_DEVICE int64_t channels_per_group() const { return C / G; }
  CARAFE_HOST_DEVICE int64_t mask_channels() const { return G * k * k; }          // masks (N, G*k*k, Ho, Wo)
  CARAFE_HOST_DEVICE int64_t logit_channels() const { return G * k * k * s * s; }  // logits (N, G*k*k*s*s, H, W)
  // The down ops (carafe_down): output, masks and logits are (.., ceil(H/s), ceil(W/s)).
  CARAFE_HOST_DEVICE int64_t down_H() const { return (H + s - 1) / s; }
  CARAFE_HOST_DEVICE int64_t down_W() const { return (W + s - 1) / s; }
};

// Offset of masks[n, g*k*k + t, y, x] in a contiguous (N, G*k*k, H*s, W*s) tensor.
CARAFE_HOST_DEVICE int64_t mask_offset(const Shape& p, int64_t n, int64_t g, int64_t t, int64_t y, int64_t x) {
  return ((n * p.mask_channels() + g * p.kk() + t) * p.Ho() + y) * p.Wo() + x;
}

// Offset of the logit that, after pixel_shuffle(s), lands at masks[n, g*k*k + t, h*s + i, w*s + j]:
// channel (g*k*k + t)*s*s + i*s + j of a contiguous (N, G*k*k*s*s, H, W) tensor at (h, w).
CARAFE_HOST_DEVICE int64_t logit_offset(const Shape& p, int64_t n, int64_t g, int64_t t, int64_t i, int64_t j,
                                        int64_t h, int64_t w) {
  return ((n * p.logit_channels() + ((g * p.kk() + t) * p.ss() + i * p.s + j)) * p.H + h) * p.W + w;
}

// The low-resolution row/column that tap index d (0 <= d < k) of output row/column o reads,
// or -1 when it falls outside [0, extent): zero padding, no renormalisation.
CARAFE_HOST_DEVICE int64_t source_index(int64_t o, int64_t s, int64_t d, int64_t r, int64_t extent) {
  const int64_t q = o / s + d - r;
  return (q >= 0 && q < extent) ? q : -1;
}

}  // namespace carafe
