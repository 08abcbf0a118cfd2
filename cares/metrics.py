"""Per-image segmentation metrics, following the Inf-Net evaluation toolbox (the paper's Table 1).

The toolbox (MATLAB, github.com/DengPingFan/Inf-Net, EvaluationTool/: main.m, Fmeasure_calu.m,
StructureMeasure.m, S_object.m, S_region.m, Enhancedmeasure.m) scores a soft prediction map P
against a binary ground truth G like this, per image:

1. P is min-max normalised to [0, 1] (MATLAB `mapminmax(P, 0, 1)`; a constant map, where
   max - min is 0, is left unchanged, as mapminmax does).
2. For each of the 256 thresholds t = 1, 254/255, ..., 1/255, 0 the map is binarised as P >= t and
   Dice, sensitivity and specificity are computed from the confusion counts (Fmeasure_calu.m):
       Dice = 2 TP / (|G| + |P>=t|),  Sen = TP / |G|,  Spe = TN / (TN + FP),
   and all three are 0 whenever TP = 0 (so an image with empty ground truth scores 0 on all three,
   whatever the prediction). The reported value is the mean over the 256 thresholds. The threshold
   t = 0 marks every pixel positive, so even a perfect binary map scores a little under 1 on Dice.
3. E-measure (Enhancedmeasure.m, Fan et al. IJCAI 2018) of each binarised map, averaged over the
   same thresholds ("mean E-measure"):
       a_P = B - mean(B), a_G = G - mean(G) (B the binarised map, as 0/1)
       xi = 2 a_P a_G / (a_P^2 + a_G^2 + eps),  phi = (1 + xi)^2 / 4,  E = sum(phi) / (H*W - 1 + eps)
   with phi = 1 - B where G is empty and phi = B where G is full. (The H*W - 1 denominator is the
   toolbox's: a perfect map scores H*W / (H*W - 1), a hair above 1.)
4. S-measure (StructureMeasure.m, Fan et al. ICCV 2017), alpha = 0.5, on the continuous map:
       S = 0.5 * S_object + 0.5 * S_region, clipped below at 0,
   S = 1 - mean(P) if G is empty and mean(P) if G is full. S_object compares the foreground and the
   background of P with G through 2x / (x^2 + 1 + std + eps); S_region splits both maps into four
   blocks at G's centroid (rounded, MATLAB 1-based) and sums the blocks' SSIM-like scores weighted
   by block area.
5. MAE = mean |P - G| on the continuous map.

Two versions of the toolbox's main.m binarise the E-measure map with P > t and P >= t; this module
uses P >= t everywhere (the newer main.m, and the same rule as Fmeasure_calu.m). The thresholds are
j/255 computed in float64; the toolbox reads maps saved as 8-bit PNGs, so pass the 8-bit map
(uint8, divided by 255 here as im2double does) for exact parity with scores computed from files.
Where the toolbox produces 0/0 (specificity when G covers the whole image, NaN in MATLAB) this
module returns 1, and empty image blocks in S_region (the centroid on the last row or column)
contribute 0 with their weight of 0 (NaN in MATLAB).

`protocol="threshold"` gives plain metrics at one threshold: the raw map (not normalised) is
binarised as P >= 0.5; Dice = 2TP / (2TP + FP + FN), Sen = TP / (TP + FN), Spe = TN / (TN + FP),
with 0/0 counted as 1 (nothing to find, nothing missed: an empty prediction on empty ground truth
has Dice 1); E-measure of that binary map; S-measure and MAE on the raw continuous map.

The 256-threshold sweep is vectorised: each pixel's value is bucketed among the sorted thresholds
once (np.searchsorted), and cumulative histograms of the buckets over G's foreground and over the
whole image give TP and |P>=t| at every threshold. E-measure depends only on the four confusion
counts (every pixel of a class has the same alignment value), so it comes from the same counts.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

__all__ = [
    "METRIC_NAMES",
    "PROTOCOLS",
    "INFNET_THRESHOLDS",
    "image_metrics",
    "threshold_sweep",
    "s_measure",
    "e_measure",
    "minmax_normalise",
    "summarize",
]

METRIC_NAMES = ("dice", "sensitivity", "specificity", "s_measure", "e_measure", "mae")
PROTOCOLS = ("infnet", "threshold")

# 1, 254/255, ..., 1/255, 0: the toolbox's `Thresholds = 1:-1/255:0`.
INFNET_THRESHOLDS = np.arange(255, -1, -1, dtype=np.float64) / 255.0
PLAIN_THRESHOLD = 0.5

_EPS = np.finfo(np.float64).eps  # MATLAB's eps, used where the toolbox adds it
_S_MEASURE_ALPHA = 0.5
# mapminmax leaves a row unchanged when its gain 1 / (max - min) would exceed 1e14.
_MAPMINMAX_MAX_GAIN = 1e14


# ----------------------------------------------------------------------------------------------
# Input handling


def _as_prediction(prob, name: str = "prob") -> np.ndarray:
    """(H, W) float map in [0, 1] as float64; uint8 maps are divided by 255 (MATLAB im2double)."""
    array = _to_numpy(prob, name)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (H, W) map, got shape {array.shape}")
    if array.dtype == np.uint8:
        return array.astype(np.float64) / 255.0
    if array.dtype == np.bool_:
        return array.astype(np.float64)
    if not np.issubdtype(array.dtype, np.floating):
        raise TypeError(f"{name} must be a float map in [0, 1] (or uint8 0-255), got dtype {array.dtype}")
    array = array.astype(np.float64)
    if array.size and not np.isfinite(array).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    if array.size and (array.min() < 0.0 or array.max() > 1.0):
        raise ValueError(f"{name} values must lie in [0, 1], got min {array.min():g} and max {array.max():g}")
    return array


def _as_ground_truth(gt, shape: tuple[int, int]) -> np.ndarray:
    """Boolean (H, W) mask: bool as is; 0-255 masks (max > 1) as gt > 128, the toolbox's rule;
    0/1 masks as gt > 0.5."""
    array = _to_numpy(gt, "gt")
    if array.shape != shape:
        raise ValueError(f"gt shape {array.shape} must equal the prediction's shape {shape}")
    if array.dtype == np.bool_:
        return array
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise TypeError(f"gt must be a bool, 0/1 or 0-255 mask, got dtype {array.dtype}")
    if array.size and not np.isfinite(array).all():
        raise ValueError("gt contains NaN or infinite values")
    if array.size and (array.min() < 0 or array.max() > 255):
        raise ValueError(f"gt values must lie in [0, 1] or [0, 255], got min {array.min():g} and "
                         f"max {array.max():g}")
    threshold = 128 if array.size and array.max() > 1 else 0.5
    return array > threshold


def _to_numpy(value, name: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if value.dtype in (torch.float16, torch.bfloat16):
            value = value.float()  # numpy has no bfloat16
        return value.numpy()
    if isinstance(value, np.ndarray):
        return value
    raise TypeError(f"{name} must be a numpy array or a torch.Tensor, got {type(value).__name__}")


def minmax_normalise(prob) -> np.ndarray:
    """Stretch a map to [0, 1] as MATLAB's mapminmax(P, 0, 1) does: (P - min) / (max - min), and
    the map unchanged when max - min is 0 (or below 1e-14). (H, W) -> (H, W) float64."""
    values = _as_prediction(prob)
    if values.size == 0:
        return values
    low, high = values.min(), values.max()
    value_range = high - low
    if value_range == 0 or 1.0 / value_range > _MAPMINMAX_MAX_GAIN:
        return values
    return (values - low) / value_range


# ----------------------------------------------------------------------------------------------
# Confusion counts and the rates built on them


def _counts_at_thresholds(values: np.ndarray, gt: np.ndarray, thresholds: np.ndarray
                          ) -> tuple[np.ndarray, np.ndarray]:
    """TP and predicted-positive counts of `values >= t` for every t in `thresholds` (any order).

    Each pixel is bucketed once: bucket b = number of thresholds <= value, so value >= the j-th
    smallest threshold iff b > j. Suffix sums of the bucket histograms then count, for each
    threshold, the pixels at or above it, over the whole image and over G's foreground.
    """
    order = np.argsort(thresholds, kind="stable")
    ascending = thresholds[order]
    buckets = np.searchsorted(ascending, values.ravel(), side="right")
    num_buckets = len(ascending) + 1
    all_hist = np.bincount(buckets, minlength=num_buckets)
    fg_hist = np.bincount(buckets[gt.ravel()], minlength=num_buckets)
    # Suffix sums over buckets j+1.. : the pixels with value >= ascending[j].
    predicted_ascending = np.cumsum(all_hist[::-1])[::-1][1:]
    tp_ascending = np.cumsum(fg_hist[::-1])[::-1][1:]
    tp = np.empty(len(thresholds), dtype=np.int64)
    predicted = np.empty(len(thresholds), dtype=np.int64)
    tp[order], predicted[order] = tp_ascending, predicted_ascending
    return tp, predicted


def _safe_ratio(numerator: np.ndarray, denominator: np.ndarray, zero_over_zero: float) -> np.ndarray:
    """numerator / denominator elementwise, `zero_over_zero` where the denominator is 0."""
    numerator = np.asarray(numerator, dtype=np.float64)
    denominator = np.asarray(denominator, dtype=np.float64)
    safe = np.where(denominator == 0, 1.0, denominator)
    return np.where(denominator == 0, zero_over_zero, numerator / safe)


def _rates(tp: np.ndarray, predicted: np.ndarray, num_fg: int, num_pixels: int, toolbox_rule: bool
           ) -> dict[str, np.ndarray]:
    """Dice, sensitivity, specificity from counts (arrays over thresholds).

    toolbox_rule: Fmeasure_calu.m's convention, all three 0 where TP = 0; otherwise the plain
    definitions with 0/0 read as 1.
    """
    fp = predicted - tp
    fn = num_fg - tp
    tn = num_pixels - predicted - fn
    dice = _safe_ratio(2 * tp, 2 * tp + fp + fn, 1.0)  # 2TP + FP + FN = |G| + |P>=t|
    sensitivity = _safe_ratio(tp, tp + fn, 1.0)
    specificity = _safe_ratio(tn, tn + fp, 1.0)
    if toolbox_rule:
        no_hit = tp == 0
        dice, sensitivity, specificity = (np.where(no_hit, 0.0, rate)
                                          for rate in (dice, sensitivity, specificity))
    return dict(dice=dice, sensitivity=sensitivity, specificity=specificity)


def _e_measure_from_counts(tp: np.ndarray, predicted: np.ndarray, num_fg: int, num_pixels: int) -> np.ndarray:
    """Enhancedmeasure.m for binary maps given by their confusion counts (arrays over thresholds)."""
    tp = np.asarray(tp, dtype=np.float64)
    predicted = np.asarray(predicted, dtype=np.float64)
    if num_fg == 0:
        phi_sum = num_pixels - predicted  # phi = 1 - B
    elif num_fg == num_pixels:
        phi_sum = predicted  # phi = B
    else:
        mean_pred = predicted / num_pixels
        mean_gt = num_fg / num_pixels
        # (pixel count, B, G) of the four classes: TP, FP, FN, TN.
        classes = (
            (tp, 1.0, 1.0),
            (predicted - tp, 1.0, 0.0),
            (num_fg - tp, 0.0, 1.0),
            (num_pixels - predicted - (num_fg - tp), 0.0, 0.0),
        )
        phi_sum = np.zeros_like(predicted)
        for count, pred_value, gt_value in classes:
            align_pred = pred_value - mean_pred
            align_gt = gt_value - mean_gt
            xi = 2.0 * align_pred * align_gt / (align_pred ** 2 + align_gt ** 2 + _EPS)
            phi_sum = phi_sum + count * (1.0 + xi) ** 2 / 4.0
    return phi_sum / (num_pixels - 1 + _EPS)


def e_measure(binary_map, gt) -> float:
    """E-measure (Enhancedmeasure.m) of a binary (H, W) map (bool or 0/1) against gt."""
    values = _as_prediction(binary_map, "binary_map")
    if not np.isin(values, (0.0, 1.0)).all():
        raise ValueError("binary_map must contain only 0 and 1 (binarise a soft map first)")
    gt = _as_ground_truth(gt, values.shape)
    binary = values > 0.5
    tp = np.count_nonzero(binary & gt)
    predicted = np.count_nonzero(binary)
    e = _e_measure_from_counts(np.array([tp]), np.array([predicted]), np.count_nonzero(gt), gt.size)
    return float(e[0])


def threshold_sweep(prob, gt, thresholds: np.ndarray = INFNET_THRESHOLDS, normalise: bool = True
                    ) -> dict[str, np.ndarray]:
    """Toolbox per-threshold curves of one image.

    prob: (H, W) map in [0, 1]; gt: (H, W) mask. The map is min-max normalised (unless
    normalise=False) and binarised as map >= t for each t. Returns arrays of shape (T,), in the order
    of `thresholds`: "threshold", "dice", "sensitivity", "specificity" (Fmeasure_calu.m rule: 0 where
    TP = 0) and "e_measure". The toolbox's mean Dice etc. are the means of these curves.
    """
    values = minmax_normalise(prob) if normalise else _as_prediction(prob)
    gt = _as_ground_truth(gt, values.shape)
    thresholds = np.asarray(thresholds, dtype=np.float64)
    return _sweep(values, gt, thresholds, toolbox_rule=True)


def _sweep(values: np.ndarray, gt: np.ndarray, thresholds: np.ndarray, toolbox_rule: bool
           ) -> dict[str, np.ndarray]:
    """Per-threshold Dice, sensitivity, specificity and E-measure of `values >= t`."""
    num_fg, num_pixels = int(np.count_nonzero(gt)), gt.size
    tp, predicted = _counts_at_thresholds(values, gt, thresholds)
    curves = dict(threshold=thresholds)
    curves.update(_rates(tp, predicted, num_fg, num_pixels, toolbox_rule))
    curves["e_measure"] = _e_measure_from_counts(tp, predicted, num_fg, num_pixels)
    return curves


# ----------------------------------------------------------------------------------------------
# S-measure


def s_measure(prob, gt, alpha: float = _S_MEASURE_ALPHA) -> float:
    """Structure measure (StructureMeasure.m) of a continuous (H, W) map in [0, 1] against gt.

    S = alpha * S_object + (1 - alpha) * S_region, clipped below at 0; 1 - mean(P) for empty gt and
    mean(P) for a full gt. See the module docstring.
    """
    values = _as_prediction(prob)
    gt = _as_ground_truth(gt, values.shape)
    return _s_measure(values, gt, alpha)


def _s_measure(values: np.ndarray, gt: np.ndarray, alpha: float) -> float:
    fg_fraction = gt.mean()
    if fg_fraction == 0:
        return float(1.0 - values.mean())
    if fg_fraction == 1:
        return float(values.mean())
    score = alpha * _s_object(values, gt) + (1.0 - alpha) * _s_region(values, gt)
    return float(max(score, 0.0))


def _object_score(region_values: np.ndarray) -> float:
    """S_object.m's Object(): 2x / (x^2 + 1 + sigma + eps), x and sigma (N-1 normalised, 0 for one
    pixel as MATLAB's std) of the values inside the region."""
    if region_values.size == 0:
        return 0.0
    mean = region_values.mean()
    std = region_values.std(ddof=1) if region_values.size > 1 else 0.0
    return 2.0 * mean / (mean ** 2 + 1.0 + std + _EPS)


def _s_object(values: np.ndarray, gt: np.ndarray) -> float:
    fg_fraction = gt.mean()
    foreground = _object_score(values[gt])
    background = _object_score(1.0 - values[~gt])
    return fg_fraction * foreground + (1.0 - fg_fraction) * background


def _matlab_round(x: float) -> int:
    """MATLAB round(): halves away from zero (numpy rounds them to even). x >= 0 here."""
    return int(math.floor(x + 0.5))


def _s_region(values: np.ndarray, gt: np.ndarray) -> float:
    height, width = gt.shape
    area = height * width
    total = gt.sum()
    # Centroid in MATLAB's 1-based coordinates, rounded; X columns and Y rows of the top-left block.
    cols = np.arange(1, width + 1)
    rows = np.arange(1, height + 1)
    x = _matlab_round((gt.sum(axis=0) * cols).sum() / total)
    y = _matlab_round((gt.sum(axis=1) * rows).sum() / total)
    w_top_left = x * y / area
    w_top_right = (width - x) * y / area
    w_bottom_left = x * (height - y) / area
    w_bottom_right = 1.0 - w_top_left - w_top_right - w_bottom_left
    blocks = (
        (w_top_left, np.s_[:y, :x]),
        (w_top_right, np.s_[:y, x:]),
        (w_bottom_left, np.s_[y:, :x]),
        (w_bottom_right, np.s_[y:, x:]),
    )
    return sum(weight * _ssim_block(values[block], gt[block]) for weight, block in blocks)


def _ssim_block(values: np.ndarray, gt: np.ndarray) -> float:
    """S_region.m's ssim(): 4 x y s_xy / ((x^2 + y^2)(s_x^2 + s_y^2) + eps), variances over N-1+eps;
    1 when numerator and denominator are both 0, 0 when only the numerator is."""
    num_pixels = values.size
    if num_pixels == 0:
        return 0.0  # weight 0 in the sum anyway
    gt = gt.astype(np.float64)
    mean_pred, mean_gt = values.mean(), gt.mean()
    dev_pred, dev_gt = values - mean_pred, gt - mean_gt
    norm = num_pixels - 1 + _EPS
    var_pred = (dev_pred ** 2).sum() / norm
    var_gt = (dev_gt ** 2).sum() / norm
    covariance = (dev_pred * dev_gt).sum() / norm
    numerator = 4.0 * mean_pred * mean_gt * covariance
    denominator = (mean_pred ** 2 + mean_gt ** 2) * (var_pred + var_gt)
    if numerator != 0:
        return numerator / (denominator + _EPS)
    return 1.0 if denominator == 0 else 0.0


# ----------------------------------------------------------------------------------------------
# Per-image metrics and their summary


def image_metrics(prob, gt, protocol: str = "infnet") -> dict[str, float]:
    """The six metrics of METRIC_NAMES for one image.

    prob: (H, W) numpy array or tensor, a soft map in [0, 1] (uint8 0-255 also accepted).
    gt: (H, W) mask, bool, 0/1 or 0-255.
    protocol: "infnet" (the toolbox: min-max normalised map, Dice/Sen/Spe/E averaged over 256
    thresholds, S-measure and MAE on the normalised map) or "threshold" (plain metrics of the raw
    map at 0.5; S-measure and MAE on the raw map). Details in the module docstring.
    Returns {name: float}.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if protocol == "infnet":
        values = minmax_normalise(prob)
        thresholds, toolbox_rule = INFNET_THRESHOLDS, True
    else:
        values = _as_prediction(prob)
        thresholds, toolbox_rule = np.array([PLAIN_THRESHOLD]), False
    gt = _as_ground_truth(gt, values.shape)
    if values.size == 0:
        raise ValueError(f"prob must not be empty, got shape {values.shape}")
    curves = _sweep(values, gt, thresholds, toolbox_rule)
    return dict(
        dice=float(curves["dice"].mean()),
        sensitivity=float(curves["sensitivity"].mean()),
        specificity=float(curves["specificity"].mean()),
        s_measure=_s_measure(values, gt, _S_MEASURE_ALPHA),
        e_measure=float(curves["e_measure"].mean()),
        mae=float(np.abs(values - gt).mean()),
    )


def summarize(rows: Sequence[dict]) -> dict[str, float]:
    """Mean and standard deviation over images of each metric.

    rows: per-image dicts as returned by image_metrics. Returns a flat dict with "<metric>_mean" and
    "<metric>_std" (population std, ddof=0) for every metric of METRIC_NAMES, and "count".
    The mean over images of the per-image threshold averages equals the toolbox's dataset score
    (mean over thresholds of the per-threshold means over images), since both are plain averages.
    """
    if isinstance(rows, dict) or len(rows) == 0:
        raise ValueError(f"rows must be a non-empty list of per-image metric dicts, got {rows!r}")
    summary: dict[str, float] = {}
    for name in METRIC_NAMES:
        missing = [i for i, row in enumerate(rows) if name not in row]
        if missing:
            raise ValueError(f"metric {name!r} missing from rows {missing[:5]}")
        values = np.array([float(row[name]) for row in rows], dtype=np.float64)
        summary[f"{name}_mean"] = float(values.mean())
        summary[f"{name}_std"] = float(values.std())
    summary["count"] = len(rows)
    return summary
