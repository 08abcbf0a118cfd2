"""Checks of the CUDA sources that need no GPU (they run in CI):

* ``nvcc`` compiles the torch-free csrc/cuda/carafe_kernels.cu (NCHW) and carafe_kernels_nhwc.cu
  (channels_last) for sm_80 and sm_90 with the defines torch's build adds, and ptxas reports no register
  spills and no stack frame in any kernel;
* the torch glue csrc/cuda/carafe_cuda.cpp passes a syntax-only compile against torch's headers;
* the same carafe_kernels.cu, built by the host compiler with -DCARAFE_CUDA_EMULATION (every block and
  thread run one after another on the CPU), matches the float64 reference, forward and backward, for
  the templated and the generic kernels, split channels, a capped grid, misaligned pointers, tiny and
  empty shapes, and never reads or writes outside its buffers (guard zones around every buffer); the
  same for the down ops (carafe_down, carafe_down_fused) against their reference, and for the
  channels_last kernels of all eight ops (against the reference and the NCHW kernels).

What this cannot check: timing, occupancy, the real memory system, and anything about concurrency
(the kernels use no shared state between threads by design, so the emulation covers their maths).
benchmarks/gpu_check.sh runs the real thing on a GPU.
"""
from __future__ import annotations

import concurrent.futures
import ctypes
import os
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch

from carafe_kernels.contract import down_output_size
from carafe_kernels.reference import (carafe_down_fused_reference, carafe_down_reference, carafe_fused_reference,
                                      carafe_reference)
from conftest import TOLERANCES, shape_id

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
KERNELS_CU = CSRC / "cuda" / "carafe_kernels.cu"
KERNELS_NHWC_CU = CSRC / "cuda" / "carafe_kernels_nhwc.cu"
KERNEL_SOURCES = (KERNELS_CU, KERNELS_NHWC_CU)
# The standard torch's BuildExtension compiles the extension with (C++20 from torch 2.13 on; torch
# 2.14's headers refuse anything older), so these checks see what the real build sees.
CXX_STANDARD = "-std=c++20"
GLUE_CPP = CSRC / "cuda" / "carafe_cuda.cpp"
ARCHS = ("80", "90")
# What torch.utils.cpp_extension adds to every nvcc command line: the kernels must build with them.
TORCH_NVCC_DEFINES = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                      "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]
# The kernel families carafe_kernels.cu must define (a renamed or lost kernel fails the build test).
KERNEL_FAMILIES = ("carafe_forward_tiled_kernel", "carafe_forward_generic_kernel", "carafe_softmax_kernel",
                   "carafe_backward_features_tiled_kernel", "carafe_backward_features_generic_kernel",
                   "carafe_backward_masks_tiled_kernel", "carafe_backward_masks_generic_kernel",
                   "carafe_backward_finalize_kernel",
                   # the down ops (carafe_down, carafe_down_fused); they reuse the softmax and finalize kernels
                   "carafe_down_forward_tiled_kernel", "carafe_down_forward_generic_kernel",
                   "carafe_down_backward_features_tiled_kernel", "carafe_down_backward_features_generic_kernel",
                   "carafe_down_backward_masks_tiled_kernel", "carafe_down_backward_masks_generic_kernel",
                   # channels_last (carafe_kernels_nhwc.cu), up and down alike
                   "carafe_nhwc_forward_kernel", "carafe_nhwc_softmax_kernel", "carafe_nhwc_backward_features_kernel",
                   "carafe_nhwc_backward_masks_kernel", "carafe_nhwc_softmax_backward_kernel")


def _cuda_home() -> Path | None:
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    candidates.append("/usr/local/cuda")
    for c in candidates:
        if c and (Path(c) / "include" / "cuda_runtime_api.h").exists():
            return Path(c)
    return None



def _host_toolchain_or_skip():
    """(host C++ compiler, CUDA home with its headers), or skip the test saying which is missing."""
    cxx, home = _cxx(), _cuda_home()
    if cxx is None:
        pytest.skip("no host C++ compiler")
    if home is None:
        pytest.skip("CUDA headers (cuda_fp16.h, cuda_runtime_api.h) not found")
    return cxx, home

def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    home = _cuda_home()
    if home and (home / "bin" / "nvcc").exists():
        return str(home / "bin" / "nvcc")
    return None


def _cxx() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")


def _run(cmd: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------------------------------------------
# nvcc + ptxas
# ---------------------------------------------------------------------------------------------------
def parse_ptxas(log: str) -> dict[str, dict[str, int]]:
    """{mangled kernel name: {registers, stack, spill_stores, spill_loads}} from `ptxas -v` output."""
    kernels: dict[str, dict[str, int]] = {}
    current = None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '([^']+)'", line)
        if m:
            current = kernels.setdefault(m.group(1), {"registers": -1, "stack": -1, "spill_stores": -1,
                                                      "spill_loads": -1})
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            current["stack"], current["spill_stores"], current["spill_loads"] = map(int, m.groups())
        m = re.search(r"Used (\d+) registers", line)
        if m:
            current["registers"] = int(m.group(1))
    return kernels


def _demangle(names: list[str]) -> dict[str, str]:
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt or not names:
        return {n: n for n in names}
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return {n: re.sub(r"carafe::cuda::\(anonymous namespace\)::", "", d) for n, d in zip(names, out)}


@pytest.fixture(scope="module")
def ptxas_reports(tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, dict]]:
    """Compiles the kernel sources once per arch (the archs' nvcc runs in parallel, the sources of one
    arch one after another); per arch, one result for all sources: the first failure (else the last
    run) and every source's log and kernels."""
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    out_dir = tmp_path_factory.mktemp("nvcc")

    def compile_arch(arch: str):
        procs, kernels = [], {}
        for source in KERNEL_SOURCES:
            cmd = [nvcc, CXX_STANDARD, "-O3", f"-I{CSRC}", *TORCH_NVCC_DEFINES,
                   f"-gencode=arch=compute_{arch},code=sm_{arch}", "-Xptxas", "-v", "-c", str(source),
                   "-o", str(out_dir / f"{source.stem}_sm{arch}.o")]
            procs.append(_run(cmd))
            kernels.update(parse_ptxas(procs[-1].stdout + procs[-1].stderr))
        failed = [proc for proc in procs if proc.returncode != 0]
        proc = subprocess.CompletedProcess(procs[-1].args, failed[0].returncode if failed else 0,
                                           "".join(p.stdout for p in procs), "".join(p.stderr for p in procs))
        return arch, proc, kernels

    with concurrent.futures.ThreadPoolExecutor(len(ARCHS)) as pool:
        results = list(pool.map(compile_arch, ARCHS))
    return {arch: (proc, kernels) for arch, proc, kernels in results}


# nvcc for two architectures takes minutes: marked slow (run `-m "not slow"` to skip while iterating;
# CI runs them, nothing deselects them by default).
@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS, ids=[f"sm_{a}" for a in ARCHS])
def test_nvcc_compiles(ptxas_reports, arch):
    proc, kernels = ptxas_reports[arch]
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"nvcc failed for sm_{arch}:\n{log[-6000:]}"
    own = ("carafe_kernels.cu", "carafe_kernels_nhwc.cu", "carafe_cuda_common.cuh")
    warnings = [line for line in log.splitlines() if "warning" in line.lower() and any(f in line for f in own)]
    assert not warnings, "nvcc warnings in the kernel sources:\n" + "\n".join(warnings)
    for family in KERNEL_FAMILIES:
        assert any(family in name for name in kernels), f"no {family} in the sm_{arch} object"


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS, ids=[f"sm_{a}" for a in ARCHS])
def test_no_register_spills(ptxas_reports, arch):
    proc, kernels = ptxas_reports[arch]
    assert proc.returncode == 0, "see test_nvcc_compiles"
    assert kernels, "ptxas printed no per-kernel report (was -Xptxas -v dropped?)"
    names = _demangle(sorted(kernels))
    incomplete = [names[n] for n, r in kernels.items() if min(r.values()) < 0]
    assert not incomplete, "unparsed ptxas entries: " + ", ".join(incomplete)
    bad = [f"{names[n]}: {r}" for n, r in sorted(kernels.items())
           if r["spill_stores"] or r["spill_loads"] or r["stack"]]
    assert not bad, f"sm_{arch} kernels that spill or use a stack frame:\n" + "\n".join(bad)


# ---------------------------------------------------------------------------------------------------
# torch glue: syntax only (a CPU build of torch ships the stable headers but cannot link CUDA), with the
# flags of the real build: the stable-ABI target (ATen/c10 headers then refuse to compile), USE_CUDA
# (the shim's CUDA functions) and the limited Python API.
# ---------------------------------------------------------------------------------------------------
def test_torch_glue_syntax(tmp_path):
    from torch.utils import cpp_extension

    from carafe_kernels._abi import target_version_macro

    cxx, home = _host_toolchain_or_skip()
    includes = [Path(p) for p in cpp_extension.include_paths()]
    if not any((p / "torch" / "csrc" / "stable" / "library.h").exists() for p in includes):
        pytest.skip("this torch install has no stable-ABI headers (torch < 2.10)")
    cmd = [cxx, "-fsyntax-only", CXX_STANDARD, f"-DTORCH_TARGET_VERSION={target_version_macro()}", "-DUSE_CUDA",
           "-DPy_LIMITED_API=0x030A0000", *(f"-I{p}" for p in includes), f"-I{home / 'include'}",
           f"-I{sysconfig.get_paths()['include']}", f"-I{CSRC}", str(GLUE_CPP)]
    proc = _run(cmd)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stderr[-6000:]}"
    own = [line for line in proc.stderr.splitlines() if "carafe_cuda.cpp" in line and "warning" in line]
    assert not own, "\n".join(own)


# ---------------------------------------------------------------------------------------------------
# Host emulation of the kernels
# ---------------------------------------------------------------------------------------------------
EMU_SOURCE = Path(__file__).resolve().parent / "scripts" / "cuda_emulation.cpp"

DTYPE_CODE = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
CUDA_ERROR_INVALID_VALUE = 1
PAD = 64            # guard elements before and after every buffer (keeps 16-byte alignment)
SENTINEL = -12288.0  # exactly representable in every dtype, never a plausible result here


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    cxx, home = _host_toolchain_or_skip()
    d = tmp_path_factory.mktemp("emu")
    cmd = [cxx, CXX_STANDARD, "-O1", "-fPIC", "-shared", "-DCARAFE_CUDA_EMULATION", "-Wall", "-Wextra",
           "-Wno-unknown-pragmas", f"-I{CSRC}", f"-I{home / 'include'}", str(EMU_SOURCE), "-o", str(d / "emu.so")]
    proc = _run(cmd)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stderr[-6000:]}"
    own = [line for line in proc.stderr.splitlines()
           if ("carafe_kernels" in line or "carafe_cuda_common" in line) and "warning" in line]
    assert not own, "\n".join(own)
    lib = ctypes.CDLL(str(d / "emu.so"))
    lib.emu_unsupported_reason.restype = ctypes.c_char_p
    lib.emu_forward.restype = ctypes.c_int
    lib.emu_workspace_bytes.restype = ctypes.c_ulonglong
    lib.emu_backward.restype = ctypes.c_int
    lib.emu_misaligned_accesses.restype = ctypes.c_longlong
    lib.emu_down_unsupported_reason.restype = ctypes.c_char_p
    lib.emu_down_forward.restype = ctypes.c_int
    lib.emu_down_workspace_bytes.restype = ctypes.c_ulonglong
    lib.emu_down_backward.restype = ctypes.c_int
    lib.emu_wide_accesses.restype = ctypes.c_longlong
    lib.emu_nhwc_forward_workspace_bytes.restype = ctypes.c_ulonglong
    lib.emu_nhwc_forward.restype = ctypes.c_int
    lib.emu_nhwc_backward_workspace_bytes.restype = ctypes.c_ulonglong
    lib.emu_nhwc_backward.restype = ctypes.c_int
    # Argument types too: without them ctypes passes a Python int as a 32-bit int, and an argument that
    # goes on the stack (the 7th on) then has garbage in the upper half of its 64-bit slot, so a
    # workspace size or max_blocks would not be the value the test gave.
    dims, i, ull, ll, ptr = ctypes.POINTER(ctypes.c_longlong), ctypes.c_int, ctypes.c_ulonglong, ctypes.c_longlong, \
        ctypes.c_void_p
    for name in ("emu_unsupported_reason", "emu_down_unsupported_reason"):
        getattr(lib, name).argtypes = [dims]
    for prefix in ("emu_", "emu_down_"):
        getattr(lib, prefix + "forward").argtypes = [dims, i, i, ptr, ptr, ptr, i, ll]
        getattr(lib, prefix + "workspace_bytes").argtypes = [dims, i, i, i, i]
        getattr(lib, prefix + "backward").argtypes = [dims, i, i, ptr, ptr, ptr, ptr, ptr, ptr, ull, i, ll]
    lib.emu_nhwc_unsupported_reason.restype = ctypes.c_char_p
    lib.emu_nhwc_unsupported_reason.argtypes = [dims, i]
    lib.emu_nhwc_forward_workspace_bytes.argtypes = [dims, i, i, i]
    lib.emu_nhwc_forward.argtypes = [dims, i, i, i, ptr, ptr, ptr, ptr, ull, i, ll, ll]
    lib.emu_nhwc_backward_workspace_bytes.argtypes = [dims, i, i, i, i]
    lib.emu_nhwc_backward.argtypes = [dims, i, i, i, ptr, ptr, ptr, ptr, ptr, ptr, ull, i, ll, ll]
    return lib


def _dims(N, C, H, W, k, G, s):
    return (ctypes.c_longlong * 7)(N, C, H, W, k, G, s)


class Guarded:
    """A flat buffer: PAD guard elements, `shift` more, the tensor's elements, PAD guard elements.
    Inputs are guarded by NaN (an out-of-bounds read that reaches a result makes it NaN), outputs by
    SENTINEL (an out-of-bounds write changes a guard; an element never written keeps SENTINEL)."""

    def __init__(self, shape, dtype, *, fill=None, guard=float("nan"), shift=0):
        n = 1
        for e in shape:
            n *= e
        self.shape, self.n, self.lo = tuple(shape), n, PAD + shift
        self.buf = torch.full((self.lo + n + PAD,), guard, dtype=dtype)
        if fill is not None:
            self.buf[self.lo:self.lo + n] = fill.reshape(-1)
        self.guard = guard

    @property
    def ptr(self):
        return ctypes.c_void_p(self.buf.data_ptr() + self.lo * self.buf.element_size())

    def tensor(self):
        return self.buf[self.lo:self.lo + self.n].view(self.shape)

    def guards_intact(self) -> bool:
        g = torch.cat([self.buf[:self.lo], self.buf[self.lo + self.n:]]).double()
        return bool(torch.isnan(g).all()) if self.guard != self.guard else bool((g == self.guard).all())


def _inputs(N, C, H, W, k, G, s, dtype, fused, seed, down=False):
    gen = torch.Generator().manual_seed(seed)
    f = torch.randn(N, C, H, W, generator=gen, dtype=torch.float64)
    if down:
        # masks and logits alike (N, G*k*k, Ho, Wo), as grad_output (N, C, Ho, Wo)
        Ho, Wo = down_output_size(H, s), down_output_size(W, s)
        m = torch.randn(N, G * k * k, Ho, Wo, generator=gen, dtype=torch.float64) * 2 if fused else \
            torch.rand(N, G * k * k, Ho, Wo, generator=gen, dtype=torch.float64)
        go = torch.randn(N, C, Ho, Wo, generator=gen, dtype=torch.float64)
        return f.to(dtype), m.to(dtype), go.to(dtype)
    if fused:
        m = torch.randn(N, G * k * k * s * s, H, W, generator=gen, dtype=torch.float64) * 2
    else:
        m = torch.rand(N, G * k * k, H * s, W * s, generator=gen, dtype=torch.float64)
    go = torch.randn(N, C, H * s, W * s, generator=gen, dtype=torch.float64)
    return f.to(dtype), m.to(dtype), go.to(dtype)



def dirty_workspace(n: int) -> Guarded:
    """A guarded workspace of n bytes filled with 0xFF (NaN in fp32/fp64 words), as a GPU's caching
    allocator hands back memory with old contents: a kernel that read its workspace before writing it, or
    accumulated into it, would show here instead of passing on zeros."""
    return Guarded((n,), torch.uint8, guard=171, fill=torch.full((n,), 0xFF, dtype=torch.uint8))

def emu_run(lib, N, C, H, W, k, G, s, dtype, fused, *, num_sms=1, max_blocks=2**31 - 1, shift=0, seed=0,
            output_mask=(True, True), down=False):
    """Forward and backward through the emulated launchers (down: the down ops' launchers); returns
    inputs, outputs, and guard checks. output_mask: the gradients to ask for; one not asked for gets a
    null pointer and comes back None."""
    f, m, go = _inputs(N, C, H, W, k, G, s, dtype, fused, seed, down)
    dims, code = _dims(N, C, H, W, k, G, s), DTYPE_CODE[dtype]
    launch_forward, workspace_bytes, launch_backward = (
        (lib.emu_down_forward, lib.emu_down_workspace_bytes, lib.emu_down_backward) if down
        else (lib.emu_forward, lib.emu_workspace_bytes, lib.emu_backward))
    gf_in, gm_in, ggo = (Guarded(t.shape, dtype, fill=t, shift=shift) for t in (f, m, go))
    out = Guarded(go.shape, dtype, guard=SENTINEL, fill=torch.full(go.shape, SENTINEL), shift=shift)
    rc = launch_forward(dims, code, int(fused), gf_in.ptr, gm_in.ptr, out.ptr, num_sms, max_blocks)
    assert rc == 0, f"carafe_forward returned cudaError {rc}"
    ws_bytes = workspace_bytes(dims, code, int(fused), int(output_mask[1]), num_sms)
    ws = dirty_workspace(ws_bytes)
    grad_f, grad_m = (Guarded(t.shape, dtype, guard=SENTINEL, fill=torch.full(t.shape, SENTINEL), shift=shift)
                      if wanted else None for t, wanted in zip((f, m), output_mask))
    null = ctypes.c_void_p(0)
    rc = launch_backward(dims, code, int(fused), ggo.ptr, gf_in.ptr, gm_in.ptr, grad_f.ptr if grad_f else null,
                         grad_m.ptr if grad_m else null, ws.ptr, ws_bytes, num_sms, max_blocks)
    assert rc == 0, f"carafe_backward returned cudaError {rc}"
    for name, g in (("output", out), ("grad_features", grad_f), ("grad_masks", grad_m), ("workspace", ws)):
        assert g is None or g.guards_intact(), f"{name}: a write outside the buffer"
    assert lib.emu_misaligned_accesses() == 0, "a vector access a GPU would fault on (misaligned)"
    return dict(f=f, m=m, go=go, out=out.tensor(), grad_f=grad_f.tensor() if grad_f else None,
                grad_m=grad_m.tensor() if grad_m else None, ws_bytes=ws_bytes)


def check_against_reference(r, k, G, s, dtype, fused, down=False):
    """emu_run's outputs (a gradient not asked for, None, is skipped) vs the float64 reference."""
    f = r["f"].double().requires_grad_()
    m = r["m"].double().requires_grad_()
    if down:
        reference = carafe_down_fused_reference if fused else carafe_down_reference
    else:
        reference = carafe_fused_reference if fused else carafe_reference
    ref = reference(f, m, k, G, s)
    ref.backward(r["go"].double())
    tol = TOLERANCES[dtype]
    for name, got, want in (("output", r["out"], ref), ("grad_features", r["grad_f"], f.grad),
                            ("grad_masks", r["grad_m"], m.grad)):
        if got is None:
            continue
        got = got.double()
        assert not (got == SENTINEL).any(), f"{name}: elements never written"
        assert torch.isfinite(got).all(), f"{name}: non-finite values (an out-of-bounds read?)"
        torch.testing.assert_close(got, want.detach(), **tol, msg=lambda msg, n=name: f"{n}: {msg}")


# (N, C, H, W, k, G, s): every templated (k, s) and generic ones; borders everywhere (small planes),
# planes smaller than the window, single pixels, C/G with uneven channel chunks.
TILED_KS = [(1, 1), (1, 2), (1, 4), (3, 1), (3, 2), (3, 4), (5, 1), (5, 2), (5, 4), (7, 1), (7, 2)]
GENERIC_KS = [(7, 4), (9, 3), (11, 2), (5, 3), (3, 8)]
SHAPES = [(2, 6, 5, 7, k, 2, s) for k, s in TILED_KS + GENERIC_KS] + [
    (1, 4, 1, 1, 5, 1, 2),     # one pixel: every tap but the centre outside
    (1, 3, 2, 3, 7, 3, 2),     # plane smaller than the window, one channel per group
    (2, 8, 3, 37, 3, 4, 2),    # a row longer than a warp, G = 4
    (1, 5, 9, 2, 5, 1, 4),     # tall and narrow
]


@pytest.mark.parametrize("fused", [False, True], ids=["carafe", "fused"])
@pytest.mark.parametrize("shape", SHAPES, ids=[shape_id(*s) for s in SHAPES])
def test_emulated_fp32(emu, shape, fused):
    r = emu_run(emu, *shape, torch.float32, fused)
    check_against_reference(r, *shape[4:], torch.float32, fused)


@pytest.mark.parametrize("fused", [False, True], ids=["carafe", "fused"])
@pytest.mark.parametrize("shape", [(1, 76, 4, 3, 5, 2, 2), (2, 36, 3, 5, 3, 2, 4), (1, 20, 3, 4, 7, 1, 2),
                                   (1, 70, 4, 3, 9, 2, 3)],
                         ids=lambda s: shape_id(*s))
def test_emulated_split_channels_and_capped_grid(emu, shape, fused):
    # Many multiprocessors: the channels of a group are split across blocks in uneven chunks (at least
    # 8 channels each, 32 in the fused forward), the mask gradient through partial sums and the finalize
    # kernel; max_blocks=3: every kernel grid-strides over its blocks.
    r = emu_run(emu, *shape, torch.float32, fused, num_sms=1000, max_blocks=3)
    check_against_reference(r, *shape[4:], torch.float32, fused)


@pytest.mark.parametrize("fused", [False, True], ids=["carafe", "fused"])
@pytest.mark.parametrize("shape", [(2, 6, 5, 7, 5, 2, 2), (1, 4, 3, 3, 3, 1, 4)], ids=lambda s: shape_id(*s))
def test_emulated_misaligned_pointers(emu, shape, fused):
    # One element off 16-byte alignment: the launchers must take the scalar (generic) kernels.
    r = emu_run(emu, *shape, torch.float32, fused, shift=1)
    check_against_reference(r, *shape[4:], torch.float32, fused)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fused", [False, True], ids=["carafe", "fused"])
@pytest.mark.parametrize("shape", [(2, 6, 5, 7, 5, 2, 2), (1, 4, 4, 3, 3, 1, 4), (1, 3, 3, 4, 9, 3, 2),
                                   (1, 40, 3, 4, 5, 1, 2)],
                         ids=lambda s: shape_id(*s))
def test_emulated_dtypes(emu, shape, fused, dtype):
    r = emu_run(emu, *shape, dtype, fused, num_sms=1000)
    check_against_reference(r, *shape[4:], dtype, fused)


# The backward's output_mask: templated and generic (k, s), the split reduction (many multiprocessors)
# with a capped grid, fp16 (the fp32 partials), misaligned pointers (the generic kernels).
OUTPUT_MASK_CASES = [((2, 6, 5, 7, 5, 2, 2), torch.float32, {}), ((1, 3, 3, 4, 9, 3, 2), torch.float32, {}),
                     ((1, 76, 4, 3, 5, 2, 2), torch.float32, dict(num_sms=1000, max_blocks=3)),
                     ((1, 40, 3, 4, 5, 1, 2), torch.float16, dict(num_sms=1000)),
                     ((2, 6, 5, 7, 5, 2, 2), torch.float32, dict(shift=1))]


@pytest.mark.parametrize("output_mask", [(True, False), (False, True)], ids=["features-only", "masks-only"])
@pytest.mark.parametrize("fused", [False, True], ids=["carafe", "fused"])
@pytest.mark.parametrize("shape, dtype, launch", OUTPUT_MASK_CASES,
                         ids=[f"{shape_id(*c[0])}-{str(c[1])[6:]}-{'-'.join(c[2]) or 'default'}"
                              for c in OUTPUT_MASK_CASES])
def test_emulated_output_mask_computes_only_what_is_asked(emu, shape, dtype, launch, fused, output_mask):
    """A null gradient pointer is a gradient not asked for: the launcher writes nothing there (a write
    through the null pointer would crash), stays inside a workspace sized for that call (its guards),
    and the gradient it computes is bitwise the one of a call that asks for both."""
    full = emu_run(emu, *shape, dtype, fused, **launch)
    part = emu_run(emu, *shape, dtype, fused, output_mask=output_mask, **launch)
    for name, wanted in zip(("grad_f", "grad_m"), output_mask):
        if wanted:
            assert torch.equal(part[name], full[name]), name
        else:
            assert part[name] is None
    assert part["ws_bytes"] <= full["ws_bytes"]
    if not output_mask[1] and launch.get("num_sms", 1) > 1:
        # the split reduction's partial sums are the mask gradient's: a features-only call has none
        assert part["ws_bytes"] < full["ws_bytes"]


def test_emulated_nothing_asked_launches_nothing(emu):
    dims = _dims(2, 6, 5, 7, 5, 2, 2)
    null = ctypes.c_void_p(0)
    assert emu.emu_backward(dims, 0, 1, null, null, null, null, null, null, 0, 1, 1) == 0


@pytest.mark.parametrize("shape", [(0, 4, 5, 5, 3, 1, 2), (2, 0, 5, 5, 3, 1, 2), (2, 4, 0, 5, 3, 1, 2)],
                         ids=lambda s: shape_id(*s))
def test_emulated_empty_shapes_launch_nothing(emu, shape):
    dims = _dims(*shape)
    null = ctypes.c_void_p(0)
    assert emu.emu_forward(dims, 0, 0, null, null, null, 1, 1) == 0
    assert emu.emu_workspace_bytes(dims, 0, 1, 1, 1) == 0
    assert emu.emu_backward(dims, 0, 1, null, null, null, null, null, null, 0, 1, 1) == 0


@pytest.mark.parametrize("shape, why", [
    ((1, 4, 5, 5, 4, 1, 2), "odd"),
    ((1, 4, 5, 5, 13, 1, 2), "kernel_size <= 11"),
    ((1, 4, 5, 5, 3, 1, 9), "scale_factor <= 8"),
    ((1, 4, 5, 5, 3, 3, 2), "divide"),
    ((1, 4, 2**16, 2**15, 3, 1, 1), "2^31"),
    ((1, 4, 2**14, 2**14, 3, 1, 4), "2^31"),
], ids=["even-k", "k13", "s9", "G-not-dividing", "plane-2^31", "output-plane-2^31"])
def test_unsupported_shapes_are_refused(emu, shape, why):
    dims = _dims(*shape)
    reason = emu.emu_unsupported_reason(dims)
    assert reason is not None and why in reason.decode()
    null = ctypes.c_void_p(0)
    assert emu.emu_forward(dims, 0, 0, null, null, null, 1, 1) == CUDA_ERROR_INVALID_VALUE
    assert emu.emu_backward(dims, 0, 0, null, null, null, null, null, null, 0, 1, 1) == CUDA_ERROR_INVALID_VALUE


def test_supported_limits_accepted(emu):
    for shape in [(1, 4, 5, 5, 11, 1, 8), (1, 4, 5, 5, 1, 4, 1), (1, 1, 2**15 - 1, 2**16, 3, 1, 1)]:
        assert emu.emu_unsupported_reason(_dims(*shape)) is None, shape


# ---------------------------------------------------------------------------------------------------
# The down ops (carafe_down, carafe_down_fused): output, masks and logits (.., ceil(H/s), ceil(W/s))
# ---------------------------------------------------------------------------------------------------
# Tiled kernels: k in {1, 3, 5, 7} (forward and mask gradient, any s), the gather for (k, s) with s in
# {1, 2, 4}; the rest (s = 3 gathers, k = 9, 11) runs on the generic kernels. H = 7 and W = 10 are not
# multiples of s = 3 or 4 (W of 3 and 4, H of 2 neither), so the last output row and column have windows
# reaching past the image.
DOWN_SHAPES = [(2, 6, 7, 10, k, 2, s) for k in (1, 3, 5, 7) for s in (1, 2, 3, 4)] + [
    (2, 6, 7, 10, 9, 2, 2), (1, 4, 9, 8, 11, 1, 3), (1, 4, 6, 5, 9, 2, 8),
    (1, 4, 1, 1, 5, 1, 2),      # one pixel: one output, every tap but the centre outside
    (1, 3, 2, 3, 7, 3, 2),      # plane smaller than the window, one channel per group
    (1, 2, 3, 3, 3, 1, 4),      # s larger than the plane: one output
    (2, 8, 3, 37, 3, 4, 2),     # a row longer than a warp, G = 4
    (1, 5, 9, 2, 5, 1, 3),      # tall and narrow
    (1, 2, 1, 300, 3, 1, 2),    # one row of more output positions than a block has threads
]


@pytest.mark.parametrize("fused", [False, True], ids=["down", "down_fused"])
@pytest.mark.parametrize("shape", DOWN_SHAPES, ids=[shape_id(*s) for s in DOWN_SHAPES])
def test_emulated_down_fp32(emu, shape, fused):
    r = emu_run(emu, *shape, torch.float32, fused, down=True)
    check_against_reference(r, *shape[4:], torch.float32, fused, down=True)


@pytest.mark.parametrize("fused", [False, True], ids=["down", "down_fused"])
@pytest.mark.parametrize("shape", [(1, 76, 7, 6, 5, 2, 2), (2, 36, 5, 9, 3, 2, 3), (1, 20, 6, 7, 7, 1, 2),
                                   (1, 70, 8, 7, 9, 2, 2)],
                         ids=lambda s: shape_id(*s))
def test_emulated_down_split_channels_and_capped_grid(emu, shape, fused):
    # As for the up ops: uneven channel chunks (the mask gradient through the workspace's partial sums
    # and the finalize kernel on the down grid) and every kernel grid-striding over 3 blocks.
    r = emu_run(emu, *shape, torch.float32, fused, num_sms=1000, max_blocks=3, down=True)
    check_against_reference(r, *shape[4:], torch.float32, fused, down=True)


@pytest.mark.parametrize("fused", [False, True], ids=["down", "down_fused"])
@pytest.mark.parametrize("shape", [(2, 6, 7, 10, 5, 2, 2), (1, 4, 6, 6, 3, 1, 3)], ids=lambda s: shape_id(*s))
def test_emulated_down_misaligned_pointers(emu, shape, fused):
    # The down kernels make scalar accesses only: one element off 16-byte alignment changes nothing.
    r = emu_run(emu, *shape, torch.float32, fused, shift=1, down=True)
    check_against_reference(r, *shape[4:], torch.float32, fused, down=True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fused", [False, True], ids=["down", "down_fused"])
@pytest.mark.parametrize("shape", [(2, 6, 7, 10, 5, 2, 2), (1, 4, 6, 5, 3, 1, 3), (1, 3, 5, 6, 9, 3, 2),
                                   (1, 40, 6, 5, 5, 1, 2)],
                         ids=lambda s: shape_id(*s))
def test_emulated_down_dtypes(emu, shape, fused, dtype):
    r = emu_run(emu, *shape, dtype, fused, num_sms=1000, down=True)
    check_against_reference(r, *shape[4:], dtype, fused, down=True)


# output_mask of the down backward: tiled and generic kernels, the split reduction with a capped grid,
# fp16 (fp32 partials), fp64 (generic only), misaligned pointers.
DOWN_OUTPUT_MASK_CASES = [((2, 6, 7, 10, 5, 2, 2), torch.float32, {}), ((1, 3, 5, 6, 9, 3, 2), torch.float32, {}),
                          ((2, 6, 7, 10, 3, 2, 3), torch.float32, {}),
                          ((1, 76, 7, 6, 5, 2, 2), torch.float32, dict(num_sms=1000, max_blocks=3)),
                          ((1, 40, 6, 5, 5, 1, 2), torch.float16, dict(num_sms=1000)),
                          ((1, 40, 6, 5, 3, 1, 3), torch.float64, dict(num_sms=1000)),
                          ((2, 6, 7, 10, 5, 2, 2), torch.float32, dict(shift=1))]


@pytest.mark.parametrize("output_mask", [(True, False), (False, True)], ids=["features-only", "masks-only"])
@pytest.mark.parametrize("fused", [False, True], ids=["down", "down_fused"])
@pytest.mark.parametrize("shape, dtype, launch", DOWN_OUTPUT_MASK_CASES,
                         ids=[f"{shape_id(*c[0])}-{str(c[1])[6:]}-{'-'.join(c[2]) or 'default'}"
                              for c in DOWN_OUTPUT_MASK_CASES])
def test_emulated_down_output_mask_computes_only_what_is_asked(emu, shape, dtype, launch, fused, output_mask):
    """As for the up ops: nothing is written for a gradient not asked for, the workspace sized for the
    call suffices, and the gradient asked for is bitwise the one of a full call, and the reference's."""
    full = emu_run(emu, *shape, dtype, fused, down=True, **launch)
    part = emu_run(emu, *shape, dtype, fused, output_mask=output_mask, down=True, **launch)
    for name, wanted in zip(("grad_f", "grad_m"), output_mask):
        if wanted:
            assert torch.equal(part[name], full[name]), name
        else:
            assert part[name] is None
    check_against_reference(part, *shape[4:], dtype, fused, down=True)
    assert part["ws_bytes"] <= full["ws_bytes"]
    if not output_mask[1] and launch.get("num_sms", 1) > 1:
        assert part["ws_bytes"] < full["ws_bytes"]


def test_emulated_down_nothing_asked_launches_nothing(emu):
    dims = _dims(2, 6, 7, 10, 5, 2, 2)
    null = ctypes.c_void_p(0)
    assert emu.emu_down_backward(dims, 0, 1, null, null, null, null, null, null, 0, 1, 1) == 0


@pytest.mark.parametrize("shape", [(0, 4, 5, 5, 3, 1, 2), (2, 0, 5, 5, 3, 1, 2), (2, 4, 0, 5, 3, 1, 2),
                                   (2, 4, 5, 0, 3, 1, 3)],
                         ids=lambda s: shape_id(*s))
def test_emulated_down_empty_shapes_launch_nothing(emu, shape):
    dims = _dims(*shape)
    null = ctypes.c_void_p(0)
    assert emu.emu_down_forward(dims, 0, 0, null, null, null, 1, 1) == 0
    assert emu.emu_down_workspace_bytes(dims, 0, 1, 1, 1) == 0
    assert emu.emu_down_backward(dims, 0, 1, null, null, null, null, null, null, 0, 1, 1) == 0


@pytest.mark.parametrize("shape, why", [
    ((1, 4, 5, 5, 4, 1, 2), "odd"),
    ((1, 4, 5, 5, 13, 1, 2), "kernel_size <= 11"),
    ((1, 4, 5, 5, 3, 1, 9), "scale_factor <= 8"),
    ((1, 4, 5, 5, 3, 3, 2), "divide"),
    ((1, 4, 2**16, 2**15, 3, 1, 2), "features plane H x W must have fewer than 2^31"),
], ids=["even-k", "k13", "s9", "G-not-dividing", "features-plane-2^31"])
def test_down_unsupported_shapes_are_refused(emu, shape, why):
    dims = _dims(*shape)
    reason = emu.emu_down_unsupported_reason(dims)
    assert reason is not None and why in reason.decode()
    null = ctypes.c_void_p(0)
    assert emu.emu_down_forward(dims, 0, 0, null, null, null, 1, 1) == CUDA_ERROR_INVALID_VALUE
    assert emu.emu_down_backward(dims, 0, 0, null, null, null, null, null, null, 0, 1, 1) == \
        CUDA_ERROR_INVALID_VALUE


def test_down_supported_limits_accepted(emu):
    # The down ops' largest plane is the features' (the output is smaller): a 2^28-pixel plane at s = 4,
    # which the up ops refuse (their output plane would be 2^32), is within the 32-bit offsets here.
    assert emu.emu_unsupported_reason(_dims(1, 4, 2**14, 2**14, 3, 1, 4)) is not None
    for shape in [(1, 4, 2**14, 2**14, 3, 1, 4), (1, 4, 5, 5, 11, 1, 8), (1, 1, 2**15 - 1, 2**16, 3, 1, 1)]:
        assert emu.emu_down_unsupported_reason(_dims(*shape)) is None, shape


# ---------------------------------------------------------------------------------------------------
# channels_last (carafe_kernels_nhwc.cu): the same eight ops, every tensor in channels_last memory order
# ---------------------------------------------------------------------------------------------------
def _nhwc(t: torch.Tensor) -> torch.Tensor:
    """A logical (N, C, H, W) tensor's elements in channels_last memory order, as an (N, H, W, C) tensor."""
    return t.permute(0, 2, 3, 1).contiguous()


NO_CAP = 2**31 - 1  # max_launch_items of the real launches


def emu_run_nhwc(lib, N, C, H, W, k, G, s, dtype, fused, *, down=False, num_sms=1, max_blocks=2**31 - 1, shift=0,
                 seed=0, output_mask=(True, True), max_launch_items=NO_CAP):
    """emu_run for the channels_last launchers: the same inputs (so the results compare with emu_run's),
    laid out channels_last in guarded buffers, the forward's and the backward's workspaces guarded too;
    outputs come back as logical NCHW views. max_launch_items: the launchers' cap on one launch's items
    (a smaller one splits the call into launches of fewer images)."""
    f, m, go = _inputs(N, C, H, W, k, G, s, dtype, fused, seed, down)
    dims, code = _dims(N, C, H, W, k, G, s), DTYPE_CODE[dtype]
    f_in, m_in, go_in = (Guarded(_nhwc(t).shape, dtype, fill=_nhwc(t), shift=shift) for t in (f, m, go))

    def output(t):
        return Guarded(_nhwc(t).shape, dtype, guard=SENTINEL, fill=torch.full(_nhwc(t).shape, SENTINEL), shift=shift)

    out = output(go)
    fws_bytes = lib.emu_nhwc_forward_workspace_bytes(dims, code, int(fused), int(down))
    fws = dirty_workspace(fws_bytes)
    rc = lib.emu_nhwc_forward(dims, code, int(fused), int(down), f_in.ptr, m_in.ptr, out.ptr, fws.ptr, fws_bytes,
                              num_sms, max_blocks, max_launch_items)
    assert rc == 0, f"carafe_nhwc_forward returned cudaError {rc}"
    ws_bytes = lib.emu_nhwc_backward_workspace_bytes(dims, code, int(fused), int(down), int(output_mask[1]))
    ws = dirty_workspace(ws_bytes)
    grad_f, grad_m = (output(t) if wanted else None for t, wanted in zip((f, m), output_mask))
    null = ctypes.c_void_p(0)
    rc = lib.emu_nhwc_backward(dims, code, int(fused), int(down), go_in.ptr, f_in.ptr, m_in.ptr,
                               grad_f.ptr if grad_f else null, grad_m.ptr if grad_m else null, ws.ptr, ws_bytes,
                               num_sms, max_blocks, max_launch_items)
    assert rc == 0, f"carafe_nhwc_backward returned cudaError {rc}"
    for name, g in (("output", out), ("grad_features", grad_f), ("grad_masks", grad_m), ("forward workspace", fws),
                    ("workspace", ws)):
        assert g is None or g.guards_intact(), f"{name}: a write outside the buffer"
    for name, g, t in (("features", f_in, f), ("masks", m_in, m), ("grad_output", go_in, go)):
        assert torch.equal(g.tensor(), _nhwc(t)), f"{name}: an input was written"
    assert lib.emu_misaligned_accesses() == 0, "a vector access a GPU would fault on (misaligned)"

    def nchw(g):
        return g.tensor().permute(0, 3, 1, 2) if g is not None else None

    return dict(f=f, m=m, go=go, out=nchw(out), grad_f=nchw(grad_f), grad_m=nchw(grad_m), ws_bytes=ws_bytes,
                fws_bytes=fws_bytes)



def check_nhwc(lib, shape, dtype, fused, down, **launch):
    """The channels_last launchers against the float64 reference, and against the NCHW launchers on the
    same inputs (within the dtype's tolerance: the two sum in different orders)."""
    r = emu_run_nhwc(lib, *shape, dtype, fused, down=down, **launch)
    check_against_reference(r, *shape[4:], dtype, fused, down=down)
    nchw = emu_run(lib, *shape, dtype, fused, down=down)
    for name in ("out", "grad_f", "grad_m"):
        torch.testing.assert_close(r[name].double(), nchw[name].double(), **TOLERANCES[dtype],
                                   msg=lambda msg, n=name: f"{n} vs the NCHW kernels: {msg}")
    return r


NHWC_OPS = [(False, False), (True, False), (False, True), (True, True)]
NHWC_OP_IDS = ["carafe", "fused", "down", "down_fused"]
# (N, C, H, W, k, G, s) for the up ops and for the down ops: k = 1 to 11 and s = 1 to 8 (there is one kernel
# for every (k, s)), G > 1 with a group of whole 16-byte vectors (the vector path) and groups that are not
# (C = 6, 5, 3: the scalar path), planes smaller than the window, one pixel, rows longer than a block.
NHWC_UP_SHAPES = [(2, 8, 5, 7, k, 2, s) for k, s in [(1, 1), (3, 2), (5, 2), (7, 4), (9, 3), (11, 2), (3, 8)]] + [
    (1, 4, 1, 1, 5, 1, 2), (1, 3, 2, 3, 7, 3, 2), (2, 6, 3, 37, 3, 2, 2), (1, 5, 9, 2, 5, 1, 4)]
NHWC_DOWN_SHAPES = [(2, 8, 7, 10, k, 2, s) for k, s in [(1, 1), (3, 2), (5, 3), (7, 4), (9, 2), (11, 3), (5, 8)]] + [
    (1, 4, 1, 1, 5, 1, 2), (1, 3, 2, 3, 7, 3, 2), (1, 2, 3, 3, 3, 1, 4), (2, 6, 3, 37, 3, 2, 2),
    (1, 5, 9, 2, 5, 1, 3)]
NHWC_CASES = [(op, shape) for op in NHWC_OPS for shape in (NHWC_DOWN_SHAPES if op[1] else NHWC_UP_SHAPES)]


@pytest.mark.parametrize("op, shape", NHWC_CASES,
                         ids=[f"{NHWC_OP_IDS[NHWC_OPS.index(op)]}-{shape_id(*shape)}" for op, shape in NHWC_CASES])
def test_emulated_nhwc_fp32(emu, op, shape):
    fused, down = op
    check_nhwc(emu, shape, torch.float32, fused, down)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op", NHWC_OPS, ids=NHWC_OP_IDS)
@pytest.mark.parametrize("shape", [(2, 16, 4, 5, 5, 2, 2), (1, 6, 3, 4, 3, 2, 3), (1, 3, 3, 4, 9, 3, 2)],
                         ids=lambda s: shape_id(*s))
def test_emulated_nhwc_dtypes(emu, shape, op, dtype):
    # C16-g2: groups of 8 channels, whole vectors for every dtype (8 fp16/bf16, 2 fp64); the others scalar.
    fused, down = op
    check_nhwc(emu, shape, dtype, fused, down)


@pytest.mark.parametrize("op", NHWC_OPS, ids=NHWC_OP_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_emulated_nhwc_misaligned_pointers_and_capped_grid(emu, dtype, op):
    # One element off 16-byte alignment: the scalar path (emu_run_nhwc requires no misaligned vector
    # access); max_blocks=3: every kernel grid-strides over its items.
    fused, down = op
    shape = (2, 16, 5, 6, 5, 2, 2)
    check_nhwc(emu, shape, dtype, fused, down, shift=1)
    check_nhwc(emu, shape, dtype, fused, down, max_blocks=3)


@pytest.mark.parametrize("op", NHWC_OPS, ids=NHWC_OP_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_emulated_nhwc_vector_width_does_not_change_the_bits(emu, dtype, op):
    """The vector path (aligned, whole vectors per group) makes 16-byte accesses and the scalar path
    (misaligned) none, and both give the same bits: every channel is summed in the same order, and the
    mask gradient adds its channels one after another either way."""
    fused, down = op
    shape = (2, 16, 5, 6, 3, 2, 2)
    before = emu.emu_wide_accesses()
    vec = emu_run_nhwc(emu, *shape, dtype, fused, down=down)
    assert emu.emu_wide_accesses() > before, "the aligned call made no 16-byte access"
    before = emu.emu_wide_accesses()
    scalar = emu_run_nhwc(emu, *shape, dtype, fused, down=down, shift=1)
    assert emu.emu_wide_accesses() == before, "a misaligned call made 16-byte accesses"
    for name in ("out", "grad_f", "grad_m"):
        assert torch.equal(vec[name], scalar[name]), name


@pytest.mark.parametrize("op", NHWC_OPS, ids=NHWC_OP_IDS)
def test_emulated_nhwc_calls_split_into_launches_of_whole_images(emu, op):
    """A call whose items exceed one launch's cap runs as launches of whole images (here one image each,
    with the workspace and every tensor offset per image): the bits of one launch, and the reference."""
    fused, down = op
    shape = (3, 16, 5, 6, 3, 2, 2)
    whole = emu_run_nhwc(emu, *shape, torch.float32, fused, down=down)
    split = emu_run_nhwc(emu, *shape, torch.float32, fused, down=down, max_launch_items=200)
    for name in ("out", "grad_f", "grad_m"):
        assert torch.equal(split[name], whole[name]), name
    check_against_reference(split, *shape[4:], torch.float32, fused, down=down)


def test_emulated_nhwc_channels_not_in_whole_vectors_take_the_scalar_path(emu):
    # C = 12, G = 2: 6 channels per group, not a multiple of 4 fp32 values, though C is; aligned bases.
    before = emu.emu_wide_accesses()
    r = emu_run_nhwc(emu, 1, 12, 4, 5, 3, 2, 2, torch.float32, True)
    assert emu.emu_wide_accesses() == before
    check_against_reference(r, 3, 2, 2, torch.float32, True)


NHWC_OUTPUT_MASK_CASES = [((2, 16, 5, 6, 5, 2, 2), torch.float32, {}), ((1, 6, 3, 4, 9, 3, 2), torch.float32, {}),
                          ((2, 16, 5, 6, 3, 2, 3), torch.float16, dict(max_blocks=3)),
                          ((2, 16, 5, 6, 5, 2, 2), torch.float32, dict(shift=1))]


@pytest.mark.parametrize("output_mask", [(True, False), (False, True)], ids=["features-only", "masks-only"])
@pytest.mark.parametrize("op", NHWC_OPS, ids=NHWC_OP_IDS)
@pytest.mark.parametrize("shape, dtype, launch", NHWC_OUTPUT_MASK_CASES,
                         ids=[f"{shape_id(*c[0])}-{str(c[1])[6:]}-{'-'.join(c[2]) or 'default'}"
                              for c in NHWC_OUTPUT_MASK_CASES])
def test_emulated_nhwc_output_mask_computes_only_what_is_asked(emu, shape, dtype, launch, op, output_mask):
    """As for the NCHW launchers: a null gradient pointer gets nothing written, the workspace sized for the
    call suffices (its guards), and the gradient asked for is bitwise the one of a full call."""
    fused, down = op
    full = emu_run_nhwc(emu, *shape, dtype, fused, down=down, **launch)
    part = emu_run_nhwc(emu, *shape, dtype, fused, down=down, output_mask=output_mask, **launch)
    for name, wanted in zip(("grad_f", "grad_m"), output_mask):
        if wanted:
            assert torch.equal(part[name], full[name]), name
        else:
            assert part[name] is None
    check_against_reference(part, *shape[4:], dtype, fused, down=down)
    if fused and not output_mask[1]:
        # the mask gradient's sums are the only workspace a features-only call does not need
        assert part["ws_bytes"] < full["ws_bytes"]
    else:
        assert part["ws_bytes"] == full["ws_bytes"]


def test_nhwc_images_just_below_2_31_elements_are_accepted(emu):
    # The largest tensor of one image at 2^31 - 1 elements: one launch per image, still in 32 bits.
    for down in (False, True):
        shape = (3, 2**31 - 1, 1, 1, 1, 1, 1)
        assert emu.emu_nhwc_unsupported_reason(_dims(*shape), int(down)) is None


@pytest.mark.parametrize("down", [False, True], ids=["up", "down"])
def test_emulated_nhwc_workspaces(emu, down):
    # Only the fused ops need one: the probabilities, fp32 for fp16 (fp64 for fp64), 256-byte aligned
    # pieces; the backward adds the mask gradient's sums when it computes that gradient.
    N, C, H, W, k, G, s = 2, 8, 5, 7, 3, 2, 2
    dims = _dims(N, C, H, W, k, G, s)
    positions = (down_output_size(H, s) * down_output_size(W, s)) if down else H * s * W * s
    table = -(-N * positions * G * k * k * 4 // 256) * 256
    assert emu.emu_nhwc_forward_workspace_bytes(dims, DTYPE_CODE[torch.float16], 1, int(down)) == table
    assert emu.emu_nhwc_forward_workspace_bytes(dims, DTYPE_CODE[torch.float64], 1, int(down)) == \
        -(-N * positions * G * k * k * 8 // 256) * 256
    assert emu.emu_nhwc_forward_workspace_bytes(dims, DTYPE_CODE[torch.float16], 0, int(down)) == 0
    assert emu.emu_nhwc_backward_workspace_bytes(dims, DTYPE_CODE[torch.float16], 1, int(down), 1) == 2 * table
    assert emu.emu_nhwc_backward_workspace_bytes(dims, DTYPE_CODE[torch.float16], 1, int(down), 0) == table
    assert emu.emu_nhwc_backward_workspace_bytes(dims, DTYPE_CODE[torch.float16], 0, int(down), 1) == 0
    # a workspace smaller than asked is refused before anything runs (the gradients are asked for: one
    # buffer that nothing may touch stands in for every tensor)
    untouched = Guarded((1,), torch.float32, guard=SENTINEL, fill=torch.full((1,), SENTINEL))
    ptr = untouched.ptr
    assert emu.emu_nhwc_forward(dims, 0, 1, int(down), ptr, ptr, ptr, ptr, table - 1, 1, 1, NO_CAP) == \
        CUDA_ERROR_INVALID_VALUE
    assert emu.emu_nhwc_backward(dims, 0, 1, int(down), ptr, ptr, ptr, ptr, ptr, ptr, 2 * table - 1, 1, 1, NO_CAP) == \
        CUDA_ERROR_INVALID_VALUE
    assert untouched.guards_intact() and untouched.tensor().item() == SENTINEL


@pytest.mark.parametrize("down", [False, True], ids=["up", "down"])
@pytest.mark.parametrize("shape", [(0, 4, 5, 5, 3, 1, 2), (2, 0, 5, 5, 3, 1, 2), (2, 4, 0, 5, 3, 1, 2),
                                   (2, 4, 5, 0, 3, 1, 3)],
                         ids=lambda s: shape_id(*s))
def test_emulated_nhwc_empty_shapes_and_nothing_asked_launch_nothing(emu, shape, down):
    dims = _dims(*shape)
    null = ctypes.c_void_p(0)
    assert emu.emu_nhwc_forward_workspace_bytes(dims, 0, 1, int(down)) == 0
    assert emu.emu_nhwc_forward(dims, 0, 1, int(down), null, null, null, null, 0, 1, 1, NO_CAP) == 0
    assert emu.emu_nhwc_backward_workspace_bytes(dims, 0, 1, int(down), 1) == 0
    assert emu.emu_nhwc_backward(dims, 0, 1, int(down), null, null, null, null, null, null, 0, 1, 1, NO_CAP) == 0
    # no gradient asked for: nothing launched either, on a shape with work
    assert emu.emu_nhwc_backward(_dims(2, 6, 5, 7, 5, 2, 2), 0, 1, int(down), null, null, null, null, null, null,
                                 0, 1, 1, NO_CAP) == 0


@pytest.mark.parametrize("down", [False, True], ids=["up", "down"])
@pytest.mark.parametrize("shape, why", [
    ((1, 4, 5, 5, 4, 1, 2), "odd"), ((1, 4, 5, 5, 13, 1, 2), "kernel_size <= 11"),
    ((1, 4, 5, 5, 3, 1, 9), "scale_factor <= 8"), ((1, 4, 5, 5, 3, 3, 2), "divide"),
    ((1, 4, 2**16, 2**15, 3, 1, 2), "2^31"),
    # planes the NCHW kernels take, but an image of 2^31 elements or more: the features' (2^31), and the
    # up output's (2^33)
    ((1, 2**11, 2**10, 2**10, 3, 1, 2), "channels_last image"),
    # more than 2^31 mask elements in one image (G*k*k = 9 * 2^10 mask channels over 2^18 down output
    # pixels; the features have 2^30 elements)
    ((1, 2**10, 2**10, 2**10, 3, 2**10, 2), "channels_last image")],
    ids=["even-k", "k13", "s9", "G-not-dividing", "plane-2^31", "image-2^31", "masks-over-2^31"])
def test_nhwc_unsupported_shapes_are_refused(emu, shape, why, down):
    """The channels_last launchers refuse what unsupported_reason refuses, and an image of 2^31 elements
    or more in any tensor (their launches index items in 32 bits), which the NCHW kernels take."""
    dims = _dims(*shape)
    reason = emu.emu_nhwc_unsupported_reason(dims, int(down))
    assert reason is not None and why in reason.decode(), reason
    if why == "channels_last image":
        assert (emu.emu_down_unsupported_reason if down else emu.emu_unsupported_reason)(dims) is None
    null = ctypes.c_void_p(0)
    assert emu.emu_nhwc_forward(dims, 0, 0, int(down), null, null, null, null, 0, 1, 1, NO_CAP) == \
        CUDA_ERROR_INVALID_VALUE
    assert emu.emu_nhwc_backward(dims, 0, 0, int(down), null, null, null, null, null, null, 0, 1, 1, NO_CAP) == \
        CUDA_ERROR_INVALID_VALUE
