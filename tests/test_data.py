"""Tests of cares.data: real-slice loaders, layouts, synthetic data, resizing, augmentation, NIfTI.

Real data is read from ../shared/data/covid-semiseg (or $CARES_DATA_DIR); those tests skip when
it is absent. Everything else builds small files in tmp_path.
"""
from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from cares.data import (AugmentConfig, ImageFolderDataset, SyntheticCT, augment_pair, build_dataset,
                        default_data_dir, item_generator, load_image, load_mask, resize_image,
                        resize_mask, save_png, window_hu)
from cares.data import nifti as nifti_module

DATA_DIR = default_data_dir()
needs_real_data = pytest.mark.skipif(
    DATA_DIR is None, reason="COVID-SemiSeg data not found (looked in $CARES_DATA_DIR, else ../shared/data/covid-semiseg)")

try:
    import nibabel
except ImportError:
    nibabel = None
HAS_NIBABEL = nibabel is not None
needs_nibabel = pytest.mark.skipif(not HAS_NIBABEL, reason="nibabel not installed (pip install nibabel)")


def check_item(item, size, labeled=True):
    """The item contract shared by every dataset."""
    assert set(item) == ({"image", "mask", "name", "orig_size"} if labeled else {"image", "name", "orig_size"})
    image = item["image"]
    assert image.dtype == torch.float32 and image.shape == (1, size, size)
    assert 0.0 <= image.min() and image.max() <= 1.0
    if labeled:
        mask = item["mask"]
        assert mask.dtype == torch.float32 and mask.shape == (1, size, size)
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert isinstance(item["name"], str)
    h, w = item["orig_size"]
    assert isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0


def write_pair(folder_images, folder_masks, stem, size=(20, 30), image_suffix=".jpg"):
    """A random gray image and a 0/255 mask (a filled rectangle) with the given (H, W)."""
    rng = np.random.default_rng(zlib.crc32(stem.encode()))   # str hash() varies per process
    folder_images.mkdir(parents=True, exist_ok=True)
    folder_masks.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, size, dtype=np.uint8)).save(folder_images / f"{stem}{image_suffix}")
    mask = np.zeros(size, dtype=np.uint8)
    mask[2:8, 3:12] = 255
    Image.fromarray(mask).save(folder_masks / f"{stem}.png")


# ------------------------------------------------------------------------------------------------
# Real COVID-SemiSeg slices
# ------------------------------------------------------------------------------------------------

@needs_real_data
def test_real_readers_give_unit_range_gray_and_binary_masks():
    image_path = sorted((DATA_DIR / "train" / "Imgs").glob("*.jpg"))[0]
    mask_path = DATA_DIR / "train" / "GT" / f"{image_path.stem}.png"
    image, mask = load_image(image_path), load_mask(mask_path)
    assert image.dtype == np.float32 and image.ndim == 2 and 0 <= image.min() and image.max() <= 1
    assert image.max() > 0.5 and image.std() > 0.05           # a real slice, not a constant
    assert mask.dtype == np.bool_ and mask.shape == image.shape
    assert 0 < mask.mean() < 0.5
    with Image.open(image_path) as picture:
        assert image.shape == (picture.height, picture.width)


@needs_real_data
@pytest.mark.parametrize("split, count", [("train", 50), ("test", 48)])
def test_real_labeled_splits(split, count):
    dataset = build_dataset(DATA_DIR, split, image_size=64)
    assert len(dataset) == count
    assert set(dataset.stems) == {p.stem for p in (DATA_DIR / split / "GT").glob("*.png")}
    for index in (0, len(dataset) - 1):
        item = dataset[index]
        check_item(item, 64)
        stem = item["name"]
        assert (DATA_DIR / split / "Imgs" / f"{stem}.jpg").is_file()
        with Image.open(DATA_DIR / split / "GT" / f"{stem}.png") as gt:
            assert item["orig_size"] == (gt.height, gt.width)
        assert item["mask"].sum() > 0


@needs_real_data
def test_real_unlabeled_split_has_no_masks_and_natural_order():
    dataset = build_dataset(DATA_DIR, "unlabeled", image_size=32)
    assert len(dataset) == 1600
    check_item(dataset[0], 32, labeled=False)
    assert dataset.stems.index("Data-1_coronacases_org_001_2") < dataset.stems.index("Data-1_coronacases_org_001_10")


@needs_real_data
def test_real_labeled_false_drops_masks_and_augment_keeps_contract():
    check_item(build_dataset(DATA_DIR, "test", image_size=48, labeled=False)[0], 48, labeled=False)
    augmented = build_dataset(DATA_DIR, "train", image_size=48, augment=True, seed=3)
    check_item(augmented[5], 48)


# ------------------------------------------------------------------------------------------------
# Synthetic data
# ------------------------------------------------------------------------------------------------

def test_synthetic_items_follow_the_contract():
    dataset = SyntheticCT(4, image_size=64, seed=0)
    for index in range(4):
        item = dataset[index]
        check_item(item, 64)
        assert item["name"] == f"synthetic_{index}" and item["orig_size"] == (64, 64)


def test_synthetic_is_deterministic_and_order_independent():
    forward = [SyntheticCT(6, image_size=48, seed=7)[i] for i in range(6)]
    backward_dataset = SyntheticCT(6, image_size=48, seed=7)
    backward = {i: backward_dataset[i] for i in reversed(range(6))}
    for index in range(6):
        assert torch.equal(forward[index]["image"], backward[index]["image"])
        assert torch.equal(forward[index]["mask"], backward[index]["mask"])
    # item i does not depend on how many items the dataset has
    assert torch.equal(SyntheticCT(2, image_size=48, seed=7)[1]["image"], forward[1]["image"])
    other_seed = SyntheticCT(6, image_size=48, seed=8)[0]["image"]
    assert not torch.equal(other_seed, forward[0]["image"])


def test_synthetic_lesions_are_present_varied_and_inside_the_image():
    dataset = SyntheticCT(40, image_size=64, seed=1)
    lesion_fractions = np.array([dataset[i]["mask"].mean().item() for i in range(len(dataset))])
    assert (lesion_fractions == 0).sum() >= 2                  # some slices are lesion-free
    assert (lesion_fractions > 0).mean() > 0.6                 # most have lesions
    assert lesion_fractions.max() < 0.25                       # lesions are patches, not the lung


def test_synthetic_lesions_are_brighter_than_lung_but_overlap_vessels():
    """Lesion pixels are mid-gray: brighter than the dark lung, and some non-lesion pixels
    (vessels, tissue) are at least as bright, so intensity alone does not segment them."""
    dataset = SyntheticCT(12, image_size=96, seed=2)
    lesion_values, other_values = [], []
    for index in range(len(dataset)):
        item = dataset[index]
        image, mask = item["image"][0], item["mask"][0].bool()
        lesion_values.append(image[mask])
        other_values.append(image[~mask])
    lesion_values, other_values = torch.cat(lesion_values), torch.cat(other_values)
    assert 0.25 < lesion_values.median() < 0.6
    lesion_band = (other_values > lesion_values.quantile(0.25)) & (other_values < lesion_values.quantile(0.75))
    assert lesion_band.sum() > 0.1 * lesion_values.numel()


def test_synthetic_splits_are_disjoint_with_default_sizes():
    sizes = {split: len(build_dataset("synthetic", split, image_size=32))
             for split in ("train", "val", "test", "unlabeled")}
    assert sizes == {"train": 64, "val": 16, "test": 16, "unlabeled": 32}
    firsts = [build_dataset("synthetic", split, image_size=32, num_samples=1)[0]["image"]
              for split in ("train", "val", "test", "unlabeled")]
    for i in range(len(firsts)):
        for j in range(i + 1, len(firsts)):
            assert not torch.equal(firsts[i], firsts[j])
    check_item(build_dataset("synthetic", "unlabeled", image_size=32, num_samples=2)[0], 32, labeled=False)
    unlabeled_train = build_dataset("synthetic", "train", image_size=32, num_samples=2, labeled=False)[1]
    check_item(unlabeled_train, 32, labeled=False)
    assert torch.equal(unlabeled_train["image"], build_dataset("synthetic", "train", image_size=32)[1]["image"])


def test_synthetic_rejects_bad_arguments():
    with pytest.raises(ValueError, match="num_samples"):
        SyntheticCT(0)
    with pytest.raises(TypeError, match="image_size"):
        SyntheticCT(2, image_size=64.0)
    with pytest.raises(ValueError, match="synthetic split"):
        build_dataset("synthetic", "validation")
    with pytest.raises(TypeError, match="window"):
        build_dataset("synthetic", window=(1, 2))


# ------------------------------------------------------------------------------------------------
# Resizing and augmentation
# ------------------------------------------------------------------------------------------------

def test_resize_image_is_bilinear_in_range_and_resize_mask_is_nearest():
    constant = torch.full((1, 37, 53), 0.4)
    assert torch.allclose(resize_image(constant, 16), torch.full((1, 16, 16), 0.4))
    ramp = torch.linspace(0, 1, 40).repeat(1, 40, 1)
    resized = resize_image(ramp, 20)
    assert resized.shape == (1, 20, 20) and 0 <= resized.min() and resized.max() <= 1
    assert len(resized.unique()) > 10                         # interpolated, not nearest

    checker = torch.zeros(1, 4, 4)
    checker[0, :2, :2] = 1                                    # top-left quadrant
    upsampled = resize_mask(checker, 8)
    expected = torch.zeros(1, 8, 8)
    expected[0, :4, :4] = 1
    assert torch.equal(upsampled, expected)
    downsampled = resize_mask(torch.rand(1, 50, 70) > 0.5, 16)
    assert downsampled.dtype == torch.float32 and set(downsampled.unique().tolist()) <= {0.0, 1.0}


def test_dataset_resizes_images_bilinear_and_masks_nearest(tmp_path):
    write_pair(tmp_path / "Imgs", tmp_path / "GT", "a", size=(20, 30))
    item = build_dataset(tmp_path, image_size=60)[0]
    assert item["orig_size"] == (20, 30)
    rows, cols = torch.nonzero(item["mask"][0], as_tuple=True)
    # the 0/255 rectangle rows 2..7, columns 3..11 scales by 3 and 2: rows 6..23, columns 6..23
    assert (rows.min().item(), rows.max().item()) == (6, 23)
    assert (cols.min().item(), cols.max().item()) == (6, 23)
    kept = build_dataset(tmp_path, image_size=None)[0]
    assert kept["image"].shape == (1, 20, 30)
    assert torch.allclose(kept["image"][0], torch.from_numpy(load_image(tmp_path / "Imgs" / "a.jpg")))


def marker_pair(size=64):
    """A bright off-centre square in the image and the same square in the mask (asymmetric, so a
    flip or rotation that moved only one of them would be caught)."""
    image = torch.full((1, size, size), 0.1)
    mask = torch.zeros(1, size, size)
    image[0, 10:26, 36:50] = 0.9
    mask[0, 10:26, 36:50] = 1.0
    return image, mask


def test_augmentation_keeps_image_and_mask_aligned():
    image, mask = marker_pair()
    moved = 0
    for index in range(40):
        out_image, out_mask = augment_pair(image, mask, item_generator(0, 0, index))
        assert out_image.shape == image.shape and out_mask.shape == mask.shape
        assert set(out_mask.unique().tolist()) <= {0.0, 1.0}
        assert 0 <= out_image.min() and out_image.max() <= 1
        # the marker is the region brighter than the mean of its two levels after intensity jitter
        bright = out_image[0] > (out_image[0].max() + out_image[0].min()) / 2
        marked = out_mask[0].bool()
        iou = (bright & marked).sum() / (bright | marked).sum()
        assert iou > 0.85, f"item {index}: image and mask disagree (IoU {iou:.2f})"
        moved += not torch.equal(out_mask, mask)
    assert moved > 30                                          # the geometry really changes


def test_augmentation_is_reproducible_per_seed_epoch_index_and_image_only_without_mask():
    image, mask = marker_pair()
    first = augment_pair(image, mask, item_generator(5, 2, 9))
    again = augment_pair(image, mask, item_generator(5, 2, 9))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    different = [augment_pair(image, mask, item_generator(*key))[0] for key in [(6, 2, 9), (5, 3, 9), (5, 2, 8)]]
    assert not any(torch.equal(first[0], other) for other in different)
    image_only, no_mask = augment_pair(image, None, item_generator(5, 2, 9))
    assert no_mask is None and torch.equal(image_only, first[0])


def test_augmentation_config_switches_steps_off():
    image, mask = marker_pair()
    identity = AugmentConfig(flip_prob=0, rot90=False, affine_prob=0, intensity_prob=0)
    out_image, out_mask = augment_pair(image, mask, item_generator(0, 0, 0), identity)
    assert torch.equal(out_image, image) and torch.equal(out_mask, mask)
    intensity_only = AugmentConfig(flip_prob=0, rot90=False, affine_prob=0, intensity_prob=1)
    out_image, out_mask = augment_pair(image, mask, item_generator(0, 0, 0), intensity_only)
    assert torch.equal(out_mask, mask) and not torch.equal(out_image, image)
    with pytest.raises(ValueError, match="flip_prob"):
        AugmentConfig(flip_prob=1.5)


def test_dataset_augmentation_follows_set_epoch():
    dataset = SyntheticCT(3, image_size=32, seed=4, augment=True)
    epoch0 = dataset[1]["image"]
    assert torch.equal(dataset[1]["image"], epoch0)           # same epoch, same augmentation
    dataset.set_epoch(1)
    assert not torch.equal(dataset[1]["image"], epoch0)
    dataset.set_epoch(0)
    assert torch.equal(dataset[1]["image"], epoch0)
    with pytest.raises(ValueError, match="epoch"):
        dataset.set_epoch(-1)


def test_cache_in_memory_serves_the_same_items_and_stops_reading(monkeypatch):
    from torch.utils.data import ConcatDataset, Subset

    from cares.sampling import cache_in_memory
    plain = SyntheticCT(5, image_size=24, seed=2, augment=True)
    expected = {}
    for epoch in (0, 3):
        plain.set_epoch(epoch)
        expected[epoch] = [plain[index] for index in range(5)]
    cached = SyntheticCT(5, image_size=24, seed=2, augment=True)
    cache_in_memory(ConcatDataset([Subset(cached, [0, 1]), cached]))   # found inside the wrappers
    monkeypatch.setattr(SyntheticCT, "load_slice", lambda self, index: pytest.fail("read after caching"))
    for epoch in (0, 3):
        cached.set_epoch(epoch)
        for index in range(5):
            # Decoding and resizing are deterministic: the same items, augmentation included.
            item = cached[index]
            assert torch.equal(item["image"], expected[epoch][index]["image"])
            assert torch.equal(item["mask"], expected[epoch][index]["mask"])
            assert item["mask"].dtype == torch.float32
            assert (item["name"], item["orig_size"]) == (expected[epoch][index]["name"], expected[epoch][index]["orig_size"])


# ------------------------------------------------------------------------------------------------
# Layouts and readers on small files
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("images, masks, under_split", [
    ("Imgs", "GT", True), ("images", "masks", True), ("images", "masks", False), ("Imgs", "GT", False),
    (".", "masks", False)])                                   # loose slices with a masks/ sub-folder
def test_folder_layouts(tmp_path, images, masks, under_split):
    data_dir = tmp_path / "train" if under_split else tmp_path
    for stem in ("2", "10", "1"):
        write_pair(data_dir / images, data_dir / masks, stem, image_suffix=".png")
    dataset = build_dataset(tmp_path, "train", image_size=16)
    assert isinstance(dataset, ImageFolderDataset)
    assert [dataset[i]["name"] for i in range(3)] == ["1", "2", "10"]
    check_item(dataset[0], 16)


def test_rgb_images_become_gray_and_save_png_round_trips(tmp_path):
    rgb = np.zeros((6, 8, 3), dtype=np.uint8)
    rgb[..., 1] = 200
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    gray = load_image(tmp_path / "rgb.png")
    assert gray.shape == (6, 8) and np.allclose(gray, round(200 * 0.587) / 255, atol=1 / 255)

    mask = np.zeros((5, 7), dtype=bool)
    mask[1:3, 2:6] = True
    save_png(tmp_path / "out" / "mask.png", mask)
    assert np.array_equal(load_mask(tmp_path / "out" / "mask.png"), mask)
    assert set(np.unique(np.asarray(Image.open(tmp_path / "out" / "mask.png")))) == {0, 255}
    save_png(tmp_path / "prob.png", np.array([[0.0, 0.5, 1.0]]))
    assert np.asarray(Image.open(tmp_path / "prob.png")).tolist() == [[0, 128, 255]]
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        save_png(tmp_path / "bad.png", np.array([[2.0]]))
    with pytest.raises(ValueError, match="2-D"):
        save_png(tmp_path / "bad.png", np.zeros((2, 2, 2), dtype=np.uint8))


def test_mask_threshold_is_above_128_and_zero_one_masks_warn(tmp_path):
    Image.fromarray(np.array([[0, 128, 129, 255]], dtype=np.uint8)).save(tmp_path / "m.png")
    assert load_mask(tmp_path / "m.png").tolist() == [[False, False, True, True]]
    Image.fromarray(np.array([[0, 1]], dtype=np.uint8)).save(tmp_path / "01.png")
    with pytest.warns(UserWarning, match="0/255"):
        load_mask(tmp_path / "01.png")


def test_sixteen_bit_masks_are_scaled_not_clipped(tmp_path):
    Image.fromarray(np.array([[0, 32767, 32768, 65535]], dtype=np.uint16)).save(tmp_path / "m16.png")
    assert load_mask(tmp_path / "m16.png").tolist() == [[False, False, True, True]]
    # Clipped to 8 bits, 300 became 255 (lesion) though it is under 1% of the 16-bit range.
    Image.fromarray(np.array([[0, 300, 40000]], dtype=np.uint16)).save(tmp_path / "low.png")
    assert load_mask(tmp_path / "low.png").tolist() == [[False, False, True]]
    # A 0/100 mask reads as empty, and says so.
    Image.fromarray(np.array([[0, 100]], dtype=np.uint16)).save(tmp_path / "0100.png")
    with pytest.warns(UserWarning, match="none above half its range"):
        assert not load_mask(tmp_path / "0100.png").any()


# ------------------------------------------------------------------------------------------------
# Error cases
# ------------------------------------------------------------------------------------------------

def test_missing_pairs_name_the_stems(tmp_path):
    write_pair(tmp_path / "Imgs", tmp_path / "GT", "both")
    write_pair(tmp_path / "Imgs", tmp_path / "elsewhere", "image_only")
    write_pair(tmp_path / "elsewhere", tmp_path / "GT", "mask_only")
    with pytest.raises(ValueError, match="image_only") as error:
        build_dataset(tmp_path)
    assert "mask_only" in str(error.value)
    assert len(build_dataset(tmp_path, labeled=False)) == 2   # unlabeled use needs no masks


def test_size_mismatch_between_image_and_mask(tmp_path):
    write_pair(tmp_path / "Imgs", tmp_path / "GT", "a", size=(20, 30))
    Image.fromarray(np.zeros((21, 30), dtype=np.uint8)).save(tmp_path / "GT" / "a.png")
    with pytest.raises(ValueError, match=r"a\.jpg is 20x30 but a\.png is 21x30"):
        build_dataset(tmp_path)


def test_unreadable_and_missing_files(tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="broken.jpg"):
        load_image(tmp_path / "broken.jpg")
    with pytest.raises(FileNotFoundError, match="absent.png"):
        load_mask(tmp_path / "absent.png")
    with pytest.raises(TypeError, match="path"):
        load_image(42)
    write_pair(tmp_path / "d" / "Imgs", tmp_path / "d" / "GT", "ok")
    (tmp_path / "d" / "GT" / "bad.png").write_bytes(b"garbage")
    (tmp_path / "d" / "Imgs" / "bad.jpg").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="bad"):
        build_dataset(tmp_path / "d")


def test_empty_folders_and_unknown_layouts(tmp_path):
    (tmp_path / "empty_imgs" / "Imgs").mkdir(parents=True)
    (tmp_path / "empty_imgs" / "GT").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no images"):
        build_dataset(tmp_path / "empty_imgs")
    write_pair(tmp_path / "empty_gt" / "Imgs", tmp_path / "empty_gt" / "GT", "a")
    (tmp_path / "empty_gt" / "GT" / "a.png").unlink()
    with pytest.raises(FileNotFoundError, match="holds no masks"):
        build_dataset(tmp_path / "empty_gt")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ValueError, match="unknown data layout.*is empty"):
        build_dataset(tmp_path / "nothing")
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="unknown data layout"):
        build_dataset(tmp_path / "texts")
    write_pair(tmp_path / "root" / "train" / "Imgs", tmp_path / "root" / "train" / "GT", "a")
    with pytest.raises(FileNotFoundError, match="no 'val' split"):
        build_dataset(tmp_path / "root", "val")
    write_pair(tmp_path / "no_masks" / "Imgs", tmp_path / "elsewhere", "a")
    with pytest.raises(FileNotFoundError, match="no mask folder"):
        build_dataset(tmp_path / "no_masks")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_dataset(tmp_path / "missing")
    (tmp_path / "slice.png").write_bytes(b"")
    with pytest.raises(ValueError, match="not a NIfTI"):
        build_dataset(tmp_path / "slice.png")


def test_argument_type_errors(tmp_path):
    with pytest.raises(TypeError, match="source"):
        build_dataset(3)
    with pytest.raises(TypeError, match="image_size"):
        build_dataset("synthetic", image_size="256")
    with pytest.raises(ValueError, match="seed"):
        build_dataset("synthetic", seed=-1)
    with pytest.raises(TypeError, match="augment"):
        build_dataset("synthetic", augment="yes")
    with pytest.raises(IndexError, match="out of range"):
        SyntheticCT(2, image_size=32)[2]
    with pytest.raises(ValueError, match="augment needs"):
        build_dataset(tmp_path, image_size=None, augment=True)


# ------------------------------------------------------------------------------------------------
# NIfTI
# ------------------------------------------------------------------------------------------------

def make_volume(path, shape_xyz=(12, 10, 4), seed=0):
    """A small CT-like volume in HU, written with a non-trivial affine; returns (data, affine)."""
    rng = np.random.default_rng(seed)
    data = rng.uniform(-1000, 200, shape_xyz).astype(np.float32)
    affine = np.array([[0.7, 0, 0, -90], [0, 0.7, 0, -120], [0, 0, 2.5, 30], [0, 0, 0, 1]])
    nibabel.save(nibabel.Nifti1Image(data, affine), str(path))
    return data, affine


@needs_nibabel
def test_nifti_round_trip_keeps_axes_and_affine(tmp_path):
    data, affine = make_volume(tmp_path / "scan.nii.gz")
    volume, read_affine = nifti_module.read_nifti(tmp_path / "scan.nii.gz")
    assert volume.shape == (4, 10, 12) and volume.dtype == np.float32        # (Z, Y, X)
    assert np.allclose(volume[2], data[:, :, 2].T)                            # slice z = plane z
    assert np.allclose(read_affine, affine)

    mask = (window_hu(volume) > 0.5).astype(np.uint8)
    nifti_module.write_nifti(tmp_path / "pred.nii.gz", mask, read_affine)
    written = nibabel.load(str(tmp_path / "pred.nii.gz"))
    assert written.shape == data.shape and np.allclose(written.affine, affine, atol=1e-5)
    stored = np.asarray(written.dataobj)
    assert stored.dtype == np.uint8
    assert np.array_equal(stored, ((data - (-650 - 750)) / 1500 > 0.5).astype(np.uint8))   # overlays the source
    back, _ = nifti_module.read_nifti(tmp_path / "pred.nii.gz")
    assert np.array_equal(back.astype(np.uint8), mask)


def test_window_hu_maps_the_window_to_unit_range():
    hu = np.array([-2000.0, -1400.0, -650.0, 100.0, 3000.0])
    assert np.allclose(window_hu(hu), [0.0, 0.0, 0.5, 1.0, 1.0])
    assert np.allclose(window_hu(np.array([0.0]), width=100, level=50), [0.0])
    with pytest.raises(ValueError, match="width"):
        window_hu(hu, width=0)


@needs_nibabel
@pytest.mark.parametrize("mask_place", ["suffix", "masks_beside", "sibling_folder"])
def test_nifti_datasets_find_masks_by_the_documented_rule(tmp_path, mask_place):
    image_dir = tmp_path / "images" if mask_place == "sibling_folder" else tmp_path
    image_dir.mkdir(exist_ok=True)
    data, affine = make_volume(image_dir / "case1.nii.gz")
    label = np.zeros(data.shape, dtype=np.uint8)
    label[2:6, 3:5, 1] = 1
    mask_path = {"suffix": tmp_path / "case1_mask.nii.gz",
                 "masks_beside": tmp_path / "masks" / "case1.nii.gz",
                 "sibling_folder": tmp_path / "masks" / "case1.nii.gz"}[mask_place]
    mask_path.parent.mkdir(exist_ok=True)
    nibabel.save(nibabel.Nifti1Image(label, affine), str(mask_path))

    dataset = build_dataset(tmp_path, image_size=16)
    assert len(dataset) == 4                                   # the _mask file is not a volume
    names = [dataset[i]["name"] for i in range(4)]
    assert names == ["case1_z0", "case1_z1", "case1_z2", "case1_z3"]
    item = dataset[1]
    check_item(item, 16)
    assert item["orig_size"] == (10, 12) and item["mask"].sum() > 0 and dataset[0]["mask"].sum() == 0
    assert np.allclose(dataset.affines[0], affine) and dataset.shapes[0] == (4, 10, 12)
    single = build_dataset(image_dir / "case1.nii.gz", image_size=None, labeled=False)
    assert torch.allclose(single[2]["image"][0], torch.from_numpy(window_hu(data[:, :, 2].T)))


@needs_nibabel
def test_nifti_errors(tmp_path):
    make_volume(tmp_path / "lonely.nii.gz")
    with pytest.raises(ValueError, match="no mask found for NIfTI volumes lonely"):
        build_dataset(tmp_path)
    assert len(build_dataset(tmp_path, labeled=False)) == 4
    data, affine = make_volume(tmp_path / "other.nii.gz")
    nibabel.save(nibabel.Nifti1Image(np.zeros((12, 10, 5), np.uint8), affine), str(tmp_path / "other_mask.nii.gz"))
    nibabel.save(nibabel.Nifti1Image(np.zeros((12, 10, 4), np.uint8), affine), str(tmp_path / "lonely_mask.nii.gz"))
    with pytest.raises(ValueError, match="other.*mask"):
        build_dataset(tmp_path)
    (tmp_path / "broken.nii.gz").write_bytes(b"nope")
    with pytest.raises(ValueError, match="broken.nii.gz"):
        nifti_module.read_nifti(tmp_path / "broken.nii.gz")
    with pytest.raises(ValueError, match=r"\(D, H, W\)"):
        nifti_module.write_nifti(tmp_path / "x.nii.gz", np.zeros((2, 2), np.uint8), affine)
    with pytest.raises(ValueError, match=".nii"):
        nifti_module.write_nifti(tmp_path / "x.png", np.zeros((1, 2, 2), np.uint8), affine)
    with pytest.raises(TypeError, match="window"):
        build_dataset(tmp_path, labeled=False, window=1500)


def test_nifti_functions_explain_how_to_install_nibabel(monkeypatch, tmp_path):
    import builtins
    real_import = builtins.__import__

    def no_nibabel(name, *args, **kwargs):
        if name == "nibabel":
            raise ImportError("No module named 'nibabel'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_nibabel)
    with pytest.raises(ImportError, match="pip install nibabel"):
        nifti_module.write_nifti(tmp_path / "x.nii.gz", np.zeros((1, 2, 2), np.uint8), np.eye(4))


# --------------------------------------------------------------------------------------------------
# Batched augmentation and data on the device
# --------------------------------------------------------------------------------------------------

def test_augment_batch_equals_each_item_augmented_alone():
    from cares.data import augment_batch, draw_augment
    generator = torch.Generator().manual_seed(3)
    images = torch.rand(24, 1, 40, 40, generator=generator)
    masks = (torch.rand(24, 1, 40, 40, generator=generator) > 0.7).float()
    draws = [draw_augment(item_generator(1, 2, index)) for index in range(24)]
    # The batch mixes every step: flips, each quarter turn, warped and unwarped, jittered and not.
    assert {d.quarter_turns for d in draws} == {0, 1, 2, 3}
    assert {d.affine is None for d in draws} == {True, False} == {d.intensity is None for d in draws}
    batch_images, batch_masks = augment_batch(images, masks, draws)
    for index in range(24):
        image, mask = augment_pair(images[index], masks[index], item_generator(1, 2, index))
        torch.testing.assert_close(batch_images[index], image, rtol=0, atol=1e-6)
        assert torch.equal(batch_masks[index], mask)
    assert torch.equal(images, images.clone()) and batch_images.data_ptr() != images.data_ptr()  # inputs untouched


def test_augment_batch_rejects_mismatched_arguments():
    from cares.data import augment_batch, draw_augment
    draws = [draw_augment(item_generator(0, 0, i)) for i in range(2)]
    with pytest.raises(ValueError, match=r"images must have shape \(B, 1, S, S\)"):
        augment_batch(torch.rand(2, 3, 8, 8), None, draws)
    with pytest.raises(ValueError, match="masks shape"):
        augment_batch(torch.rand(2, 1, 8, 8), torch.rand(2, 1, 4, 4), draws)
    with pytest.raises(ValueError, match="3 draws for a batch of 2"):
        augment_batch(torch.rand(2, 1, 8, 8), None, draws + draws[:1])


def test_device_batches_serve_the_dataloaders_batches():
    from torch.utils.data import ConcatDataset, DataLoader, Subset

    from cares.data import DeviceBatches
    from cares.sampling import EpochSampler, set_dataset_epoch
    labelled = Subset(SyntheticCT(num_samples=10, image_size=32, augment=True, seed=4), [1, 3, 4, 6, 7, 9])
    pseudo = SyntheticCT(num_samples=5, image_size=32, augment=True, seed=9)
    dataset = ConcatDataset([labelled, pseudo])
    sampler = EpochSampler(6, 5, seed=2)
    device_batches = DeviceBatches(dataset, "cpu", batch_size=4)
    for epoch in (0, 3):
        sampler.set_epoch(epoch)
        set_dataset_epoch(dataset, epoch)
        expected = list(DataLoader(dataset, batch_size=4, sampler=sampler))
        served = device_batches.epoch_batches(sampler)
        assert len(served) == len(expected) == 3                        # 12 items, the last batch full
        for mine, theirs in zip(served, expected, strict=True):
            assert mine["name"] == list(theirs["name"])
            torch.testing.assert_close(mine["image"], theirs["image"], rtol=0, atol=1e-6)
            assert torch.equal(mine["mask"], theirs["mask"])


def test_device_batches_refuse_what_cannot_stack_or_train(tmp_path):
    from cares.data import DeviceBatches
    write_pair(tmp_path / "Imgs", tmp_path / "GT", "a", size=(20, 30))
    write_pair(tmp_path / "Imgs", tmp_path / "GT", "b", size=(24, 30))
    with pytest.raises(ValueError, match="image_size"):
        DeviceBatches(ImageFolderDataset(tmp_path / "Imgs", tmp_path / "GT", image_size=None), "cpu", 2)
    with pytest.raises(ValueError, match="need masks"):
        DeviceBatches(SyntheticCT(num_samples=2, image_size=16, labeled=False), "cpu", 2)
    with pytest.raises(ValueError, match="batch_size"):
        DeviceBatches(SyntheticCT(num_samples=2, image_size=16), "cpu", 0)
    with pytest.raises(TypeError, match="cares.data datasets"):
        DeviceBatches(torch.utils.data.TensorDataset(torch.zeros(2, 1, 8, 8)), "cpu", 2)
