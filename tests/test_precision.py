"""Mixed precision: the loss terms and the maps under ``bf16-mixed`` and ``16-mixed`` autocast are those of
``32-true`` within stated tolerances, computed in float32; ``16-mixed`` trains through Lightning's GradScaler."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision

from tame_lit.train import train
from tame_lit.training import HeadTrainingModule
from tests.helpers import TINY_BACKBONE, TINY_OVERRIDES, compose_train

# (relative tolerance of every loss term, largest and mean absolute difference of the [0, 1] maps), measured
# on this random tiny backbone at 64 px: bf16 keeps 8 bits of mantissa, float16 11.
TOLERANCES = {"bf16-mixed": (2e-3, 0.06, 0.015), "16-mixed": (1e-3, 0.015, 0.003)}


def _plugin(precision: str) -> MixedPrecision:
    # Lightning turns "16-mixed" on a CPU into bf16; the plugin built by hand keeps float16 and its GradScaler
    scaler = torch.amp.GradScaler("cpu") if precision == "16-mixed" else None
    return MixedPrecision(precision, "cpu", scaler=scaler)


@pytest.mark.parametrize("precision", list(TOLERANCES))
def test_loss_terms_and_maps_match_32_true(precision):
    torch.manual_seed(0)
    module = HeadTrainingModule(
        TINY_BACKBONE, {"name": "tame"}, loss={"kept": [0.5, 0.15], "deleted": [0.1], "inserted": [0.15]}
    )
    module.eval()
    images = torch.rand(6, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 3, 3, 5, 7, 9])

    def step(context) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        with context:
            with torch.no_grad():
                _, features = module.backbone.features(images, module.head.layers)
            terms, _ = module.masking_pass(images, features, labels)
            return {key: value.detach() for key, value in terms.items()}, module.explain(images, labels)

    exact_terms, exact_maps = step(contextlib.nullcontext())
    terms, maps = step(_plugin(precision).forward_context())
    relative, largest, mean = TOLERANCES[precision]
    assert set(terms) == {"ce", "area", "variation", "loss", "ce@50", "ce@15", "del@10", "ins@15"}
    for key, value in terms.items():
        assert value.dtype == torch.float32, key
        assert float(value) == pytest.approx(float(exact_terms[key]), rel=relative), key
    assert maps.dtype == torch.float32 and maps.shape == exact_maps.shape
    difference = (maps - exact_maps).abs()
    assert float(difference.max()) < largest and float(difference.mean()) < mean
    assert not torch.equal(maps, exact_maps)  # autocast did run in low precision


def test_16_mixed_trains_with_a_grad_scaler_and_checkpoints_its_scale(tmp_path):
    """Through ``train.py``'s config: the precision plugin in ``trainer.plugins`` (how float16 runs on a CPU;
    on a GPU ``trainer.precision=16-mixed`` builds the same), kept beside tame-lit's atomic checkpoint writer."""
    plugin = ("{_target_: lightning.pytorch.plugins.precision.MixedPrecision, precision: 16-mixed, device: cpu, "
              "scaler: {_target_: torch.amp.GradScaler, device: cpu}}")  # fmt: skip
    overrides = [*TINY_OVERRIDES, "trainer.max_steps=3", "logger=none", "trainer.precision=null",
                 f"+trainer.plugins=[{plugin}]", "optimizer.max_lr=0.05"]  # fmt: skip
    metrics = train(compose_train(overrides, tmp_path))
    assert math.isfinite(metrics["train/loss"])
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["MixedPrecision"]["scale"] > 0  # the GradScaler's state, restored on resume
    head = {key: value for key, value in checkpoint["state_dict"].items() if key.startswith("head.")}
    assert all(torch.isfinite(value.float()).all() for value in head.values())
    assert checkpoint["global_step"] == 3 and (tmp_path / "export" / "head.safetensors").is_file()
