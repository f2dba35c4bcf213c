"""Sparseness (Gini index) and complexity (entropy) of the maps (issue #17): their formulas on hand-made maps,
their metric classes, and agreement with Quantus 0.6.0 (an optional test dependency: skipped without it)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tame_lit.metrics import Complexity, ScoredBatch, Sparseness
from tame_lit.metrics.complexity import map_entropy
from tame_lit.metrics.sparseness import gini_index


def maps_with_known_values() -> torch.Tensor:
    """[4, 2, 2]: one hot pixel, constant, blank, two equal pixels."""
    maps = torch.zeros(4, 2, 2)
    maps[0, 1, 0] = 0.7
    maps[1] = 0.4
    maps[3, 0] = 1.0
    return maps


def test_gini_index_follows_its_formula_on_hand_made_maps():
    # sorted values a_(1..4); G = sum (2i - n - 1) a_(i) / (n sum a): one hot -> 3/4 = (n - 1)/n, constant -> 0,
    # blank -> 0 (by definition), two equal of four -> (1 * 1 + 3 * 1) / (4 * 2) = 1/2
    torch.testing.assert_close(gini_index(maps_with_known_values()), torch.tensor([0.75, 0.0, 0.0, 0.5]).double())
    one_hot = torch.zeros(1, 224, 224)
    one_hot[0, 100, 7] = 1.0
    assert gini_index(one_hot).item() == pytest.approx(1 - 1 / 224**2) and gini_index(one_hot).item() > 0.9999


def test_map_entropy_follows_its_formula_on_hand_made_maps():
    # p = a / sum a; -sum p log p: one hot -> 0, constant -> log 4, blank -> log 4 (by definition), two -> log 2
    expected = torch.tensor([0.0, math.log(4), math.log(4), math.log(2)]).double()
    torch.testing.assert_close(map_entropy(maps_with_known_values()), expected)


def test_the_metrics_average_the_per_image_values_over_batches():
    torch.manual_seed(0)
    maps = torch.rand(6, 8, 8) ** 4
    for metric, formula, key in ((Sparseness(), gini_index, "sparseness"), (Complexity(), map_entropy, "complexity")):
        for start in (0, 4):
            part = slice(start, start + 4)
            count = maps[part].shape[0]
            images = torch.rand(count, 3, 8, 8)
            metric.update(ScoredBatch(lambda x: x.mean(dim=(2, 3)), images, maps[part], torch.zeros(count).long(),
                                      torch.arange(start, start + count)))  # fmt: skip
        expected = formula(maps)
        assert metric.compute()[key] == pytest.approx(float(expected.mean()))
        values = metric.per_image()
        torch.testing.assert_close(values[key][values["index"].argsort()], expected)


def test_sparseness_and_complexity_agree_with_quantus():
    """Quantus computes both on maps in its (N, 1, H, W) layout; abs and normalisation off, as tame-lit's maps
    are in [0, 1] already. Sparseness: Quantus adds 1e-7 to every value before the Gini index (so a blank map
    gives 0 there too), which moves a one-hot 16 x 16 map's index from 0.99609 to 0.99607: within 1e-4.
    Complexity: Quantus puts 1e-12 inside the logarithm: within 1e-9."""
    quantus = pytest.importorskip("quantus")
    generator = torch.Generator().manual_seed(0)
    maps = torch.rand(5, 16, 16, generator=generator) ** 3
    maps[1] = 0
    maps[1, 3, 4] = 1.0  # one hot
    maps[2, :8] = 0  # half blank
    images = np.random.default_rng(0).random((5, 3, 16, 16), dtype=np.float32)
    labels = np.zeros(5, dtype=int)
    options = {"abs": False, "normalise": False, "disable_warnings": True}
    theirs = {
        "sparseness": quantus.Sparseness(**options)(
            model=None, x_batch=images, y_batch=labels, a_batch=maps[:, None].double().numpy()
        ),
        "complexity": quantus.Complexity(**options)(
            model=None, x_batch=images, y_batch=labels, a_batch=maps[:, None].double().numpy()
        ),
    }
    np.testing.assert_allclose(gini_index(maps).numpy(), theirs["sparseness"], atol=1e-4, rtol=0)
    assert abs(gini_index(maps)[1].item() - theirs["sparseness"][1]) > 1e-6  # the 1e-7 offset shows
    np.testing.assert_allclose(map_entropy(maps).numpy(), theirs["complexity"], atol=1e-9, rtol=0)
