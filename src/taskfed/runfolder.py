"""A run folder's life: created under a temporary name beside its final place, renamed into place only when
the run is complete, so a failed run leaves nothing half-written behind."""

from __future__ import annotations

import fcntl
import glob
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from taskfed.errors import TaskfedError
from taskfed.tracking import TRACKING_FILES


def plain(obj: Any) -> Any:
    """TOML has no null: drop None values."""
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items() if v is not None}
    return obj


# Parent folders prepare_out created, per temporary folder: `discard` removes them again (when empty), so a
# failed run with `--out new/deep/run` leaves no `new/deep` behind.
_CREATED: dict[Path, list[Path]] = {}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def partial_of(out_dir: Path) -> Path:
    """Where a run's checkpoints live while it runs (checkpoint.py): `RUN_DIR.partial` beside RUN_DIR."""
    out_dir = Path(out_dir)
    return out_dir.with_name(f"{out_dir.name}.partial")


MANIFEST = "manifest.json"  # a run folder's and a checkpoint's: every other file's SHA-256
LOCK = ".lock"  # in RUN_DIR.partial/: held (flock) by the one process writing the run


class OutLock:
    """An advisory lock on a run's partial folder, held from before training until the process ends: a
    second `taskfed run` (or `--resume`) into the same --out is refused at start instead of sharing the
    checkpoints and failing at its end. The lock file holds the owner's pid, for the message."""

    def __init__(self, out_dir: Path):
        self.folder = partial_of(out_dir)
        self.fd: int | None = None

    def acquire(self) -> "OutLock":
        created = [p for p in self.folder.absolute().parents if not p.exists()]  # deepest first
        self.folder.mkdir(parents=True, exist_ok=True)
        _CREATED[self.folder] = created  # removed again with the partial folder if the run fails (discard_orphans)
        fd = os.open(self.folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise TaskfedError(f"{self.folder}: another taskfed process (pid {owner}) is running this run; wait for "
                               f"it to end, or give another --out.") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _busy(out_dir: Path) -> str | None:
    """The pid of another process holding `out_dir`'s lock, or None (the lock is tested, not kept)."""
    path = partial_of(out_dir) / LOCK
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        return os.read(fd, 32).decode(errors="replace").strip() or "?"
    finally:
        os.close(fd)


def holds_run(partial: Path) -> bool:
    """Whether a partial folder holds anything of a run (checkpoints): its lock file alone is not a run."""
    return partial.is_dir() and any(p.name != LOCK for p in partial.iterdir())


def check_out(out_dir: Path, resume: bool | None = None, log=lambda s: None) -> None:
    """Refuse an --out that cannot become a run folder, before anything is loaded or trained: an existing file
    (or /dev/null), a symbolic link (its target would be replaced by a rename), `.` or `..`, a non-empty
    folder, a name too long for its `.partial` sibling, a place where folders cannot be created; with `resume`
    False, one whose interrupted run's checkpoints (RUN_DIR.partial) are there (None: not asked, a library
    caller's driver checks); and one another process is running now.

    With `resume` given, it also heals what a kill in the final write window left behind when no process
    owns the run: a temporary run folder (`.RUN_DIR.tmp-*`) and the checkpoints beside a complete run
    folder (the kill fell between the rename and their removal)."""
    out_dir = Path(out_dir)
    if out_dir.name in ("", ".", "..") or out_dir.absolute() == Path.cwd():
        raise TaskfedError(f"--out {out_dir}: names the current or a parent folder; give the name of a new folder.")
    partial = partial_of(out_dir)
    _check_name(out_dir)
    if resume is not None:
        owner = _busy(out_dir)
        if owner is not None:
            raise TaskfedError(f"{partial}: another taskfed process (pid {owner}) is running this run; wait for it "
                               f"to end, or give another --out.")
        _heal(out_dir, log)
    if (partial.exists() or partial.is_symlink()) and not partial.is_dir():
        raise TaskfedError(f"{partial}: exists and is not a folder (a run keeps its checkpoints there); remove or "
                           f"rename it.")
    if resume is False and holds_run(partial):
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
            _check_writable(out_dir, parent)
            break


def _check_name(out_dir: Path) -> None:
    """The run's siblings (`NAME.partial`, `.NAME.tmp-XXXXXXXX`) must fit the file system's name limit."""
    longest = max(len(f"{out_dir.name}.partial".encode()), len(f".{out_dir.name}.tmp-XXXXXXXX".encode()))
    limit = 255
    for parent in out_dir.absolute().parents:
        if parent.is_dir():
            try:
                limit = os.pathconf(parent, "PC_NAME_MAX")
            except (OSError, ValueError):
                pass
            break
    if longest > limit:
        raise TaskfedError(f"--out {out_dir}: the name is too long ({len(out_dir.name.encode())} bytes; the run's "
                           f"checkpoint and temporary folders beside it add up to 13 more, and names here are "
                           f"limited to {limit}); give a shorter name.")


def _check_writable(out_dir: Path, parent: Path) -> None:
    """Folders can be created in `parent` (the deepest that exists): a probe folder, made and removed again
    (permissions alone do not tell: /proc, a read-only mount, a full quota)."""
    try:
        os.rmdir(tempfile.mkdtemp(dir=parent, prefix=".taskfed-probe-"))
    except OSError as exc:
        raise TaskfedError(f"--out {out_dir}: cannot create folders in {parent} "
                           f"({exc.strerror or type(exc).__name__}).") from None


def _heal(out_dir: Path, log) -> None:
    """What a run killed in its final write window left behind, with no process owning the run now."""
    if out_dir.parent.is_dir():
        for stale in out_dir.parent.glob(f".{glob.escape(out_dir.name)}.tmp-*"):
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
                log(f"removed {stale}: the temporary run folder of a run killed before it was complete")
    partial = partial_of(out_dir)
    if partial.is_dir() and not partial.is_symlink() and (out_dir / "metrics.json").is_file():
        shutil.rmtree(partial, ignore_errors=True)
        log(f"removed {partial}: the checkpoints of {out_dir}, which is complete")


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
    """The complete run folder into its place, its manifest (every file's SHA-256) written last."""
    out_dir = Path(out_dir)
    write_manifest(Path(tmp))
    if out_dir.exists():
        out_dir.rmdir()  # empty, checked in prepare_out
    os.replace(tmp, out_dir)
    _CREATED.pop(Path(tmp), None)


MANIFEST_FORMAT = 1


def write_manifest(folder: Path) -> None:
    """`manifest.json` in a run folder: the SHA-256 of every other file in it (config.toml, metrics.json,
    report.md, scores.csv, router.json/.safetensors, every adapter's files), so `taskfed serve` serves no
    file changed or damaged since the run wrote it (`check_manifest`). The checkpoints' digest and file name."""
    folder = Path(folder)
    # Tracking logs (tracking.py) are left out: TensorBoard and `mlflow ui` may touch them, and nothing serves them.
    skip = {folder / MANIFEST, *(folder / name for name in TRACKING_FILES)}
    files = {p.relative_to(folder).as_posix(): sha256_file(p) for p in sorted(folder.rglob("*"))
             if p.is_file() and not (p in skip or any(parent in skip for parent in p.parents))}
    (folder / MANIFEST).write_text(json.dumps({"format": MANIFEST_FORMAT, "files": files}, indent=1, sort_keys=True))


def check_manifest(folder: Path, log=lambda s: None) -> None:
    """Every file the run folder's manifest lists is there with its SHA-256, else one sentence naming it. A
    folder without one (written by a taskfed before manifests) is served, after a one-line warning."""
    where = Path(folder) / MANIFEST
    if not where.exists():
        log(f"warning: {where} is missing (a run folder written by an older taskfed): its files are served "
            f"without a check for damage")
        return
    try:
        doc = json.loads(where.read_text(encoding="utf-8"))
        files = doc["files"] if doc["format"] == MANIFEST_FORMAT else None
        if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
            raise TypeError("files")
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
        raise TaskfedError(f"{where}: unreadable run folder manifest ({type(exc).__name__}); the run folder "
                           f"cannot be checked for damage.") from None
    for rel, sha in sorted(files.items()):
        path = Path(folder) / rel
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise TaskfedError(f"{where}: lists '{rel}', which is not a file inside the run folder.")
        if not path.is_file():
            raise TaskfedError(f"{path}: listed in {MANIFEST} but missing from the run folder.")
        if sha256_file(path) != sha:
            raise TaskfedError(f"{path}: checksum mismatch with {MANIFEST} (the file was changed or damaged after "
                               f"the run wrote it).")


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
