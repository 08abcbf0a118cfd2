"""`cares train`: supervised (and, with --pseudo, semi-supervised) training of a segmentation model.

One epoch:  set the epoch's data order and augmentation  ->  train steps (AMP, DDP)  ->  validate
            (threshold-0.5 Dice, see `validation_dice`)  ->  step the LR schedule  ->  write
            best.pt (when the validation Dice improved) and then last.pt, log.csv, TensorBoard.

Run folder (--out):
    config.yaml     every setting of the run (the resolved TrainConfig)
    last.pt         everything --resume needs: model, optimizer (incl. Ranger's Lookahead slow
                    weights), LR scheduler, GradScaler, RNG states of every process, epoch, history
    best.pt         the model with the best validation Dice so far (no optimizer state)
    log.csv         one row per epoch: loss, validation Dice, learning rate, time, throughput
    loss_curve.png  training loss and validation Dice per epoch
    folds.json      with --fold all: the best validation Dice of each fold and their mean
    .lock           held (fcntl.lockf) while a run writes here: a second run into the folder is refused
    .cares-owner.json  which of these files cares train created (cares.runtime.claim_output): a new run
                    is refused while any of them is there, and no file it did not create is overwritten

Before anything is written, every setting, the model and its options, the folder and (with --resume)
the checkpoint's fit are checked, so a refused run leaves the folder as it was. See
cares.checkpoint.save_epoch_checkpoints for why best.pt is written first.

Exact resume: checkpoints are written at epoch ends. The data order and augmentation of epoch e
are functions of (seed, e) (see cares.sampling and cares.data's set_epoch), the DataLoader's worker
seeds come from a generator seeded the same way, and every other RNG is restored from last.pt, so a
run killed and resumed ends with the same tensors, bit for bit, as one that was never interrupted
(on the same hardware and software; GPU runs need --deterministic for that).

Distributed: launch with torchrun; each process trains on its share of every epoch's samples
(cares.sampling.EpochSampler plays DistributedSampler's part) and rank 0 writes all files.
--batch-size is per process.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import random
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, Subset
from tqdm import tqdm

from cares.checkpoint import (capture_rng_state, check_same_model, full_state, load_checkpoint, load_model_weights,
                              reconcile_best, remove_orphaned_temp_files, restore_rng_state,
                              save_epoch_checkpoints, unwrap_model, weights_state)
from cares.config import (TrainConfig, add_train_arguments, build_configured_model, check_resume_settings,
                          resolve_config, save_yaml)
from cares.distributed import (DistributedContext, all_gather_objects, all_reduce_sum, barrier,
                               broadcast_object, init_distributed, shutdown)
from cares.inference import predict_probabilities
from cares.runtime import (OutputClaim, RunLock, atomic_write_bytes, autocast_context, check_output_dir, claim_output,
                           derive_seed, resolve_amp, resolve_channels_last)
from cares.sampling import EpochSampler, cache_in_memory, dataset_files, kfold_split, set_dataset_epoch

HELP = ("Train a segmentation model (CARes-UNet by default, with the paper's settings: 256x256, Ranger "
        "lr 5e-4, weight decay 1e-4, batch 4, Dice + BCE). Settings come from flags or --config FILE.yaml "
        "(flags win) and are saved to <out>/config.yaml. Writes last.pt every epoch and best.pt when the "
        "validation Dice (threshold 0.5, training resolution) improves; --resume continues a killed run "
        "exactly. --folds K --fold I|all for cross-validation, --pseudo DIR for semi-supervised training, "
        "torchrun for multi-GPU/multi-node.")

LOG_COLUMNS = ("epoch", "train_loss", "val_dice", "lr", "images", "seconds", "images_per_second")
VALIDATION_THRESHOLD = 0.5


# The progress bar (a terminal only) reads the running loss, which waits for the device, every N steps.
PROGRESS_EVERY = 10


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite (detected at the end of the epoch it happened in)."""


@dataclass
class TrainResult:
    run_dir: Path
    epochs_done: int
    best_val_dice: float | None
    last_checkpoint: Path
    best_checkpoint: Path | None
    history: list[dict[str, Any]]
    stopped_early: bool = False


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------

def add_arguments(parser) -> None:
    add_train_arguments(parser)


def run(args) -> int:
    try:
        config = resolve_config(args)
    except (ValueError, OSError) as err:
        print(f"cares train: error: {err}", file=sys.stderr)
        return 2
    context = init_distributed(config.device)
    finished = False
    try:
        if config.fold == "all":
            train_all_folds(config, context)
        else:
            train(config, context)
        finished = True
    except NonFiniteLossError as err:
        if context.is_main:
            print(f"cares train: error: {err}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as err:
        if context.is_main:
            print(f"cares train: error: {err}", file=sys.stderr)
        return 2
    finally:
        shutdown(context, synchronize=finished)
    return 0


# --------------------------------------------------------------------------------------------------
# Set-up
# --------------------------------------------------------------------------------------------------

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


# derive_seed tags keeping this module's random streams apart from the others'.
_LOADER_SEED_TAG, _RESEED_TAG = 0x4C4F4144, 0x52534544


def build_datasets(config: TrainConfig) -> tuple[torch.utils.data.Dataset, int, int, Any]:
    """(training dataset, number of labelled items, number of pseudo-labelled items, validation
    dataset or None). The training dataset is ConcatDataset([labelled, pseudo]) when --pseudo is set."""
    from cares.data import build_dataset

    def dataset(source, split, augment):
        options = {}
        if source == "synthetic" and split == config.train_split and config.synthetic_samples is not None:
            options["num_samples"] = config.synthetic_samples
        return build_dataset(source, split=split, image_size=config.image_size, augment=augment,
                             seed=config.seed, **options)

    labelled = dataset(config.data, config.train_split, config.augment)
    validation = None
    if config.folds > 1:
        train_indices, val_indices = kfold_split(len(labelled), config.folds, config.fold, config.seed)
        validation = Subset(dataset(config.data, config.train_split, False), val_indices)
        labelled = Subset(labelled, train_indices)
    elif config.val_split is not None:
        validation = dataset(config.data, config.val_split, False)

    num_labelled, num_pseudo = len(labelled), 0
    training: torch.utils.data.Dataset = labelled
    if config.pseudo is not None:
        # The pseudo-label folder holds Imgs/ + GT/ directly; build_dataset reads such a folder
        # when it has no <split> sub-folder.
        pseudo_dir = Path(config.pseudo)
        if pseudo_dir.is_dir() and not any((pseudo_dir / "Imgs").glob("*")):
            # `cares pseudo-label` writes an empty Imgs/ when no prediction passed the entropy filter.
            raise ValueError(f"--pseudo {str(pseudo_dir)!r} holds no pseudo-labelled slices (Imgs/ is empty or "
                             "missing): pseudo-label kept none, see its summary.json; use a better supervised "
                             "model or a higher --entropy-threshold")
        pseudo = dataset(config.pseudo, "train", config.augment)
        num_pseudo = len(pseudo)
        training = ConcatDataset([labelled, pseudo])
    if config.cache_data:
        # Before any DataLoader forks its workers, so they inherit the decoded slices.
        for part in (training, validation):
            if part is not None:
                cache_in_memory(part)
    return training, num_labelled, num_pseudo, validation


def build_model_for(config: TrainConfig) -> torch.nn.Module:
    return build_configured_model(config)


def _load_initial_weights(model: torch.nn.Module, config: TrainConfig) -> None:
    """--init-from: copy a checkpoint's weights into the freshly built model (same model and options)."""
    state = load_checkpoint(config.init_from)
    check_same_model(state, config.init_from, config.model, config.model_options, "--init-from")
    load_model_weights(model, state, config.init_from)


def _amp_scaler(config: TrainConfig, device: torch.device):
    # fp16 has a narrow exponent range: small gradients underflow unless the loss is scaled up.
    # bf16 has float32's range and needs no scaler.
    if config.amp != "fp16":
        return None
    return torch.amp.GradScaler(device.type)


@dataclass
class _Deterministic:
    """Turns deterministic algorithms on for a run and restores the previous settings after."""
    enabled: bool

    def __enter__(self):
        self._previous = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark)
        if self.enabled:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it to be deterministic
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        else:
            torch.backends.cudnn.benchmark = True  # fastest conv algorithms for fixed input sizes
        return self

    def __exit__(self, *exc):
        torch.use_deterministic_algorithms(self._previous[0])
        torch.backends.cudnn.benchmark = self._previous[1]


def _check_deterministic_layers(model: torch.nn.Module, model_name: str, device: torch.device) -> None:
    """--deterministic refuses up front (not at the first backward pass, after files are written) a
    model with a layer torch cannot run deterministically on this device. cares' own models have none:
    they use BilinearUpsample2x and MaxUnpool2x (cares/models/blocks.py)."""
    from cares.models.blocks import nondeterministic_layers
    blocking = nondeterministic_layers(model, device)
    if blocking:
        raise ValueError(f"--deterministic on {device.type}: model {model_name!r} has layers torch cannot run "
                         f"deterministically there: {', '.join(blocking)}; train without --deterministic")


# --------------------------------------------------------------------------------------------------
# Logs
# --------------------------------------------------------------------------------------------------

def _history_row(epoch, train_loss, val_dice, lr, images, seconds) -> dict[str, Any]:
    """One log.csv row; `images` counts the training images of the epoch over all processes."""
    return {"epoch": epoch, "train_loss": train_loss, "val_dice": val_dice, "lr": lr, "images": images,
            "seconds": seconds, "images_per_second": images / seconds}


def write_log_csv(path: Path, history: list[dict[str, Any]]) -> None:
    """Rewrite log.csv from the history (so a resumed run's log has each epoch exactly once)."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=LOG_COLUMNS)
    writer.writeheader()
    for row in history:
        writer.writerow({k: ("" if row[k] is None else row[k]) for k in LOG_COLUMNS})
    atomic_write_bytes(path, text.getvalue().encode())


# Validation slices shown in TensorBoard at each validation: enough to see what the model gets wrong,
# few enough that the event file stays small over hundreds of epochs.
TENSORBOARD_SLICES = 4


def _tensorboard_writer(run_dir: Path, purge_step: int):
    """--tensorboard's writer; purge_step drops events a killed run logged past its last checkpoint, so a
    resumed run's curves have each epoch once (config.validate checked that tensorboard is installed)."""
    from torch.utils.tensorboard import SummaryWriter
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=purge_step)


def _log_predictions(writer, model: torch.nn.Module, dataset, config: TrainConfig, device: torch.device,
                     epoch: int) -> None:
    """The first TENSORBOARD_SLICES validation slices as image | ground truth | predicted probability."""
    shown = Subset(dataset, list(range(min(TENSORBOARD_SLICES, len(dataset)))))
    for index, (item, probability) in enumerate(predict_probabilities(
            unwrap_model(model), shown, image_size=config.image_size, device=device, batch_size=config.batch_size,
            amp=config.amp, channels_last=config.channels_last)):
        panel = torch.cat([item["image"][0].float(), item["mask"][0].float(), torch.from_numpy(probability)], dim=1)
        writer.add_image(f"val/slice_{index}", panel.clamp(0, 1).unsqueeze(0), epoch)


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------

def validation_dice(model: torch.nn.Module, dataset, config: TrainConfig, context: DistributedContext) -> float:
    """Mean per-image Dice of (probability >= 0.5) against the mask, at the training resolution.

    The cheap protocol, chosen for model selection during training; `cares evaluate` reports both
    the thresholded and the Inf-Net (256 thresholds) protocols at each ground truth's own size.
    An image with an empty mask and an empty prediction scores 1. Each process validates every
    world_size-th image; the sums are all-reduced.
    """
    from cares.metrics import image_metrics
    shard = Subset(dataset, list(range(context.rank, len(dataset), context.world_size)))
    total = torch.zeros(2, dtype=torch.float64)
    for item, probability in predict_probabilities(unwrap_model(model), shard, image_size=config.image_size,
                                                   device=context.device, batch_size=config.batch_size,
                                                   amp=config.amp, channels_last=config.channels_last):
        truth = item["mask"][0].numpy() > 0.5
        total[0] += image_metrics(probability, truth, protocol="threshold")["dice"]
        total[1] += 1
    total = all_reduce_sum(context, total.to(context.device)).cpu()
    return float(total[0] / total[1])


def train(config: TrainConfig, context: DistributedContext | None = None, *,
          stop_after_epoch: int | None = None,
          on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
          before_writing: Callable[[], None] | None = None) -> TrainResult:
    """Train as `config` says, writing into config.out; returns what was done.

    stop_after_epoch: end the run after that many epochs as if it had been killed (tests use it to
        simulate an interruption; the checkpoint is written first, exactly as in a real kill).
    on_epoch_end: called on the main process with each epoch's log row once its checkpoint is written
        (`cares reproduce` uses it for its overall progress and ETA).
    before_writing: called once every check has passed, just before the run's first write (not at all
        when there is nothing to do); train_all_folds writes the parent folder's config.yaml then.
    Raises NonFiniteLossError at the end of an epoch in which the loss became NaN/inf.
    """
    context = context or init_distributed(config.device)
    with _Deterministic(config.deterministic):
        return _train(config, context, stop_after_epoch, on_epoch_end, before_writing)


def _train(config: TrainConfig, context: DistributedContext, stop_after_epoch: int | None,
           on_epoch_end: Callable[[dict[str, Any]], None] | None,
           before_writing: Callable[[], None] | None = None) -> TrainResult:
    from cares.optim import build_optimizer, build_scheduler

    started = time.monotonic()   # --time-limit counts from here
    run_dir = Path(config.out)
    device = context.device
    check_output_dir(run_dir)

    # Everything that can refuse the run happens before anything is written (config.yaml included):
    # settings, the model and its options, datasets, the lock, and a --resume checkpoint's fit.
    # "auto" precision and layout become concrete here, once the device is known; config.yaml and the
    # checkpoints keep the settings as given (`settings`), so a resumed run on other hardware re-resolves them.
    settings = config
    config = dataclasses.replace(config, amp=resolve_amp(config.amp, device),
                                 channels_last=resolve_channels_last(config.channels_last, config.amp, device),
                                 data_on_device=(device.type == "cuda" if config.data_on_device is None
                                                 else config.data_on_device))
    seed_everything(config.seed)
    training_set, num_labelled, num_pseudo, validation_set = build_datasets(config)
    model = build_model_for(config)
    if config.deterministic:
        _check_deterministic_layers(model, config.model, device)
    if config.init_from is not None:
        _load_initial_weights(model, config)
    model = model.to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(config.optimizer, model.parameters(), lr=config.lr,
                                weight_decay=config.weight_decay)
    scheduler = build_scheduler(config.scheduler, optimizer, epochs=config.epochs, milestones=config.milestones,
                                gamma=config.gamma, warmup_epochs=config.warmup_epochs)
    scaler = _amp_scaler(config, device)
    loss_function = training_loss(config)

    lock = _lock_run_dir(run_dir, context)
    try:
        def check() -> tuple[OutputClaim | None, _Resumed]:
            claim = _claim_run_dir(config, run_dir, training_set, validation_set) if context.is_main else None
            return claim, _resume_state(config, run_dir, model, optimizer, scheduler, scaler)
        claim, resumed = _agree(context, check, cleanup=lock.abandon)
        if resumed.start_epoch >= config.epochs:
            # Nothing to train, so nothing is written (config.yaml, log.csv and the curves stay as they are).
            if context.is_main:
                print(f"{run_dir} has already trained {resumed.start_epoch} epochs (--epochs {config.epochs}): "
                      f"the run is finished, nothing to do; give --epochs above {resumed.start_epoch} to train "
                      "longer", file=sys.stderr)
            best_path = run_dir / "best.pt"
            return TrainResult(run_dir=run_dir, epochs_done=len(resumed.history),
                               best_val_dice=resumed.best_val_dice, last_checkpoint=run_dir / "last.pt",
                               best_checkpoint=best_path if best_path.is_file() else None,
                               history=resumed.history)
        if before_writing is not None:
            before_writing()
        if context.is_main:
            claim.take()
            remove_orphaned_temp_files(run_dir)   # a killed save's; safe, the lock is ours
            save_yaml(run_dir / "config.yaml", settings)
        return _train_epochs(config, settings, context, started, resumed, model, optimizer, scheduler, scaler,
                             loss_function, training_set, num_labelled, num_pseudo, validation_set,
                             stop_after_epoch, on_epoch_end)
    finally:
        lock.release()


# What a run writes into --out (see cares.runtime.claim_output); .lock is the RunLock's.
OWNER = "cares train"
RUN_ENTRIES = ("config.yaml", "last.pt", "best.pt", "log.csv", "loss_curve.png", "tensorboard")


def _claim_run_dir(config: TrainConfig, run_dir: Path, training_set, validation_set) -> OutputClaim:
    """The run folder's ownership check (main process, under the lock). A new run is refused when any
    file a run writes is already there (a stale best.pt or log.csv would sit beside the new last.pt);
    --resume continues the earlier run's files, or, when it finds no last.pt to continue, replaces them.
    Files that cares train did not write, and the run's inputs, are never overwritten."""
    mode = "new"
    if config.resume:
        mode = "update" if (run_dir / "last.pt").is_file() else "replace"
    inputs = [("--data", config.data), ("--pseudo", config.pseudo), ("--init-from", config.init_from)]
    return claim_output(run_dir, OWNER, RUN_ENTRIES, mode=mode, inputs=inputs,
                        input_files=[("--data", f) for f in dataset_files(training_set, validation_set)],
                        remedy="pass --resume to continue it or choose another --out")


@dataclass
class _Resumed:
    """Where a run starts: epoch 0, or what last.pt (and best.pt) say."""
    start_epoch: int = 0
    best_val_dice: float | None = None
    best_epoch: int | None = None
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    rng_states: list | None = None


class _RunDirLock:
    """RunLock on --out taken by the main process; abandon() also removes the folder when this run
    created it and left nothing else in it (a refused run leaves nothing behind)."""

    def __init__(self, run_dir: Path, is_main: bool):
        self.run_dir, self.created = run_dir, is_main and not run_dir.exists()
        self.lock = RunLock(run_dir).acquire() if is_main else None

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def abandon(self) -> None:
        self.release()
        if self.created:
            (self.run_dir / RunLock.FILE_NAME).unlink(missing_ok=True)
            try:
                self.run_dir.rmdir()
            except OSError:  # not empty after all: leave it
                pass


def _lock_run_dir(run_dir: Path, context: DistributedContext) -> _RunDirLock:
    """Take the run folder's lock on the main process; every process fails if it cannot."""
    holder: list[_RunDirLock] = []
    _agree(context, lambda: holder.append(_RunDirLock(run_dir, context.is_main)))
    return holder[0]


def _agree(context: DistributedContext, work: Callable[[], Any], cleanup: Callable[[], None] | None = None) -> Any:
    """Run `work` on every process; if it raises ValueError on any, raise it on all (a process that
    carried on alone would wait forever in the next collective), after calling `cleanup`."""
    result, error = None, None
    try:
        result = work()
    except ValueError as err:
        error = err
    messages = [m for m in all_gather_objects(context, None if error is None else str(error)) if m]
    if messages:
        if cleanup is not None:
            cleanup()
        if error is not None:
            raise error
        raise ValueError(messages[0])
    return result


def _checkpoint_to_resume(config: TrainConfig, last_path: Path) -> dict[str, Any]:
    """last.pt, once it is known to hold this run's model and experiment (else a ValueError)."""
    state = load_checkpoint(last_path)
    check_same_model(state, last_path, config.model, config.model_options, "--resume: checkpoint")
    check_resume_settings(config, state.get("config") or {}, last_path)
    return state


def _resume_state(config: TrainConfig, run_dir: Path, model, optimizer, scheduler, scaler) -> _Resumed:
    """Load last.pt into the model, optimizer, scheduler and scaler when --resume finds one; raise
    ValueError (before anything is written) when it does not fit this run."""
    last_path = run_dir / "last.pt"
    if not config.resume:   # a folder holding a run was refused by _claim_run_dir
        return _Resumed()
    if not last_path.is_file():
        print(f"no checkpoint in {run_dir} yet: starting a new run", file=sys.stderr)
        return _Resumed()
    state = _checkpoint_to_resume(config, last_path)
    if not isinstance(state.get("optimizer"), dict) or "rng_states" not in state:
        raise ValueError(f"--resume: {last_path} holds no optimizer/RNG state (exported weights?); "
                         "use --init-from to start from its weights")
    load_model_weights(model, state, last_path)
    # load_state_dict takes any optimizer's groups without complaint (the error comes at the first
    # step, as a KeyError), so the group settings are compared first.
    saved_groups = state["optimizer"].get("param_groups") or [{}]
    expected_keys, saved_keys = set(optimizer.param_groups[0]) - {"params"}, set(saved_groups[0]) - {"params"}
    if saved_keys != expected_keys:
        raise ValueError(f"--resume: the optimizer state in {last_path} does not fit this run's --optimizer "
                         f"{config.optimizer} (settings {sorted(saved_keys ^ expected_keys)} differ): it was "
                         "written by another optimizer")
    try:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
    except (KeyError, ValueError, TypeError, RuntimeError) as err:
        raise ValueError(f"--resume: the optimizer/scheduler state in {last_path} does not fit this run's "
                         f"--optimizer {config.optimizer} --scheduler {config.scheduler} "
                         f"({type(err).__name__}: {err})") from None
    best_val_dice, best_epoch, note = reconcile_best(run_dir, state)
    if note:
        print(f"resume: {note}", file=sys.stderr)
    print(f"resuming {run_dir} after epoch {state['epoch']}", file=sys.stderr)
    return _Resumed(start_epoch=state["epoch"], best_val_dice=best_val_dice, best_epoch=best_epoch,
                    history=list(state["history"]), rng_states=state["rng_states"])


def _train_epochs(config, settings, context, started, resumed: _Resumed, model, optimizer, scheduler, scaler,
                  loss_function, training_set, num_labelled, num_pseudo, validation_set,
                  stop_after_epoch, on_epoch_end) -> TrainResult:
    """The epoch loop of `train` (the run folder is locked and checked)."""
    run_dir = Path(config.out)
    last_path, best_path = run_dir / "last.pt", run_dir / "best.pt"
    device = context.device
    start_epoch, best_val_dice, best_epoch = resumed.start_epoch, resumed.best_val_dice, resumed.best_epoch
    history = resumed.history

    train_model: torch.nn.Module = model
    if context.is_distributed:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if config.compile:
        train_model = torch.compile(train_model)
    stepper = _Stepper(train_model=train_model, model=model, loss_function=loss_function, optimizer=optimizer,
                       scaler=scaler, device=device, amp=config.amp,
                       memory_format=torch.channels_last if config.channels_last else torch.contiguous_format)

    sampler = EpochSampler(num_labelled, num_pseudo, seed=config.seed, rank=context.rank,
                           world_size=context.world_size)
    # Batches built on the device give the same batches as the DataLoader (cares.data.device_batches).
    device_batches = None
    if config.data_on_device:
        from cares.data import DeviceBatches
        device_batches = DeviceBatches(training_set, device, config.batch_size)
    writer = _tensorboard_writer(run_dir, start_epoch + 1) if context.is_main and config.tensorboard else None
    if context.is_main:
        print(f"training {config.model} on {config.data} ({num_labelled} labelled"
              + (f" + {num_pseudo} pseudo-labelled, {num_labelled} drawn per epoch" if num_pseudo else "")
              + f" slices, {len(validation_set) if validation_set is not None else 0} for validation) on "
              + f"{device} x {context.world_size}, epochs {start_epoch + 1}..{config.epochs}", file=sys.stderr)

    if resumed.rng_states is not None:
        # Restored last, after everything above has drawn from the RNGs while being built.
        if len(resumed.rng_states) == context.world_size:
            restore_rng_state(resumed.rng_states[context.rank])
        else:
            warnings.warn(f"last.pt was written by {len(resumed.rng_states)} processes, this run has "
                          f"{context.world_size}: RNG states are re-seeded, so the run will not be "
                          "bitwise identical to an uninterrupted one", stacklevel=2)
            seed_everything(derive_seed(config.seed, _RESEED_TAG, start_epoch, context.rank))

    epoch, stopped_early = start_epoch, False
    for epoch in range(start_epoch, config.epochs):
        sampler.set_epoch(epoch)
        set_dataset_epoch(training_set, epoch)
        if device_batches is not None:
            loader = device_batches.epoch_batches(sampler)
        else:
            loader = DataLoader(training_set, batch_size=config.batch_size, sampler=sampler,
                                num_workers=config.num_workers, pin_memory=device.type == "cuda",
                                generator=torch.Generator().manual_seed(derive_seed(config.seed, _LOADER_SEED_TAG,
                                                                                    epoch)))
        lr = optimizer.param_groups[0]["lr"]
        epoch_started = time.monotonic()
        train_loss, images = _train_one_epoch(stepper, loader, config, context, epoch, run_dir)
        seconds = time.monotonic() - epoch_started

        val_dice = None
        is_last_epoch = epoch + 1 == config.epochs
        if validation_set is not None and ((epoch + 1) % config.val_every == 0 or is_last_epoch):
            val_dice = validation_dice(model, validation_set, config, context)
        scheduler.step()

        improved = val_dice is not None and (best_val_dice is None or val_dice > best_val_dice)
        if improved:
            best_val_dice, best_epoch = val_dice, epoch + 1
        history.append(_history_row(epoch + 1, train_loss, val_dice, lr, images, seconds))

        # Decide whether the run stops here before saving, so the epoch it stops at is always saved.
        # --time-limit: stop when another epoch as long as this one would end past the limit, so the run
        # ends within it (rank 0 decides: the processes' clocks differ slightly).
        now = time.monotonic()
        out_of_time = (config.time_limit is not None
                       and (now - started) + (now - epoch_started) > 60 * config.time_limit)
        out_of_time = broadcast_object(context, out_of_time) and not is_last_epoch
        stop_asked = stop_after_epoch is not None and epoch + 1 >= stop_after_epoch and not is_last_epoch
        # last.pt every --checkpoint-every epochs, and whenever the run ends or best.pt changes (so the
        # pair stays consistent: see cares.checkpoint.save_epoch_checkpoints).
        save = ((epoch + 1) % config.checkpoint_every == 0 or is_last_epoch or improved
                or out_of_time or stop_asked)
        rng = all_gather_objects(context, capture_rng_state()) if save else None
        if context.is_main:
            if save:
                save_epoch_checkpoints(
                    run_dir,
                    full_state(settings, model, optimizer, scheduler, scaler, epoch + 1, best_val_dice, best_epoch,
                               history, rng),
                    weights_state(settings, model, epoch + 1, best_val_dice, best_epoch, history) if improved else None)
            write_log_csv(run_dir / "log.csv", history)
            if writer is not None:
                writer.add_scalar("train/loss", train_loss, epoch + 1)
                writer.add_scalar("train/lr", lr, epoch + 1)
                if val_dice is not None:
                    writer.add_scalar("val/dice", val_dice, epoch + 1)
                    _log_predictions(writer, model, validation_set, config, device, epoch + 1)
                writer.flush()
            tqdm.write(f"epoch {epoch + 1}/{config.epochs}  loss {train_loss:.4f}"
                       + (f"  val Dice {val_dice:.4f} (best {best_val_dice:.4f})" if val_dice is not None else "")
                       + f"  lr {lr:.3g}  {history[-1]['images_per_second']:.1f} img/s", file=sys.stderr)
            if on_epoch_end is not None:
                on_epoch_end(history[-1])

        if stop_asked:
            stopped_early = True
            break
        if out_of_time:
            if context.is_main:
                tqdm.write(f"stopping after epoch {epoch + 1}: another epoch would pass --time-limit "
                           f"{config.time_limit} min; continue with --resume", file=sys.stderr)
            stopped_early = True
            break

    if writer is not None:
        writer.close()
    if context.is_main and history:
        from cares.figures import training_curves
        training_curves(run_dir / "loss_curve.png", history)
    barrier(context)  # the files are complete before any process returns
    return TrainResult(run_dir=run_dir, epochs_done=len(history), best_val_dice=best_val_dice,
                       last_checkpoint=last_path, best_checkpoint=best_path if best_path.is_file() else None,
                       history=history, stopped_early=stopped_early)


@dataclass
class _Stepper:
    """What one optimisation step needs: the model as trained (DDP/compiled) and as saved, the loss,
    optimizer, GradScaler (fp16 only), device, autocast choice and memory format."""
    train_model: torch.nn.Module
    model: torch.nn.Module
    loss_function: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: Any
    device: torch.device
    amp: str
    memory_format: torch.memory_format

    def step(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Train on one batch; returns (images on the device, the loss, a device scalar)."""
        images = batch["image"].to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
        masks = batch["mask"].to(self.device, non_blocking=True)
        with autocast_context(self.device, self.amp):
            logits = self.train_model(images)
        loss = self.loss_function(logits, masks)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        return images, loss.detach()

    def weights_are_finite(self) -> torch.Tensor:
        """A device bool: every parameter finite (read once per epoch, not per step)."""
        return torch.stack([torch.isfinite(p).all() for p in self.model.parameters()]).all()


def training_loss(config: TrainConfig) -> torch.nn.Module:
    """The loss of a training run. check_target=False: the loss's mask-range check reads the device
    every step (a host sync on a GPU); training masks are 0/1 by construction (cares.data decodes them
    as bool masks, and augmentation warps them with nearest sampling)."""
    from cares.losses import DiceBCELoss
    return DiceBCELoss(dice_weight=config.dice_weight, bce_weight=config.bce_weight, check_target=False)


class _StepAccounts:
    """One epoch's per-step bookkeeping, kept on the device so that a step never makes the host wait:
    the loss sum and image count, the first step whose loss was not finite, and whether a batch held
    NaN/inf pixels. Read once, at the end of the epoch."""

    def __init__(self, device: torch.device):
        self.totals = torch.zeros(2, dtype=torch.float64, device=device)      # sum of loss * images, images
        self.first_bad_step = torch.full((), -1, dtype=torch.int64, device=device)
        self.bad_input = torch.zeros((), dtype=torch.bool, device=device)

    def add(self, step: int, images: torch.Tensor, loss: torch.Tensor) -> None:
        self.first_bad_step = torch.where(~torch.isfinite(loss) & (self.first_bad_step < 0), step,
                                          self.first_bad_step)
        self.bad_input |= ~torch.isfinite(images).all()
        # In-place adds of a Python number: no host-built tensor, so no blocking host-to-device copy.
        self.totals[0] += loss.double() * len(images)
        self.totals[1] += len(images)


def _train_one_epoch(stepper: _Stepper, loader: Iterable[dict[str, Any]], config: TrainConfig, context: DistributedContext,
                     epoch: int, run_dir: Path) -> tuple[float, int]:
    """One pass over the epoch's samples; returns (mean loss, number of images), both over all processes.

    The host does not wait for the device inside the loop: the loss sum and the non-finite checks are
    accumulated as device tensors and read once, at the end of the epoch (the progress bar, shown only
    on a terminal, reads them every PROGRESS_EVERY steps). A non-finite loss (or weights that became
    non-finite) therefore stops the run at the end of its epoch, with NonFiniteLossError naming the
    first bad step.
    """
    stepper.train_model.train()
    accounts = _StepAccounts(context.device)
    batch_names: list[list[str]] = []
    progress = tqdm(loader, desc=f"epoch {epoch + 1}/{config.epochs}", unit="batch", leave=False,
                    disable=not context.is_main or None, file=sys.stderr)
    started = time.monotonic()
    for step, batch in enumerate(progress):
        batch_names.append(list(batch["name"]))
        images, loss = stepper.step(batch)
        accounts.add(step, images, loss)
        totals = accounts.totals
        if progress.disable is False and step % PROGRESS_EVERY == 0:
            elapsed = time.monotonic() - started
            progress.set_postfix(loss=f"{float(totals[0] / totals[1]):.4f}",
                                 img_s=f"{float(totals[1]) / max(elapsed, 1e-9):.1f}")

    # Every process must reach the same verdict, or the healthy ones would wait forever in the next
    # collective; so the flags are all-reduced with the loss totals.
    totals, first_bad_step, bad_input = accounts.totals, accounts.first_bad_step, accounts.bad_input
    summary = all_reduce_sum(context, torch.stack([totals[0], totals[1], (first_bad_step >= 0).double(),
                                                   bad_input.double(), (~stepper.weights_are_finite()).double()]))
    if summary[2] > 0 or summary[4] > 0:
        bad_step = int(first_bad_step)
        where = all_gather_objects(context, None if bad_step < 0 else
                                   (context.rank, bad_step, batch_names[bad_step], bool(bad_input)))
        raise NonFiniteLossError(_non_finite_message(epoch, [w for w in where if w is not None], run_dir,
                                                     input_was_bad=bool(summary[3] > 0)))
    return float(summary[0] / summary[1]), int(summary[1])


def _non_finite_message(epoch: int, where: list[tuple[int, int, list[str], bool]], run_dir: Path, *,
                        input_was_bad: bool) -> str:
    """What went wrong, where, what is left to resume from, and what to change."""
    last_path = run_dir / "last.pt"
    if epoch > 0 and last_path.is_file():
        fallback = f"the last good state is {last_path} (after epoch {epoch}); --resume continues from it"
    else:
        fallback = "no epoch had finished, so there is no checkpoint to go back to"
    if input_was_bad:
        advice = "the input images held NaN or infinite values: check the data"
    else:
        advice = "try a lower --lr, --amp off or bf16"
    if where:
        rank, step, names, _ = min(where, key=lambda w: w[1])
        what = f"the loss became NaN or infinite at epoch {epoch + 1}, step {step + 1} (batch {names} on rank {rank})"
    else:  # the loss stayed finite, but a step left NaN/inf weights (found at the epoch's end)
        what = f"the model's weights became NaN or infinite during epoch {epoch + 1}"
    return f"{what}; {fallback}. Cause: {advice}."


def train_all_folds(config: TrainConfig, context: DistributedContext | None = None) -> dict[str, Any]:
    """Train every fold of --folds K into <out>/fold_<i> and write <out>/folds.json with the best
    validation Dice of each fold and their mean +- std (the model-selection score)."""
    context = context or init_distributed(config.device)
    run_dir = Path(config.out)
    check_output_dir(run_dir)
    lock = _lock_run_dir(run_dir, context)
    claim = None
    wrote: list[bool] = []

    def write_config() -> None:
        # Written when the first fold passed its checks (datasets included), so a refused run writes nothing.
        if not wrote and context.is_main:
            claim.take()
            save_yaml(run_dir / "config.yaml", config)
        wrote.append(True)

    try:
        # The folds' inputs are checked by each fold's own run (fold_<i> is a run folder).
        entries = ("config.yaml", "folds.json", *(f"fold_{fold}" for fold in range(config.folds)))
        claim = _agree(context, lambda: claim_output(
            run_dir, OWNER, entries, mode="update" if config.resume else "new",
            remedy="pass --resume to continue it or choose another --out") if context.is_main else None)
        if config.resume:
            # Every fold's checkpoint is checked before the folder's config.yaml is rewritten.
            _agree(context, lambda: [_checkpoint_to_resume(fold_config, Path(fold_config.out) / "last.pt")
                                     for fold_config in _fold_configs(config, run_dir)
                                     if (Path(fold_config.out) / "last.pt").is_file()])
        return _train_folds(config, context, run_dir, write_config)
    except (ValueError, OSError):   # what `run` reports as a user error
        if not wrote:
            lock.abandon()   # removes the folder again when this run created it
        raise
    finally:
        lock.release()


def _fold_configs(config: TrainConfig, run_dir: Path) -> list[TrainConfig]:
    return [dataclasses.replace(config, fold=fold, out=str(run_dir / f"fold_{fold}")) for fold in range(config.folds)]


def _train_folds(config: TrainConfig, context: DistributedContext, run_dir: Path,
                 before_writing: Callable[[], None]) -> dict[str, Any]:
    results = []
    for fold_config in _fold_configs(config, run_dir):
        results.append(train(fold_config, context, before_writing=before_writing))
    scores = [r.best_val_dice for r in results]
    summary = {"folds": config.folds, "best_val_dice": scores,
               "mean_val_dice": float(np.mean(scores)), "std_val_dice": float(np.std(scores)),
               "validation": "mean per-image Dice of probability >= 0.5 at the training resolution",
               "runs": [str(r.run_dir) for r in results]}
    if context.is_main:
        atomic_write_bytes(run_dir / "folds.json", json.dumps(summary, indent=2).encode())
        print(f"{config.folds}-fold cross-validation: validation Dice "
              + ", ".join(f"{s:.4f}" for s in scores)
              + f"; mean {summary['mean_val_dice']:.4f} +- {summary['std_val_dice']:.4f}", file=sys.stderr)
    return summary
