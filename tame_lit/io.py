"""Writing outputs atomically: a crash never leaves a half-written file in place of a good one."""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

__all__ = ["atomic_path", "create_beside", "output_folder_problem", "strict_json", "write_json"]


def create_beside(target: Path, directory: bool = False) -> Path:
    """Create a new, uniquely named hidden file (or folder) beside ``target``, with the permissions a plain
    ``open`` (``mkdir``) gives under the umask: ``tempfile``'s are private to their owner, which outputs that
    replace ``target`` must not be."""
    for _ in range(100):
        candidate = target.with_name(f".{target.name}.{secrets.token_hex(6)}{'' if directory else target.suffix}")
        try:
            if directory:
                candidate.mkdir(mode=0o777)
            else:
                os.close(os.open(candidate, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return candidate
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {target}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it replaces ``path`` only if the block succeeds."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = create_beside(target)
    try:
        yield Path(temporary)
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def strict_json(data: Any) -> Any:
    """``data`` with every NaN and infinity replaced by ``None``: strict JSON (``null``) that any parser reads,
    where Python's default would write bare ``NaN``."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, Mapping):
        return {key: strict_json(value) for key, value in data.items()}
    if isinstance(data, list | tuple):
        return [strict_json(value) for value in data]
    return data


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as strict JSON (undefined numbers as ``null``), atomically."""
    text = json.dumps(strict_json(data), indent=2, sort_keys=True, allow_nan=False)
    with atomic_path(path) as temporary:
        temporary.write_text(text + "\n")


def output_folder_problem(out: str | os.PathLike) -> str | None:
    """Why the folder ``out`` cannot take a command's outputs (a file, under a file, not writable), or None: the
    command-line tools check it before any model is built or image read, so that a run never fails at its end
    for want of a place to write."""
    out = Path(out)
    existing = next((path for path in (out, *out.parents) if path.exists()), None)
    if existing is None:
        return None
    if not existing.is_dir():
        return "is a file" if existing == out else f"is under {existing}, which is a file"
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "the folder" if existing == out else f"its nearest existing folder {existing}"
        return f"{what} is not writable"
    return None
