"""Installing and loading: pip's isolated build gets a torch at or above the stable-ABI target, a build
without any torch stops at once naming the commands, the CUDA toolkit is found beside nvcc's prefix, the
extension runs on every torch from the target up and a torch below it gets a clear reason, and the
`cares` entry point names its extra when numpy is missing."""
import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap
import time
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_setup_module():
    spec = importlib.util.spec_from_file_location("carafe_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # setup() runs only as __main__
    return module


def _python(code: str, *, cwd=ROOT, env_extra=None, timeout=300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **(env_extra or {}))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


# --- pip install . (isolated) ---------------------------------------------------------------------------

def test_isolated_build_environment_gets_a_torch_at_the_target():
    # The extension is on the stable ABI: any torch >= the target compiles the same binary, which runs on
    # all of them, so pip's isolated build may install one (plain `pip install .` compiles the kernels).
    from carafe_kernels._abi import STABLE_ABI_TARGET

    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    torch_requires = [r.replace(" ", "") for r in requires if r.replace(" ", "").lower().startswith("torch")]
    assert torch_requires == ["torch>={}.{}".format(*STABLE_ABI_TARGET)], requires


# setup.py run as pip's isolated build runs it, with torch not importable (None in sys.modules).
NO_TORCH_SETUP = """
    import sys
    sys.modules["torch"] = None
    sys.argv = ["setup.py", *{argv!r}]
    exec(compile(open("setup.py").read(), "setup.py", "exec"), {{"__name__": "__main__", "__file__": "setup.py"}})
"""


def test_build_without_torch_stops_at_once_naming_the_command(tmp_path):
    start = time.monotonic()
    done = _python(NO_TORCH_SETUP.format(argv=["bdist_wheel", "--dist-dir", str(tmp_path)]))
    elapsed = time.monotonic() - start
    assert done.returncode != 0
    assert "`pip install .`" in done.stderr and "pip install --no-build-isolation ." in done.stderr, done.stderr
    assert elapsed < 30, f"took {elapsed:.0f} s"
    assert not list(tmp_path.iterdir())


def test_metadata_without_torch_still_works(tmp_path):
    # pip asks for metadata (egg_info / dist_info) before building: that step must not need torch.
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv*", "build", "runs", "*.so", "__pycache__",
                                                               "*.egg-info", "results", "benchmarks"))
    done = _python(NO_TORCH_SETUP.format(argv=["egg_info"]), cwd=source)
    assert done.returncode == 0, done.stderr
    assert (source / "carafe_kernels.egg-info" / "PKG-INFO").is_file()


# --- CUDA toolkit discovery ------------------------------------------------------------------------------

def _toolkit(folder: Path, headers: bool = True) -> Path:
    (folder / "bin").mkdir(parents=True)
    (folder / "bin" / "nvcc").write_text("")
    if headers:
        (folder / "include").mkdir()
        (folder / "include" / "cuda_runtime.h").write_text("")
    return folder


def test_cuda_home_without_headers_finds_the_toolkit_beside_it(tmp_path):
    setup = _load_setup_module()
    prefix = _toolkit(tmp_path / "local", headers=False)    # like /usr/local with a bin/nvcc launcher
    toolkit = _toolkit(prefix / "cuda")                      # /usr/local/cuda
    home, why = setup.resolve_cuda_home({}, which=lambda _: str(prefix / "bin" / "nvcc"))
    assert home == str(toolkit)
    assert "has no include/cuda_runtime.h" in why and str(toolkit) in why


def test_cuda_home_with_headers_is_used_as_is(tmp_path):
    setup = _load_setup_module()
    toolkit = _toolkit(tmp_path / "cuda-13.0")
    assert setup.resolve_cuda_home({"CUDA_HOME": str(toolkit)}, which=lambda _: None)[0] == str(toolkit)


def test_cuda_home_without_any_headers_says_so(tmp_path):
    setup = _load_setup_module()
    prefix = _toolkit(tmp_path / "local", headers=False)
    home, why = setup.resolve_cuda_home({"CUDA_HOME": str(prefix)}, which=lambda _: None)
    assert home is None and "set CUDA_HOME" in why


def test_build_with_a_torch_below_the_target_stops_naming_it(tmp_path):
    old_torch = 'import types; sys.modules["torch"] = types.SimpleNamespace(__version__="2.9.1+cpu")'
    done = _python(NO_TORCH_SETUP.replace('sys.modules["torch"] = None', old_torch).format(
        argv=["bdist_wheel", "--dist-dir", str(tmp_path)]))
    assert done.returncode != 0
    assert "torch 2.9.1+cpu is older than 2.10" in done.stderr, done.stderr
    assert not list(tmp_path.iterdir())


def test_toolkit_version_is_read_from_cuda_h(tmp_path):
    # setup.py skips the CUDA library when the toolkit's CUDA major differs from torch's: the library
    # links the toolkit's libcudart.so.MAJOR and runs beside torch's.
    setup = _load_setup_module()
    toolkit = _toolkit(tmp_path / "cuda-12.8")
    (toolkit / "include" / "cuda.h").write_text("#define CUDA_VERSION 12080\n")
    assert setup._toolkit_version(str(toolkit)) == "12.8"
    assert setup._toolkit_version(str(tmp_path / "missing")) is None


# --- one build for every torch from the stable-ABI target up ---------------------------------------------

def test_abi_target_rule():
    from carafe_kernels._native import below_abi_target
    for running in ("2.10.0", "2.13.0+cpu", "2.14.1+cu130", "2.15.0", "3.0.0"):
        assert below_abi_target(running, (2, 10)) is None, running
    reason = below_abi_target("2.9.1+cu128", (2, 10))
    assert "torch 2.9.1+cu128 is older than 2.10" in reason and "upgrade torch" in reason
    assert below_abi_target("2.12.1", (2, 13)) is not None


def _native_reason(prelude: str) -> subprocess.CompletedProcess:
    return _python(prelude + textwrap.dedent("""
        import warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import carafe_kernels
        status = carafe_kernels.backend_status()
        print("CPU:", status["cpu"])
        print("WARNED:", any("native backends unavailable" in str(w.message) for w in caught))
        print("RUNS:", carafe_kernels.CARAFEPack(4, 2)(torch.randn(1, 4, 3, 3)).shape)
        """))


@pytest.mark.skipif(importlib.util.find_spec("carafe_kernels._C") is None, reason="the extension is not built")
def test_torch_below_the_target_gets_a_reason_and_the_other_backends():
    # The dependency allows torch >= 2.6 (reference and Triton backends); the native ones need the target.
    done = _native_reason("import torch\ntorch.__version__ = '2.9.1+cpu'\n")
    assert done.returncode == 0, done.stderr
    assert "CPU: torch 2.9.1+cpu is older than 2.10" in done.stdout, done.stdout
    assert "WARNED: False" in done.stdout  # a supported install, not a broken one
    assert "RUNS: torch.Size([1, 4, 6, 6])" in done.stdout  # on the reference backend


@pytest.mark.skipif(importlib.util.find_spec("carafe_kernels._C") is None, reason="the extension is not built")
def test_extension_is_not_tied_to_the_torch_that_built_it():
    # The pre-port extension refused any torch other than the one it was built against.
    done = _native_reason("import torch\ntorch.__version__ = '9.9.0+cpu'\n")
    assert done.returncode == 0, done.stderr
    assert "CPU: None" in done.stdout, done.stdout


def test_extension_that_does_not_load_is_refused_with_a_reason():
    # What an extension built against another torch does at import: an undefined-symbol ImportError.
    done = _native_reason(textwrap.dedent("""
        import importlib.abc, importlib.machinery, sys, torch
        class Broken(importlib.abc.MetaPathFinder, importlib.abc.Loader):
            def find_spec(self, name, path=None, target=None):
                if name == "carafe_kernels._C":
                    return importlib.machinery.ModuleSpec(name, self)
            def create_module(self, spec):
                raise ImportError("_C.so: undefined symbol: _ZN3c104impl3cow11cow_deleterEPv")
            def exec_module(self, module):
                pass
        sys.meta_path.insert(0, Broken())
        """))
    assert done.returncode == 0, done.stderr
    assert "could not be loaded" in done.stdout and "undefined symbol" in done.stdout, done.stdout
    assert "WARNED: True" in done.stdout


# --- the cares entry point without its extra ---------------------------------------------------------------

def test_cares_without_numpy_names_the_extra():
    done = _python("""
        import sys
        sys.modules["numpy"] = None  # as if not installed
        from cares.cli import main
        sys.exit(main(["evaluate", "--help"]))
        """)
    assert done.returncode == 2, done.stderr
    assert 'pip install "carafe-kernels[cares]"' in done.stderr
    assert "Traceback" not in done.stderr
    name = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["name"]
    assert name == "carafe-kernels"
