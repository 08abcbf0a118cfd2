// The CPU kernels for AVX-512 with the BF16 extension (vdpbf16ps: a dot product of bf16 pairs,
// accumulated in fp32). Only the bf16 forward of the up ops is compiled here: it multiplies two taps per
// instruction (carafe_cpu_kernel.h, "bf16 dot products"). Every other kernel (other dtypes, the
// backward, the down ops) is the avx512 build's own, so those run bit for bit and instruction for
// instruction as on an AVX-512 machine without BF16. Picked at run time on machines that have
// AVX512-BF16 (Zen 4 and later, Cooper Lake, Sapphire Rapids and later), unless ATEN_CPU_CAPABILITY caps
// the kernels at avx512 or below.
#include "cpu/carafe_cpu.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define CARAFE_CPU_ISA avx512_bf16
#define CARAFE_CPU_ISA_NAME "avx512_bf16"
#define CARAFE_CPU_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma")))
#define CARAFE_CPU_VEC_BYTES 64
#define CARAFE_CPU_VEC_REGS 32
#define CARAFE_CPU_BF16_DOT 1
#include "cpu/carafe_cpu_kernel.h"

namespace carafe {
namespace cpu {
namespace avx512_bf16 {
namespace {

// bf16: the dot-product forward; any other dtype: the avx512 build's forward.
template <bool Fused>
void forward_range_bf16_dot(const Args& a, int64_t begin, int64_t end) {
  if (a.dtype == DType::kBFloat16) {
    forward_tasks<c10::BFloat16, Fused>(a, begin, end);
  } else {
    const KernelTable* avx512 = kernels_avx512();
    (Fused ? avx512->forward_fused : avx512->forward)(a, begin, end);
  }
}

}  // namespace
}  // namespace avx512_bf16
}  // namespace cpu
}  // namespace carafe

const carafe::cpu::KernelTable* carafe::cpu::kernels_avx512_bf16() {
  const KernelTable* avx512 = kernels_avx512();
  if (avx512 == nullptr) return nullptr;
  static const KernelTable table = [&] {
    KernelTable t = *avx512;
    t.isa = CARAFE_CPU_ISA_NAME;
    t.forward = &avx512_bf16::forward_range_bf16_dot<false>;
    t.forward_fused = &avx512_bf16::forward_range_bf16_dot<true>;
    return t;
  }();
  return &table;
}
#else
const carafe::cpu::KernelTable* carafe::cpu::kernels_avx512_bf16() { return nullptr; }
#endif
