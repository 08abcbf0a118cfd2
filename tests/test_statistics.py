"""cares.statistics: the paired bootstrap behind the reproduction table's claims."""

import numpy as np
import pytest

from cares.statistics import describe, paired_difference, paired_runs  # noqa: E402


def _table(rng, seeds, images, shift=0.0, seed_noise=0.0, image_noise=0.05):
    base = rng.uniform(0.5, 0.9, size=images)                    # per-image difficulty, shared by both models
    a = base + shift + rng.normal(0, seed_noise, size=(seeds, 1)) + rng.normal(0, image_noise, (seeds, images))
    b = base + rng.normal(0, seed_noise, size=(seeds, 1)) + rng.normal(0, image_noise, (seeds, images))
    return a, b


def test_clear_improvement_is_significant_and_covers_the_shift():
    a, b = _table(np.random.default_rng(0), seeds=3, images=48, shift=0.03)
    result = paired_difference(a, b, resamples=2000)
    assert result["significant"]
    assert result["ci_low"] > 0 and result["ci_low"] < 0.03 < result["ci_high"]
    assert result["mean"] == pytest.approx(float((a - b).mean()))
    assert (result["n_seeds"], result["n_images"]) == (3, 48)


def test_no_difference_is_not_significant_in_most_draws():
    # Under the null the 95% interval should hold 0 about 95% of the time; allow generous slack.
    held = sum(not paired_difference(*_table(np.random.default_rng(k), 3, 48), resamples=1000, seed=k)["significant"]
               for k in range(40))
    assert held >= 32


def test_seed_variation_widens_the_interval():
    rng = np.random.default_rng(1)
    a, b = _table(rng, 3, 48, shift=0.02, seed_noise=0.0)
    quiet = paired_difference(a, b, resamples=2000)
    a_noisy = a + np.array([[0.05], [-0.05], [0.0]])             # the seeds of model a disagree a lot
    noisy = paired_difference(a_noisy, b, resamples=2000)
    assert noisy["ci_high"] - noisy["ci_low"] > 2 * (quiet["ci_high"] - quiet["ci_low"])


def test_reproducible_for_a_seed():
    a, b = _table(np.random.default_rng(2), 2, 10)
    assert paired_difference(a, b, seed=5) == paired_difference(a, b, seed=5)


@pytest.mark.parametrize("a, b, error, match", [
    ([[0.1, 0.2]], [[0.1, 0.2], [0.3, 0.4]], ValueError, "same"),
    ([0.1, 0.2], [0.1, 0.2], ValueError, "shape"),
    ([[0.1]], [[0.1]], ValueError, "images >= 2"),
    ([[0.1, float("nan")]], [[0.1, 0.2]], ValueError, "non-finite"),
    ([["x", 0.2]], [[0.1, 0.2]], TypeError, "numbers"),
])
def test_bad_tables_are_refused(a, b, error, match):
    with pytest.raises(error, match=match):
        paired_difference(a, b)


def test_paired_runs_lines_up_seeds_and_images():
    a = {0: {"2": 0.5, "10": 0.7}, 1: {"2": 0.6, "10": 0.8}, 2: {"2": 0.1, "10": 0.1}}
    b = {1: {"10": 0.75, "2": 0.55}, 0: {"2": 0.45, "10": 0.65}}
    seeds, images, ta, tb = paired_runs(a, b)
    assert seeds == [0, 1] and images == ["2", "10"]
    assert ta == [[0.5, 0.7], [0.6, 0.8]] and tb == [[0.45, 0.65], [0.55, 0.75]]


def test_paired_runs_refuses_unpaired_rows():
    with pytest.raises(ValueError, match="share no seed"):
        paired_runs({0: {"1": 0.5}}, {1: {"1": 0.5}})
    with pytest.raises(ValueError, match="different sets"):
        paired_runs({0: {"1": 0.5, "2": 0.4}}, {0: {"1": 0.5, "3": 0.4}})


def test_describe():
    text = describe({"mean": 0.0123, "ci_low": -0.004, "ci_high": 0.027, "significant": False})
    assert text == "+0.012 [-0.004, +0.027], not significant"
    assert describe({"mean": 0.02, "ci_low": 0.01, "ci_high": 0.03, "significant": True}) == "+0.020 [+0.010, +0.030]"
