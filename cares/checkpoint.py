"""Checkpoints, writer and reader in one place: written atomically, read with
`torch.load(weights_only=True)` after the zip's CRCs are checked.

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
    best_val_dice, best_epoch, history   model selection state and the per-epoch log rows
    optimizer, scheduler, scaler, rng_states    what --resume needs (absent in exported weights)
"""
from __future__ import annotations

import random
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cares import runtime
from cares.data.nifti import DEFAULT_WINDOW_LEVEL, DEFAULT_WINDOW_WIDTH

FORMAT = "cares-checkpoint"
VERSION = 1

# How images reach the model (recorded in checkpoints so predict can do the same): 8-bit slices
# are divided by 255; NIfTI volumes are windowed (Hounsfield units) to [0, 1] with cares.data's
# lung window, the one its datasets use.
INTENSITY = "gray / 255 for 2-D images; NIfTI: HU windowed to [0, 1]"
DEFAULT_WINDOW = {"window_width": DEFAULT_WINDOW_WIDTH, "window_level": DEFAULT_WINDOW_LEVEL}


CHECKPOINT_NAMES = ("last.pt", "best.pt")


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------

def model_record(name: str, options: dict[str, Any], model: torch.nn.Module) -> dict[str, Any]:
    return {"name": name, "options": dict(options), "in_channels": 1, "num_classes": 1,
            "state_dict": unwrap_model(model).state_dict()}


def input_record(image_size: int) -> dict[str, Any]:
    return {"image_size": image_size, "intensity": INTENSITY, **DEFAULT_WINDOW}


def weights_state(config, model: torch.nn.Module, epoch: int, best_val_dice: float | None,
                  best_epoch: int | None, history: list[dict[str, Any]]) -> dict[str, Any]:
    """What evaluate/predict need: the model and how to feed it (best.pt, and the head of last.pt).
    `config` is the run's TrainConfig."""
    return {"format": FORMAT, "version": VERSION,
            "model": model_record(config.model, config.model_options, model),
            "input": input_record(config.image_size), "config": config.to_dict(), "epoch": epoch,
            "best_val_dice": best_val_dice, "best_epoch": best_epoch, "history": list(history)}


def full_state(config, model, optimizer, scheduler, scaler, epoch: int, best_val_dice: float | None,
               best_epoch: int | None, history: list[dict[str, Any]], rng_states: list) -> dict[str, Any]:
    """weights_state plus everything --resume needs (last.pt)."""
    state = weights_state(config, model, epoch, best_val_dice, best_epoch, history)
    state.update(optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                 scaler=scaler.state_dict() if scaler is not None else None, rng_states=rng_states)
    return state


def save_checkpoint(path, state: dict[str, Any]) -> Path:
    """torch.save `state` atomically: a run killed while saving keeps its previous checkpoint."""
    return runtime.atomic_write(path, lambda f: torch.save(state, f))


def save_epoch_checkpoints(run_dir, last_state: dict[str, Any], best_state: dict[str, Any] | None) -> None:
    """Write one epoch's checkpoints: best.pt (when the epoch improved) BEFORE last.pt.

    last.pt is the commit point: it records best_epoch and best_val_dice, so when it says epoch e's
    model is the best, best.pt already holds that model. A kill between the two writes leaves best.pt
    one epoch ahead of last.pt (never behind); `reconcile_best` sees that on --resume and keeps it.
    """
    run_dir = Path(run_dir)
    epoch = last_state["epoch"]
    if best_state is not None:
        save_checkpoint(run_dir / "best.pt", best_state)
        runtime.fault_point(f"wrote best.pt epoch {epoch}")
    save_checkpoint(run_dir / "last.pt", last_state)
    runtime.fault_point(f"wrote last.pt epoch {epoch}")


def remove_orphaned_temp_files(run_dir) -> list[Path]:
    """The .last.pt.*.tmp / .best.pt.*.tmp files of a killed save (call while holding the run's lock)."""
    return runtime.remove_orphaned_temp_files(run_dir, CHECKPOINT_NAMES)


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------

def _verify_zip(path: Path) -> None:
    """torch.save writes a zip whose members carry CRC-32s; torch.load does not check them, so a flipped
    bit in tensor data would load silently. zipfile's testzip reads every member and checks its CRC."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except zipfile.BadZipFile as err:
        raise ValueError(f"cannot read checkpoint {str(path)!r}: not a valid torch.save zip ({err})") from None
    if bad is not None:
        raise ValueError(f"checkpoint {str(path)!r} is corrupt: member {bad!r} fails its CRC check "
                         "(the file was damaged after it was written)")


def load_checkpoint(path, map_location="cpu", *, check_weights: bool = True) -> dict[str, Any]:
    """Load a cares checkpoint safely (weights_only=True) and check that it is one: not empty, every zip
    member's CRC intact, the format and version known, and (check_weights) every model weight finite."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if path.stat().st_size == 0:
        raise ValueError(f"checkpoint {str(path)!r} is empty (0 bytes): it was truncated or never written")
    _verify_zip(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # a torn or foreign file: say which file and why
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"cannot read checkpoint {str(path)!r}: {reason}") from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r} is not a cares checkpoint (no format={FORMAT!r} entry)")
    if state.get("version", 0) > VERSION:
        raise ValueError(f"checkpoint {str(path)!r} has version {state['version']}; this cares reads "
                         f"up to version {VERSION}")
    check_records(state, path)
    if check_weights:
        check_finite_weights(state, path)
    return state


def check_records(state: dict[str, Any], path) -> None:
    """The "model" and "input" records every command relies on are present and well-formed."""
    model = state.get("model")
    if not isinstance(model, dict) or not {"name", "options", "in_channels", "num_classes",
                                           "state_dict"} <= set(model):
        raise ValueError(f"checkpoint {str(path)!r} has no complete 'model' record (name, options, "
                         "in_channels, num_classes, state_dict)")
    if not isinstance(model["options"], dict) or not isinstance(model["state_dict"], dict):
        raise ValueError(f"checkpoint {str(path)!r}: its model record's options/state_dict are not mappings")
    inputs = state.get("input")
    if not isinstance(inputs, dict) or not {"image_size", "window_width", "window_level"} <= set(inputs):
        raise ValueError(f"checkpoint {str(path)!r} has no 'input' record (image_size, window_width, "
                         "window_level): it was not written by `cares train`")
    size = inputs["image_size"]
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"checkpoint {str(path)!r}: input image_size must be a positive int, got {size!r}")


def check_finite_weights(state: dict[str, Any], path) -> None:
    """Refuse a model with NaN/inf weights: it would turn every input into an empty mask."""
    for key, tensor in state["model"]["state_dict"].items():
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"checkpoint {str(path)!r}: weight {key!r} holds NaN or infinite values "
                             "(training diverged); use an earlier checkpoint")


def check_same_model(state: dict[str, Any], path, name: str, options: dict[str, Any], what: str) -> None:
    """Raise ValueError unless the checkpoint holds model `name` with `options` (e.g. for --resume)."""
    saved = state["model"]
    if saved["name"] != name or saved["options"] != dict(options):
        raise ValueError(f"{what} {str(path)!r} holds model {saved['name']} {saved['options']}, but the run "
                         f"trains {name} {dict(options)}")


def load_model_weights(model: torch.nn.Module, state: dict[str, Any], path) -> None:
    """model.load_state_dict(the checkpoint's weights), as a one-line ValueError when they do not fit
    (another model, or another width of the same one)."""
    try:
        model.load_state_dict(state["model"]["state_dict"])
    except RuntimeError as err:
        detail = " ".join(str(err).split())
        raise ValueError(f"checkpoint {str(path)!r}: its weights do not fit model {state['model']['name']} "
                         f"{state['model']['options']} ({detail[:300]})") from None


def reconcile_best(run_dir, last_state: dict[str, Any]) -> tuple[float | None, int | None, str | None]:
    """(best_val_dice, best_epoch, note) to resume with, after checking best.pt against last.pt.

    save_epoch_checkpoints writes best.pt first, so after a kill best.pt can be one epoch ahead of
    last.pt: that model was trained and validated, and is better than anything last.pt knows, so it is
    kept as the best, and the redone epoch must beat it to replace it. best.pt can never be behind
    last.pt's best_epoch unless it was changed by hand; that, a missing or unreadable best.pt are
    reported in `note` (best.pt is rewritten at the next improvement). Raises nothing for best.pt
    problems: --resume must not be blocked by a file it does not need.
    """
    best_path = Path(run_dir) / "best.pt"
    best_val, best_epoch = last_state.get("best_val_dice"), last_state.get("best_epoch")
    if best_epoch is None and best_val is not None:  # checkpoints written before best_epoch was recorded
        best_epoch = next((row["epoch"] for row in last_state.get("history", [])
                           if row.get("val_dice") == best_val), None)
    if not best_path.is_file():
        note = None if best_val is None else (f"{best_path} is missing although last.pt records a best "
                                              f"model (epoch {best_epoch}); it is rewritten at the next improvement")
        return best_val, best_epoch, note
    try:
        best = load_checkpoint(best_path)
    except ValueError as err:
        return best_val, best_epoch, f"ignoring {best_path}: {err}; it is rewritten at the next improvement"
    if best.get("epoch", 0) > last_state["epoch"]:
        return (best["best_val_dice"], best["epoch"],
                f"{best_path} is from epoch {best['epoch']}, written just before the run was stopped "
                f"(last.pt has epoch {last_state['epoch']}): kept as the best model (validation Dice "
                f"{best['best_val_dice']:.4f})")
    if best.get("epoch") != best_epoch:
        return best_val, best_epoch, (f"{best_path} holds epoch {best.get('epoch')} but last.pt records the best "
                                      f"at epoch {best_epoch}; it is rewritten at the next improvement")
    return best_val, best_epoch, None


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------

def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DistributedDataParallel (.module) and torch.compile (._orig_mod)."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def build_model_from_checkpoint(state: dict[str, Any], device="cpu", path="checkpoint") -> torch.nn.Module:
    """The trained model, in eval mode, rebuilt from the name and options the checkpoint records."""
    from cares.models import build_model
    spec = state["model"]
    try:
        model = build_model(spec["name"], in_channels=spec["in_channels"], num_classes=spec["num_classes"],
                            **spec["options"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"checkpoint {str(path)!r}: cannot build its model {spec['name']} "
                         f"{spec['options']}: {err}") from None
    load_model_weights(model, state, path)
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
