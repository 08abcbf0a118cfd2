"""Semi-supervised step: the entropy filter on hand-made maps, `cares pseudo-label` end to end
(counts, layout, summary.json), and `cares train --pseudo DIR` (balanced epochs)."""
from __future__ import annotations

import csv
import io
import json
import math

import numpy as np
import pytest
from PIL import Image

from cares.cli import main
from cares.data import build_dataset, load_mask
from cares.pseudo_label import below_threshold, mean_binary_entropy
from test_train import tiny_config, tiny_models, write_checkpoint  # noqa: F401  (fixture)


def uniform_map(p: float, size: int = 16) -> np.ndarray:
    return np.full((size, size), p, np.float32)


def test_entropy_extremes_and_log_base():
    assert mean_binary_entropy(uniform_map(0.5)) == pytest.approx(1.0)                    # base 2: max is 1
    assert mean_binary_entropy(uniform_map(0.5), math.e) == pytest.approx(math.log(2))
    assert mean_binary_entropy(uniform_map(0.0)) == pytest.approx(0.0, abs=1e-9)
    half_certain = np.concatenate([uniform_map(1.0), uniform_map(0.5)])                  # mean over pixels
    assert mean_binary_entropy(half_certain) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="log_base"):
        mean_binary_entropy(uniform_map(0.5), 1.0)


def test_entropy_threshold_keeps_confident_maps_and_rejects_uncertain_ones():
    confident = np.where(np.arange(256).reshape(16, 16) % 3 == 0, 0.98, 0.02).astype(np.float32)  # H = 0.141
    uncertain = np.where(np.arange(256).reshape(16, 16) % 2 == 0, 0.6, 0.4).astype(np.float32)    # H = 0.971
    borderline = uniform_map(0.15)                                                               # H = 0.610 bits
    assert mean_binary_entropy(confident) == pytest.approx(0.1414, abs=1e-3)
    assert below_threshold(mean_binary_entropy(confident), 0.6)
    assert not below_threshold(mean_binary_entropy(uncertain), 0.6)
    assert not below_threshold(mean_binary_entropy(borderline, 2.0), 0.6)      # 0.610 bits >= 0.6
    assert below_threshold(mean_binary_entropy(borderline, math.e), 0.6)       # 0.423 nats < 0.6: the base matters
    assert below_threshold(mean_binary_entropy(borderline, 2.0), 0.62)
    assert not below_threshold(0.6, 0.6) and below_threshold(5.0, None)      # strictly below; None: no threshold


def write_unlabeled_folder(folder):
    """Slices whose pointwise-model maps are confident (dark/bright) or not (gray near 0.5)."""
    folder.mkdir(parents=True)
    slices = {
        "confident_lesion": np.where(np.arange(40 * 36).reshape(40, 36) % 36 < 12, 240, 10),
        "confident_clear": np.full((30, 30), 5),
        "uncertain_gray": np.full((32, 40), 128),                 # p = sigmoid(20 * 0.002) ~ 0.51
    }
    for name, pixels in slices.items():
        Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{name}.png")
    return slices


def test_pseudo_label_writes_kept_slices_and_counts(tmp_path, capsys):
    checkpoint = write_checkpoint(tmp_path / "best.pt")
    slices = write_unlabeled_folder(tmp_path / "unlabeled")
    out = tmp_path / "pseudo"
    assert main(["pseudo-label", "--checkpoint", str(checkpoint), "--input", str(tmp_path / "unlabeled"),
                 "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (printed["total"], printed["kept"], printed["rejected"]) == (3, 2, 1)

    summary = json.loads((out / "summary.json").read_text())
    assert summary["kept"] == 2 and summary["log_base"] == 2.0 and summary["max_entropy"] == pytest.approx(1.0)
    by_name = {row["name"]: row for row in summary["images"]}
    assert not by_name["uncertain_gray"]["kept"] and by_name["uncertain_gray"]["entropy"] > 0.99
    assert sorted(p.name for p in (out / "Imgs").iterdir()) == ["confident_clear.png", "confident_lesion.png"]
    assert sorted(p.name for p in (out / "GT").iterdir()) == ["confident_clear.png", "confident_lesion.png"]
    mask = load_mask(out / "GT" / "confident_lesion.png")
    assert mask.shape == (40, 36) and (mask == (slices["confident_lesion"] > 128)).mean() > 0.95
    copied = np.asarray(Image.open(out / "Imgs" / "confident_lesion.png"))
    np.testing.assert_array_equal(copied, slices["confident_lesion"])       # the slice itself, unchanged
    # The folder is a dataset build_dataset (and so `train --pseudo`) reads.
    assert len(build_dataset(out, split="train", image_size=32)) == 2

    # A second run refuses to mix with the first unless told to overwrite.
    args = ["pseudo-label", "--checkpoint", str(checkpoint), "--input", str(tmp_path / "unlabeled"), "--out", str(out)]
    assert main(args) == 2
    assert main(args + ["--overwrite", "--entropy-threshold", "0.01", "--log-base", "e"]) == 0
    assert json.loads((out / "summary.json").read_text())["kept"] == 1                    # only the flat dark slice


def test_train_with_pseudo_labels_draws_as_many_pseudo_as_labelled(tmp_path):
    checkpoint = write_checkpoint(tmp_path / "best.pt")
    assert main(["pseudo-label", "--checkpoint", str(checkpoint), "--input", "synthetic",
                 "--out", str(tmp_path / "pseudo"), "--entropy-threshold", "1.0"]) == 0      # keep all 32
    from cares.train import train
    result = train(tiny_config(tmp_path / "semi", pseudo=str(tmp_path / "pseudo"), epochs=2))
    rows = list(csv.DictReader(io.StringIO((tmp_path / "semi" / "log.csv").read_text())))
    assert [int(r["images"]) for r in rows] == [8, 8]                    # 4 labelled + 4 pseudo per epoch
    assert result.epochs_done == 2


def test_train_with_an_empty_pseudo_folder_says_none_were_kept(tmp_path):
    checkpoint = write_checkpoint(tmp_path / "best.pt")
    assert main(["pseudo-label", "--checkpoint", str(checkpoint), "--input", "synthetic",
                 "--out", str(tmp_path / "pseudo"), "--entropy-threshold", "1e-9"]) == 0     # keeps none
    from cares.train import train
    with pytest.raises(ValueError, match="holds no pseudo-labelled slices"):
        train(tiny_config(tmp_path / "semi", pseudo=str(tmp_path / "pseudo"), epochs=1))


def test_the_lesion_score_tells_a_doubtful_lesion_from_a_clean_one_where_the_mean_cannot():
    """Issue 20: on CT slices the background is nearly every pixel, so the paper's mean entropy is low for
    every slice; the lesion score averages over the predicted lesion and its border only."""
    from cares.pseudo_label import lesion_region, reliability_score
    background = np.full((100, 100), 0.001)
    clean, doubtful = background.copy(), background.copy()
    clean[40:50, 40:50] = 0.999
    doubtful[40:50, 40:50] = 0.6
    assert reliability_score(clean) < 0.05 and reliability_score(doubtful) < 0.05          # mean: both far below 0.6
    assert reliability_score(clean, "lesion") < 0.05
    assert reliability_score(doubtful, "lesion") > 0.45                                     # lesion: told apart
    # The region: the lesion, a border of round(0.02 * 100) = 2 pixels, and every pixel with p >= 0.1.
    region = lesion_region(clean)
    assert region.sum() == 14 * 14 and region[38:52, 38:52].all()
    unsure = background.copy()
    unsure[0, 0] = 0.2
    assert lesion_region(unsure).sum() == 1
    assert reliability_score(background, "lesion") is None                                  # predicted lesion-free
    with pytest.raises(ValueError, match="score must be one of"):
        reliability_score(clean, "median")


def test_lesion_score_keep_fraction_and_empty_slices(tmp_path, capsys):
    checkpoint = write_checkpoint(tmp_path / "best.pt")
    slices = write_unlabeled_folder(tmp_path / "unlabeled")
    faint = np.full((40, 40), 10)
    faint[10:30, 10:30] = 160                                       # p ~ 0.93 inside: a less certain lesion
    Image.fromarray(faint.astype(np.uint8)).save(tmp_path / "unlabeled" / "faint_lesion.png")
    base = ["pseudo-label", "--checkpoint", str(checkpoint), "--input", str(tmp_path / "unlabeled"),
            "--score", "lesion", "--empty", "drop", "--entropy-threshold", "none"]
    # The three slices with a predicted lesion pass; ranked by score, the third most reliable is kept.
    assert main(base + ["--out", str(tmp_path / "third"), "--keep-fraction", "0.34"]) == 0
    summary = json.loads((tmp_path / "third" / "summary.json").read_text())
    by_name = {row["name"]: row for row in summary["images"]}
    assert [p.stem for p in (tmp_path / "third" / "GT").iterdir()] == ["confident_lesion"]
    assert by_name["confident_clear"]["entropy"] is None
    assert by_name["confident_clear"]["rejected_because"] == "predicted lesion-free"
    assert (by_name["confident_lesion"]["entropy"] < by_name["faint_lesion"]["entropy"]
            < by_name["uncertain_gray"]["entropy"])
    assert by_name["faint_lesion"]["rejected_because"].startswith("not among the --keep-fraction")
    assert summary["score"] == "lesion" and "lesion-free: drop" in summary["rule"]
    # Without a fraction, a threshold on the lesion score; predicted lesion-free slices kept on request.
    assert main(base[:-4] + ["--empty", "keep", "--entropy-threshold", "0.5", "--out", str(tmp_path / "thr")]) == 0
    kept = sorted(p.stem for p in (tmp_path / "thr" / "GT").iterdir())
    assert kept == ["confident_clear", "confident_lesion", "faint_lesion"]
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "thr" / "Imgs" / "confident_lesion.png")),
                                  slices["confident_lesion"])
    capsys.readouterr()
    for bad, message in ((["--keep-fraction", "0"], "--keep-fraction must be in (0, 1]"),
                         (["--border", "0.7"], "--border must be in [0, 0.5)")):
        assert main(base + bad + ["--out", str(tmp_path / "bad")]) == 2
        assert message in capsys.readouterr().err


def test_shape_prior_rejects_masks_unlike_every_labelled_mask(tmp_path):
    """A confidently wrong pseudo mask (here: a third of the slice, touching its border) passes any entropy
    rule; --shape-prior rejects masks covering more of the slice or of its border than the labelled ones."""
    from cares.pseudo_label import mask_shape, shape_limits
    root = tmp_path / "root"
    slices = write_unlabeled_folder(root / "unlabeled" / "Imgs")
    small = np.full((40, 40), 10)
    small[16:24, 16:24] = 240                                        # 4% of the slice, away from the border
    Image.fromarray(small.astype(np.uint8)).save(root / "unlabeled" / "Imgs" / "small_lesion.png")
    for index, side in enumerate((10, 12)):                          # labelled: lesions of 6.25% and 9%
        label = np.zeros((40, 40), np.uint8)
        label[5:5 + side, 5:5 + side] = 255
        Image.fromarray(np.where(label > 0, 200, 20).astype(np.uint8)).save(_mkdir(root / "train" / "Imgs") /
                                                                             f"{index}.png")
        Image.fromarray(label).save(_mkdir(root / "train" / "GT") / f"{index}.png")
    assert mask_shape(np.pad(np.ones((2, 2), bool), 1)) == (0.25, 0.0)
    assert shape_limits(root, "train") == {"split": "train", "slices": 2, "max_lesion_fraction": 0.09,
                                           "max_border_fraction": 0.0}
    checkpoint = write_checkpoint(tmp_path / "best.pt")
    out = tmp_path / "pseudo"
    assert main(["pseudo-label", "--checkpoint", str(checkpoint), "--input", str(root), "--out", str(out),
                 "--shape-prior", "train"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    by_name = {row["name"]: row for row in summary["images"]}
    assert sorted(p.stem for p in (out / "GT").iterdir()) == ["confident_clear", "small_lesion"]
    assert by_name["confident_lesion"]["entropy"] < 0.6                              # the paper's rule keeps it
    assert "unlike every mask of the --shape-prior split 'train'" == by_name["confident_lesion"]["rejected_because"]
    assert summary["shape_prior"]["max_lesion_fraction"] == 0.09 and "0.090 of the slice" in summary["rule"]
    assert slices                                                    # (the folder's slices, for the reader)


def _mkdir(path):
    path.mkdir(parents=True, exist_ok=True)
    return path
