"""Inference: probability maps at the ground truth's own size, TTA, `cares evaluate` outputs,
`cares predict` on PNG/JPG slices and on a NIfTI volume (affine preserved).

The model is `pointwise_test_net` (logits = 20 * (x - 0.5), see test_train.py), so the expected
masks are known: lesion exactly where the image is brighter than 0.5.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cares.cli import main
from cares.data import default_data_dir, load_mask
from cares.inference import FLIPS, load_trained_model, predict_probabilities
from test_train import TINY_MODEL, tiny_models, write_checkpoint  # noqa: F401  (fixture)


def bright_square_slice(height: int, width: int, top: int, left: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(8-bit image, bool mask): a dark slice with one bright square, the square is the lesion."""
    image = np.full((height, width), 20, np.uint8)
    image[top:top + size, left:left + size] = 235
    mask = np.zeros((height, width), bool)
    mask[top:top + size, left:left + size] = True
    return image, mask


def write_labelled_split(root: Path, split: str = "test") -> dict[str, tuple[int, int]]:
    """COVID-SemiSeg layout (<root>/<split>/Imgs/*.jpg|png + GT/*.png) with slices of different sizes."""
    sizes = {"case1": (40, 36), "case2": (30, 50), "case3": (33, 33)}
    for index, (name, (h, w)) in enumerate(sizes.items()):
        image, mask = bright_square_slice(h, w, 5 + index, 6, 14)
        (root / split / "Imgs").mkdir(parents=True, exist_ok=True)
        (root / split / "GT").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / split / "Imgs" / f"{name}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(root / split / "GT" / f"{name}.png")
    return sizes


@pytest.fixture
def checkpoint(tmp_path):
    return write_checkpoint(tmp_path / "best.pt")


def test_probabilities_come_back_at_each_items_own_size(checkpoint):
    model, state, device = load_trained_model(checkpoint, "cpu")
    items = [{"image": torch.rand(1, h, w)} for h, w in ((40, 36), (32, 32), (17, 64))]
    shapes = [p.shape for _, p in predict_probabilities(model, items, image_size=32, device=device, batch_size=2)]
    assert shapes == [(40, 36), (32, 32), (17, 64)]


def test_flip_tta_averages_four_flips(checkpoint):
    model, _, device = load_trained_model(checkpoint, "cpu")
    items = [{"image": torch.rand(1, 32, 32)} for _ in range(3)]
    plain = [p for _, p in predict_probabilities(model, items, image_size=32, device=device)]
    tta = [p for _, p in predict_probabilities(model, items, image_size=32, device=device, tta=True)]
    assert len(FLIPS) == 4
    for a, b in zip(plain, tta):                        # a pointwise model commutes with flips
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_evaluate_writes_metrics_markdown_and_figures(tmp_path, checkpoint):
    sizes = write_labelled_split(tmp_path / "data")
    out = tmp_path / "eval"
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--data", str(tmp_path / "data"), "--split", "test",
                 "--out", str(out), "--tta", "--figures", "2"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_images"] == 3 and metrics["tta"] is True
    assert metrics["provenance"]["torch"] == torch.__version__ and "sha" in metrics["provenance"]["git"]
    assert {row["name"]: tuple(row["size"]) for row in metrics["per_image"]} == sizes   # scored at GT size
    for protocol in ("infnet", "threshold"):
        summary = metrics["protocols"][protocol]
        assert {"dice_mean", "dice_std", "mae_mean", "s_measure_std", "count"} <= set(summary)
        assert set(metrics["per_image"][0][protocol]) == {"dice", "sensitivity", "specificity", "s_measure",
                                                           "e_measure", "mae"}
    assert metrics["protocols"]["threshold"]["dice_mean"] > 0.85                     # the model is near perfect
    table = (out / "metrics.md").read_text()
    assert "| infnet |" in table and "| threshold |" in table and "+-" in table
    assert sorted(p.name for p in (out / "figures").iterdir()) == ["case1.png", "case2.png"]
    figure = Image.open(out / "qualitative.png")
    assert figure.mode == "RGB" and figure.height > 2 * 100


def test_evaluate_reports_a_missing_split(tmp_path, checkpoint, capsys):
    write_labelled_split(tmp_path / "data")
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--data", str(tmp_path / "data"), "--split", "val",
                 "--out", str(tmp_path / "eval")]) == 2
    assert "'val'" in capsys.readouterr().err


def test_predict_png_and_jpg_slices(tmp_path, checkpoint):
    inputs = tmp_path / "slices"
    inputs.mkdir()
    expected = {}
    for name, (h, w), suffix in (("a", (40, 36), ".png"), ("b", (30, 50), ".jpg")):
        image, mask = bright_square_slice(h, w, 8, 8, 16)
        Image.fromarray(image).save(inputs / f"{name}{suffix}", quality=95)
        expected[f"{name}{suffix}"] = mask
    assert main(["predict", "--checkpoint", str(checkpoint), "--input", str(inputs), "--out", str(tmp_path / "out")]) == 0
    for name, mask in expected.items():
        predicted = load_mask(tmp_path / "out" / "masks" / f"{name}.png")
        soft = np.asarray(Image.open(tmp_path / "out" / "probabilities" / f"{name}.png"))
        assert predicted.shape == soft.shape == mask.shape                             # the slice's own size
        assert soft.dtype == np.uint8 and set(np.unique(np.asarray(Image.open(
            tmp_path / "out" / "masks" / f"{name}.png")))) <= {0, 255}
        assert (predicted == mask).mean() > 0.95
    # A single file works too.
    assert main(["predict", "--checkpoint", str(checkpoint), "--input", str(inputs / "a.png"),
                 "--out", str(tmp_path / "single")]) == 0
    assert [p.name for p in (tmp_path / "single" / "masks").iterdir()] == ["a.png.png"]


def test_predict_nifti_volume_keeps_the_affine(tmp_path, checkpoint):
    nibabel = pytest.importorskip("nibabel")
    from cares.data import read_nifti
    # (X, Y, Z) = (24, 20, 3) in HU: air-like background, a dense block (inside the lung window's top).
    data = np.full((24, 20, 3), -1000.0, np.float32)
    data[4:12, 5:15, 1] = 100.0
    affine = np.array([[0.7, 0, 0, -80.0], [0, 0.7, 0, -60.0], [0, 0, 2.5, 30.0], [0, 0, 0, 1]])
    nibabel.save(nibabel.Nifti1Image(data, affine), str(tmp_path / "scan.nii.gz"))

    assert main(["predict", "--checkpoint", str(checkpoint), "--input", str(tmp_path / "scan.nii.gz"),
                 "--out", str(tmp_path / "out")]) == 0
    written = nibabel.load(str(tmp_path / "out" / "masks" / "scan.nii.gz.nii.gz"))
    np.testing.assert_allclose(written.affine, affine)
    assert written.shape == data.shape and written.get_data_dtype() == np.uint8
    mask, _ = read_nifti(tmp_path / "out" / "masks" / "scan.nii.gz.nii.gz")              # (D, H, W) = (Z, Y, X)
    expected = (data > -650 + 0.0).transpose(2, 1, 0)                                # window centre -> p = 0.5
    assert (mask.astype(bool) == expected).mean() > 0.95 and mask[1].sum() > 0 and mask[0].sum() == 0
    soft = nibabel.load(str(tmp_path / "out" / "probabilities" / "scan.nii.gz.nii.gz"))
    np.testing.assert_allclose(soft.affine, affine)


def test_predict_rejects_unknown_input(tmp_path, checkpoint, capsys):
    (tmp_path / "notes.txt").write_text("not an image")
    assert main(["predict", "--checkpoint", str(checkpoint), "--input", str(tmp_path / "notes.txt"),
                 "--out", str(tmp_path / "out")]) == 2
    assert "neither a 2-D image" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(default_data_dir() is None, reason="COVID-SemiSeg not found beside the repository")
def test_evaluate_on_covid_semiseg_test_split(tmp_path):
    """The real layout (JPEG slices of varying size, 0/255 PNG masks): each image is scored at its
    own size; an untrained tiny model keeps it quick."""
    checkpoint = write_checkpoint(tmp_path / "tiny.pt", TINY_MODEL, image_size=64)
    out = tmp_path / "eval"
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--data", str(default_data_dir()),
                 "--split", "test", "--out", str(out), "--figures", "1"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_images"] == 48
    assert len({tuple(row["size"]) for row in metrics["per_image"]}) > 1
