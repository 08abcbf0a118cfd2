"""Paired comparisons of two models on the same test images: mean difference and a bootstrap interval.

A claim such as "CARes-UNet beats U-Net" compares two rows of a table whose runs were trained with the same
seeds and scored on the same test images. Two sources of chance move the difference between the rows: which
images happen to be in the test set, and which random initialisation / batch order a training run got. The
interval below resamples both (a two-level bootstrap): seeds with replacement, then images with replacement,
and takes the mean of the per-image, per-seed differences on each resample. With a handful of seeds the
seed level is coarse, so the interval is an honest "how sure can we be from these runs", not a guarantee.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

DEFAULT_RESAMPLES = 10_000
DEFAULT_CONFIDENCE = 0.95


def paired_difference(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]], *,
                      resamples: int = DEFAULT_RESAMPLES, confidence: float = DEFAULT_CONFIDENCE,
                      seed: int = 0) -> dict[str, Any]:
    """Mean of a - b over (seed, image) pairs and its two-level percentile-bootstrap interval.

    a, b: scores of shape (seeds, images); row s of a and row s of b come from runs with the same seed, and
    column i of both is the same test image. Returns mean, ci_low, ci_high, confidence, n_seeds, n_images,
    resamples and `significant` (the interval excludes 0)."""
    a_scores = _scores("a", a)
    b_scores = _scores("b", b)
    if a_scores.shape != b_scores.shape:
        raise ValueError(f"paired_difference: a and b must have the same (seeds, images) shape, got "
                         f"{tuple(a_scores.shape)} and {tuple(b_scores.shape)}")
    if not (isinstance(resamples, int) and resamples >= 100):
        raise ValueError(f"paired_difference: resamples must be an int >= 100, got {resamples!r}")
    if not (isinstance(confidence, float) and 0.5 <= confidence < 1.0):
        raise ValueError(f"paired_difference: confidence must be a float in [0.5, 1), got {confidence!r}")
    diff = a_scores - b_scores
    n_seeds, n_images = diff.shape
    rng = np.random.default_rng(seed)
    seed_rows = rng.integers(0, n_seeds, size=(resamples, n_seeds))
    image_cols = rng.integers(0, n_images, size=(resamples, n_images))
    # Resample r: mean over diff[seed_rows[r]][:, image_cols[r]]. It equals the mean over the picked seeds of
    # each seed's mean over the picked images; computed per seed first so memory stays (resamples, seeds).
    per_seed = np.stack([diff[s][image_cols].mean(axis=1) for s in range(n_seeds)], axis=1)  # (resamples, seeds)
    means = np.take_along_axis(per_seed, seed_rows, axis=1).mean(axis=1)
    tail = (1.0 - confidence) / 2
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return {"mean": float(diff.mean()), "ci_low": float(low), "ci_high": float(high), "confidence": confidence,
            "n_seeds": int(n_seeds), "n_images": int(n_images), "resamples": resamples,
            "significant": bool(low > 0 or high < 0)}


def _scores(name: str, values: Sequence[Sequence[float]]) -> np.ndarray:
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise TypeError(f"paired_difference: {name} must be a (seeds, images) table of numbers ({error})") from None
    if array.ndim != 2 or array.shape[0] < 1 or array.shape[1] < 2:
        raise ValueError(f"paired_difference: {name} must have shape (seeds >= 1, images >= 2), "
                         f"got {tuple(array.shape)}")
    if not np.isfinite(array).all():
        raise ValueError(f"paired_difference: {name} holds a non-finite score")
    return array


def paired_runs(a_runs: Mapping[int, Mapping[str, float]], b_runs: Mapping[int, Mapping[str, float]],
                ) -> tuple[list[int], list[str], list[list[float]], list[list[float]]]:
    """Lines up two rows' per-seed, per-image scores ({seed: {image name: score}}) on the seeds both rows
    have and the images every one of those runs scored. Returns (seeds, images, a table, b table)."""
    seeds = sorted(set(a_runs) & set(b_runs))
    if not seeds:
        raise ValueError(f"paired_runs: the two rows share no seed (seeds {sorted(a_runs)} and {sorted(b_runs)}); "
                         f"a paired comparison needs runs with the same seeds")
    images = sorted(set.intersection(*(set(runs[s]) for s in seeds for runs in (a_runs, b_runs))), key=_natural)
    for runs in (a_runs, b_runs):
        for s in seeds:
            missing = set(runs[s]) - set(images)
            if missing:
                raise ValueError(f"paired_runs: seed {s} scored images the other runs did not "
                                 f"({sorted(missing, key=_natural)[:5]}); the runs were evaluated on different sets")
    return (seeds, images, [[a_runs[s][i] for i in images] for s in seeds],
            [[b_runs[s][i] for i in images] for s in seeds])


def _natural(name: str) -> tuple:
    return (0, int(name), "") if name.isdigit() else (1, math.inf, name)


def describe(result: Mapping[str, Any], digits: int = 3) -> str:
    """'+0.012 [-0.004, +0.027], not significant' for a table cell."""
    text = (f"{result['mean']:+.{digits}f} [{result['ci_low']:+.{digits}f}, {result['ci_high']:+.{digits}f}]")
    return text + ("" if result["significant"] else ", not significant")
