"""Training under DDP gives the head one process gives: batch statistics over all processes, the same images in
the same order, every validation image counted once (CPU, gloo)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from torch import nn

from tame_lit.data.sampler import ShuffledSampler
from tame_lit.data.sources import folder_samples
from tame_lit.heads.sync import CrossProcessBatchNorm2d, synchronise_batch_norm
from tests.helpers import TINY_OVERRIDES, free_port, read_csv_metrics, run_cli


def _batch_norm_worker(rank: int, port: int, inputs: torch.Tensor, grad: torch.Tensor, results: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        layer = synchronise_batch_norm(nn.Sequential(nn.BatchNorm2d(3)))[0]
        with torch.no_grad():
            layer.weight.copy_(torch.tensor([0.5, 2.0, -1.0]))
            layer.bias.copy_(torch.tensor([0.1, 0.0, 0.3]))
        part = slice(0, 3) if rank == 0 else slice(3, 8)  # unequal shares: 3 and 5 images
        x = inputs[part].clone().requires_grad_(True)
        out = layer(x)
        (out * grad[part]).sum().backward()
        weight_grad = layer.weight.grad.clone()
        dist.all_reduce(weight_grad)  # the whole batch's loss is the sum of the processes' parts
        results[rank] = {"out": out.detach(), "x_grad": x.grad, "weight_grad": weight_grad,
                         "running_mean": layer.running_mean.clone(),
                         "running_var": layer.running_var.clone()}  # fmt: skip
    finally:
        dist.destroy_process_group()


def test_cross_process_batch_norm_equals_one_process_batch_norm():
    """Two processes with 3 and 5 images: outputs, input and parameter gradients and running statistics equal
    those of torch's BatchNorm2d on all 8 images in one process."""
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(8, 3, 5, 4, generator=generator) * 3 + 2
    grad = torch.randn(8, 3, 5, 4, generator=generator)
    reference = nn.BatchNorm2d(3)
    with torch.no_grad():
        reference.weight.copy_(torch.tensor([0.5, 2.0, -1.0]))
        reference.bias.copy_(torch.tensor([0.1, 0.0, 0.3]))
    x = inputs.clone().requires_grad_(True)
    out = reference(x)
    (out * grad).sum().backward()

    results = mp.Manager().dict()
    mp.spawn(_batch_norm_worker, args=(free_port(), inputs, grad, results), nprocs=2)
    together = {key: torch.cat([results[0][key], results[1][key]]) for key in ("out", "x_grad")}
    torch.testing.assert_close(together["out"], out.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(together["x_grad"], x.grad, rtol=1e-5, atol=1e-5)
    for rank in (0, 1):
        torch.testing.assert_close(results[rank]["weight_grad"], reference.weight.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(results[rank]["running_mean"], reference.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(results[rank]["running_var"], reference.running_var, rtol=1e-5, atol=1e-6)


def test_synchronised_batch_norm_keeps_parameters_and_is_plain_batch_norm_in_one_process():
    module = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Sequential(nn.BatchNorm2d(4)))
    module[1][0].running_mean.fill_(0.5)
    weight = module[1][0].weight
    before = {key: value.clone() for key, value in module.state_dict().items()}
    synced = synchronise_batch_norm(module)
    assert isinstance(synced[1][0], CrossProcessBatchNorm2d) and synced[1][0].weight is weight
    assert synced.state_dict().keys() == before.keys()
    for key, value in synced.state_dict().items():
        assert torch.equal(value, before[key]), key
    x = torch.randn(4, 3, 6, 6)
    reference = nn.BatchNorm2d(4)
    reference.load_state_dict(synced[1][0].state_dict())
    torch.testing.assert_close(synced[1][0](synced[0](x)), reference(synced[0](x)))  # no process group: plain


def _trained_head(run_dir) -> dict[str, torch.Tensor]:
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    return {key: value.float() for key, value in state.items() if key.startswith("head.")}


def _largest_difference(first: dict, second: dict) -> float:
    assert first.keys() == second.keys()
    return max(float((first[key] - second[key]).abs().max()) for key in first)


def test_two_processes_with_half_the_batch_train_the_head_of_one_process(tmp_path):
    """TAME's head (batch norms in its branches, ``loss.selection="batch"``), random crops and flips, 4 steps:
    1 process with batch 8 and 2 DDP processes with batch 4 end with the same head (within 1e-5: float32
    sums in another order) and the same validation metrics on 21 images (an odd count: a padded sampler
    would score one twice). Without ``sync_statistics`` each process normalises its own 4 images, and the
    heads part by far more."""
    common = [*TINY_OVERRIDES, "trainer.max_steps=4", "trainer.precision=32-true", "data.limit=21", "export=false",
              "seed=3"]  # fmt: skip
    ddp = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true",
           "data.batch_size=4"]  # fmt: skip
    runs = {
        "one": [*common, "data.batch_size=8"],
        "two": [*common, *ddp],
        "two_unsynced": [*common, *ddp, "sync_statistics=false"],
    }
    heads, validation = {}, {}
    for name, args in runs.items():
        run_dir = tmp_path / name
        result = run_cli([*args, f"hydra.run.dir={run_dir}"], cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        heads[name] = _trained_head(run_dir)
        rows = [row for row in read_csv_metrics(run_dir) if row.get("val/AD@15")]
        validation[name] = {key: float(rows[-1][key]) for key in ("val/AD@15", "val/AD@50", "val/IC@50")}
    assert any("running_mean" in key for key in heads["one"])  # the branches' batch norms are compared too
    assert _largest_difference(heads["one"], heads["two"]) < 1e-5
    assert _largest_difference(heads["one"], heads["two_unsynced"]) > 1e-3
    for key, value in validation["one"].items():
        assert validation["two"][key] == pytest.approx(value, abs=1e-3), key


def test_a_process_whose_whole_batch_is_unreadable_still_takes_part_in_the_synced_step(tmp_path):
    """Process 1's first batch is two broken files: it runs the head on a batch of no image, so the batch norms'
    all-reduces (forward and backward) and the class counts pair with process 0's, and training goes on."""
    root = tmp_path / "images" / "a"
    root.mkdir(parents=True)
    for index in range(16):
        Image.new("RGB", (72, 72), (15 * index, 255 - 10 * index, 90)).save(root / f"{index:02d}.png")
    samples, _ = folder_samples(tmp_path / "images")
    first_of_process_1 = list(ShuffledSampler(samples, seed=3, num_replicas=2, rank=1))[:2]
    broken = [samples[index][0] for index, _ in first_of_process_1]
    for path in broken:
        with open(path, "wb") as handle:
            handle.write(b"not an image")
    images = tmp_path / "images"
    args = [*TINY_OVERRIDES, "data=folder", f"data.train_root={images}", f"data.root={images}", "data.batch_size=2",
            "data.num_workers=0", "data.max_bad_fraction=0.5", "trainer=ddp",
            "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true", "trainer.max_steps=3",
            "export=false", "seed=3", f"hydra.run.dir={tmp_path / 'run'}"]  # fmt: skip
    result = run_cli(args, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    skipped = [float(row["data/skipped_images"]) for row in read_csv_metrics(tmp_path / "run")
               if row.get("data/skipped_images")]  # fmt: skip
    assert skipped == [2.0]  # the two broken files, in the one (shortened) epoch
    head = _trained_head(tmp_path / "run")
    assert all(torch.isfinite(value).all() for value in head.values())
    assert int(head["head.branches.0.bn.num_batches_tracked"]) == 3  # all three steps normalised a batch


def test_two_processes_fill_one_clean_pass_cache_with_every_image(tmp_path):
    """Under DDP both processes create the cache folder at their first step (one wins, the other uses it) and
    write their own images' rows: after an epoch there is one folder and every image's clean pass is in it,
    equal to one process's."""
    from safetensors.torch import save_file

    from tame_lit import backbones
    from tame_lit.data import EmbeddedDataModule
    from tests.helpers import TINY_BACKBONE

    torch.manual_seed(0)
    weights = tmp_path / "test_resnet.safetensors"  # one backbone in both processes (random init is per process)
    save_file(backbones.create(**TINY_BACKBONE).model.state_dict(), str(weights))
    args = [*TINY_OVERRIDES, f"backbone.weights={weights}", "trainer=ddp", "trainer.accelerator=cpu",
            "trainer.devices=2", "trainer.precision=32-true", "trainer.max_epochs=2", "data.batch_size=4",
            "data.repeats=1", "data.augment=false", f"clean_pass_cache={tmp_path / 'cache'}", "export=false",
            f"hydra.run.dir={tmp_path / 'run'}"]  # fmt: skip
    result = run_cli(args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (folder,) = (tmp_path / "cache").glob("clean-pass-*")
    data = EmbeddedDataModule(resize_size=72, crop_size=64, num_workers=0, augment=False, repeats=1)
    data.setup("fit")
    images = torch.stack([data.train_dataset[i][0] for i in range(len(data.train_dataset))])
    backbone = backbones.create(**(TINY_BACKBONE | {"weights": str(weights)}))
    with torch.no_grad():
        logits, features = backbone.features(images, backbone.default_layers)
    assert np.load(folder / "stored.npy").tolist() == [1] * len(images)
    assert np.load(folder / "top1.npy").tolist() == logits.argmax(dim=1).tolist()
    deepest = torch.from_numpy(np.load(folder / f"layer{len(backbone.default_layers) - 1}.npy")).float()
    torch.testing.assert_close(deepest, features[backbone.default_layers[-1]].half().float(), atol=2e-3, rtol=2e-3)
