// The CPU kernels compiled for AVX-512 with the BF16 extension (vdpbf16ps: a dot product of bf16
// pairs, accumulated in fp32): the bf16 forward of the up ops multiplies two taps per instruction
// (carafe_cpu_kernel.h, "bf16 dot products"); everything else is the avx512 code. Picked at run time
// on machines that have AVX512-BF16 (Zen 4 and later, Cooper Lake, Sapphire Rapids and later), unless
// ATEN_CPU_CAPABILITY caps the kernels at avx512 or below.
#include "cpu/carafe_cpu.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define CARAFE_CPU_ISA avx512_bf16
#define CARAFE_CPU_ISA_NAME "avx512_bf16"
#define CARAFE_CPU_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma")))
#define CARAFE_CPU_VEC_BYTES 64
#define CARAFE_CPU_VEC_REGS 32
#define CARAFE_CPU_BF16_DOT 1
#include "cpu/carafe_cpu_kernel.h"

const carafe::cpu::KernelTable* carafe::cpu::kernels_avx512_bf16() { return &avx512_bf16::kernel_table(); }
#else
const carafe::cpu::KernelTable* carafe::cpu::kernels_avx512_bf16() { return nullptr; }
#endif
