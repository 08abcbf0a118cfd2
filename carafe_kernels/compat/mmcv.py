"""An opt-in stand-in for mmcv's CARAFE API, for third-party code that imports it from mmcv.

Upsamplers such as FreqFusion, FADE, SIERRA or DLU do ``from mmcv.ops.carafe import carafe,
normal_init, xavier_init`` and need nothing else from mmcv. Installing mmcv for that means a CUDA
build matched to your torch; instead::

    import carafe_kernels.compat.mmcv
    carafe_kernels.compat.mmcv.install()   # before importing the third-party module
    from freqfusion import FreqFusion      # its mmcv imports now resolve to carafe_kernels

``install()`` registers the modules ``mmcv``, ``mmcv.ops``, ``mmcv.ops.carafe`` and ``mmcv.cnn`` in
``sys.modules`` with mmcv's names: ``carafe``, ``carafe_naive``, ``CARAFE``, ``CARAFENaive``,
``CARAFEPack`` (same signatures and semantics as mmcv's) and the weight initialisers ``normal_init``,
``xavier_init``, ``constant_init``, ``kaiming_init`` (mmengine's semantics). Nothing else of mmcv
exists there. It never runs by itself (importing this module changes nothing), and it refuses when the
real mmcv is importable: shadowing an installed library would silently change other code.
"""
from __future__ import annotations

import importlib.util
import sys
import types

from torch import nn

from ..functional import carafe, carafe_naive
from ..modules import CARAFE, CARAFENaive, CARAFEPack

__all__ = ["install", "uninstall", "is_installed", "normal_init", "xavier_init", "constant_init",
           "kaiming_init"]

# Marks the modules this shim created, so install() is idempotent and uninstall() removes only them.
_MARKER = "__carafe_kernels_shim__"
_MODULES = ("mmcv", "mmcv.ops", "mmcv.ops.carafe", "mmcv.cnn")


def constant_init(module: nn.Module, val: float, bias: float = 0) -> None:
    """mmengine's ``constant_init``: weight = val, bias = bias (where the module has them)."""
    if getattr(module, "weight", None) is not None:
        nn.init.constant_(module.weight, val)
    if getattr(module, "bias", None) is not None:
        nn.init.constant_(module.bias, bias)


def normal_init(module: nn.Module, mean: float = 0, std: float = 1, bias: float = 0) -> None:
    """mmengine's ``normal_init``: weight ~ N(mean, std^2), bias = bias."""
    if getattr(module, "weight", None) is not None:
        nn.init.normal_(module.weight, mean, std)
    if getattr(module, "bias", None) is not None:
        nn.init.constant_(module.bias, bias)


def _check_distribution(distribution: str) -> None:
    if distribution not in ("uniform", "normal"):
        raise ValueError(f"distribution must be 'uniform' or 'normal', got {distribution!r}")


def xavier_init(module: nn.Module, gain: float = 1, bias: float = 0, distribution: str = "normal") -> None:
    """mmengine's ``xavier_init``: Xavier-normal (or -uniform) weight with ``gain``, bias = bias."""
    _check_distribution(distribution)
    if getattr(module, "weight", None) is not None:
        init = nn.init.xavier_uniform_ if distribution == "uniform" else nn.init.xavier_normal_
        init(module.weight, gain=gain)
    if getattr(module, "bias", None) is not None:
        nn.init.constant_(module.bias, bias)


def kaiming_init(module: nn.Module, a: float = 0, mode: str = "fan_out", nonlinearity: str = "relu",
                 bias: float = 0, distribution: str = "normal") -> None:
    """mmengine's ``kaiming_init``: Kaiming-normal (or -uniform) weight, bias = bias."""
    _check_distribution(distribution)
    if getattr(module, "weight", None) is not None:
        init = nn.init.kaiming_uniform_ if distribution == "uniform" else nn.init.kaiming_normal_
        init(module.weight, a=a, mode=mode, nonlinearity=nonlinearity)
    if getattr(module, "bias", None) is not None:
        nn.init.constant_(module.bias, bias)


_CARAFE_API = {"carafe": carafe, "carafe_naive": carafe_naive, "CARAFE": CARAFE, "CARAFENaive": CARAFENaive,
               "CARAFEPack": CARAFEPack}
_INIT_API = {"normal_init": normal_init, "xavier_init": xavier_init, "constant_init": constant_init,
             "kaiming_init": kaiming_init}
# What each module holds: mmcv.ops.carafe as in mmcv (which imports the initialisers there too),
# mmcv.ops re-exports the CARAFE names, mmcv.cnn the initialisers.
_CONTENTS = {"mmcv": {}, "mmcv.ops": _CARAFE_API, "mmcv.ops.carafe": {**_CARAFE_API, **_INIT_API},
             "mmcv.cnn": _INIT_API}


def is_installed() -> bool:
    """Whether ``mmcv`` in sys.modules is this shim."""
    return getattr(sys.modules.get("mmcv"), _MARKER, False)


def _real_mmcv_present() -> bool:
    if "mmcv" in sys.modules:
        return True
    return importlib.util.find_spec("mmcv") is not None


def install() -> None:
    """Makes ``import mmcv.ops.carafe`` (and ``mmcv.ops``, ``mmcv.cnn``) resolve to carafe_kernels.

    Idempotent. Raises RuntimeError when the real mmcv is importable (use it, or uninstall it)."""
    if is_installed():
        return
    if _real_mmcv_present():
        where = getattr(sys.modules.get("mmcv"), "__file__", None) or importlib.util.find_spec("mmcv").origin
        raise RuntimeError(
            f"carafe_kernels.compat.mmcv.install(): the real mmcv is importable ({where}); refusing to "
            "shadow it. Either use it, or import carafe/CARAFE/CARAFEPack from carafe_kernels directly.")
    created = {}
    for name in _MODULES:
        module = types.ModuleType(name, f"carafe_kernels stand-in for {name} (carafe_kernels.compat.mmcv)")
        module.__path__ = []  # a package, so that its submodules import
        setattr(module, _MARKER, True)
        for attr, value in _CONTENTS[name].items():
            setattr(module, attr, value)
        created[name] = module
    for name, module in created.items():
        parent, _, child = name.rpartition(".")
        # As in mmcv, `mmcv.ops.carafe` the attribute is the function (mmcv/ops/__init__.py imports it
        # over the submodule's name); `import mmcv.ops.carafe` still finds the module in sys.modules.
        if parent and not hasattr(created[parent], child):
            setattr(created[parent], child, module)
        sys.modules[name] = module


def uninstall() -> None:
    """Removes the stand-in modules (only those install() created)."""
    for name in _MODULES:
        if getattr(sys.modules.get(name), _MARKER, False):
            del sys.modules[name]
