// The CPU kernels compiled for the build's baseline instruction set (SSE2 on x86-64, NEON on
// aarch64): what runs where no wider instruction set is available or allowed.
#include "cpu/carafe_cpu.h"

#define CARAFE_CPU_ISA default_isa
#define CARAFE_CPU_ISA_NAME "default"
#define CARAFE_CPU_TARGET
#define CARAFE_CPU_VEC_BYTES 16
#if defined(__aarch64__)
#define CARAFE_CPU_VEC_REGS 32
#else
#define CARAFE_CPU_VEC_REGS 16
#endif
#include "cpu/carafe_cpu_kernel.h"

const carafe::cpu::KernelTable* carafe::cpu::kernels_default() { return &default_isa::kernel_table(); }
