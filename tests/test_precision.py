"""Mixed precision: the loss terms and the maps under ``bf16-mixed`` and ``16-mixed`` autocast are those of
``32-true`` within stated tolerances, computed in float32; ``16-mixed`` trains through Lightning's GradScaler."""

from __future__ import annotations

import contextlib

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision

from tame_lit.training import HeadTrainingModule
from tests.helpers import TINY_BACKBONE
from tests.test_training import tiny_data

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
    module = HeadTrainingModule(TINY_BACKBONE, {"name": "tame"}, loss={"kept": [0.5, 0.15], "deleted": [0.1]})
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
    assert set(terms) == {"ce", "area", "variation", "loss", "ce@50", "ce@15", "del@10"}
    for key, value in terms.items():
        assert value.dtype == torch.float32, key
        assert float(value) == pytest.approx(float(exact_terms[key]), rel=relative), key
    assert maps.dtype == torch.float32 and maps.shape == exact_maps.shape
    difference = (maps - exact_maps).abs()
    assert float(difference.max()) < largest and float(difference.mean()) < mean
    assert not torch.equal(maps, exact_maps)  # autocast did run in low precision


def test_16_mixed_trains_with_a_grad_scaler_and_checkpoints_its_scale(tmp_path):
    torch.manual_seed(0)
    module = HeadTrainingModule(TINY_BACKBONE, {"name": "tame"}, optimizer={"max_lr": 0.05})
    before = {key: value.clone() for key, value in module.head.state_dict().items()}
    plugin = _plugin("16-mixed")
    trainer = L.Trainer(accelerator="cpu", plugins=[plugin], max_steps=3, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(module, tiny_data())
    assert trainer.precision == "16-mixed" and plugin.scaler.is_enabled()
    head = module.head.state_dict()
    assert all(torch.isfinite(value.float()).all() for value in head.values())
    assert any(not torch.equal(value, before[key]) for key, value in head.items())  # the scaler let steps through
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=True)["MixedPrecision"]
    assert saved["scale"] == plugin.scaler.get_scale() > 0
