// Shared by the CUDA kernel files (carafe_kernels.cu: NCHW, carafe_kernels_nhwc.cu: channels_last):
// the host-emulation switch (CARAFE_CUDA_EMULATION), the element types and their fp32/fp64
// accumulation, vector loads and stores, and the launch plumbing. One copy, so that both layouts
// round, load and launch the same way. Everything is in an anonymous namespace (each .cu file is
// its own translation unit in the real build; the emulation includes both files in one).
#pragma once

#include "carafe_kernels.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <vector_types.h>

#if defined(CARAFE_CUDA_EMULATION)
// ---- Host emulation: blocks and threads run one after another. -------------------------------------
#define CK_GLOBAL
#define CK_DEVICE inline
#define CK_LAUNCH_BOUNDS(n)
namespace carafe {
namespace cuda {
namespace emu {
inline dim3& thread_idx() { static thread_local dim3 v; return v; }
inline dim3& block_idx() { static thread_local dim3 v; return v; }
inline dim3& block_dim() { static thread_local dim3 v; return v; }
inline dim3& grid_dim() { static thread_local dim3 v; return v; }
inline unsigned char*& shared() { static thread_local unsigned char* v = nullptr; return v; }
// Vector accesses that a GPU would fault on (x86 does not): counted so that the tests can require 0.
inline long long& misaligned_accesses() { static long long v = 0; return v; }
// 16-byte accesses made: the tests check that the channels_last kernels take their vector path exactly
// when it applies.
inline long long& wide_accesses() { static long long v = 0; return v; }
// Counts one vector access of `bytes` at `ptr` in the two counters above.
inline void count_access(const void* ptr, int bytes) {
  if (bytes == 16) ++wide_accesses();
  if (reinterpret_cast<uintptr_t>(ptr) % bytes) ++misaligned_accesses();
}
}  // namespace emu
}  // namespace cuda
}  // namespace carafe
#define CK_THREAD_X (::carafe::cuda::emu::thread_idx().x)
#define CK_BLOCK_X (::carafe::cuda::emu::block_idx().x)
#define CK_BLOCK_DIM_X (::carafe::cuda::emu::block_dim().x)
#define CK_GRID_DIM_X (::carafe::cuda::emu::grid_dim().x)
#define CK_DYNAMIC_SHARED(type, name) type* name = reinterpret_cast<type*>(::carafe::cuda::emu::shared())
#define CK_CHECK_ALIGNED(ptr, bytes) ::carafe::cuda::emu::count_access(ptr, bytes)
#else
#define CK_GLOBAL __global__
#define CK_DEVICE __device__ __forceinline__
#define CK_LAUNCH_BOUNDS(n) __launch_bounds__(n)
#define CK_THREAD_X (threadIdx.x)
#define CK_BLOCK_X (blockIdx.x)
#define CK_BLOCK_DIM_X (blockDim.x)
#define CK_GRID_DIM_X (gridDim.x)
#define CK_DYNAMIC_SHARED(type, name)                       \
  extern __shared__ __align__(16) unsigned char ck_smem_[]; \
  type* name = reinterpret_cast<type*>(ck_smem_)
#define CK_CHECK_ALIGNED(ptr, bytes) 0
#endif

namespace carafe {
namespace cuda {
namespace {

constexpr int64_t kWorkspaceAlign = 256;
inline size_t align_up(size_t v) { return (v + kWorkspaceAlign - 1) / kWorkspaceAlign * kWorkspaceAlign; }

// ---- Types and memory helpers ----------------------------------------------------------------------
template <typename T> struct AccType { using type = float; };
template <> struct AccType<double> { using type = double; };
template <typename T> using acc_t = typename AccType<T>::type;

CK_DEVICE float to_acc(float v) { return v; }
CK_DEVICE double to_acc(double v) { return v; }
CK_DEVICE float to_acc(__half v) { return __half2float(v); }
CK_DEVICE float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> CK_DEVICE T from_acc(acc_t<T> v);
template <> CK_DEVICE float from_acc<float>(float v) { return v; }
template <> CK_DEVICE double from_acc<double>(double v) { return v; }
template <> CK_DEVICE __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> CK_DEVICE __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

CK_DEVICE float exp_acc(float v) { return expf(v); }
CK_DEVICE double exp_acc(double v) { return exp(v); }

// Read-only load (the non-coherent path on the GPU).
template <typename T> CK_DEVICE T ldg(const T* p) {
#if defined(__CUDA_ARCH__)
  return __ldg(p);
#else
  return *p;
#endif
}

template <int BYTES> struct RawVec { using type = void; };
template <> struct RawVec<2> { using type = unsigned short; };
template <> struct RawVec<4> { using type = unsigned int; };
template <> struct RawVec<8> { using type = uint2; };
template <> struct RawVec<16> { using type = uint4; };

// v[j] = p[j] for j < S, one vector access when S*sizeof(T) is 2..16 bytes. p must be aligned to
// S*sizeof(T): the launchers only take these paths for 16-byte aligned bases, and every row offset
// used with them is a multiple of S.
template <typename T, int S> CK_DEVICE void load_row(const T* p, acc_t<T> (&v)[S]) {
  constexpr int kBytes = S * static_cast<int>(sizeof(T));
  using R = typename RawVec<kBytes>::type;
  if constexpr (!std::is_void<R>::value) {
    (void)CK_CHECK_ALIGNED(p, kBytes);
    const R raw = ldg(reinterpret_cast<const R*>(p));
    T vals[S];
    memcpy(static_cast<void*>(vals), &raw, kBytes);
#pragma unroll
    for (int j = 0; j < S; ++j) v[j] = to_acc(vals[j]);
  } else {
#pragma unroll
    for (int j = 0; j < S; ++j) v[j] = to_acc(ldg(p + j));
  }
}

// p[j] = v[j] (rounded to T) for j < S, same alignment contract as load_row.
template <typename T, int S> CK_DEVICE void store_row(T* p, const acc_t<T> (&v)[S]) {
  constexpr int kBytes = S * static_cast<int>(sizeof(T));
  using R = typename RawVec<kBytes>::type;
  T vals[S];
#pragma unroll
  for (int j = 0; j < S; ++j) vals[j] = from_acc<T>(v[j]);
  if constexpr (!std::is_void<R>::value) {
    (void)CK_CHECK_ALIGNED(p, kBytes);
    R raw;
    memcpy(&raw, static_cast<const void*>(vals), kBytes);
    *reinterpret_cast<R*>(p) = raw;
  } else {
#pragma unroll
    for (int j = 0; j < S; ++j) p[j] = vals[j];
  }
}

CARAFE_HOST_DEVICE int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
CK_DEVICE int imin(int a, int b) { return a < b ? a : b; }
CK_DEVICE int imax(int a, int b) { return a > b ? a : b; }
// -inf without std::numeric_limits, which needs --expt-relaxed-constexpr in device code.
template <typename A> CK_DEVICE A neg_inf() { return static_cast<A>(-INFINITY); }

CK_DEVICE int clampi(int v, int hi) { return v < 0 ? 0 : (v > hi ? hi : v); }

// ====================================================================================================
// Launch plumbing
// ====================================================================================================
#if defined(CARAFE_CUDA_EMULATION)
template <typename... KArgs, typename... Args>
void launch_kernel(void (*kernel)(KArgs...), int64_t blocks, int threads, size_t smem, cudaStream_t,
                   Args&&... args) {
  std::vector<unsigned char> shared(smem + 16);
  emu::shared() = shared.data();
  emu::grid_dim() = dim3(static_cast<unsigned>(blocks));
  emu::block_dim() = dim3(static_cast<unsigned>(threads));
  for (int64_t bx = 0; bx < blocks; ++bx) {
    for (int tx = 0; tx < threads; ++tx) {
      emu::block_idx() = dim3(static_cast<unsigned>(bx));
      emu::thread_idx() = dim3(static_cast<unsigned>(tx));
      kernel(static_cast<KArgs>(args)...);
    }
  }
}
inline cudaError_t last_error() { return cudaSuccess; }
#else
template <typename... KArgs, typename... Args>
void launch_kernel(void (*kernel)(KArgs...), int64_t blocks, int threads, size_t smem, cudaStream_t stream,
                   Args&&... args) {
  kernel<<<static_cast<unsigned>(blocks), threads, smem, stream>>>(static_cast<KArgs>(args)...);
}
inline cudaError_t last_error() { return cudaGetLastError(); }
#endif

inline int64_t grid_for(int64_t total_blocks, const LaunchParams& launch) {
  return std::max<int64_t>(1, std::min<int64_t>({total_blocks, launch.max_blocks, 2147483647}));
}

inline int64_t grid_for_items(int64_t items, int threads, const LaunchParams& launch) {
  return grid_for(ceil_div(items, threads), launch);
}

// Calls f(T{}) with the element type of dtype.
template <typename F> cudaError_t dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: return f(float{});
    case DType::kFloat64: return f(double{});
    case DType::kFloat16: return f(__half{});
    case DType::kBFloat16: return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

inline bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

}  // namespace
}  // namespace cuda
}  // namespace carafe
