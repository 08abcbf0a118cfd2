// Interface between the CPU glue (carafe_cpu.cpp: checks, allocation, parallel_for, registration)
// and the kernels, which carafe_cpu_kernel.h compiles once per instruction set (carafe_cpu_isa_*.cpp)
// so that one build runs AVX-512, AVX2+FMA or baseline code, picked at run time.
// Torch-free on purpose: the per-ISA translation units include only the header-only Half/BFloat16
// (torch/headeronly).
#pragma once
#include <cstdint>

#include "carafe_common.h"

namespace carafe {
namespace cpu {

enum class DType : int { kFloat, kDouble, kHalf, kBFloat16 };

// One call. Every pointer is to a contiguous NCHW tensor of `dtype`.
struct Args {
  Shape p;
  DType dtype;
  const void* features;     // (N, C, H, W)
  const void* masks;        // carafe: masks (N, G*k*k, H*s, W*s); carafe_fused: mask_logits (N, G*k*k*s*s, H, W)
  const void* grad_output;  // (N, C, H*s, W*s); backward only
  void* out;                // forward: output (N, C, H*s, W*s); backward: grad_features (N, C, H, W)
  void* out2;               // backward: grad_masks / grad_mask_logits (shape of `masks`); forward: unused
                            // backward: a null out / out2 is a gradient not asked for, which the kernel skips
  int64_t rows_per_task;    // low-resolution rows per task (the down ops: output rows)
  bool down;                // the down ops (carafe_down): masks, logits, output and grad_output are
                            // (.., ceil(H/s), ceil(W/s)), and out (backward) is grad_features (N, C, H, W)
};

// A kernel runs the tasks [begin, end) of a call; tasks write disjoint parts of the outputs, so any
// partition of the task range among threads gives the same bits.
using RangeFn = void (*)(const Args&, int64_t begin, int64_t end);

struct KernelTable {
  const char* isa;  // "avx512_bf16", "avx512", "avx2" or "default"
  RangeFn forward;
  RangeFn forward_fused;
  RangeFn backward;
  RangeFn backward_fused;
  RangeFn forward_down;
  RangeFn forward_down_fused;
  RangeFn backward_down;
  RangeFn backward_down_fused;
};

// Tasks of a call (forward and backward): (n, g, block of rows_per_task low-resolution rows; for the
// down ops, output rows).
inline int64_t num_tasks(const Args& a) {
  const int64_t rows = a.down ? a.p.down_H() : a.p.H;
  return a.p.N * a.p.G * ((rows + a.rows_per_task - 1) / a.rows_per_task);
}

// nullptr where that instruction set was not compiled in (non-x86 targets, other compilers).
const KernelTable* kernels_avx512_bf16();  // avx512 plus the bf16 dot-product forward
const KernelTable* kernels_avx512();
const KernelTable* kernels_avx2();
const KernelTable* kernels_default();  // always available

}  // namespace cpu
}  // namespace carafe
