"""`cares reproduce`: the tiny preset end to end on a small COVID-SemiSeg-shaped folder, an interrupted
experiment continued by rerunning it, the table's contents, and the errors for bad experiments."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cares.data import render_synthetic_slice, save_png
from cares.reproduce import (PAPER_TABLE1, experiment_from_dict, load_experiment, preset_names, reproduce)

ROOT = Path(__file__).resolve().parents[1]


def write_covid_semiseg_like(root: Path, sizes=(("train", 6), ("test", 4), ("unlabeled", 6)), side=40) -> Path:
    """Synthetic slices in COVID-SemiSeg's layout: <split>/Imgs/<n>.png (+ <split>/GT/<n>.png when labelled)."""
    rng = np.random.default_rng(0)
    for split, count in sizes:
        for index in range(count):
            image, mask = render_synthetic_slice(rng, side)
            save_png(root / split / "Imgs" / f"{index}.png", image)
            if split != "unlabeled":
                save_png(root / split / "GT" / f"{index}.png", mask)
    return root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_covid_semiseg_like(tmp_path_factory.mktemp("covid"))


def test_every_preset_loads_and_the_cpu_preset_holds_what_the_protocol_needs():
    assert {"paper", "cpu", "h200", "tiny"} <= set(preset_names())
    for name in preset_names():
        load_experiment(name)                                  # every setting resolves
    cpu = load_experiment("cpu")
    runs = {run.name: run for run in cpu.runs}
    assert all(len(run.seeds) >= 3 for run in cpu.runs)                       # statistics need seeds
    assert runs["semi_paper"].semi and runs["semi_paper"].semi_from == "scratch"   # the paper retrains
    assert runs["semi_project"].pseudo_label["shape_prior"] == "train" and runs["semi_project"].semi_from == "supervised"
    assert runs["unet"].model_options == runs["cares_unet"].model_options      # the same width
    assert runs["res_unet"].model_options == {**runs["cares_unet"].model_options, "upsampler": "deconv"}
    assert {(c.better, c.than) for c in cpu.comparisons} >= {("semi_paper", "cares_unet"), ("cares_unet", "unet"),
                                                             ("cares_unet", "res_unet")}
    assert cpu.train["image_size"] >= 160
    paper = load_experiment("paper")
    assert paper.train["image_size"] == 256 and paper.train["optimizer"] == "ranger"
    assert {run.paper for run in paper.runs} == {"CARes-UNet", "Semi-CARes-UNet", "U-Net", "UNet-ResNet34"}


def test_tiny_experiment_end_to_end_and_continued_after_an_interruption(dataset, tmp_path):
    experiment = load_experiment("tiny")
    out = tmp_path / "exp"
    # Interrupted after two steps (the supervised training and its evaluation)...
    partial = reproduce(experiment, str(dataset), out, stop_after_steps=2)
    rows = {row["run"]: row for row in partial["rows"]}
    assert rows["cares_unet"]["finished_seeds"] == [0] and rows["semi_cares_unet"]["finished_seeds"] == []
    assert partial["comparisons"][0]["protocols"] == {"infnet": None, "threshold": None}      # pending
    supervised_done = (out / "cares_unet" / "seed_0" / "train" / "done.json").stat().st_mtime_ns
    # ...and the same call again continues: the finished steps are not redone.
    table = reproduce(experiment, str(dataset), out)
    assert (out / "cares_unet" / "seed_0" / "train" / "done.json").stat().st_mtime_ns == supervised_done
    rows = {row["run"]: row for row in table["rows"]}
    assert rows["semi_cares_unet"]["finished_seeds"] == [0]
    # The semi run reused the supervised run of the same model and seed instead of training its own.
    assert not (out / "semi_cares_unet" / "seed_0" / "supervised").exists()
    pseudo = json.loads((out / "semi_cares_unet" / "seed_0" / "pseudo" / "summary.json").read_text())
    assert pseudo["total"] == 6
    semi_config = (out / "semi_cares_unet" / "seed_0" / "train" / "config.yaml").read_text()
    assert "init_from:" in semi_config and "cares_unet/seed_0/train/last.pt" in semi_config

    for row in rows.values():
        for protocol in ("infnet", "threshold"):
            dice = row["protocols"][protocol]["dice"]
            assert 0.0 <= dice["mean"] <= 1.0 and dice["std"] == 0.0 and dice["n"] == 1
    assert rows["cares_unet"]["paper"] == PAPER_TABLE1["CARes-UNet"]
    assert table["environment"]["torch"] and "git" in table["environment"]
    markdown = (out / "table1.md").read_text()
    assert "| CARes-UNet (`cares_unet[base_channels=4]`) | 1/1 |" in markdown and "0.731" in markdown
    # The claim "semi beats supervised": a paired difference over the seed and the 4 test images.
    claim, lesion_claim = table["comparisons"]
    assert lesion_claim["better"] == "semi_lesion"
    assert lesion_claim["protocols"]["infnet"]["n_images"] == 4
    # The project's semi row: its own pseudo-label rule (the most reliable half by lesion entropy), continued
    # from the supervised weights.
    lesion = json.loads((out / "semi_lesion" / "seed_0" / "pseudo" / "summary.json").read_text())
    assert (lesion["score"], lesion["keep_fraction"], lesion["entropy_threshold"]) == ("lesion", 0.5, None)
    assert lesion["empty"] == "drop" and lesion["kept"] == 3                    # half of the 6 unlabeled slices
    assert "cares_unet/seed_0/train/last.pt" in (out / "semi_lesion" / "seed_0" / "train" / "config.yaml").read_text()
    assert (claim["better"], claim["than"]) == ("semi_cares_unet", "cares_unet")
    for protocol in ("infnet", "threshold"):
        result = claim["protocols"][protocol]
        semi, supervised = (rows[r]["protocols"][protocol]["dice"]["mean"] for r in ("semi_cares_unet", "cares_unet"))
        assert result["mean"] == pytest.approx(semi - supervised)
        assert result["ci_low"] <= result["mean"] <= result["ci_high"]
        assert (result["n_seeds"], result["n_images"], result["seeds"]) == (1, 4, [0])
    assert "## Claims: paired Dice differences" in markdown and "| semi-supervision beats supervised |" in markdown
    for name in ("table1.json", "qualitative.png", "loss_curves.png", "experiment.json"):
        assert (out / name).is_file(), name

    # A third call has nothing left to do.
    again = reproduce(experiment, str(dataset), out)
    assert again["rows"] == table["rows"]

    # Results committed without their checkpoints (as results/ holds them): rerunning the command on
    # a copy rebuilds the table from the records; the saved config.yaml files, which name checkpoints
    # that are gone, are not read back as settings.
    copy = tmp_path / "committed"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("*.pt"))
    assert reproduce(experiment, str(dataset), copy)["rows"] == table["rows"]


def test_a_killed_training_resumes_when_the_command_is_rerun(dataset, tmp_path):
    """SIGKILL the CLI in the middle of the first training, then rerun the same command to the end."""
    import signal
    import time
    out = tmp_path / "exp"
    command = [sys.executable, "-m", "cares", "reproduce", "--preset", "tiny", "--data", str(dataset),
               "--out", str(out)]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = out / "cares_unet" / "seed_0" / "train" / "last.pt"
    deadline = time.monotonic() + 120
    while not last.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert "| Semi-CARes-UNet" in finished.stdout
    log = (out / "cares_unet" / "seed_0" / "train" / "log.csv").read_text().splitlines()
    assert len(log) == 1 + 2                                    # each of the 2 epochs logged exactly once


@pytest.mark.parametrize("change, message", [
    ({"runs": []}, "runs must be a non-empty list"),
    ({"bogus": 1}, "unknown key"),
    ({"train": {"epochs": 0}}, "--epochs must be >= 1"),
    ({"train": {"seed": 3}}, "set per run by the experiment"),
    ({"runs": [{"name": "a", "model": "nosuch"}]}, "nosuch"),
    ({"runs": [{"name": "a", "model": "unet", "model_options": {"nosuch": 1}}]}, "nosuch"),
    ({"runs": [{"name": "a", "model": "unet", "seeds": [0, 0]}]}, "distinct"),
    ({"runs": [{"name": "a b", "model": "unet"}]}, "letters, digits"),
    ({"runs": [{"name": "a", "model": "unet", "paper": "Nope"}]}, "paper must be one of"),
    ({"comparisons": [{"better": "a", "than": "zz", "claim": "c"}]}, "than must name a run"),
    ({"comparisons": [{"better": "a", "than": "a", "claim": "c"}]}, "with itself"),
    ({"comparisons": [{"better": "a", "claim": "c"}]}, "must map exactly"),
    ({"runs": [{"name": "a", "model": "unet"}, {"name": "b", "model": "unet", "seeds": [1]}],
      "comparisons": [{"better": "a", "than": "b", "claim": "c"}]}, "share no seed"),
])
def test_bad_experiments_are_refused_before_any_work(change, message):
    values = {"train": {"image_size": 32, "epochs": 1}, "runs": [{"name": "a", "model": "unet"}]}
    values.update(change)
    with pytest.raises(ValueError, match=message):
        experiment_from_dict(values)


def test_cli_errors_are_one_line_with_rc_2(tmp_path):
    result = subprocess.run([sys.executable, "-m", "cares", "reproduce", "--preset", "nosuch", "--out",
                             str(tmp_path / "x")], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and "error: --preset 'nosuch' does not exist" in result.stderr
    assert "Traceback" not in result.stderr


def test_parallel_jobs_give_the_serial_results_and_continue_after_a_failure(dataset, tmp_path):
    """--jobs 2 runs independent steps side by side in processes of their own (semi steps wait for their
    supervised run) and gets exactly the serial numbers; a failing step is reported with its log."""
    import yaml
    experiment = yaml.safe_load((ROOT / "cares" / "presets" / "tiny.yaml").read_text())
    for run in experiment["runs"]:
        run["seeds"] = [0, 1]
    experiment["figure_slices"] = 0
    config = tmp_path / "two-seeds.yaml"
    config.write_text(yaml.safe_dump(experiment))

    def command(out, *extra):
        return subprocess.run([sys.executable, "-m", "cares", "reproduce", "--config", str(config), "--data",
                               str(dataset), "--out", str(out), "--threads", "1", *extra],
                              cwd=ROOT, capture_output=True, text=True, timeout=900)

    serial = command(tmp_path / "serial")
    assert serial.returncode == 0, serial.stderr[-2000:]
    parallel = command(tmp_path / "parallel", "--jobs", "2")
    assert parallel.returncode == 0, parallel.stderr[-2000:]
    assert "2 at a time" in parallel.stderr and "2 of 2 running" in parallel.stderr
    tables = [json.loads((tmp_path / name / "table1.json").read_text()) for name in ("serial", "parallel")]
    scores = [[[(r["seed"], r["protocols"]) for r in row["per_seed"]] for row in table["rows"]] for table in tables]
    assert scores[0] == scores[1] and len(scores[0][1]) == 2            # bitwise the same metrics, both seeds
    assert tables[0]["comparisons"][0]["protocols"] == tables[1]["comparisons"][0]["protocols"]
    assert (tmp_path / "parallel" / "cares_unet" / "seed_1" / "train.log").is_file()

    # A step that fails (its model's weights made unreadable) is named with its log; rerunning continues.
    broken = tmp_path / "parallel"
    for seed in (0, 1):
        (broken / "semi_cares_unet" / f"seed_{seed}" / "eval" / "done.json").unlink()
        (broken / "semi_cares_unet" / f"seed_{seed}" / "train" / "last.pt").write_bytes(b"garbage")
    # A healthy run finishing beside them rewrites the table at once, though the command then fails.
    (broken / "cares_unet" / "seed_0" / "eval" / "done.json").unlink()
    (broken / "table1.json").unlink()
    failed = command(broken, "--jobs", "2")
    assert failed.returncode == 1 and "error: step(s) failed: evaluate" in failed.stderr
    assert json.loads((broken / "table1.json").read_text())["rows"][0]["finished_seeds"] == [0, 1]
    assert "see " in failed.stderr and "eval.log" in failed.stderr and "Traceback" not in failed.stderr.splitlines()[-1]


def test_another_experiment_in_the_same_out_is_refused(dataset, tmp_path, capsys):
    """Issue 23, item 3: a second experiment into an --out holding another one's finished steps is refused
    (the choice stated in `cares reproduce --help`), instead of reporting the first one's models under
    the second one's name; experiment.json, which records every setting, is left as it was."""
    import dataclasses

    from cares.cli import main
    tiny = load_experiment("tiny")
    out = tmp_path / "exp"
    reproduce(tiny, str(dataset), out, stop_after_steps=1)      # the first training is done
    recorded = (out / "experiment.json").read_bytes()
    assert json.loads(recorded)["steps"]["cares_unet/seed_0/train"]["epochs"] == 2

    longer = dataclasses.replace(tiny, train={**tiny.train, "epochs": 3})
    with pytest.raises(ValueError, match=r"holds another experiment .*epochs.*: 2 there, 3 now"):
        reproduce(longer, str(dataset), out, stop_after_steps=0)
    rc = main(["reproduce", "--preset", "cpu", "--data", str(dataset), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "error: --out" in err and "holds another experiment" in err and "Traceback" not in err
    assert (out / "experiment.json").read_bytes() == recorded
    # The same experiment continues; rewording its description is not a change.
    reworded = dataclasses.replace(tiny, description="other words")
    reproduce(reworded, str(dataset), out, stop_after_steps=0)


def test_reproduce_refuses_an_out_it_did_not_write_or_that_holds_the_data(dataset, tmp_path):
    tiny = load_experiment("tiny")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "table1.md").write_text("a user's table")
    with pytest.raises(ValueError, match="table1.md .*which cares reproduce did not write"):
        reproduce(tiny, str(dataset), foreign, stop_after_steps=0)
    assert (foreign / "table1.md").read_text() == "a user's table"
    with pytest.raises(ValueError, match="is --data"):
        reproduce(tiny, str(dataset), dataset, stop_after_steps=0)


def test_runs_may_be_added_to_an_experiment_but_its_steps_not_changed(dataset, tmp_path):
    """An experiment file that only adds a run continues the experiment (the finished steps are kept); a
    semi run's own settings (semi_from, pseudo_label) are settings of its steps, so changing one is refused."""
    import dataclasses
    tiny = load_experiment("tiny")
    supervised_only = dataclasses.replace(tiny, runs=tiny.runs[:1], comparisons=())
    out = tmp_path / "exp"
    reproduce(supervised_only, str(dataset), out)
    done = (out / "cares_unet" / "seed_0" / "train" / "done.json").stat().st_mtime_ns
    semi = dataclasses.replace(tiny.runs[1], semi_from="scratch", pseudo_label={"entropy_threshold": 1.5})
    added = dataclasses.replace(tiny, runs=(tiny.runs[0], semi), comparisons=())
    table = reproduce(added, str(dataset), out)
    assert (out / "cares_unet" / "seed_0" / "train" / "done.json").stat().st_mtime_ns == done
    assert [row["finished_seeds"] for row in table["rows"]] == [[0], [0]]
    recorded = json.loads((out / "experiment.json").read_text())["steps"]
    assert recorded["semi_cares_unet/seed_0/train"]["init_from"] is None               # semi_from: scratch
    assert recorded["semi_cares_unet/seed_0/pseudo"]["entropy_threshold"] == 1.5       # the run's own setting
    assert json.loads((out / "semi_cares_unet" / "seed_0" / "pseudo" / "summary.json").read_text())[
        "entropy_threshold"] == 1.5
    changed = dataclasses.replace(added, runs=(tiny.runs[0], dataclasses.replace(semi, semi_from="supervised")))
    with pytest.raises(ValueError, match=r"holds another experiment .*semi_cares_unet/seed_0/train.init_from"):
        reproduce(changed, str(dataset), out)
    with pytest.raises(ValueError, match=r"semi_from must be one of"):
        experiment_from_dict({**_tiny_dict(), "runs": [{"name": "s", "model": "cares_unet", "semi": True,
                                                        "semi_from": "imagenet"}]})
    with pytest.raises(ValueError, match=r"apply to semi runs only"):
        experiment_from_dict({**_tiny_dict(), "runs": [{"name": "s", "model": "cares_unet", "semi_from": "scratch"}]})


def _tiny_dict():
    import yaml
    from cares.reproduce import PRESET_DIR
    return yaml.safe_load((PRESET_DIR / "tiny.yaml").read_text())
