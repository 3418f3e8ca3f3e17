"""Clustered FL, the FedRouter authors' baseline (methods.md, "Clustered FL").

Before `cluster_round` (rounds counted from 0): plain FedAvg of one global adapter (sampled clients train
it; the server averages by client sample count).

At `cluster_round`: every client trains the global adapter (whatever the client sampling: the clustering
needs every client's update, and each client stays in its group for the rest of the run). The server
takes each client's LoRA-B update, client B minus the global B it started from, over the B matrices of
the last transformer layer (`layers = "last"`, default: the highest layer index in the module names) or
of all layers (`layers = "all"`), computes the pairwise cosine similarity of these update vectors, and
clusters the clients into `n_clusters` groups by Ward agglomerative clustering (scikit-learn,
linkage="ward"), each client described by its row of the similarity matrix. Each group's adapter is the
mean of its members' uploads of that round, weighted by client sample count.

After: each round a sampled client trains its group's adapter; the server averages the uploads within
each group, weighted by client sample count; a group with no member this round keeps its weights.

Evaluation: each client uses its group's adapter (the global adapter if the run ended before clustering).

Defaults: `cluster_round = 1` (one round of FedAvg gives every client the same starting point; its
updates at round 1 then differ by the client's data only), `n_clusters = 4` (configs/clustered.toml: the
dual scenario's 8 clients; the FedRouter paper does not state its value).
"""

from __future__ import annotations

import re
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from taskfed.clustering import cosine_similarity, ward_labels
from taskfed.errors import TaskfedError
from taskfed.methods.base import Downlink, Job, Method, Result, group_means
from taskfed.model.bank import AdapterWeights


class ClusteredParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    cluster_round: int = Field(default=1, ge=0, description="the round (from 0) whose updates are clustered")
    n_clusters: int = Field(default=4, ge=1, description="groups of clients")
    layers: Literal["last", "all"] = Field(default="last", description="LoRA-B updates of the last layer or all layers")

    @field_validator("cluster_round")
    @classmethod
    def _within_the_budget(cls, value: int, info: ValidationInfo) -> int:
        rounds, fit = (info.context or {}).get("rounds"), (info.context or {}).get("fit")
        if rounds is None or value < rounds:
            return value
        if fit:  # --smoke's minimal budget: its last round clusters, as the full run's cluster_round would
            return rounds - 1
        raise ValueError(f"round {value} (from 0) is past the last round of train.rounds = {rounds}, so nothing "
                         f"would be clustered and the run would be FedAvg; give at most {rounds - 1}")


def layer_index(key: str) -> int | None:
    """The transformer layer of a module path: its first numeric component (`model.layers.29.self_attn...`)."""
    found = re.search(r"(?:^|\.)(\d+)\.", key)
    return int(found.group(1)) if found else None


def update_keys(keys, layers: str) -> list[str]:
    """The B matrices compared: all of them, or those of the highest-numbered layer (all of them when the
    module names carry no layer number)."""
    b_keys = sorted(k for k in keys if k.endswith("lora_B"))
    if layers == "all":
        return b_keys
    numbered = {k: layer_index(k) for k in b_keys if layer_index(k) is not None}
    if not numbered:
        return b_keys
    top = max(numbered.values())
    return [k for k in b_keys if numbered.get(k) == top]


class ClusteredFL(Method):
    name = "clustered"
    Params = ClusteredParams

    def __init__(self, params, fed):
        super().__init__(params, fed)
        if params.n_clusters > len(fed.clients):
            raise TaskfedError(f"method.n_clusters: {params.n_clusters} groups need at least as many clients, "
                               f"but the run has {len(fed.clients)}.")
        self.global_adapter: AdapterWeights = fed.init_adapter
        self.groups: dict[str, int] | None = None  # client -> group, fixed once clustered
        self.group_adapters: list[AdapterWeights] = []
        self.clustered_at: int | None = None
        self.similarity: np.ndarray | None = None  # kept for the report
        self.keys: list[str] = update_keys(fed.init_adapter, params.layers)

    # ---------------------------------------------------------------- server
    def plan(self, round_idx: int, clients: list[str]) -> list[Job]:
        if self.groups is None:
            if round_idx >= self.params.cluster_round:
                clients = list(self.fed.clients)  # the clustering round: every client's update is needed
            return [Job(client=c, adapter="global", init=self.global_adapter) for c in clients]
        return [Job(client=c, adapter=f"group/{self.groups[c]}", init=self.group_adapters[self.groups[c]])
                for c in clients]

    def update_vector(self, weights: AdapterWeights) -> np.ndarray:
        """Client B minus global B over the compared keys, flattened in sorted key order."""
        return torch.cat([(weights[k] - self.global_adapter[k]).reshape(-1).double() for k in self.keys]).numpy()

    def cluster(self, results: list[Result]) -> dict[str, int]:
        if len(results) < self.params.n_clusters:
            raise TaskfedError(f"method.n_clusters: {self.params.n_clusters} groups need at least as many "
                               f"uploads at cluster_round, got {len(results)}.")
        self.similarity = cosine_similarity(np.stack([self.update_vector(r.weights) for r in results]))
        labels = ward_labels(self.similarity, self.params.n_clusters)
        return {r.job.client: int(g) for r, g in zip(results, labels)}

    def aggregate(self, round_idx: int, results) -> None:
        if self.groups is None and round_idx >= self.params.cluster_round:
            # The clustering needs every update at once; sorted by client so that it does not depend on
            # the order results arrive in.
            results = sorted(results, key=lambda r: r.job.client)
            if not results:
                return
            self.groups = self.cluster(results)
            self.clustered_at = round_idx
            self.group_adapters = [self.global_adapter] * self.params.n_clusters
        # Otherwise streaming, in plan order: FedAvg before the clustering, per group after it.
        if self.groups is None:
            means = group_means(results, lambda r: "global", lambda r: r.n_client)
            if means:  # else every upload was refused: the global adapter stays
                self.global_adapter = means["global"]
            return
        for g, mean in group_means(results, lambda r: self.groups[r.job.client], lambda r: r.n_client).items():
            self.group_adapters[g] = mean  # a group with no member this round keeps its weights

    def server_adapters(self) -> dict[str, AdapterWeights]:
        if self.groups is None:
            return {"global": self.global_adapter}
        return {f"group/{g}": w for g, w in enumerate(self.group_adapters)}

    def downlink(self, client_id: str) -> Downlink:
        """The client's group adapter (the global one before the clustering)."""
        if self.groups is None:
            return Downlink(adapters={"global": self.global_adapter})
        g = self.groups[client_id]
        return Downlink(adapters={f"group/{g}": self.group_adapters[g]})

    def eval_report(self, mode: str, routed) -> dict[str, Any]:
        return {"clustered_at": self.clustered_at,
                "groups": None if self.groups is None else dict(sorted(self.groups.items())),
                "update_similarity": None if self.similarity is None else np.round(self.similarity, 6).tolist()}
