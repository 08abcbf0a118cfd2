import os, sys, time, torch
import carafe_kernels
torch.set_num_threads(int(os.environ.get("THREADS", "1")))
dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[sys.argv[1]]
mode = sys.argv[2]; iters = int(sys.argv[3])
import os
N, C, H, W, k, G, s = eval(os.environ.get("SHAPE", "(2, 256, 44, 44, 5, 1, 2)"))
g = torch.Generator().manual_seed(0)
f = torch.randn(N, C, H, W, generator=g).to(dtype)
l = torch.randn(N, G*k*k*s*s, H, W, generator=g).to(dtype)
op = torch.ops.carafe_kernels.carafe_fused
bop = torch.ops.carafe_kernels.carafe_fused_backward
go = torch.randn(N, C, H*s, W*s, generator=g).to(dtype)
if mode.startswith("d"):  # down ops: features at full resolution, the rest on the output grid
    l = torch.randn(N, G*k*k, H//s, W//s, generator=g).to(dtype)
    go = torch.randn(N, C, H//s, W//s, generator=g).to(dtype)
    op = torch.ops.carafe_kernels.carafe_down_fused
    bop = torch.ops.carafe_kernels.carafe_down_fused_backward
    mode = mode[1:]
def run():
    if mode == "fwd": op(f, l, k, G, s)
    elif mode == "bwdf": bop(go, f, l, k, G, s, [True, False])
    elif mode == "bwdm": bop(go, f, l, k, G, s, [False, True])
    else: bop(go, f, l, k, G, s)
for _ in range(3): run()
ts = []; cs = []
for _ in range(iters):
    t = time.perf_counter(); c = time.thread_time(); run(); cs.append(time.thread_time() - c); ts.append(time.perf_counter() - t)
ts.sort(); cs.sort()
if iters: print(f"cpu-time median {cs[len(cs)//2]*1e3:.3f} ms min {cs[0]*1e3:.3f} ms", end=" | ")
print(f"{sys.argv[1]} {mode} isa={torch.ops.carafe_kernels._cpu_kernel_isa()} median {ts[len(ts)//2]*1e3:.3f} ms min {ts[0]*1e3:.3f} ms")
