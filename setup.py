"""Decides which native extensions to build; all metadata lives in pyproject.toml.

Switches (environment variables):
  CARAFE_NO_NATIVE=1    build no native code (the package then runs on the reference/Triton backends)
  CARAFE_FORCE_CUDA=1   build the CUDA kernels even when torch reports no GPU (needs a CUDA build of
                        torch and a toolkit); without it CUDA is built when torch has CUDA and nvcc is found
  TORCH_CUDA_ARCH_LIST  the GPU architectures; defaults to "8.0;8.6;8.9;9.0+PTX" when no GPU is visible
  CARAFE_DEBUG=1        -O0 -g instead of -O3
  MAX_JOBS              parallel compile jobs (torch's own switch)
  NVCC_THREADS          architectures nvcc compiles in parallel in one call (default 4)

No network access happens here: everything comes from the installed torch and toolkit.
"""
import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "8.0;8.6;8.9;9.0+PTX"


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def native_extensions():
    if _flag("CARAFE_NO_NATIVE"):
        print("carafe-kernels: CARAFE_NO_NATIVE=1, building no native code", file=sys.stderr)
        return [], {}

    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    debug = _flag("CARAFE_DEBUG")
    opt = ["-O0", "-g"] if debug else ["-O3"]
    cxx_flags = opt + ["-std=c++17", "-fopenmp", "-DCARAFE_HAS_CPU=1"]
    sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")

    has_toolkit = CUDA_HOME is not None and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))
    torch_has_cuda = torch.version.cuda is not None
    force_cuda = _flag("CARAFE_FORCE_CUDA")
    build_cuda = (torch_has_cuda and has_toolkit and (torch.cuda.is_available() or force_cuda
                                                       or os.environ.get("TORCH_CUDA_ARCH_LIST")))
    if force_cuda and not build_cuda:
        raise RuntimeError(
            "CARAFE_FORCE_CUDA=1 but the CUDA extension cannot be built: "
            f"torch.version.cuda={torch.version.cuda!r}, CUDA_HOME={CUDA_HOME!r}. "
            "Install a CUDA build of torch and a CUDA toolkit.")
    # A CUDA torch with a toolkit but no visible GPU (a build machine): build for the default archs.
    if torch_has_cuda and has_toolkit and not torch.cuda.is_available():
        build_cuda = True
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)

    config = {
        "torch": torch.__version__,
        "torch.version.cuda": torch.version.cuda,
        "CUDA_HOME": CUDA_HOME,
        "build_cpu": True,
        "build_cuda": bool(build_cuda),
        "TORCH_CUDA_ARCH_LIST": os.environ.get("TORCH_CUDA_ARCH_LIST") if build_cuda else None,
        "debug": debug,
    }
    print("carafe-kernels build configuration: " + ", ".join(f"{k}={v}" for k, v in config.items()),
          file=sys.stderr)

    include_dirs = [os.path.join(ROOT, "csrc")]
    if build_cuda:
        sources += _sources("csrc/cuda/*.cpp") + _sources("csrc/cuda/*.cu")
        # --threads: compile the arch list in parallel inside one nvcc call.
        nvcc_flags = opt + ["-std=c++17", "--expt-relaxed-constexpr", "-lineinfo",
                            "--threads", os.environ.get("NVCC_THREADS", "4"),
                            "-DCARAFE_HAS_CUDA=1"]
        ext = CUDAExtension(
            "carafe_kernels._C", sources, include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags + ["-DCARAFE_HAS_CUDA=1"], "nvcc": nvcc_flags},
            extra_link_args=["-fopenmp"])
    else:
        ext = CppExtension(
            "carafe_kernels._C", sources, include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)}


ext_modules, cmdclass = native_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
