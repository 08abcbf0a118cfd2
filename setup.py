"""Decides which native extensions to build; all metadata lives in pyproject.toml.

The extension is compiled against the torch installed in the environment that runs this file, so the
build must see that torch: `pip install --no-build-isolation .` (pip's default isolated build has no
torch; this file then stops at once and prints the command to use).

Switches (environment variables):
  CARAFE_NO_NATIVE=1    build no native code (the package then runs on the reference/Triton backends)
  CARAFE_FORCE_CUDA=1   fail unless the CUDA kernels can be built; without it they are built whenever
                        torch is a CUDA build and a CUDA toolkit (nvcc and its headers) is found; no GPU
                        is needed (a cluster's login node builds them too)
  CUDA_HOME             the CUDA toolkit; by default torch's guess from the nvcc on PATH, or the `cuda`
                        folder beside it when that prefix has no CUDA headers
  TORCH_CUDA_ARCH_LIST  the GPU architectures; defaults to "8.0;8.6;8.9;9.0+PTX" when no GPU is visible
  CARAFE_DEBUG=1        -O0 -g instead of -O3
  MAX_JOBS              parallel compile jobs (torch's own switch)
  NVCC_THREADS          architectures nvcc compiles in parallel in one call (default 4)

No network access happens here: everything comes from the installed torch and toolkit.
"""
import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "8.0;8.6;8.9;9.0+PTX"
# The torch that scripts/setup_env.sh installs and CI tests (the README states the tested range).
TESTED_TORCH = "2.13.0"
# setup.py commands that compile; the others (egg_info, dist_info, sdist: metadata and source archives,
# which pip also runs in its isolated build before building the wheel) need no torch.
BUILD_COMMANDS = {"build", "build_ext", "bdist_wheel", "develop", "editable_wheel", "install"}


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _say(message):
    print(f"carafe-kernels: {message}", file=sys.stderr)


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def no_torch_message():
    return (
        "torch is not importable in this build environment, and the C++ extension must be compiled "
        "against the torch you will run it with. pip's default (isolated) build environment has no torch "
        "on purpose: it would download a different torch than yours and build an extension that does not "
        "load. Install torch first, then build without isolation:\n\n"
        f"    pip install torch=={TESTED_TORCH} && pip install --no-build-isolation .\n\n"
        f"(tested with torch {TESTED_TORCH} and 2.14.1; pyproject.toml accepts torch >= 2.6; add -e or extras such "
        "as \".[cares]\" as needed), "
        "or set CARAFE_NO_NATIVE=1 to install without native kernels (reference/Triton backends only).")


def _has_cuda_headers(prefix):
    return bool(prefix) and os.path.isfile(os.path.join(prefix, "include", "cuda_runtime.h"))


def resolve_cuda_home(env=os.environ, which=shutil.which):
    """The CUDA toolkit to build with, and a sentence saying how it was found.

    torch guesses CUDA_HOME as CUDA_HOME/CUDA_PATH, else the prefix of the nvcc on PATH. Where nvcc is a
    launcher in /usr/local/bin, that prefix (/usr/local) has no CUDA headers and the CUDA build would
    fail deep in the compiler; the toolkit is then the `cuda` folder beside it, which this looks for.
    Returns (None, why) when there is no usable toolkit.
    """
    explicit = env.get("CUDA_HOME") or env.get("CUDA_PATH")
    nvcc = which("nvcc")
    guess = explicit or (os.path.dirname(os.path.dirname(nvcc)) if nvcc else None)
    if guess is None:
        if _has_cuda_headers("/usr/local/cuda"):
            return "/usr/local/cuda", "no CUDA_HOME and no nvcc on PATH; using /usr/local/cuda"
        return None, "no CUDA toolkit: CUDA_HOME is not set and no nvcc is on PATH"
    source = "CUDA_HOME" if explicit else f"the prefix of {nvcc}"
    if _has_cuda_headers(guess):
        return guess, f"CUDA_HOME={guess} ({source})"
    beside = os.path.join(guess, "cuda")
    if _has_cuda_headers(beside):
        return beside, (f"{guess} ({source}) has no include/cuda_runtime.h; using the toolkit beside it, "
                        f"{beside}")
    return None, (f"{guess} ({source}) has no include/cuda_runtime.h, nor has {beside}: set CUDA_HOME to "
                  "the CUDA toolkit")


def native_extensions():
    if _flag("CARAFE_NO_NATIVE"):
        _say("CARAFE_NO_NATIVE=1, building no native code")
        return [], {}
    try:
        import torch
    except ImportError:
        if not BUILD_COMMANDS.intersection(sys.argv[1:]):
            return [], {}
        sys.exit("carafe-kernels: " + no_torch_message())

    cuda_home, cuda_why = (None, "torch is a CPU-only build") if torch.version.cuda is None else resolve_cuda_home()
    if cuda_home is not None:
        # torch.utils.cpp_extension reads CUDA_HOME once, when first imported (below).
        os.environ["CUDA_HOME"] = cuda_home
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    build_cuda = cuda_home is not None and os.path.exists(os.path.join(cuda_home, "bin", "nvcc"))
    if cuda_home is not None and not build_cuda:
        cuda_why += f", but {cuda_home}/bin/nvcc does not exist"
    if _flag("CARAFE_FORCE_CUDA") and not build_cuda:
        raise RuntimeError(f"CARAFE_FORCE_CUDA=1 but the CUDA kernels cannot be built: {cuda_why} "
                           f"(torch {torch.__version__}, torch.version.cuda={torch.version.cuda!r}).")
    if build_cuda and not torch.cuda.is_available():
        # A build machine without a GPU: compile for the common architectures unless told which.
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)

    debug = _flag("CARAFE_DEBUG")
    opt = ["-O0", "-g"] if debug else ["-O3"]
    # No -std: torch's BuildExtension adds the C++ standard its own headers need (-std=c++20 for both
    # host and nvcc in torch 2.13 and 2.14); a hard-coded one breaks the build against another torch
    # (torch 2.14's ATen refuses the -std=c++17 this file used to force).
    cxx_flags = opt + ["-fopenmp"]
    sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    include_dirs = [os.path.join(ROOT, "csrc")]

    _say(f"building against torch {torch.__version__} (torch.version.cuda={torch.version.cuda}), "
         f"{'debug' if debug else 'optimised'}:")
    _say("  CPU kernels: yes (always built)")
    if build_cuda:
        arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
        _say(f"  CUDA kernels: yes; toolkit: {cuda_why}; architectures: "
             f"{arch or 'those of the visible GPUs'}"
             f"{'' if torch.cuda.is_available() else ' (no GPU visible: built for later use)'}")
        sources += _sources("csrc/cuda/*.cpp") + _sources("csrc/cuda/*.cu")
        # --threads: compile the arch list in parallel inside one nvcc call.
        nvcc_flags = opt + ["--expt-relaxed-constexpr", "-lineinfo", "--threads", os.environ.get("NVCC_THREADS", "4")]
        ext = CUDAExtension("carafe_kernels._C", sources, include_dirs=include_dirs,
                            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags}, extra_link_args=["-fopenmp"])
    else:
        _say(f"  CUDA kernels: no ({cuda_why})")
        ext = CppExtension("carafe_kernels._C", sources, include_dirs=include_dirs,
                           extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)}


if __name__ == "__main__":
    ext_modules, cmdclass = native_extensions()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
