// CPU kernels of the carafe_kernels ops (schemas in csrc/carafe.cpp):
//   carafe(features, masks, k, G, s) -> out
//   carafe_backward(grad_output, features, masks, k, G, s) -> (grad_features, grad_masks)
//   carafe_fused(features, mask_logits, k, G, s) -> out
//   carafe_fused_backward(grad_output, features, mask_logits, k, G, s) -> (grad_features, grad_mask_logits)
//   carafe_down, carafe_down_backward, carafe_down_fused, carafe_down_fused_backward: the same for
//   content-aware downsampling (masks, mask_logits, output (N, .., ceil(H/s), ceil(W/s)))
//
// This file holds the torch glue: argument checks (csrc/carafe_checks.h, shared with the CUDA glue),
// .contiguous() on the inputs, allocation of the contiguous NCHW outputs, the task partition over
// torch::stable::parallel_for (ATen's thread pool, through the stable C shim) and the registration. The
// kernels themselves are in carafe_cpu_kernel.h, compiled once per instruction set
// (carafe_cpu_isa_{avx512bf16,avx512,avx2,default}.cpp); the widest one that both the machine and ATen's CPU
// capability override (ATEN_CPU_CAPABILITY) allow runs.
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/MemoryFormat.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <tuple>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "carafe_checks.h"
#include "carafe_common.h"
#include "cpu/carafe_cpu.h"

namespace carafe {
namespace cpu {
namespace {

// The instruction-set cap ATen's ATEN_CPU_CAPABILITY puts on its own kernels ("default", "avx2",
// "avx512", ...; unset: no cap), which these kernels follow too. NB: the stable ABI has no
// at::get_cpu_capability(), so the variable ATen reads is read here directly; ATen's own check of the
// machine is the __builtin_cpu_supports below. An unknown value caps nothing, as in ATen; "avx512"
// also rules out the AVX512-BF16 kernels (ATen has no level of its own for them), which is how a
// machine that has them runs (and tests) the plain avx512 ones.
int capability_cap() {
  const char* env = std::getenv("ATEN_CPU_CAPABILITY");
  std::string v = env ? env : "";
  for (char& c : v) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  if (v == "default") return 0;
  if (v == "avx2") return 1;
  if (v == "avx512") return 2;
  return 3;
}

const KernelTable& kernels() {
  static const KernelTable* const table = [] {
    const int cap = capability_cap();
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    __builtin_cpu_init();
    const bool has_avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                            __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                            __builtin_cpu_supports("fma");
    const bool has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    const bool has_avx512_bf16 = has_avx512 && __builtin_cpu_supports("avx512bf16");
    if (cap >= 3 && has_avx512_bf16 && kernels_avx512_bf16() != nullptr) return kernels_avx512_bf16();
    if (cap >= 2 && has_avx512 && kernels_avx512() != nullptr) return kernels_avx512();
    if (cap >= 1 && has_avx2 && kernels_avx2() != nullptr) return kernels_avx2();
#endif
    (void)cap;
    return kernels_default();
  }();
  return *table;
}

DType to_dtype(ScalarType t) {
  switch (t) {
    case ScalarType::Float: return DType::kFloat;
    case ScalarType::Double: return DType::kDouble;
    case ScalarType::Half: return DType::kHalf;
    case ScalarType::BFloat16: return DType::kBFloat16;
    default: fail("carafe_kernels: unsupported dtype ", DtypeName{t});
  }
}


// NB: a large output is fresh memory from the allocator (glibc maps it anew on every call above
// ~32 MiB), and with 4 KiB pages the kernel's first writes into it fault once per page: for a 134 MB
// output that costs more than the whole computation (57 ms vs 25 ms on the 2-core test machine).
// Asking for transparent huge pages on it (what ATen does for every allocation under
// THP_MEM_ALLOC_ENABLE=1) cuts the faults 512-fold. It changes no content and is ignored where THP is
// unavailable or disabled.
void advise_huge_pages(const Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const uintptr_t huge = uintptr_t{2} << 20;
  const size_t nbytes = static_cast<size_t>(t.numel()) * t.element_size();
  if (nbytes < (size_t{8} << 20)) return;
  const uintptr_t first = reinterpret_cast<uintptr_t>(t.mutable_data_ptr());
  const uintptr_t begin = (first + huge - 1) & ~(huge - 1);
  const uintptr_t end = (first + nbytes) & ~(huge - 1);
  if (end > begin) (void)madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

// Work (multiply-adds) one thread must have before parallel_for hands tasks to a second one.
// Waking a thread costs microseconds on an idle machine, but on a loaded one the call then waits for
// the other thread to be scheduled: a small forward (N2-C16-H8-W8-k5-g1-s2) took 16 ms on 2 threads
// against 0.07 ms on 1 on the busy 2-core test machine (docs/design.md#cost-model-and-floor). Only
// calls of more than 2^21 multiply-adds (a fraction of a millisecond of one core) are split, and a
// split call gives every thread at least that much.
constexpr int64_t kMinWorkPerThread = int64_t{1} << 21;

// Threads (parallel_for chunks) that ran the last call's tasks; read by tests through the
// _cpu_last_call_threads op to check that tiny calls stay on one thread.
std::atomic<int64_t> last_call_threads{0};

// Parallel over tasks; a task costs about `work` multiply-adds. The grain (tasks per chunk) gives
// each chunk at least kMinWorkPerThread, so calls smaller than that run inline on the caller.
void run_tasks(RangeFn fn, const Args& args, int64_t tasks, int64_t work) {
  const int64_t per_task = std::max<int64_t>(work, 1);
  const int64_t grain = std::max<int64_t>(1, (kMinWorkPerThread + per_task - 1) / per_task);
  std::atomic<int64_t> chunks{0};
  torch::stable::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
    chunks.fetch_add(1, std::memory_order_relaxed);
    fn(args, begin, end);
  });
  last_call_threads.store(chunks.load(), std::memory_order_relaxed);
}

Args make_args(const Shape& p, const Tensor& features, const Tensor& masks) {
  Args a{};
  a.p = p;
  a.dtype = to_dtype(features.scalar_type());
  a.features = features.const_data_ptr();
  a.masks = masks.const_data_ptr();
  a.rows_per_task = 1;
  return a;
}

// Rows per task: up to `most` (a task stages the halo of r rows on either side of its rows once, so
// more rows re-read less), fewer when the per-thread mask scratch (about s*s*k*k*W floats per row)
// would pass ~1 MiB or when there would be fewer than 4 tasks per thread. Any choice gives the same bits.
int64_t rows_per_task(const Shape& p, int64_t most) {
  const int64_t threads = torch::stable::get_num_threads();
  const int64_t row_bytes = 4 * p.ss() * p.kk() * (p.W + 2 * p.r() + 16);
  int64_t rows = most;
  while (rows > 1 && (rows + 2 * p.r()) * row_bytes > (int64_t{1} << 20)) rows /= 2;
  while (rows > 1 && p.N * p.G * ((p.H + rows - 1) / rows) < 4 * threads) rows /= 2;
  return std::max<int64_t>(1, std::min(rows, p.H));
}

// The shape the down ops' tasks and scratch are sized by: their output grid (ceil(H/s), ceil(W/s)),
// which their masks, logits and output share, as the up ops' low-res grid (H, W) with s = 1.
Shape task_grid(const Shape& p, bool down) {
  return down ? Shape{p.N, p.C, p.down_H(), p.down_W(), p.k, p.G, 1} : p;
}

// down: the content-aware downsampling ops (carafe_down, carafe_down_fused).
Tensor forward_cpu(const char* op, bool fused, const Tensor& features_in, const Tensor& masks_in,
                   int64_t kernel_size, int64_t group_size, int64_t scale_factor, bool down = false) {
  const Shape p = check_inputs(op, torch::headeronly::DeviceType::CPU, features_in, masks_in, fused, kernel_size,
                               group_size, scale_factor, down);
  Tensor out = empty_nchw(features_in, down ? std::vector<int64_t>{p.N, p.C, p.down_H(), p.down_W()}
                                            : std::vector<int64_t>{p.N, p.C, p.Ho(), p.Wo()});
  if (out.numel() == 0) return out;
  advise_huge_pages(out);
  const Tensor features = contiguous_nchw(features_in);
  const Tensor masks = contiguous_nchw(masks_in);
  Args a = make_args(p, features, masks);
  a.out = out.mutable_data_ptr();
  a.down = down;
  const Shape grid = task_grid(p, down);
  a.rows_per_task = rows_per_task(grid, 8);
  const KernelTable& t = kernels();
  const RangeFn fn = down ? (fused ? t.forward_down_fused : t.forward_down) : (fused ? t.forward_fused : t.forward);
  run_tasks(fn, a, num_tasks(a), grid.channels_per_group() * grid.ss() * grid.kk() * grid.W * a.rows_per_task);
  return out;
}

std::tuple<Tensor, Tensor> backward_cpu(const char* op, bool fused, const Tensor& grad_output_in,
                                        const Tensor& features_in, const Tensor& masks_in, int64_t kernel_size,
                                        int64_t group_size, int64_t scale_factor,
                                        const std::vector<bool>& output_mask, bool down = false) {
  const Shape p = check_inputs(op, torch::headeronly::DeviceType::CPU, features_in, masks_in, fused, kernel_size,
                               group_size, scale_factor, down);
  check_grad_output(op, grad_output_in, features_in, p, down);
  const OutputMask want = check_output_mask(op, output_mask);
  // A gradient not asked for is neither allocated nor computed: its slot is an undefined tensor (None
  // in Python) and its kernel pointer is null, which the kernel reads as "skip" (carafe_cpu.h, Args).
  Tensor grad_features, grad_masks;
  if (want.features) grad_features = empty_nchw(features_in, sizes_of(features_in).v);
  if (want.masks) grad_masks = empty_nchw(masks_in, sizes_of(masks_in).v);
  if (!(want.features || want.masks) || p.N * p.H * p.W == 0) return {grad_features, grad_masks};  // empty
  if (want.features) advise_huge_pages(grad_features);
  if (want.masks) advise_huge_pages(grad_masks);
  const Tensor features = contiguous_nchw(features_in);
  const Tensor masks = contiguous_nchw(masks_in);
  const Tensor grad_output = contiguous_nchw(grad_output_in);
  Args a = make_args(p, features, masks);
  a.grad_output = grad_output.const_data_ptr();
  a.out = want.features ? grad_features.mutable_data_ptr() : nullptr;
  a.out2 = want.masks ? grad_masks.mutable_data_ptr() : nullptr;
  a.down = down;
  const Shape grid = task_grid(p, down);
  a.rows_per_task = rows_per_task(grid, 8);
  const KernelTable& t = kernels();
  const RangeFn fn =
      down ? (fused ? t.backward_down_fused : t.backward_down) : (fused ? t.backward_fused : t.backward);
  const int64_t gradients = int64_t{want.features} + int64_t{want.masks};
  run_tasks(fn, a, num_tasks(a),
            gradients * std::max<int64_t>(grid.channels_per_group(), 1) * grid.ss() * grid.kk() * grid.W *
                a.rows_per_task);
  return {grad_features, grad_masks};
}

// The registered kernels. Arguments (any strides; outputs are contiguous NCHW in the input dtype):
//   features     (N, C, H, W)
//   masks        (N, G*k*k, H*s, W*s)       carafe / carafe_backward
//   mask_logits  (N, G*k*k*s*s, H, W)       carafe_fused / carafe_fused_backward
//   grad_output  (N, C, H*s, W*s)
//   kernel_size k (odd, >= 1), group_size G (divides C), scale_factor s (>= 1)
//   output_mask  [grad_features wanted, grad_masks wanted] (backward)
// Returns out (N, C, H*s, W*s), or (grad_features like features, grad_masks / grad_mask_logits like
// masks / mask_logits), an undefined tensor in the slot of a gradient not asked for.
Tensor carafe_cpu(const Tensor& features, const Tensor& masks, int64_t kernel_size, int64_t group_size,
                  int64_t scale_factor) {
  return forward_cpu("carafe_kernels::carafe", false, features, masks, kernel_size, group_size, scale_factor);
}

Tensor carafe_fused_cpu(const Tensor& features, const Tensor& mask_logits, int64_t kernel_size,
                        int64_t group_size, int64_t scale_factor) {
  return forward_cpu("carafe_kernels::carafe_fused", true, features, mask_logits, kernel_size, group_size,
                     scale_factor);
}

std::tuple<Tensor, Tensor> carafe_backward_cpu(const Tensor& grad_output, const Tensor& features,
                                               const Tensor& masks, int64_t kernel_size,
                                               int64_t group_size, int64_t scale_factor,
                                               std::vector<bool> output_mask) {
  return backward_cpu("carafe_kernels::carafe_backward", false, grad_output, features, masks, kernel_size,
                      group_size, scale_factor, output_mask);
}

std::tuple<Tensor, Tensor> carafe_fused_backward_cpu(const Tensor& grad_output,
                                                     const Tensor& features,
                                                     const Tensor& mask_logits, int64_t kernel_size,
                                                     int64_t group_size, int64_t scale_factor,
                                                     std::vector<bool> output_mask) {
  return backward_cpu("carafe_kernels::carafe_fused_backward", true, grad_output, features, mask_logits,
                      kernel_size, group_size, scale_factor, output_mask);
}

// The down ops (content-aware downsampling): masks and mask_logits alike (N, G*k*k, ceil(H/s), ceil(W/s)),
// grad_output and out (N, C, ceil(H/s), ceil(W/s)).
Tensor carafe_down_cpu(const Tensor& features, const Tensor& masks, int64_t kernel_size, int64_t group_size,
                       int64_t scale_factor) {
  return forward_cpu("carafe_kernels::carafe_down", false, features, masks, kernel_size, group_size, scale_factor,
                     /*down=*/true);
}

Tensor carafe_down_fused_cpu(const Tensor& features, const Tensor& mask_logits, int64_t kernel_size,
                             int64_t group_size, int64_t scale_factor) {
  return forward_cpu("carafe_kernels::carafe_down_fused", true, features, mask_logits, kernel_size, group_size,
                     scale_factor, /*down=*/true);
}

std::tuple<Tensor, Tensor> carafe_down_backward_cpu(const Tensor& grad_output, const Tensor& features,
                                                    const Tensor& masks, int64_t kernel_size, int64_t group_size,
                                                    int64_t scale_factor, std::vector<bool> output_mask) {
  return backward_cpu("carafe_kernels::carafe_down_backward", false, grad_output, features, masks, kernel_size,
                      group_size, scale_factor, output_mask, /*down=*/true);
}

std::tuple<Tensor, Tensor> carafe_down_fused_backward_cpu(const Tensor& grad_output, const Tensor& features,
                                                          const Tensor& mask_logits, int64_t kernel_size,
                                                          int64_t group_size, int64_t scale_factor,
                                                          std::vector<bool> output_mask) {
  return backward_cpu("carafe_kernels::carafe_down_fused_backward", true, grad_output, features, mask_logits,
                      kernel_size, group_size, scale_factor, output_mask, /*down=*/true);
}

// Which compiled instruction set the CPU kernels run ("avx512_bf16", "avx512", "avx2" or "default"), for benchmark
// reports and tests.
std::string cpu_kernel_isa() { return kernels().isa; }

int64_t cpu_last_call_threads() { return last_call_threads.load(std::memory_order_relaxed); }

}  // namespace
}  // namespace cpu
}  // namespace carafe

STABLE_TORCH_LIBRARY_FRAGMENT(carafe_kernels, m) {
  m.def("_cpu_kernel_isa() -> str");
  m.def("_cpu_last_call_threads() -> int");
}

STABLE_TORCH_LIBRARY_IMPL(carafe_kernels, CompositeExplicitAutograd, m) {
  m.impl("_cpu_kernel_isa", TORCH_BOX(&carafe::cpu::cpu_kernel_isa));
  m.impl("_cpu_last_call_threads", TORCH_BOX(&carafe::cpu::cpu_last_call_threads));
}

STABLE_TORCH_LIBRARY_IMPL(carafe_kernels, CPU, m) {
  m.impl("carafe", TORCH_BOX(&carafe::cpu::carafe_cpu));
  m.impl("carafe_backward", TORCH_BOX(&carafe::cpu::carafe_backward_cpu));
  m.impl("carafe_fused", TORCH_BOX(&carafe::cpu::carafe_fused_cpu));
  m.impl("carafe_fused_backward", TORCH_BOX(&carafe::cpu::carafe_fused_backward_cpu));
  m.impl("carafe_down", TORCH_BOX(&carafe::cpu::carafe_down_cpu));
  m.impl("carafe_down_backward", TORCH_BOX(&carafe::cpu::carafe_down_backward_cpu));
  m.impl("carafe_down_fused", TORCH_BOX(&carafe::cpu::carafe_down_fused_cpu));
  m.impl("carafe_down_fused_backward", TORCH_BOX(&carafe::cpu::carafe_down_fused_backward_cpu));
}
