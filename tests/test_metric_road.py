"""ROAD: the batched imputer against independent reference solutions, and RoadScore on models whose
answer is known by hand."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from tame_lit.metrics import ScoredBatch
from tame_lit.metrics.imputation import linear_impute, noisy_linear_impute
from tame_lit.metrics.road import RoadScore, noise_seed

WEIGHTS = {(dy, dx): (1 / 6 if abs(dy) + abs(dx) == 1 else 1 / 12) for dy in (-1, 0, 1) for dx in (-1, 0, 1)}
del WEIGHTS[(0, 0)]


def ramp_images(batch: int, height: int, width: int) -> Tensor:
    """Smooth images: a different linear ramp per channel."""
    y = torch.arange(height, dtype=torch.float32).view(-1, 1) / height
    x = torch.arange(width, dtype=torch.float32).view(1, -1) / width
    channels = [0.2 + 0.5 * x + 0.1 * y, 0.3 - 0.2 * x + 0.4 * y, 0.6 + 0.1 * x - 0.3 * y]
    image = torch.stack([c.expand(height, width) for c in channels])
    return image.expand(batch, 3, height, width).clone()


def random_masks(batch: int, height: int, width: int, fraction: float, seed: int = 0) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, height, width, generator=generator) < fraction


def neighbour_mean(image: Tensor, y: int, x: int) -> Tensor:
    """The weighted mean of the in-image 8 neighbours of pixel (y, x) of a [3, H, W] image."""
    height, width = image.shape[-2:]
    total, weight_sum = torch.zeros(3, dtype=torch.float64), 0.0
    for (dy, dx), weight in WEIGHTS.items():
        if 0 <= y + dy < height and 0 <= x + dx < width:
            total += weight * image[:, y + dy, x + dx].double()
            weight_sum += weight
    return total / weight_sum


def dense_solution(image: Tensor, removed: Tensor) -> Tensor:
    """Imputation by an explicitly built float64 system and torch.linalg.solve."""
    height, width = removed.shape
    unknowns = [(y, x) for y in range(height) for x in range(width) if removed[y, x]]
    position = {pixel: i for i, pixel in enumerate(unknowns)}
    matrix = torch.zeros(len(unknowns), len(unknowns), dtype=torch.float64)
    rhs = torch.zeros(len(unknowns), 3, dtype=torch.float64)
    for i, (y, x) in enumerate(unknowns):
        for (dy, dx), weight in WEIGHTS.items():
            ny, nx = y + dy, x + dx
            if not (0 <= ny < height and 0 <= nx < width):
                continue
            matrix[i, i] += weight
            if removed[ny, nx]:
                matrix[i, position[(ny, nx)]] -= weight
            else:
                rhs[i] += weight * image[:, ny, nx].double()
    solution = torch.linalg.solve(matrix, rhs)
    out = image.double().clone()
    for i, (y, x) in enumerate(unknowns):
        out[:, y, x] = solution[i]
    return out


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9])
def test_imputed_pixels_are_the_weighted_mean_of_their_neighbours(fraction):
    images = ramp_images(2, 20, 24)
    removed = random_masks(2, 20, 24, fraction, seed=int(fraction * 10))
    imputed = noisy_linear_impute(images, removed, noise=0.0)
    assert torch.equal(
        imputed[~removed.unsqueeze(1).expand_as(images)], images[~removed.unsqueeze(1).expand_as(images)]
    )
    for b in range(2):
        pixels = removed[b].nonzero().tolist()
        assert pixels
        for y, x in pixels:
            expected = neighbour_mean(imputed[b], y, x)
            torch.testing.assert_close(imputed[b, :, y, x].double(), expected, atol=1e-4, rtol=0)


def test_matches_a_dense_solve():
    torch.manual_seed(3)
    images = torch.rand(3, 3, 9, 11)
    removed = random_masks(3, 9, 11, 0.6, seed=4)
    removed[2] = True
    removed[2, 4, 5] = False  # one known pixel: the whole image is one large hole
    imputed, _ = linear_impute(images, removed)
    for b in range(3):
        torch.testing.assert_close(imputed[b].double(), dense_solution(images[b], removed[b]), atol=1e-5, rtol=0)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy 2, on the torch tensors it hands to numpy
def test_matches_the_official_imputer():
    road = pytest.importorskip("pytorch_grad_cam.metrics.road")
    torch.manual_seed(5)
    images = torch.rand(2, 3, 17, 13)
    removed = random_masks(2, 17, 13, 0.7, seed=6)
    imputed, _ = linear_impute(images, removed)
    official = road.NoisyLinearImputer(noise=0.0)
    for b in range(2):  # its mask is 1 where pixels are kept
        torch.testing.assert_close(imputed[b], official(images[b], (~removed[b]).float()), atol=1e-5, rtol=0)


def test_multigrid_needs_few_iterations_for_a_large_hole():
    images = ramp_images(2, 96, 96) + 0.05 * torch.rand(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    removed = torch.ones(2, 96, 96, dtype=torch.bool)
    removed[:, :3], removed[1, :, -4:] = False, False  # 97 % and 93 % removed, one hole each
    multigrid, multigrid_iterations = linear_impute(images, removed)
    jacobi, jacobi_iterations = linear_impute(images, removed, max_iter=2000, multigrid=False, initial_guess=False)
    torch.testing.assert_close(multigrid, jacobi, atol=1e-4, rtol=0)
    assert multigrid_iterations.max() <= 20
    assert jacobi_iterations.min() >= 5 * multigrid_iterations.max()


def test_unconverged_systems_warn_and_still_return_their_last_iterate():
    images, removed = ramp_images(2, 32, 32), random_masks(2, 32, 32, 0.9)
    removed[0] = False  # nothing to solve: converged at iteration 0
    with pytest.warns(RuntimeWarning, match=r"1 image\(s\) did not reach tol=1e-06 in 2 CG iterations"):
        imputed, iterations = linear_impute(images, removed, max_iter=2)
    assert iterations.tolist() == [0, 2]
    assert torch.equal(imputed[0], images[0]) and torch.isfinite(imputed).all()


def test_imputation_ignores_the_callers_autocast():
    images, removed = ramp_images(2, 16, 16), random_masks(2, 16, 16, 0.5)
    expected, _ = linear_impute(images, removed)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        imputed, _ = linear_impute(images, removed)
    assert imputed.dtype == torch.float32
    torch.testing.assert_close(imputed, expected, atol=1e-6, rtol=0)


def test_every_pixel_removed_is_an_error():
    removed = random_masks(3, 8, 8, 0.5)
    removed[1] = True
    with pytest.raises(ValueError, match=r"images \[1\] have every pixel removed"):
        linear_impute(torch.rand(3, 3, 8, 8), removed)


def test_noise_is_added_at_removed_pixels_only_with_the_requested_std():
    images, removed = ramp_images(2, 32, 32), random_masks(2, 32, 32, 0.5)
    clean, _ = linear_impute(images, removed)
    generators = [torch.Generator().manual_seed(s) for s in (11, 12)]
    noisy = noisy_linear_impute(images, removed, noise=0.02, generators=generators)
    mask = removed.unsqueeze(1).expand_as(images)
    assert torch.equal(noisy[~mask], images[~mask])
    difference = (noisy - clean)[mask]
    assert difference.numel() > 1500
    assert difference.std().item() == pytest.approx(0.02, rel=0.1)
    assert abs(difference.mean().item()) < 0.003
    again = noisy_linear_impute(
        images, removed, noise=0.02, generators=[torch.Generator().manual_seed(s) for s in (11, 12)]
    )
    assert torch.equal(noisy, again)
    other = noisy_linear_impute(
        images, removed, noise=0.02, generators=[torch.Generator().manual_seed(s) for s in (11, 13)]
    )
    assert torch.equal(other[0], noisy[0]) and not torch.equal(other[1], noisy[1])
    # an image's noise comes from its own generator, whatever else is in the batch
    alone = noisy_linear_impute(images[1:], removed[1:], noise=0.02, generators=[torch.Generator().manual_seed(12)])
    torch.testing.assert_close(alone[0], noisy[1], atol=1e-6, rtol=0)
    torch.manual_seed(0)
    global_rng = noisy_linear_impute(images, removed, noise=0.02)
    torch.manual_seed(0)
    assert torch.equal(global_rng, noisy_linear_impute(images, removed, noise=0.02))


def test_noise_seed_is_a_function_of_image_level_and_order():
    seed = noise_seed(0, 17, 0.3, "morf")
    assert seed == noise_seed(0, 17, 0.3, "morf") and 0 <= seed < 2**63
    others = {noise_seed(1, 17, 0.3, "morf"), noise_seed(0, 18, 0.3, "morf"), noise_seed(0, 17, 0.4, "morf")}
    assert seed not in others | {noise_seed(0, 17, 0.3, "lerf")}


def region_model(images: Tensor) -> Tensor:
    """Class 1 when the central 8x8 region of a 24x24 image is bright on average, else class 0."""
    brightness = images[:, :, 8:16, 8:16].mean(dim=(1, 2, 3))
    return torch.stack([torch.zeros_like(brightness), 40 * (brightness - 0.5)], dim=1)


def road_values(order: str, images: Tensor, maps: Tensor, model=region_model, **options) -> dict[str, float]:
    """One order's results, under the short keys ``accuracy``, ``probability``, ``accuracy@10``, ..."""
    metric = RoadScore(orders=[order], **options)
    with torch.no_grad():
        predictions = model(images).argmax(dim=1)
    metric.update(ScoredBatch(model, images, maps, predictions))
    prefix = f"road_{order}"
    return {key.replace(f"{prefix}_", "").replace(prefix, "accuracy"): value for key, value in metric.compute().items()}


def test_a_faithful_map_scores_better_than_its_opposite():
    generator = torch.Generator().manual_seed(0)
    images = 0.2 + 0.05 * torch.rand(3, 3, 24, 24, generator=generator)
    images[:, :, 8:16, 8:16] += 0.6  # the bright region the model looks at
    good = 0.01 * torch.rand(3, 24, 24, generator=generator)
    good[:, 8:16, 8:16] += 1.0
    opposite = 1 - good
    assert (region_model(images).argmax(dim=1) == 1).all()
    morf_good, morf_opposite = road_values("morf", images, good), road_values("morf", images, opposite)
    lerf_good, lerf_opposite = road_values("lerf", images, good), road_values("lerf", images, opposite)
    # removing 10 % of 576 pixels takes 58 of the region's 64 first: the model's evidence is gone
    assert morf_good["accuracy@10"] == 0.0 and morf_opposite["accuracy@10"] == 1.0
    assert morf_good["accuracy"] < morf_opposite["accuracy"] == 1.0
    assert morf_good["probability"] < morf_opposite["probability"]
    assert lerf_good["accuracy"] > lerf_opposite["accuracy"]
    assert lerf_good["accuracy@50"] == 1.0 and lerf_opposite["accuracy@50"] == 0.0


def test_pixels_never_removed_give_the_clean_answer_exactly():
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(4, 3, 16, 16, generator=generator)
    images[:, :, :4, :4] = torch.rand(4, 1, 1, 1, generator=generator) * 0.5 + 0.4

    def corner_model(x: Tensor) -> Tensor:
        corner = x[:, :, :4, :4].mean(dim=(1, 2, 3))
        return torch.stack([torch.zeros_like(corner), 10 * (corner - 0.5), 3 * corner], dim=1)

    maps = 1 + torch.rand(4, 16, 16, generator=generator)
    maps[:, :4, :4] = 0.0  # least relevant: MoRF removes them last, and 90 % of 256 leaves 26 pixels
    targets = torch.tensor([0, 1, 2, 1])
    with torch.no_grad():
        predictions = corner_model(images).argmax(dim=1)
        clean = corner_model(images).softmax(dim=1).gather(1, targets[:, None]).squeeze(1)
    metric = RoadScore(orders=["morf"])
    metric.update(ScoredBatch(corner_model, images, maps, targets))
    assert metric.update_count == 1 and torch.equal(
        ScoredBatch(corner_model, images, maps, targets).predictions, predictions
    )
    values = metric.compute()
    for percent in range(10, 100, 10):
        assert values[f"road_morf@{percent}"] == 1.0
        assert values[f"road_morf_probability@{percent}"] == pytest.approx(clean.double().mean().item(), abs=1e-12)


@pytest.mark.parametrize("order", ["morf", "lerf"])
def test_each_level_removes_exactly_round_p_hw_pixels_in_map_order(order):
    generator = torch.Generator().manual_seed(2)
    images = torch.rand(2, 3, 10, 13, generator=generator)
    maps = torch.randint(0, 4, (2, 10, 13), generator=generator).float()  # many ties
    seen: list[Tensor] = []

    def spy(x: Tensor) -> Tensor:
        seen.append(x.clone())
        return torch.zeros(x.shape[0], 2)

    levels = (0.15, 0.5, 0.85)
    metric = RoadScore(levels=levels, orders=[order], noise=0.05)
    metric.update(ScoredBatch(spy, images, maps, torch.zeros(2, dtype=torch.long), clean_logits=torch.zeros(2, 2)))
    assert len(seen) == len(levels)
    for level, imputed in zip(levels, seen, strict=True):
        changed = (imputed != images).any(dim=1)
        count = round(level * 130)
        for b in range(2):
            values = maps[b].flatten().tolist()
            # an independent ranking: by value (descending for MoRF), ties by position
            ranking = sorted(range(130), key=lambda i: (-values[i] if order == "morf" else values[i], i))
            expected = torch.zeros(130, dtype=torch.bool)
            expected[ranking[:count]] = True
            assert torch.equal(changed[b].flatten(), expected)


def test_noise_is_keyed_by_dataset_index_seed_and_level():
    images, maps = ramp_images(1, 12, 12).expand(3, 3, 12, 12), torch.rand(1, 12, 12).expand(3, 12, 12)
    seen: list[Tensor] = []

    def spy(x: Tensor) -> Tensor:
        seen.append(x.clone())
        return torch.zeros(x.shape[0], 2)

    labels = torch.zeros(3, dtype=torch.long)
    for seed in (0, 0, 1):
        batch = ScoredBatch(spy, images, maps, labels, torch.tensor([5, 6, 5]), clean_logits=torch.zeros(3, 2))
        RoadScore(levels=(0.3, 0.6), orders=["morf"], seed=seed).update(batch)
    at_30, at_60, again_at_30, _, other_seed_at_30, _ = seen
    assert torch.equal(at_30[0], at_30[2]) and not torch.equal(at_30[0], at_30[1])  # same image, index 5 vs 6
    assert torch.equal(at_30, again_at_30) and not torch.equal(at_30, other_seed_at_30)
    # the noise (imputed minus the noise-free imputation) differs between levels where both remove a pixel
    removed_30, removed_60 = (at_30 != images).any(dim=1), (at_60 != images).any(dim=1)
    noise_30 = at_30 - linear_impute(images, removed_30)[0]
    noise_60 = at_60 - linear_impute(images, removed_60)[0]
    both = (removed_30 & removed_60).unsqueeze(1).expand_as(images)
    assert both.sum() > 50 and (noise_30[both] - noise_60[both]).abs().min() > 0


def tiny_classifier() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 5)
    )


def test_results_do_not_depend_on_batching_or_order():
    model = tiny_classifier().eval()
    generator = torch.Generator().manual_seed(3)
    images = torch.rand(7, 3, 20, 20, generator=generator)
    maps = torch.rand(7, 20, 20, generator=generator)
    targets = torch.randint(0, 5, (7,), generator=generator)
    with torch.no_grad():
        predictions = model(images).argmax(dim=1)
    indices = torch.arange(100, 107)
    levels = (0.1, 0.5, 0.9)

    def part_of(rows) -> ScoredBatch:
        return ScoredBatch(model, images[rows], maps[rows], targets[rows], indices[rows])

    whole = RoadScore(levels=levels)
    whole.update(part_of(slice(None)))
    single = RoadScore(levels=levels)
    for i in range(7):
        single.update(part_of(slice(i, i + 1)))
    shuffled, permutation = RoadScore(levels=levels, chunk_size=3), torch.tensor([4, 0, 6, 2, 5, 1, 3])
    for part in (permutation[:3], permutation[3:]):
        shuffled.update(part_of(part))
    first, second = RoadScore(levels=levels), RoadScore(levels=levels)  # as two DDP processes
    first.update(part_of(slice(0, 3)))
    second.update(part_of(slice(3, 7)))
    first.merge_state(second)
    assert torch.equal(part_of(slice(None)).predictions, predictions)
    expected = whole.compute()
    assert 0.0 < expected["road_morf_probability"] < 1.0
    for other in (single, shuffled, first):
        result = other.compute()
        assert result.keys() == expected.keys()
        for key, value in expected.items():
            assert result[key] == pytest.approx(value, abs=1e-6), key
    # per-image values follow the dataset index, whatever the batching
    ordered = {}
    for other in (whole, single, shuffled, first):
        per_image = other.per_image()
        order = per_image["index"].argsort()
        assert per_image["index"][order].tolist() == list(range(100, 107))
        ordered[id(other)] = per_image["road_lerf_probability"][order]
    values = list(ordered.values())
    for other_values in values[1:]:
        torch.testing.assert_close(other_values, values[0], atol=1e-6, rtol=0)
    assert values[0].mean().item() == pytest.approx(expected["road_lerf_probability"], abs=1e-9)


def test_compute_keys_and_curve():
    model = tiny_classifier().eval()
    images, maps = torch.rand(3, 3, 16, 16), torch.rand(3, 16, 16)
    metric = RoadScore(levels=(0.1, 0.25, 0.9), orders=["lerf"])
    targets = torch.tensor([0, 1, 2])
    metric.update(ScoredBatch(model, images, maps, targets))
    values = metric.compute()
    assert set(values) == {"road_lerf", "road_lerf_probability"} | {
        f"road_lerf{m}@{p}" for m in ("", "_probability") for p in (10, 25, 90)
    }
    assert set(values) == {column.key for column in metric.columns()}
    assert [c.key for c in metric.columns() if c.table] == ["road_lerf"]
    curve = metric.curves()["road_lerf"]
    assert curve.x == pytest.approx([10, 25, 90]) and curve.figure == "road" and curve.label == "LeRF"
    assert curve.y == [values[f"road_lerf@{p}"] for p in (10, 25, 90)]
    assert values["road_lerf"] == pytest.approx(sum(curve.y) / 3)
    probabilities = [values[f"road_lerf_probability@{p}"] for p in (10, 25, 90)]
    assert values["road_lerf_probability"] == pytest.approx(sum(probabilities) / 3)
    assert all(0.0 <= a <= 1.0 for a in curve.y)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"levels": (0.0, 0.5)}, r"\(0, 1\).*\[0\.0\]"),
        ({"levels": (0.5, 1.5)}, r"\[1\.5\]"),
        ({"levels": ()}, "empty"),
        ({"levels": (0.101, 0.099)}, "distinct"),
        ({"orders": ["mrf"]}, "'mrf'"),
        ({"orders": ["morf", "morf"]}, "distinct"),
        ({"noise": -0.1}, "-0.1"),
        ({"chunk_size": 0}, "got 0"),
    ],
)
def test_bad_arguments_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        RoadScore(**options)


def test_bad_inputs_are_named():
    metric, model = RoadScore(), tiny_classifier().eval()
    images, labels = torch.rand(2, 3, 16, 16), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match=r"maps must be .* got \(2, 8, 8\)"):
        metric.update(ScoredBatch(model, images, torch.rand(2, 8, 8), labels))
    with pytest.raises(ValueError, match=r"indices must be \[B\] = \[2\], got \(3,\)"):
        metric.update(ScoredBatch(model, images, torch.rand(2, 16, 16), labels, torch.arange(3)))
    with pytest.raises(ValueError, match="noise must be >= 0, got -1"):
        noisy_linear_impute(images, torch.rand(2, 16, 16) < 0.5, noise=-1)
    with pytest.raises(ValueError, match="3 generators for 2 images"):
        noisy_linear_impute(images, torch.rand(2, 16, 16) < 0.5, generators=[torch.Generator()] * 3)
    with pytest.raises(ValueError, match="bool"):
        linear_impute(images, torch.rand(2, 16, 16))
    with pytest.raises(ValueError, match=r"level 0\.999 would remove all 256 pixels"):
        RoadScore(levels=(0.5, 0.999)).update(ScoredBatch(model, images, torch.rand(2, 16, 16), labels))
