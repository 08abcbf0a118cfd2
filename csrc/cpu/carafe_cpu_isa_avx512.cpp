// The CPU kernels compiled for AVX-512 (F, BW, VL, DQ) with FMA; picked at run time on machines that
// have it (and where ATen's own CPU capability is AVX512, so ATEN_CPU_CAPABILITY=avx2 steps down).
#include "cpu/carafe_cpu.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define CARAFE_CPU_ISA avx512
#define CARAFE_CPU_ISA_NAME "avx512"
#define CARAFE_CPU_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")))
#define CARAFE_CPU_VEC_BYTES 64
#define CARAFE_CPU_VEC_REGS 32
#include "cpu/carafe_cpu_kernel.h"

const carafe::cpu::KernelTable* carafe::cpu::kernels_avx512() { return &avx512::kernel_table(); }
#else
const carafe::cpu::KernelTable* carafe::cpu::kernels_avx512() { return nullptr; }
#endif
