"""The LightningModule that trains any explanation head on a frozen backbone with TAME's masking objective.

One step (tame.md §2.2): clean pass (hooks capture the head's layers; the label is the backbone's own
top-1 unless ground truth is asked for) -> head -> sigmoid map of each image's label, upsampled -> mask the
[0, 1] image -> second backbone pass -> CE + area + variation (+ one pass and CE per fraction of ``loss.kept``,
on the image masked by the map's top pixels, and one pass and the label's probability per fraction of
``loss.deleted``, on the image with those pixels deleted). Only the head is trained and checkpointed.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import OneCycleLR

from tame_lit import __version__, backbones, checkpoints, heads
from tame_lit.acceleration import Acceleration, accelerate
from tame_lit.checkpoints import IncompatibleCheckpointError
from tame_lit.clean_pass import CleanPassCache, weights_digest
from tame_lit.features import preserved_state
from tame_lit.heads import head_maps, select_classes
from tame_lit.heads.base import ranking_maps, training_masks
from tame_lit.heads.sync import distributed, synchronise_batch_norm
from tame_lit.io import output_folder_problem
from tame_lit.losses import MaskingLoss
from tame_lit.metrics import AverageDropIncrease, ScoredBatch
from tame_lit.metrics.deletion import blurred

__all__ = [
    "HeadTrainingModule",
    "IncompatibleCheckpointError",
    "NonFiniteTrainingError",
    "NothingToLearnError",
    "OptimizerConfig",
]


class NothingToLearnError(RuntimeError):
    """An epoch (or a validation) had no usable image: a run that learned or measured nothing must not succeed."""


class NonFiniteTrainingError(FloatingPointError):
    """The loss or the head's parameters stopped being finite: training stops before a bad head is saved."""


# Lightning warns about submodules in eval mode at fit start; the frozen backbone is, on purpose.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")


@dataclass
class OptimizerConfig:
    """SGD with Nesterov momentum and OneCycleLR stepped per batch (tame.md §2.4).

    Parameters named ``*bias`` get ``bias_lr_factor`` x the learning rate and no weight decay; scalar gains
    (SA-CAM's ``gamma``) get no weight decay, which would pull them back to 0; all others (conv weights,
    batch-norm scales) get ``weight_decay``.
    """

    max_lr: float = 1e-3
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    bias_lr_factor: float = 2.0
    pct_start: float = 0.3
    div_factor: float = 25.0
    final_div_factor: float = 1e4
    cycle_momentum: bool = True
    base_momentum: float = 0.85
    max_momentum: float = 0.95


class HeadTrainingModule(L.LightningModule):
    """Trains ``heads.create(**head)`` on ``backbones.create(**backbone)``.

    All arguments are plain configs (dicts of primitives), saved as hyperparameters, so a checkpoint alone
    rebuilds the module: ``HeadTrainingModule.load_from_checkpoint(path)``. ``labels``: ``"model"`` (the
    backbone's top-1 on the clean image, as TAME) or ``"ground_truth"`` (the dataset's labels).
    ``sync_statistics``: under DDP, the head's batch statistics are those of all processes' images together
    (its batch norms, and the labels whose maps ``loss.selection="batch"`` regularises), so N processes with
    batch B / N train the head one process with batch B trains; false: each process's own (the original
    TAME code's per-GPU batch norm), saving two small all-reduces per batch norm and one per step.
    ``acceleration``: ``tame_lit.acceleration.Acceleration`` (compile, channels-last, batch norms folded for the
    masked passes), applied to the backbone and the head at set-up; results are unchanged up to rounding.
    ``clean_pass_cache``: a folder where the clean pass of each training image (its features at the head's
    layers, float16, and its top-1 class) is kept after its first step, so that later epochs and runs on the
    same images skip that forward pass
    (``tame_lit.clean_pass``; needs ``data.augment=false``); null: recompute it every step.
    """

    def __init__(
        self,
        backbone: Mapping[str, Any],
        head: Mapping[str, Any],
        loss: Mapping[str, Any] | None = None,
        optimizer: Mapping[str, Any] | None = None,
        labels: str = "model",
        val_keep: Sequence[float] = (1.0, 0.5, 0.15),
        sync_statistics: bool = True,
        acceleration: Mapping[str, Any] | None = None,
        clean_pass_cache: str | None = None,
    ) -> None:
        super().__init__()
        self._batches_with_images = 0  # this epoch's, for the nothing-to-learn check
        self._resumed_schedule_steps: int | None = None  # a resumed checkpoint's schedule length
        if labels not in ("model", "ground_truth"):
            raise ValueError(f"labels must be 'model' or 'ground_truth', got {labels!r}")
        backbone_cfg = dict(backbone)
        head_cfg = dict(head)
        if "name" not in head_cfg:
            raise ValueError(f"head config needs a 'name' (one of {heads.available()}), got {head_cfg}")
        self.backbone = backbones.create(**backbone_cfg)
        head_options = checkpoints.head_options(head_cfg)
        self.head = heads.create(head_cfg["name"], self.backbone, head_cfg.get("layers"), **head_options)
        head_cfg["layers"] = list(self.head.layers)
        self.objective = MaskingLoss(**(loss or {}))
        self.optimizer_config = OptimizerConfig(**(optimizer or {}))
        self.labels = labels
        self.val_keep = tuple(float(f) for f in val_keep)
        self.sync_statistics = bool(sync_statistics)
        self.acceleration = Acceleration(**(acceleration or {}))
        self._accelerated = False
        self._folded_backbone: tuple[backbones.Backbone | None] = (None,)  # acceleration.fold_batch_norm, at set-up
        self.clean_pass_cache = clean_pass_cache
        self._clean_passes: CleanPassCache | None = None  # opened at set-up, when the training images are known
        self.save_hyperparameters(
            {
                "backbone": backbone_cfg,
                "head": head_cfg,
                "loss": asdict(self.objective),
                "optimizer": asdict(self.optimizer_config),
                "labels": labels,
                "val_keep": list(self.val_keep),
                "sync_statistics": self.sync_statistics,
                "acceleration": asdict(self.acceleration),
                "clean_pass_cache": clean_pass_cache,
            }
        )
        self.val_ad_ic = AverageDropIncrease(keep=self.val_keep)

    # ---- the masking objective -------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """Before any step (the data module is set up by now): ground-truth labels must be the model's classes."""
        check = getattr(self.trainer.datamodule, "check_ground_truth", None) if self._trainer is not None else None
        if self.labels == "ground_truth" and stage == "fit" and callable(check):
            check(self.backbone.num_classes)
        if stage == "fit" and self.sync_statistics and distributed():
            synchronise_batch_norm(self.head)
        if stage == "fit" and self.clean_pass_cache is not None and self._clean_passes is None:
            self._clean_passes = self._open_clean_pass_cache()
        if not self._accelerated:  # after the batch norms are swapped: compiling traces the modules in use
            folded = self.backbone.folded() if self.acceleration.fold_batch_norm else None
            self._folded_backbone = (folded,)  # in a tuple: not a submodule (no checkpoint, DDP or device moves)
            accelerate(self.acceleration, self.backbone, self.head, *([folded] if folded is not None else []))
            self._accelerated = True

    def _logits_network(self, device: torch.device) -> nn.Module:
        """The network of the masked passes, which need logits only: the backbone with its batch norms folded
        into its convolutions (``acceleration.fold_batch_norm``, built at set-up, moved here to the images'
        device) or, without it or while the backbone uses batch statistics, the backbone itself."""
        folded = self._folded_backbone[0]
        if folded is None or self.backbone.model.training:
            return self.backbone
        if folded.mean.device != device:
            folded.to(device)
        return folded

    def _open_clean_pass_cache(self) -> CleanPassCache:
        """Checked at set-up, before any step (not when a checkpoint is loaded elsewhere to explain)."""
        problem = output_folder_problem(self.clean_pass_cache)
        if problem:
            raise ValueError(f"clean_pass_cache={self.clean_pass_cache}: {problem}; give a writable folder, or null")
        images = getattr(self.trainer.datamodule, "train_images_key", None)
        if not callable(images):
            raise ValueError(
                f"clean_pass_cache needs to know the training images: {type(self.trainer.datamodule).__name__} has "
                "no train_images_key() (tame_lit.data.ImageDataModule has); use clean_pass_cache=null"
            )
        images_key, count = images()
        weights = weights_digest(self.backbone)
        return CleanPassCache(self.clean_pass_cache, self.backbone.name, weights, self.head.layers, images_key, count)

    def clean_pass(self, images: Tensor, indices: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The backbone's top-1 class and the head's layers' features of the clean images: from
        ``clean_pass_cache`` when it holds every image of the batch, else computed (and stored there)."""
        if self._clean_passes is not None:
            cached = self._clean_passes.read(indices, images.device)
            if cached is not None:
                features, top1 = cached
                return top1, features
        with torch.no_grad():
            logits, features = self.backbone.features(images, self.head.layers)
        top1 = logits.argmax(dim=1)
        if self._clean_passes is not None:
            features = self._clean_passes.write(indices, features, top1)
        return top1, features

    def _synced(self) -> bool:
        """Whether this training step's head statistics are taken over all processes."""
        return self.training and self.sync_statistics and distributed()

    def _batch_classes(self, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The classes whose maps the step computes (sorted), each label's column among them, and the columns
        of all the batch's labels that ``loss.selection="batch"`` regularises each image's maps of. Under
        ``sync_statistics`` the batch is every process's batch together (one all-reduce of class counts), so
        each process regularises its images on the maps of the whole batch's labels, as one process would."""
        if not (self._synced() and self.objective.selection == "batch"):
            classes, columns = torch.unique(labels, return_inverse=True)
            return classes, columns, columns
        counts = torch.bincount(labels, minlength=self.backbone.num_classes).float()
        counts = self.trainer.strategy.reduce(counts, reduce_op="sum").round().long()
        classes = counts.nonzero().flatten()
        batch_columns = torch.repeat_interleave(torch.arange(len(classes), device=labels.device), counts[classes])
        return classes, torch.searchsorted(classes, labels), batch_columns

    def _labels(self, top1: Tensor, dataset_labels: Tensor) -> Tensor:
        if self.labels == "model":
            return top1
        if (dataset_labels < 0).any():
            raise ValueError("labels='ground_truth' needs labelled images; this batch has images without a label")
        return dataset_labels

    def masking_pass(self, images: Tensor, features: dict[str, Tensor], labels: Tensor) -> tuple[dict, Tensor]:
        """Loss terms and the masked image's logits, computing only the maps of the batch's labels.

        With ``loss.kept``, one more backbone pass per fraction p, on the image masked by each map's top p
        pixels (``MaskingLoss.kept_mask``), gives the terms ``ce@<p>``; with ``loss.deleted``, one per fraction
        on the image with those pixels deleted (``MaskingLoss.deleted_mask``), the terms ``del@<p>``; with
        ``loss.inserted``, one per fraction on the blurred image with only those pixels put back
        (``MaskingLoss.inserted_mask``), the terms ``ins@<p>``."""
        classes, columns, batch_columns = self._batch_classes(labels)
        maps = self.head(features, classes).float()  # [B, U, h, w] logits
        masks = torch.sigmoid(maps)
        own_maps = select_classes(maps, classes, labels)  # each image's logits of its label
        own = training_masks(own_maps, images.shape[-2:], self.head.smoothing)
        network = self._logits_network(images.device)
        masked_logits = network(images * own.unsqueeze(1).to(images.dtype))
        kept_logits = [
            network(images * self.objective.kept_mask(own, fraction).unsqueeze(1).to(images.dtype))
            for fraction in self.objective.kept
        ]
        deleted_logits, inserted_logits = [], []
        if self.objective.deleted or self.objective.inserted:  # ranked as explanations rank pixels (``ranking_maps``)
            order = ranking_maps(own_maps, images.shape[-2:], self.head.smoothing)
            deleted_logits = [
                network(images * self.objective.deleted_mask(order, fraction).unsqueeze(1).to(images.dtype))
                for fraction in self.objective.deleted
            ]
        if self.objective.inserted:  # from the insertion curve's blurred start
            start = blurred(images.detach())
            inserted_logits = [
                network(
                    start
                    + (images - start) * self.objective.inserted_mask(order, fraction).unsqueeze(1).to(images.dtype)
                )
                for fraction in self.objective.inserted
            ]
        terms = self.objective(
            masked_logits, labels, masks, columns, kept_logits, deleted_logits, batch_columns, inserted_logits
        )
        return terms, masked_logits

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor | None:
        images = batch["images"]
        self.log(
            "data/skipped_images",
            float(batch["skipped"]),
            on_step=False,
            on_epoch=True,
            reduce_fx="sum",
            sync_dist=True,
        )
        if images.shape[0] == 0:
            # DDP all-reduces the gradients in backward: a process with no loss would leave the others waiting,
            # so it contributes a zero loss on the head's parameters instead (and, with synced statistics, takes
            # its part in their all-reduces with a batch of no image: the head's graph as on the others)
            idle = None
            if self._synced():
                idle = self._empty_head_pass(batch["labels"]) * 0.0
            elif self.trainer.world_size > 1:
                idle = sum(p.sum() for p in self.head.parameters() if p.requires_grad) * 0.0
            self._stop_unless_finite({}, "the training loss", agree=True)  # pairs with the others' check
            return idle
        self._batches_with_images += 1
        top1, features = self.clean_pass(images, batch["indices"])
        labels = self._labels(top1, batch["labels"])
        terms, masked_logits = self.masking_pass(images, features, labels)
        self._stop_unless_finite(terms, "the training loss", agree=True)
        batch_size = images.shape[0]
        self.log("train/loss", terms["loss"], prog_bar=True, batch_size=batch_size)
        self.log_dict({f"train/{k}": v for k, v in terms.items() if k != "loss"}, batch_size=batch_size)
        agreement = (masked_logits.argmax(dim=1) == top1).float().mean()
        self.log("train/masked_agreement", agreement, batch_size=batch_size)
        for layer, gamma in getattr(self.head, "gammas", dict)().items():  # SA-CAM: attention mixed in
            self.log(f"train/gamma/{layer}", gamma, batch_size=batch_size)
        return terms["loss"]

    def _empty_head_pass(self, labels: Tensor) -> Tensor:
        """The head on a batch of no image (features of its layers' shapes, batch size 0): the collectives of a
        synced step, in the order a step with images makes them."""
        shapes = self.backbone.layer_shapes(self.head.layers)
        device = self.backbone.mean.device
        features = {layer: torch.zeros(0, *shapes[layer], device=device) for layer in self.head.layers}
        classes = self._batch_classes(labels)[0]
        return self.head(features, classes).float().sum()

    def _stop_unless_finite(self, values: Mapping[str, Tensor], what: str, agree: bool = False) -> None:
        """Raise ``NonFiniteTrainingError`` naming the step and the non-finite ``values`` (loss terms or head
        parameters); the exception skips the optimiser step and every checkpoint save. Values that differ
        between DDP processes (the loss) are decided on all processes together (``agree``), so that every
        process stops at the same step instead of one waiting for the others; the head's parameters are the
        same on every process, so each decides alone (no collective in checkpoint hooks, which Lightning may
        call at different points on different processes)."""
        checks = [torch.isfinite(value.detach()).all() for value in values.values()]
        finite = torch.stack(checks) if checks else torch.ones(0, dtype=torch.bool)  # one device sync below
        decision = bool(finite.all())
        if agree and self._trainer is not None:
            decision = self.trainer.strategy.reduce_boolean_decision(decision, all=True)
        if decision:
            return
        bad = [name for name, ok in zip(values, finite.tolist(), strict=True) if not ok]
        shown = ", ".join(f"{name}={float(values[name].detach().float().flatten()[0]):g}" if values[name].numel() == 1
                          else name for name in bad[:8])  # fmt: skip
        raise NonFiniteTrainingError(
            f"step {self.global_step} (epoch {self.current_epoch}): {what} is not finite"
            f"{f' here: {shown}' if bad else ' in another process'}{' ...' if len(bad) > 8 else ''}. Training "
            "stopped: no checkpoint, export or metrics.json was written from this head, so the last checkpoint "
            "and the best one are from finite steps. Lower optimizer.max_lr, or use trainer.gradient_clip_val"
        )

    def on_train_epoch_start(self) -> None:
        self._batches_with_images = 0  # Lightning counts a step whose batch was empty as a step: count ours

    def _stop_if_nothing_was_learned(self) -> None:
        """At an epoch's last step: fail when no process had a batch with an image in it. Checked here, not in
        ``on_train_epoch_end``: there the progress bar computes the synced epoch metrics on process 0 only, and
        a collective of ours in between would pair with the wrong one on the others."""
        trained = self.trainer.strategy.reduce_boolean_decision(self._batches_with_images > 0, all=False)
        if not trained:
            raise NothingToLearnError(
                f"epoch {self.current_epoch} made no training step: none of its images{self._data_source('train')} "
                "could be used (unreadable, too large or failing the transform; the warnings name them)"
            )

    def _data_source(self, split: str) -> str:
        source = getattr(self.trainer.datamodule, "source", None)
        return f" (from {source(split)})" if callable(source) else ""

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._stop_unless_finite(dict(self.head.named_parameters()), "a head parameter")
        # A run that ends on max_steps in the middle of an epoch still validates (and checkpoints) its
        # final head: Lightning validates when asked to stop, not when max_steps is reached.
        if 0 < self.trainer.max_steps <= self.trainer.global_step:
            self.trainer.should_stop = True
        if self.trainer.is_last_batch or self.trainer.should_stop:
            self._stop_if_nothing_was_learned()

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        images = batch["images"]
        self.log("data/val_skipped_images", float(batch["skipped"]), on_epoch=True, reduce_fx="sum", sync_dist=True)
        if images.shape[0] == 0:
            return
        logits, features = self.backbone.features(images, self.head.layers)
        predicted = logits.argmax(dim=1)
        labels = self._labels(predicted, batch["labels"])
        terms, masked_logits = self.masking_pass(images, features, labels)
        batch_size = images.shape[0]
        self.log_dict({f"val/{k}": v for k, v in terms.items()}, sync_dist=True, batch_size=batch_size)
        agreement = (masked_logits.argmax(dim=1) == predicted).float().mean()
        self.log("val/masked_agreement", agreement, sync_dist=True, prog_bar=True, batch_size=batch_size)

        # AD / IC: explain the top-1 class with the min-max pre-sigmoid map, keep the top pixels per image
        maps = head_maps(self.head, features, predicted, images.shape[-2:])
        scored = ScoredBatch(self.backbone, images, maps, predicted, batch["indices"], clean_logits=logits)
        self.val_ad_ic.update(scored)

    def on_validation_epoch_end(self) -> None:
        scored = self.trainer.strategy.reduce_boolean_decision(self.val_ad_ic.update_count > 0, all=False)
        if not scored and not self.trainer.sanity_checking:
            raise NothingToLearnError(
                f"validation scored no image: none of the validation images{self._data_source('eval')} could be "
                "used (unreadable, too large or failing the transform; the warnings name them), so no checkpoint "
                "can be chosen"
            )
        if self.val_ad_ic.update_count == 0:
            return
        # already summed over processes: sync_dist only averages equal values
        for key, value in self.val_ad_ic.compute().items():
            self.log(f"val/{key}", value, sync_dist=True)
        self.val_ad_ic.reset()

    @torch.no_grad()
    def explain(self, images: Tensor, targets: Tensor | None = None) -> Tensor:
        """The head's maps of ``targets`` (default: each image's top-1 class), as ``HeadExplainer`` computes
        them: backbone and head in eval mode, their modes restored afterwards."""
        with preserved_state(self.backbone), preserved_state(self.head):
            self.backbone.eval()
            self.head.eval()
            logits, features = self.backbone.features(images, self.head.layers)
            targets = logits.argmax(dim=1) if targets is None else targets.to(images.device)
            return head_maps(self.head, features, targets, images.shape[-2:])

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        return self.explain(batch["images"])

    # ---- optimisation -----------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        config = self.optimizer_config
        weights, biases, gains = [], [], []
        for name, param in self.head.named_parameters():
            if param.requires_grad:
                group = biases if name.endswith("bias") else gains if param.dim() == 0 else weights
                group.append(param)
        groups = [
            ({"params": weights, "weight_decay": config.weight_decay}, config.max_lr),
            ({"params": biases, "weight_decay": 0.0}, config.max_lr * config.bias_lr_factor),
            ({"params": gains, "weight_decay": 0.0}, config.max_lr),
        ]
        groups = [(group, lr) for group, lr in groups if group["params"]]
        optimizer = torch.optim.SGD(
            [group for group, _ in groups],
            lr=config.max_lr,
            momentum=config.momentum,
            nesterov=config.nesterov,
        )
        total_steps = self.trainer.estimated_stepping_batches
        if not 0 < total_steps < float("inf"):
            raise ValueError(
                f"OneCycleLR needs a finite number of steps, got {total_steps}: set trainer.max_epochs or "
                "trainer.max_steps"
            )
        scheduler = OneCycleLR(
            optimizer,
            max_lr=[lr for _, lr in groups],
            total_steps=int(total_steps),
            pct_start=config.pct_start,
            div_factor=config.div_factor,
            final_div_factor=config.final_div_factor,
            cycle_momentum=config.cycle_momentum,
            base_momentum=config.base_momentum,
            max_momentum=config.max_momentum,
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- checkpoints hold the head, never the frozen backbone ---------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # the guarantee: no checkpoint (so no "best", no export) ever holds a non-finite head; callbacks that
        # save at a step's end run before this module's own check in on_train_batch_end
        self._stop_unless_finite(dict(self.head.named_parameters()), "a head parameter")
        checkpoint["state_dict"] = {
            key: value for key, value in checkpoint["state_dict"].items() if not key.startswith("backbone.")
        }
        checkpoint["tame_lit"] = self.compatibility() | {"version": __version__}

    def compatibility(self) -> dict[str, Any]:
        """This run's compatibility record (``tame_lit.checkpoints.compatibility``), stored in checkpoints."""
        return checkpoints.compatibility(self.backbone, self.head, self.hparams["head"])

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoints.check_compatible(checkpoints.saved_record(checkpoint), self.compatibility())
        self._refuse_other_optimizer(checkpoint)
        schedulers = checkpoint.get("lr_schedulers") or [{}]
        self._resumed_schedule_steps = schedulers[0].get("total_steps")  # checked in on_train_start

    def _refuse_other_optimizer(self, checkpoint: Mapping[str, Any]) -> None:
        """Resuming restores the optimiser's and the schedule's state, settings included: a changed
        ``optimizer.*`` would be silently ignored (and recorded as if used), so it is refused, naming the key."""
        saved = dict((checkpoint.get("hyper_parameters") or {}).get("optimizer") or {})
        now = asdict(self.optimizer_config)
        changed = [f"optimizer.{key}: {saved[key]!r} in the checkpoint, {value!r} now"
                   for key, value in now.items() if key in saved and saved[key] != value]  # fmt: skip
        if changed:
            raise IncompatibleCheckpointError(
                f"cannot resume with other optimiser settings ({'; '.join(changed)}): the checkpoint's optimiser "
                "and schedule state would override them. Resume with the checkpoint's values, or start a new run "
                "from its head (evaluate or export it, or train anew)"
            )

    def on_train_start(self) -> None:
        """Before the first step of a resumed run: the restored one-cycle schedule has the checkpoint's length;
        one of another length (``trainer.max_steps``, ``trainer.max_epochs``, ``data.batch_size`` or the
        training images changed) would run past its end or stop short of it, so it is refused."""
        saved, self._resumed_schedule_steps = self._resumed_schedule_steps, None
        now = int(self.trainer.estimated_stepping_batches)
        if saved is not None and int(saved) != now:
            raise IncompatibleCheckpointError(
                f"the checkpoint's one-cycle schedule is {int(saved)} steps long, this run's would be {now} "
                "(trainer.max_steps, trainer.max_epochs, data.batch_size or the training images changed): a "
                "started schedule cannot be stretched or cut. Resume with the checkpoint's values, or start a new run"
            )

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """Load a head-only state dict; the backbone keeps the weights it was built with."""
        full = dict(state_dict)
        for key, value in self.backbone.state_dict(prefix="backbone.").items():
            full.setdefault(key, value)
        return super().load_state_dict(full, strict=strict, assign=assign)
