// Host build of csrc/cuda/carafe_kernels.cu and carafe_kernels_nhwc.cu (-DCARAFE_CUDA_EMULATION) with C
// entry points that tests/test_cuda_build.py calls through ctypes.
#include "cuda/carafe_kernels.cu"
#include "cuda/carafe_kernels_nhwc.cu"
namespace {
carafe::Shape shape_of(const long long* d) { return carafe::Shape{d[0], d[1], d[2], d[3], d[4], d[5], d[6]}; }
carafe::cuda::LaunchParams params(int num_sms, long long max_blocks) {
  carafe::cuda::LaunchParams lp;
  lp.num_sms = num_sms;
  lp.max_blocks = max_blocks;
  return lp;
}
// max_launch_items: LaunchParams' cap on the items of one channels_last launch.
carafe::cuda::LaunchParams nhwc_params(int num_sms, long long max_blocks, long long max_launch_items) {
  carafe::cuda::LaunchParams lp = params(num_sms, max_blocks);
  lp.max_launch_items = max_launch_items;
  return lp;
}
}  // namespace
extern "C" {
long long emu_misaligned_accesses() { return carafe::cuda::emu::misaligned_accesses(); }
long long emu_wide_accesses() { return carafe::cuda::emu::wide_accesses(); }
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
// The channels_last launchers (carafe_kernels_nhwc.cu): down selects the down ops.
const char* emu_nhwc_unsupported_reason(const long long* d, int down) {
  return carafe::cuda::carafe_nhwc_unsupported_reason(shape_of(d), down != 0);
}
unsigned long long emu_nhwc_forward_workspace_bytes(const long long* d, int dtype, int fused, int down) {
  return carafe::cuda::carafe_nhwc_forward_workspace_bytes(shape_of(d), static_cast<carafe::cuda::DType>(dtype),
                                                           fused != 0, down != 0);
}
int emu_nhwc_forward(const long long* d, int dtype, int fused, int down, const void* f, const void* m, void* out,
                     void* ws, unsigned long long ws_bytes, int num_sms, long long max_blocks,
                     long long max_launch_items) {
  return carafe::cuda::carafe_nhwc_forward(shape_of(d), static_cast<carafe::cuda::DType>(dtype), fused != 0,
                                           down != 0, f, m, out, ws, ws_bytes,
                                           nhwc_params(num_sms, max_blocks, max_launch_items));
}
unsigned long long emu_nhwc_backward_workspace_bytes(const long long* d, int dtype, int fused, int down,
                                                     int grad_masks) {
  return carafe::cuda::carafe_nhwc_backward_workspace_bytes(shape_of(d), static_cast<carafe::cuda::DType>(dtype),
                                                            fused != 0, down != 0, grad_masks != 0);
}
int emu_nhwc_backward(const long long* d, int dtype, int fused, int down, const void* go, const void* f,
                      const void* m, void* gf, void* gm, void* ws, unsigned long long ws_bytes, int num_sms,
                      long long max_blocks, long long max_launch_items) {
  return carafe::cuda::carafe_nhwc_backward(shape_of(d), static_cast<carafe::cuda::DType>(dtype), fused != 0,
                                            down != 0, go, f, m, gf, gm, ws, ws_bytes,
                                            nhwc_params(num_sms, max_blocks, max_launch_items));
}
}
