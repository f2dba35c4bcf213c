"""Loggers that never block: W&B goes offline unless the user is logged in."""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lightning.pytorch.loggers import WandbLogger

__all__ = ["wandb_logged_in", "wandb_logger"]


def wandb_logged_in() -> bool:
    """True when W&B credentials exist (``WANDB_API_KEY``, an identity token, or ``wandb login``'s netrc
    entry for the W&B host); read from the environment and disk only, never over the network."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc")).expanduser()
    try:
        entry = netrc.netrc(path).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])


def wandb_logger(offline: bool | None = None, **kwargs: Any) -> WandbLogger:
    """A ``WandbLogger`` that cannot stop on a login prompt.

    ``offline=None`` (default): honour ``WANDB_MODE`` if set, else online only when logged in. Offline runs
    land in ``<save_dir>/wandb/offline-run-*``; upload them later with ``wandb sync``.
    """
    mode = os.environ.get("WANDB_MODE", "").lower()
    if offline is None:
        offline = mode in ("offline", "dryrun") or (mode not in ("online", "disabled") and not wandb_logged_in())
    elif not offline and not wandb_logged_in():
        raise RuntimeError(
            "logger.wandb.offline=false needs a W&B login (wandb login, or WANDB_API_KEY); "
            "leave offline unset to log offline instead"
        )
    if offline and kwargs.get("log_model"):
        kwargs["log_model"] = False  # W&B cannot upload model artifacts offline
    os.environ.setdefault("WANDB_SILENT", "true")
    return WandbLogger(offline=offline, **kwargs)
