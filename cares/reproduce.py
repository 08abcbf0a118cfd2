"""`cares reproduce`: the paper's Table 1 as one resumable experiment.

An experiment (a preset in cares/presets/NAME.yaml, or --config FILE.yaml) is a list of runs; a run
is a model, its options and seeds, supervised or semi-supervised. For each run and seed:

    supervised   train (fixed epochs)  ->  evaluate last.pt on the test split
    semi         the supervised model of the same model, options and seed (reused from a supervised
                 run of the experiment when one matches, else trained here)  ->  pseudo-label the
                 unlabeled split (the paper's entropy filter)  ->  train on labelled + pseudo-labelled
                 slices, starting from the supervised weights  ->  evaluate

Model selection never looks at the test split: every run trains for the preset's fixed number of
epochs and its last weights are evaluated (the epoch counts were chosen before any test score was
seen). Evaluation reports both protocols of `cares evaluate` (Inf-Net toolbox and threshold 0.5).

Folder layout under --out:
    <run>/seed_<s>/train/          the `cares train` run folder (checkpoints, log.csv, curve)
    <run>/seed_<s>/supervised/     semi runs only, when no supervised run of the experiment matches
    <run>/seed_<s>/pseudo/         semi runs only: `cares pseudo-label` output
    <run>/seed_<s>/eval/           `cares evaluate` output (metrics.json, metrics.md, figures)
    <step folder>/done.json        written last by each finished step, with its wall time
    experiment.json                every setting of the experiment as run;  command.txt  the command line
    table1.md, table1.json         mean +- std over seeds per run and protocol, the paper's numbers
                                   beside them, wall time per run, commit, torch and machine
    qualitative.png                the models side by side on the same test slices
    loss_curves.png                training loss per epoch of every run

Resuming: every step is skipped when its done.json exists, and a killed training resumes from its
last.pt, so rerunning the same command after a kill continues where it stopped. experiment.json
records the whole experiment (the data, the experiment file, and every setting of every step, defaults
included); a rerun into an --out that holds a different experiment is refused, so no step of one
experiment is ever reported under another's name. (Refusing, rather than rerunning the changed steps:
a changed shared setting changes every step anyway, and a refusal never deletes finished work.) An
experiment file that only adds runs or seeds is the same experiment continued: its recorded steps are
unchanged, so they are kept and only the new ones run. The table and figures
are rewritten after every finished run, so partial results are readable while it runs.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

HELP = ("Reproduce the paper's Table 1: train, (pseudo-label and retrain,) and evaluate every run of an "
        "experiment for each seed, then write table1.md/json (mean +- std over seeds under both protocols, "
        "the paper's numbers beside them), a qualitative figure and loss curves. Presets: "
        "paper (a GPU, the paper's settings), h200 (one H200 in minutes), cpu (a 2-core CPU in <= 90 minutes), "
        "tiny (a smoke test). Rerun the same command to continue after an interruption; an --out that holds "
        "a different experiment (another preset, data or any setting) is refused.")

PRESET_DIR = Path(__file__).resolve().parent / "presets"

# Table 1 of Xu et al., "CARes-UNet", Med Phys 2021 (COVID-SemiSeg test split, 48 slices, Inf-Net
# toolbox protocol); the Inf-Net rows are from Fan et al., IEEE TMI 2020, as that table quotes them.
PAPER_TABLE1: dict[str, dict[str, float]] = {
    "U-Net": {"dice": .639, "sensitivity": .641, "specificity": .943, "s_measure": .675, "e_measure": .865,
              "mae": .0890},
    "UNet-ResNet34": {"dice": .652, "sensitivity": .623, "specificity": .954, "s_measure": .677,
                      "e_measure": .873, "mae": .0860},
    "Inf-Net": {"dice": .682, "sensitivity": .692, "specificity": .943, "s_measure": .781, "e_measure": .838,
                "mae": .082},
    "Semi-Inf-Net": {"dice": .739, "sensitivity": .725, "specificity": .960, "s_measure": .800,
                     "e_measure": .894, "mae": .064},
    "CARes-UNet": {"dice": .731, "sensitivity": .738, "specificity": .955, "s_measure": .746, "e_measure": .913,
                   "mae": .0694},
    "Semi-CARes-UNet": {"dice": .776, "sensitivity": .786, "specificity": .961, "s_measure": .789,
                        "e_measure": .931, "mae": .0561},
}
METRICS = ("dice", "sensitivity", "specificity", "s_measure", "e_measure", "mae")
METRIC_TITLES = {"dice": "Dice", "sensitivity": "Sen", "specificity": "Spe", "s_measure": "S-alpha",
                 "e_measure": "E-mean", "mae": "MAE"}
PROTOCOL_TITLES = {"infnet": "Inf-Net toolbox protocol (the paper's)", "threshold": "threshold 0.5"}
# What the command writes into --out itself, besides one folder per run (see cares.runtime.claim_output).
OWNER = "cares reproduce"
OUTPUT_ENTRIES = ("experiment.json", "command.txt", "table1.md", "table1.json", "qualitative.png", "loss_curves.png")
EXPERIMENT_FORMAT = "cares-experiment"
# Relative cost of one image in inference vs one training step (forward + backward + update), for the ETA.
INFERENCE_COST = 1 / 3


# --------------------------------------------------------------------------------------------------
# The experiment
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RunSpec:
    name: str                             # folder name, letters/digits/_/-
    label: str                            # the table's row title
    model: str
    model_options: dict[str, Any] = field(default_factory=dict)
    seeds: tuple[int, ...] = (0,)
    semi: bool = False
    paper: str | None = None              # key of PAPER_TABLE1 to print beside it
    train: dict[str, Any] = field(default_factory=dict)   # TrainConfig overrides for this run
    # Semi runs only: overrides of the experiment's semi_train and pseudo_label settings for this run, and
    # where the semi training starts: "supervised" (the supervised model's weights) or "scratch".
    semi_train: dict[str, Any] = field(default_factory=dict)
    pseudo_label: dict[str, Any] = field(default_factory=dict)
    semi_from: str = "supervised"


@dataclass(frozen=True)
class Comparison:
    """A claim the table tests: row `better` scores higher than row `than` (paired over seeds and images)."""
    better: str                           # run name
    than: str                             # run name
    claim: str                            # what it tests, in words


@dataclass(frozen=True)
class Experiment:
    name: str
    description: str
    train: dict[str, Any]                 # TrainConfig settings shared by every training
    semi_train: dict[str, Any]            # overrides for the semi-supervised training stage
    pseudo_label: dict[str, Any]          # entropy_threshold, log_base, batch_size, amp
    evaluate: dict[str, Any]              # batch_size, tta, amp
    figure_slices: int
    runs: tuple[RunSpec, ...]
    comparisons: tuple[Comparison, ...] = ()


    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_EXPERIMENT_KEYS = {"name", "description", "train", "semi_train", "pseudo_label", "evaluate", "figure_slices", "runs",
                    "comparisons"}
_COMPARISON_KEYS = {f.name for f in dataclasses.fields(Comparison)}
_RUN_KEYS = {f.name for f in dataclasses.fields(RunSpec)}
_PSEUDO_KEYS = {"entropy_threshold", "log_base", "batch_size", "amp", "split", "score", "keep_fraction", "empty",
                "border", "shape_prior", "tta"}
# Where a semi run's training starts: the supervised model's weights, or a fresh initialisation.
SEMI_STARTS = ("supervised", "scratch")
_EVALUATE_KEYS = {"batch_size", "tta", "amp"}
# Settings the experiment decides itself, per step; a preset may not set them.
_MANAGED_TRAIN_KEYS = {"data", "out", "resume", "seed", "model", "model_options", "pseudo", "init_from", "config"}


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_experiment(preset: str | None = None, config_file: str | None = None) -> Experiment:
    """Read a preset by name or an experiment YAML file and check every setting before any work."""
    import yaml
    if (preset is None) == (config_file is None):
        raise ValueError("give exactly one of --preset NAME and --config FILE.yaml")
    if preset is not None:
        path = PRESET_DIR / f"{preset}.yaml"
        if not path.is_file():
            raise ValueError(f"--preset {preset!r} does not exist; presets: {', '.join(preset_names())}")
    else:
        path = Path(config_file)
        if not path.is_file():
            raise ValueError(f"--config file {str(path)!r} does not exist")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML: {err}") from None
    return experiment_from_dict(values, source=str(path))


def experiment_from_dict(values: Any, source: str = "experiment") -> Experiment:
    from cares.config import FIELD_NAMES
    from cares.models import parse_model_spec  # noqa: F401  (imported to fail early if models are broken)

    def need(ok, message):
        if not ok:
            raise ValueError(f"{source}: {message}")

    need(isinstance(values, dict), f"must hold a mapping, got {type(values).__name__}")
    unknown = set(values) - _EXPERIMENT_KEYS
    need(not unknown, f"unknown key(s) {sorted(unknown)}; known: {sorted(_EXPERIMENT_KEYS)}")
    for key in ("train", "semi_train", "pseudo_label", "evaluate"):
        need(isinstance(values.get(key, {}), dict), f"{key} must be a mapping")
    for key in ("train", "semi_train"):
        settings = values.get(key, {})
        need(not set(settings) - set(FIELD_NAMES), f"{key}: unknown training setting(s) "
                                                   f"{sorted(set(settings) - set(FIELD_NAMES))}")
        need(not set(settings) & _MANAGED_TRAIN_KEYS, f"{key}: {sorted(set(settings) & _MANAGED_TRAIN_KEYS)} "
                                                      "are set per run by the experiment, not in a preset")
    need(not set(values.get("pseudo_label", {})) - _PSEUDO_KEYS,
         f"pseudo_label: unknown key(s) {sorted(set(values.get('pseudo_label', {})) - _PSEUDO_KEYS)}")
    need(not set(values.get("evaluate", {})) - _EVALUATE_KEYS,
         f"evaluate: unknown key(s) {sorted(set(values.get('evaluate', {})) - _EVALUATE_KEYS)}")
    runs = values.get("runs")
    need(isinstance(runs, list) and runs, "runs must be a non-empty list")
    specs, names = [], set()
    for index, run in enumerate(runs):
        need(isinstance(run, dict), f"runs[{index}] must be a mapping")
        unknown = set(run) - _RUN_KEYS
        need(not unknown, f"runs[{index}]: unknown key(s) {sorted(unknown)}; known: {sorted(_RUN_KEYS)}")
        need(isinstance(run.get("name"), str) and run["name"].replace("_", "").replace("-", "").isalnum(),
             f"runs[{index}].name must be letters, digits, '_' or '-', got {run.get('name')!r}")
        need(run["name"] not in names, f"two runs are named {run['name']!r}")
        names.add(run["name"])
        need(isinstance(run.get("model"), str), f"runs[{index}].model must be a model name")
        seeds = run.get("seeds", [0])
        need(isinstance(seeds, list) and seeds and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                                       for s in seeds) and len(set(seeds)) == len(seeds),
             f"runs[{index}].seeds must be a list of distinct ints >= 0, got {seeds!r}")
        need(run.get("paper") is None or run["paper"] in PAPER_TABLE1,
             f"runs[{index}].paper must be one of {sorted(PAPER_TABLE1)}, got {run.get('paper')!r}")
        for key in ("train", "semi_train"):
            settings = run.get(key, {})
            need(isinstance(settings, dict) and not set(settings) - set(FIELD_NAMES)
                 and not set(settings) & _MANAGED_TRAIN_KEYS,
                 f"runs[{index}].{key} must map training settings other than {sorted(_MANAGED_TRAIN_KEYS)}")
        pseudo = run.get("pseudo_label", {})
        need(isinstance(pseudo, dict) and not set(pseudo) - _PSEUDO_KEYS,
             f"runs[{index}].pseudo_label must map pseudo-label settings {sorted(_PSEUDO_KEYS)}")
        semi = bool(run.get("semi", False))
        need(semi or not (run.get("semi_train") or pseudo or run.get("semi_from", "supervised") != "supervised"),
             f"runs[{index}]: semi_train, pseudo_label and semi_from apply to semi runs only (semi: true)")
        need(run.get("semi_from", "supervised") in SEMI_STARTS,
             f"runs[{index}].semi_from must be one of {list(SEMI_STARTS)}, got {run.get('semi_from')!r}")
        specs.append(RunSpec(name=run["name"], label=str(run.get("label", run["name"])), model=run["model"],
                             model_options=dict(run.get("model_options") or {}), seeds=tuple(seeds),
                             semi=semi, paper=run.get("paper"), train=dict(run.get("train", {})),
                             semi_train=dict(run.get("semi_train", {})), pseudo_label=dict(pseudo),
                             semi_from=run.get("semi_from", "supervised")))
    figure_slices = values.get("figure_slices", 4)
    need(isinstance(figure_slices, int) and figure_slices >= 0, "figure_slices must be an int >= 0")
    comparisons = values.get("comparisons", [])
    need(isinstance(comparisons, list), "comparisons must be a list")
    by_name = {spec.name: spec for spec in specs}
    for index, item in enumerate(comparisons):
        need(isinstance(item, dict) and set(item) == _COMPARISON_KEYS,
             f"comparisons[{index}] must map exactly {sorted(_COMPARISON_KEYS)}, got {item!r}")
        for key in ("better", "than"):
            need(item[key] in by_name, f"comparisons[{index}].{key} must name a run ({sorted(by_name)}), "
                                       f"got {item[key]!r}")
        need(item["better"] != item["than"], f"comparisons[{index}] compares {item['better']!r} with itself")
        need(set(by_name[item["better"]].seeds) & set(by_name[item["than"]].seeds),
             f"comparisons[{index}]: runs {item['better']!r} and {item['than']!r} share no seed, so they "
             "cannot be paired")
    experiment = Experiment(name=str(values.get("name", Path(source).stem)),
                            description=str(values.get("description", "")),
                            train=dict(values.get("train", {})), semi_train=dict(values.get("semi_train", {})),
                            pseudo_label=dict(values.get("pseudo_label", {})),
                            evaluate=dict(values.get("evaluate", {})), figure_slices=figure_slices,
                            runs=tuple(specs), comparisons=tuple(Comparison(**item) for item in comparisons))
    # Every training configuration must resolve (models, options, values) before anything runs.
    for spec in experiment.runs:
        from cares.models import build_model
        try:
            build_model(spec.model, in_channels=1, num_classes=1, **spec.model_options)
        except (TypeError, ValueError, KeyError) as err:
            raise ValueError(f"{source}: run {spec.name!r}: {err}") from None
        train_settings(experiment, spec, seed=spec.seeds[0], data="synthetic", out="unused")
        if spec.semi:
            train_settings(experiment, spec, seed=spec.seeds[0], data="synthetic", out="unused", semi=True)
    return experiment


def train_settings(experiment: Experiment, spec: RunSpec, *, seed: int, data: str, out: str,
                   semi: bool = False, pseudo: str | None = None, init_from: str | None = None):
    """The TrainConfig of one training step (validated)."""
    from cares.config import resolve_config
    values = {**experiment.train, **spec.train, **({**experiment.semi_train, **spec.semi_train} if semi else {}),
              "data": data, "out": out, "seed": seed, "model": spec.model,
              "model_options": dict(spec.model_options), "resume": False}
    # The experiment's settings are the whole truth: resolved with resume off, so a run folder's saved
    # config.yaml (say, from a copy of committed results without checkpoints) is never merged in.
    # pseudo and init_from are set afterwards: the earlier steps that write them have not run yet.
    config = resolve_config(values)
    return dataclasses.replace(config, resume=True, pseudo=pseudo, init_from=init_from)


# --------------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------------

@dataclass
class Step:
    kind: str                       # "train", "pseudo-label" or "evaluate"
    folder: Path                    # the step's output folder (holds done.json when finished)
    work: float                     # estimated cost in training-image units, for the ETA
    action: Callable[["Progress"], dict[str, Any]]
    description: str
    settings: dict[str, Any] = field(default_factory=dict)   # every setting of the step (experiment.json)

    @property
    def done_path(self) -> Path:
        return self.folder / "done.json"

    def is_done(self) -> bool:
        return self.done_path.is_file()


class Progress:
    """The experiment's overall progress line: steps done, elapsed time and an ETA from the work left.

    Work is counted in training-image passes (an inference image counts INFERENCE_COST); the ETA is
    the rate measured in this process so far applied to the work left, so it assumes every image costs
    the same whatever the model (models of one experiment differ by a small factor)."""

    def __init__(self, total_work: float, done_work: float, stream=sys.stderr):
        self.total, self.done, self.stream = total_work, done_work, stream
        self.started = time.monotonic()
        self.done_here = 0.0

    def advance(self, work: float, what: str) -> None:
        self.done += work
        self.done_here += work
        elapsed = time.monotonic() - self.started
        left = max(self.total - self.done, 0.0)
        eta = _duration(left * elapsed / self.done_here) if self.done_here > 0 else "?"
        print(f"[reproduce {100 * self.done / max(self.total, 1e-9):5.1f}%] {what}; elapsed {_duration(elapsed)}, "
              f"ETA {eta}", file=self.stream, flush=True)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def _write_json(path: Path, value: Any) -> None:
    from cares.runtime import atomic_write_bytes
    atomic_write_bytes(path, (json.dumps(value, indent=2) + "\n").encode())


def _dataset_size(data: str, split: str) -> int:
    from cares.data import build_dataset
    return len(build_dataset(data, split=split, image_size=None, labeled=False))


def _supervised_source(experiment: Experiment, spec: RunSpec) -> RunSpec | None:
    """The experiment's supervised run that trains exactly what a semi run starts from, if any."""
    for other in experiment.runs:
        if (not other.semi and other.model == spec.model and other.model_options == spec.model_options
                and other.train == spec.train):
            return other
    return None


def plan_steps(experiment: Experiment, data: str, out: Path) -> list[tuple[RunSpec, int, list[Step]]]:
    """Every (run, seed) with its steps in order; steps shared between runs appear once."""
    from cares.evaluate import evaluate
    from cares.pseudo_label import pseudo_label
    from cares.train import train

    sizes = {split: _dataset_size(data, split) for split in ("train", "test")}
    planned: dict[Path, Step] = {}

    def relative(path) -> str | None:
        """A path inside --out as recorded in experiment.json: relative, so --out may be spelt either way."""
        return None if path is None else str(Path(path).relative_to(out))

    def train_step(config, semi: bool) -> Step:
        folder = Path(config.out)
        if folder in planned:
            return planned[folder]
        per_epoch = sizes["train"] * (2 if semi else 1)   # semi: as many pseudo-labelled as labelled per epoch

        def action(progress: Progress) -> dict[str, Any]:
            def epoch_done(row):
                progress.advance(per_epoch, f"{folder} epoch {row['epoch']}/{config.epochs} loss "
                                            f"{row['train_loss']:.4f}")
            started = time.monotonic()
            result = train(config, on_epoch_end=epoch_done)
            return {"epochs": result.epochs_done, "train_seconds": sum(r["seconds"] for r in result.history),
                    "seconds_this_attempt": time.monotonic() - started}

        settings = {**config.to_dict(), "out": None, "pseudo": relative(config.pseudo),
                    "init_from": relative(config.init_from)}
        step = Step("train", folder, per_epoch * config.epochs, action, f"train {folder}", settings)
        planned[folder] = step
        return step

    def evaluate_step(checkpoint: Path, folder: Path) -> Step:
        def action(progress: Progress) -> dict[str, Any]:
            started = time.monotonic()
            evaluate(checkpoint, data, "test", folder, figures=0, **experiment.evaluate)
            progress.advance(sizes["test"] * INFERENCE_COST, f"evaluated {checkpoint}")
            return {"seconds": time.monotonic() - started}
        return Step("evaluate", folder, sizes["test"] * INFERENCE_COST, action, f"evaluate {checkpoint}",
                    {"checkpoint": relative(checkpoint), "split": "test", **experiment.evaluate})

    def pseudo_step(spec: RunSpec, checkpoint: Path, folder: Path) -> Step:
        settings = {"amp": "off", **experiment.pseudo_label, **spec.pseudo_label}
        split = settings.get("split", "unlabeled")
        if split not in sizes:
            sizes[split] = _dataset_size(data, split)

        def action(progress: Progress) -> dict[str, Any]:
            started = time.monotonic()
            summary = pseudo_label(checkpoint, data, folder, overwrite=True, **settings)
            progress.advance(sizes[split] * INFERENCE_COST,
                             f"pseudo-labelled: kept {summary['kept']} of {summary['total']}")
            return {"seconds": time.monotonic() - started, "kept": summary["kept"], "total": summary["total"]}
        return Step("pseudo-label", folder, sizes[split] * INFERENCE_COST, action, f"pseudo-label into {folder}",
                    {"checkpoint": relative(checkpoint), **settings})

    plan = []
    for spec in experiment.runs:
        for seed in spec.seeds:
            seed_dir = out / spec.name / f"seed_{seed}"
            steps = []
            if spec.semi:
                source = _supervised_source(experiment, spec)
                supervised_dir = (out / source.name / f"seed_{seed}" / "train") if source else seed_dir / "supervised"
                supervised = train_settings(experiment, spec, seed=seed, data=data, out=str(supervised_dir))
                steps.append(train_step(supervised, semi=False))
                steps.append(pseudo_step(spec, supervised_dir / "last.pt", seed_dir / "pseudo"))
                start = str(supervised_dir / "last.pt") if spec.semi_from == "supervised" else None
                semi = train_settings(experiment, spec, seed=seed, data=data, out=str(seed_dir / "train"), semi=True,
                                      pseudo=str(seed_dir / "pseudo"), init_from=start)
                steps.append(train_step(semi, semi=True))
            else:
                steps.append(train_step(train_settings(experiment, spec, seed=seed, data=data,
                                                       out=str(seed_dir / "train")), semi=False))
            steps.append(evaluate_step(seed_dir / "train" / "last.pt", seed_dir / "eval"))
            plan.append((spec, seed, steps))
    return plan


# --------------------------------------------------------------------------------------------------
# Running it
# --------------------------------------------------------------------------------------------------

def reproduce(experiment: Experiment, data: str, out, *, command: str | None = None,
              stop_after_steps: int | None = None, jobs: int = 1, threads: int | None = None) -> dict[str, Any]:
    """Run every step not yet done, then write the table and figures; returns table1.json's content.

    jobs: steps run at once, each in a process of its own with `threads` torch threads (default: the
        usable CPUs shared out); 1 runs them here, one after the other.
    stop_after_steps: return after running that many steps (tests use it to interrupt a run; jobs=1).
    """
    from cares.runtime import claim_output
    out = Path(out)
    plan = plan_steps(experiment, data, out)
    # Finished steps are reused only by the same experiment: --out records every setting of every step,
    # and a different experiment there is refused (not merged, not rerun step by step).
    claim = claim_output(out, OWNER, OUTPUT_ENTRIES + tuple(spec.name for spec in experiment.runs), mode="update",
                         inputs=[("--data", data)])
    record = experiment_record(experiment, data, out, plan)
    saved_path = out / "experiment.json"
    if saved_path.is_file():
        check_same_experiment(saved_path, record)
    claim.take()
    _write_json(saved_path, record)
    if command is not None:
        (out / "command.txt").write_text(command + "\n")
    unique = list({id(step): step for _, _, steps in plan for step in steps}.values())
    progress = Progress(sum(s.work for s in unique), sum(s.work for s in unique if s.is_done()))
    print(f"reproduce {experiment.name}: {len(plan)} runs, {len(unique)} steps, "
          f"{sum(s.is_done() for s in unique)} already done; writing into {out}"
          + (f"; {jobs} at a time" if jobs > 1 else ""), file=sys.stderr, flush=True)
    if jobs > 1:
        _run_in_parallel(plan, data, out, progress, jobs, threads,
                         on_run_done=lambda: write_report(experiment, data, out, plan))
        return write_report(experiment, data, out, plan)
    ran = 0
    for spec, seed, steps in plan:
        for step in steps:
            if step.is_done():
                continue
            if stop_after_steps is not None and ran >= stop_after_steps:
                return write_report(experiment, data, out, plan)
            print(f"[reproduce] {spec.label} seed {seed}: {step.description}", file=sys.stderr, flush=True)
            _run_step(step, progress)
            ran += 1
        write_report(experiment, data, out, plan)
    return write_report(experiment, data, out, plan)


def _run_step(step: Step, progress: Progress) -> None:
    from cares.runtime import claim_output
    record = step.action(progress)
    claim_output(step.folder, OWNER, ("done.json",), mode="update").take()
    _write_json(step.done_path, {"step": step.kind, **record})


def _predecessors(plan) -> dict[Path, set[Path]]:
    """Each step's folder -> the folders of the steps that must be done first (its chains' earlier steps)."""
    before: dict[Path, set[Path]] = {}
    for _, _, steps in plan:
        for index, step in enumerate(steps):
            before.setdefault(step.folder, set()).update(s.folder for s in steps[:index])
    return before


class StepFailed(RuntimeError):
    """A step run in a process of its own exited with an error."""


def _run_in_parallel(plan, data: str, out: Path, progress: Progress, jobs: int, threads: int | None,
                     on_run_done: Callable[[], Any] | None = None) -> None:
    """Run the plan's unfinished steps, up to `jobs` at once, each as `cares reproduce --run-step` in a process
    of its own, a step starting once the steps before it in its chains are done. Each process reads the
    experiment from out/experiment.json and writes its step's done.json, as a serial run does, so a rerun
    continues whatever an interrupted parallel run left. A failed step lets the running ones finish and then
    raises StepFailed naming its log. on_run_done is called each time a (run, seed)'s last step finishes."""
    import subprocess
    steps = {step.folder: step for _, _, chain in plan for step in chain}
    order = list(steps)                                  # the plan's order: supervised runs come first
    before = _predecessors(plan)
    last_steps = {chain[-1].folder for _, _, chain in plan}
    threads = threads or max(1, (os.cpu_count() or 1) // jobs)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    running: dict[Path, tuple[subprocess.Popen, Path]] = {}
    failed: list[str] = []
    while True:
        ready = [folder for folder in order if not steps[folder].is_done() and folder not in running
                 and all(steps[b].is_done() for b in before[folder])]
        while ready and len(running) < jobs and not failed:
            folder = ready.pop(0)
            log = folder.parent / f"{folder.name}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            command = [sys.executable, "-m", "cares", "reproduce", "--out", str(out), "--data", str(data),
                       "--threads", str(threads), "--run-step", str(folder)]
            with open(log, "ab") as stream:
                process = subprocess.Popen(command, stdout=stream, stderr=subprocess.STDOUT, env=env,
                                           preexec_fn=_die_with_parent)
            running[folder] = (process, log)
            print(f"[reproduce] started {steps[folder].description} ({len(running)} of {jobs} running; log {log})",
                  file=sys.stderr, flush=True)
        if not running:
            break
        time.sleep(0.2)
        for folder, (process, log) in list(running.items()):
            if process.poll() is None:
                continue
            del running[folder]
            if process.returncode == 0 and steps[folder].is_done():
                progress.advance(steps[folder].work, f"done: {steps[folder].description}")
                if on_run_done is not None and folder in last_steps:
                    on_run_done()
            else:
                failed.append(f"{steps[folder].description} (exit {process.returncode}; see {log})")
    if failed:
        raise StepFailed("step(s) failed: " + "; ".join(failed) + "; rerun the command to continue")


def _die_with_parent() -> None:
    """In a step's process (Linux): end it when `cares reproduce` dies, so a killed parent leaves no orphan
    holding a run folder's lock; its last checkpoint stays for the rerun to resume."""
    try:
        import ctypes
        import signal
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def run_single_step(out: Path, data: str, folder: Path) -> None:
    """`--run-step`: one step of the experiment recorded in out/experiment.json (the parallel runner's child)."""
    saved_path = out / "experiment.json"
    saved = json.loads(saved_path.read_text())
    experiment = experiment_from_dict(saved.get("experiment") if isinstance(saved, dict) else None,
                                      source=str(saved_path))
    plan = plan_steps(experiment, data, out)
    check_same_experiment(saved_path, experiment_record(experiment, data, out, plan))
    steps = {step.folder: step for _, _, chain in plan for step in chain}
    folder = Path(folder)
    if folder not in steps:
        raise ValueError(f"--run-step {str(folder)!r} is not a step of the experiment in {out}")
    unfinished = [str(b) for b in _predecessors(plan)[folder] if not steps[b].is_done()]
    if unfinished:
        raise ValueError(f"--run-step {str(folder)!r}: the steps before it are not done: {unfinished}")
    if not steps[folder].is_done():
        _run_step(steps[folder], Progress(steps[folder].work, 0.0))


def experiment_record(experiment: Experiment, data: str, out: Path, plan) -> dict[str, Any]:
    """experiment.json: the experiment, the data, and every setting of every step (the resolved
    training configs with their defaults, so a changed default is a changed experiment too)."""
    steps = {}
    for _, _, run_steps in plan:
        for step in run_steps:
            steps[str(step.folder.relative_to(out))] = {"step": step.kind, **step.settings}
    record = {"format": EXPERIMENT_FORMAT, "version": 1, "data": str(data), "experiment": experiment.to_dict(),
              "steps": steps}
    return json.loads(json.dumps(record))   # as read back from the file (tuples become lists)


def check_same_experiment(path: Path, record: dict[str, Any]) -> None:
    """Raise ValueError, naming the first differences, when `path` records another experiment.

    The same experiment means the same data and, for every step recorded there, the same step with the
    same settings (each step's settings are all that decide its result). Steps may be added (a run, or a
    seed, appended to the experiment file: the finished steps stay valid), never changed or dropped."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{str(path)!r} cannot be read ({err}); choose another --out") from None
    if not isinstance(saved, dict) or saved.get("format") != EXPERIMENT_FORMAT:
        raise ValueError(f"{str(path)!r} does not record a whole experiment (written by an older cares reproduce?), "
                         "so its finished steps cannot be checked against this one: choose another --out")
    old = _flatten({"data": saved.get("data"), "steps": saved.get("steps")})
    new = _flatten({"data": record["data"], "steps": {key: record["steps"].get(key, "(absent)")
                                                      for key in saved.get("steps") or {}}})
    if old == new:
        return
    changed = [key for key in sorted(set(old) | set(new)) if old.get(key, "(absent)") != new.get(key, "(absent)")]
    shown = "; ".join(f"{key}: {old.get(key, '(absent)')!r} there, {new.get(key, '(absent)')!r} now"
                      for key in changed[:4])
    more = f" (and {len(changed) - 4} more)" if len(changed) > 4 else ""
    raise ValueError(f"--out {str(path.parent)!r} holds another experiment ({shown}{more}); its finished steps "
                     "are not reused for a different one: rerun with the same settings to continue it (runs may "
                     "be added), or choose another --out")


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        flat = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: value}


def _run_record(out: Path, spec: RunSpec, seed: int, steps: list[Step]) -> dict[str, Any] | None:
    """The evaluated metrics and wall time of one (run, seed), or None while it is unfinished."""
    if not all(step.is_done() for step in steps):
        return None
    metrics = json.loads((out / spec.name / f"seed_{seed}" / "eval" / "metrics.json").read_text())
    seconds = 0.0
    for step in steps:
        done = json.loads(step.done_path.read_text())
        seconds += done.get("train_seconds", done.get("seconds", 0.0))
    return {"seed": seed, "protocols": metrics["protocols"], "wall_seconds": seconds}


def write_report(experiment: Experiment, data: str, out: Path, plan) -> dict[str, Any]:
    """table1.json, table1.md, loss_curves.png and qualitative.png from the finished runs."""
    from carafe_kernels.provenance import machine_info
    from cares.inference import model_spec

    rows = []
    for spec in experiment.runs:
        seeds = [_run_record(out, spec, seed, steps) for s, seed, steps in plan if s is spec]
        finished = [r for r in seeds if r is not None]
        row = {"run": spec.name, "label": spec.label, "model": model_spec(spec.model, spec.model_options),
               "semi": spec.semi, "seeds": list(spec.seeds), "finished_seeds": [r["seed"] for r in finished],
               "paper": PAPER_TABLE1.get(spec.paper) if spec.paper else None, "per_seed": finished,
               "protocols": {}}
        for protocol in PROTOCOL_TITLES:
            if finished:
                row["protocols"][protocol] = {
                    metric: _mean_std([r["protocols"][protocol][f"{metric}_mean"] for r in finished])
                    for metric in METRICS}
        rows.append(row)
    table = {"experiment": experiment.name, "description": experiment.description, "data": str(data),
             "command": (out / "command.txt").read_text().strip() if (out / "command.txt").is_file() else None,
             "environment": machine_info(), "rows": rows,
             "model_selection": "fixed epochs; the last epoch's weights are evaluated (the test split is "
                                "never used to choose anything)",
             "std": "population std over seeds (0 for one seed); each seed's score is the mean over the test images",
             "comparisons": _paired_comparisons(experiment, out, plan)}
    _write_json(out / "table1.json", table)
    (out / "table1.md").write_text(table_markdown(table))
    _loss_curves(out, plan)
    if experiment.figure_slices:
        _comparison(experiment, data, out, plan)
    return table


def _per_image_scores(out: Path, spec: RunSpec, plan, protocol: str, metric: str) -> dict[int, dict[str, float]]:
    """{seed: {test image: score}} for the finished seeds of one row."""
    scores = {}
    for s, seed, steps in plan:
        if s is spec and all(step.is_done() for step in steps):
            metrics = json.loads((out / spec.name / f"seed_{seed}" / "eval" / "metrics.json").read_text())
            scores[seed] = {row["name"]: row[protocol][metric] for row in metrics["per_image"]}
    return scores


def _paired_comparisons(experiment: Experiment, out: Path, plan) -> list[dict[str, Any]]:
    """Each claim of the experiment as a paired Dice difference over the shared seeds and the test images, with
    a two-level bootstrap interval (cares.statistics), under both protocols; pending while a side is unfinished."""
    from cares.statistics import paired_difference, paired_runs
    specs = {spec.name: spec for spec in experiment.runs}
    results = []
    for comparison in experiment.comparisons:
        entry = {"better": comparison.better, "than": comparison.than, "claim": comparison.claim,
                 "metric": "dice", "protocols": {}}
        for protocol in PROTOCOL_TITLES:
            better = _per_image_scores(out, specs[comparison.better], plan, protocol, "dice")
            than = _per_image_scores(out, specs[comparison.than], plan, protocol, "dice")
            if not set(better) & set(than):
                entry["protocols"][protocol] = None                 # no finished pair of runs yet
                continue
            seeds, images, a, b = paired_runs(better, than)
            entry["protocols"][protocol] = {"seeds": seeds, **paired_difference(a, b)}
        results.append(entry)
    return results


def _mean_std(values: list[float]) -> dict[str, float]:
    mean = sum(values) / len(values)
    return {"mean": mean, "std": math.sqrt(sum((v - mean) ** 2 for v in values) / len(values)), "n": len(values)}


def table_markdown(table: dict[str, Any]) -> str:
    environment = table["environment"]
    git = environment.get("git") or {}
    lines = [f"# Table 1 reproduction: `{table['experiment']}`", "", table["description"].strip(), "",
             f"Data: `{table['data']}`, test split. Mean +- std over seeds (each seed: the mean over test images).",
             f"Model selection: {table['model_selection']}.", ""]
    for protocol, title in PROTOCOL_TITLES.items():
        lines += [f"## {title}", "",
                  "| model | seeds | " + " | ".join(f"{t} | paper" for t in METRIC_TITLES.values()) + " |",
                  "|---|---|" + "---:|---:|" * len(METRIC_TITLES)]
        for row in table["rows"]:
            cells = []
            for metric in METRICS:
                value = row["protocols"].get(protocol, {}).get(metric)
                digits = 4 if metric == "mae" else 3
                cells.append("-" if value is None else
                             f"{value['mean']:.{digits}f}" + (f" +- {value['std']:.{digits}f}" if value["n"] > 1 else ""))
                paper = row["paper"] if protocol == "infnet" else None
                cells.append(f"{paper[metric]:.{digits}f}" if paper else "")
            seeds = f"{len(row['finished_seeds'])}/{len(row['seeds'])}"
            lines.append(f"| {row['label']} (`{row['model']}`) | {seeds} | " + " | ".join(cells) + " |")
        lines.append("")
    if table.get("comparisons"):
        from cares.statistics import describe
        labels = {row["run"]: row["label"] for row in table["rows"]}
        lines += ["## Claims: paired Dice differences", "",
                  "Each claim compares two rows on the seeds both have and the same test images: the mean of the "
                  "per-image, per-seed Dice differences, with a 95% two-level bootstrap interval (seeds, then "
                  "images, resampled with replacement). \"Not significant\": the interval holds 0.", "",
                  "| claim | difference | " + " | ".join(PROTOCOL_TITLES.values()) + " | seeds x images |",
                  "|---|---|" + "---|" * len(PROTOCOL_TITLES) + "---:|"]
        for item in table["comparisons"]:
            cells = [describe(r) if r else "pending" for r in item["protocols"].values()]
            done = [r for r in item["protocols"].values() if r]
            size = f"{done[0]['n_seeds']} x {done[0]['n_images']}" if done else "-"
            lines.append(f"| {item['claim']} | {labels[item['better']]} - {labels[item['than']]} | "
                         + " | ".join(cells) + f" | {size} |")
        lines.append("")
    lines += ["The paper's columns are its Table 1 (Inf-Net toolbox protocol, width 64, 256x256, on a GPU); "
              "they are printed beside the Inf-Net-protocol rows only.", "",
              "## Runs", "", "| model | seed | Dice (Inf-Net) | Dice (threshold 0.5) | wall time |", "|---|---|---:|---:|---:|"]
    for row in table["rows"]:
        for record in row["per_seed"]:
            lines.append(f"| {row['label']} | {record['seed']} | {record['protocols']['infnet']['dice_mean']:.4f} | "
                         f"{record['protocols']['threshold']['dice_mean']:.4f} | {_duration(record['wall_seconds'])} |")
    lines += ["", "Wall time: training epochs plus pseudo-labelling and evaluation; for a semi-supervised run it "
              "includes its supervised stage.", "",
              "## Environment", "",
              f"- command: `{table['command']}`" if table["command"] else "- command: (library call)",
              f"- commit: {git.get('sha')}" + (" (with uncommitted changes)" if git.get("dirty") else ""),
              f"- torch {environment.get('torch')}, CUDA {environment.get('cuda')}, Python {environment.get('python')}",
              f"- machine: {environment.get('cpu')}, {environment.get('usable_cpus')} usable CPUs, torch threads "
              f"{environment.get('torch_threads')}, GPU {environment.get('gpu') or 'none'}",
              f"- written {environment.get('date')}", ""]
    return "\n".join(lines)


def _loss_curves(out: Path, plan) -> None:
    """loss_curves.png from each run's log.csv (kept with the results, unlike the checkpoints)."""
    import csv

    from cares.figures import line_plot
    series = {}
    for spec, seed, steps in plan:
        log = out / spec.name / f"seed_{seed}" / "train" / "log.csv"
        if log.is_file():
            with open(log, newline="") as handle:
                rows = list(csv.DictReader(handle))
            series[f"{spec.label} s{seed}"] = [(int(row["epoch"]), float(row["train_loss"])) for row in rows]
    if series:
        line_plot(out / "loss_curves.png", series, title="Training loss (Dice + BCE) per epoch", x_label="epoch",
                  y_label="loss", size=(800, 480))


def _comparison(experiment: Experiment, data: str, out: Path, plan) -> None:
    """qualitative.png: image, ground truth and each run's first finished seed on the same test slices."""
    from cares.evaluate import native_size_dataset
    from cares.figures import comparison_figure
    from cares.inference import load_trained_model, predict_probabilities

    models = []
    for spec in experiment.runs:
        seed = next((seed for s, seed, steps in plan if s is spec and all(st.is_done() for st in steps)), None)
        if seed is not None:
            models.append((spec.label, out / spec.name / f"seed_{seed}" / "train" / "last.pt"))
    if not models:
        return
    missing = [str(checkpoint) for _, checkpoint in models if not checkpoint.is_file()]
    if missing:   # results kept without their checkpoints: the figure already there stays
        print(f"reproduce: qualitative.png not redrawn: {len(missing)} checkpoint(s) missing, e.g. {missing[0]}",
              file=sys.stderr)
        return
    dataset = None
    rows: list[tuple[str, Any, Any, list]] = []
    for index, (label, checkpoint) in enumerate(models):
        model, state, device = load_trained_model(checkpoint, "auto")
        image_size = state["input"]["image_size"]
        if dataset is None:
            dataset = native_size_dataset(data, "test", image_size)
            count = min(experiment.figure_slices, len(dataset))
            # Evenly spaced over the split (a fixed choice, not the best-looking slices).
            picks = sorted({round(i * (len(dataset) - 1) / max(count - 1, 1)) for i in range(count)})
            items = [dataset[i] for i in picks]
        for row_index, (item, probability) in enumerate(
                predict_probabilities(model, items, image_size=image_size, device=device)):
            if index == 0:
                rows.append((item["name"], item["image"][0].numpy(), item["mask"][0].numpy() > 0.5, []))
            rows[row_index][3].append(probability)
    comparison_figure(out / "qualitative.png", rows, [label for label, _ in models])


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------

def add_arguments(parser) -> None:
    parser.add_argument("--preset", metavar="NAME", help=f"a preset experiment: {', '.join(preset_names())}")
    parser.add_argument("--config", metavar="FILE.yaml", help="an experiment file (the presets show the format)")
    parser.add_argument("--data", metavar="DIR", help="the COVID-SemiSeg root (train/, test/, unlabeled/); "
                                                      "default: $CARES_DATA_DIR or ../shared/data/covid-semiseg")
    parser.add_argument("--out", required=True, metavar="DIR", help="experiment folder; rerun to continue")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="torch threads (per step with --jobs; default: torch's choice, or the usable CPUs "
                             "shared out between the jobs; on a busy machine 1 can be faster)")
    parser.add_argument("--jobs", type=int, default=1, metavar="N",
                        help="run up to N trainings/evaluations at once, each in a process of its own "
                             "(independent runs side by side: --jobs 2 on a 2-core machine); the results are "
                             "those of --jobs 1")
    parser.add_argument("--run-step", metavar="FOLDER", help=argparse.SUPPRESS)   # --jobs' child processes


def run(args) -> int:
    import shlex

    import torch

    from cares.data import default_data_dir
    if args.run_step is not None:                   # a child of --jobs: the parent checked everything
        try:
            if args.threads is not None:
                torch.set_num_threads(args.threads)
            run_single_step(Path(args.out), args.data, Path(args.run_step))
        except (ValueError, FileNotFoundError) as err:
            print(f"cares reproduce: error: {err}", file=sys.stderr)
            return 2
        return 0
    try:
        experiment = load_experiment(args.preset, args.config)
        data = args.data or default_data_dir()
        if data is None:
            raise ValueError("no --data given and no default dataset folder found (set $CARES_DATA_DIR)")
        if not Path(data).is_dir():
            raise ValueError(f"--data {str(data)!r} is not a folder")
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {str(out)!r} exists and is not a folder")
        if args.threads is not None:
            if args.threads < 1:
                raise ValueError(f"--threads must be >= 1, got {args.threads}")
            torch.set_num_threads(args.threads)
        if not (isinstance(args.jobs, int) and args.jobs >= 1):
            raise ValueError(f"--jobs must be >= 1, got {args.jobs}")
        command = "cares reproduce " + " ".join(shlex.quote(a) for a in sys.argv[2:]) \
            if len(sys.argv) > 1 and sys.argv[1] == "reproduce" else None
        table = reproduce(experiment, str(data), out, command=command, jobs=args.jobs, threads=args.threads)
    except (ValueError, FileNotFoundError) as err:
        print(f"cares reproduce: error: {err}", file=sys.stderr)
        return 2
    except StepFailed as err:
        print(f"cares reproduce: error: {err}", file=sys.stderr)
        return 1
    print((Path(args.out) / "table1.md").read_text())
    unfinished = [row["label"] for row in table["rows"] if len(row["finished_seeds"]) < len(row["seeds"])]
    return 1 if unfinished else 0
