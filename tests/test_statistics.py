"""Confidence intervals and paired comparisons (``tame_lit.statistics``): calibrated, exact where they can be,
and independent of the order (or process) the images were scored in."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tame_lit.metrics import Column
from tame_lit.statistics import (
    comparison_keys,
    interval_keys,
    mean_interval,
    paired_comparison,
    share_interval,
    summarise,
)


@pytest.mark.parametrize("distribution", ["normal", "skewed"])
def test_the_bootstrap_interval_covers_a_known_mean_95_percent_of_the_time(distribution):
    """400 seeded trials of 300 per-image values: the 95 % interval covers the true mean in 95 ± 3 % of them
    (also for skewed values like AD's, many near 0 and a long tail: Beta(0.5, 2), mean 0.2)."""
    covered = 0
    for trial in range(400):
        generator = np.random.default_rng(trial)
        if distribution == "normal":
            values, mean = generator.normal(1.0, 2.0, 300), 1.0
        else:
            values, mean = generator.beta(0.5, 2.0, 300), 0.2
        low, high = mean_interval(values, 0.95, resamples=1000, seed=0)
        covered += low <= mean <= high
    assert 0.92 <= covered / 400 <= 0.98


def test_the_share_interval_is_wilsons_formula_in_the_values_units():
    """30 of 100 images at 100 (IC in percent): Wilson's score interval, by hand, times 100."""
    values = np.array([100.0] * 30 + [0.0] * 70)
    z, p, n = 1.959963984540054, 0.3, 100
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    low, high = share_interval(values, 0.95, scale=100.0)
    assert low == pytest.approx(100 * (centre - half), abs=1e-9)
    assert high == pytest.approx(100 * (centre + half), abs=1e-9)
    assert share_interval(np.zeros(20), 0.95, 100.0)[0] == 0.0 < share_interval(np.zeros(20), 0.95, 100.0)[1]
    with pytest.raises(ValueError, match="0 or 100"):
        share_interval(np.array([0.0, 50.0]), 0.95, 100.0)


def test_degenerate_values_give_a_point_or_no_interval():
    assert mean_interval(np.full(10, 3.5)) == (3.5, 3.5)
    assert all(math.isnan(v) for v in mean_interval(np.array([1.0])))


def test_the_paired_test_finds_a_planted_difference_in_the_right_direction():
    generator = np.random.default_rng(0)
    reference = generator.beta(0.5, 2.0, 200)
    better = reference - 0.05 + generator.normal(0, 0.05, 200)  # lower is better (like AD or deletion)
    found = paired_comparison(better, reference, higher_is_better=False, seed=1)
    assert found.difference == pytest.approx(float(np.mean(better - reference)))
    assert found.low < found.difference < found.high < 0
    assert found.p_value < 1e-6 and found.outcome == 1 and found.images == 200
    assert paired_comparison(better, reference, higher_is_better=True, seed=1).outcome == -1
    # noise around the reference with no planted shift: the interval holds zero, a tie
    noisy = reference + generator.normal(0, 0.05, 200)
    assert paired_comparison(noisy, reference, higher_is_better=False, seed=1).outcome == 0


def test_two_identical_explainers_are_never_flagged():
    values = np.random.default_rng(0).random(50)
    found = paired_comparison(values, values.copy(), higher_is_better=True)
    assert (found.difference, found.low, found.high, found.p_value, found.outcome) == (0.0, 0.0, 0.0, 1.0, 0)
    shares = (np.random.default_rng(1).random(50) < 0.4) * 100.0
    found = paired_comparison(shares, shares.copy(), higher_is_better=True, share=True, scale=100.0)
    assert found.p_value == 1.0 and found.outcome == 0


def test_shares_are_compared_with_the_exact_mcnemar_test():
    """Of 40 images, 12 hit only with the explainer and 2 only with the reference: p = P(|B - 7| >= 5),
    B ~ Binomial(14, 1/2), two-sided."""
    mine = np.array([1.0] * 12 + [0.0] * 2 + [1.0] * 10 + [0.0] * 16)
    theirs = np.array([0.0] * 12 + [1.0] * 2 + [1.0] * 10 + [0.0] * 16)
    expected = 2 * sum(math.comb(14, k) for k in range(3)) / 2**14
    found = paired_comparison(mine, theirs, higher_is_better=True, share=True)
    assert found.p_value == pytest.approx(expected, rel=1e-9)
    assert found.difference == pytest.approx(10 / 40) and found.outcome == 1


COLUMNS = [
    Column("AD@15", "AD@15 ↓", False, 2, primary=True),
    Column("IC@15", "IC@15 ↑", True, 1, share=True, scale=100.0),
    Column("images", "images", None, 0),
]


def per_image(order: np.ndarray, shift: float) -> dict:
    generator = np.random.default_rng(3)
    drops = generator.beta(0.5, 2.0, 60) * 100 + shift
    increases = (generator.random(60) < 0.3) * 100.0
    index = torch.from_numpy(order)
    return {
        "ad_ic": {
            "index": index,
            "AD@15": torch.from_numpy(drops[order]),
            "IC@15": torch.from_numpy(increases[order]),
        }
    }


def test_summarise_gives_intervals_and_comparisons_whatever_order_the_images_came_in():
    """The same per-image values in another order (as another split across processes gives) yield the same
    intervals and comparisons; keys follow ``interval_keys``/``comparison_keys``; unscored columns get none."""
    straight = np.arange(60)
    shuffled = np.random.default_rng(0).permutation(60)
    first = summarise({"cam": per_image(straight, -5.0), "gradcam": per_image(straight, 0.0)}, COLUMNS, "gradcam")
    second = summarise({"cam": per_image(shuffled, -5.0), "gradcam": per_image(shuffled, 0.0)}, COLUMNS, "gradcam")
    assert first == second
    low, high = interval_keys("AD@15")
    assert first["cam"][low] < first["cam"][high] and "images_ci_low" not in first["cam"]
    keys = comparison_keys("AD@15", "gradcam")
    assert first["cam"][keys["difference"]] == pytest.approx(-5.0)
    assert first["cam"][keys["outcome"]] == 1  # lower AD is better: a win
    ic = comparison_keys("IC@15", "gradcam")
    assert first["cam"][ic["difference"]] == 0.0 and first["cam"][ic["outcome"]] == 0
    assert not any(key.endswith("_vs_gradcam") for key in first["gradcam"])  # the reference is not compared
    assert not any("_vs_" in key for key in summarise({"cam": per_image(straight, 0.0)}, COLUMNS, None)["cam"])


def test_comparisons_use_only_the_images_both_explainers_scored():
    mine = per_image(np.arange(60), -5.0)
    theirs = per_image(np.arange(60), 0.0)
    theirs["ad_ic"] = {key: value[:40] for key, value in theirs["ad_ic"].items()}  # the reference saw 40
    found = summarise({"cam": mine, "gradcam": theirs}, COLUMNS, "gradcam", resamples=200)
    expected = paired_comparison(
        mine["ad_ic"]["AD@15"][:40].numpy(), theirs["ad_ic"]["AD@15"].numpy(), False, resamples=200
    )
    assert found["cam"][comparison_keys("AD@15", "gradcam")["low"]] == pytest.approx(expected.low)


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="confidence"):
        summarise({}, COLUMNS, None, confidence=95)
    with pytest.raises(ValueError, match="resamples"):
        summarise({}, COLUMNS, None, resamples=10)
