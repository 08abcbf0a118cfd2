// CARAFE CUDA kernels: forward and backward of carafe (normalised masks, mmcv semantics) and of
// carafe_fused (mask logits: pixel shuffle + per-group softmax + reassembly in one pass), on contiguous
// NCHW tensors; channels_last tensors have kernels of their own (carafe_kernels_nhwc.cu), and the
// emulation switch, element types, vector accesses and launch plumbing are shared with them
// (carafe_cuda_common.cuh).
//
// No torch headers: the launchers at the bottom take raw pointers (see carafe_kernels.h). Built with
// -DCARAFE_CUDA_EMULATION by a host compiler, the same code runs every "thread" sequentially on the
// CPU, which is how tests/test_cuda_build.py checks the index maths without a GPU. That is also why no
// kernel uses __syncthreads: every thread is independent, and shared memory (generic kernels only) is
// a per-thread scratch column.
//
// Design (docs/design.md#cost-model-and-floor). Symbols: k taps per side (K when a template
// argument), r = (k-1)/2, s the scale (S), G groups, Cg = C/G channels per group, one "position" =
// one low-res pixel (h, w).
// Templated kernels ("tiled") cover k in {1,3,5,7} x s in {1,2,4} for fp32/fp16/bf16; the rest runs on
// the generic kernels.
//
//   forward, tiled    one thread = one position x SR sub-pixel rows (all s columns) x a chunk of the
//                     group's channels. Its k*k*SR*s masks (the softmax of its logits, for the fused op)
//                     live in registers (SR = s when they fit a 128-value budget: all s*s outputs of the
//                     position at k=5, s=2); per channel it loads the k x k feature window once
//                     (read-only path; the L1 serves the overlap between neighbouring threads) and does
//                     k*k*SR*s FMAs from it. Lanes are consecutive positions along a row, so feature and
//                     logit loads are coalesced, and the s outputs of a sub-row are one s-wide vector
//                     store, contiguous across the warp. The normalised masks never touch memory.
//                     NB: taps outside the image read a clamped in-window pixel with mask 0, so the
//                     channel loop has no predicates (about 166 instructions per 100 FFMA at k5 s2).
//   backward          grad_features is a gather: a thread owns a position (h', w') and sums, for every
//                     tap (ky, kx) and sub-pixel (i, j), grad_out at the output pixel whose window puts
//                     (h', w') at that tap, times that pixel's mask (all k*k*s*s in registers).
//                     grad_masks is a reduction over the group's channels: a thread owns a position and
//                     SR sub-rows, accumulates k*k*SR*s values over its channels, then, for the fused
//                     op, applies the softmax backward dL/dl_t = p_t (dL/dp_t - sum_t' p_t' dL/dp_t')
//                     in registers, written straight to logit channel (g*k*k + t)*s*s + i*s + j.
//                     When the channels are split across blocks for parallelism, each chunk writes fp32
//                     partial sums to a workspace that a second kernel adds in chunk order. The fused
//                     backward first writes the softmax probabilities (fp32, logits' layout) to the
//                     workspace: both gradients read them. No atomics anywhere: bitwise deterministic.
//                     A gradient not asked for (a null output pointer: the op's output_mask) launches
//                     nothing, and a features-only backward needs no partial sums in the workspace; the
//                     gradient computed is bitwise the one of a full call.
//   generic           runtime k <= kMaxKernelSize and s <= kMaxScaleFactor (also fp64, pointers not
//                     16-byte aligned, and (k, s) whose masks exceed the register budget): one thread
//                     per output pixel with its masks or accumulators in a per-thread column of shared memory; the gather reads
//                     masks per channel.
//
// Not done (yet): shared-memory feature tiles with a halo of r. At the CARes planes (16 to 128 pixels
// wide) a halo costs 25-50% extra staging per channel and a barrier, while the L1 already serves the
// window overlap; thread independence also keeps the kernels checkable in the emulation. Revisit with
// measurements (benchmarks/gpu_check.sh), as for cp.async/TMA staging and 2-position register blocking.
//
// Offsets: plane bases (n, c) are 64-bit; offsets inside one plane are 32-bit, which
// unsupported_reason() guarantees by refusing planes of 2^31 elements or more. Block indices are
// 64-bit and the grid strides, so gridDim.x never has to exceed its limit (gridDim.y/z are unused).
//
// Numerics: fp16/bf16 are loaded in their dtype, accumulated in fp32 and stored in their dtype; fp64
// accumulates in fp64. NB: the softmax uses expf (not __expf), with the max subtracted, like torch.

#include "carafe_cuda_common.cuh"

namespace carafe {
namespace cuda {
namespace {

// ---- Tunables --------------------------------------------------------------------------------------
constexpr int kThreads = 128;          // threads per block of the tiled and gather kernels
constexpr int kGenericThreads = 64;    // fp32/fp16/bf16 generic kernels (32 for fp64): smem column budget
constexpr int kRegisterBudget = 128;   // most mask / accumulator values one thread keeps in registers
// Fewest channels per chunk when the channels of a group are split across blocks: each chunk reloads
// its masks (and, in the fused forward, recomputes k*k*s*s exponentials per thread, worth about seven
// channels of reassembly at k=5, s=2), so chunks must be long enough to amortise that.
constexpr int kMinChannelsPerChunk = 8;
constexpr int kMinChannelsPerChunkFused = 32;
constexpr int kMaxReduceChunks = 32;   // bounds the fp32 partial-sum workspace of the mask gradient


// Largest SR dividing S with K*K*SR*S values in the register budget; 0 when not even SR = 1 fits.
constexpr int sub_rows(int K, int S) {
  for (int sr = S; sr >= 1; --sr)
    if (S % sr == 0 && K * K * sr * S <= kRegisterBudget) return sr;
  return 0;
}
// The gather keeps all k*k*s*s masks of its position in registers.
constexpr bool gather_fits(int K, int S) { return K * K * S * S <= kRegisterBudget; }


// off[ky*K + kx] = in-plane offset of low-res pixel (h + ky - R, w + kx - R), each coordinate clamped
// into the image (the tap's own pixel when it is inside).
template <int K> CK_DEVICE void window_offsets(int h, int w, int H, int W, int (&off)[K * K]) {
  constexpr int R = (K - 1) / 2;
#pragma unroll
  for (int ky = 0; ky < K; ++ky) {
#pragma unroll
    for (int kx = 0; kx < K; ++kx) off[ky * K + kx] = clampi(h + ky - R, H - 1) * W + clampi(w + kx - R, W - 1);
  }
}

// Whether tap t = ky*K + kx of position (h, w) lies inside the H x W image.
template <int K> CK_DEVICE bool tap_inside(int t, int h, int w, int H, int W) {
  constexpr int R = (K - 1) / 2;
  const int y = h + t / K - R, x = w + t % K - R;
  return y >= 0 && y < H && x >= 0 && x < W;
}

// v[t][..][..] = 0 for the taps t of position (h, w) that lie outside the image: the tiled forward
// zeroes their masks (their clamped feature loads then contribute nothing), the tiled mask gradient
// their accumulators (which collected products with a clamped pixel).
template <int K, int SR, int S, typename A>
CK_DEVICE void zero_taps_outside(A (&v)[K * K][SR][S], int h, int w, int H, int W) {
#pragma unroll
  for (int t = 0; t < K * K; ++t) {
    if (!tap_inside<K>(t, h, w, H, W)) {
#pragma unroll
      for (int ii = 0; ii < SR; ++ii) {
#pragma unroll
        for (int j = 0; j < S; ++j) v[t][ii][j] = 0;
      }
    }
  }
}

// col[t * bd] = the softmax over t < kk of the logits lp[t * tstride], max subtracted (as torch): the
// masks of one output pixel in a generic kernel's shared-memory column (up and down fused forwards).
template <typename T, typename A>
CK_DEVICE void softmax_column(const T* lp, int64_t tstride, int kk, A* col, int bd) {
  A mx = neg_inf<A>();
  for (int t = 0; t < kk; ++t) {
    const A l = to_acc(ldg(lp + t * tstride));
    col[t * bd] = l;
    mx = l > mx ? l : mx;
  }
  A sum = 0;
  for (int t = 0; t < kk; ++t) {
    const A e = exp_acc(col[t * bd] - mx);
    col[t * bd] = e;
    sum += e;
  }
  const A inv = A(1) / sum;
  for (int t = 0; t < kk; ++t) col[t * bd] *= inv;
}

// The end of a generic mask-gradient kernel: dcol[t * bd] (t < kk) holds the thread's sums over its
// channel chunk of tap t, whose gradient element is base + t * tstride. With a split reduction
// (partial: this chunk's slice of the workspace) they go there for carafe_backward_finalize_kernel;
// else to grad_masks, for FUSED through the softmax backward p_t (dp_t - sum_t' p_t' dp_t').
template <typename T, bool FUSED, typename A>
CK_DEVICE void store_mask_grad_column(const A* dcol, int bd, int kk, int64_t base, int64_t tstride,
                                      const A* __restrict__ probs, T* __restrict__ grad_masks,
                                      A* __restrict__ partial) {
  if (partial != nullptr) {
    for (int t = 0; t < kk; ++t) partial[base + t * tstride] = dcol[t * bd];
  } else if (FUSED) {
    A dot = 0;
    for (int t = 0; t < kk; ++t) dot += ldg(probs + base + t * tstride) * dcol[t * bd];
    for (int t = 0; t < kk; ++t) {
      const A pt = ldg(probs + base + t * tstride);
      grad_masks[base + t * tstride] = from_acc<T>(pt * (dcol[t * bd] - dot));
    }
  } else {
    for (int t = 0; t < kk; ++t) grad_masks[base + t * tstride] = from_acc<T>(dcol[t * bd]);
  }
}

// The channel split of one launch: chunk `c` covers channels [c*cpc, min(Cg, (c+1)*cpc)) of its group.
struct Chunks {
  int cpc;     // channels per chunk
  int count;   // number of chunks
};

// Splits the Cg channels of a group so that about two waves of threads are resident: `items` threads
// exist without a split. max_chunks caps the split (the reduction's workspace grows with it).
Chunks choose_chunks(int64_t items, int64_t Cg, int num_sms, int64_t max_chunks,
                     int64_t min_cpc = kMinChannelsPerChunk) {
  const int64_t target = static_cast<int64_t>(std::max(num_sms, 1)) * 2048;
  int64_t want = ceil_div(target, std::max<int64_t>(items, 1));
  want = std::min(want, ceil_div(Cg, min_cpc));
  want = std::min(want, max_chunks);
  want = std::max<int64_t>(want, 1);
  const int64_t cpc = ceil_div(Cg, want);
  return Chunks{static_cast<int>(cpc), static_cast<int>(ceil_div(Cg, cpc))};
}

// ---- Block decoding, shared by the six chunked kernels (tiled and generic) ----------------------------
// Each of them numbers its blocks the same way: chunk fastest, then sub-row block (tiled forward and
// mask gradient; nsub = 1 elsewhere), then item block, then n*G + g, so that the blocks reusing one
// tile's masks and features run side by side and hit L2. It grid-strides over the blocks, and thread x
// of item block pb owns item q = pb*bd + x of plane (n, g), at (q / width, q % width): a low-res
// position (h, w) (tiled kernels and both gathers, width W) or an output pixel (y, x) (generic forward
// and mask gradient, width W*s). One decoder serves them all, so the templated and the generic kernels
// cannot drift apart in this index maths.
// NB: it is force-inlined, every field is a launch constant (nsub and bd compile-time ones in the
// tiled kernels), and it does the arithmetic in the order the kernels used to do it inline (G and Cg
// before npb; row and column before n and g; cbase() where the channel loop starts): ptxas' register
// allocation of the big unrolled kernels depends on instruction order, and in this order the kernels
// keep their register counts (no spills).
struct ChunkGrid {
  int G;       // groups
  int Cg;      // channels per group
  int npb;     // item blocks per plane
  int nchunk;  // channel chunks per group
  int nsub;    // sub-row blocks per item (1: none)
  int bd;      // items per block (threads per block)
  int items;   // items per plane (threads past it have nothing to do)
  int width;   // items per plane row
  int cpc;     // channels per chunk
  int64_t C;   // channels
};

CK_DEVICE ChunkGrid chunk_grid(const Shape& p, int items, int width, int bd, int nsub, int cpc, int nchunk) {
  return ChunkGrid{static_cast<int>(p.G), static_cast<int>(p.C / p.G), static_cast<int>(ceil_div(items, bd)),
                   nchunk, nsub, bd, items, width, cpc, p.C};
}

// What block b gives this thread.
struct BlockItem {
  int chunk;      // channel chunk
  int sr;         // sub-row block (0 when nsub == 1)
  int q;          // item in plane (n, g) ...
  int row, col;   // ... at (q / width, q % width)
  int64_t ng;     // n*G + g
  int64_t n;
  int g;
  int c0, c1;     // the chunk's channels [c0, c1) of the group
  // n*C + g*Cg + c0: the plane of the chunk's first channel
  CK_DEVICE int64_t cbase(const ChunkGrid& grid) const { return n * grid.C + static_cast<int64_t>(g) * grid.Cg + c0; }
};

// Decodes block b for this thread; false when its item lies past the end of the plane (the kernel
// moves on to its next block).
CK_DEVICE bool decode_block(int64_t b, const ChunkGrid& grid, BlockItem& it) {
  int64_t rest = b;
  it.chunk = static_cast<int>(rest % grid.nchunk); rest /= grid.nchunk;
  it.sr = static_cast<int>(rest % grid.nsub); rest /= grid.nsub;
  const int pb = static_cast<int>(rest % grid.npb); rest /= grid.npb;
  it.ng = rest;
  it.q = pb * grid.bd + static_cast<int>(CK_THREAD_X);
  if (it.q >= grid.items) return false;
  it.row = it.q / grid.width;
  it.col = it.q % grid.width;
  it.n = it.ng / grid.G;
  it.g = static_cast<int>(it.ng % grid.G);
  it.c0 = it.chunk * grid.cpc;
  it.c1 = imin(grid.Cg, it.c0 + grid.cpc);
  return true;
}

// ====================================================================================================
// Forward, tiled: K, S known at compile time.
//
// Block b (grid-stride) -> (chunk fastest, then sub-row block sr, then position block pb, then n*G+g),
// so the blocks that reuse one tile's masks and features run side by side and hit L2.
// Thread -> position q = pb*kThreads + threadIdx.x of plane (n, g): (h, w) = (q / W, q % W);
// sub-pixel rows i = sr*SR + ii (ii < SR), columns j < S; channels c of the chunk.
//   out[n, g*Cg + c, h*S + i, w*S + j] = sum_t features[n, g*Cg + c, h + ky - r, w + kx - r] * m[t][ii][j]
// with t = ky*K + kx and m the masks (or the softmax of the logits) of that output pixel.
// ====================================================================================================
template <typename T, int K, int S, int SR, bool FUSED>
CK_GLOBAL void CK_LAUNCH_BOUNDS(kThreads) carafe_forward_tiled_kernel(
    const T* __restrict__ features,  // (N, C, H, W)
    const T* __restrict__ masks,     // FUSED: logits (N, G*K*K*S*S, H, W); else masks (N, G*K*K, H*S, W*S)
    T* __restrict__ out,             // (N, C, H*S, W*S)
    const Shape p, const int cpc, const int nchunk, const int64_t total_blocks) {
  using A = acc_t<T>;
  constexpr int KK = K * K, SS = S * S;
  const int H = static_cast<int>(p.H), W = static_cast<int>(p.W);
  const int HW = H * W, Wo = W * S;
  const int64_t HoWo = static_cast<int64_t>(HW) * SS;
  const ChunkGrid grid = chunk_grid(p, HW, W, kThreads, S / SR, cpc, nchunk);

  for (int64_t b = CK_BLOCK_X; b < total_blocks; b += CK_GRID_DIM_X) {
    BlockItem it;
    if (!decode_block(b, grid, it)) continue;
    const int q = it.q, sr = it.sr, h = it.row, w = it.col;
    const int64_t ng = it.ng;

    // The masks of this thread's SR*S output pixels, in registers.
    A m[KK][SR][S];
    if constexpr (FUSED) {
      const T* lp = masks + ng * KK * SS * static_cast<int64_t>(HW) + q;
#pragma unroll
      for (int ii = 0; ii < SR; ++ii) {
#pragma unroll
        for (int j = 0; j < S; ++j) {
          const int sub = (sr * SR + ii) * S + j;
          A mx = neg_inf<A>();
#pragma unroll
          for (int t = 0; t < KK; ++t) {
            m[t][ii][j] = to_acc(ldg(lp + static_cast<int64_t>(t * SS + sub) * HW));
            mx = m[t][ii][j] > mx ? m[t][ii][j] : mx;
          }
          A sum = 0;
#pragma unroll
          for (int t = 0; t < KK; ++t) {
            m[t][ii][j] = exp_acc(m[t][ii][j] - mx);
            sum += m[t][ii][j];
          }
          const A inv = A(1) / sum;
#pragma unroll
          for (int t = 0; t < KK; ++t) m[t][ii][j] *= inv;
        }
      }
    } else {
      const T* mp = masks + ng * KK * HoWo + (h * S + sr * SR) * Wo + w * S;
#pragma unroll
      for (int t = 0; t < KK; ++t) {
#pragma unroll
        for (int ii = 0; ii < SR; ++ii) load_row<T, S>(mp + t * HoWo + ii * Wo, m[t][ii]);
      }
    }

    // The k x k window. NB: a tap outside the image reads the nearest pixel of the window instead
    // (clamped offset) and gets mask 0, so the channel loop has no predicates and all its loads can be
    // in flight at once. That pixel is a valid tap of the same window, so an output is non-finite exactly
    // when the reference's is (an inf there may come out as NaN, the only difference).
    int off[KK];
    window_offsets<K>(h, w, H, W, off);
    zero_taps_outside<K>(m, h, w, H, W);

    const int64_t cbase = it.cbase(grid);
    const T* fp = features + cbase * HW;
    T* op = out + cbase * HoWo + (h * S + sr * SR) * Wo + w * S;
    for (int c = it.c0; c < it.c1; ++c, fp += HW, op += HoWo) {
      A acc[SR][S];
#pragma unroll
      for (int ii = 0; ii < SR; ++ii) {
#pragma unroll
        for (int j = 0; j < S; ++j) acc[ii][j] = 0;
      }
#pragma unroll
      for (int t = 0; t < KK; ++t) {
        const A f = to_acc(ldg(fp + off[t]));
#pragma unroll
        for (int ii = 0; ii < SR; ++ii) {
#pragma unroll
          for (int j = 0; j < S; ++j) acc[ii][j] += f * m[t][ii][j];
        }
      }
#pragma unroll
      for (int ii = 0; ii < SR; ++ii) store_row<T, S>(op + ii * Wo, acc[ii]);
    }
  }
}

// ====================================================================================================
// Forward, generic: runtime k and s. Block b -> (chunk fastest, output-pixel block, n*G+g); thread ->
// output pixel qo = (y, x) of plane (n, g), y = h*s + i, x = w*s + j. Its k*k masks (softmaxed for
// FUSED) sit in column threadIdx.x of the dynamic shared memory (k*k*blockDim values, no sharing).
// ====================================================================================================
template <typename T, bool FUSED>
CK_GLOBAL void carafe_forward_generic_kernel(
    const T* __restrict__ features,  // (N, C, H, W)
    const T* __restrict__ masks,     // FUSED: logits (N, G*k*k*s*s, H, W); else masks (N, G*k*k, H*s, W*s)
    T* __restrict__ out,             // (N, C, H*s, W*s)
    const Shape p, const int cpc, const int nchunk, const int64_t total_blocks) {
  using A = acc_t<T>;
  CK_DYNAMIC_SHARED(A, smem);
  const int bd = static_cast<int>(CK_BLOCK_DIM_X);
  A* mcol = smem + CK_THREAD_X;  // mcol[t * bd] = mask of tap t
  const int k = static_cast<int>(p.k), s = static_cast<int>(p.s), r = (k - 1) / 2;
  const int kk = k * k, ss = s * s;
  const int H = static_cast<int>(p.H), W = static_cast<int>(p.W), HW = H * W, Wo = W * s;
  const int HoWo = HW * ss;  // < 2^31 (unsupported_reason)
  const ChunkGrid grid = chunk_grid(p, HoWo, Wo, bd, 1, cpc, nchunk);

  for (int64_t b = CK_BLOCK_X; b < total_blocks; b += CK_GRID_DIM_X) {
    BlockItem it;
    if (!decode_block(b, grid, it)) continue;
    const int qo = it.q, y = it.row, x = it.col;
    const int h = y / s, i = y % s, w = x / s, j = x % s;
    const int64_t ng = it.ng;

    if (FUSED) {
      const T* lp = masks + ng * kk * ss * static_cast<int64_t>(HW) + static_cast<int64_t>(i * s + j) * HW + h * W + w;
      softmax_column(lp, static_cast<int64_t>(ss) * HW, kk, mcol, bd);
    } else {
      const T* mp = masks + ng * kk * static_cast<int64_t>(HoWo) + qo;
      for (int t = 0; t < kk; ++t) mcol[t * bd] = to_acc(ldg(mp + static_cast<int64_t>(t) * HoWo));
    }

    const int64_t cbase = it.cbase(grid);
    const T* fp = features + cbase * HW;
    T* op = out + cbase * HoWo + qo;
    for (int c = it.c0; c < it.c1; ++c, fp += HW, op += HoWo) {
      A acc = 0;
      for (int ky = 0; ky < k; ++ky) {
        const int yy = h + ky - r;
        if (yy < 0 || yy >= H) continue;
        for (int kx = 0; kx < k; ++kx) {
          const int xx = w + kx - r;
          if (xx < 0 || xx >= W) continue;
          acc += to_acc(ldg(fp + yy * W + xx)) * mcol[(ky * k + kx) * bd];
        }
      }
      *op = from_acc<T>(acc);
    }
  }
}

// ====================================================================================================
// Backward helper for the fused op: probs = softmax over the k*k taps of each group and sub-pixel of
// the logits, in the logits' layout (N, G*k*k*s*s, H, W), in the accumulation type. One thread per
// (n*G+g, sub-pixel, position); consecutive threads are consecutive positions.
// ====================================================================================================
template <typename T>
CK_GLOBAL void carafe_softmax_kernel(
    const T* __restrict__ logits,   // (N, G*k*k*s*s, H, W)
    acc_t<T>* __restrict__ probs,   // (N, G*k*k*s*s, H, W)
    const Shape p, const int64_t total) {
  using A = acc_t<T>;
  const int64_t kk = p.kk(), ss = p.ss(), HW = p.H * p.W;
  const int64_t stride = static_cast<int64_t>(CK_GRID_DIM_X) * CK_BLOCK_DIM_X;
  for (int64_t it = static_cast<int64_t>(CK_BLOCK_X) * CK_BLOCK_DIM_X + CK_THREAD_X; it < total; it += stride) {
    const int64_t q = it % HW, sub = (it / HW) % ss, ng = it / (HW * ss);
    const int64_t base = (ng * kk * ss + sub) * HW + q;  // + t*ss*HW for tap t
    A mx = neg_inf<A>();
    for (int64_t t = 0; t < kk; ++t) {
      const A l = to_acc(ldg(logits + base + t * ss * HW));
      mx = l > mx ? l : mx;
    }
    A sum = 0;
    for (int64_t t = 0; t < kk; ++t) sum += exp_acc(to_acc(ldg(logits + base + t * ss * HW)) - mx);
    const A inv = A(1) / sum;
    for (int64_t t = 0; t < kk; ++t)
      probs[base + t * ss * HW] = exp_acc(to_acc(ldg(logits + base + t * ss * HW)) - mx) * inv;
  }
}

// ====================================================================================================
// grad_features, tiled gather: K, S known, K*K*S*S masks in registers. Block b -> (chunk, position
// block, n*G+g); thread -> position q = (h, w) of plane (n, g). Tap t = (ky, kx) of the output pixels of
// source position (hs, ws) = (h + r - ky, w + r - kx) reads (h, w), so
//   grad_features[n, c, h, w] = sum_{ky, kx, i, j} grad_out[n, c, hs*S + i, ws*S + j] * m(hs, ws)[t][i][j]
// summed in that fixed order. MASK: T masks (N, G*K*K, H*S, W*S), or (LOGIT_LAYOUT) the fp32/fp64
// softmax probabilities of the fused op in the logits' layout.
// ====================================================================================================
template <typename T, typename M, int K, int S, bool LOGIT_LAYOUT>
CK_GLOBAL void CK_LAUNCH_BOUNDS(kThreads) carafe_backward_features_tiled_kernel(
    const T* __restrict__ grad_out,    // (N, C, H*S, W*S)
    const M* __restrict__ masks,       // see above
    T* __restrict__ grad_features,     // (N, C, H, W)
    const Shape p, const int cpc, const int nchunk, const int64_t total_blocks) {
  using A = acc_t<T>;
  constexpr int KK = K * K, SS = S * S, R = (K - 1) / 2;
  const int H = static_cast<int>(p.H), W = static_cast<int>(p.W);
  const int HW = H * W, Wo = W * S;
  const int64_t HoWo = static_cast<int64_t>(HW) * SS;
  const ChunkGrid grid = chunk_grid(p, HW, W, kThreads, 1, cpc, nchunk);

  for (int64_t b = CK_BLOCK_X; b < total_blocks; b += CK_GRID_DIM_X) {
    BlockItem it;
    if (!decode_block(b, grid, it)) continue;
    const int q = it.q, h = it.row, w = it.col;
    const int64_t ng = it.ng;

    // Source position of tap (ky, kx): (h + R - ky, w + R - kx), clamped into the image. NB: as in the
    // forward, a source outside the image gets masks 0 and reads grad_out at the clamped source, a valid
    // source of the same gather, so the loop has no predicates.
    int goff[KK];  // in-plane offset of grad_out at sub-pixel (0, 0) of the (clamped) source
    A m[KK][S][S];
#pragma unroll
    for (int ky = 0; ky < K; ++ky) {
#pragma unroll
      for (int kx = 0; kx < K; ++kx) {
        const int t = ky * K + kx;
        const int hs = h + R - ky, ws = w + R - kx;
        const bool ok = hs >= 0 && hs < H && ws >= 0 && ws < W;
        const int hc = clampi(hs, H - 1), wc = clampi(ws, W - 1);
        goff[t] = hc * S * Wo + wc * S;
#pragma unroll
        for (int i = 0; i < S; ++i) {
          if constexpr (LOGIT_LAYOUT) {
#pragma unroll
            for (int j = 0; j < S; ++j)
              m[t][i][j] = to_acc(ldg(masks + (ng * KK * SS + t * SS + i * S + j) * HW + hc * W + wc));
          } else {
            load_row<T, S>(masks + (ng * KK + t) * HoWo + goff[t] + i * Wo, m[t][i]);
          }
          if (!ok) {
#pragma unroll
            for (int j = 0; j < S; ++j) m[t][i][j] = 0;
          }
        }
      }
    }

    const int64_t cbase = it.cbase(grid);
    const T* gp = grad_out + cbase * HoWo;
    T* fp = grad_features + cbase * HW + q;
    for (int c = it.c0; c < it.c1; ++c, gp += HoWo, fp += HW) {
      const T* gpi[S];  // sub-pixel row i of every source: gpi[i] + goff[t]
#pragma unroll
      for (int i = 0; i < S; ++i) gpi[i] = gp + i * Wo;
      A acc = 0;
#pragma unroll
      for (int t = 0; t < KK; ++t) {
#pragma unroll
        for (int i = 0; i < S; ++i) {
          A go[S];
          load_row<T, S>(gpi[i] + static_cast<unsigned>(goff[t]), go);
#pragma unroll
          for (int j = 0; j < S; ++j) acc += go[j] * m[t][i][j];
        }
      }
      *fp = from_acc<T>(acc);
    }
  }
}

// grad_features, generic: as the tiled gather with runtime k, s; masks read per channel (L1 hits).
template <typename T, typename M, bool LOGIT_LAYOUT>
CK_GLOBAL void carafe_backward_features_generic_kernel(
    const T* __restrict__ grad_out,    // (N, C, H*s, W*s)
    const M* __restrict__ masks,       // T masks (N, G*k*k, H*s, W*s) or probabilities (N, G*k*k*s*s, H, W)
    T* __restrict__ grad_features,     // (N, C, H, W)
    const Shape p, const int cpc, const int nchunk, const int64_t total_blocks) {
  using A = acc_t<T>;
  const int k = static_cast<int>(p.k), s = static_cast<int>(p.s), r = (k - 1) / 2;
  const int kk = k * k, ss = s * s;
  const int H = static_cast<int>(p.H), W = static_cast<int>(p.W), HW = H * W, Wo = W * s;
  const int HoWo = HW * ss;
  const ChunkGrid grid = chunk_grid(p, HW, W, static_cast<int>(CK_BLOCK_DIM_X), 1, cpc, nchunk);

  for (int64_t b = CK_BLOCK_X; b < total_blocks; b += CK_GRID_DIM_X) {
    BlockItem it;
    if (!decode_block(b, grid, it)) continue;
    const int q = it.q, h = it.row, w = it.col;
    const int64_t ng = it.ng;

    const M* mbase = LOGIT_LAYOUT ? masks + ng * kk * ss * static_cast<int64_t>(HW)
                                  : masks + ng * kk * static_cast<int64_t>(HoWo);
    const int64_t cbase = it.cbase(grid);
    const T* gp = grad_out + cbase * HoWo;
    T* fp = grad_features + cbase * HW + q;
    for (int c = it.c0; c < it.c1; ++c, gp += HoWo, fp += HW) {
      A acc = 0;
      for (int ky = 0; ky < k; ++ky) {
        const int hs = h + r - ky;
        if (hs < 0 || hs >= H) continue;
        for (int kx = 0; kx < k; ++kx) {
          const int ws = w + r - kx;
          if (ws < 0 || ws >= W) continue;
          const int t = ky * k + kx;
          for (int i = 0; i < s; ++i) {
            for (int j = 0; j < s; ++j) {
              const int go_off = (hs * s + i) * Wo + ws * s + j;
              const A mv = LOGIT_LAYOUT
                  ? to_acc(ldg(mbase + static_cast<int64_t>(t * ss + i * s + j) * HW + hs * W + ws))
                  : to_acc(ldg(mbase + static_cast<int64_t>(t) * HoWo + go_off));
              acc += to_acc(ldg(gp + go_off)) * mv;
            }
          }
        }
      }
      *fp = from_acc<T>(acc);
    }
  }
}

// ====================================================================================================
// grad_masks (carafe) / grad_mask_logits (fused), tiled reduction over the group's channels.
// Block b -> (chunk, sub-row block sr, position block, n*G+g), thread -> position q = (h, w) and
// sub-pixel rows i = sr*SR + ii. For each channel of the chunk:
//   dp[t][ii][j] += features[n, c, h + ky - r, w + kx - r] * grad_out[n, c, h*S + i, w*S + j]
// Then, with one chunk, the thread writes grad_masks = dp, or for FUSED, with p = probs at (t, i, j),
//   grad_logits[n, (g*KK + t)*SS + i*S + j, h, w] = p_t * (dp_t - sum_t' p_t' dp_t')
// With several chunks it writes dp to partial[chunk] (layout of the gradient, in A) instead and
// carafe_backward_finalize_kernel adds the chunks in order.
// ====================================================================================================
template <typename T, int K, int S, int SR, bool FUSED>
CK_GLOBAL void CK_LAUNCH_BOUNDS(kThreads) carafe_backward_masks_tiled_kernel(
    const T* __restrict__ grad_out,         // (N, C, H*S, W*S)
    const T* __restrict__ features,         // (N, C, H, W)
    const acc_t<T>* __restrict__ probs,     // FUSED: (N, G*K*K*S*S, H, W) softmax probabilities; else unused
    T* __restrict__ grad_masks,             // FUSED: (N, G*K*K*S*S, H, W); else (N, G*K*K, H*S, W*S)
    acc_t<T>* __restrict__ partial,         // nchunk > 1: (nchunk, <grad_masks' shape>); else unused
    const Shape p, const int cpc, const int nchunk, const int64_t total_blocks) {
  using A = acc_t<T>;
  constexpr int KK = K * K, SS = S * S;
  const int H = static_cast<int>(p.H), W = static_cast<int>(p.W);
  const int HW = H * W, Wo = W * S;
  const int64_t HoWo = static_cast<int64_t>(HW) * SS;
  const ChunkGrid grid = chunk_grid(p, HW, W, kThreads, S / SR, cpc, nchunk);
  const int64_t grad_numel = p.N * grid.G * KK * HoWo;  // elements of grad_masks (either layout)

  for (int64_t b = CK_BLOCK_X; b < total_blocks; b += CK_GRID_DIM_X) {
    BlockItem it;
    if (!decode_block(b, grid, it)) continue;
    const int q = it.q, sr = it.sr, chunk = it.chunk, h = it.row, w = it.col;
    const int64_t ng = it.ng;

    // Clamped window offsets, as in the forward; the accumulators of taps outside the image collect
    // products with a clamped pixel and are zeroed after the loop (exact: they are 0 by definition).
    int off[KK];
    window_offsets<K>(h, w, H, W, off);

    A dp[KK][SR][S];
#pragma unroll
    for (int t = 0; t < KK; ++t) {
#pragma unroll
      for (int ii = 0; ii < SR; ++ii) {
#pragma unroll
        for (int j = 0; j < S; ++j) dp[t][ii][j] = 0;
      }
    }

    const int64_t cbase = it.cbase(grid);
    const T* fp = features + cbase * HW;
    const T* gp = grad_out + cbase * HoWo + (h * S + sr * SR) * Wo + w * S;
    for (int c = it.c0; c < it.c1; ++c, fp += HW, gp += HoWo) {
      A go[SR][S];
#pragma unroll
      for (int ii = 0; ii < SR; ++ii) load_row<T, S>(gp + ii * Wo, go[ii]);
#pragma unroll
      for (int t = 0; t < KK; ++t) {
        const A f = to_acc(ldg(fp + off[t]));
#pragma unroll
        for (int ii = 0; ii < SR; ++ii) {
#pragma unroll
          for (int j = 0; j < S; ++j) dp[t][ii][j] += f * go[ii][j];
        }
      }
    }
    zero_taps_outside<K>(dp, h, w, H, W);

    if constexpr (FUSED) {
      // logits layout: index of (t, sub) at this position = (ng*KK*SS + t*SS + sub)*HW + q
      const int64_t base = ng * KK * SS * static_cast<int64_t>(HW) + q;
#pragma unroll
      for (int ii = 0; ii < SR; ++ii) {
#pragma unroll
        for (int j = 0; j < S; ++j) {
          const int sub = (sr * SR + ii) * S + j;
          if (nchunk > 1) {
            A* dst = partial + chunk * grad_numel + base + static_cast<int64_t>(sub) * HW;
#pragma unroll
            for (int t = 0; t < KK; ++t) dst[static_cast<int64_t>(t) * SS * HW] = dp[t][ii][j];
          } else {
            const A* pp = probs + base + static_cast<int64_t>(sub) * HW;
            A dot = 0;
#pragma unroll
            for (int t = 0; t < KK; ++t) dot += ldg(pp + static_cast<int64_t>(t) * SS * HW) * dp[t][ii][j];
            T* dst = grad_masks + base + static_cast<int64_t>(sub) * HW;
#pragma unroll
            for (int t = 0; t < KK; ++t) {
              const A pt = ldg(pp + static_cast<int64_t>(t) * SS * HW);
              dst[static_cast<int64_t>(t) * SS * HW] = from_acc<T>(pt * (dp[t][ii][j] - dot));
            }
          }
        }
      }
    } else {
      const int64_t off = ng * KK * HoWo + (h * S + sr * SR) * Wo + w * S;
#pragma unroll
      for (int t = 0; t < KK; ++t) {
#pragma unroll
        for (int ii = 0; ii < SR; ++ii) {
          if (nchunk > 1) {
            store_row<A, S>(partial + chunk * grad_numel + off + t * HoWo + ii * Wo, dp[t][ii]);
          } else {
            store_row<T, S>(grad_masks + off + t * HoWo + ii * Wo, dp[t][ii]);
          }
        }
      }
    }
  }
}

// grad_masks / grad_mask_logits, generic: one thread per output pixel qo = (y, x) of plane (n, g), its
// k*k accumulators in column threadIdx.x of the dynamic shared memory. Same outputs as the tiled kernel.
template <typename T, bool FUSED>
CK_GLOBAL void carafe_backward_masks_generic_kernel(
    const T* __restrict__ grad_out,         // (N, C, H*s, W*s)
    const T* __restrict__ features,         // (N, C, H, W)
    const acc_t<T>* __restrict__ probs,     // FUSED: (N, G*k*k*s*s, H, W); else unused
    T* __restrict__ grad_masks,             // FUSED: (N, G*k*k*s*s, H, W); else (N, G*k*k, H*s, W*s)
    acc_t<T>* __restrict__ partial,         // nchunk > 1: (nchunk, <grad_masks' shape>)
    const Shape p, const int cpc, const int nchunk, const int64_t total_blocks) {
  using A = acc_t<T>;
  CK_DYNAMIC_SHARED(A, smem);
  const int bd = static_cast<int>(CK_BLOCK_DIM_X);
  A* dcol = smem + CK_THREAD_X;  // dcol[t * bd] = accumulator of tap t
  const int k = static_cast<int>(p.k), s = static_cast<int>(p.s), r = (k - 1) / 2;
  const int kk = k * k, ss = s * s;
  const int H = static_cast<int>(p.H), W = static_cast<int>(p.W), HW = H * W, Wo = W * s;
  const int HoWo = HW * ss;
  const ChunkGrid grid = chunk_grid(p, HoWo, Wo, bd, 1, cpc, nchunk);
  const int64_t grad_numel = p.N * grid.G * kk * static_cast<int64_t>(HoWo);

  for (int64_t b = CK_BLOCK_X; b < total_blocks; b += CK_GRID_DIM_X) {
    BlockItem it;
    if (!decode_block(b, grid, it)) continue;
    const int qo = it.q, chunk = it.chunk, y = it.row, x = it.col;
    const int h = y / s, i = y % s, w = x / s, j = x % s;
    const int64_t ng = it.ng;

    for (int t = 0; t < kk; ++t) dcol[t * bd] = 0;
    const int64_t cbase = it.cbase(grid);
    const T* fp = features + cbase * HW;
    const T* gp = grad_out + cbase * HoWo + qo;
    for (int c = it.c0; c < it.c1; ++c, fp += HW, gp += HoWo) {
      const A go = to_acc(ldg(gp));
      for (int ky = 0; ky < k; ++ky) {
        const int yy = h + ky - r;
        if (yy < 0 || yy >= H) continue;
        for (int kx = 0; kx < k; ++kx) {
          const int xx = w + kx - r;
          if (xx < 0 || xx >= W) continue;
          dcol[(ky * k + kx) * bd] += to_acc(ldg(fp + yy * W + xx)) * go;
        }
      }
    }

    // Index of tap t in the gradient: base + t * tstride.
    const int64_t base = FUSED ? (ng * kk * ss + i * s + j) * static_cast<int64_t>(HW) + h * W + w
                               : ng * kk * static_cast<int64_t>(HoWo) + qo;
    const int64_t tstride = FUSED ? static_cast<int64_t>(ss) * HW : static_cast<int64_t>(HoWo);
    store_mask_grad_column<T, FUSED>(dcol, bd, kk, base, tstride, probs, grad_masks,
                                     nchunk > 1 ? partial + chunk * grad_numel : nullptr);
  }
}

// Adds the per-chunk partial sums of the mask gradient in chunk order (deterministic) and writes the
// gradient; for FUSED also applies the softmax backward. Items: carafe, one per gradient element;
// FUSED, one per (n*G+g, sub-pixel, position), which loops over the k*k taps.
template <typename T, bool FUSED>
CK_GLOBAL void carafe_backward_finalize_kernel(
    const acc_t<T>* __restrict__ partial,  // (nchunk, <gradient shape>)
    const acc_t<T>* __restrict__ probs,    // FUSED: (N, G*k*k*s*s, H, W); else unused
    T* __restrict__ grad_masks,            // the gradient
    const Shape p, const int nchunk, const int64_t total) {
  using A = acc_t<T>;
  const int64_t kk = p.kk(), ss = p.ss(), HW = p.H * p.W;
  const int64_t grad_numel = p.N * p.G * kk * ss * HW;
  const int64_t stride = static_cast<int64_t>(CK_GRID_DIM_X) * CK_BLOCK_DIM_X;
  for (int64_t it = static_cast<int64_t>(CK_BLOCK_X) * CK_BLOCK_DIM_X + CK_THREAD_X; it < total; it += stride) {
    if (FUSED) {
      const int64_t q = it % HW, sub = (it / HW) % ss, ng = it / (HW * ss);
      const int64_t base = (ng * kk * ss + sub) * HW + q;
      A dot = 0;
      for (int64_t t = 0; t < kk; ++t) {
        const int64_t e = base + t * ss * HW;
        A dp = 0;
        for (int ch = 0; ch < nchunk; ++ch) dp += partial[ch * grad_numel + e];
        dot += ldg(probs + e) * dp;
      }
      for (int64_t t = 0; t < kk; ++t) {
        const int64_t e = base + t * ss * HW;
        A dp = 0;
        for (int ch = 0; ch < nchunk; ++ch) dp += partial[ch * grad_numel + e];
        grad_masks[e] = from_acc<T>(ldg(probs + e) * (dp - dot));
      }
    } else {
      A sum = 0;
      for (int ch = 0; ch < nchunk; ++ch) sum += partial[ch * grad_numel + it];
      grad_masks[it] = from_acc<T>(sum);
    }
  }
}

// ====================================================================================================
// Content-aware downsampling: carafe_down, carafe_down_fused (docs/design.md#the-contract). Output,
// masks and logits share one grid, Ho x Wo = ceil(H/s) x ceil(W/s); position (i, j) reassembles the
// k x k window of features centred on (s*i, s*j):
//   out[n, g*Cg + c, i, j] = sum_t features[n, g*Cg + c, s*i + ky - r, s*j + kx - r] * m[n, g*k*k + t, i, j]
// with t = ky*k + kx. Masks and logits have one layout, (N, G*k*k, Ho, Wo): the logits are not pixel-
// shuffled. That is the up ops' logit layout at s = 1 on the grid Ho x Wo, so the softmax and finalize
// kernels above serve the down ops unchanged when given down_grid(p) = {N, C, Ho, Wo, k, G, 1}.
// The reassembly kernels are their own: a position has one output (no sub-pixels), its window lies on
// the features' grid at stride s (not on the positions' grid), and the gather visits only the
// ceil(k/s)^2 taps that can reach a feature pixel. They share the block decoder, the window and tap
// helpers and the shared-memory column helpers with the up kernels. No vector accesses: any alignment.
// ====================================================================================================

// Forward, tiled: K known. Thread -> position q = (i, j) of plane (n, g) (block decoding as above, width
// Wo), its K*K masks (softmaxed logits for FUSED) in registers, one output per channel of its chunk.
template <typename T, int K, bool FUSED>
CK_GLOBAL void CK_LAUNCH_BOUNDS(kThreads) carafe_down_forward_tiled_kernel(
    const T* __restrict__ features,  // (N, C, H, W)
    const T* __restrict__ masks,     // masks, or (FUSED) logits, (N, G*K*K, Ho, Wo)
    T* __restrict__ out,             // (N, C, Ho, Wo)
    const Shape p, const int cpc, const int nchunk, const int64_t total_blocks) {
  using A = acc_t<T>;
  constexpr int KK = K * K;
  const int H = static_cast<int>(p.H), W = static_cast<int>(p.W), s = static_cast<int>(p.s);
  const int HW = H * W, Wo = static_cast<int>(p.down_W()), HoWo = static_cast<int>(p.down_H()) * Wo;
  const ChunkGrid grid = chunk_grid(p, HoWo, Wo, kThreads, 1, cpc, nchunk);

  for (int64_t b = CK_BLOCK_X; b < total_blocks; b += CK_GRID_DIM_X) {
    BlockItem it;
    if (!decode_block(b, grid, it)) continue;
    const int q = it.q, y = it.row * s, x = it.col * s;  // the window's centre in the features

    A m[KK][1][1];  // [1][1]: the up kernels' (tap, sub-row, column) shape, for zero_taps_outside
    const T* mp = masks + it.ng * KK * static_cast<int64_t>(HoWo) + q;
#pragma unroll
    for (int t = 0; t < KK; ++t) m[t][0][0] = to_acc(ldg(mp + static_cast<int64_t>(t) * HoWo));
    if constexpr (FUSED) {
      A mx = neg_inf<A>();
#pragma unroll
      for (int t = 0; t < KK; ++t) mx = m[t][0][0] > mx ? m[t][0][0] : mx;
      A sum = 0;
#pragma unroll
      for (int t = 0; t < KK; ++t) {
        m[t][0][0] = exp_acc(m[t][0][0] - mx);
        sum += m[t][0][0];
      }
      const A inv = A(1) / sum;
#pragma unroll
      for (int t = 0; t < KK; ++t) m[t][0][0] *= inv;
    }

    // Clamped window offsets and masks 0 for the taps outside the image, as in the up forward: the
    // channel loop has no predicates.
    int off[KK];
    window_offsets<K>(y, x, H, W, off);
    zero_taps_outside<K>(m, y, x, H, W);

    const int64_t cbase = it.cbase(grid);
    const T* fp = features + cbase * HW;
    T* op = out + cbase * HoWo + q;
    for (int c = it.c0; c < it.c1; ++c, fp += HW, op += HoWo) {
      A acc = 0;
#pragma unroll
      for (int t = 0; t < KK; ++t) acc += to_acc(ldg(fp + off[t])) * m[t][0][0];
      *op = from_acc<T>(acc);
    }
  }
}

// Forward, generic: runtime k (and fp64). As the tiled kernel, with the masks in column threadIdx.x of
// the dynamic shared memory (k*k*blockDim values) and bounds checks in the channel loop.
template <typename T, bool FUSED>
CK_GLOBAL void carafe_down_forward_generic_kernel(
    const T* __restrict__ features,  // (N, C, H, W)
    const T* __restrict__ masks,     // masks, or (FUSED) logits, (N, G*k*k, Ho, Wo)
    T* __restrict__ out,             // (N, C, Ho, Wo)
    const Shape p, const int cpc, const int nchunk, const int64_t total_blocks) {
  using A = acc_t<T>;
  CK_DYNAMIC_SHARED(A, smem);
  const int bd = static_cast<int>(CK_BLOCK_DIM_X);
  A* mcol = smem + CK_THREAD_X;  // mcol[t * bd] = mask of tap t
  const int k = static_cast<int>(p.k), s = static_cast<int>(p.s), r = (k - 1) / 2, kk = k * k;
  const int H = static_cast<int>(p.H), W = static_cast<int>(p.W), HW = H * W;
  const int Wo = static_cast<int>(p.down_W()), HoWo = static_cast<int>(p.down_H()) * Wo;
  const ChunkGrid grid = chunk_grid(p, HoWo, Wo, bd, 1, cpc, nchunk);

  for (int64_t b = CK_BLOCK_X; b < total_blocks; b += CK_GRID_DIM_X) {
    BlockItem it;
    if (!decode_block(b, grid, it)) continue;
    const int q = it.q, y = it.row * s, x = it.col * s;

    const T* mp = masks + it.ng * kk * static_cast<int64_t>(HoWo) + q;
    if (FUSED) {
      softmax_column(mp, static_cast<int64_t>(HoWo), kk, mcol, bd);
    } else {
      for (int t = 0; t < kk; ++t) mcol[t * bd] = to_acc(ldg(mp + static_cast<int64_t>(t) * HoWo));
    }

    const int64_t cbase = it.cbase(grid);
    const T* fp = features + cbase * HW;
    T* op = out + cbase * HoWo + q;
    for (int c = it.c0; c < it.c1; ++c, fp += HW, op += HoWo) {
      A acc = 0;
      for (int ky = 0; ky < k; ++ky) {
        const int yy = y + ky - r;
        if (yy < 0 || yy >= H) continue;
        for (int kx = 0; kx < k; ++kx) {
          const int xx = x + kx - r;
          if (xx < 0 || xx >= W) continue;
          acc += to_acc(ldg(fp + yy * W + xx)) * mcol[(ky * k + kx) * bd];
        }
      }
      *op = from_acc<T>(acc);
    }
  }
}

// grad_features, tiled gather: K, S known. Thread -> feature pixel (y, x) of plane (n, g). Tap (ky, kx)
// of position (i, j) reads (y, x) when s*i + ky - r = y and s*j + kx - r = x, so for a given y only the
// rows ky = (y + R) % S + S*a (a < NA = ceil(K/S)) at i = (y + R) / S - a can, and they do when ky < K and
// 0 <= i < Ho (columns alike):
//   grad_features[n, c, y, x] = sum_{a, b} grad_out[n, c, i_a, j_b] * masks[n, g*K*K + ky_a*K + kx_b, i_a, j_b]
// summed in that fixed order (no atomics). Its NA*NA masks sit in registers; a tap that cannot reach
// (y, x) gets mask 0 and reads grad_out at the clamped position (a valid one), so the channel loop has
// no predicates. M: T masks, or the fp32/fp64 softmax probabilities of the fused op (same layout).
template <typename T, typename M, int K, int S>
CK_GLOBAL void CK_LAUNCH_BOUNDS(kThreads) carafe_down_backward_features_tiled_kernel(
    const T* __restrict__ grad_out,  // (N, C, Ho, Wo)
    const M* __restrict__ masks,     // (N, G*K*K, Ho, Wo)
    T* __restrict__ grad_features,   // (N, C, H, W)
    const Shape p, const int cpc, const int nchunk, const int64_t total_blocks) {
  using A = acc_t<T>;
  constexpr int KK = K * K, R = (K - 1) / 2, NA = (K + S - 1) / S;
  const int H = static_cast<int>(p.H), W = static_cast<int>(p.W), HW = H * W;
  const int Ho = static_cast<int>(p.down_H()), Wo = static_cast<int>(p.down_W()), HoWo = Ho * Wo;
  const ChunkGrid grid = chunk_grid(p, HW, W, kThreads, 1, cpc, nchunk);

  for (int64_t b = CK_BLOCK_X; b < total_blocks; b += CK_GRID_DIM_X) {
    BlockItem it;
    if (!decode_block(b, grid, it)) continue;
    const int q = it.q, y = it.row, x = it.col;
    const int ky0 = (y + R) % S, i0 = (y + R) / S, kx0 = (x + R) % S, j0 = (x + R) / S;

    int goff[NA * NA];  // in-plane offset of the (clamped) position of term (a, b)
    A m[NA * NA];
    const M* mbase = masks + it.ng * KK * static_cast<int64_t>(HoWo);
#pragma unroll
    for (int a = 0; a < NA; ++a) {
      const int ky = ky0 + S * a, i = i0 - a;
      const bool row_ok = ky < K && i >= 0 && i < Ho;
#pragma unroll
      for (int bb = 0; bb < NA; ++bb) {
        const int kx = kx0 + S * bb, j = j0 - bb;
        const bool ok = row_ok && kx < K && j >= 0 && j < Wo;
        const int e = a * NA + bb;
        goff[e] = clampi(i, Ho - 1) * Wo + clampi(j, Wo - 1);
        m[e] = ok ? to_acc(ldg(mbase + static_cast<int64_t>(ky * K + kx) * HoWo + goff[e])) : A(0);
      }
    }

    const int64_t cbase = it.cbase(grid);
    const T* gp = grad_out + cbase * HoWo;
    T* fp = grad_features + cbase * HW + q;
    for (int c = it.c0; c < it.c1; ++c, gp += HoWo, fp += HW) {
      A acc = 0;
#pragma unroll
      for (int e = 0; e < NA * NA; ++e) acc += to_acc(ldg(gp + goff[e])) * m[e];
      *fp = from_acc<T>(acc);
    }
  }
}

// grad_features, generic gather: runtime k, s; the same terms in the same order, masks read per channel.
template <typename T, typename M>
CK_GLOBAL void carafe_down_backward_features_generic_kernel(
    const T* __restrict__ grad_out,  // (N, C, Ho, Wo)
    const M* __restrict__ masks,     // (N, G*k*k, Ho, Wo)
    T* __restrict__ grad_features,   // (N, C, H, W)
    const Shape p, const int cpc, const int nchunk, const int64_t total_blocks) {
  using A = acc_t<T>;
  const int k = static_cast<int>(p.k), s = static_cast<int>(p.s), r = (k - 1) / 2, kk = k * k;
  const int H = static_cast<int>(p.H), W = static_cast<int>(p.W), HW = H * W;
  const int Ho = static_cast<int>(p.down_H()), Wo = static_cast<int>(p.down_W()), HoWo = Ho * Wo;
  const ChunkGrid grid = chunk_grid(p, HW, W, static_cast<int>(CK_BLOCK_DIM_X), 1, cpc, nchunk);

  for (int64_t b = CK_BLOCK_X; b < total_blocks; b += CK_GRID_DIM_X) {
    BlockItem it;
    if (!decode_block(b, grid, it)) continue;
    const int q = it.q, y = it.row, x = it.col;
    const int ky0 = (y + r) % s, i0 = (y + r) / s, kx0 = (x + r) % s, j0 = (x + r) / s;

    const M* mbase = masks + it.ng * kk * static_cast<int64_t>(HoWo);
    const int64_t cbase = it.cbase(grid);
    const T* gp = grad_out + cbase * HoWo;
    T* fp = grad_features + cbase * HW + q;
    for (int c = it.c0; c < it.c1; ++c, gp += HoWo, fp += HW) {
      A acc = 0;
      for (int ky = ky0, i = i0; ky < k; ky += s, --i) {
        if (i < 0 || i >= Ho) continue;
        for (int kx = kx0, j = j0; kx < k; kx += s, --j) {
          if (j < 0 || j >= Wo) continue;
          const int go_off = i * Wo + j;
          acc += to_acc(ldg(gp + go_off)) * to_acc(ldg(mbase + static_cast<int64_t>(ky * k + kx) * HoWo + go_off));
        }
      }
      *fp = from_acc<T>(acc);
    }
  }
}

// grad_masks (carafe_down) / grad_mask_logits (carafe_down_fused), tiled reduction over the group's
// channels: K known. Thread -> position q = (i, j); for each channel of its chunk
//   dp[t] += features[n, c, s*i + ky - r, s*j + kx - r] * grad_out[n, c, i, j]
// then, as the up kernels: dp (or, FUSED, p_t (dp_t - sum_t' p_t' dp_t')) to the gradient, or with
// several chunks dp to partial[chunk] for carafe_backward_finalize_kernel (run on down_grid(p)).
template <typename T, int K, bool FUSED>
CK_GLOBAL void CK_LAUNCH_BOUNDS(kThreads) carafe_down_backward_masks_tiled_kernel(
    const T* __restrict__ grad_out,      // (N, C, Ho, Wo)
    const T* __restrict__ features,      // (N, C, H, W)
    const acc_t<T>* __restrict__ probs,  // FUSED: (N, G*K*K, Ho, Wo) softmax probabilities; else unused
    T* __restrict__ grad_masks,          // (N, G*K*K, Ho, Wo)
    acc_t<T>* __restrict__ partial,      // nchunk > 1: (nchunk, N, G*K*K, Ho, Wo); else unused
    const Shape p, const int cpc, const int nchunk, const int64_t total_blocks) {
  using A = acc_t<T>;
  constexpr int KK = K * K;
  const int H = static_cast<int>(p.H), W = static_cast<int>(p.W), s = static_cast<int>(p.s), HW = H * W;
  const int Wo = static_cast<int>(p.down_W()), HoWo = static_cast<int>(p.down_H()) * Wo;
  const ChunkGrid grid = chunk_grid(p, HoWo, Wo, kThreads, 1, cpc, nchunk);
  const int64_t grad_numel = p.N * grid.G * KK * static_cast<int64_t>(HoWo);

  for (int64_t b = CK_BLOCK_X; b < total_blocks; b += CK_GRID_DIM_X) {
    BlockItem it;
    if (!decode_block(b, grid, it)) continue;
    const int q = it.q, y = it.row * s, x = it.col * s;

    int off[KK];
    window_offsets<K>(y, x, H, W, off);
    A dp[KK][1][1];
#pragma unroll
    for (int t = 0; t < KK; ++t) dp[t][0][0] = 0;

    const int64_t cbase = it.cbase(grid);
    const T* fp = features + cbase * HW;
    const T* gp = grad_out + cbase * HoWo + q;
    for (int c = it.c0; c < it.c1; ++c, fp += HW, gp += HoWo) {
      const A go = to_acc(ldg(gp));
#pragma unroll
      for (int t = 0; t < KK; ++t) dp[t][0][0] += to_acc(ldg(fp + off[t])) * go;
    }
    zero_taps_outside<K>(dp, y, x, H, W);  // they summed products with a clamped pixel: 0 by definition

    const int64_t base = it.ng * KK * static_cast<int64_t>(HoWo) + q;  // + t*HoWo for tap t
    if (nchunk > 1) {
      A* dst = partial + it.chunk * grad_numel + base;
#pragma unroll
      for (int t = 0; t < KK; ++t) dst[static_cast<int64_t>(t) * HoWo] = dp[t][0][0];
    } else if constexpr (FUSED) {
      A dot = 0;
#pragma unroll
      for (int t = 0; t < KK; ++t) dot += ldg(probs + base + static_cast<int64_t>(t) * HoWo) * dp[t][0][0];
#pragma unroll
      for (int t = 0; t < KK; ++t) {
        const A pt = ldg(probs + base + static_cast<int64_t>(t) * HoWo);
        grad_masks[base + static_cast<int64_t>(t) * HoWo] = from_acc<T>(pt * (dp[t][0][0] - dot));
      }
    } else {
#pragma unroll
      for (int t = 0; t < KK; ++t) grad_masks[base + static_cast<int64_t>(t) * HoWo] = from_acc<T>(dp[t][0][0]);
    }
  }
}

// grad_masks / grad_mask_logits of the down ops, generic: runtime k (and fp64), the accumulators in
// column threadIdx.x of the dynamic shared memory. Same outputs as the tiled kernel.
template <typename T, bool FUSED>
CK_GLOBAL void carafe_down_backward_masks_generic_kernel(
    const T* __restrict__ grad_out,      // (N, C, Ho, Wo)
    const T* __restrict__ features,      // (N, C, H, W)
    const acc_t<T>* __restrict__ probs,  // FUSED: (N, G*k*k, Ho, Wo); else unused
    T* __restrict__ grad_masks,          // (N, G*k*k, Ho, Wo)
    acc_t<T>* __restrict__ partial,      // nchunk > 1: (nchunk, N, G*k*k, Ho, Wo)
    const Shape p, const int cpc, const int nchunk, const int64_t total_blocks) {
  using A = acc_t<T>;
  CK_DYNAMIC_SHARED(A, smem);
  const int bd = static_cast<int>(CK_BLOCK_DIM_X);
  A* dcol = smem + CK_THREAD_X;  // dcol[t * bd] = accumulator of tap t
  const int k = static_cast<int>(p.k), s = static_cast<int>(p.s), r = (k - 1) / 2, kk = k * k;
  const int H = static_cast<int>(p.H), W = static_cast<int>(p.W), HW = H * W;
  const int Wo = static_cast<int>(p.down_W()), HoWo = static_cast<int>(p.down_H()) * Wo;
  const ChunkGrid grid = chunk_grid(p, HoWo, Wo, bd, 1, cpc, nchunk);
  const int64_t grad_numel = p.N * grid.G * kk * static_cast<int64_t>(HoWo);

  for (int64_t b = CK_BLOCK_X; b < total_blocks; b += CK_GRID_DIM_X) {
    BlockItem it;
    if (!decode_block(b, grid, it)) continue;
    const int q = it.q, y = it.row * s, x = it.col * s;

    for (int t = 0; t < kk; ++t) dcol[t * bd] = 0;
    const int64_t cbase = it.cbase(grid);
    const T* fp = features + cbase * HW;
    const T* gp = grad_out + cbase * HoWo + q;
    for (int c = it.c0; c < it.c1; ++c, fp += HW, gp += HoWo) {
      const A go = to_acc(ldg(gp));
      for (int ky = 0; ky < k; ++ky) {
        const int yy = y + ky - r;
        if (yy < 0 || yy >= H) continue;
        for (int kx = 0; kx < k; ++kx) {
          const int xx = x + kx - r;
          if (xx < 0 || xx >= W) continue;
          dcol[(ky * k + kx) * bd] += to_acc(ldg(fp + yy * W + xx)) * go;
        }
      }
    }
    store_mask_grad_column<T, FUSED>(dcol, bd, kk, it.ng * kk * static_cast<int64_t>(HoWo) + q,
                                     static_cast<int64_t>(HoWo), probs, grad_masks,
                                     nchunk > 1 ? partial + it.chunk * grad_numel : nullptr);
  }
}


template <int V> using IntC = std::integral_constant<int, V>;

// Calls f(IntC<K>, IntC<S>) for the templated (K, S) pairs; false for the others.
template <typename F> bool dispatch_ks(int64_t k, int64_t s, F&& f) {
  switch (k * 16 + s) {
#define CK_CASE(K, S) case K * 16 + S: return f(IntC<K>{}, IntC<S>{});
    CK_CASE(1, 1) CK_CASE(1, 2) CK_CASE(1, 4)
    CK_CASE(3, 1) CK_CASE(3, 2) CK_CASE(3, 4)
    CK_CASE(5, 1) CK_CASE(5, 2) CK_CASE(5, 4)
    CK_CASE(7, 1) CK_CASE(7, 2) CK_CASE(7, 4)
#undef CK_CASE
    default: return false;
  }
}


// The tiled kernels use vector accesses and register arrays: fp32/fp16/bf16, 16-byte aligned bases.
template <typename T> bool tiled_ok(std::initializer_list<const void*> ptrs) {
  if constexpr (std::is_same<T, double>::value) {
    return false;
  } else {
    for (const void* ptr : ptrs)
      if (!aligned16(ptr)) return false;
    return true;
  }
}

template <typename T> int generic_threads() { return sizeof(acc_t<T>) == 8 ? kGenericThreads / 2 : kGenericThreads; }

// Workspace of the backward: [probs (fused only)] [partials (when the reduction is split)], each
// 256-byte aligned, all in the accumulation type.
struct BackwardPlan {
  bool tiled_masks;     // tiled reduction kernel (else generic)
  Chunks reduce;        // channel split of the mask-gradient reduction
  size_t probs_bytes;
  size_t partial_bytes;
};


template <typename T>
BackwardPlan plan_backward(const Shape& p, bool fused, bool grad_masks, bool tiled, const LaunchParams& launch) {
  BackwardPlan plan{};
  const int64_t grad_numel = p.N * p.G * p.kk() * p.ss() * p.H * p.W;
  int sr = 0;
  if (tiled) dispatch_ks(p.k, p.s, [&](auto K, auto S) { sr = sub_rows(K.value, S.value); return true; });
  plan.tiled_masks = sr > 0;
  const int64_t items = plan.tiled_masks ? p.N * p.G * (p.s / sr) * p.H * p.W : p.N * p.G * p.Ho() * p.Wo();
  plan.reduce = choose_chunks(items, p.C / p.G, launch.num_sms, kMaxReduceChunks);
  plan.probs_bytes = fused ? align_up(grad_numel * sizeof(acc_t<T>)) : 0;
  plan.partial_bytes =
      grad_masks && plan.reduce.count > 1 ? align_up(plan.reduce.count * grad_numel * sizeof(acc_t<T>)) : 0;
  return plan;
}

template <typename T>
size_t workspace_bytes(const Shape& p, bool fused, bool grad_masks, const LaunchParams& launch) {
  // The tiled/generic choice depends on pointer alignment, known only at launch: size for the larger.
  const BackwardPlan a = plan_backward<T>(p, fused, grad_masks, true, launch);
  const BackwardPlan b = plan_backward<T>(p, fused, grad_masks, false, launch);
  return std::max(a.probs_bytes + a.partial_bytes, b.probs_bytes + b.partial_bytes);
}

template <typename T>
cudaError_t forward_impl(const Shape& p, bool fused, const T* features, const T* masks, T* out,
                         const LaunchParams& launch) {
  const int64_t Cg = p.C / p.G;
  const bool tiled = tiled_ok<T>({features, masks, out}) && dispatch_ks(p.k, p.s, [&](auto K, auto S) {
    constexpr int kK = decltype(K)::value, kS = decltype(S)::value, kSR = sub_rows(kK, kS);
    if constexpr (kSR == 0 || std::is_same<T, double>::value) {
      return false;
    } else {
      const int64_t npb = ceil_div(p.H * p.W, kThreads);
      const Chunks ch = choose_chunks(p.N * p.G * (kS / kSR) * p.H * p.W, Cg, launch.num_sms, Cg,
                                      fused ? kMinChannelsPerChunkFused : kMinChannelsPerChunk);
      const int64_t total = p.N * p.G * (kS / kSR) * npb * ch.count;
      if (fused)
        launch_kernel(carafe_forward_tiled_kernel<T, kK, kS, kSR, true>, grid_for(total, launch), kThreads, 0,
                      launch.stream, features, masks, out, p, ch.cpc, ch.count, total);
      else
        launch_kernel(carafe_forward_tiled_kernel<T, kK, kS, kSR, false>, grid_for(total, launch), kThreads, 0,
                      launch.stream, features, masks, out, p, ch.cpc, ch.count, total);
      return true;
    }
  });
  if (!tiled) {
    const int threads = generic_threads<T>();
    const size_t smem = static_cast<size_t>(p.kk()) * threads * sizeof(acc_t<T>);
    const int64_t npb = ceil_div(p.Ho() * p.Wo(), threads);
    const Chunks ch = choose_chunks(p.N * p.G * p.Ho() * p.Wo(), Cg, launch.num_sms, Cg,
                                    fused ? kMinChannelsPerChunkFused : kMinChannelsPerChunk);
    const int64_t total = p.N * p.G * npb * ch.count;
    if (fused)
      launch_kernel(carafe_forward_generic_kernel<T, true>, grid_for(total, launch), threads, smem, launch.stream,
                    features, masks, out, p, ch.cpc, ch.count, total);
    else
      launch_kernel(carafe_forward_generic_kernel<T, false>, grid_for(total, launch), threads, smem, launch.stream,
                    features, masks, out, p, ch.cpc, ch.count, total);
  }
  return last_error();
}

template <typename T>
cudaError_t backward_impl(const Shape& p, bool fused, const T* grad_out, const T* features, const T* masks,
                          T* grad_features, T* grad_masks, void* workspace, size_t workspace_bytes_given,
                          const LaunchParams& launch) {
  using A = acc_t<T>;
  const int64_t Cg = p.C / p.G;
  const bool tiled = tiled_ok<T>({grad_out, features, masks, grad_features, grad_masks, workspace});
  const BackwardPlan plan = plan_backward<T>(p, fused, grad_masks != nullptr, tiled, launch);
  if (workspace_bytes_given < plan.probs_bytes + plan.partial_bytes) return cudaErrorInvalidValue;
  unsigned char* ws = static_cast<unsigned char*>(workspace);
  A* probs = fused ? reinterpret_cast<A*>(ws) : nullptr;
  A* partial = plan.partial_bytes ? reinterpret_cast<A*>(ws + plan.probs_bytes) : nullptr;
  const int64_t grad_numel = p.N * p.G * p.kk() * p.ss() * p.H * p.W;

  // 1. The fused op's probabilities (read by both gradients).
  if (fused) {
    const int64_t items = p.N * p.G * p.ss() * p.H * p.W;
    launch_kernel(carafe_softmax_kernel<T>, grid_for_items(items, kThreads, launch), kThreads, 0, launch.stream,
                  masks, probs, p, items);
  }

  // 2. grad_features (gather), when asked for.
  const bool tiled_gather = grad_features != nullptr && tiled && dispatch_ks(p.k, p.s, [&](auto K, auto S) {
    constexpr int kK = decltype(K)::value, kS = decltype(S)::value;
    if constexpr (!gather_fits(kK, kS) || std::is_same<T, double>::value) {
      return false;
    } else {
      const int64_t npb = ceil_div(p.H * p.W, kThreads);
      const Chunks ch = choose_chunks(p.N * p.G * p.H * p.W, Cg, launch.num_sms, Cg);
      const int64_t total = p.N * p.G * npb * ch.count;
      if (fused)
        launch_kernel(carafe_backward_features_tiled_kernel<T, A, kK, kS, true>, grid_for(total, launch), kThreads, 0,
                      launch.stream, grad_out, static_cast<const A*>(probs), grad_features, p, ch.cpc, ch.count, total);
      else
        launch_kernel(carafe_backward_features_tiled_kernel<T, T, kK, kS, false>, grid_for(total, launch), kThreads,
                      0, launch.stream, grad_out, masks, grad_features, p, ch.cpc, ch.count, total);
      return true;
    }
  });
  if (grad_features != nullptr && !tiled_gather) {
    const int64_t npb = ceil_div(p.H * p.W, kThreads);
    const Chunks ch = choose_chunks(p.N * p.G * p.H * p.W, Cg, launch.num_sms, Cg);
    const int64_t total = p.N * p.G * npb * ch.count;
    if (fused)
      launch_kernel(carafe_backward_features_generic_kernel<T, A, true>, grid_for(total, launch), kThreads, 0,
                    launch.stream, grad_out, static_cast<const A*>(probs), grad_features, p, ch.cpc, ch.count, total);
    else
      launch_kernel(carafe_backward_features_generic_kernel<T, T, false>, grid_for(total, launch), kThreads, 0,
                    launch.stream, grad_out, masks, grad_features, p, ch.cpc, ch.count, total);
  }

  // 3. grad_masks / grad_mask_logits (reduction over channels), 4. the chunk sums when split; when asked for.
  const Chunks ch = plan.reduce;
  const bool tiled_masks = grad_masks != nullptr && plan.tiled_masks && dispatch_ks(p.k, p.s, [&](auto K, auto S) {
    constexpr int kK = decltype(K)::value, kS = decltype(S)::value, kSR = sub_rows(kK, kS);
    if constexpr (kSR == 0 || std::is_same<T, double>::value) {
      return false;
    } else {
      const int64_t npb = ceil_div(p.H * p.W, kThreads);
      const int64_t total = p.N * p.G * (kS / kSR) * npb * ch.count;
      if (fused)
        launch_kernel(carafe_backward_masks_tiled_kernel<T, kK, kS, kSR, true>, grid_for(total, launch), kThreads, 0,
                      launch.stream, grad_out, features, static_cast<const A*>(probs), grad_masks, partial, p,
                      ch.cpc, ch.count, total);
      else
        launch_kernel(carafe_backward_masks_tiled_kernel<T, kK, kS, kSR, false>, grid_for(total, launch), kThreads,
                      0, launch.stream, grad_out, features, static_cast<const A*>(probs), grad_masks, partial, p,
                      ch.cpc, ch.count, total);
      return true;
    }
  });
  if (grad_masks != nullptr && !tiled_masks) {
    const int threads = generic_threads<T>();
    const size_t smem = static_cast<size_t>(p.kk()) * threads * sizeof(A);
    const int64_t npb = ceil_div(p.Ho() * p.Wo(), threads);
    const int64_t total = p.N * p.G * npb * ch.count;
    if (fused)
      launch_kernel(carafe_backward_masks_generic_kernel<T, true>, grid_for(total, launch), threads, smem,
                    launch.stream, grad_out, features, static_cast<const A*>(probs), grad_masks, partial, p, ch.cpc,
                    ch.count, total);
    else
      launch_kernel(carafe_backward_masks_generic_kernel<T, false>, grid_for(total, launch), threads, smem,
                    launch.stream, grad_out, features, static_cast<const A*>(probs), grad_masks, partial, p, ch.cpc,
                    ch.count, total);
  }
  if (grad_masks != nullptr && ch.count > 1) {
    const int64_t items = fused ? p.N * p.G * p.ss() * p.H * p.W : grad_numel;
    if (fused)
      launch_kernel(carafe_backward_finalize_kernel<T, true>, grid_for_items(items, kThreads, launch), kThreads, 0,
                    launch.stream, static_cast<const A*>(partial), static_cast<const A*>(probs), grad_masks, p,
                    ch.count, items);
    else
      launch_kernel(carafe_backward_finalize_kernel<T, false>, grid_for_items(items, kThreads, launch), kThreads, 0,
                    launch.stream, static_cast<const A*>(partial), static_cast<const A*>(probs), grad_masks, p,
                    ch.count, items);
  }
  return last_error();
}


// The down ops' position grid as a Shape: (Ho, Wo) = (ceil(H/s), ceil(W/s)) in place of (H, W), s = 1.
// Their masks, logits, probabilities and partial sums have the up ops' logit layout on it, which is how
// carafe_softmax_kernel, carafe_backward_finalize_kernel and plan_backward serve them.
Shape down_grid(const Shape& p) { return Shape{p.N, p.C, p.down_H(), p.down_W(), p.k, p.G, 1}; }

template <typename T>
cudaError_t down_forward_impl(const Shape& p, bool fused, const T* features, const T* masks, T* out,
                              const LaunchParams& launch) {
  const int64_t Cg = p.C / p.G, positions = p.down_H() * p.down_W();
  const Chunks ch = choose_chunks(p.N * p.G * positions, Cg, launch.num_sms, Cg,
                                  fused ? kMinChannelsPerChunkFused : kMinChannelsPerChunk);
  // Tiled for the templated k (dispatch_ks at s = 1 lists them), fp32/fp16/bf16 as the up kernels.
  const bool tiled = dispatch_ks(p.k, 1, [&](auto K, auto) {
    if constexpr (std::is_same<T, double>::value) {
      return false;
    } else {
      constexpr int kK = decltype(K)::value;
      const int64_t total = p.N * p.G * ceil_div(positions, kThreads) * ch.count;
      if (fused)
        launch_kernel(carafe_down_forward_tiled_kernel<T, kK, true>, grid_for(total, launch), kThreads, 0,
                      launch.stream, features, masks, out, p, ch.cpc, ch.count, total);
      else
        launch_kernel(carafe_down_forward_tiled_kernel<T, kK, false>, grid_for(total, launch), kThreads, 0,
                      launch.stream, features, masks, out, p, ch.cpc, ch.count, total);
      return true;
    }
  });
  if (!tiled) {
    const int threads = generic_threads<T>();
    const size_t smem = static_cast<size_t>(p.kk()) * threads * sizeof(acc_t<T>);
    const int64_t total = p.N * p.G * ceil_div(positions, threads) * ch.count;
    if (fused)
      launch_kernel(carafe_down_forward_generic_kernel<T, true>, grid_for(total, launch), threads, smem,
                    launch.stream, features, masks, out, p, ch.cpc, ch.count, total);
    else
      launch_kernel(carafe_down_forward_generic_kernel<T, false>, grid_for(total, launch), threads, smem,
                    launch.stream, features, masks, out, p, ch.cpc, ch.count, total);
  }
  return last_error();
}

template <typename T>
cudaError_t down_backward_impl(const Shape& p, bool fused, const T* grad_out, const T* features, const T* masks,
                               T* grad_features, T* grad_masks, void* workspace, size_t workspace_bytes_given,
                               const LaunchParams& launch) {
  using A = acc_t<T>;
  const int64_t Cg = p.C / p.G;
  const Shape og = down_grid(p);
  // The down kernels make no vector accesses: tiled whenever the dtype and (k, s) allow, any alignment.
  constexpr bool kTiledDtype = !std::is_same<T, double>::value;
  const BackwardPlan plan = plan_backward<T>(og, fused, grad_masks != nullptr, kTiledDtype, launch);
  if (workspace_bytes_given < plan.probs_bytes + plan.partial_bytes) return cudaErrorInvalidValue;
  unsigned char* ws = static_cast<unsigned char*>(workspace);
  A* probs = fused ? reinterpret_cast<A*>(ws) : nullptr;
  A* partial = plan.partial_bytes ? reinterpret_cast<A*>(ws + plan.probs_bytes) : nullptr;

  // 1. The fused op's probabilities (read by both gradients).
  if (fused) {
    const int64_t items = og.N * og.G * og.H * og.W;
    launch_kernel(carafe_softmax_kernel<T>, grid_for_items(items, kThreads, launch), kThreads, 0, launch.stream,
                  masks, probs, og, items);
  }

  // 2. grad_features (gather), when asked for.
  const int64_t gather_npb = ceil_div(p.H * p.W, kThreads);
  const Chunks gather = choose_chunks(p.N * p.G * p.H * p.W, Cg, launch.num_sms, Cg);
  const int64_t gather_total = p.N * p.G * gather_npb * gather.count;
  const bool tiled_gather = grad_features != nullptr && dispatch_ks(p.k, p.s, [&](auto K, auto S) {
    if constexpr (!kTiledDtype) {
      return false;
    } else {
      constexpr int kK = decltype(K)::value, kS = decltype(S)::value;
      if (fused)
        launch_kernel(carafe_down_backward_features_tiled_kernel<T, A, kK, kS>, grid_for(gather_total, launch),
                      kThreads, 0, launch.stream, grad_out, static_cast<const A*>(probs), grad_features, p,
                      gather.cpc, gather.count, gather_total);
      else
        launch_kernel(carafe_down_backward_features_tiled_kernel<T, T, kK, kS>, grid_for(gather_total, launch),
                      kThreads, 0, launch.stream, grad_out, masks, grad_features, p, gather.cpc, gather.count,
                      gather_total);
      return true;
    }
  });
  if (grad_features != nullptr && !tiled_gather) {
    if (fused)
      launch_kernel(carafe_down_backward_features_generic_kernel<T, A>, grid_for(gather_total, launch), kThreads, 0,
                    launch.stream, grad_out, static_cast<const A*>(probs), grad_features, p, gather.cpc,
                    gather.count, gather_total);
    else
      launch_kernel(carafe_down_backward_features_generic_kernel<T, T>, grid_for(gather_total, launch), kThreads, 0,
                    launch.stream, grad_out, masks, grad_features, p, gather.cpc, gather.count, gather_total);
  }

  // 3. grad_masks / grad_mask_logits (reduction over channels), 4. the chunk sums when split; when asked for.
  const Chunks ch = plan.reduce;
  const int64_t positions = og.H * og.W;
  const bool tiled_masks = grad_masks != nullptr && plan.tiled_masks && dispatch_ks(p.k, 1, [&](auto K, auto) {
    if constexpr (!kTiledDtype) {
      return false;
    } else {
      constexpr int kK = decltype(K)::value;
      const int64_t total = p.N * p.G * ceil_div(positions, kThreads) * ch.count;
      if (fused)
        launch_kernel(carafe_down_backward_masks_tiled_kernel<T, kK, true>, grid_for(total, launch), kThreads, 0,
                      launch.stream, grad_out, features, static_cast<const A*>(probs), grad_masks, partial, p,
                      ch.cpc, ch.count, total);
      else
        launch_kernel(carafe_down_backward_masks_tiled_kernel<T, kK, false>, grid_for(total, launch), kThreads, 0,
                      launch.stream, grad_out, features, static_cast<const A*>(probs), grad_masks, partial, p,
                      ch.cpc, ch.count, total);
      return true;
    }
  });
  if (grad_masks != nullptr && !tiled_masks) {
    const int threads = generic_threads<T>();
    const size_t smem = static_cast<size_t>(p.kk()) * threads * sizeof(A);
    const int64_t total = p.N * p.G * ceil_div(positions, threads) * ch.count;
    if (fused)
      launch_kernel(carafe_down_backward_masks_generic_kernel<T, true>, grid_for(total, launch), threads, smem,
                    launch.stream, grad_out, features, static_cast<const A*>(probs), grad_masks, partial, p, ch.cpc,
                    ch.count, total);
    else
      launch_kernel(carafe_down_backward_masks_generic_kernel<T, false>, grid_for(total, launch), threads, smem,
                    launch.stream, grad_out, features, static_cast<const A*>(probs), grad_masks, partial, p, ch.cpc,
                    ch.count, total);
  }
  if (grad_masks != nullptr && ch.count > 1) {
    const int64_t items = og.N * og.G * (fused ? 1 : og.kk()) * positions;
    if (fused)
      launch_kernel(carafe_backward_finalize_kernel<T, true>, grid_for_items(items, kThreads, launch), kThreads, 0,
                    launch.stream, static_cast<const A*>(partial), static_cast<const A*>(probs), grad_masks, og,
                    ch.count, items);
    else
      launch_kernel(carafe_backward_finalize_kernel<T, false>, grid_for_items(items, kThreads, launch), kThreads, 0,
                    launch.stream, static_cast<const A*>(partial), static_cast<const A*>(probs), grad_masks, og,
                    ch.count, items);
  }
  return last_error();
}

}  // namespace

const char* unsupported_reason(const Shape& p, bool down) {
  if (p.N < 0 || p.C < 0 || p.H < 0 || p.W < 0) return "negative extent";
  if (p.k < 1 || p.k % 2 == 0) return "kernel_size must be odd and >= 1";
  if (p.k > kMaxKernelSize) return "the CUDA kernels support kernel_size <= " CARAFE_STRINGIFY(CARAFE_MAX_KERNEL_SIZE);
  if (p.s < 1 || p.s > kMaxScaleFactor)
    return "the CUDA kernels support 1 <= scale_factor <= " CARAFE_STRINGIFY(CARAFE_MAX_SCALE_FACTOR);
  if (p.G < 1 || p.C % p.G != 0) return "group_size must be >= 1 and divide the channels";
  constexpr int64_t kIntMax = std::numeric_limits<int32_t>::max();
  // In-plane offsets are 32-bit: the largest plane (the up ops' output H*s x W*s, the down ops'
  // features H x W) must stay below 2^31 elements, and so must the channel counts (plane bases are 64-bit).
  if (down) {
    if (p.H > kIntMax || p.W > kIntMax || p.H * p.W > kIntMax)
      return "one features plane H x W must have fewer than 2^31 elements";
    if (p.C > kIntMax || p.G * p.kk() > kIntMax) return "too many channels";
    return nullptr;
  }
  if (p.H > kIntMax || p.W > kIntMax || p.H * p.W > kIntMax / (p.s * p.s))
    return "one output plane H*s x W*s must have fewer than 2^31 elements";
  if (p.C > kIntMax || p.G * p.kk() * p.ss() > kIntMax) return "too many channels";
  return nullptr;
}

namespace {

// The entry points below, for the up (down = false) and the down ops.
cudaError_t forward_entry(const Shape& p, DType dtype, bool fused, bool down, const void* features,
                          const void* masks, void* output, const LaunchParams& launch) {
  if (unsupported_reason(p, down) != nullptr) return cudaErrorInvalidValue;
  if (p.N * p.C * p.H * p.W == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* f = static_cast<const T*>(features);
    const T* m = static_cast<const T*>(masks);
    T* out = static_cast<T*>(output);
    return down ? down_forward_impl<T>(p, fused, f, m, out, launch) : forward_impl<T>(p, fused, f, m, out, launch);
  });
}

size_t workspace_entry(const Shape& p, DType dtype, bool fused, bool down, bool grad_masks,
                       const LaunchParams& launch) {
  if (unsupported_reason(p, down) != nullptr || p.N * p.C * p.H * p.W == 0) return 0;
  size_t bytes = 0;
  dispatch_dtype(dtype, [&](auto tag) {
    bytes = workspace_bytes<decltype(tag)>(down ? down_grid(p) : p, fused, grad_masks, launch);
    return cudaSuccess;
  });
  return bytes;
}

cudaError_t backward_entry(const Shape& p, DType dtype, bool fused, bool down, const void* grad_output,
                           const void* features, const void* masks, void* grad_features, void* grad_masks,
                           void* workspace, size_t workspace_bytes_given, const LaunchParams& launch) {
  if (unsupported_reason(p, down) != nullptr) return cudaErrorInvalidValue;
  // Empty extents, or no gradient asked for: nothing to launch (the caller returns zero-filled / empty
  // gradients).
  if (p.N * p.C * p.H * p.W == 0 || (grad_features == nullptr && grad_masks == nullptr)) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* go = static_cast<const T*>(grad_output);
    const T* f = static_cast<const T*>(features);
    const T* m = static_cast<const T*>(masks);
    T* gf = static_cast<T*>(grad_features);
    T* gm = static_cast<T*>(grad_masks);
    return down ? down_backward_impl<T>(p, fused, go, f, m, gf, gm, workspace, workspace_bytes_given, launch)
                : backward_impl<T>(p, fused, go, f, m, gf, gm, workspace, workspace_bytes_given, launch);
  });
}

}  // namespace

cudaError_t carafe_forward(const Shape& p, DType dtype, bool fused, const void* features, const void* masks,
                           void* output, const LaunchParams& launch) {
  return forward_entry(p, dtype, fused, /*down=*/false, features, masks, output, launch);
}

size_t carafe_backward_workspace_bytes(const Shape& p, DType dtype, bool fused, bool grad_masks,
                                       const LaunchParams& launch) {
  return workspace_entry(p, dtype, fused, /*down=*/false, grad_masks, launch);
}

cudaError_t carafe_backward(const Shape& p, DType dtype, bool fused, const void* grad_output, const void* features,
                            const void* masks, void* grad_features, void* grad_masks, void* workspace,
                            size_t workspace_bytes_given, const LaunchParams& launch) {
  return backward_entry(p, dtype, fused, /*down=*/false, grad_output, features, masks, grad_features, grad_masks,
                        workspace, workspace_bytes_given, launch);
}

cudaError_t carafe_down_forward(const Shape& p, DType dtype, bool fused, const void* features, const void* masks,
                                void* output, const LaunchParams& launch) {
  return forward_entry(p, dtype, fused, /*down=*/true, features, masks, output, launch);
}

size_t carafe_down_backward_workspace_bytes(const Shape& p, DType dtype, bool fused, bool grad_masks,
                                            const LaunchParams& launch) {
  return workspace_entry(p, dtype, fused, /*down=*/true, grad_masks, launch);
}

cudaError_t carafe_down_backward(const Shape& p, DType dtype, bool fused, const void* grad_output,
                                 const void* features, const void* masks, void* grad_features, void* grad_masks,
                                 void* workspace, size_t workspace_bytes_given, const LaunchParams& launch) {
  return backward_entry(p, dtype, fused, /*down=*/true, grad_output, features, masks, grad_features, grad_masks,
                        workspace, workspace_bytes_given, launch);
}

}  // namespace cuda
}  // namespace carafe
