"""Decides which native extensions to build; all metadata lives in pyproject.toml.

The extensions are built on PyTorch's stable ABI (docs/design.md#the-build): they call torch only
through its stable C shim, targeted at the release in carafe_kernels/_abi.py (-DTORCH_TARGET_VERSION),
and Python only through the limited API (an abi3 wheel). So any torch at or above the target can build
them, and the result runs on every torch at or above the target and every Python >= 3.10:
  - `pip install .` builds in an isolated environment with the torch of [build-system] requires;
  - `pip install --no-build-isolation .` builds against the torch already installed (no download).
Two libraries:
  carafe_kernels._C       the op schemas, the CPU kernels, build info; loads beside any torch >= target
  carafe_kernels._C_cuda  the CUDA glue and kernels; needs torch's CUDA libraries and the CUDA runtime of
                          the same major version, so it is loaded only where torch has CUDA

Switches (environment variables):
  CARAFE_NO_NATIVE=1    build no native code (the package then runs on the reference/Triton backends)
  CARAFE_NO_CUDA=1      build the CPU library only (the quick build; see the README's install section)
  CARAFE_FORCE_CUDA=1   fail unless the CUDA kernels can be built; without it they are built whenever
                        torch is a CUDA build and a CUDA toolkit (nvcc and its headers) of torch's CUDA
                        major version is found; no GPU is needed (a cluster's login node builds them too)
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
import runpy
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "8.0;8.6;8.9;9.0+PTX"
# setup.py commands that compile; the others (egg_info, dist_info, sdist: metadata and source archives)
# need no torch.
BUILD_COMMANDS = {"build", "build_ext", "bdist_wheel", "develop", "editable_wheel", "install"}
# The stable-ABI target (read without importing carafe_kernels, which would import torch and load _C).
_ABI = runpy.run_path(os.path.join(ROOT, "carafe_kernels", "_abi.py"))
STABLE_ABI_TARGET = _ABI["STABLE_ABI_TARGET"]
# The oldest Python the abi3 wheel serves (pyproject.toml's requires-python): the wheel's tag.
ABI3_TAG = "cp310"


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _say(message):
    print(f"carafe-kernels: {message}", file=sys.stderr)


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _release(version):
    return tuple(int(x) for x in version.split("+")[0].split(".")[:2])


def no_torch_message():
    major, minor = STABLE_ABI_TARGET
    return (
        f"torch is not importable in this build environment. The C++ extension is compiled against torch >= "
        f"{major}.{minor} (any such torch: the result runs on all of them). Either build in pip's isolated "
        "environment, which installs the torch of pyproject.toml's [build-system] requires (plain "
        "`pip install .`), or install torch here first and build against it: "
        "`pip install --no-build-isolation .`; "
        "or set CARAFE_NO_NATIVE=1 to install without native kernels (reference/Triton backends only).")


def old_torch_message(version):
    major, minor = STABLE_ABI_TARGET
    return (f"torch {version} is older than {major}.{minor}, the oldest release whose stable ABI the C++ "
            f"extension is written for (carafe_kernels/_abi.py); build with torch >= {major}.{minor} (plain "
            "`pip install .` does), or set CARAFE_NO_NATIVE=1 to install without native kernels.")


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
    if _release(torch.__version__) < STABLE_ABI_TARGET:
        if not BUILD_COMMANDS.intersection(sys.argv[1:]):
            return [], {}
        sys.exit("carafe-kernels: " + old_torch_message(torch.__version__))

    if torch.version.cuda is None:
        cuda_home, cuda_why = None, "torch is a CPU-only build"
    elif _flag("CARAFE_NO_CUDA"):
        cuda_home, cuda_why = None, "CARAFE_NO_CUDA=1"
    else:
        cuda_home, cuda_why = resolve_cuda_home()
    if cuda_home is not None:
        # torch.utils.cpp_extension reads CUDA_HOME once, when first imported (below).
        os.environ["CUDA_HOME"] = cuda_home
    from torch.utils.cpp_extension import BuildExtension, CppExtension, include_paths, library_paths

    build_cuda = cuda_home is not None and os.path.exists(os.path.join(cuda_home, "bin", "nvcc"))
    if cuda_home is not None and not build_cuda:
        cuda_why += f", but {cuda_home}/bin/nvcc does not exist"
    if build_cuda:
        # The CUDA library links the toolkit's runtime (libcudart.so.MAJOR) and runs beside torch's, so
        # the two CUDA major versions must agree (torch's own build check refuses them otherwise).
        toolkit = _toolkit_version(cuda_home)
        if toolkit is not None and toolkit.split(".")[0] != torch.version.cuda.split(".")[0]:
            build_cuda = False
            cuda_why += (f", but its CUDA {toolkit} is not torch's CUDA major version "
                         f"({torch.version.cuda})")
    if _flag("CARAFE_FORCE_CUDA") and not build_cuda:
        raise RuntimeError(f"CARAFE_FORCE_CUDA=1 but the CUDA kernels cannot be built: {cuda_why} "
                           f"(torch {torch.__version__}, torch.version.cuda={torch.version.cuda!r}).")
    if build_cuda and not torch.cuda.is_available():
        # A build machine without a GPU: compile for the common architectures unless told which.
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)

    debug = _flag("CARAFE_DEBUG")
    opt = ["-O0", "-g"] if debug else ["-O3"]
    # TORCH_TARGET_VERSION: the headers then offer only the stable API of that release (a newer call is
    # a compile error) and refuse ATen/c10 headers outright. BuildExtension adds -DPy_LIMITED_API for
    # py_limited_api=True (torch's minimum Python, 3.10 in torch 2.10 to 2.14: this package's too).
    # No -std: BuildExtension adds the C++ standard the installed torch's headers need.
    stable = [f"-DTORCH_TARGET_VERSION={_ABI['target_version_macro']()}"]
    cxx_flags = opt + stable
    include_dirs = [os.path.join(ROOT, "csrc")]
    # Only libtorch_cpu (the stable C shim lives there); no libtorch_python: the Python side is the
    # limited API. c10 and libtorch come from CppExtension; they are in every torch build.
    cpu_ext = CppExtension("carafe_kernels._C", _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp"),
                           include_dirs=include_dirs, extra_compile_args={"cxx": cxx_flags}, py_limited_api=True)
    exts = [cpu_ext]

    major, minor = STABLE_ABI_TARGET
    _say(f"building on torch {torch.__version__} (torch.version.cuda={torch.version.cuda}) for the stable ABI "
         f"of torch >= {major}.{minor}, abi3 (Python >= 3.10), {'debug' if debug else 'optimised'}:")
    _say("  CPU kernels (carafe_kernels._C): yes (always built)")
    if build_cuda:
        arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
        _say(f"  CUDA kernels (carafe_kernels._C_cuda): yes; toolkit: {cuda_why}; architectures: "
             f"{arch or 'those of the visible GPUs'}"
             f"{'' if torch.cuda.is_available() else ' (no GPU visible: built for later use)'}")
        # --threads: compile the arch list in parallel inside one nvcc call. USE_CUDA declares the CUDA
        # part of the stable C shim (aoti_torch_get_current_cuda_stream).
        nvcc_flags = opt + stable + ["--expt-relaxed-constexpr", "-lineinfo", "--threads",
                                     os.environ.get("NVCC_THREADS", "4")]
        # Not torch's CUDAExtension: it links libc10_cuda/libtorch_cuda for the ATen CUDA API; this library
        # needs only the shim's CUDA functions (libtorch_cuda) and the CUDA runtime.
        cuda_ext = CppExtension(
            "carafe_kernels._C_cuda", _sources("csrc/cuda/*.cpp") + _sources("csrc/cuda/*.cu"),
            include_dirs=include_dirs + include_paths(device_type="cuda"),
            library_dirs=library_paths(device_type="cuda"), libraries=["torch_cuda", "cudart"],
            define_macros=[("USE_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags}, py_limited_api=True)
        exts.append(cuda_ext)
    else:
        _say(f"  CUDA kernels: no ({cuda_why})")
    return exts, {"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)}


def _toolkit_version(cuda_home):
    """"MAJOR.MINOR" of the toolkit at cuda_home (from its cuda.h), or None."""
    import re

    try:
        with open(os.path.join(cuda_home, "include", "cuda.h")) as f:
            m = re.search(r"#define CUDA_VERSION (\d+)", f.read())
    except OSError:
        return None
    return f"{int(m.group(1)) // 1000}.{int(m.group(1)) % 1000 // 10}" if m else None


if __name__ == "__main__":
    ext_modules, cmdclass = native_extensions()
    # py_limited_api: the wheel is tagged abi3 (cp310-abi3), one file for every Python >= 3.10.
    options = {"bdist_wheel": {"py_limited_api": ABI3_TAG}} if ext_modules else {}
    setup(ext_modules=ext_modules, cmdclass=cmdclass, options=options)
