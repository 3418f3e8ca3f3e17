"""IFCA (Ghosh et al., 2006.04088), on LoRA adapters (methods.md, "IFCA").

Server: holds K cluster adapters (`n_clusters`). Each round it sends every sampled client all K.

Client: evaluates the loss of every cluster adapter on one seeded batch of its rows, trains the one with
the lowest loss and uploads it; the result says which one it picked (`Job.candidates`, `Result.chosen`:
the engine runs this choice where the data lives).

Server: per cluster, the mean of the uploads of the clients that picked it, weighted by client sample
count; a cluster no client picked this round keeps its weights. The server remembers each client's last
pick (it is what the uploads told it).

Initialisation: IFCA starts its K models from different random points; K copies of the shared v0 would
be useless here, because v0's B is zero, so every candidate would have the same loss and every client
would pick cluster 0. Cluster j starts from v0 plus Gaussian noise of standard deviation `init_std` on
every A and B entry, drawn from a generator seeded by (run seed, j): deterministic, and distinct.

Evaluation: a client uses the cluster it picked last. A client never sampled picks on the spot with the
same rule (lowest loss on a seeded batch of its training rows), on its side.
"""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from taskfed.errors import TaskfedError
from taskfed.methods.base import Client, Downlink, Job, Method, RunningMean
from taskfed.model.bank import AdapterWeights, RowMix
from taskfed.training import adapter_losses, sample_order


class IFCAParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    n_clusters: int = Field(default=4, ge=1, description="cluster adapters K")
    init_std: float = Field(default=1e-3, gt=0, description="std of the noise added to v0 for each cluster's start")


def perturbed(init: AdapterWeights, std: float, seed: int) -> AdapterWeights:
    """v0 plus seeded Gaussian noise on every entry (keys in sorted order, so the draw is reproducible)."""
    gen = torch.Generator().manual_seed(seed)
    return {k: init[k] + std * torch.randn(init[k].shape, generator=gen) for k in sorted(init)}


class IFCA(Method):
    name = "ifca"
    Params = IFCAParams

    def __init__(self, params, fed):
        super().__init__(params, fed)
        if params.n_clusters > len(fed.clients):
            # Every round each client tries every cluster on a batch: more clusters than clients is work
            # for clusters that can never all be filled.
            raise TaskfedError(f"method.n_clusters: {params.n_clusters} clusters need at least as many clients, "
                               f"but the run has {len(fed.clients)}.")
        self.clusters: list[AdapterWeights] = [
            perturbed(fed.init_adapter, params.init_std, zlib.crc32(f"{fed.seed}/ifca/{j}".encode()))
            for j in range(params.n_clusters)]
        self.membership: dict[str, int] = {}  # client -> the cluster it picked last
        self.history: list[dict[str, int]] = []  # per round: client -> pick (for the report)

    # ---------------------------------------------------------------- server
    def plan(self, round_idx: int, clients: list[str]) -> list[Job]:
        # `init` is ignored when candidates are given: the engine starts from the lowest-loss candidate.
        return [Job(client=c, adapter="cluster", init=self.clusters[0], candidates=list(self.clusters)) for c in clients]

    def aggregate(self, round_idx: int, results) -> None:
        # Streaming, in plan order (sorted by client): each upload joins the running mean of the cluster
        # it picked.
        means: dict[int, RunningMean] = {}
        picks: dict[str, int] = {}
        for r in results:
            g = picks[r.job.client] = int(r.chosen)
            means.setdefault(g, RunningMean(f"cluster/{g}")).add(r.weights, r.n_client)
        for g, mean in means.items():  # a cluster nobody picked keeps its weights
            self.clusters[g] = mean.mean()
        self.membership.update(picks)
        self.history.append(dict(sorted(picks.items())))

    def server_adapters(self) -> dict[str, AdapterWeights]:
        return {f"cluster/{g}": w for g, w in enumerate(self.clusters)}

    def downlink(self, client_id: str) -> Downlink:
        """Every cluster adapter, and the cluster the client picked last (if it ever trained)."""
        sent = Downlink(adapters=self.server_adapters())
        if client_id in self.membership:
            sent.arrays["picked"] = np.array([self.membership[client_id]], dtype=np.int64)
        return sent

    # ---------------------------------------------------------------- client
    def pick(self, client: Client, rt, clusters: list[AdapterWeights]) -> int:
        """IFCA's rule on the client: the cluster with the lowest loss on a seeded batch of its rows."""
        rows = [rt.encode(r) for r in client.records]
        probe = [rows[i] for i in sample_order(len(rows), rt.cfg.train.batch,
                                               zlib.crc32(f"{self.fed.seed}/ifca-eval/{client.id}".encode()))]
        return int(np.argmin(adapter_losses(rt, clusters, probe)))

    def route(self, client: Client, records, names: list[str], rt, sent: Downlink) -> RowMix:
        if "picked" in sent.arrays:
            g = int(sent.arrays["picked"][0])
        else:  # never sampled for training: the client picks by loss itself
            g = self.pick(client, rt, [sent.adapters[f"cluster/{j}"] for j in range(len(sent.adapters))])
        return RowMix.one_hot([names.index(f"cluster/{g}")] * len(records))

    def eval_report(self, mode: str, routed) -> dict[str, Any]:
        sizes = [0] * self.params.n_clusters
        for g in self.membership.values():
            sizes[g] += 1
        return {"membership": dict(sorted(self.membership.items())), "cluster_sizes": sizes,
                "membership_per_round": [dict(sorted(h.items())) for h in self.history]}
