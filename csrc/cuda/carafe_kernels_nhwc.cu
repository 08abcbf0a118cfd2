// CARAFE CUDA kernels for channels_last tensors: forward and backward of the up ops (carafe,
// carafe_fused) and the down ops (carafe_down, carafe_down_fused) reading channels_last features,
// masks / logits and grad_output in place and writing channels_last outputs and gradients
// (docs/design.md#channels_last-on-cuda). The NCHW kernels (carafe_kernels.cu) put the lanes of a warp
// along a row of one channel plane; in channels_last memory the contiguous axis is the channels, so
// here the lanes run over channels. Same contract as carafe_kernels.cu: no torch headers, raw pointers,
// every thread independent (no __syncthreads, no atomics, no warp shuffles), so the host emulation
// (CARAFE_CUDA_EMULATION, tests/test_cuda_build.py) runs these kernels too.
//
// Memory order (the logical shapes are those of carafe_kernels.h; Ho x Wo is the output grid, H*s x W*s
// for the up ops and ceil(H/s) x ceil(W/s) for the down ops):
//   features             [n][h][w][c]
//   masks                [n][y][x][g*k*k + t]
//   mask_logits          up: [n][h][w][(g*k*k + t)*s*s + i*s + j]; down: as the masks
//   output, grad_output  [n][y][x][c]
//
// Design:
//   forward      one thread = one output pixel x V channels, V = 16 bytes / element size when the
//                group's channel count Cg is a multiple of V and every base is 16-byte aligned (then a
//                channel vector never crosses a group and every access is one aligned 16-byte load or
//                store), else V = 1 (scalar, any alignment, any C). Lanes are consecutive channel
//                vectors of one pixel, then the next pixel: feature loads and output stores are
//                coalesced along C, and the k*k masks of (pixel, group) are one address for the Cg/V
//                lanes of a group (broadcast loads).
//                Why one output pixel and not a low-res position with its s*s sub-pixels (which would
//                load each feature vector once for s*s outputs): a thread then holds V accumulators for
//                every (k, s), so one kernel per dtype covers k <= 11, s <= 8 without register tiles
//                (at s = 8 a position would hold 64*V accumulators) and without templated variants
//                that could not be tuned without a GPU; the sub-pixels of one position are neighbouring
//                pixels of a row, taken by nearby threads, whose feature loads hit L1.
//   fused        the softmax of the logits is computed once per (output pixel, group) by
//                carafe_nhwc_softmax_kernel into an fp32 (fp64 for fp64) workspace in the masks' order,
//                which the plain kernels then read as their masks. Computing it in every channel thread
//                would repeat k*k exponentials Cg/V times per pixel and group. So the fused forward takes
//                a workspace as the backward does (the glue takes it from the caching allocator).
//   grad_features  a gather: one thread = one feature pixel x V channels sums grad_out times masks
//                over the output pixels whose window covers it, in a fixed order (up: the rectangle of
//                those pixels row by row; down: only the ceil(k/s)^2 taps that reach it). No atomics.
//   grad_masks   one thread = one (output pixel, group, tap): the sum over the group's channels, in
//                ascending order, of features times grad_out (V channels per load when vectors apply,
//                still added one after another, so V does not change the bits). Lanes are consecutive
//                taps of one pixel: their grad_out vector is one address (broadcast), and each reads
//                a contiguous run of Cg feature channels that neighbouring taps reuse from L1. A
//                reduction across lanes would need shuffles or shared memory with a barrier, which the
//                emulation contract excludes. For the fused op the sums go to the workspace and
//                carafe_nhwc_softmax_backward_kernel (one thread per (output pixel, group)) writes
//                p_t (dp_t - sum_t' p_t' dp_t') to the logits' order.
//   output_mask  a null gradient pointer launches nothing for it; the other gradient's kernels and
//                operands are those of a full call, so its bits are the same.
//
// Indices: items are decoded with 32-bit divisions (a 64-bit division is a called subroutine on the GPU,
// a 32-bit one a short inline sequence), so one launch takes as many whole images as keep its
// items below 2^31, and the launchers loop over such chunks (one launch for any usual batch). Element
// offsets are pixel indices times a channel count, in 64 bits. So one image of each tensor must have
// fewer than 2^31 elements (carafe_nhwc_unsupported_reason; the glue runs larger images on the NCHW
// kernels), on top of unsupported_reason's bounds.
//
// Numerics as carafe_kernels.cu: fp16/bf16 loaded in their dtype, accumulated in fp32, stored in their
// dtype; fp64 in fp64; the softmax with the max subtracted and expf.

#include "carafe_cuda_common.cuh"

namespace carafe {
namespace cuda {
namespace {
namespace nhwc {

constexpr int kThreads = 128;

// Elements per 16-byte vector.
template <typename T> constexpr int kVec = 16 / static_cast<int>(sizeof(T));

// The extents of one launch (a chunk of images, images_per_launch): every item count of its kernels, and
// every pixel index, is below 2^31, so the kernels decode items with 32-bit divisions (a 64-bit division
// is a called subroutine on the GPU); element offsets are pixel indices times a channel count, computed
// in 64 bits.
struct Geometry {
  int N;        // images of this launch
  int C, H, W;  // features
  int Ho, Wo;   // output, grad_output, masks (and the down ops' logits)
  int k, s, G, Cg;
  int MC;       // mask channels per pixel, G*k*k (masks, probabilities, the fused mask-gradient sums)
};

Geometry geometry(const Shape& p, bool down) {
  Geometry q{};
  q.N = 0;
  q.C = static_cast<int>(p.C);
  q.H = static_cast<int>(p.H);
  q.W = static_cast<int>(p.W);
  q.Ho = static_cast<int>(down ? p.down_H() : p.Ho());
  q.Wo = static_cast<int>(down ? p.down_W() : p.Wo());
  q.k = static_cast<int>(p.k);
  q.s = static_cast<int>(p.s);
  q.G = static_cast<int>(p.G);
  q.Cg = static_cast<int>(p.C / p.G);
  q.MC = static_cast<int>(p.G * p.kk());
  return q;
}

// Elements of one image: features, output (and grad_output), masks (the same count for the logits, the
// probabilities and the mask-gradient sums: H*W*G*k*k*s*s = Ho*Wo*G*k*k for the up ops).
struct ImageSizes {
  int64_t features, output, masks;
};
ImageSizes image_sizes(const Shape& p, bool down) {
  const int64_t plane_out = down ? p.down_H() * p.down_W() : p.Ho() * p.Wo();
  return ImageSizes{p.H * p.W * p.C, plane_out * p.C, plane_out * p.G * p.kk()};
}

// The most images one launch may take so that all its items and pixel indices stay within
// launch.max_launch_items (at most 2^31 - 1); at least one: carafe_nhwc_unsupported_reason refuses an
// image of 2^31 elements or more in any tensor.
int64_t images_per_launch(const Shape& p, bool down, const LaunchParams& launch) {
  const ImageSizes im = image_sizes(p, down);
  const int64_t largest = std::max({im.features, im.output, im.masks, int64_t{1}});
  const int64_t cap = std::min<int64_t>(launch.max_launch_items, std::numeric_limits<int32_t>::max());
  return std::max<int64_t>(1, cap / largest);
}

// The feature row (or column) at the centre of output row o's window: o / s for the up ops, s*o for the
// down ops (docs/design.md#the-contract).
template <bool DOWN> CK_DEVICE int centre(int o, int s) { return DOWN ? o * s : o / s; }

// An output pixel of the launch: image n, row y, column x, and its index pix = (n*Ho + y)*Wo + x.
struct Pixel {
  int n, pix, y, x;
};
CK_DEVICE Pixel output_pixel(int pix, const Geometry& q) {
  const int ny = pix / q.Wo;
  return Pixel{ny / q.Ho, pix, ny % q.Ho, pix % q.Wo};
}

// The logit of tap 0 of group g for output pixel px; the next tap is logit_tap_stride further. Up ops:
// channel (g*k*k + t)*s*s + i*s + j at low-res pixel (y / s, x / s) with (i, j) = (y % s, x % s) (the
// pixel shuffle of docs/design.md#the-contract); down ops: channel g*k*k + t at (y, x), as the masks.
template <bool DOWN> CK_DEVICE int64_t logit_base(const Geometry& q, const Pixel& px, int g) {
  if (DOWN) return static_cast<int64_t>(px.pix) * q.MC + g * q.k * q.k;
  const int ss = q.s * q.s;
  return static_cast<int64_t>((px.n * q.H + px.y / q.s) * q.W + px.x / q.s) * (static_cast<int64_t>(q.MC) * ss) +
         g * q.k * q.k * ss + (px.y % q.s) * q.s + px.x % q.s;
}
template <bool DOWN> CK_DEVICE int logit_tap_stride(const Geometry& q) { return DOWN ? 1 : q.s * q.s; }

// Grid-stride loop over the launch's items (fewer than 2^31): `it` is the item as an int; the loop
// counter is 64-bit so that adding the stride cannot overflow.
#define CK_NHWC_ITEMS(it, items)                                                                           \
  for (int64_t it##_64 = static_cast<int64_t>(CK_BLOCK_X) * CK_BLOCK_DIM_X + CK_THREAD_X; it##_64 < (items); \
       it##_64 += static_cast<int64_t>(CK_GRID_DIM_X) * CK_BLOCK_DIM_X)                                    \
    if (const int it = static_cast<int>(it##_64); true)

// ====================================================================================================
// Forward: item = (output pixel, channel vector), vector fastest.
//   out[n, y, x, c + v] = sum_t features[n, cy + ky - r, cx + kx - r, c + v] * m[n, y, x, g*k*k + t]
// with (cy, cx) the window's centre, t = ky*k + kx, taps outside the image skipped (zero padding).
// M: T masks, or the fused op's softmax probabilities (accumulation type) in the masks' order.
// ====================================================================================================
template <typename T, typename M, int V, bool DOWN>
CK_GLOBAL void CK_LAUNCH_BOUNDS(kThreads) carafe_nhwc_forward_kernel(
    const T* __restrict__ features,  // [N][H][W][C]
    const M* __restrict__ masks,     // [N][Ho][Wo][G*k*k]
    T* __restrict__ out,             // [N][Ho][Wo][C]
    const Geometry q, const int items) {
  using A = acc_t<T>;
  const int CV = q.C / V, r = (q.k - 1) / 2;
  CK_NHWC_ITEMS(it, items) {
    const Pixel px = output_pixel(it / CV, q);
    const int c = (it - px.pix * CV) * V;
    const int cy = centre<DOWN>(px.y, q.s), cx = centre<DOWN>(px.x, q.s);
    const M* mp = masks + static_cast<int64_t>(px.pix) * q.MC + (c / q.Cg) * q.k * q.k;
    const T* fimg = features + static_cast<int64_t>(px.n * q.H * q.W) * q.C + c;
    A acc[V];
#pragma unroll
    for (int v = 0; v < V; ++v) acc[v] = 0;
    for (int ky = 0; ky < q.k; ++ky) {
      const int yy = cy + ky - r;
      if (yy < 0 || yy >= q.H) continue;
      for (int kx = 0; kx < q.k; ++kx) {
        const int xx = cx + kx - r;
        if (xx < 0 || xx >= q.W) continue;
        const A mv = to_acc(ldg(mp + ky * q.k + kx));
        A fv[V];
        load_row<T, V>(fimg + static_cast<int64_t>(yy * q.W + xx) * q.C, fv);
#pragma unroll
        for (int v = 0; v < V; ++v) acc[v] += fv[v] * mv;
      }
    }
    store_row<T, V>(out + static_cast<int64_t>(px.pix) * q.C + c, acc);
  }
}

// ====================================================================================================
// The fused ops' probabilities: item = (output pixel, group); probs[n, y, x, g*k*k + t] = the softmax
// over t of the pixel's logits (max subtracted), in the accumulation type. Read by the forward and by
// both gradients, so every path sees the same probabilities.
// ====================================================================================================
template <typename T, bool DOWN>
CK_GLOBAL void CK_LAUNCH_BOUNDS(kThreads) carafe_nhwc_softmax_kernel(
    const T* __restrict__ logits,   // up: [N][H][W][G*k*k*s*s]; down: [N][Ho][Wo][G*k*k]
    acc_t<T>* __restrict__ probs,   // [N][Ho][Wo][G*k*k]
    const Geometry q, const int items) {
  using A = acc_t<T>;
  const int kk = q.k * q.k, ts = logit_tap_stride<DOWN>(q);
  CK_NHWC_ITEMS(it, items) {
    const int g = it % q.G;
    const Pixel px = output_pixel(it / q.G, q);
    const T* lp = logits + logit_base<DOWN>(q, px, g);
    A* pp = probs + static_cast<int64_t>(px.pix) * q.MC + g * kk;
    A mx = neg_inf<A>();
    for (int t = 0; t < kk; ++t) {
      const A l = to_acc(ldg(lp + t * ts));
      mx = l > mx ? l : mx;
    }
    A sum = 0;
    for (int t = 0; t < kk; ++t) sum += exp_acc(to_acc(ldg(lp + t * ts)) - mx);
    const A inv = A(1) / sum;
    for (int t = 0; t < kk; ++t) pp[t] = exp_acc(to_acc(ldg(lp + t * ts)) - mx) * inv;
  }
}

// acc[v] += grad_out[o, c + v] * m[o, tap], for output pixel o of the image (a term of the gather).
template <typename T, typename M, int V>
CK_DEVICE void gather_term(const T* gimg, const M* mimg, const Geometry& q, int o, int tap, acc_t<T> (&acc)[V]) {
  using A = acc_t<T>;
  const A mv = to_acc(ldg(mimg + static_cast<int64_t>(o) * q.MC + tap));
  A gv[V];
  load_row<T, V>(gimg + static_cast<int64_t>(o) * q.C, gv);
#pragma unroll
  for (int v = 0; v < V; ++v) acc[v] += gv[v] * mv;
}

// ====================================================================================================
// grad_features, a gather: item = (feature pixel (h, w), channel vector). Up ops: tap (ky, kx) of the
// output pixels (y, x) of source position (hs, ws) = (y / s, x / s) = (h + r - ky, w + r - kx) reads
// (h, w), so
//   grad_features[n, h, w, c] = sum over those (y, x) of grad_out[n, y, x, c] * m[n, y, x, g*k*k + t]
// summed in ascending (y, x) order. Down ops: only taps ky = (h + r) % s + s*a of output row
// (h + r) / s - a reach row h (columns alike), summed in (a, b) order. M as in the forward.
// NB: no __launch_bounds__ here. With __launch_bounds__(128), ptxas held the up gather to 32-40
// registers (a full-occupancy target) and spilled a few values in most of its instances (sm_80 and
// sm_90); without it the same code takes 32-48 registers and spills nothing (tests/test_cuda_build.py).
// ====================================================================================================
template <typename T, typename M, int V, bool DOWN>
CK_GLOBAL void carafe_nhwc_backward_features_kernel(
    const T* __restrict__ grad_out,  // [N][Ho][Wo][C]
    const M* __restrict__ masks,     // [N][Ho][Wo][G*k*k]
    T* __restrict__ grad_features,   // [N][H][W][C]
    const Geometry q, const int items) {
  using A = acc_t<T>;
  const int CV = q.C / V, r = (q.k - 1) / 2, k = q.k, s = q.s;
  CK_NHWC_ITEMS(it, items) {
    const int fpix = it / CV;  // (n*H + h)*W + w
    const int c = (it - fpix * CV) * V;
    const int w = fpix % q.W, nh = fpix / q.W;
    const int h = nh % q.H, n = nh / q.H;
    const int img = n * q.Ho * q.Wo;  // the image's first output pixel
    const T* gimg = grad_out + static_cast<int64_t>(img) * q.C + c;
    const M* mimg = masks + static_cast<int64_t>(img) * q.MC + (c / q.Cg) * k * k;
    A acc[V];
#pragma unroll
    for (int v = 0; v < V; ++v) acc[v] = 0;
    if constexpr (DOWN) {
      for (int ky = (h + r) % s, i = (h + r) / s; ky < k; ky += s, --i) {
        if (i < 0 || i >= q.Ho) continue;
        for (int kx = (w + r) % s, j = (w + r) / s; kx < k; kx += s, --j) {
          if (j < 0 || j >= q.Wo) continue;
          gather_term<T, M, V>(gimg, mimg, q, i * q.Wo + j, ky * k + kx, acc);
        }
      }
    } else {
      // The output pixels whose windows cover (h, w) form one rectangle: the rows y of the source rows
      // hs = y / s within r of h (and inside the image), tap row ky = h + r - hs; columns alike. Walked
      // row by row, each row's pixels by pointer steps, in ascending (y, x) order.
      const int y0 = imax(0, h - r) * s, y1 = (imin(q.H - 1, h + r) + 1) * s;
      const int ws0 = imax(0, w - r), ws1 = imin(q.W - 1, w + r);
      for (int y = y0; y < y1; ++y) {
        const int o = y * q.Wo + ws0 * s;  // the row's first output pixel
        const T* gp = gimg + static_cast<int64_t>(o) * q.C;
        const M* mp = mimg + static_cast<int64_t>(o) * q.MC + (h + r - y / s) * k + (w + r - ws0);
        for (int ws = ws0; ws <= ws1; ++ws, --mp) {  // tap column kx = w + r - ws: one less per source column
          for (int j = 0; j < s; ++j, gp += q.C, mp += q.MC) {
            const A mv = to_acc(ldg(mp));
            A gv[V];
            load_row<T, V>(gp, gv);
#pragma unroll
            for (int v = 0; v < V; ++v) acc[v] += gv[v] * mv;
          }
        }
      }
    }
    store_row<T, V>(grad_features + static_cast<int64_t>(fpix) * q.C + c, acc);
  }
}

// ====================================================================================================
// grad_masks, a reduction over the group's channels: item = (output pixel, group, tap), tap fastest, so
// item is also the index of its element in [N][Ho][Wo][G*k*k]:
//   dst[n, y, x, g*k*k + t] = sum over c of the group, ascending: features[n, cy + ky - r, cx + kx - r, c] *
//                             grad_out[n, y, x, c]
// 0 for a tap outside the image. D: T (the plain ops' gradient itself) or the accumulation type (the
// fused ops' sums, for carafe_nhwc_softmax_backward_kernel).
// ====================================================================================================
template <typename T, typename D, int V, bool DOWN>
CK_GLOBAL void CK_LAUNCH_BOUNDS(kThreads) carafe_nhwc_backward_masks_kernel(
    const T* __restrict__ grad_out,  // [N][Ho][Wo][C]
    const T* __restrict__ features,  // [N][H][W][C]
    D* __restrict__ dst,             // [N][Ho][Wo][G*k*k]
    const Geometry q, const int items) {
  using A = acc_t<T>;
  const int r = (q.k - 1) / 2, kk = q.k * q.k;
  CK_NHWC_ITEMS(it, items) {
    const int mc = it % q.MC, g = mc / kk, t = mc % kk;
    const Pixel px = output_pixel(it / q.MC, q);
    const int yy = centre<DOWN>(px.y, q.s) + t / q.k - r, xx = centre<DOWN>(px.x, q.s) + t % q.k - r;
    A acc = 0;
    if (yy >= 0 && yy < q.H && xx >= 0 && xx < q.W) {
      const T* fp = features + static_cast<int64_t>((px.n * q.H + yy) * q.W + xx) * q.C + g * q.Cg;
      const T* gp = grad_out + static_cast<int64_t>(px.pix) * q.C + g * q.Cg;
      for (int c = 0; c < q.Cg; c += V) {
        A fv[V], gv[V];
        load_row<T, V>(fp + c, fv);
        load_row<T, V>(gp + c, gv);
#pragma unroll
        for (int v = 0; v < V; ++v) acc += fv[v] * gv[v];
      }
    }
    dst[it] = from_acc<D>(acc);
  }
}

// ====================================================================================================
// The fused ops' mask gradient from the sums dp (the plain ops' gradient of the probabilities): item =
// (output pixel, group); grad_logits at tap t = p_t (dp_t - sum_t' p_t' dp_t'), in the logits' order.
// ====================================================================================================
template <typename T, bool DOWN>
CK_GLOBAL void CK_LAUNCH_BOUNDS(kThreads) carafe_nhwc_softmax_backward_kernel(
    const acc_t<T>* __restrict__ dp,     // [N][Ho][Wo][G*k*k]
    const acc_t<T>* __restrict__ probs,  // [N][Ho][Wo][G*k*k]
    T* __restrict__ grad_logits,         // the logits' order (see carafe_nhwc_softmax_kernel)
    const Geometry q, const int items) {
  using A = acc_t<T>;
  const int kk = q.k * q.k, ts = logit_tap_stride<DOWN>(q);
  CK_NHWC_ITEMS(it, items) {
    const int g = it % q.G;
    const Pixel px = output_pixel(it / q.G, q);
    const int64_t pm = static_cast<int64_t>(px.pix) * q.MC + g * kk;
    A dot = 0;
    for (int t = 0; t < kk; ++t) dot += ldg(probs + pm + t) * ldg(dp + pm + t);
    T* lp = grad_logits + logit_base<DOWN>(q, px, g);
    for (int t = 0; t < kk; ++t) lp[t * ts] = from_acc<T>(ldg(probs + pm + t) * (ldg(dp + pm + t) - dot));
  }
}

#undef CK_NHWC_ITEMS

// ====================================================================================================
// Launchers
// ====================================================================================================
// Whether a call can use 16-byte vectors: the group's channels are whole vectors (so every pixel's
// channel run, and every group's, starts on a vector) and every base is 16-byte aligned. Null pointers
// (a gradient not asked for) do not count. Decided once per call, for all its launches (their bases
// are whole images further, C elements per pixel, so they stay aligned).
template <typename T> bool vectors_ok(const Geometry& q, std::initializer_list<const void*> ptrs) {
  if (q.Cg % kVec<T> != 0) return false;
  for (const void* ptr : ptrs)
    if (ptr != nullptr && !aligned16(ptr)) return false;
  return true;
}

// Calls f(integral_constant<int, V>) with the vector width of the call.
template <typename T, typename F> void with_vector_width(bool vectors, F&& f) {
  if (vectors)
    f(std::integral_constant<int, kVec<T>>{});
  else
    f(std::integral_constant<int, 1>{});
}

// Calls f(q, n0) for every chunk of images_per_launch images (q.N: the chunk's images, n0 its first).
template <typename F> void for_each_launch(const Shape& p, bool down, const LaunchParams& launch, F&& f) {
  const int64_t per_launch = images_per_launch(p, down, launch);
  Geometry q = geometry(p, down);
  for (int64_t n0 = 0; n0 < p.N; n0 += per_launch) {
    q.N = static_cast<int>(std::min(per_launch, p.N - n0));
    f(q, n0);
  }
}

// The items of a launch, as the kernels take them (below 2^31 by images_per_launch).
inline int launch_items(int64_t items) { return static_cast<int>(items); }

// Workspace: [probs (fused)] [mask-gradient sums (fused, grad_masks asked for)], each 256-byte aligned,
// both [N][Ho][Wo][G*k*k] in the accumulation type.
template <typename T> size_t table_bytes(const Shape& p, bool down) {
  return align_up(static_cast<size_t>(p.N * image_sizes(p, down).masks) * sizeof(acc_t<T>));
}

template <typename T, bool DOWN>
cudaError_t forward_impl(const Shape& p, bool fused, const T* features, const T* masks, T* out, void* workspace,
                         size_t workspace_bytes, const LaunchParams& launch) {
  using A = acc_t<T>;
  if (fused && workspace_bytes < table_bytes<T>(p, DOWN)) return cudaErrorInvalidValue;
  const ImageSizes im = image_sizes(p, DOWN);
  A* probs = static_cast<A*>(workspace);
  const bool vectors = vectors_ok<T>(geometry(p, DOWN), {features, out});
  for_each_launch(p, DOWN, launch, [&](const Geometry& q, int64_t n0) {
    const T* f = features + n0 * im.features;
    const T* m = masks + n0 * im.masks;
    T* o = out + n0 * im.output;
    A* pr = fused ? probs + n0 * im.masks : nullptr;
    if (fused) {
      const int items = launch_items(int64_t{q.N} * q.Ho * q.Wo * q.G);
      launch_kernel(carafe_nhwc_softmax_kernel<T, DOWN>, grid_for_items(items, kThreads, launch), kThreads, 0,
                    launch.stream, m, pr, q, items);
    }
    with_vector_width<T>(vectors, [&](auto vw) {
      constexpr int V = decltype(vw)::value;
      const int items = launch_items(int64_t{q.N} * q.Ho * q.Wo * (q.C / V));
      if (fused)
        launch_kernel(carafe_nhwc_forward_kernel<T, A, V, DOWN>, grid_for_items(items, kThreads, launch), kThreads,
                      0, launch.stream, f, static_cast<const A*>(pr), o, q, items);
      else
        launch_kernel(carafe_nhwc_forward_kernel<T, T, V, DOWN>, grid_for_items(items, kThreads, launch), kThreads,
                      0, launch.stream, f, m, o, q, items);
    });
  });
  return last_error();
}

template <typename T>
size_t backward_workspace_bytes(const Shape& p, bool down, bool fused, bool grad_masks) {
  return fused ? table_bytes<T>(p, down) * (grad_masks ? 2 : 1) : 0;
}

template <typename T, bool DOWN>
cudaError_t backward_impl(const Shape& p, bool fused, const T* grad_out, const T* features, const T* masks,
                          T* grad_features, T* grad_masks, void* workspace, size_t workspace_bytes,
                          const LaunchParams& launch) {
  using A = acc_t<T>;
  if (workspace_bytes < backward_workspace_bytes<T>(p, DOWN, fused, grad_masks != nullptr))
    return cudaErrorInvalidValue;
  const ImageSizes im = image_sizes(p, DOWN);
  A* probs = fused ? static_cast<A*>(workspace) : nullptr;
  A* sums = fused && grad_masks != nullptr
                ? reinterpret_cast<A*>(static_cast<unsigned char*>(workspace) + table_bytes<T>(p, DOWN)) : nullptr;
  const Geometry whole = geometry(p, DOWN);
  const bool gather_vectors = vectors_ok<T>(whole, {grad_out, grad_features});
  const bool reduce_vectors = vectors_ok<T>(whole, {grad_out, features});
  for_each_launch(p, DOWN, launch, [&](const Geometry& q, int64_t n0) {
    const T* go = grad_out + n0 * im.output;
    const T* f = features + n0 * im.features;
    const T* m = masks + n0 * im.masks;
    A* pr = fused ? probs + n0 * im.masks : nullptr;
    // 1. The fused op's probabilities (read by both gradients).
    if (fused) {
      const int items = launch_items(int64_t{q.N} * q.Ho * q.Wo * q.G);
      launch_kernel(carafe_nhwc_softmax_kernel<T, DOWN>, grid_for_items(items, kThreads, launch), kThreads, 0,
                    launch.stream, m, pr, q, items);
    }
    // 2. grad_features (gather), when asked for.
    if (grad_features != nullptr) {
      T* gf = grad_features + n0 * im.features;
      with_vector_width<T>(gather_vectors, [&](auto vw) {
        constexpr int V = decltype(vw)::value;
        const int items = launch_items(int64_t{q.N} * q.H * q.W * (q.C / V));
        if (fused)
          launch_kernel(carafe_nhwc_backward_features_kernel<T, A, V, DOWN>, grid_for_items(items, kThreads, launch),
                        kThreads, 0, launch.stream, go, static_cast<const A*>(pr), gf, q, items);
        else
          launch_kernel(carafe_nhwc_backward_features_kernel<T, T, V, DOWN>, grid_for_items(items, kThreads, launch),
                        kThreads, 0, launch.stream, go, m, gf, q, items);
      });
    }
    // 3. grad_masks (reduction over channels), for the fused op through the softmax backward; when asked for.
    if (grad_masks != nullptr) {
      T* gm = grad_masks + n0 * im.masks;
      A* sm = fused ? sums + n0 * im.masks : nullptr;
      with_vector_width<T>(reduce_vectors, [&](auto vw) {
        constexpr int V = decltype(vw)::value;
        const int items = launch_items(int64_t{q.N} * q.Ho * q.Wo * q.MC);
        if (fused)
          launch_kernel(carafe_nhwc_backward_masks_kernel<T, A, V, DOWN>, grid_for_items(items, kThreads, launch),
                        kThreads, 0, launch.stream, go, f, sm, q, items);
        else
          launch_kernel(carafe_nhwc_backward_masks_kernel<T, T, V, DOWN>, grid_for_items(items, kThreads, launch),
                        kThreads, 0, launch.stream, go, f, gm, q, items);
      });
      if (fused) {
        const int items = launch_items(int64_t{q.N} * q.Ho * q.Wo * q.G);
        launch_kernel(carafe_nhwc_softmax_backward_kernel<T, DOWN>, grid_for_items(items, kThreads, launch), kThreads,
                      0, launch.stream, static_cast<const A*>(sm), static_cast<const A*>(pr), gm, q, items);
      }
    }
  });
  return last_error();
}

}  // namespace nhwc
}  // namespace

const char* carafe_nhwc_unsupported_reason(const Shape& p, bool down) {
  if (const char* why = unsupported_reason(p, down)) return why;
  const nhwc::ImageSizes im = nhwc::image_sizes(p, down);
  if (std::max({im.features, im.output, im.masks}) > std::numeric_limits<int32_t>::max())
    return "one channels_last image (features, output or masks) must have fewer than 2^31 elements";
  return nullptr;
}

size_t carafe_nhwc_forward_workspace_bytes(const Shape& p, DType dtype, bool fused, bool down) {
  if (!fused || carafe_nhwc_unsupported_reason(p, down) != nullptr || p.N * p.C * p.H * p.W == 0) return 0;
  size_t bytes = 0;
  dispatch_dtype(dtype, [&](auto tag) {
    bytes = nhwc::table_bytes<decltype(tag)>(p, down);
    return cudaSuccess;
  });
  return bytes;
}

cudaError_t carafe_nhwc_forward(const Shape& p, DType dtype, bool fused, bool down, const void* features,
                                const void* masks, void* output, void* workspace, size_t workspace_bytes,
                                const LaunchParams& launch) {
  if (carafe_nhwc_unsupported_reason(p, down) != nullptr) return cudaErrorInvalidValue;
  if (p.N * p.C * p.H * p.W == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* f = static_cast<const T*>(features);
    const T* m = static_cast<const T*>(masks);
    T* out = static_cast<T*>(output);
    return down ? nhwc::forward_impl<T, true>(p, fused, f, m, out, workspace, workspace_bytes, launch)
                : nhwc::forward_impl<T, false>(p, fused, f, m, out, workspace, workspace_bytes, launch);
  });
}

size_t carafe_nhwc_backward_workspace_bytes(const Shape& p, DType dtype, bool fused, bool down, bool grad_masks) {
  if (carafe_nhwc_unsupported_reason(p, down) != nullptr || p.N * p.C * p.H * p.W == 0) return 0;
  size_t bytes = 0;
  dispatch_dtype(dtype, [&](auto tag) {
    bytes = nhwc::backward_workspace_bytes<decltype(tag)>(p, down, fused, grad_masks);
    return cudaSuccess;
  });
  return bytes;
}

cudaError_t carafe_nhwc_backward(const Shape& p, DType dtype, bool fused, bool down, const void* grad_output,
                                 const void* features, const void* masks, void* grad_features, void* grad_masks,
                                 void* workspace, size_t workspace_bytes, const LaunchParams& launch) {
  if (carafe_nhwc_unsupported_reason(p, down) != nullptr) return cudaErrorInvalidValue;
  // Empty extents, or no gradient asked for: nothing to launch (as carafe_backward).
  if (p.N * p.C * p.H * p.W == 0 || (grad_features == nullptr && grad_masks == nullptr)) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* go = static_cast<const T*>(grad_output);
    const T* f = static_cast<const T*>(features);
    const T* m = static_cast<const T*>(masks);
    T* gf = static_cast<T*>(grad_features);
    T* gm = static_cast<T*>(grad_masks);
    return down ? nhwc::backward_impl<T, true>(p, fused, go, f, m, gf, gm, workspace, workspace_bytes, launch)
                : nhwc::backward_impl<T, false>(p, fused, go, f, m, gf, gm, workspace, workspace_bytes, launch);
  });
}

}  // namespace cuda
}  // namespace carafe
