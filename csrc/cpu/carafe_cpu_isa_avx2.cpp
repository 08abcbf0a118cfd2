// The CPU kernels compiled for AVX2 with FMA; picked at run time on machines that have it.
#include "cpu/carafe_cpu.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define CARAFE_CPU_ISA avx2
#define CARAFE_CPU_ISA_NAME "avx2"
#define CARAFE_CPU_TARGET __attribute__((target("avx2,fma")))
#define CARAFE_CPU_VEC_BYTES 32
#define CARAFE_CPU_VEC_REGS 16
#include "cpu/carafe_cpu_kernel.h"

const carafe::cpu::KernelTable* carafe::cpu::kernels_avx2() { return &avx2::kernel_table(); }
#else
const carafe::cpu::KernelTable* carafe::cpu::kernels_avx2() { return nullptr; }
#endif
