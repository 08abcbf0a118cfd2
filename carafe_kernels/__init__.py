"""carafe_kernels: fast, tested CARAFE upsampling for PyTorch (a drop-in for mmcv's ``carafe``).

    from carafe_kernels import CARAFE, CARAFEPack, carafe, carafe_fused, backend_status
"""
from . import ops as _ops  # noqa: F401  (registers fake/autograd/autocast for the C++ ops)
from .functional import carafe, carafe_fused, carafe_naive
from .modules import CARAFE, CARAFENaive, CARAFEPack
from .ops import carafe_flops
from .registry import BackendUnavailableError, backend_status

__version__ = "0.1.0"
__all__ = ["carafe", "carafe_fused", "carafe_naive", "CARAFE", "CARAFENaive", "CARAFEPack", "backend_status",
           "carafe_flops", "BackendUnavailableError", "__version__"]
