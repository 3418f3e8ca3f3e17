"""A client's store (`Client.store`: FedDPA's local adapter, FedRouter's local labels and centroids, FL-TAC's
task adapters and index) on the node's disk, between the short-lived ClientApp processes of one run.

Formats that hold data only: adapters as safetensors, arrays in one .npz read with allow_pickle=False, lists
of strings in JSON; an index (store.json) names each entry's kind and file. Written to a temporary folder
and renamed into place, so a crash mid-write leaves the previous store whole. The server never sees it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from taskfed.errors import TaskfedError
from taskfed.state import save_safetensors

INDEX = "store.json"


def _is_adapter(value: Any) -> bool:
    return isinstance(value, dict) and value and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())


def save_store(store: dict[str, Any], folder: Path) -> None:
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
    try:
        index, arrays = {}, {}
        for i, (key, value) in enumerate(sorted(store.items())):
            if _is_adapter(value):
                name = f"adapter-{i}.safetensors"
                save_safetensors({k: v.detach().cpu().contiguous() for k, v in value.items()}, tmp / name)
                index[key] = {"kind": "adapter", "file": name}
            elif isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
                arrays[f"a{i}"] = value
                index[key] = {"kind": "array", "name": f"a{i}"}
            elif isinstance(value, (list, tuple)) and all(isinstance(x, str) for x in value):
                index[key] = {"kind": "strings", "value": list(value)}
            else:
                raise TaskfedError(f"client store entry '{key}' of type {type(value).__name__} cannot be kept on disk.")
        np.savez(tmp / "arrays.npz", **arrays)
        (tmp / INDEX).write_text(json.dumps(index, indent=1, sort_keys=True))
        old = folder.with_name(f".{folder.name}-old")
        if folder.exists():
            os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_store(folder: Path) -> dict[str, Any]:
    """The store as saved; empty when the node has not saved one yet (first round)."""
    folder = Path(folder)
    if not (folder / INDEX).exists():
        return {}
    try:
        index = json.loads((folder / INDEX).read_text(encoding="utf-8"))
        if not isinstance(index, dict):
            raise ValueError(f"the index is a JSON {type(index).__name__}, not an object")
        with np.load(folder / "arrays.npz", allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
        out: dict[str, Any] = {}
        for key, entry in index.items():
            if not isinstance(entry, dict) or not isinstance(entry.get("kind"), str):
                raise ValueError(f"entry '{key}' is not an object with a kind")
            if entry["kind"] == "adapter":
                out[key] = load_file(str(_inside(folder, entry.get("file"), key)))
            elif entry["kind"] == "array":
                out[key] = arrays[entry["name"]]
            elif entry["kind"] == "strings" and isinstance(entry.get("value"), list) \
                    and all(isinstance(x, str) for x in entry["value"]):
                out[key] = list(entry["value"])
            else:
                raise ValueError(f"entry '{key}' of kind {entry['kind']!r} is malformed")
        return out
    except (OSError, ValueError, KeyError, TypeError, RecursionError, SafetensorError) as exc:
        raise TaskfedError(f"{folder}: corrupt client store ({(str(exc).splitlines() or [type(exc).__name__])[0]}).") from None


def _inside(folder: Path, name: Any, key: str) -> Path:
    """An entry's file: a plain file name inside the store folder (the index never points elsewhere)."""
    if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
        raise ValueError(f"entry '{key}' names the file {name!r}, not a file inside the store")
    path = folder / name
    if path.is_symlink() or not path.resolve().is_relative_to(folder.resolve()):
        raise ValueError(f"entry '{key}' names a file outside the store")
    return path
