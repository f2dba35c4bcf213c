"""Explanations per second of every explainer, next to the plain forward and to pytorch-grad-cam.

Same model, same layer, same images (real photos from ../shared/data when present), same targets (the
top-1 class). Fast methods (one forward and at most one backward) run on a batch of ``--batch`` images;
the perturbation methods (Score-CAM, Ablation-CAM, RISE, SISE), whose cost is hundreds to thousands of
forward passes per image, on ``--slow-batch`` images. pytorch-grad-cam (``pip install grad-cam``, an
optional benchmark dependency) is measured for the methods it also has, when it is installed. The trained heads
(``--heads``, default TAME and SA-CAM) are timed as ``HeadExplainer`` with freshly built weights: one backbone pass
and the head, the same cost as a trained head's.

    python benchmarks/explainer_throughput.py [--device cuda] [--batch 16] [--slow-batch 1]
        [--backbones efficientnet_lite0 resnet50 vit_b16 swin_tiny] [--methods gradcam ... | none]
        [--heads tame sacam | none] [--rise-masks 4000]

Backbones other than EfficientNet-Lite0 use random weights (speed does not depend on them). On transformers
(``vit_b16``, ``deit_small``, ``swin_tiny``) the methods are those defined for their layout, and pytorch-grad-cam
gets the reshape transform it needs (tame-lit's layout, so both read the same maps).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch
from common import benchmark_parser, steady_allocator

from tame_lit import backbones, explainers, heads

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-sample"
SLOW = {"scorecam", "ablationcam", "rise", "sise"}
# pytorch-grad-cam methods it cannot run on a layout, with the reason (not timed)
GRAD_CAM_UNSUPPORTED = {
    ("ablationcam", "channels_last"): "no ablation layer for [B, h, w, C] stages: its AblationLayerVit indexes "
    "dim 1 as tokens (IndexError on Swin) and stays in the model after the error",
}
GRAD_CAM_CLASSES = {
    "gradcam": "GradCAM",
    "gradcampp": "GradCAMPlusPlus",
    "xgradcam": "XGradCAM",
    "layercam": "LayerCAM",
    "scorecam": "ScoreCAM",
    "ablationcam": "AblationCAM",
}


def photos(count: int, size: int) -> torch.Tensor:
    from tame_lit.data import ImageDataset, eval_transform, folder_samples

    if not SAMPLE.is_dir():
        return torch.rand(count, 3, size, size)
    samples, _ = folder_samples(SAMPLE)
    dataset = ImageDataset(samples[:: len(samples) // count][:count], eval_transform(256 * size // 224, size))
    return torch.stack([dataset[i][0] for i in range(count)])


def seconds(call: Callable[[], object], repeats: int, device: str, warm_up: bool = True) -> float:
    """Mean seconds per call (after one warm-up call, unless the call is minutes long anyway)."""
    if warm_up:
        call()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        call()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def grad_cam_call(name: str, backbone: backbones.Backbone, layer: str, images: torch.Tensor, targets: torch.Tensor):
    """A pytorch-grad-cam call set up as its README and issues advise (one target per image, input
    requiring grad for a frozen model; a transformer's tokens through a reshape transform, here tame-lit's own
    layout), or None when the package is absent."""
    try:
        import pytorch_grad_cam
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ImportError:
        return None
    method = getattr(pytorch_grad_cam, GRAD_CAM_CLASSES[name])
    module = backbone.layer(layer)
    reshape = None
    if backbone.layout.kind != "spatial":

        def reshape(tokens: torch.Tensor) -> torch.Tensor:
            return backbone.layout.to_map(tokens, module, images.shape[-2:], layer)

    extra = {}
    if name == "ablationcam" and backbone.layout.kind == "tokens":  # its README's ViT recipe
        from pytorch_grad_cam.ablation_layer import AblationLayerVit

        extra["ablation_layer"] = AblationLayerVit()
    cam = method(model=backbone, target_layers=[module], reshape_transform=reshape, **extra)
    if name == "scorecam":
        cam.batch_size = 64
    if name == "ablationcam":
        cam.batch_size = 64
    wanted = [ClassifierOutputTarget(int(t)) for t in targets]

    def call() -> object:
        return cam(input_tensor=images.clone().requires_grad_(True), targets=wanted)

    return call


def main() -> None:
    steady_allocator()
    parser = benchmark_parser(__doc__, batch=16)
    parser.add_argument("--backbones", nargs="+", default=["efficientnet_lite0", "resnet50"])
    parser.add_argument("--methods", nargs="+", help="default: every method defined for the backbone but random")
    parser.add_argument("--heads", nargs="+", default=["tame", "sacam"], help="trained heads to time (none: no head)")
    parser.add_argument("--slow-batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rise-masks", type=int, default=4000)
    parser.add_argument("--no-grad-cam", action="store_true", help="skip pytorch-grad-cam")
    args = parser.parse_args()
    try:
        import importlib.metadata

        grad_cam_version = importlib.metadata.version("grad-cam")
    except importlib.metadata.PackageNotFoundError:
        grad_cam_version = "not installed"

    rows = []
    for backbone_name in args.backbones:
        weights = "imagenet" if backbone_name == "efficientnet_lite0" else None
        backbone = backbones.create(backbone_name, weights=weights).to(args.device)
        fast_images = photos(args.batch, args.size).to(args.device)
        with torch.inference_mode():
            forward = args.batch / seconds(lambda b=backbone, x=fast_images: b(x), args.repeats, args.device)
        rows.append((backbone_name, "plain forward", f"{forward:.1f}", "1.00", "", ""))
        print(f"{backbone_name:>18} {'plain forward':>18}: {forward:.3g}/s", flush=True)
        methods = args.methods or [m for m in explainers.defined_for(backbone.layout.kind) if m != "random"]
        methods = [] if methods == ["none"] else methods
        for head in [] if args.heads == ["none"] else args.heads:
            try:
                module = heads.create(head, backbone)
            except ValueError:  # no start from the classifier where a class token feeds it: timing is the same
                module = heads.create(head, backbone, init_from_classifier=False)
            explainer = explainers.HeadExplainer(backbone, module.to(args.device).eval())
            mine = args.batch / seconds(lambda e=explainer, x=fast_images: e(x), args.repeats, args.device)
            rows.append((backbone_name, f"{head} head", f"{mine:.3g}", f"{mine / forward:.3f}", "", ""))
            print(f"{backbone_name:>18} {head + ' head':>18}: {mine:.3g}/s", flush=True)
        for name in methods:
            slow = name in SLOW
            images = fast_images[: args.slow_batch] if slow else fast_images
            repeats = 1 if slow else args.repeats
            options = {"num_masks": args.rise_masks} if name == "rise" else {}
            try:
                explainer = explainers.create(name, backbone, **options)
            except ValueError as refusal:  # not defined for this model (CAM on a class-token ViT, SISE)
                rows.append((backbone_name, name, "refused", "", "", ""))
                print(f"{backbone_name:>18} {name:>18}: refused ({refusal})", flush=True)
                continue
            mine = images.shape[0] / seconds(lambda e=explainer, x=images: e(x), repeats, args.device, not slow)
            theirs = ""
            unsupported = GRAD_CAM_UNSUPPORTED.get((name, backbone.layout.kind))
            if unsupported and not args.no_grad_cam:
                print(f"{backbone_name:>18} {name:>18}: pytorch-grad-cam not run: {unsupported}", flush=True)
                theirs = "unsupported"
            elif name in GRAD_CAM_CLASSES and not args.no_grad_cam:
                with torch.no_grad():
                    targets = backbone(images).argmax(dim=1)
                layer = getattr(explainer, "layers", (backbone.cam_layer,))[0]
                call = grad_cam_call(name, backbone, layer, images, targets)
                try:
                    if call is not None:
                        theirs = images.shape[0] / seconds(call, repeats, args.device, not slow)
                except Exception as error:  # e.g. its ViT ablation layer on Swin's [B, h, w, C] stages
                    print(f"{backbone_name:>18} {name:>18}: pytorch-grad-cam failed: {error!r}", flush=True)
                    theirs = f"failed ({type(error).__name__})"
            ratio = f"{mine / theirs:.1f}x" if isinstance(theirs, float) else ""
            theirs_text = f"{theirs:.3g}" if isinstance(theirs, float) else theirs
            rows.append((backbone_name, name, f"{mine:.3g}", f"{mine / forward:.3f}", theirs_text, ratio))
            print(f"{backbone_name:>18} {name:>18}: {mine:.3g}/s {theirs_text}", flush=True)

    print(
        f"\ndevice={args.device} batch={args.batch} (perturbation methods: {args.slow_batch}) size={args.size}px "
        f"torch={torch.__version__} grad-cam={grad_cam_version} RISE masks={args.rise_masks}"
    )
    columns = ["backbone", "method", "tame-lit (explanations/s)", "ratio to plain forward", "pytorch-grad-cam (/s)"]
    print("| " + " | ".join([*columns, "speed-up"]) + " |")
    print("|---|---|---:|---:|---:|---:|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
