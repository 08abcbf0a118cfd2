"""`python -m cares <command>` (also the `cares` console script).

Each subcommand lives in its own module, which provides:
    HELP: str                               a paragraph shown by `cares COMMAND --help`
    add_arguments(parser) -> None           its flags
    run(args) -> int                        the work; returns the exit code
Only the module of the command being run is imported, so `cares --help` stays fast and one command's
optional dependencies never break another.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# command -> (module, one line for the command list)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("cares.train", "train a model (supervised, or with pseudo labels)"),
    "evaluate": ("cares.evaluate", "evaluate a checkpoint with the paper's six metrics"),
    "predict": ("cares.predict", "predict masks for PNG/JPG slices or NIfTI volumes"),
    "pseudo-label": ("cares.pseudo_label", "pseudo-label unlabeled slices, keeping confident ones"),
    "complexity": ("cares.complexity", "parameters, MACs, FLOPs and latency of every model"),
    "demo": ("cares.demo", "train and evaluate CARes-UNet on synthetic CT and write a report"),
    "export": ("cares.export", "export a checkpoint to ONNX (dynamic batch and size), checked in onnxruntime"),
    "reproduce": ("cares.reproduce", "reproduce the paper's Table 1: every run, seed and metric, one resumable command"),
}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" only where there is a default worth showing: not for required flags,
    flags without a default (None) or flags that already say it."""

    def _get_help_string(self, action):
        if action.required or action.default is None or action.default is argparse.SUPPRESS \
                or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _selected_command(argv: list[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cares",
        description="CARes-UNet for COVID-19 lung-infection segmentation in CT: train, evaluate, "
                    "predict, pseudo-label unlabeled slices, report model complexity, or run the demo.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    selected = _selected_command(argv)
    for name, (module_name, summary) in COMMANDS.items():
        if name != selected:
            sub.add_parser(name, help=summary)
            continue
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=summary, description=getattr(module, "HELP", summary),
                           formatter_class=_HelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


# A missing optional dependency -> the extra of the carafe-kernels distribution that installs it.
EXTRA_OF_MODULE = {"numpy": "cares", "PIL": "cares", "tqdm": "cares", "yaml": "cares", "nibabel": "nifti",
                   "matplotlib": "plot", "onnx": "onnx", "onnxscript": "onnx", "onnxruntime": "onnx"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser(argv).parse_args(argv)
        return int(args._run(args) or 0)
    except ModuleNotFoundError as exc:
        # The console script is installed even without the [cares] extra: name the fix, not a traceback.
        extra = EXTRA_OF_MODULE.get((exc.name or "").partition(".")[0])
        if extra is None:
            raise
        print(f"cares: this command needs the Python package {exc.name!r}, which is not installed. Install "
              f"the optional dependencies with:\n    pip install \"carafe-kernels[{extra}]\"", file=sys.stderr)
        return 2
