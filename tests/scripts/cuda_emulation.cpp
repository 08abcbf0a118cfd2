// Host build of csrc/cuda/carafe_kernels.cu (-DCARAFE_CUDA_EMULATION) with C entry points that
// tests/test_cuda_build.py calls through ctypes.
#include "cuda/carafe_kernels.cu"
namespace {
carafe::Shape shape_of(const long long* d) { return carafe::Shape{d[0], d[1], d[2], d[3], d[4], d[5], d[6]}; }
carafe::cuda::LaunchParams params(int num_sms, long long max_blocks) {
  carafe::cuda::LaunchParams lp;
  lp.num_sms = num_sms;
  lp.max_blocks = max_blocks;
  return lp;
}
}  // namespace
extern "C" {
long long emu_misaligned_accesses() { return carafe::cuda::emu::misaligned_accesses(); }
const char* emu_unsupported_reason(const long long* d) { return carafe::cuda::unsupported_reason(shape_of(d)); }
int emu_forward(const long long* d, int dtype, int fused, const void* f, const void* m, void* out, int num_sms,
                long long max_blocks) {
  return carafe::cuda::carafe_forward(shape_of(d), static_cast<carafe::cuda::DType>(dtype), fused != 0, f, m, out,
                                      params(num_sms, max_blocks));
}
unsigned long long emu_workspace_bytes(const long long* d, int dtype, int fused, int grad_masks, int num_sms) {
  return carafe::cuda::carafe_backward_workspace_bytes(shape_of(d), static_cast<carafe::cuda::DType>(dtype),
                                                       fused != 0, grad_masks != 0, params(num_sms, 1));
}
int emu_backward(const long long* d, int dtype, int fused, const void* go, const void* f, const void* m, void* gf,
                 void* gm, void* ws, unsigned long long ws_bytes, int num_sms, long long max_blocks) {
  return carafe::cuda::carafe_backward(shape_of(d), static_cast<carafe::cuda::DType>(dtype), fused != 0, go, f, m,
                                       gf, gm, ws, ws_bytes, params(num_sms, max_blocks));
}
// The down ops' launchers (carafe_down, carafe_down_fused), same arguments.
const char* emu_down_unsupported_reason(const long long* d) {
  return carafe::cuda::unsupported_reason(shape_of(d), /*down=*/true);
}
int emu_down_forward(const long long* d, int dtype, int fused, const void* f, const void* m, void* out, int num_sms,
                     long long max_blocks) {
  return carafe::cuda::carafe_down_forward(shape_of(d), static_cast<carafe::cuda::DType>(dtype), fused != 0, f, m,
                                           out, params(num_sms, max_blocks));
}
unsigned long long emu_down_workspace_bytes(const long long* d, int dtype, int fused, int grad_masks, int num_sms) {
  return carafe::cuda::carafe_down_backward_workspace_bytes(shape_of(d), static_cast<carafe::cuda::DType>(dtype),
                                                            fused != 0, grad_masks != 0, params(num_sms, 1));
}
int emu_down_backward(const long long* d, int dtype, int fused, const void* go, const void* f, const void* m,
                      void* gf, void* gm, void* ws, unsigned long long ws_bytes, int num_sms, long long max_blocks) {
  return carafe::cuda::carafe_down_backward(shape_of(d), static_cast<carafe::cuda::DType>(dtype), fused != 0, go, f,
                                            m, gf, gm, ws, ws_bytes, params(num_sms, max_blocks));
}
}
