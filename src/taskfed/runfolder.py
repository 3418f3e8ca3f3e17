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


# Parent folders prepare_out created, per temporary folder: `discard` removes them again (when empty), so a
# failed run with `--out new/deep/run` leaves no `new/deep` behind.
_CREATED: dict[Path, list[Path]] = {}


def check_out(out_dir: Path, resume: bool | None = None) -> None:
    """Refuse an --out that cannot become a run folder, before anything is trained: an existing file (or
    /dev/null), a symbolic link (its target would be replaced by a rename), `.` or `..`, a non-empty folder,
    or a parent that is not a folder; and, with `resume` False, one whose interrupted run's checkpoints
    (RUN_DIR.partial) are there (None: not asked, a library caller's driver checks)."""
    out_dir = Path(out_dir)
    if out_dir.name in ("", ".", "..") or out_dir.absolute() == Path.cwd():
        raise TaskfedError(f"--out {out_dir}: names the current or a parent folder; give the name of a new folder.")
    partial = out_dir.with_name(f"{out_dir.name}.partial")
    if resume is False and partial.exists():
        raise TaskfedError(f"{partial}: holds an interrupted run; continue it with --resume, or remove the "
                           f"folder to start over.")
    if out_dir.is_symlink():
        raise TaskfedError(f"--out {out_dir}: is a symbolic link; give a real folder (the link's target would be "
                           f"replaced).")
    if out_dir.exists():
        if not out_dir.is_dir():
            raise TaskfedError(f"--out {out_dir}: exists and is not a folder.")
        if any(out_dir.iterdir()):
            done = " (a complete run: nothing to resume)" if resume and (out_dir / "metrics.json").exists() else ""
            raise TaskfedError(f"{out_dir}: run folder already exists and is not empty{done}.")
    for parent in out_dir.absolute().parents:
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                raise TaskfedError(f"--out {out_dir}: {parent} is not a folder.")
            if not os.access(parent, os.W_OK | os.X_OK) and parent == out_dir.absolute().parent:
                raise TaskfedError(f"--out {out_dir}: cannot write into {parent}.")
            break


def prepare_out(out_dir: Path) -> Path:
    """A fresh temporary folder beside `out_dir` (refused as in `check_out`); parents created are recorded."""
    out_dir = Path(out_dir)
    check_out(out_dir)
    created = [p for p in out_dir.absolute().parents if not p.exists()]  # deepest first
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    except OSError as exc:
        _remove_empty(created)
        raise TaskfedError(f"--out {out_dir}: cannot create the run folder ({exc.strerror or exc}).") from None
    _CREATED[tmp] = created
    return tmp


def finish_out(tmp: Path, out_dir: Path) -> None:
    """The complete run folder into its place."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        out_dir.rmdir()  # empty, checked in prepare_out
    os.replace(tmp, out_dir)
    _CREATED.pop(Path(tmp), None)


def discard(tmp: Path | None) -> None:
    """A failed run's temporary folder, removed, and the parent folders prepare_out created for it."""
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(_CREATED.pop(Path(tmp), []))


def discard_orphans() -> None:
    """Parent folders recorded for temporary folders that are gone (a driver removed its run folder itself)."""
    for tmp in [t for t in _CREATED if not t.exists()]:
        _remove_empty(_CREATED.pop(tmp))


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:  # deepest first; one that holds anything now (someone else's) stays
        try:
            folder.rmdir()
        except OSError:
            return
