// CPU CARAFE kernels, written once and compiled once per instruction set: each carafe_cpu_isa_*.cpp
// defines the macros below and includes this file, which puts everything in the namespace
// carafe::cpu::<CARAFE_CPU_ISA> and marks every function with CARAFE_CPU_TARGET (a GCC/Clang
// target attribute). Nothing here is shared between instruction sets, so no inline function
// compiled for AVX-512 can be picked by the linker for a machine without it; c10 and std code is
// compiled with the default flags and only inlined into these functions.
//
//   CARAFE_CPU_ISA         namespace: avx512, avx2, default_isa
//   CARAFE_CPU_ISA_NAME    its name as a string literal: "avx512", "avx2", "default"
//   CARAFE_CPU_TARGET      e.g. __attribute__((target("avx2,fma"))), or empty
//   CARAFE_CPU_VEC_BYTES   vector width in bytes (64, 32, 16)
//   CARAFE_CPU_VEC_REGS    architectural vector registers (32 or 16): sizes the register blocking
//
// Notation (docs/design.md#the-contract): features (N, C, H, W); masks (N, G*k*k, H*s, W*s); mask_logits
// (N, G*k*k*s*s, H, W); output (N, C, H*s, W*s); r = (k-1)/2, kk = k*k, ss = s*s, Cg = C/G.
// An output pixel (h*s + i, w*s + j) is "sub-pixel ij = i*s + j of the low-res position (h, w)".
//
// The kernels never work on full-resolution rows. Every full-resolution plane is viewed as
// (H, s, W, s) and split into the s*s "sub-pixel planes" D[ij][h][w] = X[h*s + i][w*s + j]
// (de-interleaved). In that view every operand of CARAFE is contiguous along the low-res w:
//   out[c][ij][h][w] = sum_{ky,kx} F[c][h+ky-r][w+kx-r] * M[g][ij][t][h][w],    t = ky*k + kx
// so a vector of L consecutive w covers L low-res positions, the feature vector loaded for one tap
// serves all s*s sub-pixels (the (C x kk) @ (kk x ss) product per position of
// docs/design.md#cost-model-and-floor), the mask logits are already in this layout (channel
// (g*kk + t)*ss + ij), and only masks, grad_output and the outputs of full resolution are
// (de-)interleaved, once per row, in per-thread scratch.
//
// Scratch rows are zero-padded to Wp = Wv + 2r (Wv = W rounded up to the vector length, data at
// offset r), so a tap's shifted vector load never leaves the row and the zero padding of CARAFE is
// real zeros in the row: no per-lane branches, and NaN in a feature pixel reaches exactly the
// outputs whose window holds it. Lanes w >= W are computed and never stored.
//
// Determinism: each output element is produced by one task with a fixed summation order (taps in
// ky, kx order; grad_masks over channels in ascending order; grad_features in its GatherPlan's order),
// which does not depend on the task partition, so results are bitwise identical for any thread count.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <new>
#include <type_traits>

#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#if CARAFE_CPU_BF16_DOT
#include <immintrin.h>
#endif

#include "carafe_common.h"
#include "cpu/carafe_cpu.h"

#if !defined(CARAFE_CPU_ISA) || !defined(CARAFE_CPU_ISA_NAME) || !defined(CARAFE_CPU_TARGET) || \
    !defined(CARAFE_CPU_VEC_BYTES) || !defined(CARAFE_CPU_VEC_REGS)
#error "define CARAFE_CPU_ISA, CARAFE_CPU_ISA_NAME, CARAFE_CPU_TARGET, CARAFE_CPU_VEC_BYTES, CARAFE_CPU_VEC_REGS first"
#endif

#if defined(__GNUC__) && !defined(__clang__)
// 64-byte vectors in a translation unit compiled for SSE2: every use is inlined into a function that
// has the matching target attribute, so the ABI note GCC prints does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#define CARAFE_INLINE CARAFE_CPU_TARGET inline __attribute__((always_inline))
#define CARAFE_KERNEL CARAFE_CPU_TARGET __attribute__((noinline))

namespace carafe {
namespace cpu {
namespace CARAFE_CPU_ISA {

constexpr int kVecBytes = CARAFE_CPU_VEC_BYTES;
constexpr int kVecRegs = CARAFE_CPU_VEC_REGS;

// ---------------------------------------------------------------------------------------------
// Vectors: GCC/Clang vector extensions, lowered to the instruction set of the enclosing function.
// ---------------------------------------------------------------------------------------------
template <typename T>
struct VecOf {
  typedef T type __attribute__((vector_size(kVecBytes)));
  static constexpr int64_t size = kVecBytes / static_cast<int64_t>(sizeof(T));
};
template <typename T>
using Vec = typename VecOf<T>::type;

template <typename T>
CARAFE_INLINE Vec<T> vload(const T* p) {
  Vec<T> v;
  std::memcpy(&v, p, sizeof(v));  // an unaligned vector load
  return v;
}
template <typename T>
CARAFE_INLINE void vstore(T* p, const Vec<T>& v) {
  std::memcpy(p, &v, sizeof(v));
}
template <typename T>
CARAFE_INLINE Vec<T> vsplat(T x) {
  return Vec<T>{} + x;
}
template <typename V>
CARAFE_INLINE V vmax(const V& a, const V& b) {
  return a > b ? a : b;
}

// {0, 1, ..., L-1}
template <typename T>
CARAFE_INLINE Vec<T> lane_index() {
  Vec<T> v;
  for (int64_t l = 0; l < VecOf<T>::size; ++l) v[l] = static_cast<T>(l);
  return v;
}

// exp on float lanes (Cephes expf: range reduction by ln 2 split in two, degree-6 polynomial),
// relative error about 2 ulp on [-87.3, 88].
// NB: inputs are clamped to [-87.3, 88] so that 2^n stays a normal float: exp(-87.3) = 1.2e-38 stands
// in for smaller values, which changes a softmax (whose largest term is exp(0) = 1) by < 1e-37.
// NaN stays NaN (the comparisons are false for NaN, and NaN flows through the polynomial).
CARAFE_INLINE Vec<float> vexp(Vec<float> x) {
  using VF = Vec<float>;
  using VI = Vec<int32_t>;
  const VF lo = vsplat(-87.3365478515625f), hi = vsplat(88.0f);
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const VF fx = x * 1.44269504088896341f + 0.5f;
  VF n = __builtin_convertvector(__builtin_convertvector(fx, VI), VF);  // truncation ...
  n = n > fx ? n - 1.0f : n;                                            // ... to floor
  x = x - n * 0.693359375f;
  x = x - n * -2.12194440e-4f;
  const VF z = x * x;
  VF y = vsplat(1.9875691500e-4f);
  y = y * x + 1.3981999507e-3f;
  y = y * x + 8.3334519073e-3f;
  y = y * x + 4.1665795894e-2f;
  y = y * x + 1.6666665459e-1f;
  y = y * x + 5.0000001201e-1f;
  y = y * z + x + 1.0f;
  const VI bits = (__builtin_convertvector(n, VI) + 127) << 23;  // 2^n
  VF scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return y * scale;
}
// Double lanes: libm, one lane at a time (float64 is the accuracy path, not the fast one).
CARAFE_INLINE Vec<double> vexp(Vec<double> x) {
  for (int64_t l = 0; l < VecOf<double>::size; ++l) x[l] = std::exp(x[l]);
  return x;
}

// ---------------------------------------------------------------------------------------------
// Register blocking, sized to the register file (accumulators + operands <= registers).
// PB: sub-pixels per block (s=1: 1, s=3: 3, others: 4, the s*s sub-pixels padded to a multiple of 4).
// ---------------------------------------------------------------------------------------------
inline int64_t pick_pb(int64_t s) { return s == 1 ? 1 : (s == 3 ? 3 : 4); }

template <int PB>
struct Blocking {
  static constexpr bool kWide = kVecRegs >= 32;
  // forward: CB channels x PB sub-pixels accumulators, CB feature vectors, 1 mask vector
  static constexpr int fwd_channels = kWide ? (PB == 1 ? 8 : (PB == 3 ? 6 : 4)) : (PB == 1 ? 6 : (PB == 3 ? 3 : 2));
  // grad_masks: TB taps x PB sub-pixels accumulators, PB grad_output vectors, 1 feature vector
  static constexpr int gm_taps = kWide ? (PB == 1 ? 8 : (PB == 3 ? 6 : 5)) : (PB == 1 ? 8 : (PB == 3 ? 3 : 2));
};
// grad_features, channels per register block: 4 (the up ops on AVX-512: gather_by_shift's
// kGatherShifts x 4 accumulators + operands; elsewhere gather_by_term's 4 accumulators + operands)
constexpr int kGatherChannels = 4;
// ... the down ops' gather_by_term, channels accumulators + operands
constexpr int kDownGatherChannels = kVecRegs >= 32 ? 8 : 4;
// backward: channels whose grad_output / feature rows are staged in scratch together (a multiple of
// both gathers' channels); the grad_masks accumulators are read and written once per block.
constexpr int64_t kBwdChannelBlock = 16;

template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Per-call geometry, in elements.
struct Geo {
  int64_t N, C, H, W, k, G, s;
  int64_t r, kk, ss, Cg, Ho, Wo;
  int64_t L;    // vector lanes
  int64_t Wv;   // W rounded up to L: the w range the vector loops cover
  int64_t Wp;   // padded scratch row: [0, r) zeros, [r, r+W) data, [r+W, Wv+2r) zeros
  int64_t pb;   // sub-pixels per register block
  int64_t ssp;  // ss rounded up to pb (sub-pixel slots in scratch; the extra ones are zero)
  Geo(const Shape& p, int64_t lanes)
      : N(p.N), C(p.C), H(p.H), W(p.W), k(p.k), G(p.G), s(p.s), r(p.r()), kk(p.kk()), ss(p.ss()),
        Cg(p.channels_per_group()), Ho(p.Ho()), Wo(p.Wo()), L(lanes), Wv(round_up(p.W, lanes)),
        Wp(Wv + 2 * r), pb(pick_pb(p.s)), ssp(round_up(ss, pb)) {}
};

// A task of the forward and the backward: image n, group g, low-res rows [h0, h1) (B = rows_per_task
// rows, fewer in the last block). Its scratch rows cover the halo [h0 - r, h1 + r): local row lr holds
// low-res row h0 - r + lr, and [lr_lo, lr_hi) are the local rows inside the image. Task numbering:
// row blocks fastest, then g, then n. One decoder for both, so that their task partitions agree.
struct TaskRows {
  int64_t n, g, h0, h1;
  int64_t lr_lo;  // first local row inside the image
  int64_t lr_hi;  // one past the last
};

CARAFE_INLINE TaskRows task_rows(int64_t task, const Geo& q, int64_t B) {
  const int64_t nblocks = (q.H + B - 1) / B;
  const int64_t rows = B + 2 * q.r;
  TaskRows t;
  t.n = task / (nblocks * q.G);
  t.g = (task / nblocks) % q.G;
  t.h0 = (task % nblocks) * B;
  t.h1 = std::min(q.H, t.h0 + B);
  t.lr_lo = std::max<int64_t>(0, q.r - t.h0);
  t.lr_hi = std::min<int64_t>(rows, q.H - t.h0 + q.r);
  return t;
}

// 64-byte aligned per-thread scratch, released when the task range is done.
template <typename T>
class Scratch {
 public:
  explicit Scratch(int64_t n)
      : ptr_(static_cast<T*>(::operator new(sizeof(T) * static_cast<size_t>(std::max<int64_t>(n, 1)),
                                            std::align_val_t(64)))) {}
  ~Scratch() { ::operator delete(ptr_, std::align_val_t(64)); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  T* get() const { return ptr_; }

 private:
  T* ptr_;
};

// Hint the caches to fetch src[0, n) (Write = 1: for writing, a prefetchw on x86).
template <typename T, int Write = 0>
CARAFE_INLINE void prefetch_range(const T* src, int64_t n) {
  const char* p = reinterpret_cast<const char*>(src);
  const int64_t bytes = n * static_cast<int64_t>(sizeof(T));
  for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(p + i, Write, 3);
}

// ---------------------------------------------------------------------------------------------
// Row staging: dtype conversion, zero padding, (de-)interleaving of full-resolution rows.
// ---------------------------------------------------------------------------------------------
// The row helpers write whole vectors (the last one overlapping the previous) wherever a row holds at
// least one vector: GCC would otherwise turn these short loops into memset/memcpy calls, whose call
// overhead costs more than the copy itself on rows of 50-300 elements.

// An empty volatile asm in a loop body keeps GCC's loop distribution from replacing the loop with a
// memset/memcpy call (it did, for the vector loops below too); it emits no instruction.
#define CARAFE_NO_LIBCALL() __asm__ volatile("")

// x converted to T. static_cast, except fp32 -> bf16: c10::BFloat16's constructor (round to nearest
// even, NaN -> 0x7FC0) branches on NaN, which keeps GCC from vectorising the loops that store bf16
// (a profile of the bf16 forward found its scalar output stores costing more than the arithmetic).
// The same rounding without the branch: bitwise c10's result.
template <typename T, typename S>
CARAFE_INLINE T narrow(S x) {
  if constexpr (std::is_same<T, c10::BFloat16>::value && std::is_same<S, float>::value) {
    uint32_t u;
    std::memcpy(&u, &x, sizeof(u));
    const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return c10::BFloat16(static_cast<uint16_t>(x != x ? 0x7FC0u : rounded), c10::BFloat16::from_bits());
  } else {
    return static_cast<T>(x);
  }
}

using VU32 = Vec<uint32_t>;
typedef uint16_t VU16 __attribute__((vector_size(kVecBytes / 2)));  // L lanes of 16 bits

// narrow<c10::BFloat16> on float lanes: the bf16 bits of each, in the low half of a 32-bit lane
CARAFE_INLINE VU32 bf16_bits(Vec<float> x) {
  VU32 u;
  std::memcpy(&u, &x, sizeof(u));
  const VU32 rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return x != x ? VU32{} + 0x7FC0u : rounded;
}

// dst[0, n) = 0
template <typename T>
CARAFE_INLINE void zero_row(T* __restrict dst, int64_t n) {
  constexpr int64_t L = VecOf<T>::size;
  if (n >= L) {
    int64_t i = 0;
    for (; i + L <= n; i += L) {
      vstore(dst + i, Vec<T>{});
      CARAFE_NO_LIBCALL();
    }
    if (i < n) vstore(dst + n - L, Vec<T>{});
  } else {
    for (int64_t i = 0; i < n; ++i) {
      dst[i] = T(0);
      CARAFE_NO_LIBCALL();
    }
  }
}

// dst[0, n) = src[0, n), converted to the destination type
template <typename D, typename S>
CARAFE_INLINE void convert_row(D* __restrict dst, const S* __restrict src, int64_t n) {
  if constexpr (std::is_same<D, S>::value && std::is_floating_point<D>::value) {
    constexpr int64_t L = VecOf<D>::size;
    if (n >= L) {
      int64_t i = 0;
      for (; i + L <= n; i += L) {
        vstore(dst + i, vload(src + i));
        CARAFE_NO_LIBCALL();
      }
      if (i < n) vstore(dst + n - L, vload(src + n - L));
      return;
    }
    for (int64_t i = 0; i < n; ++i) {
      dst[i] = src[i];
      CARAFE_NO_LIBCALL();
    }
    return;
  }
  if constexpr (std::is_same<D, c10::BFloat16>::value && std::is_same<S, float>::value) {
    constexpr int64_t L = VecOf<float>::size;
    if (n >= L) {  // whole vectors, the last one overlapping the previous
      for (int64_t i = 0; i < n; i += L) {
        const int64_t at = std::min(i, n - L);
        const VU16 bits = __builtin_convertvector(bf16_bits(vload(src + at)), VU16);
        std::memcpy(dst + at, &bits, sizeof(bits));
      }
      return;
    }
  }
  for (int64_t i = 0; i < n; ++i) dst[i] = narrow<D>(src[i]);
}

// dst[0, Wp) = [0]*r ++ src[0, W) ++ zeros
template <typename acc_t, typename scalar_t>
CARAFE_INLINE void load_row(acc_t* __restrict dst, const scalar_t* __restrict src, const Geo& q) {
  constexpr int64_t L = VecOf<acc_t>::size;
  // Zero the pads with whole vectors first (they may overlap the data, which is written next):
  // Wp = Wv + 2r >= L + 2r, so every store stays inside the row.
  for (int64_t i = 0; i < q.r; i += L) vstore(dst + i, Vec<acc_t>{});
  for (int64_t i = q.r + q.W; i < q.Wp; i += L) vstore(dst + std::min(i, q.Wp - L), Vec<acc_t>{});
  convert_row(dst + q.r, src, q.W);
}

// A full-resolution row src[0, W*s) into s padded scratch rows: dst[j*dstride + r + w] = src[w*s + j].
// S > 0: s known at compile time (the loop then vectorises as an interleaved load group).
template <int S, typename acc_t, typename scalar_t>
CARAFE_INLINE void deinterleave_row(acc_t* __restrict dst, int64_t dstride, const scalar_t* __restrict src,
                                    const Geo& q) {
  const int64_t s = S > 0 ? S : q.s;
  if (S == 1) {
    load_row(dst, src, q);
    return;
  }
  for (int64_t j = 0; j < s; ++j) zero_row(dst + j * dstride, q.Wp);
  acc_t* __restrict d = dst + q.r;
  if constexpr (S == 2 && std::is_same<scalar_t, c10::BFloat16>::value && std::is_same<acc_t, float>::value) {
    // bf16 at s = 2 (interleave_row's mirror): one 32-bit lane holds columns 2w (low half) and 2w + 1,
    // and a bf16 widens to fp32 by moving it to the top half, so the two sub-pixel rows are a shift and
    // a mask of the same vector; whole vectors, the last one overlapping the previous
    constexpr int64_t L = VecOf<float>::size;
    if (q.W >= L) {
      for (int64_t w = 0; w < q.W; w += L) {
        const int64_t at = std::min(w, q.W - L);
        VU32 pairs;
        std::memcpy(&pairs, src + 2 * at, sizeof(pairs));
        vstore(d + at, (Vec<float>)(pairs << 16));
        vstore(d + dstride + at, (Vec<float>)(pairs & 0xFFFF0000u));
      }
      return;
    }
  }
  if (S > 0) {
    for (int64_t w = 0; w < q.W; ++w)
      for (int64_t j = 0; j < S; ++j) d[j * dstride + w] = static_cast<acc_t>(src[w * S + j]);
  } else {
    for (int64_t j = 0; j < s; ++j)
      for (int64_t w = 0; w < q.W; ++w) d[j * dstride + w] = static_cast<acc_t>(src[w * s + j]);
  }
}

// s scratch rows into one full-resolution row: dst[w*s + j] = src[j*sstride + w], w < W.
template <int S, typename scalar_t, typename acc_t>
CARAFE_INLINE void interleave_row(scalar_t* __restrict dst, const acc_t* __restrict src, int64_t sstride,
                                  const Geo& q) {
  if constexpr (S == 2 && std::is_same<scalar_t, c10::BFloat16>::value && std::is_same<acc_t, float>::value) {
    // bf16 at s = 2: output columns 2w and 2w + 1 are one 32-bit lane (low half first), so the two
    // sub-pixel rows interleave by a shift; whole vectors, the last one overlapping the previous
    constexpr int64_t L = VecOf<float>::size;
    if (q.W >= L) {
      for (int64_t w = 0; w < q.W; w += L) {
        const int64_t at = std::min(w, q.W - L);
        const VU32 pairs = bf16_bits(vload(src + at)) | (bf16_bits(vload(src + sstride + at)) << 16);
        std::memcpy(dst + 2 * at, &pairs, sizeof(pairs));
      }
      return;
    }
  }
  if (S == 1) {
    convert_row(dst, src, q.W);
  } else if (S > 0) {
    for (int64_t w = 0; w < q.W; ++w)
      for (int64_t j = 0; j < S; ++j) dst[w * S + j] = narrow<scalar_t>(src[j * sstride + w]);
  } else {
    const int64_t s = q.s;
    for (int64_t j = 0; j < s; ++j)
      for (int64_t w = 0; w < q.W; ++w) dst[w * s + j] = narrow<scalar_t>(src[j * sstride + w]);
  }
}

template <typename acc_t, typename scalar_t>
CARAFE_INLINE void deinterleave_row_any(acc_t* dst, int64_t dstride, const scalar_t* src, const Geo& q) {
  switch (q.s) {
    case 1: deinterleave_row<1>(dst, dstride, src, q); break;
    case 2: deinterleave_row<2>(dst, dstride, src, q); break;
    case 3: deinterleave_row<3>(dst, dstride, src, q); break;
    case 4: deinterleave_row<4>(dst, dstride, src, q); break;
    default: deinterleave_row<0>(dst, dstride, src, q); break;
  }
}

template <typename scalar_t, typename acc_t>
CARAFE_INLINE void interleave_row_any(scalar_t* dst, const acc_t* src, int64_t sstride, const Geo& q) {
  switch (q.s) {
    case 1: interleave_row<1>(dst, src, sstride, q); break;
    case 2: interleave_row<2>(dst, src, sstride, q); break;
    case 3: interleave_row<3>(dst, src, sstride, q); break;
    case 4: interleave_row<4>(dst, src, sstride, q); break;
    default: interleave_row<0>(dst, src, sstride, q); break;
  }
}

// ---------------------------------------------------------------------------------------------
// Mask staging: one low-res row h of group g into Ms[ij][t][Wp] (ij < ssp, t < kk).
// ---------------------------------------------------------------------------------------------

// Fused: Ms[ij][t][r + w] = softmax_t(mask_logits[n, (g*kk + t)*ss + ij, h, w]).
// NB: max-subtracted softmax in acc_t (fp32 for fp16/bf16/fp32), sum over t in ascending order,
// then one division: the probabilities are never rounded to the input dtype.
template <typename scalar_t, typename acc_t>
CARAFE_INLINE void stage_softmax_row(acc_t* __restrict Ms, const scalar_t* __restrict logits, const Geo& q,
                                     int64_t n, int64_t g, int64_t h) {
  constexpr int64_t L = VecOf<acc_t>::size;
  const int64_t HW = q.H * q.W;
  for (int64_t ij = 0; ij < q.ss; ++ij) {
    acc_t* base = Ms + ij * q.kk * q.Wp;
    for (int64_t t = 0; t < q.kk; ++t) {
      const int64_t channel = (g * q.kk + t) * q.ss + ij;
      load_row(base + t * q.Wp, logits + (n * q.G * q.kk * q.ss + channel) * HW + h * q.W, q);
    }
    acc_t* data = base + q.r;
    for (int64_t w = 0; w < q.Wv; w += L) {
      Vec<acc_t> m = vload(data + w);
      for (int64_t t = 1; t < q.kk; ++t) m = vmax(m, vload(data + t * q.Wp + w));
      Vec<acc_t> sum = Vec<acc_t>{};
      for (int64_t t = 0; t < q.kk; ++t) {
        const Vec<acc_t> e = vexp(vload(data + t * q.Wp + w) - m);
        vstore(data + t * q.Wp + w, e);
        sum += e;
      }
      if (w + L <= q.W) {
        for (int64_t t = 0; t < q.kk; ++t) vstore(data + t * q.Wp + w, vload(data + t * q.Wp + w) / sum);
      } else {
        // lanes w >= W hold softmax(0, ..., 0) = 1/kk: make them the zeros the padding promises
        const Vec<acc_t> keep = vsplat(static_cast<acc_t>(q.W - w));
        for (int64_t t = 0; t < q.kk; ++t) {
          const Vec<acc_t> p = vload(data + t * q.Wp + w) / sum;
          vstore(data + t * q.Wp + w, lane_index<acc_t>() < keep ? p : Vec<acc_t>{});
        }
      }
    }
  }
  zero_row(Ms + q.ss * q.kk * q.Wp, (q.ssp - q.ss) * q.kk * q.Wp);
}

// Plain: Ms[ij][t][r + w] = masks[n, g*kk + t, h*s + i, w*s + j] (de-interleaved).
// zero_padded_taps: zero the entries of taps that fall in the zero padding, so that a non-finite
// mask value there contributes nothing (as the contract says), instead of 0 * inf = NaN.
template <typename scalar_t, typename acc_t>
CARAFE_INLINE void stage_masks_row(acc_t* __restrict Ms, const scalar_t* __restrict masks, const Geo& q,
                                   int64_t n, int64_t g, int64_t h, bool zero_padded_taps) {
  for (int64_t t = 0; t < q.kk; ++t) {
    for (int64_t i = 0; i < q.s; ++i) {
      const scalar_t* src = masks + ((n * q.G * q.kk + g * q.kk + t) * q.Ho + h * q.s + i) * q.Wo;
      deinterleave_row_any(Ms + (i * q.s * q.kk + t) * q.Wp, q.kk * q.Wp, src, q);
    }
  }
  zero_row(Ms + q.ss * q.kk * q.Wp, (q.ssp - q.ss) * q.kk * q.Wp);
  if (zero_padded_taps) {
    for (int64_t ij = 0; ij < q.ss; ++ij) {
      for (int64_t t = 0; t < q.kk; ++t) {
        const int64_t ky = t / q.k, kx = t % q.k;
        acc_t* row = Ms + (ij * q.kk + t) * q.Wp + q.r;
        const int64_t hh = h + ky - q.r;
        if (hh < 0 || hh >= q.H) {
          zero_row(row, q.W);
          continue;
        }
        // columns w whose tap w + kx - r falls outside [0, W)
        const int64_t left = std::min<int64_t>(q.W, std::max<int64_t>(0, q.r - kx));
        const int64_t right = std::max<int64_t>(left, std::min<int64_t>(q.W, q.W + q.r - kx));
        zero_row(row, left);
        zero_row(row + right, q.W - right);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Where a tap's features are: both directions stage feature rows so that tap t = ky*k + kx of the
// output columns [w, w + L) is one vector load, at base + off[t] + w (channel c: + c * channel stride),
// with base the staged feature row of ky = 0 for the output row. The feature column of tap kx is
// phases*w + kx - r: phase (kx - r) mod phases, at a = floor((kx - r) / phases) in a phase row whose
// data start at `pad`. The up ops read the low-res features (phases = 1, pad = r: off = ky*row + kx);
// the down ops read full-resolution rows split into s phase rows (column s*j + kx - r).
// ---------------------------------------------------------------------------------------------
inline void tap_offsets(int64_t* off, int64_t k, int64_t r, int64_t phases, int64_t pad, int64_t phase_stride,
                        int64_t row_stride) {
  for (int64_t ky = 0; ky < k; ++ky) {
    for (int64_t kx = 0; kx < k; ++kx) {
      const int64_t d = kx - r;
      const int64_t b = ((d % phases) + phases) % phases;
      off[ky * k + kx] = ky * row_stride + b * phase_stride + pad + (d - b) / phases;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Forward: task = (n, g, rows [h0, h1)), B = h1 - h0 (rows_per_task). Index layout:
//   Ms     [B][ssp][kk][Wp]      masks of the task's rows (softmax of the logits, or de-interleaved masks)
//   Fp     [B+2r][FC][Wp]        feature rows h0-r .. h1+r-1 of a chunk of FC channels (rows outside the
//                                image: not staged, their taps are skipped)
//   rowbuf [CB][ssp][Wv]         one row's results for CB channels, de-interleaved, before the store
//   out[n, c, h*s + i, w*s + j] = sum_{ky, kx} Fp[h - h0 + ky][c][w + kx] * Ms[h - h0][ij][ky*k + kx][r + w]
// Loop order: channel chunk, row h, block of CB channels: one row's masks (ssp*kk*Wp) stay in L1 while
// every channel block of the chunk uses them; the chunk's feature rows sit in L2.
// ---------------------------------------------------------------------------------------------
template <typename acc_t, int CB, int PB>
CARAFE_INLINE void forward_block(const acc_t* __restrict Ms,       // [ssp][kk][Wp], row h
                                 const acc_t* __restrict Fb,       // features of tap ky = 0 for row h, channel c0
                                 const int64_t* __restrict tap_off,  // [kk] (tap_offsets)
                                 int64_t cstride,                  // channel stride of the staged features
                                 acc_t* __restrict rowbuf,         // [CB][ssp][Wv]
                                 const Geo& q, int64_t ky0, int64_t ky1) {
  constexpr int64_t L = VecOf<acc_t>::size;
  const int64_t k = q.k, kk = q.kk, Wp = q.Wp;
  for (int64_t ij0 = 0; ij0 < q.ssp; ij0 += PB) {
    for (int64_t w = 0; w < q.Wv; w += L) {
      Vec<acc_t> acc[CB][PB];
      for (int cb = 0; cb < CB; ++cb)
        for (int p = 0; p < PB; ++p) acc[cb][p] = Vec<acc_t>{};
      for (int64_t ky = ky0; ky < ky1; ++ky) {
        const acc_t* m0 = Ms + (ij0 * kk + ky * k) * Wp + q.r + w;
        for (int64_t kx = 0; kx < k; ++kx) {
          const acc_t* f0 = Fb + tap_off[ky * k + kx] + w;
          Vec<acc_t> f[CB];
          for (int cb = 0; cb < CB; ++cb) f[cb] = vload(f0 + cb * cstride);
          for (int p = 0; p < PB; ++p) {
            const Vec<acc_t> m = vload(m0 + p * kk * Wp + kx * Wp);
            for (int cb = 0; cb < CB; ++cb) acc[cb][p] += f[cb] * m;
          }
        }
      }
      for (int cb = 0; cb < CB; ++cb)
        for (int p = 0; p < PB; ++p) vstore(rowbuf + (cb * q.ssp + ij0 + p) * q.Wv + w, acc[cb][p]);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// bf16 dot products (AVX512-BF16; the up ops' bf16 forward). vdpbf16ps multiplies a pair of bf16 values
// per fp32 lane by another pair and adds both products to the lane's fp32 accumulator, so it does two
// taps per instruction where forward_block does one. The pairs are two horizontally adjacent taps
// (kx, kx + 1) of one kernel row:
//   features  Fp2[x] = F[x] | F[x + 1] << 16   (a padded staged row, bf16 bits): at offset w + kx it holds
//             the features of taps kx and kx + 1 for output column w, so tap_offsets serves unchanged;
//   masks     Mp[ij][ky][kp][w] = bf16(M[ky*k + 2kp]) | bf16(M[ky*k + 2kp + 1]) << 16 for kp < k/2, and
//             for odd k the last tap kx = k - 1 alone, as its fp32 bits, in slot k/2.
// A kernel row then costs k/2 dot products plus, for odd k, one fp32 FMA whose feature is the pair's low
// half shifted into an fp32 (a bf16 is the top half of the fp32 it widens to): 3 instructions instead of
// 5 at k = 5. The odd tap is not paired with a phantom tap of mask 0: a non-finite feature there
// (outside the window) would give 0 * inf = NaN where the contract says nothing reaches.
// Numerics: products of bf16 pairs are exact in fp32, accumulation is fp32 (vdpbf16ps rounds to
// nearest even, with bf16 denormal inputs treated as zero), and the masks of paired taps are rounded to
// bf16 (relative error <= 2^-9, the size of the output's own rounding); the softmax itself stays fp32.
// ---------------------------------------------------------------------------------------------
#if CARAFE_CPU_BF16_DOT
// dst[x] = P[x] | P[x + 1] << 16 for x < round_up(Wp, L), P = [0]*r ++ src[0, W) ++ zeros (bf16 bits).
// Two masked loads of 16 halves per 16 lanes: the lanes outside the row read as zero and are neither
// read nor faulted, so the row needs no padded copy (the copy's memset and memcpy calls had cost a
// quarter of the bf16 forward at W = 16).
CARAFE_INLINE __mmask16 row_lanes(int64_t first, int64_t W) {  // lanes i with 0 <= first + i < W
  const int64_t lo = std::clamp<int64_t>(-first, 0, 16), hi = std::clamp<int64_t>(W - first, 0, 16);
  return hi > lo ? static_cast<__mmask16>(((1u << hi) - 1) & ~((1u << lo) - 1)) : __mmask16{0};
}

CARAFE_INLINE void load_pair_row(uint32_t* __restrict dst, const c10::BFloat16* __restrict src, const Geo& q) {
  constexpr int64_t L = VecOf<uint32_t>::size;
  static_assert(L == 16, "AVX-512: 16 lanes of 32 bits");
  const int64_t n = round_up(q.Wp, L);
  // the address of src[i] for any i (outside the row too: only the masked-off lanes are there)
  auto at = [src](int64_t i) { return reinterpret_cast<const void*>(reinterpret_cast<uintptr_t>(src) + 2 * i); };
  for (int64_t x = 0; x < n; x += L) {
    const int64_t first = x - q.r;  // P[x + i] = src[first + i]
    const VU16 lo = (VU16)_mm256_maskz_loadu_epi16(row_lanes(first, q.W), at(first));
    const VU16 hi = (VU16)_mm256_maskz_loadu_epi16(row_lanes(first + 1, q.W), at(first + 1));
    vstore(dst + x, __builtin_convertvector(lo, VU32) | (__builtin_convertvector(hi, VU32) << 16));
  }
}

// One row's fp32 masks Ms [ssp][kk][Wp] (as stage_softmax_row / stage_masks_row leave them) into the
// pair layout Mp [ssp][k][slots][Wp] (slots = ceil(k/2)), for the columns forward_block reads.
CARAFE_INLINE void pack_mask_pairs(uint32_t* __restrict Mp, const float* __restrict Ms, const Geo& q) {
  constexpr int64_t L = VecOf<float>::size;
  const int64_t k = q.k, kk = q.kk, Wp = q.Wp, slots = (k + 1) / 2;
  for (int64_t ij = 0; ij < q.ssp; ++ij) {
    for (int64_t ky = 0; ky < k; ++ky) {
      const float* m = Ms + (ij * kk + ky * k) * Wp + q.r;
      uint32_t* d = Mp + (ij * k + ky) * slots * Wp + q.r;
      for (int64_t w = 0; w < q.Wv; w += L) {
        for (int64_t kp = 0; kp < k / 2; ++kp)
          vstore(d + kp * Wp + w, bf16_bits(vload(m + 2 * kp * Wp + w)) |
                                      (bf16_bits(vload(m + (2 * kp + 1) * Wp + w)) << 16));
        if (k % 2) {
          VU32 bits;
          const Vec<float> last = vload(m + (k - 1) * Wp + w);
          std::memcpy(&bits, &last, sizeof(bits));
          vstore(d + (k / 2) * Wp + w, bits);
        }
      }
    }
  }
}

CARAFE_INLINE Vec<float> dot_bf16_pairs(Vec<float> acc, VU32 a, VU32 b) {
  // (C casts between vector types of one size reinterpret the bits)
  return (Vec<float>)_mm512_dpbf16_ps((__m512)acc, (__m512bh)a, (__m512bh)b);
}

// forward_block on the pair layouts: same loops, same register blocking, a kernel row in ceil(k/2) steps.
template <int CB, int PB>
CARAFE_INLINE void forward_block_bf16_dot(const uint32_t* __restrict Mp,      // [ssp][k][slots][Wp], row h
                                          const uint32_t* __restrict Fb,      // pair rows of tap ky = 0, channel c0
                                          const int64_t* __restrict tap_off,  // [kk] (tap_offsets)
                                          int64_t cstride, float* __restrict rowbuf, const Geo& q, int64_t ky0,
                                          int64_t ky1) {
  constexpr int64_t L = VecOf<float>::size;
  const int64_t k = q.k, Wp = q.Wp, slots = (k + 1) / 2, pstride = k * slots * Wp;
  for (int64_t ij0 = 0; ij0 < q.ssp; ij0 += PB) {
    for (int64_t w = 0; w < q.Wv; w += L) {
      Vec<float> acc[CB][PB];
      for (int cb = 0; cb < CB; ++cb)
        for (int p = 0; p < PB; ++p) acc[cb][p] = Vec<float>{};
      for (int64_t ky = ky0; ky < ky1; ++ky) {
        const uint32_t* m0 = Mp + (ij0 * k + ky) * slots * Wp + q.r + w;
        for (int64_t kp = 0; kp < k / 2; ++kp) {
          const uint32_t* f0 = Fb + tap_off[ky * k + 2 * kp] + w;
          VU32 f[CB];
          for (int cb = 0; cb < CB; ++cb) f[cb] = vload(f0 + cb * cstride);
          for (int p = 0; p < PB; ++p) {
            const VU32 m = vload(m0 + p * pstride + kp * Wp);
            for (int cb = 0; cb < CB; ++cb) acc[cb][p] = dot_bf16_pairs(acc[cb][p], f[cb], m);
          }
        }
        if (k % 2) {  // the last tap alone, in fp32
          const uint32_t* f0 = Fb + tap_off[ky * k + k - 1] + w;
          Vec<float> f[CB];
          for (int cb = 0; cb < CB; ++cb) f[cb] = (Vec<float>)(vload(f0 + cb * cstride) << 16);
          for (int p = 0; p < PB; ++p) {
            const Vec<float> m = (Vec<float>)vload(m0 + p * pstride + (k / 2) * Wp);
            for (int cb = 0; cb < CB; ++cb) acc[cb][p] += f[cb] * m;
          }
        }
      }
      for (int cb = 0; cb < CB; ++cb)
        for (int p = 0; p < PB; ++p) vstore(rowbuf + (cb * q.ssp + ij0 + p) * q.Wv + w, acc[cb][p]);
    }
  }
}
#endif  // CARAFE_CPU_BF16_DOT

// How forward_tasks_impl stages its operands and multiplies them: the staging policy. AccStaging, every
// dtype: masks and feature rows in acc_t, forward_block. Bf16PairStaging (AVX512-BF16 builds, bf16):
// the pair layouts of "bf16 dot products" and forward_block_bf16_dot. The driver (row tasks, channel
// chunks, prefetches, the stores) is one piece of code for both.
template <typename scalar_t, int PB>
struct AccStaging {
  using acc_t = acc_type<scalar_t>;
  using stage_t = acc_t;
  const Geo& q;
  CARAFE_INLINE explicit AccStaging(const Geo& geo) : q(geo) {}
  CARAFE_INLINE int64_t mask_row() const { return q.ssp * q.kk * q.Wp; }  // one low-res row's masks
  CARAFE_INLINE int64_t feature_row() const { return q.Wp; }              // one channel's feature row
  template <bool Fused>
  CARAFE_INLINE void stage_masks(stage_t* Ms, const scalar_t* masks, int64_t n, int64_t g, int64_t h) {
    if (Fused) {
      stage_softmax_row(Ms, masks, q, n, g, h);
    } else {
      stage_masks_row(Ms, masks, q, n, g, h, /*zero_padded_taps=*/true);
    }
  }
  CARAFE_INLINE void stage_features(stage_t* dst, const scalar_t* src) { load_row(dst, src, q); }
  template <int CB>
  CARAFE_INLINE void block(const stage_t* Ms, const stage_t* Fb, const int64_t* tap_off, int64_t cstride,
                           acc_t* rowbuf, int64_t ky0, int64_t ky1) {
    forward_block<acc_t, CB, PB>(Ms, Fb, tap_off, cstride, rowbuf, q, ky0, ky1);
  }
};

#if CARAFE_CPU_BF16_DOT
template <int PB>
struct Bf16PairStaging {
  using acc_t = float;
  using stage_t = uint32_t;
  const Geo& q;
  Scratch<float> ms_fp32;  // one row's fp32 masks, before packing
  CARAFE_INLINE explicit Bf16PairStaging(const Geo& geo)
      : q(geo), ms_fp32(geo.ssp * geo.kk * geo.Wp) {}
  CARAFE_INLINE int64_t mask_row() const { return q.ssp * q.k * ((q.k + 1) / 2) * q.Wp; }
  CARAFE_INLINE int64_t feature_row() const { return round_up(q.Wp, q.L); }  // load_pair_row writes whole vectors
  template <bool Fused>
  CARAFE_INLINE void stage_masks(stage_t* Mp, const c10::BFloat16* masks, int64_t n, int64_t g, int64_t h) {
    AccStaging<c10::BFloat16, PB>(q).template stage_masks<Fused>(ms_fp32.get(), masks, n, g, h);
    pack_mask_pairs(Mp, ms_fp32.get(), q);
  }
  CARAFE_INLINE void stage_features(stage_t* dst, const c10::BFloat16* src) {
    load_pair_row(dst, src, q);
  }
  template <int CB>
  CARAFE_INLINE void block(const stage_t* Mp, const stage_t* Fb, const int64_t* tap_off, int64_t cstride,
                           float* rowbuf, int64_t ky0, int64_t ky1) {
    forward_block_bf16_dot<CB, PB>(Mp, Fb, tap_off, cstride, rowbuf, q, ky0, ky1);
  }
};
#endif

template <typename scalar_t, bool Fused, int PB, typename Staging>
CARAFE_INLINE void forward_tasks_impl(const Args& a, int64_t begin, int64_t end) {
  using acc_t = acc_type<scalar_t>;
  using stage_t = typename Staging::stage_t;
  constexpr int CB = Blocking<PB>::fwd_channels;
  const Geo q(a.p, VecOf<acc_t>::size);
  Staging staging(q);
  const int64_t B = a.rows_per_task;
  const int64_t rows = B + 2 * q.r;
  const auto* features = static_cast<const scalar_t*>(a.features);
  const auto* masks = static_cast<const scalar_t*>(a.masks);
  auto* out = static_cast<scalar_t*>(a.out);

  const int64_t ms_row = staging.mask_row();
  const int64_t fch = staging.feature_row();
  // channels per chunk: a multiple of CB, about 128 KiB of staged feature rows
  const int64_t fc_budget = (int64_t{128} << 10) / static_cast<int64_t>(sizeof(stage_t) * rows * fch);
  const int64_t FC = std::min(round_up(std::max<int64_t>(q.Cg, 1), CB), std::max<int64_t>(CB, fc_budget / CB * CB));
  const int64_t fp_row = FC * fch;
  Scratch<stage_t> ms_buf(B * ms_row), fp_buf(rows * fp_row);
  Scratch<acc_t> row_buf(CB * q.ssp * q.Wv);
  stage_t* Ms = ms_buf.get();
  stage_t* Fp = fp_buf.get();
  acc_t* rowbuf = row_buf.get();
  int64_t tap_off[kMaxKernelSize * kMaxKernelSize];
  tap_offsets(tap_off, q.k, q.r, 1, q.r, 0, fp_row);

  for (int64_t task = begin; task < end; ++task) {
    const auto [n, g, h0, h1, lr_lo, lr_hi] = task_rows(task, q, B);
    const int64_t hh_lo = h0 - q.r + lr_lo, hh_hi = h0 - q.r + lr_hi;
    for (int64_t h = h0; h < h1; ++h) staging.template stage_masks<Fused>(Ms + (h - h0) * ms_row, masks, n, g, h);
    for (int64_t f0 = 0; f0 < q.Cg; f0 += FC) {
      const int64_t nf = std::min<int64_t>(FC, q.Cg - f0);  // channels of this chunk
      const int64_t nfb = round_up(nf, CB);                 // ... staged (the rest are zero rows)
      // Channel-major staging: the rows [h0-r, h1+r) of one channel are one contiguous stretch;
      // the next channel's stretch is prefetched while this one is converted.
      for (int64_t c = 0; c < nfb; ++c) {
        const int64_t channel = n * q.C + g * q.Cg + f0 + c;
        if (c + 1 < nf) prefetch_range(features + ((channel + 1) * q.H + hh_lo) * q.W, (hh_hi - hh_lo) * q.W);
        for (int64_t lr = lr_lo; lr < lr_hi; ++lr) {
          stage_t* dst = Fp + lr * fp_row + c * fch;
          if (c < nf) {
            staging.stage_features(dst, features + (channel * q.H + h0 - q.r + lr) * q.W);
          } else {
            zero_row(dst, fch);  // a channel past the group's end: computed, never stored
          }
        }
      }
      for (int64_t h = h0; h < h1; ++h) {
        const int64_t b = h - h0;
        // taps ky whose feature row h + ky - r lies in the image; the others contribute nothing
        const int64_t ky0 = std::max<int64_t>(0, q.r - h);
        const int64_t ky1 = std::min<int64_t>(q.k, q.H - h + q.r);
        for (int64_t c0 = 0; c0 < nf; c0 += CB) {
          const int64_t nc = std::min<int64_t>(CB, nf - c0);
          const int64_t cbase = g * q.Cg + f0 + c0;  // first channel of this block
          // the output rows are written after the block's arithmetic: ask for them (for writing) now
          for (int64_t cb = 0; cb < nc; ++cb)
            prefetch_range<scalar_t, 1>(out + ((n * q.C + cbase + cb) * q.Ho + h * q.s) * q.Wo, q.s * q.Wo);
          staging.template block<CB>(Ms + b * ms_row, Fp + b * fp_row + c0 * fch, tap_off, fch, rowbuf, ky0, ky1);
          for (int64_t cb = 0; cb < nc; ++cb) {
            for (int64_t i = 0; i < q.s; ++i) {
              scalar_t* dst = out + ((n * q.C + cbase + cb) * q.Ho + h * q.s + i) * q.Wo;
              interleave_row_any(dst, rowbuf + (cb * q.ssp + i * q.s) * q.Wv, q.Wv, q);
            }
          }
        }
      }
    }
  }
}

// The staging of forward_tasks_impl for scalar_t: bf16 pairs where the build has the dot products.
template <typename scalar_t, int PB>
#if CARAFE_CPU_BF16_DOT
using ForwardStaging = std::conditional_t<std::is_same<scalar_t, c10::BFloat16>::value, Bf16PairStaging<PB>,
                                          AccStaging<scalar_t, PB>>;
#else
using ForwardStaging = AccStaging<scalar_t, PB>;
#endif

template <typename scalar_t, bool Fused>
CARAFE_KERNEL void forward_tasks(const Args& a, int64_t begin, int64_t end) {
  switch (pick_pb(a.p.s)) {
    case 1: forward_tasks_impl<scalar_t, Fused, 1, ForwardStaging<scalar_t, 1>>(a, begin, end); break;
    case 3: forward_tasks_impl<scalar_t, Fused, 3, ForwardStaging<scalar_t, 3>>(a, begin, end); break;
    default: forward_tasks_impl<scalar_t, Fused, 4, ForwardStaging<scalar_t, 4>>(a, begin, end); break;
  }
}

// ---------------------------------------------------------------------------------------------
// Backward: task = (n, g, rows [h0, h1)), B = h1 - h0. Scratch rows cover the halo [h0-r, h1+r):
// local row lr holds low-res row h0 - r + lr (zeros where that row is outside the image).
//   Ms     [B+2r][ssp][kk][Wp]       masks (softmax probabilities for the fused op)
//   God    [B+2r][CBLK][ssp][Wp]     grad_output, de-interleaved, for a block of CBLK channels
//   Fp     [B+2r][CBLK][Wp]          features of the same channels
//   gmacc  [B][ssp][kkp][Wv]         grad_masks accumulators (kkp = kk rounded up to TB)
// grad_features (a gather: each low-res pixel collects from the outputs whose window covers it):
//   gf[c, h, w] = sum_{kx} sum_{ky, ij} God[h - ky + r][c][ij][w - kx + r] * Ms[h - ky + r][ij][ky*k + kx][w - kx + r]
//   (GatherPlan; with gather_by_shift the inner sum runs on unshifted vectors, the shift by kx applied to
//   its result)
// grad_masks (a reduction over the group's channels, in ascending channel order):
//   gm[ij][t][h][w] = sum_c God[h][c][ij][w] * Fp[h + ky - r][c][w + kx - r]
// Each task owns its rows of both outputs: no atomics, no races.
// A gradient not asked for (its output pointer null: the op's output_mask) is skipped with everything
// only it needs. grad_features alone stages no features and keeps no gmacc; grad_masks alone runs no
// gather, stages grad_output of the task's own rows only (no halo), and no masks for the plain op (the
// fused op stages the probabilities of its own rows, which its softmax backward reads). The gradient
// computed is bitwise the one of a full call: same operands, same summation order.
// ---------------------------------------------------------------------------------------------
// grad_features is a gather: each feature row collects, for every channel c and column w,
//   gf[c][w] = sum_{e, d} God[go[e] + c*cstride + w + shift[d]] * Ms[m[e][d] + w + shift[d]]
// over the staged grad_output rows e it reads (up: (ky, ij); down: ky) and the column shifts d of its
// taps (up: 2r - kx; down: one per kx of the row's phase): a GatherPlan (gather_plan_up / _down).
// Two ways to sum it, both in a fixed order (so the result does not depend on threads or on the
// output_mask):
// - gather_by_term: term by term, e-major (up: ky, ij, kx; down: ky, kx).
// - gather_by_shift (the up ops on the AVX-512 builds: kUpGatherByShift): a tap's shift is common to both factors, so the
//   sum over e runs first, at unshifted columns, and the shifts are applied once to its result:
//     R[d][c][p] = sum_e God[go[e] + c*cstride + p] * Ms[m[e][d] + p]      (pass 1)
//     gf[c][w]   = sum_d R[d][c][w + shift[d]]                             (pass 2)
//   Pass 1 holds DB shifts x CB channels of accumulators and loads CB grad_output vectors and DB mask
//   vectors per row e: CB + DB loads per CB*DB multiply-adds, where gather_by_term loads a grad_output
//   vector, at a cache-line straddling shifted address, per multiply-add. Only the columns p in
//   [r, r + Wv) are summed: grad_output's staged rows are zero outside them (the masks' padding is
//   finite), so R is zero there, and R's rows (Wp long, like the staged rows) keep those zeros from
//   their allocation (GatherScratch).
//   It does not pay for the down ops (2-3 rows e per shift: 1.6x slower there) nor with 16 registers
//   (AVX2: the 5 x 2 block that fits was 3-4% slower than gather_by_term on this project's machine).
//   It relies on the staging's zero padding: every staged grad_output and mask row (deinterleave_row,
//   load_row, stage_softmax_row, stage_masks_row, zero_row for rows outside the image) is zero (masks:
//   finite) outside its data columns.
struct GatherPlan {
  int64_t ne = 0;  // grad_output rows
  int64_t nd = 0;  // column shifts
  int64_t* go;     // [ne]: offset of row e in God (channel 0)
  int64_t* m;      // [ne][nd]: offset of row e's masks of shift d in Ms
  int64_t shift[kMaxKernelSize];
};
// The up ops' grad_features sums by shift where the registers hold gather_by_shift's block, on the
// AVX-512 builds, where it was measured (aarch64's NEON build, also 32 registers, keeps gather_by_term
// until measured there).
constexpr bool kUpGatherByShift = kVecRegs >= 32 && kVecBytes == 64;
// gather_by_shift's pass-1 register block: shifts [d0, d0 + DB), DB <= kGatherShifts, x CB channels.
constexpr int kGatherShifts = 5;

template <typename acc_t, int CB>
CARAFE_INLINE void gather_by_term(const acc_t* __restrict Ms,   // staged masks
                                  const acc_t* __restrict God,  // staged grad_output, at channel c0
                                  int64_t cstride,              // its channel stride
                                  const GatherPlan& plan,
                                  acc_t* __restrict rowbuf,     // [CB][Wv]
                                  int64_t Wv) {
  constexpr int64_t L = VecOf<acc_t>::size;
  for (int64_t w = 0; w < Wv; w += L) {
    Vec<acc_t> acc[CB];
    for (int cb = 0; cb < CB; ++cb) acc[cb] = Vec<acc_t>{};
    for (int64_t e = 0; e < plan.ne; ++e) {
      for (int64_t d = 0; d < plan.nd; ++d) {
        const int64_t at = plan.shift[d] + w;
        const Vec<acc_t> m = vload(Ms + plan.m[e * plan.nd + d] + at);
        const acc_t* g0 = God + plan.go[e] + at;
        for (int cb = 0; cb < CB; ++cb) acc[cb] += vload(g0 + cb * cstride) * m;
      }
    }
    for (int cb = 0; cb < CB; ++cb) vstore(rowbuf + cb * Wv + w, acc[cb]);
  }
}

// R of gather_by_shift, for kMaxKernelSize shifts x CB channels: rows of Wp, zero (the columns pass 1
// never writes).
template <typename acc_t>
struct GatherScratch {
  Scratch<acc_t> buf;
  CARAFE_INLINE GatherScratch(bool used, int64_t channels, int64_t Wp)
      : buf(used ? kMaxKernelSize * channels * Wp : 0) {
    if (used) zero_row(buf.get(), kMaxKernelSize * channels * Wp);
  }
  acc_t* get() const { return buf.get(); }
};

template <typename acc_t, int CB, int DB>
CARAFE_INLINE void gather_shift_block(const acc_t* __restrict Ms, const acc_t* __restrict God, int64_t cstride,
                                      const GatherPlan& plan, int64_t d0, acc_t* __restrict R, const Geo& q) {
  constexpr int64_t L = VecOf<acc_t>::size;
  for (int64_t p = q.r; p < q.r + q.Wv; p += L) {
    Vec<acc_t> acc[DB][CB];
    for (int db = 0; db < DB; ++db)
      for (int cb = 0; cb < CB; ++cb) acc[db][cb] = Vec<acc_t>{};
    for (int64_t e = 0; e < plan.ne; ++e) {
      Vec<acc_t> go[CB];
      for (int cb = 0; cb < CB; ++cb) go[cb] = vload(God + plan.go[e] + cb * cstride + p);
      const int64_t* me = plan.m + e * plan.nd + d0;
      for (int db = 0; db < DB; ++db) {
        const Vec<acc_t> mv = vload(Ms + me[db] + p);
        for (int cb = 0; cb < CB; ++cb) acc[db][cb] += go[cb] * mv;
      }
    }
    for (int db = 0; db < DB; ++db)
      for (int cb = 0; cb < CB; ++cb) vstore(R + ((d0 + db) * CB + cb) * q.Wp + p, acc[db][cb]);
  }
}

// gf of CB channels (God at the first one) into rowbuf[CB][Wv]; R: a GatherScratch of CB channels.
// plan.nd >= 1 (the up plans have nd = k; a down phase no tap reaches has none, and gather_by_term).
template <typename acc_t, int CB>
CARAFE_INLINE void gather_by_shift(const acc_t* __restrict Ms, const acc_t* __restrict God, int64_t cstride,
                                   const GatherPlan& plan, acc_t* __restrict R, acc_t* __restrict rowbuf,
                                   const Geo& q) {
  constexpr int64_t L = VecOf<acc_t>::size;
  const int64_t Wv = q.Wv, Wp = q.Wp;
  for (int64_t d0 = 0; d0 < plan.nd; d0 += kGatherShifts) {
    switch (std::min<int64_t>(kGatherShifts, plan.nd - d0)) {
      case 1: gather_shift_block<acc_t, CB, 1>(Ms, God, cstride, plan, d0, R, q); break;
      case 2: gather_shift_block<acc_t, CB, 2>(Ms, God, cstride, plan, d0, R, q); break;
      case 3: gather_shift_block<acc_t, CB, 3>(Ms, God, cstride, plan, d0, R, q); break;
      case 4: gather_shift_block<acc_t, CB, 4>(Ms, God, cstride, plan, d0, R, q); break;
      default: gather_shift_block<acc_t, CB, kGatherShifts>(Ms, God, cstride, plan, d0, R, q); break;
    }
  }
  for (int cb = 0; cb < CB; ++cb) {
    for (int64_t w = 0; w < Wv; w += L) {
      Vec<acc_t> acc = vload(R + cb * Wp + plan.shift[0] + w);
      for (int64_t d = 1; d < plan.nd; ++d) acc += vload(R + (d * CB + cb) * Wp + plan.shift[d] + w);
      vstore(rowbuf + cb * Wv + w, acc);
    }
  }
}

// The up gather of low-res row h = h0 + b: rows e = (ky, ij) in that order, source row h' = h - ky + r
// (local row b + 2r - ky, in the image only); shifts d = kx: column w - kx + r, which a padded row holds
// at w + 2r - kx. go and m must hold k*ss and k*ss*k entries.
inline void gather_plan_up(GatherPlan& plan, const Geo& q, int64_t b, int64_t h, int64_t cblk) {
  const int64_t k = q.k, kk = q.kk, Wp = q.Wp, r = q.r, ssp = q.ssp;
  const int64_t ky0 = std::max<int64_t>(0, h + r - (q.H - 1));
  const int64_t ky1 = std::min<int64_t>(k, h + r + 1);
  plan.nd = k;
  for (int64_t kx = 0; kx < k; ++kx) plan.shift[kx] = 2 * r - kx;
  int64_t e = 0;
  for (int64_t ky = ky0; ky < ky1; ++ky) {
    const int64_t lr = b + 2 * r - ky;
    for (int64_t ij = 0; ij < q.ss; ++ij, ++e) {
      plan.go[e] = (lr * cblk * ssp + ij) * Wp;
      for (int64_t kx = 0; kx < k; ++kx) plan.m[e * k + kx] = ((lr * ssp + ij) * kk + ky * k + kx) * Wp;
    }
  }
  plan.ne = e;
}

template <typename acc_t, int TB, int PB>
CARAFE_INLINE void grad_masks_block(acc_t* __restrict gmacc,            // [ssp][kkp][Wv] of row h
                                    const acc_t* __restrict g_row,      // grad_output of row h (sub-pixel stride Wp)
                                    int64_t gcs,                        // ... its channel stride
                                    const acc_t* __restrict Fb,         // features of tap ky = 0 for row h
                                    const int64_t* __restrict tap_off,  // [kk] (tap_offsets)
                                    int64_t fcs,                        // channel stride of the staged features
                                    const Geo& q, int64_t nch, int64_t kkp) {
  constexpr int64_t L = VecOf<acc_t>::size;
  const int64_t Wp = q.Wp, Wv = q.Wv, ssp = q.ssp;
  for (int64_t t0 = 0; t0 < kkp; t0 += TB) {
    const acc_t* f_tap[TB];  // features of tap t
    for (int tb = 0; tb < TB; ++tb) {
      const int64_t t = t0 + tb < q.kk ? t0 + tb : 0;  // taps past kk: computed, never stored
      f_tap[tb] = Fb + tap_off[t];
    }
    for (int64_t ij0 = 0; ij0 < ssp; ij0 += PB) {
      for (int64_t w = 0; w < Wv; w += L) {
        Vec<acc_t> acc[TB][PB];
        acc_t* a0 = gmacc + (ij0 * kkp + t0) * Wv + w;
        for (int tb = 0; tb < TB; ++tb)
          for (int p = 0; p < PB; ++p) acc[tb][p] = vload(a0 + (p * kkp + tb) * Wv);
        for (int64_t c = 0; c < nch; ++c) {
          Vec<acc_t> go[PB];
          for (int p = 0; p < PB; ++p) go[p] = vload(g_row + c * gcs + (ij0 + p) * Wp + w);
          for (int tb = 0; tb < TB; ++tb) {
            const Vec<acc_t> f = vload(f_tap[tb] + c * fcs + w);
            for (int p = 0; p < PB; ++p) acc[tb][p] += go[p] * f;
          }
        }
        for (int tb = 0; tb < TB; ++tb)
          for (int p = 0; p < PB; ++p) vstore(a0 + (p * kkp + tb) * Wv, acc[tb][p]);
      }
    }
  }
}

// Softmax backward in place, with the recomputed fp32 probabilities:
//   dL/dlogit_t = p_t * (dL/dp_t - sum_t' p_t' dL/dp_t'), sum in ascending t,
// for the kk taps of one (sub-)pixel row: gm[t*gstride + w] (dL/dp in, dL/dlogit out), P[t*pstride + w].
template <typename acc_t>
CARAFE_INLINE void softmax_backward(acc_t* __restrict gm, int64_t gstride, const acc_t* __restrict P,
                                    int64_t pstride, int64_t kk, int64_t Wv) {
  constexpr int64_t L = VecOf<acc_t>::size;
  for (int64_t w = 0; w < Wv; w += L) {
    Vec<acc_t> dot = Vec<acc_t>{};
    for (int64_t t = 0; t < kk; ++t) dot += vload(P + t * pstride + w) * vload(gm + t * gstride + w);
    for (int64_t t = 0; t < kk; ++t) {
      acc_t* d = gm + t * gstride + w;
      vstore(d, vload(P + t * pstride + w) * (vload(d) - dot));
    }
  }
}

template <typename scalar_t, bool Fused, int PB>
CARAFE_INLINE void backward_tasks_impl(const Args& a, int64_t begin, int64_t end) {
  using acc_t = acc_type<scalar_t>;
  constexpr int TB = Blocking<PB>::gm_taps;
  constexpr int CBG = kGatherChannels;
  constexpr int64_t CBLK = kBwdChannelBlock;
  static_assert(CBLK % CBG == 0, "the channel block must hold whole grad_features register blocks");
  constexpr int64_t L = VecOf<acc_t>::size;
  const Geo q(a.p, L);
  const int64_t B = a.rows_per_task;
  const int64_t rows = B + 2 * q.r;
  const int64_t kkp = round_up(q.kk, TB);
  const auto* features = static_cast<const scalar_t*>(a.features);
  const auto* masks = static_cast<const scalar_t*>(a.masks);
  const auto* grad_out = static_cast<const scalar_t*>(a.grad_output);
  auto* grad_features = static_cast<scalar_t*>(a.out);
  auto* grad_masks = static_cast<scalar_t*>(a.out2);
  const bool want_features = grad_features != nullptr, want_masks = grad_masks != nullptr;
  const bool need_ms = want_features || Fused;

  const int64_t ms_row = q.ssp * q.kk * q.Wp;
  const int64_t god_row = CBLK * q.ssp * q.Wp;
  const int64_t fp_row = CBLK * q.Wp;
  const int64_t gm_row = q.ssp * kkp * q.Wv;
  Scratch<acc_t> ms_buf(need_ms ? rows * ms_row : 0), god_buf(rows * god_row),
      fp_buf(want_masks ? rows * fp_row : 0), gm_buf(want_masks ? B * gm_row : 0),
      row_buf(want_features ? CBG * q.Wv : 0);
  GatherScratch<acc_t> gather_buf(kUpGatherByShift && want_features, CBG, q.Wp);
  acc_t* Ms = ms_buf.get();
  acc_t* God = god_buf.get();
  acc_t* Fp = fp_buf.get();
  acc_t* gmacc = gm_buf.get();
  acc_t* rowbuf = row_buf.get();
  Scratch<int64_t> plan_buf(want_features ? q.k * q.ss * (1 + q.k) : 0);
  GatherPlan plan;
  plan.go = plan_buf.get();
  plan.m = plan.go + q.k * q.ss;
  int64_t tap_off[kMaxKernelSize * kMaxKernelSize];
  tap_offsets(tap_off, q.k, q.r, 1, q.r, 0, fp_row);

  for (int64_t task = begin; task < end; ++task) {
    const auto [n, g, h0, h1, lr_lo, lr_hi] = task_rows(task, q, B);

    // The gather reads the mask rows of the halo; the fused softmax backward alone reads only the
    // task's own rows (local rows [r, r + h1 - h0)).
    const int64_t ms_lo = want_features ? lr_lo : q.r;
    const int64_t ms_hi = want_features ? lr_hi : (need_ms ? q.r + h1 - h0 : q.r);
    for (int64_t lr = ms_lo; lr < ms_hi; ++lr) {
      const int64_t hh = h0 - q.r + lr;
      if (Fused) {
        stage_softmax_row(Ms + lr * ms_row, masks, q, n, g, hh);
      } else {
        stage_masks_row(Ms + lr * ms_row, masks, q, n, g, hh, /*zero_padded_taps=*/false);
      }
    }
    if (want_masks) zero_row(gmacc, (h1 - h0) * gm_row);

    for (int64_t c0 = 0; c0 < q.Cg; c0 += CBLK) {
      const int64_t nch = std::min<int64_t>(CBLK, q.Cg - c0);
      const int64_t cbase = g * q.Cg + c0;
      const int64_t ncg = round_up(nch, CBG);  // channels the grad_features blocks read
      // Channel-major: the rows [h0-r, h1+r) of one channel are one contiguous stretch of grad_output
      // (and of features). Staging is bound by memory latency, so the next channel's stretch is
      // prefetched while this one is de-interleaved.
      const int64_t hh_lo = h0 - q.r + lr_lo, hh_hi = h0 - q.r + lr_hi;  // rows inside the image
      // grad_output rows: the gather reads the halo, grad_masks alone only the task's own rows
      const int64_t go_lo = want_features ? hh_lo : h0, go_hi = want_features ? hh_hi : h1;
      for (int64_t c = 0; c < ncg; ++c) {
        if (c + 1 < nch || (c + 1 == nch && c0 + CBLK < q.Cg)) {
          const int64_t next = n * q.C + cbase + c + 1;
          prefetch_range(grad_out + (next * q.Ho + go_lo * q.s) * q.Wo, (go_hi - go_lo) * q.s * q.Wo);
          if (want_masks) prefetch_range(features + (next * q.H + hh_lo) * q.W, (hh_hi - hh_lo) * q.W);
        }
        for (int64_t lr = 0; lr < rows; ++lr) {
          const int64_t hh = h0 - q.r + lr;
          const bool inside = lr >= lr_lo && lr < lr_hi;
          const bool stage_go = want_features || (hh >= h0 && hh < h1);
          acc_t* god = God + lr * god_row + c * q.ssp * q.Wp;
          acc_t* fp = Fp + lr * fp_row + c * q.Wp;
          if (inside && c < nch) {
            const int64_t channel = n * q.C + cbase + c;
            if (stage_go) {
              for (int64_t i = 0; i < q.s; ++i)
                deinterleave_row_any(god + i * q.s * q.Wp, q.Wp, grad_out + (channel * q.Ho + hh * q.s + i) * q.Wo,
                                     q);
              zero_row(god + q.ss * q.Wp, (q.ssp - q.ss) * q.Wp);
            }
            if (want_masks) load_row(fp, features + (channel * q.H + hh) * q.W, q);
          } else {
            if (stage_go) zero_row(god, q.ssp * q.Wp);
            if (want_masks) zero_row(fp, q.Wp);
          }
        }
      }
      for (int64_t h = h0; h < h1; ++h) {
        const int64_t b = h - h0;
        if (want_features) {
          gather_plan_up(plan, q, b, h, CBLK);
          for (int64_t cg = 0; cg < nch; cg += CBG) {
            const acc_t* god = God + cg * q.ssp * q.Wp;
            if constexpr (kUpGatherByShift) {
              gather_by_shift<acc_t, CBG>(Ms, god, q.ssp * q.Wp, plan, gather_buf.get(), rowbuf, q);
            } else {
              gather_by_term<acc_t, CBG>(Ms, god, q.ssp * q.Wp, plan, rowbuf, q.Wv);
            }
            for (int64_t cb = 0; cb < std::min<int64_t>(CBG, nch - cg); ++cb) {
              scalar_t* dst = grad_features + ((n * q.C + cbase + cg + cb) * q.H + h) * q.W;
              convert_row(dst, rowbuf + cb * q.Wv, q.W);
            }
          }
        }
        if (want_masks)
          grad_masks_block<acc_t, TB, PB>(gmacc + b * gm_row, God + (b + q.r) * god_row + q.r, q.ssp * q.Wp,
                                          Fp + b * fp_row, tap_off, q.Wp, q, nch, kkp);
      }
    }

    for (int64_t h = h0; want_masks && h < h1; ++h) {
      const int64_t b = h - h0;
      acc_t* gm = gmacc + b * gm_row;  // [ssp][kkp][Wv]: dL/dmask per (sub-pixel, tap, w)
      if (Fused) {
        // the softmax backward (softmax_backward), with the recomputed fp32 probabilities
        const acc_t* P = Ms + (b + q.r) * ms_row + q.r;  // [ssp][kk][Wp] at offset r
        for (int64_t ij = 0; ij < q.ss; ++ij) {
          softmax_backward(gm + ij * kkp * q.Wv, q.Wv, P + ij * q.kk * q.Wp, q.Wp, q.kk, q.Wv);
          for (int64_t t = 0; t < q.kk; ++t) {
            const int64_t channel = (g * q.kk + t) * q.ss + ij;
            scalar_t* dst = grad_masks + ((n * q.G * q.kk * q.ss + channel) * q.H + h) * q.W;
            convert_row(dst, gm + (ij * kkp + t) * q.Wv, q.W);
          }
        }
      } else {
        for (int64_t t = 0; t < q.kk; ++t) {
          for (int64_t i = 0; i < q.s; ++i) {
            scalar_t* dst = grad_masks + ((n * q.G * q.kk + g * q.kk + t) * q.Ho + h * q.s + i) * q.Wo;
            interleave_row_any(dst, gm + (i * q.s * kkp + t) * q.Wv, kkp * q.Wv, q);
          }
        }
      }
    }
  }
}

template <typename scalar_t, bool Fused>
CARAFE_KERNEL void backward_tasks(const Args& a, int64_t begin, int64_t end) {
  switch (pick_pb(a.p.s)) {
    case 1: backward_tasks_impl<scalar_t, Fused, 1>(a, begin, end); break;
    case 3: backward_tasks_impl<scalar_t, Fused, 3>(a, begin, end); break;
    default: backward_tasks_impl<scalar_t, Fused, 4>(a, begin, end); break;
  }
}

// ---------------------------------------------------------------------------------------------
// Content-aware downsampling (carafe_down, carafe_down_fused; docs/design.md#the-contract):
//   out[c][i][j] = sum_{ky,kx} F[c][s*i + ky - r][s*j + kx - r] * M[g][t][i][j],    t = ky*k + kx
// The same kernels with the other addressing. The vector loops run over output columns j, on the
// output grid (Ho, Wo) = (ceil(H/s), ceil(W/s)) where the masks, logits, output and grad_output live
// (so their rows are staged as the up ops stage low-res rows: load_row, stage_softmax_row with s = 1).
// The full-resolution feature rows are split into s "phase rows" P[b][q] = F[y][s*q + b], so that tap
// kx of the columns [j, j + L) is one vector load (tap_offsets with s phases); forward_block and
// grad_masks_block are the up ops' own. grad_features is a gather again (gather_by_term): feature
// row y, phase b, column q collects the output pixels (i, j) with s*i + ky - r = y, s*j + kx - r = s*q + b,
// planned by gather_plan_down. Each task (n, g, output rows [i0, i1)) owns those output rows of the
// output and grad_masks, and the feature rows [s*i0, s*i1) of grad_features: no atomics, and a fixed
// summation order (taps in ky, kx order; grad_masks over channels in ascending order), so the results
// are bitwise identical for any thread count.
// ---------------------------------------------------------------------------------------------
struct DownGeo {
  Geo m;       // the output grid: H = Ho, W = Wo, s = 1; its rows are padded by R on either side
  int64_t H, W, s, r;
  int64_t R;   // ceil(r / s): how far (in output columns/rows) a tap reaches
  int64_t Wq;  // a phase row: [0, R) zeros, data, zeros up to Wv + 2R (= m.Wp)
  DownGeo(const Shape& p, int64_t lanes)
      : m(Shape{p.N, p.C, p.down_H(), p.down_W(), p.k, p.G, 1}, lanes), H(p.H), W(p.W), s(p.s), r(p.r()),
        R((p.r() + p.s - 1) / p.s) {
    m.r = R;
    m.Wp = m.Wv + 2 * R;
    Wq = m.Wp;
  }
};

// A feature row src[0, W) into s phase rows: dst[b*Wq + R + q] = src[s*q + b] (s*q + b < W), zeros elsewhere.
// S > 0: s known at compile time.
template <int S, typename acc_t, typename scalar_t>
CARAFE_INLINE void load_phases(acc_t* __restrict dst, const scalar_t* __restrict src, const DownGeo& d) {
  if (S == 1) {
    load_row(dst, src, d.m);  // one phase: a padded row (m.W = W, m.r = R = r)
    return;
  }
  const int64_t s = S > 0 ? S : d.s;
  zero_row(dst, s * d.Wq);
  acc_t* __restrict p = dst + d.R;
  const int64_t full = d.W / s;  // columns q with every phase inside the row
  if (S > 0) {
    for (int64_t q = 0; q < full; ++q)
      for (int64_t b = 0; b < S; ++b) p[b * d.Wq + q] = static_cast<acc_t>(src[q * S + b]);
  } else {
    for (int64_t b = 0; b < s; ++b)
      for (int64_t q = 0; q < full; ++q) p[b * d.Wq + q] = static_cast<acc_t>(src[q * s + b]);
  }
  for (int64_t x = full * s; x < d.W; ++x) p[(x - full * s) * d.Wq + full] = static_cast<acc_t>(src[x]);
}

template <typename acc_t, typename scalar_t>
CARAFE_INLINE void load_phases_any(acc_t* dst, const scalar_t* src, const DownGeo& d) {
  switch (d.s) {
    case 1: load_phases<1>(dst, src, d); break;
    case 2: load_phases<2>(dst, src, d); break;
    case 3: load_phases<3>(dst, src, d); break;
    case 4: load_phases<4>(dst, src, d); break;
    default: load_phases<0>(dst, src, d); break;
  }
}

// s phase rows (phase stride pstride, data at 0) into one feature row: dst[s*q + b] = src[b*pstride + q], < W.
template <typename scalar_t, typename acc_t>
CARAFE_INLINE void store_phases(scalar_t* __restrict dst, const acc_t* __restrict src, int64_t pstride,
                                const DownGeo& d) {
  const int64_t s = d.s;
  if (s == 1) {
    convert_row(dst, src, d.W);
    return;
  }
  const int64_t full = d.W / s;
  if (s == 2) {
    for (int64_t q = 0; q < full; ++q) {
      dst[2 * q] = narrow<scalar_t>(src[q]);
      dst[2 * q + 1] = narrow<scalar_t>(src[pstride + q]);
    }
  } else {
    for (int64_t b = 0; b < s; ++b)
      for (int64_t q = 0; q < full; ++q) dst[q * s + b] = narrow<scalar_t>(src[b * pstride + q]);
  }
  for (int64_t x = full * s; x < d.W; ++x) dst[x] = narrow<scalar_t>(src[(x - full * s) * pstride + full]);
}

// Plain masks of output row i: Ms[t][R + j] = masks[n, g*kk + t, i, j].
// zero_padded_taps: zero the entries of taps whose feature pixel (s*i + ky - r, s*j + kx - r) is in the
// zero padding, so that a non-finite mask value there contributes nothing (as the contract says),
// instead of 0 * inf = NaN (stage_masks_row does the same for the up ops).
template <typename scalar_t, typename acc_t>
CARAFE_INLINE void stage_down_masks_row(acc_t* __restrict Ms, const scalar_t* __restrict masks, const DownGeo& d,
                                        int64_t n, int64_t g, int64_t i, bool zero_padded_taps) {
  const Geo& q = d.m;
  for (int64_t t = 0; t < q.kk; ++t)
    load_row(Ms + t * q.Wp, masks + ((n * q.G * q.kk + g * q.kk + t) * q.H + i) * q.W, q);
  if (!zero_padded_taps) return;
  for (int64_t t = 0; t < q.kk; ++t) {
    const int64_t ky = t / q.k, kx = t % q.k;
    acc_t* row = Ms + t * q.Wp + q.r;
    const int64_t y = d.s * i + ky - d.r;
    if (y < 0 || y >= d.H) {
      zero_row(row, q.W);
      continue;
    }
    // columns j whose tap s*j + kx - r falls outside [0, W): j < left or j >= right
    const int64_t left = std::min<int64_t>(q.W, d.r - kx > 0 ? (d.r - kx + d.s - 1) / d.s : 0);
    const int64_t last = d.W - 1 + d.r - kx;  // s*j <= last
    const int64_t right = std::max<int64_t>(left, std::min<int64_t>(q.W, last < 0 ? 0 : last / d.s + 1));
    zero_row(row, left);
    zero_row(row + right, q.W - right);
  }
}

template <typename scalar_t, bool Fused>
CARAFE_KERNEL void forward_down_tasks(const Args& a, int64_t begin, int64_t end) {
  using acc_t = acc_type<scalar_t>;
  constexpr int CB = Blocking<1>::fwd_channels;
  const DownGeo d(a.p, VecOf<acc_t>::size);
  const Geo& q = d.m;
  const int64_t B = a.rows_per_task;
  const int64_t frows = d.s * (B - 1) + 2 * d.r + 1;  // feature rows s*i0 - r .. s*(i1 - 1) + r
  const auto* features = static_cast<const scalar_t*>(a.features);
  const auto* masks = static_cast<const scalar_t*>(a.masks);
  auto* out = static_cast<scalar_t*>(a.out);

  // Ms [B][kk][Wp]; Fp [frows][FC][s][Wq] (rows outside the image: not staged, their taps skipped);
  // rowbuf [CB][Wv].
  const int64_t ms_row = q.kk * q.Wp;
  const int64_t fch = d.s * d.Wq;  // one channel of a feature row
  const int64_t fc_budget = (int64_t{128} << 10) / static_cast<int64_t>(sizeof(acc_t) * frows * fch);
  const int64_t FC = std::min(round_up(std::max<int64_t>(q.Cg, 1), CB), std::max<int64_t>(CB, fc_budget / CB * CB));
  const int64_t fp_row = FC * fch;
  Scratch<acc_t> ms_buf(B * ms_row), fp_buf(frows * fp_row), row_buf(CB * q.Wv);
  acc_t* Ms = ms_buf.get();
  acc_t* Fp = fp_buf.get();
  acc_t* rowbuf = row_buf.get();
  int64_t tap_off[kMaxKernelSize * kMaxKernelSize];
  tap_offsets(tap_off, q.k, d.r, d.s, d.R, d.Wq, fp_row);

  for (int64_t task = begin; task < end; ++task) {
    const TaskRows tr = task_rows(task, q, B);
    const int64_t n = tr.n, g = tr.g, i0 = tr.h0, i1 = tr.h1;
    const int64_t y0 = d.s * i0 - d.r;  // the feature row of local row 0
    const int64_t ly_lo = std::max<int64_t>(0, -y0);
    const int64_t ly_hi = std::min<int64_t>(d.s * (i1 - i0 - 1) + 2 * d.r + 1, d.H - y0);
    for (int64_t i = i0; i < i1; ++i) {
      if (Fused) {
        stage_softmax_row(Ms + (i - i0) * ms_row, masks, q, n, g, i);
      } else {
        stage_down_masks_row(Ms + (i - i0) * ms_row, masks, d, n, g, i, /*zero_padded_taps=*/true);
      }
    }
    for (int64_t f0 = 0; f0 < q.Cg; f0 += FC) {
      const int64_t nf = std::min<int64_t>(FC, q.Cg - f0);
      const int64_t nfb = round_up(nf, CB);
      for (int64_t c = 0; c < nfb; ++c) {
        const int64_t channel = n * q.C + g * q.Cg + f0 + c;
        if (c + 1 < nf) prefetch_range(features + ((channel + 1) * d.H + y0 + ly_lo) * d.W, (ly_hi - ly_lo) * d.W);
        for (int64_t ly = ly_lo; ly < ly_hi; ++ly) {
          acc_t* dst = Fp + ly * fp_row + c * fch;
          if (c < nf) {
            load_phases_any(dst, features + (channel * d.H + y0 + ly) * d.W, d);
          } else {
            zero_row(dst, fch);  // a channel past the group's end: computed, never stored
          }
        }
      }
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t b = i - i0;
        // taps ky whose feature row s*i + ky - r lies in the image
        const int64_t ky0 = std::max<int64_t>(0, d.r - d.s * i);
        const int64_t ky1 = std::min<int64_t>(q.k, d.H - d.s * i + d.r);
        for (int64_t c0 = 0; c0 < nf; c0 += CB) {
          const int64_t nc = std::min<int64_t>(CB, nf - c0);
          const int64_t cbase = g * q.Cg + f0 + c0;
          forward_block<acc_t, CB, 1>(Ms + b * ms_row, Fp + d.s * b * fp_row + c0 * fch, tap_off, fch, rowbuf, q,
                                      ky0, ky1);
          for (int64_t cb = 0; cb < nc; ++cb)
            convert_row(out + ((n * q.C + cbase + cb) * q.H + i) * q.W, rowbuf + cb * q.Wv, q.W);
        }
      }
    }
  }
}

// The down gather of feature row y, phase b: rows e = ky, output rows i = (y + r - ky) / s (those ky
// that divide, i in the image; staged row i - i0 + R); shifts d = kx, columns j = q + (b + r - kx) / s
// (those kx that divide), at R + (b + r - kx) / s in a padded row. go and m must hold k and kk entries.
inline void gather_plan_down(GatherPlan& plan, const DownGeo& d, int64_t y, int64_t b, int64_t i0,
                             int64_t god_row) {
  const Geo& q = d.m;
  int64_t kxs[kMaxKernelSize];
  plan.nd = 0;
  for (int64_t kx = 0; kx < q.k; ++kx) {
    const int64_t numx = b + d.r - kx;
    if (((numx % d.s) + d.s) % d.s != 0) continue;
    kxs[plan.nd] = kx;
    plan.shift[plan.nd++] = d.R + numx / d.s;  // exact division
  }
  plan.ne = 0;
  for (int64_t ky = 0; ky < q.k; ++ky) {
    const int64_t num = y + d.r - ky;
    if (num < 0 || num % d.s != 0 || num / d.s >= q.H) continue;
    const int64_t lm = num / d.s - i0 + d.R;
    plan.go[plan.ne] = lm * god_row;
    for (int64_t dd = 0; dd < plan.nd; ++dd) plan.m[plan.ne * plan.nd + dd] = (lm * q.kk + ky * q.k + kxs[dd]) * q.Wp;
    ++plan.ne;
  }
}

// Backward of the down ops: task (n, g, output rows [i0, i1)), B = rows_per_task.
//   Ms     [B+2R][kk][Wp]        masks (softmax probabilities when fused) of output rows i0-R .. i1+R-1
//   God    [B+2R][CBLK][Wp]      grad_output of the same rows, for a block of CBLK channels
//   Fp     [frows][CBLK][s][Wq]  feature rows s*i0 - r .. s*(i1-1) + r of those channels (zeros outside)
//   gmacc  [B][kkp][Wv]          grad_masks accumulators
template <typename scalar_t, bool Fused>
CARAFE_KERNEL void backward_down_tasks(const Args& a, int64_t begin, int64_t end) {
  using acc_t = acc_type<scalar_t>;
  constexpr int TB = Blocking<1>::gm_taps;
  constexpr int CBG = kDownGatherChannels;
  constexpr int64_t CBLK = kBwdChannelBlock;
  const DownGeo d(a.p, VecOf<acc_t>::size);
  const Geo& q = d.m;
  const int64_t B = a.rows_per_task;
  const int64_t mrows = B + 2 * d.R;
  const int64_t frows = d.s * (B - 1) + 2 * d.r + 1;
  const int64_t kkp = round_up(q.kk, TB);
  const auto* features = static_cast<const scalar_t*>(a.features);
  const auto* masks = static_cast<const scalar_t*>(a.masks);
  const auto* grad_out = static_cast<const scalar_t*>(a.grad_output);
  auto* grad_features = static_cast<scalar_t*>(a.out);
  auto* grad_masks = static_cast<scalar_t*>(a.out2);
  // The output mask as in backward_tasks_impl: a null output is a gradient not asked for, skipped with
  // what only it needs (grad_masks alone: no gather, no halo rows of Ms / God, Ms only for the fused
  // softmax backward; grad_features alone: no feature rows, no gmacc). Same operands and summation
  // order as a full call, so the gradient computed is bitwise the same.
  const bool want_features = grad_features != nullptr, want_masks = grad_masks != nullptr;
  const bool need_ms = want_features || Fused;

  const int64_t ms_row = q.kk * q.Wp;
  const int64_t god_row = CBLK * q.Wp;
  const int64_t fch = d.s * d.Wq;
  const int64_t fp_row = CBLK * fch;
  const int64_t gm_row = kkp * q.Wv;
  Scratch<acc_t> ms_buf(need_ms ? mrows * ms_row : 0), god_buf(mrows * god_row),
      fp_buf(want_masks ? frows * fp_row : 0), gm_buf(want_masks ? B * gm_row : 0),
      row_buf(want_features ? d.s * CBG * q.Wv : 0);
  acc_t* Ms = ms_buf.get();
  acc_t* God = god_buf.get();
  acc_t* Fp = fp_buf.get();
  acc_t* gmacc = gm_buf.get();
  acc_t* rowbuf = row_buf.get();  // [s][CBG][Wv]: one feature row's phases
  // one plan per phase b: go [k], m [k][k]
  Scratch<int64_t> plan_buf(want_features ? d.s * q.k * (1 + q.k) : 0);
  GatherPlan plans[kMaxScaleFactor];
  for (int64_t b = 0; want_features && b < d.s; ++b) {
    plans[b].go = plan_buf.get() + b * q.k * (1 + q.k);
    plans[b].m = plans[b].go + q.k;
  }
  int64_t tap_off[kMaxKernelSize * kMaxKernelSize];
  tap_offsets(tap_off, q.k, d.r, d.s, d.R, d.Wq, fp_row);

  for (int64_t task = begin; task < end; ++task) {
    const TaskRows tr = task_rows(task, q, B);  // (q.r = R: lr_lo/lr_hi are the staged rows of Ms and God)
    const int64_t n = tr.n, g = tr.g, i0 = tr.h0, i1 = tr.h1, lm_lo = tr.lr_lo, lm_hi = tr.lr_hi;
    const int64_t nm = i1 - i0 + 2 * d.R;                   // staged output rows of this task
    const int64_t nf = d.s * (i1 - i0 - 1) + 2 * d.r + 1;  // staged feature rows
    const int64_t y0 = d.s * i0 - d.r;
    const int64_t ly_lo = std::max<int64_t>(0, -y0), ly_hi = std::min<int64_t>(nf, d.H - y0);
    const int64_t y_end = std::min<int64_t>(d.H, d.s * i1);  // grad_features rows [s*i0, y_end) are this task's

    // The gather reads the mask rows of the halo; the fused softmax backward alone reads only the
    // task's own rows (local rows [R, R + i1 - i0)).
    const int64_t ms_lo = want_features ? lm_lo : d.R;
    const int64_t ms_hi = want_features ? lm_hi : (need_ms ? d.R + i1 - i0 : d.R);
    for (int64_t lm = ms_lo; lm < ms_hi; ++lm) {
      const int64_t i = i0 - d.R + lm;
      if (Fused) {
        stage_softmax_row(Ms + lm * ms_row, masks, q, n, g, i);
      } else {
        stage_down_masks_row(Ms + lm * ms_row, masks, d, n, g, i, /*zero_padded_taps=*/false);
      }
    }
    if (want_masks) zero_row(gmacc, (i1 - i0) * gm_row);
    // grad_output rows: the gather reads the halo, grad_masks alone only the task's own rows
    const int64_t go_lo = want_features ? lm_lo : d.R, go_hi = want_features ? lm_hi : d.R + i1 - i0;

    for (int64_t c0 = 0; c0 < q.Cg; c0 += CBLK) {
      const int64_t nch = std::min<int64_t>(CBLK, q.Cg - c0);
      const int64_t cbase = g * q.Cg + c0;
      const int64_t ncg = round_up(nch, CBG);
      for (int64_t c = 0; c < ncg; ++c) {
        const int64_t channel = n * q.C + cbase + c;
        if (c + 1 < nch) {
          if (want_masks) prefetch_range(features + ((channel + 1) * d.H + y0 + ly_lo) * d.W, (ly_hi - ly_lo) * d.W);
          prefetch_range(grad_out + ((channel + 1) * q.H + i0 - d.R + go_lo) * q.W, (go_hi - go_lo) * q.W);
        }
        for (int64_t lm = 0; lm < nm; ++lm) {
          if (!want_features && (lm < d.R || lm >= d.R + i1 - i0)) continue;  // a halo row only the gather reads
          acc_t* dst = God + lm * god_row + c * q.Wp;
          if (c < nch && lm >= lm_lo && lm < lm_hi) {
            load_row(dst, grad_out + (channel * q.H + i0 - d.R + lm) * q.W, q);
          } else {
            zero_row(dst, q.Wp);
          }
        }
        for (int64_t ly = 0; want_masks && ly < nf; ++ly) {
          acc_t* dst = Fp + ly * fp_row + c * fch;
          if (c < nch && ly >= ly_lo && ly < ly_hi) {
            load_phases_any(dst, features + (channel * d.H + y0 + ly) * d.W, d);
          } else {
            zero_row(dst, fch);
          }
        }
      }
      for (int64_t y = d.s * i0; want_features && y < y_end; ++y) {
        for (int64_t b = 0; b < d.s; ++b) gather_plan_down(plans[b], d, y, b, i0, god_row);
        for (int64_t cg = 0; cg < nch; cg += CBG) {
          for (int64_t b = 0; b < d.s; ++b)
            gather_by_term<acc_t, CBG>(Ms, God + cg * q.Wp, q.Wp, plans[b], rowbuf + b * CBG * q.Wv, q.Wv);
          for (int64_t cb = 0; cb < std::min<int64_t>(CBG, nch - cg); ++cb)
            store_phases(grad_features + ((n * q.C + cbase + cg + cb) * d.H + y) * d.W, rowbuf + cb * q.Wv,
                         CBG * q.Wv, d);
        }
      }
      for (int64_t i = i0; want_masks && i < i1; ++i) {
        const int64_t b = i - i0;
        grad_masks_block<acc_t, TB, 1>(gmacc + b * gm_row, God + (b + d.R) * god_row + d.R, q.Wp,
                                       Fp + d.s * b * fp_row, tap_off, fch, q, nch, kkp);
      }
    }

    for (int64_t i = i0; want_masks && i < i1; ++i) {
      const int64_t b = i - i0;
      acc_t* gm = gmacc + b * gm_row;  // [kkp][Wv]: dL/dmask per (tap, j)
      if (Fused) softmax_backward(gm, q.Wv, Ms + (b + d.R) * ms_row + d.R, q.Wp, q.kk, q.Wv);
      for (int64_t t = 0; t < q.kk; ++t)
        convert_row(grad_masks + ((n * q.G * q.kk + g * q.kk + t) * q.H + i) * q.W, gm + t * q.Wv, q.W);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// dtype dispatch (compiled without the target attribute: it only calls the kernels)
// ---------------------------------------------------------------------------------------------
template <bool Fused>
void forward_range(const Args& a, int64_t begin, int64_t end) {
  switch (a.dtype) {
    case DType::kFloat: forward_tasks<float, Fused>(a, begin, end); break;
    case DType::kDouble: forward_tasks<double, Fused>(a, begin, end); break;
    case DType::kHalf: forward_tasks<c10::Half, Fused>(a, begin, end); break;
    case DType::kBFloat16: forward_tasks<c10::BFloat16, Fused>(a, begin, end); break;
  }
}

template <bool Fused>
void backward_range(const Args& a, int64_t begin, int64_t end) {
  switch (a.dtype) {
    case DType::kFloat: backward_tasks<float, Fused>(a, begin, end); break;
    case DType::kDouble: backward_tasks<double, Fused>(a, begin, end); break;
    case DType::kHalf: backward_tasks<c10::Half, Fused>(a, begin, end); break;
    case DType::kBFloat16: backward_tasks<c10::BFloat16, Fused>(a, begin, end); break;
  }
}

template <bool Fused>
void forward_down_range(const Args& a, int64_t begin, int64_t end) {
  switch (a.dtype) {
    case DType::kFloat: forward_down_tasks<float, Fused>(a, begin, end); break;
    case DType::kDouble: forward_down_tasks<double, Fused>(a, begin, end); break;
    case DType::kHalf: forward_down_tasks<c10::Half, Fused>(a, begin, end); break;
    case DType::kBFloat16: forward_down_tasks<c10::BFloat16, Fused>(a, begin, end); break;
  }
}

template <bool Fused>
void backward_down_range(const Args& a, int64_t begin, int64_t end) {
  switch (a.dtype) {
    case DType::kFloat: backward_down_tasks<float, Fused>(a, begin, end); break;
    case DType::kDouble: backward_down_tasks<double, Fused>(a, begin, end); break;
    case DType::kHalf: backward_down_tasks<c10::Half, Fused>(a, begin, end); break;
    case DType::kBFloat16: backward_down_tasks<c10::BFloat16, Fused>(a, begin, end); break;
  }
}

inline const KernelTable& kernel_table() {
  static const KernelTable table{CARAFE_CPU_ISA_NAME,        &forward_range<false>,      &forward_range<true>,
                                 &backward_range<false>,     &backward_range<true>,      &forward_down_range<false>,
                                 &forward_down_range<true>,  &backward_down_range<false>, &backward_down_range<true>};
  return table;
}

}  // namespace CARAFE_CPU_ISA
}  // namespace cpu
}  // namespace carafe

#undef CARAFE_INLINE
#undef CARAFE_KERNEL
#undef CARAFE_NO_LIBCALL
