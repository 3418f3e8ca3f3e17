"""The router a run ends with, as data: what `taskfed serve` needs to send an input to its task adapter.

A method's server side states it (`Method.router_state`); the one federation driver writes it into the run
folder on every engine, beside the adapters:

    router.json          format, method, run id, rounds, base model and LoRA shape, prompt template, every
                         adapter's name -> its folder, the clients' array files (`client_arrays`: name ->
                         client -> file), and the router: its kind and parameters
    router.safetensors   the router's arrays (centroids), float64

Kinds:
- "nearest" (FedRouter, FL-TAC): embed(x) at `embed_layers` depth (None: all layers), clipped to `clip` when
  the run's centroids were private, goes to the adapter of the nearest centroid (`adapters[j]` for centroid
  j); `clients[c]`, where present, is the subset of centroids client c's router may use (FedRouter's
  `router = "local"`).
- "mix" (FedDPA): per client, global + that client's local adapter with the weighting's parameters; an
  input's weights need the client's reference states (adapters/clients/<c>/references.safetensors, written
  only where the run allows it: FedDPA's `export_references`), except under the fixed weighting.
- "one": no router; every input goes to `adapters[0]` (FedAvg's global adapter, a cluster method's model).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from scipy.spatial.distance import cdist

from taskfed.errors import TaskfedError
from taskfed.privacy import clip_rows

FORMAT = 1
JSON, ARRAYS = "router.json", "router.safetensors"
KINDS = ("nearest", "mix", "one")


@dataclass
class RouterState:
    kind: str
    adapters: list[str] = field(default_factory=list)  # nearest: the adapter of each centroid; one: [the adapter]
    centroids: np.ndarray | None = None
    embed_layers: int | None = None
    clip: float | None = None
    clients: dict[str, list[int]] = field(default_factory=dict)  # nearest: centroids each client may use
    params: dict[str, Any] = field(default_factory=dict)  # mix: the weighting (FedDPA's w_max, k, ...)

    def route(self, emb: np.ndarray, client: str | None = None) -> tuple[list[int], np.ndarray]:
        """Nearest router: the centroid each embedding goes to, and every row's distances to all centroids
        (inf for those the client may not use)."""
        x = np.asarray(emb, dtype=np.float64)
        if self.clip is not None:
            x = clip_rows(x, self.clip)
        allowed = np.array(self.clients[client]) if client is not None and client in self.clients else np.arange(len(self.centroids))
        # One distance matrix for both answers; argmin over the allowed columns (the others inf) is what
        # clustering.nearest over the allowed centroids picks, ties to the lower index included.
        masked = np.full((len(x), len(self.centroids)), np.inf)
        masked[:, allowed] = cdist(x, np.asarray(self.centroids, dtype=np.float64))[:, allowed]
        chosen = masked.argmin(axis=1) if len(x) else np.zeros(0, dtype=int)
        return [int(g) for g in chosen], masked


def write_router(folder: Path, state: RouterState, meta: dict[str, Any], adapters: dict[str, str]) -> None:
    """router.json and router.safetensors in the run folder; `adapters` maps each adapter's name to its folder."""
    doc = {"format": FORMAT, **meta, "adapters": adapters,
           "router": {"kind": state.kind, "adapters": state.adapters, "embed_layers": state.embed_layers,
                      "clip": state.clip, "clients": state.clients, "params": state.params}}
    (folder / JSON).write_text(json.dumps(doc, indent=2, sort_keys=True))
    arrays = {} if state.centroids is None else {"centroids": torch.as_tensor(np.asarray(state.centroids, dtype=np.float64))}
    save_file(arrays, str(folder / ARRAYS))


def read_router(folder: Path) -> tuple[dict[str, Any], RouterState]:
    """The run folder's router.json (as a dict) and its RouterState; a missing, corrupt or inconsistent file
    gives one sentence naming it and the key."""
    path = Path(folder) / JSON
    if not path.exists():
        raise TaskfedError(f"{path}: does not exist (a run folder written by taskfed 0.x before serving; rerun it).")
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TaskfedError(f"{path}: not valid JSON ({exc}).") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise TaskfedError(f"{path}: key 'format' must be {FORMAT}.")
    for key, kind in (("adapters", dict), ("router", dict), ("method", str), ("base_model", str), ("lora", dict)):
        if not isinstance(doc.get(key), kind):
            raise TaskfedError(f"{path}: key '{key}' is missing or not a {kind.__name__}.")
    r = doc["router"]
    if r.get("kind") not in KINDS:
        raise TaskfedError(f"{path}: key 'router.kind' must be one of {', '.join(KINDS)}.")
    unknown = [a for a in r.get("adapters", []) if a not in doc["adapters"]]
    if unknown:
        raise TaskfedError(f"{path}: key 'router.adapters' names adapter '{unknown[0]}', which the run does not list.")
    centroids = None
    arrays = Path(folder) / ARRAYS
    try:
        held = load_file(str(arrays)) if arrays.exists() else {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise TaskfedError(f"{arrays}: corrupt router file ({str(exc).splitlines()[0]}).") from None
    if r["kind"] == "nearest":
        c = held.get("centroids")
        if c is None or c.ndim != 2 or len(c) != len(r["adapters"]) or not torch.isfinite(c).all():
            raise TaskfedError(f"{arrays}: 'centroids' must be a finite {len(r['adapters'])}-row matrix, one row "
                               f"per router adapter.")
        centroids = c.double().numpy()
        for cid, allowed in r.get("clients", {}).items():
            if not allowed or any(not isinstance(j, int) or not 0 <= j < len(centroids) for j in allowed):
                raise TaskfedError(f"{path}: key 'router.clients.{cid}' must list centroid indices below {len(centroids)}.")
    state = RouterState(kind=r["kind"], adapters=list(r.get("adapters", [])), centroids=centroids,
                        embed_layers=r.get("embed_layers"), clip=r.get("clip"),
                        clients={c: list(v) for c, v in r.get("clients", {}).items()}, params=dict(r.get("params", {})))
    return doc, state
