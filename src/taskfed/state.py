"""State at rest: a tree of plain Python values, tensors and arrays as one JSON file plus one safetensors file.

One mechanism for everything a checkpoint keeps (checkpoint.py): a method's whole server side (adapters,
centroids, cluster assignments, groups: `Method.state_dict`), a client's store, the driver's bookkeeping.
No pickle: the JSON holds the structure with typed nodes, the safetensors file the tensors (numpy arrays go
through torch and come back as numpy with their dtype). Dict keys keep their type (a client id, a cluster
index, a (client, task) pair), so nothing is written as a string and parsed back. A tensor shared by two
places in the tree is stored once and comes back shared.

    tree, tensors = pack(value)        value = unpack(tree, tensors)
    save_tree(value, folder, stem)     value = load_tree(folder, stem)
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from taskfed.errors import TaskfedError

_SCALARS = (bool, int, str, type(None))
_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path) -> None:
    """safetensors' save_file, with the operating system's errors as what they are: safetensors raises its
    own SafetensorError for a full disk ("... (os error 28)"), which `except OSError` around every write
    (checkpoints, the run folder) would miss and the user would see as an internal error."""
    try:
        save_file(tensors, str(path))
    except SafetensorError as exc:
        found = _OS_ERROR.search(str(exc))
        if found is None:
            raise
        code = int(found.group(1))
        raise OSError(code, os.strerror(code), str(path)) from None


def pack(value: Any, where: str = "state") -> tuple[Any, dict[str, torch.Tensor]]:
    tensors: dict[str, torch.Tensor] = {}
    seen: dict[int, str] = {}  # id of the tree's own object (alive while the tree is) -> its key
    shared: dict[int, int] = {}  # id of a dict -> its index

    def tensor(v: torch.Tensor | np.ndarray, kind: str) -> dict:
        key = seen.get(id(v))
        if key is None:
            key = seen[id(v)] = f"t{len(tensors)}"
            t = torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v
            tensors[key] = t.detach().to("cpu").contiguous()
        return {kind: key}

    def walk(v: Any, path: str) -> Any:
        if isinstance(v, np.generic):  # before float: np.float64 is one, and keeps its type
            return {"npscalar": [v.dtype.str, v.item() if v.dtype.kind != "f" or math.isfinite(v) else repr(v.item())]}
        if isinstance(v, _SCALARS):
            return v
        if isinstance(v, float):
            return v if math.isfinite(v) else {"float": repr(v)}
        if isinstance(v, torch.Tensor):
            return tensor(v, "tensor")
        if isinstance(v, np.ndarray):
            if v.dtype.kind not in "biuf":
                raise TaskfedError(f"{path}: an array of dtype {v.dtype} cannot be kept in a checkpoint.")
            return tensor(v, "ndarray")
        if isinstance(v, list):
            return {"list": [walk(x, f"{path}[{i}]") for i, x in enumerate(v)]}
        if isinstance(v, tuple):
            return {"tuple": [walk(x, f"{path}[{i}]") for i, x in enumerate(v)]}
        if isinstance(v, (set, frozenset)):
            items = sorted(v, key=repr)  # a stable order on disk; a set's own order carries no meaning
            return {"set": [walk(x, f"{path} item") for x in items]}
        if isinstance(v, dict):
            # A dict held in two places (one adapter in several slots) comes back as one object: code that
            # tells adapters apart by identity (bytes sent once per distinct adapter) sees what it saw.
            if id(v) in shared:
                return {"ref": shared[id(v)]}
            shared[id(v)] = len(shared)
            return {"obj": [shared[id(v)], [[walk(k, f"{path} key"), walk(x, f"{path}[{k!r}]")] for k, x in v.items()]]}
        raise TaskfedError(f"{path}: a value of type {type(v).__name__} cannot be kept in a checkpoint.")

    return walk(value, where), tensors


def unpack(tree: Any, tensors: dict[str, torch.Tensor], _dicts: dict[int, dict] | None = None) -> Any:
    dicts = {} if _dicts is None else _dicts

    def sub(x: Any) -> Any:
        return unpack(x, tensors, dicts)

    if isinstance(tree, _SCALARS) or isinstance(tree, float):
        return tree
    if not isinstance(tree, dict) or len(tree) != 1:
        raise ValueError(f"malformed node {str(tree)[:60]!r}")
    (kind, body), = tree.items()
    if kind == "float":
        return float(body)
    if kind in ("tensor", "ndarray"):
        t = tensors[body]
        return t.numpy() if kind == "ndarray" else t
    if kind == "npscalar":
        dtype, x = body
        return np.dtype(dtype).type(float(x) if isinstance(x, str) else x)
    if kind == "list":
        return [sub(x) for x in body]
    if kind == "tuple":
        return tuple(sub(x) for x in body)
    if kind == "set":
        return {_hashable(sub(x)) for x in body}
    if kind == "obj":
        n, items = body
        out = dicts[n] = {}
        for k, x in items:
            out[_hashable(sub(k))] = sub(x)
        return out
    if kind == "ref":
        return dicts[body]
    raise ValueError(f"unknown node kind {kind!r}")


def _hashable(key: Any) -> Any:
    hash(key)  # a list or dict as a key is a malformed file, not a crash later
    return key


def save_tree(value: Any, folder: Path, stem: str) -> list[Path]:
    """`<stem>.json` and `<stem>.safetensors` in `folder`; the files written."""
    tree, tensors = pack(value, stem)
    folder = Path(folder)
    # safetensors refuses tensors sharing memory (a view): each is saved as its own copy.
    save_safetensors({k: v.clone() if v.storage_offset() or v.numel() != v.untyped_storage().nbytes() // max(v.element_size(), 1)
               else v for k, v in tensors.items()}, folder / f"{stem}.safetensors")
    (folder / f"{stem}.json").write_text(json.dumps(tree, sort_keys=False, allow_nan=False))
    return [folder / f"{stem}.json", folder / f"{stem}.safetensors"]


def load_tree(folder: Path, stem: str) -> Any:
    folder = Path(folder)
    tensors = load_file(str(folder / f"{stem}.safetensors"))
    with torch.no_grad():
        tensors = {k: v.clone() for k, v in tensors.items()}  # own memory, not the file's mapping
    return unpack(json.loads((folder / f"{stem}.json").read_text(encoding="utf-8")), tensors)
