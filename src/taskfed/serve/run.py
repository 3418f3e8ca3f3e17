"""A run folder as served: its adapters by name, its router, and what a request's `model` (and `mix`) means.

Names a request may give as `model`:
    auto            the run's router picks per request: the nearest centroid (FedRouter, FL-TAC); a run
                    without a router (FedAvg, clustered FL's model) answers with its one adapter
    auto@<client>   FedDPA's instance-wise mix of `global` and that client's local adapter (weighted per
                    input from the client's exported reference states, or fixed); FedRouter with
                    `router = "local"`: the nearest of the centroids bound to that client; FedALT and
                    FedLEASE: that client's model, its adapters mixed per token and per layer by its gate
    <adapter>       one adapter as the run folder names it: `cluster/2`, `global`, `local@03`
    base            the base model, no adapter
and an explicit mix in the body, `{"cluster/0": 0.7, "cluster/1": 0.3}`, whatever `model` says: each weight an
adapter's share in [0, 1], applied as given (not normalised), the shares summing to at most 1.
Every answer carries its Decision: the adapters, their weights, and for a routed input the distance to each
centroid and whether it abstained (farther than `max_distance`: the fallback answers instead).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file

from taskfed.config import load_config
from taskfed.data.prompts import render
from taskfed.errors import TaskfedError
from taskfed.methods.feddpa import draw_references, global_local, local_weight, mean_cosine
from taskfed.model.bank import AdapterWeights
from taskfed.model.peft_io import check_weights, load_adapter
from taskfed.routing import ARRAYS, JSON, RouterState, read_router
from taskfed.runfolder import check_manifest

BASE, AUTO = "base", "auto"
MIX_SLACK = 1e-6  # shares written to a few decimals (0.1 + 0.2 + 0.7) may sum to 1 + float rounding


class BadRequest(ValueError):
    """A request the run cannot answer as asked: the message names the field (`param`)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


@dataclass
class Ask:
    """What one request asks for, checked before it queues: fixed adapters and weights, or a router to run."""

    route: str | None = None  # None: `names`/`weights` as given; "nearest" | "mix": the batcher's thread routes
    client: str | None = None
    names: list[str] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    gate: str | None = None  # a gate router's client: `names` mixed per token by its gate (no weights)


@dataclass
class Decision:
    adapters: list[str]
    weights: list[float]
    distance: float | None = None  # to the chosen centroid (routed inputs)
    distances: dict[str, float] | None = None  # to every centroid the router could use
    abstained: bool = False
    gate: str | None = None  # whose gate weighs `adapters` per token (then `weights` is empty)

    def public(self, run: "ServedRun") -> dict[str, Any]:
        out = {"adapters": self.adapters, "weights": [round(w, 6) for w in self.weights], "distance": self.distance,
               "distances": self.distances, "abstained": self.abstained, "run": run.id, "round": run.rounds}
        if self.gate is not None:
            out["gate"] = {"client": self.gate, "top_k": run.router.params.get("top_k"), "per": "token and layer"}
        return out


class ServedRun:
    """The run folder's adapters (read and checked against the base model's shapes) and router."""

    def __init__(self, folder: str | Path, shapes: dict[str, tuple[int, ...]] | None = None,
                 max_distance: float | None = None, fallback: str = BASE, hidden: int | None = None,
                 layers: int | None = None, log: Callable[[str], None] = lambda s: None):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise TaskfedError(f"{self.folder}: run folder does not exist.")
        check_manifest(self.folder, log)  # first: a damaged file is named as damaged, not as a bad key
        self.doc, self.router = read_router(self.folder)
        self.cfg = load_config(self.folder / "config.toml")
        self.id, self.rounds, self.method = self.doc.get("run", ""), self.doc.get("rounds"), self.doc["method"]
        self.template = self.doc.get("template") or self.cfg.data.template
        self.shapes = shapes
        self.adapters: dict[str, AdapterWeights] = {
            name: load_adapter(self._inside(rel, f"adapter '{name}'"), shapes) for name, rel in sorted(self.doc["adapters"].items())}
        # FedDPA: per client, unit-norm h of its training instructions (client row order), where it gave them.
        self.references: dict[str, torch.Tensor] = {
            cid: self._references(self._inside(rel, f"client {cid}'s references"))
            for cid, rel in sorted(self.doc.get("client_arrays", {}).get("references", {}).items())}
        # Gate routers (FedALT, FedLEASE): per client, its gate over its model's adapters.
        self.gates: dict[str, AdapterWeights] = {}
        if self.router.kind == "gate":
            p = self.router.params
            self.gates = {cid: self._gate(cid, self._inside(self.doc["client_arrays"][p["gate"]][cid], f"client {cid}'s gate"))
                          for cid in sorted(p["models"])}
        self.hidden, self.layers = hidden, layers
        self._check_model()
        self.serves = self._makeup()
        self.max_distance, self.fallback = max_distance, fallback
        if fallback not in (BASE, *self.adapters):
            raise TaskfedError(f"--fallback {fallback}: not an adapter of {self.folder} (use base or one of "
                               f"{', '.join(sorted(self.adapters))}).")
        self.slots: dict[str, int] = {}  # adapter name -> bank slot, once the batcher has loaded it
        self.gate_slots: dict[str, int] = {}  # client -> bank gate (gate routers), likewise

    def _makeup(self) -> dict[str, dict[str, int]]:
        """What each cluster adapter was built from, per task (the run's `cluster_makeup` in metrics.json,
        FedRouter and FL-TAC): `/v1/models` and the page show it, so `cluster/3` says it serves snli. Shown
        only: a metrics.json without it (or unreadable here) serves the same, with the names alone."""
        try:
            metrics = json.loads((self.folder / "metrics.json").read_text(encoding="utf-8"))
            found = next(m["cluster_makeup"] for m in metrics["eval"].values() if isinstance(m, dict) and "cluster_makeup" in m)
            return {f"cluster/{g}": {str(t): int(n) for t, n in sorted(tasks.items(), key=lambda x: -x[1]) if n}
                    for g, tasks in found.items() if f"cluster/{g}" in self.adapters}
        except (OSError, ValueError, KeyError, TypeError, AttributeError, StopIteration, RecursionError):
            return {}

    def distance_scale(self) -> str | None:
        """The router's centroids' spacing, as a scale for --max-distance (the distances a request's answer
        reports are to these centroids, in the same space): nearest and median pair, None without a router."""
        c = self.router.centroids if self.router.kind == "nearest" else None
        if c is None or len(c) < 2:
            return None
        c = np.asarray(c, dtype=np.float64)
        pairs = np.linalg.norm(c[:, None] - c[None], axis=-1)[np.triu_indices(len(c), 1)]
        return f"nearest pair {pairs.min():.3g}, median pair {np.median(pairs):.3g}, farthest {pairs.max():.3g}"

    def _inside(self, rel: str, what: str) -> Path:
        where = (self.folder / rel).resolve()
        if self.folder.resolve() not in where.parents:
            raise TaskfedError(f"{self.folder / 'router.json'}: {what} points outside the run folder.")
        return where

    @staticmethod
    def _references(path: Path) -> torch.Tensor:
        try:
            h = load_file(str(path)).get("h")
        except (SafetensorError, OSError, ValueError) as exc:
            raise TaskfedError(f"{path}: corrupt reference states ({str(exc).splitlines()[0]}).") from None
        if h is None or h.dim() != 2 or not h.is_floating_point() or not bool(torch.isfinite(h).all()):
            raise TaskfedError(f"{path}: reference states must be one finite float tensor 'h' of shape (rows, hidden).")
        return h.double()

    def _gate(self, cid: str, path: Path) -> AdapterWeights:
        """Client `cid`'s gate: one finite W x d_in tensor per target module of its model's adapters, W its
        logits (router.json)."""
        model = self.router.params["models"][cid]
        like = self.adapters[model["adapters"][0]]
        want = {k.removesuffix(".lora_A") + ".gate": (len(model["logits"]), int(v.shape[1]))
                for k, v in like.items() if k.endswith(".lora_A")}
        try:
            gate = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise TaskfedError(f"{path}: corrupt gate file ({str(exc).splitlines()[0]}).") from None
        if set(gate) != set(want):
            odd = sorted(set(gate) ^ set(want))[0]
            raise TaskfedError(f"{path}: gate key '{odd}' {'is missing' if odd in want else 'is not a target module of the run'}.")
        for k, shape in want.items():
            t = gate[k]
            if tuple(t.shape) != shape or not t.is_floating_point() or not bool(torch.isfinite(t).all()):
                raise TaskfedError(f"{path}: gate '{k}' must be a finite float tensor of shape {shape}, got "
                                   f"{t.dtype} {tuple(t.shape)}.")
        return {k: v.float() for k, v in gate.items()}

    def gate_row(self, d: Decision) -> list[int]:
        """A gated decision's logits as indices into its adapters (repeats alias)."""
        return list(self.router.params["models"][d.gate]["logits"])

    def check_shapes(self, shapes: dict[str, tuple[int, ...]], hidden: int, layers: int | None = None) -> None:
        """Every adapter, reference state and the router fit the loaded base model (`layers`: its decoder
        layers); the folder is read without it first, so a bad folder fails fast."""
        for name, weights in self.adapters.items():
            check_weights(weights, shapes, str(self.folder / self.doc["adapters"][name]))
        self.shapes, self.hidden, self.layers = shapes, hidden, layers
        self._check_model()

    def _check_model(self) -> None:
        """What needs the base model's sizes (where known): the reference states' and centroids' width, the
        router's embedding depth."""
        for cid, h in self.references.items():
            if self.hidden is not None and len(h) and h.shape[1] != self.hidden:
                raise TaskfedError(f"{self.folder / self.doc['client_arrays']['references'][cid]}: reference states "
                                   f"of width {h.shape[1]}, but the base model's hidden size is {self.hidden}.")
        c, depth = self.router.centroids, self.router.embed_layers
        if c is not None and self.hidden is not None and c.shape[1] != self.hidden:
            raise TaskfedError(f"{self.folder / ARRAYS}: centroids of width {c.shape[1]}, but the base model's "
                               f"hidden size is {self.hidden}.")
        if depth is not None and self.layers is not None and depth > self.layers:
            raise TaskfedError(f"{self.folder / JSON}: key 'router.embed_layers' is {depth}, but the base model "
                               f"{self.doc['base_model']} has {self.layers} decoder layers (1..{self.layers}).")

    def same_base(self, other: "ServedRun") -> bool:
        return self.doc["base_model"] == other.doc["base_model"] and self.doc["lora"] == other.doc["lora"]

    def model_names(self) -> list[str]:
        kind = self.router.kind
        clients = self.router.clients if kind == "nearest" else (
            self.doc.get("clients", []) if kind == "mix" else sorted(self.gates) if kind == "gate" else [])
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
        if kind == "gate":
            if not client:
                raise BadRequest(f"model 'auto': each client of this {self.method} run has its own gated model; name "
                                 f"the client, e.g. 'auto@{sorted(self.gates)[0]}'.", "model", "model_not_found")
            if client not in self.gates:
                raise BadRequest(f"model '{model}': this run has no client '{client}'.", "model", "model_not_found")
            return Ask(names=list(self.router.params["models"][client]["adapters"]), gate=client)
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
        p = self.router.params
        if p.get("weighting") == "fixed":
            w = global_local(local_weight("fixed", 0.0, float(p["w_fixed"]), None, 1))
            return Ask(names=["global", f"local@{client}"], weights=w[0].tolist())
        if client not in self.references:
            raise BadRequest(f"model '{model}': FedDPA's '{p.get('weighting')}' weighting needs client '{client}''s "
                             f"reference states, which this run folder does not hold (train with "
                             f"method.export_references = true); give the mix explicitly (taskfed.mix).", "model",
                             "model_not_found")
        return Ask(route="mix", client=client)

    def _mix(self, mix: Any) -> Ask:
        """An explicit mix: each weight is that adapter's share, applied as given (never normalised: 0.5 of one
        adapter is half its update), in [0, 1] and summing to at most 1, the base model taking the rest, as
        routed (1.0) and FedDPA (w_global + w_local = 1) mixes do. Larger weights would extrapolate past
        every trained adapter, and 1e308 overflows the activations into garbage."""
        if not isinstance(mix, dict) or not mix:
            raise BadRequest("taskfed.mix must be an object of adapter names to weights.", "taskfed.mix")
        names, weights = [], []
        for name, w in mix.items():
            if name not in self.adapters:
                raise BadRequest(f"taskfed.mix names adapter '{name}', which this run does not have.", f"taskfed.mix.{name}")
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 <= w <= 1:  # NaN and 10**400 too
                raise BadRequest(f"taskfed.mix.{name}: a weight must be a number in [0, 1] (the adapter's share; the "
                                 f"shares sum to at most 1).", f"taskfed.mix.{name}")
            names.append(name)
            weights.append(float(w))
        if len(names) > 8:
            raise BadRequest("taskfed.mix: at most 8 adapters per row.", "taskfed.mix")
        if math.fsum(weights) > 1 + MIX_SLACK:
            raise BadRequest(f"taskfed.mix: the weights sum to {math.fsum(weights):g}, but must sum to at most 1 "
                             f"(each is an adapter's share, applied as given, not normalised; the base model takes "
                             f"the rest).", "taskfed.mix")
        return Ask(names=names, weights=weights)

    # ----------------------------------------------------------------- routing (in the batcher's thread)
    def decide(self, enc, asks: list[Ask], instructions: list[str]) -> list[Decision]:
        """Decisions for a batch of asks. `enc` computes what routing needs, for all of the batch's routed
        inputs at once: `enc.embed(texts, layers)` (the nearest router's embedding) and
        `enc.last_states(texts, slots)` (FedDPA's h: last-token state with each row's adapter slot)."""
        out: list[Decision | None] = [None if a.route else Decision(list(a.names), list(a.weights), gate=a.gate) for a in asks]
        routed = [i for i, a in enumerate(asks) if a.route == "nearest"]
        if routed:
            state: RouterState = self.router
            emb = np.asarray(enc.embed([instructions[i] for i in routed], state.embed_layers), dtype=np.float64)
            for row, i in enumerate(routed):
                chosen, dist = state.route(emb[row:row + 1], asks[i].client)
                g, d = chosen[0], float(dist[0, chosen[0]])
                distances = {state.adapters[j]: float(dist[0, j]) for j in range(len(state.adapters)) if np.isfinite(dist[0, j])}
                if self.max_distance is not None and d > self.max_distance:
                    out[i] = Decision([self.fallback], [1.0], d, distances, abstained=True)
                else:
                    out[i] = Decision([state.adapters[g]], [1.0], d, distances)
        mixed = [i for i, a in enumerate(asks) if a.route == "mix"]
        if mixed:
            for i, w in zip(mixed, self._feddpa_weights(enc, [asks[i].client for i in mixed], [instructions[i] for i in mixed])):
                out[i] = Decision(["global", f"local@{asks[i].client}"], w)
        return out

    def _feddpa_weights(self, enc, clients: list[str], instructions: list[str]) -> list[list[float]]:
        """(w_global, w_local) per input as the run's evaluation weighs it (methods/feddpa.py): h(x) with the
        client's local adapter, s(x) against x's seeded draw of the client's reference states."""
        p = self.router.params
        shown = [self.prompt(t) if p["h_text"] == "prompt" else t for t in instructions]
        h = F.normalize(enc.last_states(shown, [self.slots[f"local@{c}"] for c in clients]).double(), dim=1)
        out = []
        for h_x, client, text in zip(h, clients, instructions):
            refs = self.references[client]
            if len(refs):
                drawn = draw_references(p["seed"], client, text if p["references"] == "per_input" else "", len(refs), p["k"])
                s = mean_cosine(h_x, refs[torch.as_tensor(drawn)]).reshape(1)
            else:  # a client without training rows: s = 0, as in the evaluation
                s = torch.zeros(1)
            out.append(global_local(local_weight(p["weighting"], float(p["w_max"]), float(p["w_fixed"]), s, 1))[0].tolist())
        return out
