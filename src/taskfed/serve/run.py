"""A run folder as served: its adapters by name, its router, and what a request's `model` (and `mix`) means.

Names a request may give as `model`:
    auto            the run's router picks per request: the nearest centroid (FedRouter, FL-TAC); a run
                    without a router (FedAvg, clustered FL's model) answers with its one adapter
    auto@<client>   FedDPA's instance-wise mix of `global` and that client's local adapter; FedRouter with
                    `router = "local"`: the nearest of the centroids bound to that client
    <adapter>       one adapter as the run folder names it: `cluster/2`, `global`, `local@03`
    base            the base model, no adapter
and an explicit mix in the body, `{"cluster/0": 0.7, "cluster/1": 0.3}`, whatever `model` says.
Every answer carries its Decision: the adapters, their weights, and for a routed input the distance to each
centroid and whether it abstained (farther than `max_distance`: the fallback answers instead).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from taskfed.config import load_config
from taskfed.data.prompts import render
from taskfed.errors import TaskfedError
from taskfed.model.bank import AdapterWeights
from taskfed.model.peft_io import check_weights, load_adapter
from taskfed.routing import RouterState, read_router

BASE, AUTO = "base", "auto"


class BadRequest(ValueError):
    """A request the run cannot answer as asked: the message names the field (`param`)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


@dataclass
class Ask:
    """What one request asks for, checked before it queues: fixed adapters and weights, or a router to run."""

    route: str | None = None  # None: `names`/`weights` as given; "nearest" | "mix": the worker routes
    client: str | None = None
    names: list[str] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)


@dataclass
class Decision:
    adapters: list[str]
    weights: list[float]
    distance: float | None = None  # to the chosen centroid (routed inputs)
    distances: dict[str, float] | None = None  # to every centroid the router could use
    abstained: bool = False

    def public(self, run: "ServedRun") -> dict[str, Any]:
        return {"adapters": self.adapters, "weights": [round(w, 6) for w in self.weights], "distance": self.distance,
                "distances": self.distances, "abstained": self.abstained, "run": run.id, "round": run.rounds}


class ServedRun:
    """The run folder's adapters (read and checked against the base model's shapes) and router."""

    def __init__(self, folder: str | Path, shapes: dict[str, tuple[int, ...]] | None = None,
                 max_distance: float | None = None, fallback: str = BASE):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise TaskfedError(f"{self.folder}: run folder does not exist.")
        self.doc, self.router = read_router(self.folder)
        self.cfg = load_config(self.folder / "config.toml")
        self.id, self.rounds, self.method = self.doc.get("run", ""), self.doc.get("rounds"), self.doc["method"]
        self.template = self.doc.get("template", self.cfg.data.template)
        self.shapes = shapes
        self.adapters: dict[str, AdapterWeights] = {}
        for name, rel in sorted(self.doc["adapters"].items()):
            where = (self.folder / rel).resolve()
            if self.folder.resolve() not in where.parents:
                raise TaskfedError(f"{self.folder / 'router.json'}: adapter '{name}' points outside the run folder.")
            self.adapters[name] = load_adapter(where, shapes)
        self.max_distance, self.fallback = max_distance, fallback
        if fallback not in (BASE, *self.adapters):
            raise TaskfedError(f"--fallback {fallback}: not an adapter of {self.folder} (use base or one of "
                               f"{', '.join(sorted(self.adapters))}).")
        self.slots: dict[str, int] = {}  # adapter name -> bank slot, once the batcher has loaded it

    def check_shapes(self, shapes: dict[str, tuple[int, ...]]) -> None:
        """Every adapter fits the loaded base model (read without it first, so a bad folder fails fast)."""
        for name, weights in self.adapters.items():
            check_weights(weights, shapes, str(self.folder / self.doc["adapters"][name]))
        self.shapes = shapes

    def same_base(self, other: "ServedRun") -> bool:
        return self.doc["base_model"] == other.doc["base_model"] and self.doc["lora"] == other.doc["lora"]

    def model_names(self) -> list[str]:
        clients = self.router.clients if self.router.kind == "nearest" else (
            self.doc.get("clients", []) if self.router.kind == "mix" else [])
        return [AUTO, *(f"{AUTO}@{c}" for c in clients), BASE, *self.adapters]

    def prompt(self, instruction: str) -> str:
        return render(self.template, instruction)

    # ----------------------------------------------------------------- what a request asks for
    def ask(self, model: str, mix: dict[str, Any] | None) -> Ask:
        if mix is not None:
            return self._mix(mix)
        if model == BASE:
            return Ask(names=[BASE], weights=[1.0])
        if model in self.adapters:
            return Ask(names=[model], weights=[1.0])
        name, _, client = model.partition("@")
        if name != AUTO:
            raise BadRequest(f"model '{model}' is not served here; GET /v1/models lists what is.", "model", "model_not_found")
        kind = self.router.kind
        if kind == "one":
            if client or not self.router.adapters:
                raise BadRequest(f"model '{model}': this {self.method} run has no router; name an adapter.", "model",
                                 "model_not_found")
            return Ask(names=self.router.adapters[:1], weights=[1.0])
        if kind == "nearest":
            if client and client not in self.router.clients:
                raise BadRequest(f"model '{model}': this run's router has no client '{client}'.", "model", "model_not_found")
            return Ask(route="nearest", client=client or None)
        # mix (FedDPA): needs the client whose local adapter joins the global one
        if not client:
            raise BadRequest(f"model 'auto': a {self.method} run mixes its global adapter with a client's local one; "
                             f"name the client, e.g. 'auto@{(self.doc.get('clients') or ['0'])[0]}'.", "model", "model_not_found")
        if f"local@{client}" not in self.adapters:
            raise BadRequest(f"model '{model}': the run folder holds no local adapter of client '{client}'.", "model",
                             "model_not_found")
        if self.router.params.get("weighting") != "fixed":
            raise BadRequest(f"model '{model}': FedDPA's '{self.router.params.get('weighting')}' weighting needs the "
                             f"client's reference states, which this run folder does not hold; give the mix "
                             f"explicitly (taskfed.mix).", "model", "model_not_found")
        w = float(self.router.params["w_fixed"])
        return Ask(names=["global", f"local@{client}"], weights=[1.0 - w, w])

    def _mix(self, mix: Any) -> Ask:
        if not isinstance(mix, dict) or not mix:
            raise BadRequest("taskfed.mix must be an object of adapter names to weights.", "taskfed.mix")
        names, weights = [], []
        for name, w in mix.items():
            if name not in self.adapters:
                raise BadRequest(f"taskfed.mix names adapter '{name}', which this run does not have.", f"taskfed.mix.{name}")
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
                raise BadRequest(f"taskfed.mix.{name}: a weight must be a finite number >= 0.", f"taskfed.mix.{name}")
            names.append(name)
            weights.append(float(w))
        if len(names) > 8:
            raise BadRequest("taskfed.mix: at most 8 adapters per row.", "taskfed.mix")
        return Ask(names=names, weights=weights)

    # ----------------------------------------------------------------- routing (in the batcher's thread)
    def decide(self, embed, asks: list[Ask], instructions: list[str]) -> list[Decision]:
        """Decisions for a batch of asks; `embed(texts, layers)` embeds all of the batch's routed inputs at once."""
        out: list[Decision | None] = [None if a.route else Decision(list(a.names), list(a.weights)) for a in asks]
        routed = [i for i, a in enumerate(asks) if a.route == "nearest"]
        if routed:
            state: RouterState = self.router
            emb = np.asarray(embed([instructions[i] for i in routed], state.embed_layers), dtype=np.float64)
            for row, i in enumerate(routed):
                chosen, dist = state.route(emb[row:row + 1], asks[i].client)
                g, d = chosen[0], float(dist[0, chosen[0]])
                distances = {state.adapters[j]: float(dist[0, j]) for j in range(len(state.adapters)) if np.isfinite(dist[0, j])}
                if self.max_distance is not None and d > self.max_distance:
                    out[i] = Decision([self.fallback], [1.0], d, distances, abstained=True)
                else:
                    out[i] = Decision([state.adapters[g]], [1.0], d, distances)
        return out
