"""Max-/avg-sensitivity and the local Lipschitz estimate: their formulas on a hand-made explainer, the images
they count, batch independence, one shared set of noisy maps per batch, option errors, and agreement with
Quantus 0.6.0 on the same noisy copies (an optional test dependency: skipped without it)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

from tame_lit import explainers
from tame_lit.metrics import METRICS, ScoredBatch, create
from tame_lit.metrics.robustness import AvgSensitivity, LocalLipschitz, MaxSensitivity, uniform_noise

KINDS = (MaxSensitivity, AvgSensitivity, LocalLipschitz)


class Counting:
    """An explainer callable that counts its calls and the images it explains, and keeps its inputs."""

    def __init__(self, explain: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]) -> None:
        self.explain, self.calls, self.images, self.inputs = explain, 0, 0, []

    def __call__(self, images: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        self.calls += 1
        self.images += images.shape[0]
        self.inputs.append(images)
        return self.explain(images, targets)


def channel_mean(images: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
    return images.mean(dim=1)


def scored(images: torch.Tensor, explainer, indices: torch.Tensor | None = None, targets=None) -> ScoredBatch:
    targets = torch.zeros(images.shape[0], dtype=torch.long) if targets is None else targets
    maps = explainer(images, targets)
    return ScoredBatch(lambda x: x.mean(dim=(2, 3)), images, maps, targets, indices, explainer=explainer)


def scores(batch: ScoredBatch, **options) -> dict[str, dict[str, torch.Tensor]]:
    """Each metric's per-image values on ``batch`` (the three share its noisy maps)."""
    result = {}
    for kind in KINDS:
        metric = kind(**options)
        metric.update(batch)
        result[kind.key] = metric.per_image()
    return result


def test_the_three_follow_their_formulas_on_a_channel_mean_explainer():
    # e(x) = mean over channels, so e(x_j) - e(x) = the channel mean of the noise u_j drawn for the image:
    # max/avg sensitivity = max/mean_j ||mean_c u_j|| / ||mean_c x||, Lipschitz = max_j ||mean_c u_j|| / ||u_j||
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(4, 3, 16, 16, generator=generator)
    images[1] = 0.0  # black: a blank map e(x), left out of the sensitivities but not of the Lipschitz estimate
    images[2, :, :8] = 1.0  # white pixels: their copies go above 1 (noise is not clamped)
    indices = torch.tensor([7, 3, 11, 0])
    explainer = Counting(channel_mean)
    batch = scored(images, explainer, indices)
    radius, samples, seed = 0.1, 6, 5
    values = scores(batch, radius=radius, samples=samples, seed=seed, chunk_size=5)

    noise = uniform_noise(indices, (3, 16, 16), radius, samples, seed).double()  # the metric's draw, again
    assert noise.abs().max() <= radius and noise.abs().max() > 0.99 * radius
    moved = noise.mean(dim=2).flatten(2).norm(dim=2)  # ||e(x_j) - e(x)|| [4, 6]
    ratios = moved / images.double().mean(dim=1).flatten(1).norm(dim=1)[:, None]
    lipschitz = moved / noise.flatten(2).norm(dim=2)
    kept = [0, 2, 3]
    for key, expected, rows in (
        ("max_sensitivity", ratios.amax(dim=1), kept),
        ("avg_sensitivity", ratios.mean(dim=1), kept),
        ("local_lipschitz", lipschitz.amax(dim=1), [0, 1, 2, 3]),
    ):
        assert values[key]["index"].tolist() == indices[rows].tolist()
        torch.testing.assert_close(values[key][key], expected[rows], rtol=1e-5, atol=0)
    copies = torch.cat(explainer.inputs[1:])  # call 0 made batch.maps; then 24 copies in chunks of 5
    assert explainer.calls == 1 + 5 and copies.shape[0] == 4 * samples
    assert copies.min() < 0 and copies.max() > 1  # not clamped to [0, 1], as Quantus's uniform noise


def test_maps_that_ignore_the_noise_score_zero():
    fixed = torch.rand(16, 16, generator=torch.Generator().manual_seed(1))
    batch = scored(torch.rand(3, 3, 16, 16), lambda images, targets=None: fixed.expand(images.shape[0], 16, 16))
    for key, values in scores(batch, samples=4).items():
        assert values[key].tolist() == [0.0, 0.0, 0.0], key


def test_random_maps_are_sensitive_and_max_is_at_least_avg(tiny_backbone):
    # the random explainer seeds each map from the image's pixels: every noisy copy gets a new map
    explainer = explainers.create("random", tiny_backbone)
    batch = scored(torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(2)), explainer)
    values = scores(batch, samples=4)
    largest, mean = values["max_sensitivity"]["max_sensitivity"], values["avg_sensitivity"]["avg_sensitivity"]
    assert bool((largest > 0.2).all()) and bool((largest >= mean).all()) and bool((mean > 0).all())
    assert bool((values["local_lipschitz"]["local_lipschitz"] > 0).all())


def test_values_do_not_depend_on_the_batch_and_the_noisy_maps_are_shared(tiny_backbone):
    explainer = explainers.create("random", tiny_backbone)
    images = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    indices = torch.tensor([40, 41, 42, 43, 44, 45])
    whole = scores(scored(images, explainer, indices), samples=3, seed=9)
    split = {kind.key: kind(samples=3, seed=9) for kind in KINDS}
    for part in (slice(0, 4), slice(4, 6)):
        batch = scored(images[part], explainer, indices[part])
        for metric in split.values():
            metric.update(batch)
    for key, metric in split.items():
        assert metric.per_image()["index"].tolist() == indices.tolist()
        torch.testing.assert_close(metric.per_image()[key], whole[key][key], rtol=0, atol=0)
        assert metric.compute()[key] == pytest.approx(float(whole[key][key].mean()))

    counting = Counting(explainer)
    batch = scored(images, counting, indices)  # one call for e(x)
    MaxSensitivity(samples=3, chunk_size=4).update(batch)  # 18 copies in chunks of 4: 5 calls
    AvgSensitivity(samples=3).update(batch)
    LocalLipschitz(samples=3, chunk_size=100).update(batch)  # chunking changes no value: shared too
    assert (counting.calls, counting.images) == (1 + 5, 6 + 18)
    LocalLipschitz(samples=3, seed=1).update(batch)  # other noise: new copies
    assert (counting.calls, counting.images) == (1 + 5 + 1, 6 + 18 + 18)


def test_registration_options_and_errors():
    for name, kind in (("max_sensitivity", MaxSensitivity), ("avg_sensitivity", AvgSensitivity),
                       ("local_lipschitz", LocalLipschitz)):  # fmt: skip
        assert METRICS.lookup(name) is kind and kind.key == name
        assert kind.default_enabled is False and kind.higher_is_better is False
        assert [column.higher_is_better for column in kind().columns()] == [False]
    metric = create("local_lipschitz", {"seed": 3, "chunk_size": 7}, samples=2)
    assert (metric.radius, metric.samples, metric.seed, metric.chunk_size) == (0.05, 2, 3, 7)
    for options, option in (({"radius": 0}, "radius"), ({"radius": -0.1}, "radius"),
                            ({"radius": float("nan")}, "radius"), ({"samples": 0}, "samples"),
                            ({"samples": 2.5}, "samples"), ({"chunk_size": 0}, "chunk_size")):  # fmt: skip
        with pytest.raises(ValueError, match=rf"max_sensitivity\.{option}"):
            create("max_sensitivity", **options)
    images = torch.rand(2, 3, 8, 8)
    batch = ScoredBatch(lambda x: x.mean(dim=(2, 3)), images, images.mean(dim=1), torch.zeros(2).long())
    with pytest.raises(ValueError, match="give ScoredBatch the explainer"):
        MaxSensitivity(samples=2).update(batch)
    empty = MaxSensitivity()
    empty.update(scored(torch.zeros(0, 3, 8, 8), channel_mean))
    assert empty.compute() == {} and empty.per_image()["max_sensitivity"].numel() == 0


def quantus_values(quantus, metric: str, backbone, explainer, batch: ScoredBatch, copies: torch.Tensor, **options):
    """Quantus's ``metric`` on ``batch`` with our noisy ``copies`` [B, n, 3, H, W]: its perturb_func hands over copy j
    on its j-th call (Quantus perturbs the whole batch once per step), its explain_func calls ``explainer``."""
    size, samples = copies.shape[:2]
    steps = iter(range(samples))

    def perturb(arr: np.ndarray, indices: np.ndarray, **kwargs) -> np.ndarray:
        assert arr.shape == (size, copies[0, 0].numel())
        return copies[:, next(steps)].reshape(size, -1).numpy()

    def explain(model, inputs: np.ndarray, targets: np.ndarray, **kwargs) -> np.ndarray:
        return explainer(torch.from_numpy(np.asarray(inputs)), torch.from_numpy(np.asarray(targets)).long()).numpy()

    scorer = getattr(quantus, metric)(
        nr_samples=samples, perturb_func=perturb, normalise=False, abs=False, disable_warnings=True,
        return_nan_when_prediction_changes=False, **options,
    )  # fmt: skip
    result = scorer(
        model=backbone, x_batch=batch.images.numpy(), y_batch=batch.targets.numpy(),
        a_batch=batch.maps[:, None].numpy(), explain_func=explain, channel_first=True,
    )  # fmt: skip
    assert next(steps, None) is None  # every copy was used, once
    return np.asarray(result, dtype=np.float64)


@pytest.mark.parametrize("name", ["layercam", "random"])
def test_the_three_agree_with_quantus_on_the_same_noisy_copies(tiny_backbone, name):
    """Quantus's MaxSensitivity / AvgSensitivity (difference, Frobenius norms) and LocalLipschitzEstimate (its
    default Euclidean distances) on our copies, no normalisation, no abs, every sample kept: the same definitions,
    so equal within 1e-6 relative (Quantus takes the norms in float32, tame-lit in float64: at most 7e-8 apart
    here; Quantus's Lipschitz estimate also adds 1e-10 to the denominator). The random explainer's maps change
    with any bit of the input, so this also checks Quantus explained exactly our copies. Quantus's own defaults
    differ: LocalLipschitzEstimate draws Gaussian noise (std 0.1) and normalises the maps."""
    quantus = pytest.importorskip("quantus")
    explainer = explainers.create(name, tiny_backbone)
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(4))  # layercam is not blank at 64
    batch = scored(images, explainer, torch.tensor([5, 2, 9]), torch.tensor([1, 4, 7]))
    radius, samples, seed = 0.05, 4, 0
    assert bool((batch.maps.flatten(1).amax(dim=1) > 0).all())  # no blank map: Quantus would divide by 0
    ours = scores(batch, radius=radius, samples=samples, seed=seed)
    noise = uniform_noise(batch.indices, (3, 64, 64), radius, samples, seed)
    copies = batch.images[:, None] + noise  # exactly the metric's float32 copies
    frobenius = {"norm_numerator": quantus.norm_func.fro_norm, "norm_denominator": quantus.norm_func.fro_norm,
                 "similarity_func": quantus.similarity_func.difference}  # fmt: skip
    for key, metric, options in (
        ("max_sensitivity", "MaxSensitivity", frobenius),
        ("avg_sensitivity", "AvgSensitivity", frobenius),
        ("local_lipschitz", "LocalLipschitzEstimate", {}),
    ):
        theirs = quantus_values(quantus, metric, tiny_backbone, explainer, batch, copies, **options)
        np.testing.assert_allclose(ours[key][key].numpy(), theirs, rtol=1e-6, atol=0, err_msg=key)
        assert bool((ours[key][key] > 0).all())
