"""`python -m cares <command>` (also the `cares` console script).

Each subcommand lives in its own module, which provides:
    HELP: str                               one line for the command list
    add_arguments(parser) -> None           its flags
    run(args) -> int                        the work; returns the exit code
Modules are imported only when their command runs, so `cares --help` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "train": "cares.train",
    "evaluate": "cares.evaluate",
    "predict": "cares.predict",
    "pseudo-label": "cares.pseudo_label",
    "complexity": "cares.complexity",
    "demo": "cares.demo",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cares",
        description="CARes-UNet for COVID-19 lung-infection segmentation in CT: train, evaluate, "
                    "predict, pseudo-label unlabeled slices, report model complexity, or run the demo.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=module.HELP, description=module.HELP,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    return int(args._run(args) or 0)
