"""The `cares` command line: every subcommand's --help, and one tiny run of each."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from cares.cli import COMMANDS, main
from test_train import REPO_ROOT, TINY_MODEL, subprocess_env, tiny_models  # noqa: F401  (fixture)


def test_top_level_help_lists_every_command():
    done = subprocess.run([sys.executable, "-m", "cares", "--help"], capture_output=True, text=True,
                          env=subprocess_env(), cwd=REPO_ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    for command in COMMANDS:
        assert command in done.stdout


@pytest.mark.parametrize("command", list(COMMANDS))
def test_subcommand_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert f"usage: cares {command}" in text
    expected_flags = {"train": ["--resume", "--amp", "--folds", "--pseudo", "--config", "--compile"],
                      "evaluate": ["--checkpoint", "--data", "--split", "--tta"],
                      "predict": ["--checkpoint", "--input", "--out"],
                      "pseudo-label": ["--entropy-threshold", "--log-base"],
                      "complexity": ["--models"],
                      "demo": ["--quick", "--out"],
                      "export": ["--checkpoint", "--format", "--out"],
                      "reproduce": ["--preset", "--config", "--data", "--out", "--threads", "--jobs"]}[command]
    for flag in expected_flags:
        assert flag in text
    assert "(default: None)" not in " ".join(text.split())   # required flags and flags without a default


def test_help_lists_models_with_their_options_and_how_outputs_are_stored(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "cares_unet (upsampler, downsampler, carafe_backend, base_channels)" in text
    assert "unet (base_channels)" in text
    with pytest.raises(SystemExit):
        main(["predict", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "0-255" in text and "HU window" in text and "width 1500, level -650" in text


def test_train_help_shows_the_paper_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for default in ("(default: cares_unet)", "(default: 0.0005)", "(default: ranger)", "(default: 256)"):
        assert default in text


def test_tiny_run_of_each_command(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data", "synthetic", "--synthetic-samples", "4", "--image-size", "32",
                 "--model", TINY_MODEL, "--batch-size", "2", "--epochs", "1", "--val-split", "val",
                 "--num-workers", "0", "--out", str(run)]) == 0
    checkpoint = run / "best.pt"
    assert checkpoint.is_file()

    assert main(["evaluate", "--checkpoint", str(checkpoint), "--data", "synthetic", "--split", "test",
                 "--out", str(tmp_path / "eval"), "--figures", "1"]) == 0
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["num_images"] == 16

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 44), dtype=np.uint8)).save(tmp_path / "slice.png")
    assert main(["predict", "--checkpoint", str(checkpoint), "--input", str(tmp_path / "slice.png"),
                 "--out", str(tmp_path / "pred")]) == 0
    assert Image.open(tmp_path / "pred" / "masks" / "slice.png.png").size == (44, 40)

    assert main(["pseudo-label", "--checkpoint", str(checkpoint), "--input", "synthetic",
                 "--out", str(tmp_path / "pseudo")]) == 0
    summary = json.loads((tmp_path / "pseudo" / "summary.json").read_text())
    assert summary["total"] == 32 and summary["kept"] + summary["rejected"] == 32

    capsys.readouterr()
    assert main(["complexity", "--models", "unet", "--input-size", "32", "--no-latency"]) == 0
    assert "unet" in capsys.readouterr().out


def test_train_reports_bad_flags_by_name(tmp_path, capsys):
    assert main(["train", "--folds", "2", "--fold", "5", "--out", str(tmp_path / "x")]) == 2
    assert "--fold" in capsys.readouterr().err
    with pytest.raises(SystemExit):                       # argparse rejects a malformed value itself
        main(["train", "--epochs", "zero"])
    assert "--epochs" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_quick(tmp_path):
    done = subprocess.run([sys.executable, "-m", "cares", "demo", "--quick", "--out", str(tmp_path / "demo")],
                          capture_output=True, text=True, env=subprocess_env(), cwd=REPO_ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "test Dice" in done.stdout
    report = (tmp_path / "demo" / "report.md").read_text()
    for piece in ("| threshold |", "| infnet |", "loss_curve.png", "qualitative.png", "M parameters", "GFLOPs"):
        assert piece in report
    for name in ("loss_curve.png", "qualitative.png", "metrics.json", "train/best.pt"):
        assert (tmp_path / "demo" / name).is_file()

    # A second demo into the folder needs --overwrite, which replaces only what the first one wrote.
    (tmp_path / "demo" / "notes.txt").write_text("mine")
    again = ["-m", "cares", "demo", "--quick", "--out", str(tmp_path / "demo"), "--epochs", "2"]
    refused = subprocess.run([sys.executable, *again], capture_output=True, text=True, env=subprocess_env(),
                             cwd=REPO_ROOT, timeout=300)
    assert refused.returncode == 2 and "from an earlier cares demo; pass --overwrite" in refused.stderr
    replaced = subprocess.run([sys.executable, *again, "--overwrite"], capture_output=True, text=True,
                              env=subprocess_env(), cwd=REPO_ROOT, timeout=300)
    assert replaced.returncode == 0, replaced.stderr[-3000:]
    assert "(2 epochs)" in replaced.stdout and (tmp_path / "demo" / "notes.txt").read_text() == "mine"


def test_train_help_lists_the_settings_a_resume_may_change(capsys, monkeypatch):
    from cares.config import EXPERIMENT_SETTINGS, MAY_CHANGE_ON_RESUME, flag_name
    monkeypatch.setenv("COLUMNS", "1000")   # argparse would wrap lines inside flag names
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    listed = text[text.index("Only these may differ"):]
    for name in MAY_CHANGE_ON_RESUME:
        assert flag_name(name) in listed
    assert "is refused" in listed
    assert {"image_size", "data", "model", "model_options", "lr", "seed", "optimizer"} <= set(EXPERIMENT_SETTINGS)
