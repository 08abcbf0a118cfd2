"""Training, prediction and the CLI never lose or corrupt work: kills between checkpoint writes,
concurrent runs, bad inputs in a folder, NaN/inf anywhere, and every user error as `error: ...`, rc 2."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import cares.train
from cares import runtime
from cares.checkpoint import load_checkpoint, save_checkpoint
from cares.cli import main
from cares.config import resolve_config
from cares.train import NonFiniteLossError, train
from test_train import (POINTWISE_MODEL, TINY_MODEL, subprocess_env, tiny_config, tiny_models,  # noqa: F401
                        write_checkpoint, write_launcher)


class SimulatedKill(BaseException):
    """Raised by the fault hook: unwinds like a kill would stop the run (not an Exception, so no
    handler in cares catches it)."""


def fake_validation(monkeypatch, scores):
    """validation_dice returns scores[0], scores[1], ... on successive calls."""
    calls = iter(scores)
    monkeypatch.setattr(cares.train, "validation_dice", lambda *args, **kwargs: next(calls))


def kill_at(monkeypatch, event):
    def hook(name):
        if name == event:
            raise SimulatedKill(name)
    monkeypatch.setattr(runtime, "fault_point", hook)


def best_and_last(run):
    best, last = load_checkpoint(run / "best.pt"), load_checkpoint(run / "last.pt")
    return best, last


# --------------------------------------------------------------------------------------------------
# 1. best.pt and last.pt stay a consistent pair under a kill at any instant
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("event", ["wrote best.pt epoch 2", "wrote last.pt epoch 2"])
def test_kill_between_checkpoint_writes_keeps_best_and_last_consistent(tmp_path, monkeypatch, event):
    run = tmp_path / "run"
    fake_validation(monkeypatch, [0.25, 0.27])
    kill_at(monkeypatch, event)
    with pytest.raises(SimulatedKill):
        train(tiny_config(run, epochs=3))
    best, last = best_and_last(run)
    # best.pt is never behind what last.pt calls the best (the bug: best epoch 1 while last says 0.27 at 2).
    assert best["epoch"] >= last["best_epoch"] and best["best_val_dice"] >= last["best_val_dice"]
    assert best["epoch"] == 2 and best["best_val_dice"] == 0.27

    monkeypatch.setattr(runtime, "fault_point", lambda name: None)
    # Redone epochs score the same as before the kill (a deterministic run), then epoch 3 is worse.
    fake_validation(monkeypatch, [0.27, 0.20] if last["epoch"] == 1 else [0.20])
    train(tiny_config(run, epochs=3, resume=True))
    best, last = best_and_last(run)
    assert last["epoch"] == 3 and last["best_epoch"] == 2 and last["best_val_dice"] == 0.27
    assert best["epoch"] == 2 and best["best_val_dice"] == 0.27


def test_resume_keeps_a_best_pt_written_just_before_the_kill(tmp_path, monkeypatch, capsys):
    """Killed after best.pt (epoch 2) but before last.pt: a redone epoch 2 that scores lower (a GPU run
    is not bitwise deterministic) must not make last.pt forget the better best.pt."""
    run = tmp_path / "run"
    fake_validation(monkeypatch, [0.25, 0.27])
    kill_at(monkeypatch, "wrote best.pt epoch 2")
    with pytest.raises(SimulatedKill):
        train(tiny_config(run, epochs=2))
    monkeypatch.setattr(runtime, "fault_point", lambda name: None)
    fake_validation(monkeypatch, [0.26])
    train(tiny_config(run, epochs=2, resume=True))
    assert "kept as the best model" in capsys.readouterr().err
    best, last = best_and_last(run)
    assert last["best_val_dice"] == best["best_val_dice"] == 0.27 and last["best_epoch"] == best["epoch"] == 2


@pytest.mark.slow
def test_process_killed_after_best_pt_resumes_and_cleans_up(tmp_path):
    """A real process end (os._exit, as kill -9) right after best.pt: the lock dies with it, --resume
    works at once, the orphaned temp file of a torn save is removed, and the pair ends consistent."""
    launcher = write_launcher(tmp_path)
    args = [sys.executable, str(launcher), "train", "--data", "synthetic", "--synthetic-samples", "4",
            "--image-size", "32", "--model", TINY_MODEL, "--batch-size", "2", "--epochs", "2",
            "--val-split", "val", "--num-workers", "0", "--out", str(tmp_path / "run")]
    killed = subprocess.run(args, env={**subprocess_env(), runtime.FAULT_ENV: "wrote best.pt epoch 1"},
                            cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert killed.returncode == 86, killed.stderr[-2000:]
    assert (tmp_path / "run" / "best.pt").is_file() and not (tmp_path / "run" / "last.pt").exists()
    orphan = tmp_path / "run" / ".last.pt.abc123.tmp"
    orphan.write_bytes(b"half a checkpoint")
    resumed = subprocess.run(args + ["--resume"], env=subprocess_env(), cwd=tmp_path, capture_output=True,
                             text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert not orphan.exists()
    best, last = best_and_last(tmp_path / "run")
    assert best["epoch"] == last["best_epoch"] and best["best_val_dice"] == last["best_val_dice"]


# --------------------------------------------------------------------------------------------------
# 2. One run per --out
# --------------------------------------------------------------------------------------------------

def test_second_writer_is_refused_while_the_first_holds_the_folder(tmp_path, capsys):
    out = tmp_path / "run"
    with runtime.RunLock(out):   # what a live run holds (another open file: flock conflicts in-process too)
        rc = main(["train", "--data", "synthetic", "--synthetic-samples", "4", "--image-size", "32",
                   "--model", TINY_MODEL, "--epochs", "1", "--num-workers", "0", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and f"is in use by another run (pid {os.getpid()})" in err and "Traceback" not in err
    assert not (out / "config.yaml").exists() and not (out / "last.pt").exists()


@pytest.mark.slow
def test_concurrent_training_runs_and_a_killed_runs_lock(tmp_path):
    """Two trainings into one folder: the second is refused (rc 2) while the first runs; after the
    first is killed with SIGKILL, --resume is not blocked by its lock."""
    launcher = write_launcher(tmp_path)
    out = tmp_path / "run"
    args = [sys.executable, str(launcher), "train", "--data", "synthetic", "--synthetic-samples", "4",
            "--image-size", "32", "--model", TINY_MODEL, "--batch-size", "2", "--num-workers", "0",
            "--out", str(out)]
    first = subprocess.Popen(args + ["--epochs", "100000"], env=subprocess_env(), cwd=tmp_path,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (out / "config.yaml").is_file() and time.monotonic() < deadline and first.poll() is None:
            time.sleep(0.05)
        assert first.poll() is None, "the first run ended early"
        second = subprocess.run(args + ["--epochs", "1"], env=subprocess_env(), cwd=tmp_path,
                                capture_output=True, text=True, timeout=240)
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"is in use by another run (pid {first.pid})" in second.stderr
        assert "Traceback" not in second.stderr
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    resumed = subprocess.run(args + ["--epochs", "1", "--resume"], env=subprocess_env(), cwd=tmp_path,
                             capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-2000:]


# --------------------------------------------------------------------------------------------------
# 5 and 7. Validate everything before writing anything; user errors are one line, rc 2
# --------------------------------------------------------------------------------------------------

TRAIN = ["train", "--data", "synthetic", "--synthetic-samples", "4", "--image-size", "32", "--batch-size", "2",
         "--epochs", "1", "--num-workers", "0"]


def assert_one_line_error(capsys, rc, *fragments):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert rc == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], err


def test_refused_resume_leaves_config_yaml_alone(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(TRAIN + ["--model", TINY_MODEL, "--out", str(out)]) == 0
    saved = (out / "config.yaml").read_bytes()
    capsys.readouterr()
    assert_one_line_error(capsys, main(TRAIN + ["--model", POINTWISE_MODEL, "--resume", "--epochs", "2",
                                                "--out", str(out)]), "holds model")
    assert (out / "config.yaml").read_bytes() == saved
    assert main(["train", "--resume", "--epochs", "2", "--out", str(out)]) == 0   # a plain --resume still works


def test_resume_onto_another_optimizer_is_an_error(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(TRAIN + ["--model", TINY_MODEL, "--optimizer", "adam", "--out", str(out)]) == 0
    saved = (out / "config.yaml").read_bytes()
    capsys.readouterr()
    assert_one_line_error(capsys, main(["train", "--resume", "--optimizer", "ranger", "--epochs", "2",
                                        "--out", str(out)]), "--optimizer adam")
    assert (out / "config.yaml").read_bytes() == saved


def test_resume_onto_foreign_optimizer_state_is_an_error(tmp_path, capsys):
    """Same optimizer name, state from another optimizer (Ranger's keys missing): not a KeyError."""
    out = tmp_path / "run"
    assert main(TRAIN + ["--model", TINY_MODEL, "--optimizer", "adam", "--out", str(out)]) == 0
    state = load_checkpoint(out / "last.pt")
    state["config"]["optimizer"] = "ranger"
    save_checkpoint(out / "last.pt", state)
    config = yaml.safe_load((out / "config.yaml").read_text())
    config["optimizer"] = "ranger"
    (out / "config.yaml").write_text(yaml.safe_dump(config))
    capsys.readouterr()
    assert_one_line_error(capsys, main(["train", "--resume", "--epochs", "2", "--out", str(out)]),
                          "does not fit this run's --optimizer ranger")


def test_bad_model_option_is_refused_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "run"
    assert_one_line_error(capsys, main(TRAIN + ["--model", "unet", "--model-option", "nosuch=1", "--out", str(out)]),
                          "--model-option nosuch", "base_channels")
    assert not out.exists()
    assert_one_line_error(capsys, main(TRAIN + ["--model", "cares_unet", "--model-option", "upsampler=nosuch",
                                                "--out", str(out)]), "upsampler")
    assert not out.exists()


def test_unsafe_yaml_is_an_error(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("epochs: !!python/object/apply:os.system ['echo owned']\n")
    assert_one_line_error(capsys, main(["train", "--config", str(config), "--out", str(tmp_path / "run")]),
                          "not plain YAML")


def test_non_finite_or_non_positive_lr_is_refused_at_parse_time(capsys):
    for value in ("inf", "nan", "0", "-1"):
        with pytest.raises(SystemExit) as exit_info:
            main(["train", "--lr", value])
        assert exit_info.value.code == 2 and "--lr must be a finite number > 0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--lr must be a finite number"):
        resolve_config(dict(lr=math.inf))


def command_args(command, tmp_path, checkpoint, out):
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(images / "a.png")
    return {
        "train": TRAIN + ["--model", TINY_MODEL, "--out", out],
        "evaluate": ["evaluate", "--checkpoint", checkpoint, "--data", "synthetic", "--out", out],
        "predict": ["predict", "--checkpoint", checkpoint, "--input", str(images), "--out", out],
        "pseudo-label": ["pseudo-label", "--checkpoint", checkpoint, "--input", str(images), "--out", out],
    }[command]


@pytest.mark.parametrize("command", ["train", "evaluate", "predict", "pseudo-label"])
@pytest.mark.parametrize("where", ["file", "under a file", "read-only"])
def test_unusable_out_is_a_one_line_error_before_any_work(tmp_path, capsys, monkeypatch, command, where):
    checkpoint = str(write_checkpoint(tmp_path / "best.pt"))
    (tmp_path / "a_file").write_text("x")
    out = {"file": tmp_path / "a_file", "under a file": tmp_path / "a_file" / "out",
           "read-only": tmp_path / "ro" / "out"}[where]
    if where == "read-only":
        (tmp_path / "ro").mkdir()
        (tmp_path / "ro").chmod(0o555)
        if os.access(tmp_path / "ro", os.W_OK):   # root ignores permissions: pretend as the check sees it
            real_access = os.access
            monkeypatch.setattr(runtime.os, "access", lambda p, mode: False if Path(p) == tmp_path / "ro"
                                else real_access(p, mode))
    import cares.inference
    monkeypatch.setattr(cares.inference, "predict_probabilities",
                        lambda *a, **k: pytest.fail("inference ran before --out was checked"))
    rc = main(command_args(command, tmp_path, checkpoint, str(out)))
    assert_one_line_error(capsys, rc, "--out", {"file": "is a file", "under a file": "which is a file",
                                                "read-only": "not writable"}[where])


# --------------------------------------------------------------------------------------------------
# 7 and 8. Checkpoints: other models, missing records, bit flips, empty files, NaN weights
# --------------------------------------------------------------------------------------------------

def predict_with(checkpoint, tmp_path):
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(images / "a.png")
    return main(["predict", "--checkpoint", str(checkpoint), "--input", str(images), "--out", str(tmp_path / "out")])


def edited_checkpoint(tmp_path, edit, model_name=POINTWISE_MODEL):
    path = write_checkpoint(tmp_path / "best.pt", model_name)
    state = load_checkpoint(path)
    edit(state)
    return save_checkpoint(tmp_path / "edited.pt", state)


def test_checkpoint_of_another_width_is_a_one_line_error(tmp_path, capsys):
    path = edited_checkpoint(tmp_path, lambda s: s["model"]["options"].update(width=4), TINY_MODEL)
    assert_one_line_error(capsys, predict_with(path, tmp_path), "weights do not fit model")
    with pytest.raises(ValueError, match="holds model"):
        train(tiny_config(tmp_path / "run", init_from=str(path)))


def test_checkpoint_without_input_record_is_a_one_line_error(tmp_path, capsys):
    path = edited_checkpoint(tmp_path, lambda s: s.pop("input"))
    assert_one_line_error(capsys, predict_with(path, tmp_path), "no 'input' record")


def test_non_finite_weights_are_refused(tmp_path, capsys):
    path = edited_checkpoint(tmp_path, lambda s: s["model"]["state_dict"]["conv.weight"].fill_(float("nan")))
    assert_one_line_error(capsys, predict_with(path, tmp_path), "conv.weight", "NaN")


def test_bit_flip_in_tensor_data_is_caught_by_the_zip_crc(tmp_path):
    path = write_checkpoint(tmp_path / "best.pt")
    with zipfile.ZipFile(path) as archive:
        member = next(i for i in archive.infolist() if "/data/" in i.filename and i.file_size >= 4)
    data = bytearray(path.read_bytes())
    # The member's data starts after its local header (30 bytes + name + extra field).
    name_length = int.from_bytes(data[member.header_offset + 26:member.header_offset + 28], "little")
    extra_length = int.from_bytes(data[member.header_offset + 28:member.header_offset + 30], "little")
    data[member.header_offset + 30 + name_length + extra_length + 1] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="fails its CRC check"):
        load_checkpoint(path)


def test_empty_checkpoint_names_the_reason(tmp_path, capsys):
    (tmp_path / "empty.pt").write_bytes(b"")
    assert_one_line_error(capsys, predict_with(tmp_path / "empty.pt", tmp_path), "empty (0 bytes)")


# --------------------------------------------------------------------------------------------------
# 4. NaN never becomes "no lesion"; non-finite weights stop training
# --------------------------------------------------------------------------------------------------

def test_weights_that_become_non_finite_stop_training(tmp_path, monkeypatch):
    original = cares.train._Stepper.step

    def step_then_break_weights(self, batch):
        result = original(self, batch)
        with torch.no_grad():
            next(self.model.parameters()).fill_(float("inf"))
        return result

    monkeypatch.setattr(cares.train._Stepper, "step", step_then_break_weights)
    with pytest.raises(NonFiniteLossError, match="weights became NaN or infinite during epoch 1.*no epoch had finished"):
        train(tiny_config(tmp_path / "run", synthetic_samples=2))
    assert not (tmp_path / "run" / "last.pt").exists()


def write_volume(path, data):
    nibabel = pytest.importorskip("nibabel")
    nibabel.save(nibabel.Nifti1Image(data, np.eye(4)), str(path))


def test_nan_in_a_nifti_slice_fails_that_file_by_name_and_predicts_the_others(tmp_path, capsys):
    checkpoint = write_checkpoint(tmp_path / "best.pt")
    inputs = tmp_path / "in"
    inputs.mkdir()
    volume = np.full((16, 16, 3), -1000.0, np.float32)
    volume[4:10, 4:10, 1] = 100.0
    bad = volume.copy()
    bad[2:7, 2:7, 1] = np.nan                                           # a 5x5 NaN patch
    write_volume(inputs / "a_bad.nii.gz", bad)
    write_volume(inputs / "b_good.nii.gz", volume)
    rc = main(["predict", "--checkpoint", str(checkpoint), "--input", str(inputs), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 1 and "a_bad.nii.gz: failed: 'slice 1': the image holds NaN or infinite values" in err
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [(Path(e["input"]).name, e["status"]) for e in manifest["inputs"]] == [("a_bad.nii.gz", "failed"),
                                                                                  ("b_good.nii.gz", "ok")]
    assert not (tmp_path / "out" / "masks" / "a_bad.nii.gz.nii.gz").exists()
    assert (tmp_path / "out" / "masks" / "b_good.nii.gz.nii.gz").is_file()


# --------------------------------------------------------------------------------------------------
# 3 and 6. predict and pseudo-label: same stems, mixed good and bad files
# --------------------------------------------------------------------------------------------------

def test_predict_keeps_inputs_that_share_a_stem_apart(tmp_path, capsys):
    checkpoint = write_checkpoint(tmp_path / "best.pt")
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name, value in (("scan.png", 0), ("scan.jpg", 255), ("Scan.png", 255)):
        Image.fromarray(np.full((16, 16), value, np.uint8)).save(inputs / name)
    write_volume(inputs / "vol.nii", np.full((8, 8, 2), -1000.0, np.float32))
    write_volume(inputs / "vol.nii.gz", np.full((8, 8, 2), 500.0, np.float32))
    out = tmp_path / "out"
    earlier = tmp_path / "earlier"   # an earlier predict into the same --out leaves masks/stale.png.png
    earlier.mkdir()
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(earlier / "stale.png")
    assert main(["predict", "--checkpoint", str(checkpoint), "--input", str(earlier), "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(checkpoint), "--input", str(inputs), "--out", str(out)]) == 0
    assert "for 5 input(s)" in capsys.readouterr().err
    assert (out / "masks" / "stale.png.png").is_file()   # the earlier run's files are left alone
    manifest = json.loads((out / "manifest.json").read_text())
    masks = {Path(e["input"]).name: e["mask"] for e in manifest["inputs"]}
    assert len(set(masks.values())) == 5 and manifest["written"] == 5 and manifest["failed"] == 0
    assert all((out / m).is_file() for m in masks.values())
    assert not np.asarray(Image.open(out / masks["scan.png"])).any()
    assert np.asarray(Image.open(out / masks["scan.jpg"])).all()
    assert "stale.png" not in json.dumps(manifest)


def test_predict_reports_a_bad_file_and_predicts_the_rest_of_its_batch(tmp_path, capsys):
    checkpoint = write_checkpoint(tmp_path / "best.pt")
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("a", "c", "d"):
        Image.fromarray(np.full((16, 16), 200, np.uint8)).save(inputs / f"{name}.png")
    (inputs / "b.png").write_bytes(b"not a png")
    rc = main(["predict", "--checkpoint", str(checkpoint), "--input", str(inputs), "--out", str(tmp_path / "out"),
               "--batch-size", "4"])
    err = capsys.readouterr().err
    assert rc == 1 and "b.png: failed:" in err and "1 input(s) failed: b.png" in err
    assert sorted(p.name for p in (tmp_path / "out" / "masks").iterdir()) == ["a.png.png", "c.png.png", "d.png.png"]


def test_pseudo_label_reports_a_bad_file_and_labels_the_rest(tmp_path, capsys):
    checkpoint = write_checkpoint(tmp_path / "best.pt")
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("a", "c"):
        Image.fromarray(np.full((16, 16), 250, np.uint8)).save(inputs / f"{name}.png")
    (inputs / "b.png").write_bytes(b"not a png")
    rc = main(["pseudo-label", "--checkpoint", str(checkpoint), "--input", str(inputs),
               "--out", str(tmp_path / "pseudo"), "--batch-size", "4"])
    err = capsys.readouterr().err
    assert rc == 1 and "b: failed:" in err
    summary = json.loads((tmp_path / "pseudo" / "summary.json").read_text())
    assert summary["failed"] == 1 and summary["failures"][0]["name"] == "b" and summary["total"] == 3
    assert sorted(p.name for p in (tmp_path / "pseudo" / "GT").iterdir()) == ["a.png", "c.png"]


# --------------------------------------------------------------------------------------------------
# 9 and layering: progress, seeds
# --------------------------------------------------------------------------------------------------

def test_progress_without_a_terminal_prints_lines_with_an_eta():
    import io
    stream = io.StringIO()
    assert list(runtime.progress(range(4), total=4, desc="predict", unit="file", stream=stream, interval=0)) == \
        [0, 1, 2, 3]
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("predict: 1/4 files (25.0%)") and "ETA" in lines[0] and lines[-1].endswith("done")


def test_epoch_order_seeds_do_not_alias_across_runs():
    """seed*100_003+epoch made seed 1 epoch 0 replay seed 0 epoch 100003."""
    from cares.sampling import EpochSampler
    first, second = EpochSampler(64, seed=1), EpochSampler(64, seed=0)
    second.set_epoch(100_003)
    assert first.epoch_indices() != second.epoch_indices()


def test_model_options_parse_the_same_from_flags_and_brackets():
    from cares.config import _model_option
    from cares.models import parse_model_spec
    for text in ("dropout=1e-3", "base_channels=16", "upsampler=deconv", "flag=true"):
        key, value = _model_option(text)
        assert parse_model_spec(f"fcn[{text}]")[1] == {key: value}


# --------------------------------------------------------------------------------------------------
# 9. No command deletes or overwrites a file it did not write, nor writes where its inputs are
#    (cares.runtime.claim_output; issue 23)
# --------------------------------------------------------------------------------------------------

def snapshot(folder):
    """Every file under `folder` (hidden ones included) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def write_labelled_split(root, split="train", count=2):
    for index in range(count):
        for kind in ("Imgs", "GT"):
            (root / split / kind).mkdir(parents=True, exist_ok=True)
            value = 255 * index if kind == "GT" else 100 * index
            Image.fromarray(np.full((16, 16), value, np.uint8)).save(root / split / kind / f"{index}.png")
    return root


def test_demo_overwrite_keeps_a_training_run_and_a_dataset_root(tmp_path, capsys):
    """Item 1: `cares demo --out runs --overwrite` deleted runs/train (a `cares train` run) and a dataset
    root's train/Imgs and train/GT; without --overwrite it called them "a demo run"."""
    runs = tmp_path / "runs"
    assert main(TRAIN + ["--model", TINY_MODEL, "--out", str(runs / "train")]) == 0
    data = write_labelled_split(tmp_path / "data")
    for out in (runs, data):
        before = snapshot(out)
        for extra in ([], ["--overwrite"]):
            capsys.readouterr()
            rc = main(["demo", "--quick", "--out", str(out), *extra])
            assert_one_line_error(capsys, rc, "train/", "which cares demo did not write")
            assert snapshot(out) == before


def test_pseudo_label_never_deletes_its_input(tmp_path, capsys):
    """Item 2: --out R/unlabeled --overwrite deleted R/unlabeled/Imgs before reading it, and --out X
    --input X/Imgs deleted X/GT; without --overwrite the message said "already holds pseudo labels"."""
    checkpoint = str(write_checkpoint(tmp_path / "best.pt"))
    root = tmp_path / "R"
    for index in range(2):
        (root / "unlabeled" / "Imgs").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((16, 16), 200, np.uint8)).save(root / "unlabeled" / "Imgs" / f"{index}.png")
    write_labelled_split(tmp_path, "X")
    cases = [(["--input", str(root), "--split", "unlabeled", "--out", str(root / "unlabeled")], root,
              "would get Imgs/ written over"),
             (["--input", str(tmp_path / "X" / "Imgs"), "--out", str(tmp_path / "X")], tmp_path / "X",
              "contains --input")]
    for args, folder, message in cases:
        before = snapshot(folder)
        for extra in ([], ["--overwrite"]):
            capsys.readouterr()
            rc = main(["pseudo-label", "--checkpoint", checkpoint, *args, *extra])
            assert_one_line_error(capsys, rc, message)
            assert snapshot(folder) == before
    # A folder whose GT/ is not a pseudo-label's: --overwrite does not delete it either.
    other = write_labelled_split(tmp_path / "other", "Y")
    before = snapshot(other)
    capsys.readouterr()
    rc = main(["pseudo-label", "--checkpoint", checkpoint, "--input", str(root), "--out", str(other / "Y"),
               "--overwrite"])
    assert_one_line_error(capsys, rc, "GT/", "which cares pseudo-label did not write")
    assert snapshot(other) == before


def test_pseudo_label_says_what_it_wrote(tmp_path, capsys):
    """It printed "wrote .../Imgs, GT/" when no folder existed; both now exist, even when none is kept."""
    checkpoint = str(write_checkpoint(tmp_path / "best.pt"))
    images = tmp_path / "in"
    images.mkdir()
    Image.fromarray(np.full((16, 16), 128, np.uint8)).save(images / "gray.png")   # uncertain: not kept
    out = tmp_path / "pseudo"
    assert main(["pseudo-label", "--checkpoint", checkpoint, "--input", str(images), "--out", str(out)]) == 0
    assert "kept 0 of 1" in capsys.readouterr().err
    assert (out / "Imgs").is_dir() and (out / "GT").is_dir() and (out / "summary.json").is_file()


def test_a_new_run_is_refused_while_any_file_of_an_earlier_run_is_there(tmp_path, capsys, monkeypatch):
    """Item 6: the guard looked at last.pt only, so a new run without validation left an old model's
    best.pt beside its last.pt, and overwrote log.csv silently."""
    out = tmp_path / "run"
    fake_validation(monkeypatch, [0.5, 0.4])
    assert main(TRAIN + ["--model", TINY_MODEL, "--val-split", "val", "--out", str(out)]) == 0
    (out / "last.pt").unlink()            # an old model's best.pt and log.csv are left
    before = snapshot(out)
    capsys.readouterr()
    rc = main(TRAIN + ["--model", TINY_MODEL, "--out", str(out)])
    assert_one_line_error(capsys, rc, "best.pt", "from an earlier cares train", "--resume")
    assert snapshot(out) == before
    # --resume finds no last.pt to continue: it starts afresh (with the saved settings), replacing the files.
    assert main(TRAIN + ["--model", TINY_MODEL, "--out", str(out), "--resume"]) == 0
    best, last = best_and_last(out)
    assert best["best_val_dice"] == last["best_val_dice"] == 0.4 and last["epoch"] == 1

    # Files that cares train did not write are refused even with --resume.
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "log.csv").write_text("my own log")
    for extra in ([], ["--resume"]):
        capsys.readouterr()
        rc = main(TRAIN + ["--model", TINY_MODEL, "--out", str(mine), *extra])
        assert_one_line_error(capsys, rc, "log.csv", "which cares train did not write")
        assert (mine / "log.csv").read_text() == "my own log" and not (mine / "config.yaml").exists()


def test_commands_refuse_an_out_where_their_inputs_are(tmp_path, capsys):
    checkpoint = write_checkpoint(tmp_path / "run" / "best.pt")
    data = write_labelled_split(tmp_path / "data", "test")
    images = data / "test" / "Imgs"
    cases = [
        (["predict", "--checkpoint", str(checkpoint), "--input", str(images), "--out", str(images)], "is --input"),
        (["evaluate", "--checkpoint", str(checkpoint), "--data", str(data), "--out", str(data)], "is --data"),
        (["evaluate", "--checkpoint", str(checkpoint), "--data", str(data / "test"), "--split", "x",
          "--out", str(tmp_path)], "contains --data"),
        (TRAIN + ["--model", POINTWISE_MODEL, "--init-from", str(checkpoint), "--out", str(checkpoint.parent)],
         "would get best.pt written over"),
        (["export", "--checkpoint", str(checkpoint), "--out", str(checkpoint)], "would get best.pt written over"),
    ]
    for args, message in cases:
        (tmp_path / "run" / ".lock").unlink(missing_ok=True)  # the lock train takes before it checks (a pid)
        before = snapshot(tmp_path)
        capsys.readouterr()
        assert_one_line_error(capsys, main(args), message)
        (tmp_path / "run" / ".lock").unlink(missing_ok=True)
        assert snapshot(tmp_path) == before, args
    # A checkpoint elsewhere in --out is no obstacle: evaluate writes only metrics.json, metrics.md, figures.
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--data", str(data), "--out", str(checkpoint.parent),
                 "--figures", "0"]) == 0
    assert (checkpoint.parent / "metrics.json").is_file()


def test_claim_output_replaces_only_what_its_owner_wrote(tmp_path):
    out = tmp_path / "out"
    runtime.claim_output(out, "cares x", ("a", "b.txt"), mode="new").take()
    (out / "a").mkdir()
    (out / "a" / "1").write_text("x's")
    (out / "b.txt").write_text("x's")
    (out / "c.txt").write_text("a user's")
    assert runtime.read_owners(out) == {"a": "cares x", "b.txt": "cares x"}
    with pytest.raises(ValueError, match=r"already holds a/, b.txt from an earlier cares x; pass --again"):
        runtime.claim_output(out, "cares x", ("a", "b.txt"), remedy="pass --again")
    with pytest.raises(ValueError, match=r"b.txt \(written by cares x\), which cares y did not write"):
        runtime.claim_output(out, "cares y", ("b.txt",), mode="replace")
    with pytest.raises(ValueError, match=r"c.txt \(not in .cares-owner.json\), which cares x did not write"):
        runtime.claim_output(out, "cares x", ("a", "c.txt"), mode="replace")
    runtime.claim_output(out, "cares x", ("a", "b.txt"), mode="replace").take()
    assert sorted(p.name for p in out.iterdir()) == [".cares-owner.json", "c.txt"]
    runtime.claim_output(out, "cares y", ("d",), mode="update").take()        # a second owner in the folder
    assert runtime.read_owners(out) == {"a": "cares x", "b.txt": "cares x", "d": "cares y"}
    (out / runtime.OWNER_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="cannot be read"):
        runtime.claim_output(out, "cares x", ("a",), mode="update")


# The script of a run holding the output lock when it is killed, with a forked child still alive (as
# DataLoader workers are, for a few seconds, after their parent is killed).
FORKED_LOCK_HOLDER = """
import os, signal, sys, time
from cares.runtime import RunLock
lock = RunLock(sys.argv[1]).acquire()
child = os.fork()
if child == 0:
    os.close(1), os.close(2)    # so the test reads the parent's output to its end; .lock stays open
    time.sleep(60)
    os._exit(0)
print(child, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_the_lock_of_a_killed_run_is_not_held_by_its_forked_children(tmp_path):
    """Item 7: fcntl.flock is shared with forked children, so orphaned DataLoader workers held .lock
    for seconds after a kill -9, and --resume was refused naming the dead pid."""
    out = tmp_path / "run"
    killed = subprocess.run([sys.executable, "-c", FORKED_LOCK_HOLDER, str(out)], env=subprocess_env(),
                            capture_output=True, text=True, timeout=60)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    child = int(killed.stdout)
    try:
        os.kill(child, 0)                 # the child is alive, and still has the lock file open
        with runtime.RunLock(out):        # yet the folder is free at once
            with pytest.raises(runtime.RunInUseError, match=f"pid {os.getpid()}"):
                runtime.RunLock(out).acquire()     # a second lock in this process is refused too
    finally:
        os.kill(child, signal.SIGKILL)


@pytest.mark.slow
def test_resume_right_after_sigkill_of_a_run_with_dataloader_workers(tmp_path):
    """Item 7 end to end: SIGKILL `cares train --num-workers 2` while its workers run, then --resume at once."""
    launcher = write_launcher(tmp_path)
    out = tmp_path / "run"
    args = [sys.executable, str(launcher), "train", "--data", "synthetic", "--synthetic-samples", "64",
            "--image-size", "32", "--model", TINY_MODEL, "--batch-size", "2", "--epochs", "3",
            "--num-workers", "2", "--out", str(out)]
    first = subprocess.Popen(args, env=subprocess_env(), cwd=tmp_path, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        children = Path(f"/proc/{first.pid}/task/{first.pid}/children")
        deadline = time.monotonic() + 120
        # Killed during epoch 2, when last.pt exists and the DataLoader workers are running.
        while time.monotonic() < deadline and first.poll() is None and not (
                (out / "last.pt").is_file() and children.is_file() and children.read_text().split()):
            time.sleep(0.01)
        assert first.poll() is None, "the run ended before it could be killed"
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    with runtime.RunLock(out):   # free at once, while the orphaned workers may still be alive
        pass
    resumed = subprocess.run(args + ["--resume"], env=subprocess_env(), cwd=tmp_path, capture_output=True,
                             text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "in use by another run" not in resumed.stderr
    assert load_checkpoint(out / "last.pt")["epoch"] == 3


# --------------------------------------------------------------------------------------------------
# Issue 23: --resume never changes the experiment; everything is checked before anything is written
# --------------------------------------------------------------------------------------------------

def folder_snapshot(folder):
    """{file name: (bytes, mtime_ns)} of a folder's files but the lock (which every attempt takes):
    "nothing was written" compares two of these."""
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(Path(folder).iterdir())
            if p.is_file() and p.name != runtime.RunLock.FILE_NAME}


def write_image_dataset(root, count=4, size=32):
    """<root>/train/Imgs/*.png + GT/*.png, a COVID-SemiSeg layout."""
    for sub in ("Imgs", "GT"):
        (root / "train" / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        image = rng.integers(0, 255, (size, size), dtype=np.uint8)
        mask = (rng.random((size, size)) > 0.7).astype(np.uint8) * 255
        Image.fromarray(image).save(root / "train" / "Imgs" / f"{index}.png")
        Image.fromarray(mask).save(root / "train" / "GT" / f"{index}.png")
    return root


@pytest.mark.parametrize("change, was", [
    (["--image-size", "64"], "--image-size 32"),
    (["--data", "synthetic"], "--data "),
    (["--seed", "1"], "--seed 0"),
    (["--lr", "1e-3"], "--lr 0.0005"),
    (["--batch-size", "4"], "--batch-size 2"),
    (["--no-augment"], "--augment"),
    # LambdaLR.load_state_dict restores the schedule's own settings: this resume would stay constant.
    (["--scheduler", "multistep", "--milestones", "2"], "--scheduler constant --milestones (unset)"),
])
def test_resume_refuses_a_changed_experiment_and_writes_nothing(tmp_path, capsys, change, was):
    data = write_image_dataset(tmp_path / "covid")
    out = tmp_path / "run"
    first = TRAIN[:1] + ["--data", str(data)] + TRAIN[5:] + ["--model", TINY_MODEL, "--out", str(out)]
    assert main(first) == 0
    before = folder_snapshot(out)
    capsys.readouterr()
    assert_one_line_error(capsys, main(["train", "--resume", "--epochs", "3", "--out", str(out)] + change),
                          f"was trained with {was}", "would change the experiment", "--epochs")
    assert folder_snapshot(out) == before
    # Settings listed as changeable are accepted.
    assert main(["train", "--resume", "--epochs", "2", "--num-workers", "1", "--checkpoint-every", "2",
                 "--out", str(out)]) == 0
    assert load_checkpoint(out / "last.pt")["epoch"] == 2


def test_resume_refuses_new_epochs_when_the_schedule_is_computed_from_them(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(TRAIN + ["--model", TINY_MODEL, "--scheduler", "cosine", "--epochs", "2", "--out", str(out)]) == 0
    before = folder_snapshot(out)
    capsys.readouterr()
    assert_one_line_error(capsys, main(["train", "--resume", "--epochs", "4", "--out", str(out)]),
                          "--epochs 2", "--scheduler cosine is computed from --epochs")
    assert folder_snapshot(out) == before


def test_resume_of_every_fold_checks_each_fold_before_writing(tmp_path, capsys):
    out = tmp_path / "cv"
    assert main(TRAIN + ["--model", TINY_MODEL, "--folds", "2", "--fold", "all", "--out", str(out)]) == 0
    before = [folder_snapshot(folder) for folder in (out, out / "fold_0", out / "fold_1")]
    capsys.readouterr()
    assert_one_line_error(capsys, main(["train", "--resume", "--epochs", "2", "--image-size", "64", "--out", str(out)]),
                          "was trained with --image-size 32")
    assert [folder_snapshot(folder) for folder in (out, out / "fold_0", out / "fold_1")] == before


def test_resuming_a_finished_run_says_so_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(TRAIN + ["--model", TINY_MODEL, "--epochs", "2", "--out", str(out)]) == 0
    before = folder_snapshot(out)
    capsys.readouterr()
    for epochs in ("2", "1"):
        assert main(["train", "--resume", "--epochs", epochs, "--out", str(out)]) == 0
        err = capsys.readouterr().err
        assert f"has already trained 2 epochs (--epochs {epochs}): the run is finished, nothing to do" in err, err
        assert "epochs 3..2" not in err and "error" not in err, err
        assert folder_snapshot(out) == before


@pytest.mark.parametrize("size", ["72", "20"])
@pytest.mark.parametrize("folds", [[], ["--folds", "2", "--fold", "all"]])
def test_an_image_size_the_model_cannot_take_is_refused_before_anything_is_written(tmp_path, capsys, size, folds):
    out = tmp_path / "run"
    args = TRAIN + ["--model", "cares_unet", "--model-option", "base_channels=4", "--out", str(out)] + folds
    assert_one_line_error(capsys, main(args + ["--image-size", size]), f"--image-size {size}", "divisible by 16")
    assert not out.exists()


@pytest.mark.parametrize("text, message", [
    ("augment: 'no'\n", "--augment must be true or false, got 'no' (a string)"),
    ("milestones: 5\n", "--milestones must be a list of integers like [30, 50] or null, got 5"),
    ("epochs: ten\n", "--epochs must be an integer, got 'ten'"),
    ("model_options: carafe\n", "--model-option must be a mapping"),
    ("", "holds no settings (it is empty)"),
    ("scheduler: multistep\nmilestones: []\n", "--scheduler multistep: no milestone in []"),
    ("scheduler: multistep\nepochs: 1\n", "no milestone in [1, 1] (the default"),
])
def test_bad_yaml_settings_are_one_line_errors(tmp_path, capsys, text, message):
    config = tmp_path / "run.yaml"
    config.write_text(text)
    out = tmp_path / "run"
    assert_one_line_error(capsys, main(["train", "--config", str(config), "--out", str(out)]), message)
    assert not out.exists()


def test_yaml_numbers_without_a_dot_are_read_as_numbers(tmp_path):
    """PyYAML (YAML 1.1) reads `lr: 1e-3` as the string '1e-3'."""
    config = tmp_path / "run.yaml"
    config.write_text("lr: 1e-3\nweight_decay: 0\ngamma: 5e-1\n")
    resolved = resolve_config({"config": str(config)})
    assert (resolved.lr, resolved.weight_decay, resolved.gamma) == (1e-3, 0, 0.5)
    with pytest.raises(ValueError, match="--lr must be a number, got 'fast'"):
        resolve_config({"lr": "fast"})


def test_multistep_without_milestones_uses_the_documented_default(tmp_path):
    from cares.optim import build_scheduler, default_milestones
    config = resolve_config(dict(scheduler="multistep", epochs=12))
    assert default_milestones(config.epochs) == (6, 10)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = build_scheduler(config.scheduler, optimizer, epochs=config.epochs, milestones=config.milestones)
    rates = []
    for _ in range(config.epochs):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates == pytest.approx([1.0] * 6 + [0.1] * 4 + [0.01] * 2)


@pytest.mark.parametrize("value", [np.inf, -np.inf])
def test_infinite_voxels_fail_that_nifti_file(tmp_path, capsys, value):
    checkpoint = write_checkpoint(tmp_path / "best.pt")
    inputs = tmp_path / "in"
    inputs.mkdir()
    volume = np.full((16, 16, 2), -1000.0, np.float32)
    volume[3, 3, 1] = value
    write_volume(inputs / "inf.nii.gz", volume)
    rc = main(["predict", "--checkpoint", str(checkpoint), "--input", str(inputs), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 1 and "inf.nii.gz: failed: 'slice 1': the image holds NaN or infinite values" in err, err
    assert not (tmp_path / "out" / "masks" / "inf.nii.gz.nii.gz").exists()


def test_a_nifti_without_slices_is_named_as_such(tmp_path, capsys):
    checkpoint = write_checkpoint(tmp_path / "best.pt")
    inputs = tmp_path / "in"
    inputs.mkdir()
    write_volume(inputs / "empty.nii.gz", np.zeros((16, 16, 0), np.float32))
    rc = main(["predict", "--checkpoint", str(checkpoint), "--input", str(inputs), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc in (1, 2) and "holds no voxels (0 slices of 16x16)" in err and "axes don't match" not in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize("args, message", [
    (["--input-size", "abc"], "--input-size: input size must be integers"),
    (["--input-size", "0"], "--input-size: input size must be S"),
    (["--models", "nosuch"], "--models nosuch: unknown model"),
    (["--models", "unet[nosuch=1]"], "does not take options ['nosuch']"),
    (["--models", "unet[base_channels=0]"], "--models unet[base_channels=0]: base_channels"),
    (["--models", "unet", "--input-size", "72"], "divisible by 16, got --input-size 72x72"),
    (["--models", "segnet", "--input-size", "64,48"], "divisible by 32, got --input-size 64x48"),
])
def test_complexity_argument_errors_are_one_line(capsys, monkeypatch, args, message):
    import cares.complexity
    monkeypatch.setattr(cares.complexity, "count_compute", lambda *a: pytest.fail("work began before the checks"))
    assert_one_line_error(capsys, main(["complexity", "--no-latency"] + args), message)


def test_export_to_a_folder_is_refused_before_exporting(tmp_path, capsys, monkeypatch):
    import cares.export
    monkeypatch.setattr(cares.export, "export_onnx", lambda *a, **k: pytest.fail("exported before --out was checked"))
    checkpoint = write_checkpoint(tmp_path / "best.pt", TINY_MODEL)
    (tmp_path / "models").mkdir()
    assert_one_line_error(capsys, main(["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "models")]),
                          "is a folder", "model.onnx")


def test_export_refuses_a_checkpoint_size_its_model_cannot_take(tmp_path, capsys, monkeypatch):
    import cares.export
    monkeypatch.setattr(cares.export, "export_onnx", lambda *a, **k: pytest.fail("exported an unusable size"))
    checkpoint = write_checkpoint(tmp_path / "best.pt", TINY_MODEL)
    state = load_checkpoint(checkpoint)
    state["input"]["image_size"] = 33   # TinyTestNet needs multiples of 2 (a checkpoint from before the check)
    save_checkpoint(checkpoint, state)
    assert_one_line_error(capsys, main(["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "m.onnx")]),
                          "divisible by 2", "image size 33x33")


@pytest.mark.parametrize("bad, message", [
    (["--optimizer", "nosuch"], "--optimizer must be one of"),
    (["--scheduler", "nosuch"], "--scheduler must be one of"),
    (["--warmup-epochs", "3"], "--warmup-epochs must be in [0, --epochs 1)"),
    (["--scheduler", "multistep", "--epochs", "9", "--milestones", "5", "2"], "--milestones must be non-decreasing"),
    (["--data", "MISSING"], "MISSING"),
])
@pytest.mark.parametrize("folds", [[], ["--folds", "2", "--fold", "all"]])
def test_a_refused_run_writes_nothing_with_or_without_folds(tmp_path, capsys, bad, message, folds):
    """--fold all wrote <out>/config.yaml before its first fold checked the optimizer, schedule and data."""
    out = tmp_path / "run"
    bad = [str(tmp_path / "missing") if arg == "MISSING" else arg for arg in bad]
    message = str(tmp_path / "missing") if message == "MISSING" else message
    assert_one_line_error(capsys, main(TRAIN + ["--model", TINY_MODEL, "--out", str(out)] + folds + bad), message)
    assert not out.exists()
