"""A run folder's life: created under a temporary name beside its final place, renamed into place only when
the run is complete, so a failed run leaves nothing half-written behind."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from taskfed.errors import TaskfedError


def plain(obj: Any) -> Any:
    """TOML has no null: drop None values."""
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items() if v is not None}
    return obj


def prepare_out(out_dir: Path) -> Path:
    """A fresh temporary folder beside `out_dir` (refused when `out_dir` holds anything)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise TaskfedError(f"{out_dir}: run folder already exists and is not empty.")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))


def finish_out(tmp: Path, out_dir: Path) -> None:
    """The complete run folder into its place."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        out_dir.rmdir()  # empty, checked in prepare_out
    os.replace(tmp, out_dir)


def discard(tmp: Path | None) -> None:
    """A failed run's temporary folder, removed."""
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)
