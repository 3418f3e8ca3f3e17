"""Checkpoints of a run in progress, in `RUN_DIR.partial/` beside where RUN_DIR will be.

    RUN_DIR.partial/
      ckpt-00003/            one self-describing checkpoint: step 3 (setup is 0, round r is r + 1, then one
        manifest.json        step per evaluation mode); format version, config digest and resolved config,
        driver.json/.safetensors   the step's label, and the SHA-256 of every other file
        server.json/.safetensors   the method's server state (Method.state_dict)
        client.<cid>.json/.safetensors  each client's store, where the engine keeps them (in-process)
      .ckpt-00004.tmp-PID/   the one being written
      .lock                  held by the process running the run (runfolder.OutLock)

A checkpoint is written into a temporary folder, every file fsynced, then renamed into place (and the parent
fsynced): a crash at any point leaves the last good checkpoint whole. The newest two are kept, so a
checkpoint damaged at rest (a flipped byte, a truncated file) falls back to the one before it. Formats
hold data only (state.py: JSON + safetensors, no pickle).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from taskfed import faults
from taskfed.errors import TaskfedError
from taskfed.runfolder import MANIFEST, holds_run, partial_of, sha256_file
from taskfed.state import load_tree, save_tree

FORMAT = 3  # 2: the driver keeps the per-row scores of the modes evaluated; 3: each client's data digest and
# base model fingerprint (a resume on edited data or another model is refused)
KEEP = 2


class ConfigMismatch(TaskfedError):
    """A checkpoint of the same run folder started with another config: never a fall-back, it stops."""


partial_dir = partial_of


def digest(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def config_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two config dicts."""
    out = []
    for key in sorted(set(a) | set(b), key=str):
        x, y = a.get(key), b.get(key)
        name = f"{prefix}{key}"
        if isinstance(x, dict) and isinstance(y, dict):
            out += config_diff(x, y, f"{name}.")
        elif x != y:
            out.append(name)
    return out


@dataclass
class Checkpoint:
    folder: Path
    step: int
    label: str
    config: dict

    def part(self, name: str) -> Any:
        try:
            return load_tree(self.folder, name)
        except Exception as exc:  # checked by checksum first: only a bug or a race gets here
            raise TaskfedError(f"{self.folder}: cannot read {name} ({exc}).") from None


class Checkpoints:
    """The checkpoints of one run (`RUN_DIR.partial/`)."""

    def __init__(self, out_dir: Path, config: dict):
        self.folder = partial_dir(out_dir)
        self.config = config
        self.digest = digest(config)

    def exists(self) -> bool:
        """Whether an interrupted run is here (the run's lock file alone is not one)."""
        return holds_run(self.folder)

    def steps(self) -> list[Path]:
        if not self.folder.is_dir():
            return []
        return sorted(p for p in self.folder.iterdir() if p.name.startswith("ckpt-") and p.is_dir())

    # ----------------------------------------------------------------- writing
    def write(self, step: int, label: str, parts: dict[str, Any]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        final = self.folder / f"ckpt-{step:05d}"
        tmp = self.folder / f".ckpt-{step:05d}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir()
            files = []
            for name, value in parts.items():
                files += save_tree(value, tmp, name)
                faults.hit("checkpoint.files")
            body = {"format": FORMAT, "step": step, "label": label, "config_digest": self.digest,
                    "config": self.config, "files": {p.name: sha256_file(p) for p in files}}
            text = json.dumps({"body": body, "sha256": hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()},
                              indent=1, sort_keys=True)
            (tmp / MANIFEST).write_text(text)
            for p in [*files, tmp / MANIFEST, tmp]:
                _fsync(p)
            faults.hit("checkpoint.before_rename")
            if final.exists():  # a step rewritten after a fall-back: the damaged one goes
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync(self.folder)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            last = self.steps()
            kept = f"the last good checkpoint ({last[-1].name}) is intact" if last else "no checkpoint was kept yet"
            what = f"{Path(exc.filename).name}: " if exc.filename else ""
            raise TaskfedError(f"{self.folder}: writing the checkpoint of {label} failed ({what}{exc.strerror or exc}); "
                               f"{kept}: fix that and rerun with --resume.") from None
        except BaseException:  # Ctrl-C / SIGTERM mid-write: the half-written one goes, the last good stays
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        faults.hit("checkpoint.after_rename")
        for old in self.steps()[:-KEEP]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.folder.glob(".ckpt-*.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    # ----------------------------------------------------------------- reading
    def verify(self, folder: Path) -> Checkpoint:
        """The checkpoint in `folder`, or one TaskfedError saying what is wrong with it."""
        where = folder / MANIFEST
        try:
            doc = json.loads(where.read_text(encoding="utf-8"))
            body = doc["body"]
            ok = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest() == doc["sha256"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise TaskfedError(f"{where}: unreadable checkpoint manifest ({type(exc).__name__}).") from None
        if not ok:
            raise TaskfedError(f"{where}: checksum mismatch (the manifest was changed or damaged).")
        if body.get("format") != FORMAT:
            raise TaskfedError(f"{where}: checkpoint format {body.get('format')!r}, this taskfed reads format "
                               f"{FORMAT}: resume it with the taskfed version that wrote it, or start over.")
        if body["config_digest"] != self.digest:
            keys = config_diff(body["config"], self.config)
            raise ConfigMismatch(f"{self.folder}: was started with another config (differs in "
                               f"{', '.join(keys) or 'its digest'}); resume with the config it was started with.")
        for name, sha in body["files"].items():
            path = folder / name
            if not path.is_file():
                raise TaskfedError(f"{path}: missing from the checkpoint.")
            if sha256_file(path) != sha:
                raise TaskfedError(f"{path}: checksum mismatch (the file is truncated or damaged).")
        return Checkpoint(folder, int(body["step"]), str(body["label"]), body["config"])

    def latest(self, log=lambda s: None) -> Checkpoint | None:
        """The newest checkpoint that verifies; a damaged newest one falls back to the one before it (and
        says so). A config mismatch is never a fall-back: it stops."""
        found = self.steps()
        if not found:
            return None
        errors = []
        for folder in reversed(found):
            try:
                ckpt = self.verify(folder)
            except ConfigMismatch:
                raise
            except TaskfedError as exc:
                errors.append(str(exc))
                continue
            for why in errors:
                log(f"checkpoint skipped: {why} Resuming from {ckpt.folder.name} ({ckpt.label}) instead.")
            return ckpt
        raise TaskfedError(f"{errors[0]} No earlier good checkpoint in {self.folder}: remove it to start over.")
