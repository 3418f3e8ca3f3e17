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
- "gate" (FedALT, FedLEASE): per client c (`params.models[c]`), a per-token gate over the adapters
  `models[c].adapters`: logit w weighs `adapters[logits[w]]` (repeats alias), the top `params.top_k` kept
  and renormalised (None: all), the gate being client c's array `params.gate` (adapters/clients/<c>/<gate>
  .safetensors: "<module>.gate", W x d_in per target module). Nothing to route: the mix is the gate's, per token.
- "one": no router; every input goes to `adapters[0]` (FedAvg's global adapter, a cluster method's model).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model
from safetensors import SafetensorError
from safetensors.torch import load_file
from scipy.spatial.distance import cdist

from taskfed.config import describe_error
from taskfed.data.prompts import TEMPLATES
from taskfed.errors import TaskfedError
from taskfed.privacy import clip_rows
from taskfed.state import save_safetensors

FORMAT = 1
JSON, ARRAYS = "router.json", "router.safetensors"
KINDS = ("nearest", "mix", "gate", "one")
MIX_PARAMS = ("weighting", "w_max", "w_fixed", "k", "references", "h_text")  # FedDPA's, as router_state writes them


# router.json as `taskfed serve` reads it: every key it uses, strictly typed and bounded, so a hand-edited or
# damaged file is refused at start naming the key, not a 500 on every routed request. Keys the server does
# not read (seed, max_length) are left alone. Bounds that need the base model (embed_layers against its
# depth, the centroids' width) are checked once it is loaded (serve/run.py's check_shapes).
class _Strict(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


Name = Annotated[str, Field(min_length=1)]


class _Router(_Strict):
    kind: Literal[KINDS]
    adapters: list[Name] = Field(default_factory=list)
    embed_layers: Annotated[int, Field(ge=1)] | None = None
    clip: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    clients: dict[str, Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]] = Field(default_factory=dict)
    params: dict[str, Any] = Field(default_factory=dict)


class _Lora(_Strict):
    r: Annotated[int, Field(ge=1)]
    alpha: Annotated[float, Field(allow_inf_nan=False)]
    target_modules: list[Name] = Field(min_length=1)


class _Doc(_Strict):
    method: Name
    run: str = ""
    rounds: Annotated[int, Field(ge=0)] | None = None
    base_model: Name
    lora: _Lora
    template: Literal[tuple(TEMPLATES)] | None = None
    adapters: dict[str, Name]
    clients: list[str] = Field(default_factory=list)
    client_arrays: dict[str, dict[str, Name]] = Field(default_factory=dict)
    router: _Router


class _GateModel(_Strict):
    adapters: list[Name] = Field(min_length=1)
    logits: list[Annotated[int, Field(ge=0)]] = Field(min_length=1)


class _GateParams(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    gate: Name
    top_k: Annotated[int, Field(ge=1)] | None = None
    models: Annotated[dict[str, _GateModel], Field(min_length=1)]


class _GateRouter(_Router):
    params: _GateParams


class _GateDoc(_Doc):
    router: _GateRouter


@functools.cache
def _mix_doc() -> type[BaseModel]:
    """router.json of a FedDPA run: `router.params` with FedDPA's own parameter bounds (FedDPAParams' fields)
    and the run's seed, nothing else (a parameter the server does not know would be silently ignored)."""
    from taskfed.methods.feddpa import FedDPAParams  # imported here: feddpa imports this module

    fields = {name: (f.annotation, f) for name, f in FedDPAParams.model_fields.items() if name in MIX_PARAMS}
    params = create_model("MixParams", __config__=ConfigDict(extra="forbid", strict=True),
                          seed=(Annotated[int, Field(ge=0)], ...), **fields)
    router = create_model("MixRouter", __config__=_Strict.model_config, params=(params, ...))
    return create_model("MixDoc", __config__=_Strict.model_config, router=(router, ...))


def _validate(path: Path, model: type[BaseModel], doc: dict[str, Any]) -> BaseModel:
    try:
        return model.model_validate(doc)
    except ValidationError as exc:
        raise TaskfedError(describe_error(exc, str(path))) from None


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
    save_safetensors(arrays, folder / ARRAYS)


def read_router(folder: Path) -> tuple[dict[str, Any], RouterState]:
    """The run folder's router.json (as a dict) and its RouterState; a missing, corrupt or inconsistent file
    gives one sentence naming it and the key."""
    path = Path(folder) / JSON
    if not path.exists():
        runs = sorted(p.parent.name for p in Path(folder).glob(f"*/{JSON}"))
        if runs:  # e.g. `taskfed serve runs/demo`: the demo's folder holds its run folders
            raise TaskfedError(f"{folder}: holds run folders ({', '.join(runs)}), not one run: serve one of them, "
                               f"e.g. taskfed serve {Path(folder) / runs[0]}.")
        raise TaskfedError(f"{path}: does not exist: {folder} is not a taskfed run folder (one that `taskfed run` "
                           f"wrote has config.toml, metrics.json, router.json and adapters/).")
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TaskfedError(f"{path}: not valid JSON ({exc}).") from None
    except RecursionError:
        raise TaskfedError(f"{path}: not a router file (JSON nested too deep).") from None
    except OSError as exc:
        raise TaskfedError(f"{path}: cannot be read ({exc.strerror or type(exc).__name__}).") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise TaskfedError(f"{path}: key 'format' must be {FORMAT}.")
    r = _validate(path, _Doc, doc).router
    _check_adapters(path, doc, r)
    centroids = _centroids(Path(folder), r) if r.kind == "nearest" else None
    state = RouterState(kind=r.kind, adapters=list(r.adapters), centroids=centroids, embed_layers=r.embed_layers,
                        clip=r.clip, clients={c: list(v) for c, v in r.clients.items()}, params=dict(r.params))
    return doc, state


def _check_adapters(path: Path, doc: dict[str, Any], r: _Router) -> None:
    """The router's adapters are the run's; a nearest router has one per centroid (so at least one), a mix
    mixes the global adapter with the client's local one (and its parameters are FedDPA's)."""
    unknown = [a for a in r.adapters if a not in doc["adapters"]]
    if unknown:
        raise TaskfedError(f"{path}: key 'router.adapters' names adapter '{unknown[0]}', which the run does not list.")
    if r.kind == "nearest" and not r.adapters:
        raise TaskfedError(f"{path}: key 'router.adapters' is empty; a nearest router needs an adapter per centroid.")
    if r.kind == "gate":
        _check_gate(path, doc, _validate(path, _GateDoc, doc).router.params)
    if r.kind == "mix":
        if r.adapters != ["global"]:
            raise TaskfedError(f"{path}: key 'router.adapters' must be ['global'] (a mix of the global adapter and "
                               f"a client's local one).")
        _validate(path, _mix_doc(), doc)
        missing = [k for k in (*MIX_PARAMS, "seed") if k not in r.params]
        if missing:
            raise TaskfedError(f"{path}: key 'router.params.{missing[0]}' is missing.")


def _check_gate(path: Path, doc: dict[str, Any], p: "_GateParams") -> None:
    """A gate router's models name the run's adapters, logits within them, one gate width for all (the bank
    holds the gates stacked), top_k within it, and each model's client holds the gate file."""
    widths = {len(m.logits) for m in p.models.values()}
    if len(widths) != 1:
        raise TaskfedError(f"{path}: key 'router.params.models': every model's gate must have the same number "
                           f"of logits (found {sorted(widths)}).")
    width = widths.pop()
    if p.top_k is not None and p.top_k > width:
        raise TaskfedError(f"{path}: key 'router.params.top_k' is {p.top_k}, more than the gate's {width} logits.")
    files = doc.get("client_arrays", {}).get(p.gate, {})
    for cid, m in sorted(p.models.items()):
        where = f"router.params.models.{cid}"
        unknown = [a for a in m.adapters if a not in doc["adapters"]]
        if unknown:
            raise TaskfedError(f"{path}: key '{where}.adapters' names adapter '{unknown[0]}', which the run does not list.")
        if max(m.logits) >= len(m.adapters):
            raise TaskfedError(f"{path}: key '{where}.logits' names adapter {max(m.logits)}, but the model has "
                               f"{len(m.adapters)} (0..{len(m.adapters) - 1}).")
        if cid not in files:
            raise TaskfedError(f"{path}: key 'client_arrays.{p.gate}.{cid}' is missing: client {cid}'s gate file.")


def _centroids(folder: Path, r: _Router) -> np.ndarray:
    """A nearest router's centroids (router.safetensors), one finite row per router adapter; the clients'
    subsets index them."""
    arrays = folder / ARRAYS
    try:
        held = load_file(str(arrays)) if arrays.exists() else {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise TaskfedError(f"{arrays}: corrupt router file ({str(exc).splitlines()[0]}).") from None
    c = held.get("centroids")
    if c is None or c.ndim != 2 or len(c) != len(r.adapters) or not c.is_floating_point() or not torch.isfinite(c).all():
        raise TaskfedError(f"{arrays}: 'centroids' must be a finite {len(r.adapters)}-row matrix, one row "
                           f"per router adapter.")
    for cid, allowed in r.clients.items():
        if any(j >= len(c) for j in allowed):
            raise TaskfedError(f"{folder / JSON}: key 'router.clients.{cid}' must list centroid indices below {len(c)}.")
    return c.double().numpy()
