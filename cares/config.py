"""Training configuration: one dataclass, filled from defaults, then a YAML file, then CLI flags.

Precedence (later wins):  TrainConfig defaults  <  the run folder's config.yaml (with --resume)
                          <  --config FILE.yaml  <  flags given on the command line.

The train command's flags use `default=argparse.SUPPRESS`, so the parsed namespace holds exactly
the flags the user typed; that is how a CLI flag can override a YAML value without a YAML value
being overwritten by a flag's default. Help texts show the dataclass defaults instead.

The YAML keys are the field names below (the flag names with '_' for '-'), e.g.

    model: cares_unet
    model_options: {upsampler: carafe}
    epochs: 1200
    lr: 0.0005
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cares.runtime import AMP_CHOICES, DEVICE_CHOICES


@dataclass
class TrainConfig:
    # data
    data: str = "synthetic"                   # "synthetic" or a dataset folder (see cares.data.build_dataset)
    train_split: str = "train"
    val_split: str | None = None              # a split of `data` to validate on when --folds is 1
    pseudo: str | None = None                 # folder with Imgs/ + GT/ written by `cares pseudo-label`
    cache_data: bool = True                   # decode and resize the training slices once, keep them in memory
    data_on_device: bool | None = None        # keep them on the training device, batch and augment there (None: on CUDA)
    synthetic_samples: int | None = None      # slices in the synthetic training split (None: cares.data's 64)
    image_size: int = 256
    augment: bool = True
    num_workers: int = 2
    # model (options go to cares.models.build_model, e.g. {"upsampler": "deconv"})
    model: str = "cares_unet"
    model_options: dict[str, Any] = field(default_factory=dict)
    init_from: str | None = None              # start from this checkpoint's weights (same model), e.g. semi after supervised
    # optimisation (paper: Ranger, lr 5e-4, weight decay 1e-4, batch 4, Dice + BCE)
    optimizer: str = "ranger"
    lr: float = 5e-4
    weight_decay: float = 1e-4
    scheduler: str = "constant"
    milestones: list[int] | None = None
    gamma: float = 0.1
    warmup_epochs: int = 0
    epochs: int = 1200
    batch_size: int = 4                       # per process
    dice_weight: float = 1.0
    bce_weight: float = 1.0
    # model selection: K-fold cross-validation on the training split (paper: 2-fold)
    folds: int = 1                            # 1 = no cross-validation
    fold: int | str = 0                       # which fold is the validation fold, or "all"
    val_every: int = 1                        # validate every N epochs (and after the last one)
    # execution
    device: str = "auto"
    amp: str = "auto"                         # auto: bf16 on CUDA with bf16 and on CPUs with native bf16
    channels_last: bool | None = None         # None: on when bf16 autocast runs (cares.inference)
    compile: bool = False
    seed: int = 0
    deterministic: bool = False
    checkpoint_every: int = 1                 # write last.pt every N epochs (and at the end, at a stop, when best.pt changes)
    tensorboard: bool = False                 # also log to <out>/tensorboard (the tensorboard extra)
    time_limit: float | None = None           # minutes; stop at the last epoch end that keeps within it
    out: str = "runs/train"
    resume: bool = False

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (str/int/float/bool/None/list/dict only): safe for YAML and for
        torch.load(weights_only=True)."""
        return dataclasses.asdict(self)


FIELD_NAMES = tuple(f.name for f in dataclasses.fields(TrainConfig))
DEFAULTS = TrainConfig()
_FIELD_TYPES = typing.get_type_hints(TrainConfig)

# The settings a --resume may change: they decide how the run executes (where, how fast, how often it
# saves or validates, when it stops), not what it learns; the data-order, augmentation and update
# streams are the same whatever they are (cares.train's module docstring). Every other setting defines
# the experiment (EXPERIMENT_SETTINGS, derived so that a new setting is experiment-defining unless it
# is added here) and must equal the checkpoint's: see check_resume_settings. --epochs is the one
# conditional entry: a schedule computed from it (cosine, multistep at its default milestones) is
# restored from last.pt with the old epochs, so there a changed --epochs is refused too.
MAY_CHANGE_ON_RESUME = ("epochs", "num_workers", "cache_data", "data_on_device", "device", "amp", "channels_last",
                        "compile", "deterministic", "checkpoint_every", "time_limit", "val_every", "tensorboard", "out",
                        "resume")
EXPERIMENT_SETTINGS = tuple(name for name in FIELD_NAMES if name not in MAY_CHANGE_ON_RESUME)
# Settings that name files or folders: two spellings of one path are the same setting.
_PATH_SETTINGS = ("data", "pseudo", "init_from")


def flag_name(name: str) -> str:
    """The command-line flag of a TrainConfig field."""
    return "--model-option" if name == "model_options" else "--" + name.replace("_", "-")


def schedule_uses_epochs(scheduler: str, milestones) -> bool:
    """True when the learning rate of an epoch depends on --epochs (see MAY_CHANGE_ON_RESUME)."""
    return scheduler == "cosine" or (scheduler == "multistep" and milestones is None)


def _format_setting(name: str, value: Any) -> str:
    flag = flag_name(name)
    if isinstance(value, bool):
        return flag if value else f"--no-{flag[2:]}"
    if value is None:
        return f"{flag} (unset)"
    if isinstance(value, dict):
        return " ".join(f"{flag} {key}={option}" for key, option in value.items()) or f"{flag} (none)"
    if isinstance(value, (list, tuple)):
        return f"{flag} {' '.join(str(item) for item in value)}"
    return f"{flag} {value}"


def _same_setting(name: str, saved: Any, wanted: Any) -> bool:
    if saved == wanted:
        return True
    if (name in _PATH_SETTINGS and isinstance(saved, str) and isinstance(wanted, str)
            and "synthetic" not in (saved, wanted)):
        return os.path.realpath(saved) == os.path.realpath(wanted)
    return False


def check_resume_settings(config: "TrainConfig", saved: dict[str, Any], checkpoint) -> None:
    """Raise ValueError unless `config` continues the experiment whose settings `saved` (a checkpoint's
    "config" record) holds: every EXPERIMENT_SETTINGS entry equal, and --epochs unchanged when the
    schedule is computed from it. Settings the checkpoint does not record (older versions) are skipped."""
    changed = [name for name in EXPERIMENT_SETTINGS
               if name in saved and not _same_setting(name, saved[name], getattr(config, name))]
    if ("epochs" in saved and saved["epochs"] != config.epochs
            and schedule_uses_epochs(config.scheduler, config.milestones)):
        changed.append("epochs")
    if not changed:
        return
    was = " ".join(_format_setting(name, saved[name]) for name in changed)
    now = " ".join(_format_setting(name, getattr(config, name)) for name in changed)
    why = (f" (--scheduler {config.scheduler} is computed from --epochs, so --epochs cannot change either)"
           if "epochs" in changed else "")
    raise ValueError(f"--resume: {str(checkpoint)!r} was trained with {was}, this run asks for {now}: that "
                     f"would change the experiment{why}. Resume with the run's settings, or start a new --out. "
                     f"A resume may change only {', '.join(flag_name(n) for n in MAY_CHANGE_ON_RESUME)}")


def _positive_int(name):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{name} must be >= 1, got {value}")
        return value
    return parse


def _positive_finite_float(name):
    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {text!r}") from None
        if not (math.isfinite(value) and value > 0):
            raise argparse.ArgumentTypeError(f"{name} must be a finite number > 0, got {text!r}")
        return value
    return parse


def _finite_float(name):
    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{name} must be finite, got {text!r}")
        return value
    return parse


def _model_option(text: str) -> tuple[str, Any]:
    """KEY=VALUE, read by cares.models.parse_model_option (16 is an int, true a bool, carafe a string)."""
    from cares.models import parse_model_option
    try:
        return parse_model_option(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--model-option expects KEY=VALUE, got {text!r}") from None


def models_help() -> str:
    """The model names and each one's options, for --help."""
    from cares.models import MODEL_NAMES, model_options
    return "; ".join(f"{name} ({', '.join(model_options(name)) or 'no options'})" for name in MODEL_NAMES)


def _fold(text: str) -> int | str:
    if text == "all":
        return "all"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--fold must be an integer or 'all', got {text!r}") from None


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The `cares train` flags. Every flag defaults to SUPPRESS (see the module docstring)."""
    group = parser

    def flag(*names, dest=None, **kw):
        dest = dest or names[0].lstrip("-").replace("-", "_")
        if dest in FIELD_NAMES and getattr(DEFAULTS, dest) is not None:
            kw["help"] = f"{kw.get('help', '')} (default: {getattr(DEFAULTS, dest)})".strip()
        group.add_argument(*names, dest=dest, default=argparse.SUPPRESS, **kw)

    flag("--config", metavar="FILE.yaml", help="read settings from a YAML file; flags given here override it")

    group = parser.add_argument_group("data")
    flag("--data", metavar="SOURCE", help="'synthetic' or a dataset folder (COVID-SemiSeg layout, "
                                          "image/mask folders, NIfTI volumes)")
    flag("--train-split", metavar="NAME", help="split of --data to train on")
    flag("--val-split", metavar="NAME", help="split of --data to validate on when --folds is 1 "
                                             "(without it and without folds there is no best.pt)")
    flag("--pseudo", metavar="DIR", help="pseudo-labelled folder (Imgs/, GT/) from `cares pseudo-label`: each "
                                         "epoch adds as many pseudo-labelled samples as labelled ones")
    flag("--synthetic-samples", type=_positive_int("--synthetic-samples"), metavar="N",
         help="slices in the training split when --data is synthetic (None: cares.data's default, 64)")
    flag("--image-size", type=_positive_int("--image-size"), metavar="S",
         help="train at S x S; S a multiple of the model's size multiple (16 for the U-Nets, 32 for segnet, fcn "
              "and unet_resnet34), checked before anything is written")
    flag("--augment", action=argparse.BooleanOptionalAction, help="random training augmentation")
    flag("--num-workers", type=int, metavar="N", help="DataLoader worker processes")
    flag("--cache-data", action=argparse.BooleanOptionalAction,
         help="decode and resize the training slices once and keep them in memory (S*S*5 bytes each)")
    flag("--data-on-device", action=argparse.BooleanOptionalAction,
         help="keep the training slices on the training device and build and augment batches there, "
              "without a DataLoader (default: on for CUDA)")

    group = parser.add_argument_group("model")
    flag("--model", metavar="NAME", help=f"architecture (its --model-option keys in parentheses): {models_help()}")
    flag("--model-option", dest="model_options", action="append", type=_model_option, metavar="KEY=VALUE",
         help="an option of --model, repeatable, e.g. upsampler=deconv or base_channels=16 "
              "(cares_unet upsamplers: carafe, deconv, subpixel, bilinear; downsamplers: conv, carafe)")
    flag("--init-from", metavar="CKPT", help="initialise the model with this checkpoint's weights (same model and "
                                             "options; optimizer and schedule start fresh), e.g. semi-supervised "
                                             "training that continues from the supervised model")

    group = parser.add_argument_group("optimisation")
    flag("--optimizer", metavar="NAME", help="ranger, adam or sgd")
    flag("--lr", type=_positive_finite_float("--lr"), help="learning rate")
    flag("--weight-decay", type=_finite_float("--weight-decay"), help="weight decay")
    flag("--scheduler", metavar="NAME", help="constant, multistep or cosine (stepped once per epoch)")
    flag("--milestones", type=int, nargs="+", metavar="EPOCH",
         help="epochs at which multistep decays (default: --epochs x 30/60 and x 50/60, the paper's 60-epoch "
              "schedule scaled; at least one must be below --epochs)")
    flag("--gamma", type=_finite_float("--gamma"), help="multistep decay factor")
    flag("--warmup-epochs", type=int, metavar="N", help="linear learning-rate warm-up epochs")
    flag("--epochs", type=_positive_int("--epochs"), metavar="N", help="total epochs (paper: 1200)")
    flag("--batch-size", type=_positive_int("--batch-size"), metavar="N", help="images per step and process")
    flag("--dice-weight", type=_finite_float("--dice-weight"), help="weight of the Dice term of the loss")
    flag("--bce-weight", type=_finite_float("--bce-weight"), help="weight of the BCE term of the loss")

    group = parser.add_argument_group("model selection")
    flag("--folds", type=_positive_int("--folds"), metavar="K",
         help="K-fold cross-validation on the training split (paper: 2); 1 = off")
    flag("--fold", type=_fold, metavar="I|all", help="validation fold, or 'all' to run every fold "
                                                     "and report the mean validation Dice")
    flag("--val-every", type=_positive_int("--val-every"), metavar="N", help="validate every N epochs")

    group = parser.add_argument_group("execution")
    flag("--device", choices=DEVICE_CHOICES, help="auto = cuda when available")
    flag("--amp", choices=AMP_CHOICES, help="mixed precision (fp16 uses a GradScaler); auto = bf16 on CUDA "
                                            "with bf16 and on CPUs with native bf16 (AVX512-BF16/AMX), else off")
    flag("--channels-last", action=argparse.BooleanOptionalAction,
         help="channels_last memory format (default: on when bf16 autocast runs)")
    flag("--compile", action=argparse.BooleanOptionalAction, help="torch.compile the model")
    flag("--seed", type=int, help="seed for weights, data order and augmentation")
    flag("--deterministic", action=argparse.BooleanOptionalAction,
         help="torch.use_deterministic_algorithms (slower on GPU)")
    flag("--checkpoint-every", type=_positive_int("--checkpoint-every"), metavar="N",
         help="write last.pt every N epochs, and always at the last epoch, when the run stops early and when "
              "best.pt changes (a killed run resumes from the last one written; large models on fast GPUs "
              "spend less time writing)")
    flag("--tensorboard", action=argparse.BooleanOptionalAction,
         help="also log to <out>/tensorboard: training loss, learning rate, validation Dice and, at each "
              "validation, a few validation slices with their masks and predictions (needs the tensorboard "
              "extra: pip install \"carafe-kernels[tensorboard]\"; log.csv has the same numbers without it)")
    flag("--time-limit", type=float, metavar="MINUTES",
         help="stop at an epoch end when one more epoch (as long as the last) would pass this time; "
              "--resume continues")
    flag("--out", metavar="DIR", help="run folder (checkpoints, log.csv, config.yaml)")
    flag("--resume", action=argparse.BooleanOptionalAction,
         help="continue the run in --out from its last.pt (starts fresh when there is none). Only these "
              f"may differ from the run's settings: {', '.join(flag_name(n) for n in MAY_CHANGE_ON_RESUME)} "
              "(--epochs not with --scheduler cosine or multistep without --milestones); any other change "
              "(image size, data, model, optimisation, seed, ...) is refused")


def _kinds(name: str) -> tuple:
    """The types a field may hold, from its annotation: (int,), (str, NoneType), (list[int], NoneType), ..."""
    hint = _FIELD_TYPES[name]
    return typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)


def _fits(kind, value) -> bool:
    if kind is type(None):
        return value is None
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    origin = typing.get_origin(kind)
    if origin is list:
        return isinstance(value, list) and all(_fits(typing.get_args(kind)[0], item) for item in value)
    if origin is dict:
        return isinstance(value, dict)
    return isinstance(value, kind)


def _describe(kind) -> str:
    names = {type(None): "null", bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    if typing.get_origin(kind) is list:
        return "a list of integers like [30, 50]"
    if typing.get_origin(kind) is dict:
        return "a mapping like {upsampler: carafe}"
    return names.get(kind, kind.__name__)


def check_setting_type(name: str, value: Any) -> Any:
    """`value` if it has the type TrainConfig declares for `name`, else a ValueError naming the flag.

    A string is read as a number for float settings: PyYAML follows YAML 1.1, where `1e-3` (no dot)
    is a string and only `1.0e-3` a float, so `lr: 1e-3` in a --config file arrives as '1e-3'."""
    kinds = _kinds(name)
    if any(_fits(kind, value) for kind in kinds):
        return value
    if float in kinds and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    got = f"{value!r} ({'a string' if isinstance(value, str) else type(value).__name__})"
    raise ValueError(f"{flag_name(name)} must be {' or '.join(_describe(k) for k in kinds)}, got {got}")


def load_yaml(path, what: str = "--config file") -> dict[str, Any]:
    import yaml
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist")
    try:
        with open(path) as f:
            values = yaml.safe_load(f)
    except yaml.YAMLError as err:  # includes the !!python/object tags safe_load refuses
        reason = " ".join(str(err).split())
        raise ValueError(f"{what} {str(path)!r} is not plain YAML settings: {reason[:200]}") from None
    if values is None or values == {}:
        # An empty file would silently run the defaults (1200 epochs on synthetic data).
        raise ValueError(f"{what} {str(path)!r} holds no settings (it is empty); give at least one, "
                         "e.g. 'data: /path/to/dataset'")
    if not isinstance(values, dict):
        raise ValueError(f"{what} {str(path)!r} must hold a mapping of settings, "
                         f"got {type(values).__name__}")
    unknown = sorted(set(values) - set(FIELD_NAMES))
    if unknown:
        raise ValueError(f"{what} {str(path)!r}: unknown setting(s) {unknown}; "
                         f"known: {sorted(FIELD_NAMES)}")
    return values


def save_yaml(path, config: TrainConfig) -> None:
    """Write config.yaml atomically (a run folder never holds a half-written config)."""
    import yaml
    from cares.runtime import atomic_write_bytes
    text = yaml.safe_dump(config.to_dict(), sort_keys=False)
    atomic_write_bytes(path, text.encode())


def resolve_config(args: argparse.Namespace | dict[str, Any] | None = None) -> TrainConfig:
    """Defaults < run folder's config.yaml (when resuming) < --config file < given flags."""
    given = dict(vars(args)) if isinstance(args, argparse.Namespace) else dict(args or {})
    for internal in ("command", "_run"):
        given.pop(internal, None)
    if "model_options" in given and isinstance(given["model_options"], list):
        given["model_options"] = dict(given["model_options"])
    config_file = given.pop("config", None)

    values: dict[str, Any] = {}
    file_values = load_yaml(config_file) if config_file else {}
    out = given.get("out", file_values.get("out", DEFAULTS.out))
    resume = given.get("resume", file_values.get("resume", DEFAULTS.resume))
    saved = Path(out) / "config.yaml"
    if resume and saved.is_file():
        values.update(load_yaml(saved, "the run's saved settings"))
    values.update(file_values)
    # Model options merge key by key, so `--model-option carafe_backend=cpu` keeps a YAML upsampler.
    if "model_options" in given:
        given["model_options"] = {**(values.get("model_options") or {}), **given["model_options"]}
    values.update(given)
    unknown = sorted(set(values) - set(FIELD_NAMES))
    if unknown:
        raise ValueError(f"unknown training setting(s) {unknown}")
    config = TrainConfig(**{name: check_setting_type(name, value) for name, value in values.items()})
    validate(config)
    return config


def validate(config: TrainConfig) -> None:
    """Raise ValueError naming the flag for settings that cannot work (checked before any work)."""
    def need(ok, message):
        if not ok:
            raise ValueError(message)

    for name in FIELD_NAMES:   # types first: the range checks below compare numbers
        if check_setting_type(name, getattr(config, name)) is not getattr(config, name):
            raise ValueError(f"{flag_name(name)} must be a number, got {getattr(config, name)!r} (a string)")

    need(isinstance(config.image_size, int) and config.image_size >= 8,
         f"--image-size must be an integer >= 8, got {config.image_size!r}")
    need(isinstance(config.epochs, int) and config.epochs >= 1, f"--epochs must be >= 1, got {config.epochs!r}")
    need(isinstance(config.batch_size, int) and config.batch_size >= 1,
         f"--batch-size must be >= 1, got {config.batch_size!r}")
    need(isinstance(config.checkpoint_every, int) and not isinstance(config.checkpoint_every, bool)
         and config.checkpoint_every >= 1, f"--checkpoint-every must be >= 1, got {config.checkpoint_every!r}")
    if config.tensorboard:
        need(importlib.util.find_spec("tensorboard") is not None,
             '--tensorboard needs the tensorboard package: pip install "carafe-kernels[tensorboard]"')
    need(isinstance(config.num_workers, int) and config.num_workers >= 0,
         f"--num-workers must be >= 0, got {config.num_workers!r}")
    need(config.synthetic_samples is None or (isinstance(config.synthetic_samples, int)
                                               and config.synthetic_samples >= 1),
         f"--synthetic-samples must be >= 1, got {config.synthetic_samples!r}")
    for name in ("lr", "weight_decay", "gamma", "dice_weight", "bce_weight"):
        value = getattr(config, name)
        need(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
             f"--{name.replace('_', '-')} must be a finite number, got {value!r}")
    need(config.lr > 0, f"--lr must be > 0, got {config.lr!r}")
    need(config.weight_decay >= 0, f"--weight-decay must be >= 0, got {config.weight_decay!r}")
    need(config.dice_weight >= 0 and config.bce_weight >= 0 and config.dice_weight + config.bce_weight > 0,
         "--dice-weight and --bce-weight must be >= 0 and not both 0")
    need(config.device in DEVICE_CHOICES, f"--device must be one of {DEVICE_CHOICES}, got {config.device!r}")
    need(config.amp in AMP_CHOICES, f"--amp must be one of {AMP_CHOICES}, got {config.amp!r}")
    need(isinstance(config.folds, int) and config.folds >= 1, f"--folds must be >= 1, got {config.folds!r}")
    if config.fold == "all":
        need(config.folds >= 2, "--fold all needs --folds K with K >= 2")
    else:
        need(isinstance(config.fold, int) and 0 <= config.fold < max(config.folds, 1),
             f"--fold must be 'all' or an integer in [0, {config.folds - 1}] for --folds {config.folds}, "
             f"got {config.fold!r}")
    need(config.folds == 1 or config.val_split is None,
         "--val-split and --folds K > 1 both choose the validation set; give only one")
    need(isinstance(config.val_every, int) and config.val_every >= 1,
         f"--val-every must be >= 1, got {config.val_every!r}")
    need(config.time_limit is None or config.time_limit > 0,
         f"--time-limit must be > 0 minutes, got {config.time_limit!r}")
    from cares.optim import OPTIMIZER_NAMES, SCHEDULER_NAMES, default_milestones
    need(config.optimizer in OPTIMIZER_NAMES, f"--optimizer must be one of {OPTIMIZER_NAMES}, got {config.optimizer!r}")
    need(config.scheduler in SCHEDULER_NAMES, f"--scheduler must be one of {SCHEDULER_NAMES}, got {config.scheduler!r}")
    need(0 <= config.warmup_epochs < config.epochs,
         f"--warmup-epochs must be in [0, --epochs {config.epochs}), got {config.warmup_epochs}")
    need(config.milestones is None or (all(m >= 1 for m in config.milestones)
                                       and config.milestones == sorted(config.milestones)),
         f"--milestones must be non-decreasing epochs >= 1, got {config.milestones}")
    if config.scheduler == "multistep":
        milestones = default_milestones(config.epochs) if config.milestones is None else config.milestones
        # The rate of 0-based epoch e drops at the milestones <= e, so only milestones < --epochs act.
        need(any(milestone < config.epochs for milestone in milestones),
             f"--scheduler multistep: no milestone in {list(milestones)}"
             + (" (the default, --epochs x 30/60 and x 50/60)" if config.milestones is None else "")
             + f" comes before the end of --epochs {config.epochs}, so the rate would never drop; give "
               f"--milestones below {config.epochs} or --scheduler constant")
    need(isinstance(config.model_options, dict), f"model_options must be a mapping, got {config.model_options!r}")
    _validate_model(config)
    if config.pseudo is not None:
        need(os.path.isdir(config.pseudo), f"--pseudo folder {config.pseudo!r} does not exist")
    if config.init_from is not None:
        need(os.path.isfile(config.init_from), f"--init-from checkpoint {config.init_from!r} does not exist")


def _validate_model(config: TrainConfig) -> None:
    """--model and --model-option name a model and options it takes (checked before anything is written)."""
    from cares.models import model_options, parse_model_spec
    if not isinstance(config.model, str):
        raise ValueError(f"--model must be a model name, got {config.model!r}")
    try:
        name, bracket_options = parse_model_spec(config.model)
    except ValueError as err:
        raise ValueError(f"--model: {err}") from None
    allowed = model_options(name)
    unknown = sorted((set(config.model_options) | set(bracket_options)) - set(allowed))
    if unknown:
        raise ValueError(f"--model-option {', '.join(unknown)}: model {name!r} takes "
                         f"{', '.join(allowed) if allowed else 'no options'}")
    # Built on the meta device (no memory, no work), so every check of the model's own (its options'
    # values, the sizes it takes) happens here, before anything is written.
    model = build_configured_model(config, device="meta")
    if hasattr(model, "check_size"):
        model.check_size(config.image_size, config.image_size, what=f"--image-size {config.image_size}")


def build_configured_model(config: TrainConfig, device=None):
    """The model `config` trains (on `device`, default torch's), with a bad option value as a ValueError
    naming the flags."""
    import contextlib

    import torch

    from cares.models import build_model
    try:
        with torch.device(device) if device is not None else contextlib.nullcontext():
            return build_model(config.model, in_channels=1, num_classes=1, **config.model_options)
    except (TypeError, ValueError) as err:  # e.g. upsampler=nosuch: a setting error, not a crash
        raise ValueError(f"--model {config.model} --model-option {config.model_options}: {err}") from None
