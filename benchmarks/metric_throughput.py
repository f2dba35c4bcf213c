"""Seconds per image of each issue-#17 metric, next to Quantus 0.6.0 on the same images, maps and settings.

    python benchmarks/metric_throughput.py [--device cuda] [--batch 16] [--images 16] [--explainer gradcam]
        [--samples 10] [--radius 0.05] [--chunk 64] [--repeats 3] [--repeat-budget 60]
        [--metrics randomisation random_logit ...] [--no-quantus]

EfficientNet-Lite0 with its ImageNet weights, ``--images`` real photos of Imagenette's validation set
(``../shared/data/imagenette/val``: every k-th file, so the classes are balanced), the ``--explainer``'s maps
(default Grad-CAM) of each image's top-1 class. Each metric is timed on its own: a fresh metric object, fresh
``ScoredBatch`` es (clean logits given, as the evaluation shares them), ``update`` on every batch of ``--batch``
images, then ``compute``. Quantus (``pip install quantus==0.6.0``, a test dependency) gets the same images,
targets and maps (``a_batch``), an ``explain_func`` that calls the same tame-lit explainer, ``batch_size`` =
``--batch``, abs and normalisation off, no warnings and no progress bar:

- ``randomisation`` (cascading from the top, tame-lit's 12 units of Lite0: stem, bn1, blocks.0-6, head conv,
  bn2, classifier) against ``quantus.MPRT`` (``layer_order="top_down"``), which re-initialises every module with
  ``reset_parameters`` (99 on Lite0), one explainer pass each. The totals are therefore not like for like: the
  row "per randomised layer" divides each total by its own number of layers (both also explain once on the
  trained model). MPRT's seed is chosen so its first layer (the classifier) is randomised as tame-lit's.
- ``random_logit`` against ``quantus.RandomLogit`` (one explainer pass per image on both; the drawn classes
  differ, and Quantus takes SSIM of the flattened maps).
- ``max_sensitivity``, ``avg_sensitivity``, ``local_lipschitz`` against ``MaxSensitivity``, ``AvgSensitivity``
  (difference, Frobenius norms) and ``LocalLipschitzEstimate``: ``--samples`` noisy copies per image, uniform
  noise of half-width ``--radius`` (Quantus's ``batch_uniform_noise``, ``lower_bound=radius``), no check of the
  prediction. Each draws its own noise. tame-lit's three are timed alone and together
  (``robustness_shared``: one ``ScoredBatch`` updated by the three, which share the noisy copies and their maps),
  against the sum of Quantus's three (it has no sharing).
- ``sparseness``, ``complexity``: maps only, against ``Sparseness``, ``Complexity``.
- ``relevance_mass``, ``relevance_rank``, ``box_iou``: Imagenette has no boxes here, so every image gets one
  synthetic centred box of its explained class (the middle half of each side, a quarter of the pixels); Quantus's
  ``RelevanceMassAccuracy`` / ``RelevanceRankAccuracy`` get it as ``s_batch``; Quantus has no box IoU.

Timings are the fastest of up to ``--repeats`` runs (fewer when the runs so far took over ``--repeat-budget``
seconds): other work on the machine only slows a run down.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import io
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from common import benchmark_parser, steady_allocator, timed

from tame_lit import backbones, explainers, metrics
from tame_lit.metrics import ScoredBatch, hashed_seed
from tame_lit.metrics.randomisation import randomisation_layers

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenette" / "val"
ROBUSTNESS = ("max_sensitivity", "avg_sensitivity", "local_lipschitz")
METRICS = (
    "randomisation",
    "random_logit",
    *ROBUSTNESS,
    "robustness_shared",
    "sparseness",
    "complexity",
    "relevance_mass",
    "relevance_rank",
    "box_iou",
)
NEEDS_BOXES = ("relevance_mass", "relevance_rank", "box_iou")


def photos(root: Path, count: int, size: int) -> tuple[torch.Tensor, str]:
    """``count`` photos of ``root`` (every k-th file: the classes in turn) and where they came from."""
    from tame_lit.data import ImageDataset, eval_transform, folder_samples

    if not root.is_dir():
        return torch.rand(count, 3, size, size), f"random pixels ({root} not found)"
    samples, _ = folder_samples(root)
    step = max(1, len(samples) // count)
    dataset = ImageDataset(samples[::step][:count], eval_transform(256 * size // 224, size))
    return torch.stack([dataset[i][0] for i in range(len(dataset))]), f"{root.parent.name}/{root.name}"


def centred_boxes(targets: torch.Tensor, size: int) -> list[torch.Tensor]:
    """One box per image, of its target class, over the middle half of each side: ``[1, 5]`` rows."""
    low, high = size // 4, size - size // 4
    return [torch.tensor([[float(t), low, low, high, high]]) for t in targets.tolist()]


def best_of(call: Callable[[], object], device: str, repeats: int, budget: float) -> tuple[float, int]:
    """The fastest of up to ``repeats`` runs of ``call`` (no further run once the runs took ``budget`` seconds or
    the next would pass it) and the number of runs."""
    times: list[float] = []
    while len(times) < repeats and (not times or sum(times) + min(times) <= budget):
        times.append(timed(call, device))
    return min(times), len(times)


class Setup:
    """The model, explainer, images, maps and targets every metric is timed on, split into batches."""

    def __init__(self, args) -> None:
        self.args, self.device = args, args.device
        self.backbone = backbones.create("efficientnet_lite0").to(args.device).eval()
        self.explainer = explainers.create(args.explainer, self.backbone)
        images, self.source = photos(Path(args.data), args.images, args.size)
        self.images = images.to(args.device)
        self.count = self.images.shape[0]
        with torch.no_grad():
            self.logits = self.backbone(self.images)
        self.targets = self.logits.argmax(dim=1)
        self.explainer(self.images[:2], self.targets[:2])  # warm-up
        self.maps = self.explainer(self.images, self.targets).detach().float()
        self.boxes = centred_boxes(self.targets.cpu(), args.size)
        self.layers = randomisation_layers(self.backbone.model)
        self.mprt_layers = sum(1 for _, m in self.backbone.named_modules() if hasattr(m, "reset_parameters"))

    def batches(self) -> list[ScoredBatch]:
        """Fresh ``ScoredBatch`` es of ``--batch`` images (nothing shared with an earlier metric's)."""
        result = []
        for start in range(0, self.count, self.args.batch):
            part = slice(start, start + self.args.batch)
            result.append(
                ScoredBatch(
                    self.backbone,
                    self.images[part],
                    self.maps[part],
                    self.targets[part],
                    torch.arange(start, min(start + self.args.batch, self.count)),
                    self.boxes[part],
                    clean_logits=self.logits[part],
                    explainer=self.explainer,
                )
            )
        return result

    def options(self, name: str) -> dict:
        if name in ROBUSTNESS:
            return {"radius": self.args.radius, "samples": self.args.samples, "chunk_size": self.args.chunk}
        if name in ("randomisation", "random_logit"):
            return {"chunk_size": self.args.chunk}
        return {}

    def ours(self, names: tuple[str, ...]) -> tuple[float, dict[str, float]]:
        """Best seconds of scoring every batch with fresh metrics ``names`` (several: the same batches, so they
        share their work) and the last run's results."""
        results: dict[str, float] = {}

        def run() -> None:
            scorers = [metrics.create(name, **self.options(name)) for name in names]
            for batch in self.batches():
                for scorer in scorers:
                    scorer.update(batch)
            for scorer in scorers:
                results.update(scorer.compute())

        seconds, runs = best_of(run, self.device, self.args.repeats, self.args.repeat_budget)
        return seconds, {**results, "runs": runs}


class Quantus:
    """Quantus's counterpart of each metric on the setup's images, maps and explainer."""

    def __init__(self, setup: Setup) -> None:
        import quantus

        self.quantus, self.setup = quantus, setup
        self.x = setup.images.cpu().numpy()
        self.y = setup.targets.cpu().numpy()
        self.a = setup.maps[:, None].cpu().double().numpy()
        size = setup.args.size
        self.s = np.zeros((setup.count, 1, size, size))
        self.s[:, :, size // 4 : size - size // 4, size // 4 : size - size // 4] = 1  # the centred boxes
        self.cache: dict[str, tuple[float, float, int]] = {}

    def explain_func(self) -> Callable[..., np.ndarray]:
        """Quantus's explain_func: the setup's explainer, on a copy of the model when Quantus hands over one (MPRT's
        randomised model: ``on_backbone``, made once per copy)."""
        explainer, device = self.setup.explainer, self.setup.device
        copies: dict[int, object] = {}

        def explain(model, inputs, targets, **kwargs) -> np.ndarray:
            on = explainer
            if model is not explainer.backbone:
                if id(model) not in copies:
                    copies[id(model)] = explainer.on_backbone(model)
                on = copies[id(model)]
            x = torch.as_tensor(np.asarray(inputs, dtype=np.float32), device=device)
            y = torch.as_tensor(np.asarray(targets), device=device).long()
            return on(x, y).detach().float().cpu().numpy()

        return explain

    def scorer(self, name: str):
        """Quantus's metric object for ``name`` (None where it has none); quiet: some constructors print a
        warning about ``abs=False`` whatever ``disable_warnings`` says."""
        with contextlib.redirect_stdout(io.StringIO()):
            return self._scorer(name)

    def _scorer(self, name: str):
        q, args = self.quantus, self.setup.args
        common = {"abs": False, "normalise": False, "disable_warnings": True, "display_progressbar": False}
        robustness = {"nr_samples": args.samples, "return_nan_when_prediction_changes": False}
        frobenius = {
            "norm_numerator": q.norm_func.fro_norm,
            "norm_denominator": q.norm_func.fro_norm,
            "similarity_func": q.similarity_func.difference,
        }
        if name == "randomisation":
            # its first layer, the classifier, drawn as tame-lit's (it seeds torch with seed + 1)
            seed = hashed_seed("randomisation/0/classifier") - 1
            return q.MPRT(layer_order="top_down", seed=seed, **common)
        if name == "random_logit":
            return q.RandomLogit(num_classes=self.setup.logits.shape[1], **common)
        if name == "max_sensitivity":
            return q.MaxSensitivity(lower_bound=args.radius, **frobenius, **robustness, **common)
        if name == "avg_sensitivity":
            return q.AvgSensitivity(lower_bound=args.radius, **frobenius, **robustness, **common)
        if name == "local_lipschitz":
            return q.LocalLipschitzEstimate(
                perturb_func=q.perturb_func.batch_uniform_noise,
                perturb_func_kwargs={"lower_bound": args.radius},
                **robustness,
                **common,
            )
        if name == "sparseness":
            return q.Sparseness(**common)
        if name == "complexity":
            return q.Complexity(**common)
        if name == "relevance_mass":
            return q.RelevanceMassAccuracy(**common)
        if name == "relevance_rank":
            return q.RelevanceRankAccuracy(**common)
        return None

    def seconds(self, name: str) -> tuple[float, float, int] | None:
        """Best seconds of Quantus's ``name`` on every image, the mean of its values (MPRT: at the classifier) and
        the number of runs; None when Quantus has no such metric."""
        if name in self.cache:
            return self.cache[name]
        if self.scorer(name) is None:
            return None
        setup, result = self.setup, {}
        needs_model = name not in ("sparseness", "complexity", "relevance_mass", "relevance_rank")

        def run() -> None:
            scorer = self.scorer(name)
            extra = {"explain_func": self.explain_func(), "device": setup.device} if needs_model else {}
            if name in ("relevance_mass", "relevance_rank"):
                extra["s_batch"] = self.s
            result["value"] = scorer(
                model=setup.backbone if needs_model else None,
                x_batch=self.x,
                y_batch=self.y,
                a_batch=self.a,
                channel_first=True,
                batch_size=setup.args.batch,
                **extra,
            )

        # MPRT runs ~100 explainer passes: once
        repeats = 1 if name == "randomisation" else setup.args.repeats
        seconds, runs = best_of(run, setup.device, repeats, setup.args.repeat_budget)
        value = result["value"]
        if name == "randomisation":
            value = value["model.classifier"]
        self.cache[name] = (seconds, float(np.nanmean(np.asarray(value, dtype=np.float64))), runs)
        return self.cache[name]


def main() -> None:
    steady_allocator()
    started = time.perf_counter()
    parser = benchmark_parser(__doc__, batch=16)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--data", default=str(DATA), help="an ImageFolder tree of photos")
    parser.add_argument("--explainer", default="gradcam")
    parser.add_argument("--samples", type=int, default=10, help="noisy copies per image (robustness)")
    parser.add_argument("--radius", type=float, default=0.05, help="uniform noise half-width, [0, 1] pixel units")
    parser.add_argument("--chunk", type=int, default=64, help="tame-lit's chunk_size: images per explainer call")
    parser.add_argument("--metrics", nargs="+", default=list(METRICS), choices=METRICS)
    parser.add_argument("--quantus", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--repeats", type=int, default=3, help="timings: the fastest of up to this many runs")
    parser.add_argument("--repeat-budget", type=float, default=60.0, help="no further run past this many seconds")
    args = parser.parse_args()

    setup = Setup(args)
    reference = Quantus(setup) if args.quantus else None
    n = setup.count
    rows: list[tuple[str, str, str, str, str]] = []
    checks: list[str] = []

    def row(metric: str, ours: float, theirs: float | None, notes: str) -> None:
        theirs_text = f"{theirs:.4g}" if theirs is not None else "–"
        ratio = f"{theirs / ours:.1f}x" if theirs is not None else "–"
        rows.append((metric, f"{ours:.4g}", theirs_text, ratio, notes))
        print(f"{metric:>40}: tame-lit {ours:.4g} s/image, Quantus {theirs_text} s/image ({ratio})", flush=True)

    for name in args.metrics:
        if name == "robustness_shared":
            seconds, results = setup.ours(ROBUSTNESS)
            theirs = [reference.seconds(m) for m in ROBUSTNESS] if reference else []
            total = sum(t[0] for t in theirs) / n if theirs else None
            note = (
                f"the three on one ScoredBatch (one set of {args.samples} noisy copies and maps); Quantus: sum of its "
                f"three, no sharing; best of {results['runs']}"
            )
            row("max+avg sensitivity+local Lipschitz (shared)", seconds / n, total, note)
            continue
        seconds, results = setup.ours((name,))
        quantus = reference.seconds(name) if reference else None
        theirs = quantus[0] / n if quantus else None
        runs = f"best of {results['runs']}" + (f" / {quantus[2]}" if quantus else "")
        if quantus is not None:
            ours_value = results.get("randomisation@classifier" if name == "randomisation" else name, float("nan"))
            checks.append(f"{name}: tame-lit {ours_value:.4f}, Quantus {quantus[1]:.4f}")
        if name == "randomisation":
            layers, modules = len(setup.layers), setup.mprt_layers
            note = (
                f"totals: tame-lit {layers} units, Quantus {modules} modules (every one with reset_parameters), "
                f"{runs}; not like for like"
            )
            row(f"randomisation, total ({layers} vs {modules} layers)", seconds / n, theirs, note)
            per = theirs / modules if theirs is not None else None
            row(
                "randomisation, per randomised layer",
                seconds / n / layers,
                per,
                "each total / its own layer count (both also explain once on the trained model); per layer tame-lit "
                "scores rank correlation and SSIM, Quantus rank correlation only",
            )
            continue
        notes = {
            "random_logit": "1 explainer pass per image on both; other drawn classes; Quantus: SSIM of flattened maps",
            "max_sensitivity": f"{args.samples} uniform copies, radius {args.radius}, each draws its own noise",
            "avg_sensitivity": f"{args.samples} uniform copies, radius {args.radius}, each draws its own noise",
            "local_lipschitz": f"{args.samples} uniform copies, radius {args.radius}, each draws its own noise",
            "sparseness": "maps only",
            "complexity": "maps only",
            "relevance_mass": "synthetic centred box (middle half of each side)",
            "relevance_rank": "synthetic centred box (middle half of each side)",
            "box_iou": "synthetic centred box; Quantus has no box IoU",
        }
        row(name, seconds / n, theirs, f"{notes[name]}; {runs}")

    quantus_version = importlib.metadata.version("quantus") if reference else "not run"
    print(
        f"\ndevice={args.device} torch threads={torch.get_num_threads()} images={n} ({setup.source}, "
        f"{args.size}px) explainer={args.explainer} samples={args.samples} radius={args.radius} "
        f"batch={args.batch} tame-lit chunk_size={args.chunk} model=efficientnet_lite0 (ImageNet) "
        f"torch={torch.__version__} quantus={quantus_version}"
    )
    print("| metric | tame-lit s/image | Quantus s/image | speed-up | notes |")
    print("|---|---:|---:|---:|---|")
    for cells in rows:
        print("| " + " | ".join(cells) + " |")
    if checks:
        print("\nmean values (same maps; robustness: each its own noise; MPRT: at the classifier, seeded alike):")
        for line in checks:
            print(f"- {line}")
    print(f"\ntotal wall time: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
