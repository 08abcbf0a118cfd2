"""Checkpoints: written atomically, read with `torch.load(weights_only=True)`.

weights_only=True refuses to unpickle arbitrary objects, so a checkpoint holds only tensors and
plain containers (dict, list, tuple, str, int, float, bool, None). That is why RNG states are stored
as tensors and the config as a plain dict.

Layout of a checkpoint (a dict):
    format, version          "cares-checkpoint", 1
    model                    {"name", "options", "in_channels", "num_classes", "state_dict"}
    input                    {"image_size", "intensity", "window_width", "window_level"}:
                             what predict/evaluate need to feed the model as training did
    config                   the TrainConfig as a plain dict
    epoch                    number of finished epochs
    best_val_dice, history   model selection state and the per-epoch log rows
    optimizer, scheduler, scaler, rng_states    what --resume needs (absent in exported weights)
"""
from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cares.data.nifti import DEFAULT_WINDOW_LEVEL, DEFAULT_WINDOW_WIDTH

FORMAT = "cares-checkpoint"
VERSION = 1

# How images reach the model (recorded in checkpoints so predict can do the same): 8-bit slices
# are divided by 255; NIfTI volumes are windowed (Hounsfield units) to [0, 1] with cares.data's
# lung window, the one its datasets use.
INTENSITY = "gray / 255 for 2-D images; NIfTI: HU windowed to [0, 1]"
DEFAULT_WINDOW = {"window_width": DEFAULT_WINDOW_WIDTH, "window_level": DEFAULT_WINDOW_LEVEL}


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def _atomic_write(path, write) -> Path:
    """Call write(file) so that readers of `path` see the old file or the new one, never a torn one:
    write a temp file in the same folder (same file system, so the rename is atomic), fsync it,
    os.replace it over the target, then fsync the folder so the rename itself is durable."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # folders cannot be opened for fsync on every platform; the rename has happened anyway
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
    return path


def atomic_write_bytes(path, data: bytes) -> Path:
    """Write bytes atomically (config.yaml, log.csv, JSON summaries)."""
    return _atomic_write(path, lambda f: f.write(data))


def save_checkpoint(path, state: dict[str, Any]) -> Path:
    """torch.save `state` atomically: a run killed while saving keeps its previous checkpoint."""
    return _atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path, map_location="cpu") -> dict[str, Any]:
    """Load a cares checkpoint safely (weights_only=True) and check that it is one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # a torn or foreign file: say which file and why
        raise ValueError(f"cannot read checkpoint {str(path)!r}: {err}") from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r} is not a cares checkpoint (no format={FORMAT!r} entry)")
    if state.get("version", 0) > VERSION:
        raise ValueError(f"checkpoint {str(path)!r} has version {state['version']}; this cares reads "
                         f"up to version {VERSION}")
    return state


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DistributedDataParallel (.module) and torch.compile (._orig_mod)."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def build_model_from_checkpoint(state: dict[str, Any], device="cpu") -> torch.nn.Module:
    """The trained model, in eval mode, rebuilt from the name and options the checkpoint records."""
    from cares.models import build_model
    spec = state["model"]
    model = build_model(spec["name"], in_channels=spec["in_channels"], num_classes=spec["num_classes"],
                        **spec["options"])
    model.load_state_dict(spec["state_dict"])
    return model.to(device).eval()


# --- RNG states as tensors (weights_only-safe) ------------------------------------------------------

def capture_rng_state() -> dict[str, Any]:
    """Every RNG that training draws from: torch (CPU and each CUDA device), numpy, Python."""
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": np_kind, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_gauss)},
        "python": {"version": py_version, "internal": torch.tensor(py_internal, dtype=torch.int64),
                   "gauss_next": py_gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["internal"].tolist()), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
