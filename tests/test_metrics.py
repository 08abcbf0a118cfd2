"""Metrics: hand-computed cases and the Inf-Net toolbox semantics (a plain per-threshold loop)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cares import metrics
from cares.metrics import (INFNET_THRESHOLDS, METRIC_NAMES, e_measure, image_metrics, minmax_normalise,
                           s_measure, summarize, threshold_sweep)

EPS = np.finfo(np.float64).eps


def _shifted_pair():
    """4x4 ground truth: a 2x2 square at rows 1-2, columns 0-1; the prediction: the same square one
    column to the right. TP = 2, FP = 2, FN = 2, TN = 10."""
    gt = np.zeros((4, 4), dtype=bool)
    gt[1:3, 0:2] = True
    pred = np.zeros((4, 4))
    pred[1:3, 1:3] = 1.0
    return pred, gt


# ---- slow reference: a literal transcription of the toolbox, one threshold at a time ----------


def _fmeasure_calu(smap, gt, threshold):
    """Fmeasure_calu.m: returns (sensitivity, specificity, dice)."""
    label = smap >= threshold
    num_rec = np.count_nonzero(label)
    num_no_rec = np.count_nonzero(~label)
    num_and = np.count_nonzero(label & gt)
    num_obj = np.count_nonzero(gt)
    fn = num_obj - num_and
    fp = num_rec - num_and
    tn = num_no_rec - fn
    if num_and == 0:
        return 0.0, 0.0, 0.0
    specificity = tn / (tn + fp) if tn + fp else math.nan  # MATLAB's 0/0
    return num_and / num_obj, specificity, 2 * num_and / (num_obj + num_rec)


def _enhanced_measure(fm, gt):
    """Enhancedmeasure.m, pixel by pixel."""
    dfm, dgt = fm.astype(float), gt.astype(float)
    if dgt.sum() == 0:
        enhanced = 1.0 - dfm
    elif (1 - dgt).sum() == 0:
        enhanced = dfm
    else:
        align_fm, align_gt = dfm - dfm.mean(), dgt - dgt.mean()
        align = 2 * align_gt * align_fm / (align_gt * align_gt + align_fm * align_fm + EPS)
        enhanced = (align + 1) ** 2 / 4
    return enhanced.sum() / (gt.size - 1 + EPS)


def _slow_sweep(resmap, gt):
    rows = []
    for threshold in np.arange(255, -1, -1) / 255:
        sen, spe, dice = _fmeasure_calu(resmap, gt, threshold)
        rows.append((dice, sen, spe, _enhanced_measure(resmap >= threshold, gt)))
    return np.array(rows)


def _random_case(rng, shape, fg_fraction):
    soft = rng.random(shape)
    # Quantised values hit thresholds exactly (ties for >=), the others fall between them.
    soft[: shape[0] // 2] = rng.integers(0, 256, (shape[0] // 2, shape[1])) / 255
    gt = rng.random(shape) < fg_fraction
    return soft, gt


@pytest.mark.parametrize("fg_fraction", [0.0, 0.2, 0.6, 1.0])
def test_vectorised_sweep_matches_per_threshold_loop(fg_fraction):
    rng = np.random.default_rng(int(fg_fraction * 10))
    soft, gt = _random_case(rng, (18, 23), fg_fraction)
    soft = minmax_normalise(soft)
    slow = _slow_sweep(soft, gt)
    fast = threshold_sweep(soft, gt, normalise=False)
    np.testing.assert_array_equal(fast["threshold"], INFNET_THRESHOLDS)
    for column, name in enumerate(["dice", "sensitivity", "specificity", "e_measure"]):
        if fg_fraction == 1.0 and name == "specificity":
            # Full ground truth: the toolbox's TN / (TN + FP) is 0/0 (NaN) wherever TP > 0; this
            # module says 1 there.
            undefined = np.isnan(slow[:, column])
            assert undefined.any() and (fast[name][undefined] == 1.0).all()
            slow[undefined, column] = 1.0
        np.testing.assert_allclose(fast[name], slow[:, column], rtol=1e-12, atol=1e-14, err_msg=name)
    metrics = image_metrics(soft, gt)
    assert metrics["dice"] == pytest.approx(slow[:, 0].mean(), abs=1e-14)
    assert metrics["e_measure"] == pytest.approx(slow[:, 3].mean(), abs=1e-14)


def test_perfect_prediction():
    pred, gt = _shifted_pair()
    n, g = gt.size, gt.sum()
    perfect = gt.astype(float)
    plain = image_metrics(perfect, gt, protocol="threshold")
    assert plain["dice"] == 1 and plain["sensitivity"] == 1 and plain["specificity"] == 1
    assert plain["mae"] == 0
    assert plain["s_measure"] == pytest.approx(1.0, abs=1e-12)
    assert plain["e_measure"] == pytest.approx(n / (n - 1))  # the toolbox divides by H*W - 1
    # Toolbox: the 255 thresholds above 0 reproduce the mask; t = 0 marks every pixel positive,
    # giving Dice 2|G| / (|G| + N), sensitivity 1, specificity 0 and E = (1/4) N / (N - 1).
    # A soft map with two levels normalises to the same binary map.
    for soft in (perfect, 0.2 + 0.6 * perfect):
        toolbox = image_metrics(soft, gt)
        assert toolbox["dice"] == pytest.approx((255 + 2 * g / (g + n)) / 256, rel=1e-14)
        assert toolbox["sensitivity"] == pytest.approx(1.0, rel=1e-14)
        assert toolbox["specificity"] == pytest.approx(255 / 256, rel=1e-14)
        assert toolbox["e_measure"] == pytest.approx((255 + 0.25) / 256 * n / (n - 1), rel=1e-14)
        assert toolbox["s_measure"] == pytest.approx(1.0, abs=1e-12)
        assert toolbox["mae"] == pytest.approx(0.0, abs=1e-15)


def test_shifted_masks_hand_computed():
    pred, gt = _shifted_pair()
    plain = image_metrics(pred, gt, protocol="threshold")
    assert plain["dice"] == pytest.approx(0.5)  # 2*2 / (4 + 4)
    assert plain["sensitivity"] == pytest.approx(0.5)  # 2 / 4
    assert plain["specificity"] == pytest.approx(10 / 12)
    assert plain["mae"] == pytest.approx(4 / 16)
    # E: means 1/4 and 1/4. TP and TN pixels align perfectly (xi = 1, phi = 1); FP and FN pixels have
    # xi = 2 (3/4)(-1/4) / ((3/4)^2 + (1/4)^2) = -0.6, phi = 0.4^2 / 4 = 0.04.
    assert plain["e_measure"] == pytest.approx((2 + 10 + 4 * 0.04) / 15, rel=1e-12)
    # S-measure. Object part: u = 1/4; foreground values (0, 1, 0, 1): x = 1/2, std = sqrt(1/3);
    # background of 1 - P: ten 1s and two 0s: x = 5/6, std = sqrt(5/33).
    object_fg = 2 * 0.5 / (0.25 + 1 + math.sqrt(1 / 3))
    object_bg = 2 * (5 / 6) / ((5 / 6) ** 2 + 1 + math.sqrt(5 / 33))
    s_object = 0.25 * object_fg + 0.75 * object_bg
    # Region part: centroid (1-based) column 1.5 -> 2, row 2.5 -> 3 (MATLAB rounds halves up; numpy
    # would give 2). Top-left 3x2 block: x = 1/3, y = 2/3, var 4/15 each, cov 2/15 -> 0.4, weight 6/16.
    # Top-right: ground truth empty, prediction not -> 0, weight 6/16. Bottom blocks (row 3) are
    # empty in both -> 1 each, weights 2/16 and 2/16.
    s_region = 6 / 16 * 0.4 + 6 / 16 * 0 + 2 / 16 + 2 / 16
    assert plain["s_measure"] == pytest.approx(0.5 * s_object + 0.5 * s_region, rel=1e-12)
    assert s_measure(pred, gt) == plain["s_measure"]
    # Toolbox on the same binary map: every threshold above 0 gives the plain values, t = 0 all-positive.
    toolbox = image_metrics(pred, gt)
    assert toolbox["dice"] == pytest.approx((255 * 0.5 + 2 * 4 / 20) / 256, rel=1e-14)
    assert toolbox["specificity"] == pytest.approx(255 * (10 / 12) / 256, rel=1e-14)
    assert toolbox["s_measure"] == plain["s_measure"]


def test_empty_prediction():
    gt = np.zeros((4, 4), dtype=bool)
    gt[:2, :2] = True
    empty = np.zeros((4, 4))
    n, g = 16, 4
    plain = image_metrics(empty, gt, protocol="threshold")
    assert (plain["dice"], plain["sensitivity"], plain["specificity"]) == (0.0, 0.0, 1.0)
    assert plain["mae"] == pytest.approx(g / n)
    # Nothing predicted: every pixel's prediction alignment is 0, so phi = 1/4 everywhere.
    assert plain["e_measure"] == pytest.approx(0.25 * n / (n - 1))
    # S: object part (1 - u) * 1 (background all right, foreground score 0); all four region blocks
    # are constant in both maps (0/0 -> 1), so S = 0.5 * 0.75 + 0.5 * 1.
    assert plain["s_measure"] == pytest.approx(0.875, rel=1e-12)
    # Toolbox: the constant map is not stretched; only t = 0 predicts anything (everything).
    toolbox = image_metrics(empty, gt)
    assert toolbox["dice"] == pytest.approx(2 * g / (g + n) / 256)
    assert toolbox["sensitivity"] == pytest.approx(1 / 256)
    assert toolbox["specificity"] == 0.0
    assert toolbox["e_measure"] == pytest.approx(0.25 * n / (n - 1))


def test_empty_ground_truth():
    rng = np.random.default_rng(5)
    soft = rng.random((6, 7)) * 0.5 + 0.25
    gt = np.zeros((6, 7), dtype=np.uint8)
    normalised = (soft - soft.min()) / (soft.max() - soft.min())
    toolbox = image_metrics(soft, gt)
    # Fmeasure_calu.m: TP is always 0, so Dice, sensitivity and specificity are 0 at every threshold.
    assert (toolbox["dice"], toolbox["sensitivity"], toolbox["specificity"]) == (0.0, 0.0, 0.0)
    assert toolbox["s_measure"] == pytest.approx(1 - normalised.mean(), rel=1e-12)
    assert toolbox["mae"] == pytest.approx(normalised.mean(), rel=1e-12)
    # Enhancedmeasure.m with empty GT: phi = 1 - B, so E_t = (N - |P >= t|) / (N - 1).
    n = soft.size
    expected_e = np.mean([(n - np.count_nonzero(normalised >= t)) / (n - 1) for t in INFNET_THRESHOLDS])
    assert toolbox["e_measure"] == pytest.approx(expected_e, rel=1e-12)
    # Plain protocol, empty prediction on empty ground truth: nothing to find, nothing missed.
    plain = image_metrics(np.zeros((6, 7)), gt, protocol="threshold")
    assert plain == pytest.approx(dict(dice=1.0, sensitivity=1.0, specificity=1.0, s_measure=1.0,
                                       e_measure=n / (n - 1), mae=0.0))


def test_inverted_map():
    pred, gt = _shifted_pair()
    inverted = 1.0 - gt.astype(float)
    n, g = 16, 4
    plain = image_metrics(inverted, gt, protocol="threshold")
    assert (plain["dice"], plain["sensitivity"], plain["specificity"], plain["mae"]) == (0.0, 0.0, 0.0, 1.0)
    # Every pixel is misaligned: xi = -1, phi = 0 (up to eps).
    assert plain["e_measure"] == pytest.approx(0.0, abs=1e-12)
    # S: object part 0 (both foreground and background scores have mean 0). Region: top-left block
    # anti-correlated, cov = -4/15 -> -0.8, weight 6/16; the other blocks have constant maps -> 1.
    assert plain["s_measure"] == pytest.approx(0.5 * (6 / 16 * -0.8 + 6 / 16 + 2 / 16 + 2 / 16), rel=1e-12)
    toolbox = image_metrics(inverted, gt)
    assert toolbox["dice"] == pytest.approx(2 * g / (g + n) / 256)
    assert toolbox["e_measure"] == pytest.approx(0.25 * n / (n - 1) / 256, abs=1e-12)
    assert toolbox["mae"] == 1.0


def test_s_measure_is_clipped_at_zero():
    # A mostly inverted prediction whose region blocks are anti-correlated with the ground truth:
    # 0.5 * S_object + 0.5 * S_region is about -0.145, and StructureMeasure.m clips it to 0.
    gt = np.array([[0, 0, 0, 1], [0, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0]], dtype=bool)
    pred = np.array([[0, 1, 1, 0], [1, 0, 1, 1], [0, 1, 0, 1], [0, 1, 1, 1]], dtype=float)
    unclipped = 0.5 * metrics._s_object(pred, gt) + 0.5 * metrics._s_region(pred, gt)
    assert unclipped == pytest.approx(-0.1446345, abs=1e-6)
    assert s_measure(pred, gt) == 0.0


def test_minmax_follows_mapminmax():
    np.testing.assert_allclose(minmax_normalise(np.array([[0.2, 0.4], [0.6, 0.2]])), [[0, 0.5], [1, 0]])
    constant = np.full((3, 3), 0.3)
    np.testing.assert_array_equal(minmax_normalise(constant), constant)  # left unchanged
    gt = np.eye(3, dtype=bool)
    assert image_metrics(constant, gt)["mae"] == pytest.approx(np.abs(0.3 - gt).mean())


def test_input_forms_agree():
    rng = np.random.default_rng(9)
    soft, gt = _random_case(rng, (10, 12), 0.3)
    reference = image_metrics(soft, gt)
    assert image_metrics(torch.from_numpy(soft).float(), torch.from_numpy(gt), "infnet") == \
        pytest.approx(reference, rel=1e-6)
    assert image_metrics(soft, gt.astype(np.uint8) * 255) == reference
    assert image_metrics(soft, gt.astype(np.float32)) == reference
    quantised = (soft * 255).round().astype(np.uint8)
    assert image_metrics(quantised, gt) == image_metrics(quantised / 255.0, gt)
    binary = soft > 0.5
    assert e_measure(binary, gt) == image_metrics(binary.astype(float), gt, "threshold")["e_measure"]


def test_bad_input_raises():
    gt = np.zeros((4, 4), dtype=bool)
    with pytest.raises(ValueError, match=r"shape \(4, 5\)"):
        image_metrics(np.zeros((4, 4)), np.zeros((4, 5)))
    with pytest.raises(ValueError, match=r"2-D.*\(1, 4, 4\)"):
        image_metrics(np.zeros((1, 4, 4)), gt)
    with pytest.raises(ValueError, match=r"\[0, 1\].*max 2"):
        image_metrics(np.full((4, 4), 2.0), gt)
    with pytest.raises(ValueError, match="NaN"):
        image_metrics(np.full((4, 4), np.nan), gt)
    with pytest.raises(ValueError, match="protocol"):
        image_metrics(np.zeros((4, 4)), gt, protocol="mean")
    with pytest.raises(TypeError, match="list"):
        image_metrics([[0.0]], gt)
    with pytest.raises(ValueError, match="only 0 and 1"):
        e_measure(np.full((4, 4), 0.5), gt)


def test_summarize():
    rows = [dict(zip(METRIC_NAMES, [0.5, 0.6, 0.9, 0.7, 0.8, 0.1])),
            dict(zip(METRIC_NAMES, [0.7, 0.8, 0.9, 0.9, 0.6, 0.3]))]
    summary = summarize(rows)
    assert summary["dice_mean"] == pytest.approx(0.6) and summary["dice_std"] == pytest.approx(0.1)
    assert summary["specificity_std"] == 0.0 and summary["count"] == 2
    assert set(summary) == {f"{m}_{s}" for m in METRIC_NAMES for s in ("mean", "std")} | {"count"}
    with pytest.raises(ValueError, match="non-empty"):
        summarize([])
    with pytest.raises(ValueError, match="'mae'"):
        summarize([{m: 0.0 for m in METRIC_NAMES if m != "mae"}])


def test_48_full_size_images():
    """A test split's worth of 450x450 maps (COVID-SemiSeg's 48 test slices) under the Inf-Net
    protocol: every metric is finite and in range. (No wall-clock bound: on a shared machine a time
    limit measures the neighbours; the cost is covered by the benchmarks, not by a test.)"""
    rng = np.random.default_rng(0)
    gt = np.zeros((450, 450), dtype=bool)
    gt[120:260, 80:300] = True
    maps = [np.clip(gt * 0.6 + rng.random(gt.shape) * 0.4, 0, 1) for _ in range(48)]
    rows = [image_metrics(prob, gt) for prob in maps]
    assert len(rows) == 48
    for row in rows:
        for name, value in row.items():
            assert np.isfinite(value), name
            if name != "mae":
                assert 0.0 <= value <= 1.0, (name, value)
