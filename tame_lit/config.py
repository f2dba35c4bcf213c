"""Glue between Hydra configs and the objects they describe (the lightning-hydra-template pattern)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

__all__ = ["config_dir", "instantiate_group", "metric_value", "print_config"]


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


def print_config(cfg: DictConfig, keys: tuple[str, ...] = ("backbone", "head", "data", "loss", "optimizer",
                                                           "trainer", "ckpt_path")) -> None:  # fmt: skip
    """Print the resolved parts of the config that decide a run, as YAML, with rich."""
    from rich.console import Console
    from rich.syntax import Syntax

    resolved = OmegaConf.to_container(cfg, resolve=True)
    text = OmegaConf.to_yaml({key: resolved[key] for key in keys if key in resolved})
    Console(stderr=True).print(Syntax(text, "yaml", theme="ansi_dark", background_color="default"))
