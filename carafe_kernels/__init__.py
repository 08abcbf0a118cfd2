"""carafe_kernels: fast, tested CARAFE upsampling for PyTorch (a drop-in for mmcv's ``carafe``), and
content-aware downsampling (CARAFE++: carafe_down, CARAFEDownPack).

    from carafe_kernels import CARAFE, CARAFEPack, carafe, carafe_fused, backend_status
"""
from . import ops as _ops  # noqa: F401  (registers fake/autograd/autocast for the C++ ops)
from .functional import carafe, carafe_down, carafe_down_fused, carafe_fused, carafe_naive
from .modules import CARAFE, CARAFEDownPack, CARAFENaive, CARAFEPack
from .ops import carafe_down_flops, carafe_flops
from .registry import BackendUnavailableError, backend_status

__version__ = "0.1.0"
__all__ = ["carafe", "carafe_fused", "carafe_naive", "carafe_down", "carafe_down_fused", "CARAFE", "CARAFENaive",
           "CARAFEPack", "CARAFEDownPack", "backend_status", "carafe_flops", "carafe_down_flops",
           "BackendUnavailableError", "__version__"]


def __getattr__(name: str):
    # carafe_kernels.onnx, as the README writes it, without an import of its own: loaded on first use
    # (PEP 562), so `import carafe_kernels` stays as light as before. The submodule needs only torch.
    if name == "onnx":
        import importlib
        return importlib.import_module(".onnx", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
