"""Glue between Hydra configs and the objects they describe (the lightning-hydra-template pattern).

The code is the config schema, and the one place where defaults are written: ``register_schemas`` turns the
signatures of ``backbones.create``, of each head (``from_backbone`` and ``__init__``), of each explainer and of
the data modules into structured configs, stores them with ``TrainConfig`` / ``EvaluateConfig`` (which hold
``MaskingLoss``, ``OptimizerConfig`` and the task keys) in Hydra's ConfigStore as ``schema/<group>/<name>``,
and each YAML file of ``conf/`` names its schema in its defaults list and sets only the values that differ
from the code. ``check_command_line`` composes what a command line asks for before the task runs, so an
unknown key or a wrong type stops the run with the key and the valid keys of its node, before any model is
built. ``python train.py --cfg job`` prints every setting with its value.
"""

from __future__ import annotations

import collections.abc
import contextlib
import copy
import dataclasses
import enum
import inspect
import os
import sys
import types
import typing
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import get_object, instantiate
from lightning.pytorch.loggers import WandbLogger
from omegaconf import MISSING, DictConfig, OmegaConf, read_write

from tame_lit import backbones, explainers, metrics
from tame_lit.acceleration import Acceleration
from tame_lit.evaluation import EvaluationModule
from tame_lit.heads import HEADS
from tame_lit.losses import MaskingLoss
from tame_lit.system import keep_freed_memory
from tame_lit.training import HeadTrainingModule, OptimizerConfig

__all__ = [
    "ConfigError",
    "EvaluateConfig",
    "TrainConfig",
    "check_command_line",
    "check_config",
    "config_dir",
    "finishing",
    "instantiate_group",
    "metric_value",
    "print_config",
    "register_schemas",
    "schema_from_signature",
    "start_process",
    "start_task",
]


def config_dir() -> str:
    """The ``conf/`` directory: inside the installed package, or at the top of a source checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "train.yaml").is_file():
            if candidate == here.parent / "conf":
                os.environ.setdefault("TAME_LIT_ROOT", str(here.parent))
            return str(candidate)
    raise FileNotFoundError(f"tame-lit configs not found in {here / 'conf'} or {here.parent / 'conf'}")


def instantiate_group(group: DictConfig | None) -> list[Any]:
    """Instantiate every entry with a ``_target_`` in a config group such as ``callbacks`` or ``logger``."""
    if not group:
        return []
    return [instantiate(entry) for entry in group.values() if isinstance(entry, DictConfig) and "_target_" in entry]


def metric_value(metrics: dict[str, float], name: str | None) -> float | None:
    """The value a sweep optimises, with an error listing the metrics that exist."""
    if not name:
        return None
    if name not in metrics:
        raise KeyError(f"optimized_metric {name!r} was not logged; logged metrics: {sorted(metrics)}")
    return metrics[name]


def start_process(cfg: DictConfig, keys: Sequence[str]) -> None:
    """What a command does before its task, once per process: glibc keeps freed memory for reuse (about 3x
    faster CPU batches; peak memory is kept), and the settings that decide the run are printed."""
    if cfg.keep_freed_memory:
        keep_freed_memory()
    launch_other_processes_into_this_job()
    print_config(cfg, tuple(keys))


def launch_other_processes_into_this_job() -> None:
    """In a sweep (``-m``, Optuna), make the processes Lightning's DDP launcher starts run *this* job, in its folder.

    Lightning starts each further process with this process's command line plus ``hydra.run.dir=<run.dir>``.
    In a sweep that command line is the whole sweep: each further process would run every job of it (an Optuna
    sampler could even give it other values than this process trains with) and write into a sweep folder of
    its own. Here the command line becomes this job's overrides alone and ``run.dir`` this job's folder, so
    the processes of a job share one folder and its values."""
    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return
    sys.argv = [sys.argv[0], *hydra_cfg.overrides.task]
    with read_write(hydra_cfg.run):
        hydra_cfg.run.dir = hydra_cfg.runtime.output_dir


def start_task(cfg: DictConfig) -> None:
    """What every task does first: refuse keys no code reads (before anything is built), seed every random
    generator (data workers too), and set the float32 matmul precision."""
    check_config(cfg)
    if cfg.seed is not None:
        L.seed_everything(cfg.seed, workers=True)
    if cfg.float32_matmul_precision:
        torch.set_float32_matmul_precision(cfg.float32_matmul_precision)


# what Lightning's DDP launcher sets in the launching process's environment
LAUNCHER_ENVIRONMENT = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


@contextlib.contextmanager
def finishing(loggers: Sequence[Any]) -> Iterator[None]:
    """Run the task, then (also when it fails) close what it opened, so that a sweep's next job starts afresh:
    the W&B run if one of ``loggers`` opened it, and the DDP processes this job launched (their process group,
    and the launcher's variables, which would otherwise make Lightning take the next job's processes as
    already started and wait for them forever)."""
    launcher = {key: os.environ.get(key) for key in LAUNCHER_ENVIRONMENT}
    try:
        yield
    finally:
        if any(isinstance(logger, WandbLogger) for logger in loggers):
            import wandb

            wandb.finish()
        if launcher["LOCAL_RANK"] is None and os.environ.get("LOCAL_RANK") is not None:  # this job launched them
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
            for key, value in launcher.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def print_config(cfg: DictConfig, keys: tuple[str, ...] = ("backbone", "head", "data", "loss", "optimizer",
                                                           "trainer", "ckpt_path")) -> None:  # fmt: skip
    """Print the resolved parts of the config that decide a run, as YAML, with rich."""
    from rich.console import Console
    from rich.syntax import Syntax

    resolved = OmegaConf.to_container(cfg, resolve=True)
    text = OmegaConf.to_yaml({key: resolved[key] for key in keys if key in resolved})
    Console(stderr=True).print(Syntax(text, "yaml", theme="ansi_dark", background_color="default"))


# ---- the schema: structured configs built from the code's signatures -----------------------------------------

SCHEMA_GROUP = "schema"
_PRIMITIVES = (bool, int, float, str)
# schemas whose callable takes **kwargs and passes them on (a timm model's options, GE's base explainer's): a
# key they do not list is not refused here but by the callable that receives it
OPEN_SCHEMAS: set[type] = set()
# tame-lit's classes that conf/ instantiates by _target_: schema/<name> -> the _target_ (its schema's first key)
TARGETS = {
    "data/embedded": "tame_lit.data.EmbeddedDataModule",
    "data/folder": "tame_lit.data.ImageDataModule",
    "callbacks/heatmaps": "tame_lit.callbacks.HeatmapGrid",
    "trainer/default": "lightning.pytorch.Trainer",
}


class ConfigError(ValueError):
    """A config key no code reads, or a value of the wrong type; the message names it and lists the valid keys."""


def _config_type(annotation: Any) -> Any:
    """The OmegaConf type of a Python annotation: primitives, enums and dataclasses as they are,
    ``Sequence[X]``/``tuple`` as ``list[X]``, ``Mapping[str, X]`` as ``dict[str, X]``, ``X | None`` as
    ``Optional``; ``None`` for a class a config cannot hold (dropped from unions), ``Any`` for the rest."""
    if annotation in (inspect.Parameter.empty, Any, object):
        return Any
    if isinstance(annotation, type) and (
        annotation in _PRIMITIVES or issubclass(annotation, enum.Enum) or dataclasses.is_dataclass(annotation)
    ):
        return annotation
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        members = [_config_type(a) for a in args if a is not type(None)]
        if None in members:  # an object is also accepted (e.g. Lightning's ``strategy: str | Strategy``): a
            return Any  # config may build it (``_target_``), so the node is not typed
        if len(members) != 1 or members[0] is Any:
            return Any
        return members[0] | None if type(None) in args else members[0]
    if origin is typing.Literal:
        kinds = {type(a) for a in args}
        return kinds.pop() if len(kinds) == 1 and next(iter(kinds)) in _PRIMITIVES else Any
    if origin in (list, tuple, collections.abc.Sequence, collections.abc.MutableSequence) or annotation in (
        list, tuple, collections.abc.Sequence,
    ):  # fmt: skip
        kinds = {_config_type(a) for a in args if a is not Ellipsis}
        item = kinds.pop() if len(kinds) == 1 else Any
        return list[Any if item is None else item]
    if origin in (dict, collections.abc.Mapping, collections.abc.MutableMapping) or annotation in (
        dict, collections.abc.Mapping,
    ):  # fmt: skip
        value = _config_type(args[1]) if len(args) == 2 else Any
        return dict[str, Any if value is None else value]
    return None if isinstance(annotation, type) else Any


def _type_hints(function: Callable) -> dict[str, Any]:
    """The evaluated annotations of ``function``; one that cannot be evaluated (a name imported only for type
    checking) counts as missing."""
    try:
        return typing.get_type_hints(function)
    except Exception:  # NameError of a TYPE_CHECKING import: evaluate each annotation on its own
        namespace = {**vars(typing), **getattr(inspect.unwrap(function), "__globals__", {})}
        hints = {}
        for name, param in inspect.signature(function).parameters.items():
            annotation = param.annotation
            try:
                hints[name] = eval(annotation, namespace) if isinstance(annotation, str) else annotation
            except Exception:
                hints[name] = inspect.Parameter.empty
        return hints


def _field(name: str, annotation: Any, default: Any) -> tuple[str, Any, dataclasses.Field] | None:
    """A dataclass field for an option; None for one whose default a config cannot hold (an object)."""
    kind = _config_type(annotation)
    kind = Any if kind is None else kind
    if default is inspect.Parameter.empty:
        return name, kind, dataclasses.field(default=MISSING)
    if default is None and kind is not Any and typing.get_origin(kind) not in (typing.Union, types.UnionType):
        kind = kind | None
    if isinstance(default, (tuple, list, dict)):
        value = list(default) if isinstance(default, tuple) else default
        return name, kind, dataclasses.field(default_factory=lambda: copy.deepcopy(value))
    if default is not None and not isinstance(default, (*_PRIMITIVES, enum.Enum)):
        return None
    return name, kind, dataclasses.field(default=default)


def schema_from_signature(
    name: str, *callables: Callable, skip: Sequence[str] = (), fixed: dict[str, Any] | None = None
) -> type:
    """A dataclass (a structured config) whose fields are the keyword options of ``callables``, with their
    annotations (see ``_config_type``) and defaults: the code's signature is the schema, its defaults the
    config's. ``callables`` is a call chain: each gets the ``**kwargs`` of the one before (a head's
    ``from_backbone`` then its ``__init__``); the first to name an option decides it. ``fixed`` fields come
    first (a registry name, a ``_target_``); ``skip`` leaves options out (what the caller passes itself), and an
    option whose default a config cannot hold (an object) is left out too. The schema is open
    (``OPEN_SCHEMAS``: extra keys allowed) when the last callable takes ``**kwargs``."""
    fields = [(key, type(value), dataclasses.field(default=value)) for key, value in (fixed or {}).items()]
    seen = {*(fixed or {}), *skip}
    takes_more = False
    for function in callables:
        hints = _type_hints(function.__init__ if isinstance(function, type) else function)
        takes_more = False
        for param in inspect.signature(function).parameters.values():
            if param.kind is param.VAR_KEYWORD:
                takes_more = True
            elif param.kind is not param.VAR_POSITIONAL and param.name not in seen:
                option = _field(param.name, hints.get(param.name, param.annotation), param.default)
                if option is not None:
                    fields.append(option)
                seen.add(param.name)
    schema = dataclasses.make_dataclass(name, fields)
    schema.__module__ = __name__  # and a module attribute (register_schemas), so that configs can be pickled
    if takes_more:
        OPEN_SCHEMAS.add(schema)
    return schema


def _init_chain(cls: type) -> list[type]:
    """``cls`` and the base classes its ``__init__`` passes ``**kwargs`` on to (as the data modules do)."""
    chain = [cls]
    for base in cls.__mro__[1:]:
        if not any(p.kind is p.VAR_KEYWORD for p in inspect.signature(chain[-1]).parameters.values()):
            break
        if "__init__" in vars(base):
            chain.append(base)
    return chain


_MODULE_OPTIONS = inspect.signature(HeadTrainingModule).parameters


_ACCELERATION = Acceleration()


@dataclasses.dataclass
class TaskConfig:
    """The top-level keys ``train.py`` and ``evaluate.py`` share. The config groups' nodes (``backbone``,
    ``data``, ...) have schemas of their own, named in their YAML files."""

    task_name: str = MISSING
    tags: list[str] = dataclasses.field(default_factory=lambda: ["dev"])
    seed: int | None = 42
    float32_matmul_precision: str | None = "high"  # torch.set_float32_matmul_precision; null leaves it
    keep_freed_memory: bool = True  # glibc keeps freed memory for reuse: ~3x faster CPU batches, peak memory kept
    # torch.compile of the backbone and the head(s), channels-last layout (tame_lit.acceleration.Acceleration)
    compile: bool = _ACCELERATION.compile
    compile_options: dict[str, Any] = dataclasses.field(default_factory=dict)  # torch.compile's keywords
    channels_last: bool = _ACCELERATION.channels_last
    backbone: Any = MISSING
    data: Any = MISSING
    trainer: Any = MISSING
    logger: Any = None
    paths: Any = MISSING


@dataclasses.dataclass
class TrainConfig(TaskConfig):
    """``python train.py``: the training module's options (``labels``, ``val_keep``, and the dataclasses
    ``loss`` and ``optimizer``) with the defaults of their code, and the task's own keys."""

    task_name: str = "train"
    ckpt_path: str | None = None  # resume: a checkpoint of this run's config (e.g. .../checkpoints/last.ckpt)
    # resume from this run directory's checkpoints/last.ckpt when there is one (rerun a pre-empted job as it was)
    auto_resume: bool = False
    checkpoint_every_n_steps: int = 500  # also write last.ckpt every N optimiser steps, mid-epoch (0: epoch ends only)
    export: bool = True  # after training: export the best checkpoint's head to <run>/export (verified)
    validate_first: bool = False  # validate the untrained head before training: a baseline at step 0
    optimized_metric: str | None = "val/AD@15"  # what `python train.py -m hparams_search=optuna` minimises
    # model: the backbone's own top-1 (TAME); ground_truth: the dataset's labels
    labels: str = _MODULE_OPTIONS["labels"].default
    # AD/IC of the validation at these fractions of pixels kept
    val_keep: list[float] = dataclasses.field(default_factory=lambda: list(_MODULE_OPTIONS["val_keep"].default))
    # under DDP: the head's batch norms and the batch's label set over all processes (= one process, batch B)
    sync_statistics: bool = _MODULE_OPTIONS["sync_statistics"].default
    # a folder for each training image's clean pass (features, top-1), read by later epochs (data.augment=false)
    clean_pass_cache: str | None = _MODULE_OPTIONS["clean_pass_cache"].default
    # the masked passes run a copy of the backbone with its batch norms folded into its convolutions (same logits)
    fold_batch_norm: bool = _ACCELERATION.fold_batch_norm
    loss: MaskingLoss = dataclasses.field(default_factory=MaskingLoss)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    head: Any = MISSING
    callbacks: Any = None
    module: Any = MISSING


def _metric_schema(cls: type) -> type:
    """A metric's options; the evaluation gives it the run's seed, and torchmetrics' own ``**kwargs`` are not
    for configs (the schema is closed)."""
    schema = schema_from_signature(f"{cls.__name__}Config", cls, skip=("seed",))
    OPEN_SCHEMAS.discard(schema)
    return schema


METRIC_SCHEMAS = {name: _metric_schema(cls) for name, cls in metrics.METRICS.items()}


@dataclasses.dataclass
class TrainedHeadConfig:
    checkpoint: str | None = None  # a tame-lit checkpoint (or export folder) of a head trained on this backbone
    # how its class maps become explanations (logits | mask, see tame_lit.heads.base.target_maps); null: as trained
    explanation: str | None = None
    # Gaussian blur of its explanations, in cells of the head's map (see target_maps); null: as trained
    smoothing: float | None = None
    # an explainer.pt2 program can run code when loaded: give its SHA-256 from a source you trust, or trust it
    sha256: str | None = None
    trusted: bool = False


@dataclasses.dataclass
class EvaluateConfig(TaskConfig):
    """``python evaluate.py``: which explainers to score and how. ``explainer.<name>``: the registered methods'
    options (conf/explainer/); ``heads.<name>.checkpoint``: trained heads, under any name."""

    task_name: str = "evaluate"
    explainers: list[str] = dataclasses.field(
        default_factory=lambda: ["gradcam", "gradcampp", "layercam", "ablationcam", "random"]
    )
    heads: dict[str, Any] = dataclasses.field(  # TrainedHeadConfig each: OmegaConf cannot add to dict[str, it]
        default_factory=lambda: {name: TrainedHeadConfig() for name in HEADS}
    )
    explainer: dict[str, Any] = dataclasses.field(default_factory=dict)
    # every registered metric with its class's options (schema/metric/<name>); `metrics.<name>=false` leaves one
    # out, `+metrics.<name>={...}` adds one registered later; the run's `seed` seeds the metrics' noise
    metrics: dict[str, Any] = dataclasses.field(
        default_factory=lambda: {
            name: schema() if metrics.METRICS[name].default_enabled else False
            for name, schema in METRIC_SCHEMAS.items()
        }
    )
    grid_images: int = inspect.signature(EvaluationModule).parameters["grid_images"].default
    # statistics (tame_lit.statistics): every explainer against `compare_to` (null: none), image by image
    compare_to: str | None = inspect.signature(EvaluationModule).parameters["compare_to"].default
    confidence: float = inspect.signature(EvaluationModule).parameters["confidence"].default
    resamples: int = inspect.signature(EvaluationModule).parameters["resamples"].default
    # `subset_per_class=N`: the explainers in `subset_explainers` (by default the methods that cost hundreds of
    # forward passes per image) score only the first N evaluated images of each class, a class-balanced subset,
    # and are compared with the reference on the images both scored; null: every explainer scores every image
    subset_per_class: int | None = None
    subset_explainers: list[str] = dataclasses.field(
        default_factory=lambda: ["ablationcam", "rise", "scorecam", "sise"]
    )


def register_schemas() -> dict[str, type]:
    """Store every schema in Hydra's ConfigStore as ``schema/<name>``; returns them by name. Called on import."""
    schemas: dict[str, type] = {"train": TrainConfig, "evaluate": EvaluateConfig}
    schemas["backbone"] = schema_from_signature("BackboneConfig", backbones.create)
    for name, cls in HEADS.items():
        schemas[f"head/{name}"] = schema_from_signature(
            f"{cls.__name__}Config", cls.from_backbone, cls, skip=("backbone", "layer_shapes", "num_classes"),
            fixed={"name": name},
        )  # fmt: skip
    for name in explainers.EXPLAINERS:
        cls = explainers.explainer_class(name)
        schemas[f"explainer/{name}"] = schema_from_signature(
            f"{cls.__name__}Config", cls, skip=("backbone",), fixed={"name": name}
        )
    schemas.update({f"metric/{name}": schema for name, schema in METRIC_SCHEMAS.items()})
    for name, target in TARGETS.items():
        chain = _init_chain(get_object(target))
        schemas[name] = schema_from_signature(f"{chain[0].__name__}Config", *chain, fixed={"_target_": target})
    store = ConfigStore.instance()
    for name, schema in schemas.items():
        globals().setdefault(schema.__name__, schema)
        group, _, option = f"{SCHEMA_GROUP}/{name}".rpartition("/")
        store.store(group=group, name=option, node=schema)
    return schemas


SCHEMAS = register_schemas()


# ---- unknown keys and wrong types, before anything is built ---------------------------------------------------


def _describe_type(kind: Any) -> str:
    if kind is Any:
        return "any"
    return kind.__name__ if isinstance(kind, type) and not typing.get_args(kind) else str(kind).replace("typing.", "")


def _valid_keys(schema: type | None, target: Callable | None, node: DictConfig) -> str:
    """The keys a node takes: its schema's as ``key: type``, its ``_target_``'s parameters, or its own keys."""
    if schema is not None:
        kinds = typing.get_type_hints(schema)
        return f"({schema.__name__}): " + ", ".join(
            f"{f.name}: {_describe_type(kinds[f.name])}" for f in dataclasses.fields(schema)
        )
    if target is not None:
        return f"({node._target_}): " + ", ".join(inspect.signature(target).parameters)
    return ": " + ", ".join(map(str, node.keys()))


def _unknown(full_key: str, where: str, valid: str) -> ConfigError:
    where = f"'{where}'" if where else "the top level"
    return ConfigError(f"unknown key '{full_key}'\nvalid keys of {where} {valid}\n(--cfg job prints every setting)")


def _target(node: DictConfig) -> Callable | None:
    """The callable a plain ``_target_`` node instantiates, or None when it takes any keyword."""
    if OmegaConf.is_interpolation(node, "_target_") or not isinstance(node.get("_target_"), str):
        return None
    try:
        target = get_object(node._target_)
    except Exception as error:
        raise ConfigError(f"_target_ {node._target_!r} cannot be imported: {error}") from error
    parameters = inspect.signature(target).parameters.values()
    return None if any(p.kind is p.VAR_KEYWORD for p in parameters) else target


def check_config(cfg: DictConfig) -> None:
    """Raise ``ConfigError`` for a key no code reads: one added (``+key=...``) to a node whose schema lacks it,
    or one its ``_target_`` does not take, or an option of an explainer entry its method does not take. Values
    are not resolved; wrong types of schema keys are refused by Hydra while composing."""
    _check_node(cfg, "")


def _entry_schema(path: str, node: DictConfig) -> type | None:
    """The schema of an entry added on the command line to evaluate's named entries:
    ``+explainer.<x>={name: <method>, ...}`` (the method's) and ``+heads.<x>.checkpoint=PATH``."""
    group, _, entry = path.partition(".")
    if not entry or "." in entry:
        return None
    if group == "explainer":
        return SCHEMAS.get(f"explainer/{node.get('name')}")
    return TrainedHeadConfig if group == "heads" else None


def _check_node(node: DictConfig, path: str) -> None:
    schema, target, allowed = OmegaConf.get_type(node), None, None
    if not dataclasses.is_dataclass(schema):
        schema = None
        if "_target_" in node:
            target = _target(node)
        else:
            schema = _entry_schema(path, node)
    if schema is not None and schema not in OPEN_SCHEMAS:
        allowed = {f.name for f in dataclasses.fields(schema)}
    elif target is not None:
        allowed = set(inspect.signature(target).parameters)
    for key in node:
        full_key = f"{path}.{key}" if path else str(key)
        if allowed is not None and not str(key).startswith("_") and key not in allowed:
            raise _unknown(full_key, path, _valid_keys(schema, target, node))
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not (child._is_none() or child._is_missing() or child._is_interpolation()):
            _check_node(child, full_key)


def _sweep_values(override: Any) -> list[str]:
    """The values of a sweep override as strings: each of a choice or range, an interval's start, none of a glob."""
    from hydra.core.override_parser.types import IntervalSweep
    from hydra.errors import HydraException

    value = override.value()
    if isinstance(value, IntervalSweep):
        return [str(value.start)]
    try:
        return list(override.sweep_string_iterator())
    except HydraException:
        return []


def _override_variants(overrides: Sequence[str], limit: int = 16) -> Iterator[list[str]]:
    """Lists of plain overrides that together try every value of every sweep once: each sweep at its first
    value, then one sweep at a time at its other values (at most ``limit`` lists)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    options = []
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        if override.is_sweep_override():
            options.append([f"{override.get_key_element()}={value}" for value in _sweep_values(override)])
        else:
            options.append([override.input_line])
    first = [values[0] for values in options if values]
    yield first
    count = 1
    for index, values in enumerate(options):
        for value in values[1:]:
            if count == limit:
                return
            position = sum(1 for earlier in options[:index] if earlier)
            yield [*first[:position], value, *first[position + 1 :]]
            count += 1


def _explain(error: Exception) -> str:
    """A composition error as the key at fault and the valid keys of its node."""
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

    if isinstance(error, ConfigError):
        return str(error)
    cause: BaseException | None = error
    while cause is not None and not isinstance(cause, OmegaConfBaseException):
        cause = cause.__cause__ or cause.__context__
    parent, full_key = getattr(cause, "parent_node", None), getattr(cause, "full_key", None)
    if not isinstance(parent, DictConfig) or not full_key:
        return str(error)
    heading = str(error).strip().splitlines()[0].rstrip(".")
    schema = OmegaConf.get_type(parent)
    valid = _valid_keys(schema if dataclasses.is_dataclass(schema) else None, None, parent)
    where = full_key.rpartition(".")[0]
    if isinstance(cause, ValidationError):
        reason = str(cause).strip().splitlines()[0]
        return (f"{heading}: wrong type for '{full_key}': {reason}\nvalid keys of "
                f"{repr(where) if where else 'the top level'} {valid}")  # fmt: skip
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)):
        return f"{heading}: {_unknown(full_key, where, valid)}{_opt_in_hint(where)}"
    return str(error)


def _opt_in_hint(where: str) -> str:
    """For an option of a metric that is off by default (its node is ``false``): how to turn it on with options."""
    group, _, name = where.partition(".")
    if group != "metrics" or name not in METRIC_SCHEMAS or metrics.METRICS[name].default_enabled:
        return ""
    options = ", ".join(f.name for f in dataclasses.fields(METRIC_SCHEMAS[name]))
    return (
        f"\n'{where}' is off by default (expensive): turn it on with options as '{where}={{option: value, ...}}' "
        f"(options: {options}), or '{where}=true' for its defaults"
    )


def check_command_line(config_name: str, argv: Sequence[str] | None = None) -> None:
    """Before Hydra runs the task: compose the config this command line asks for, check it (``check_config``)
    and exit with a message that names the key at fault and lists the valid keys of its node (Hydra's own names
    the key only), before any model is built. A sweep (``a=1,2``, ``range``, an Optuna ``interval``) is checked
    at each of its values. Command lines this cannot follow (``--help``, another config directory, an override
    Hydra cannot parse) are left to Hydra."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.utils import get_args_parser
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    args = get_args_parser().parse_known_args(list(sys.argv[1:] if argv is None else argv))[0]
    flags = ("help", "hydra_help", "info", "shell_completion", "config_path", "config_dir", "experimental_rerun")
    if any(getattr(args, flag, None) for flag in flags):
        return
    try:
        variants = list(_override_variants(args.overrides))
    except HydraException:
        return
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            for overrides in variants:
                check_config(compose(args.config_name or config_name, overrides=overrides))
    except (ConfigError, HydraException, OmegaConfBaseException) as error:
        sys.stderr.write(f"Error in the config: {_explain(error)}\n")
        sys.exit(1)
