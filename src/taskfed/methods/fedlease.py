"""FedLEASE (Wang, Bian, Zhang & Xu, NeurIPS 2025; methods.md, "FedLEASE"; code lei-wang-link/FedLEASE).

1. Warm-up, rounds 0..E_w-1 (`warmup`, default 5): each client trains one LoRA on its own data, continuing
   from its own state (its store; the run's init before its first job). Nothing is averaged and nothing
   travels, but in the last warm-up round, where every client trains (the clustering needs each one), each
   uploads its LoRA: B_i only under `lease_init = "own"` (P_B up, what the clustering reads), the whole
   LoRA A_i, B_i under the default `"mean"` (P up: the cluster mean of LoRAs needs the A's too).
2. Clustering, once, after the last warm-up round (`b_distances`, `lease_clusters`): d(i, j) = mean over
   layers of (1 - cos(vec B_i^l, vec B_j^l)) per target projection, averaged over projections (utils.py,
   calculate_B_similarity_matrix); agglomerative clustering (precomputed, average linkage) for
   K = 2..min(`k_max`, M - 1), K by the highest silhouette (the code ignores Davies-Bouldin too); labels
   numbered by first appearance over the clients in sorted order. K and the labels stay fixed; one expert
   per cluster. A client whose warm-up upload was refused joins the largest cluster (ties: the lower index).
3. Expert init: `"mean"`: expert g = the uniform mean of its members' warm-up LoRAs, tensor by tensor (what
   the code computes, then discards); `"own"` (the code): in the first clustered round each client puts its
   own warm-up LoRA in its cluster's slot (a LocalRef), the other experts fresh (the run's init, B = 0: they
   add nothing and are never sent). The routers start at zero (a uniform softmax).
4. Clustered rounds: client i's job trains its own expert g(i) (term 0) with the K - 1 others frozen (terms
   1.., in expert order) and its cluster's router, sent down with the job: per target module (2K-1) x d_in,
   no bias; logits 0..K-1 weigh experts 0..K-1, logits K..2K-2 all alias the own expert; top K kept and
   renormalised (the bank's GateMix), so by pigeonhole the own expert is always active. Plain task loss.
   Upload: the own expert (P) and the trained router (R_K = (2K-1) sum d_in), the router as the job's extra.
5. Server: expert g <- the uniform mean of its cluster's uploads this round, router g <- the uniform mean of
   their routers (an expert or router with no participant keeps its weights). Travel per clustered round:
   K*P + R_K down (own expert, the K - 1 others, the router), P + R_K up.
6. Evaluation, every mode (local = own tasks, the code's protocol; global, unseen): client i's model is all K
   experts and its cluster's router, routed per token and per layer as in 4; a cluster's members hold one
   model. `taskfed serve` loads the same: router kind "gate" over "expert/0..K-1", the gate being client c's
   array "router" (its cluster's router as evaluated).
"""


from __future__ import annotations

from collections import defaultdict
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from sklearn.cluster import AgglomerativeClustering
from sklearn.metrics import silhouette_score

from taskfed.clustering import canonical, cosine_similarity
from taskfed.errors import TaskfedError
from taskfed.methods.base import (PARTS, Client, Correction, Downlink, Gating, Job, JobRun, LocalRef, Method, Result,
                                  RunningMean, group_means)
from taskfed.methods.fedalt import zero_gate
from taskfed.model.bank import AdapterWeights, RowMix
from taskfed.model.parts import part_of, split_gate
from taskfed.routing import RouterState

OWN = "fedlease_own"  # the client's warm-up LoRA, in its store
FRESH = "fedlease_fresh"  # never stored: an expert nobody has trained (`own`'s first round) is the run's init
KEPT = "fedlease_router"  # the router the client last trained, in its store
ROUTER = "router"  # the router's name in a job's extra, an upload's extra and the client's array file
CLUSTER = "cluster"  # the client's cluster in its evaluation downlink
EXPERT = "expert/"


class FedLEASEParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    warmup: int = Field(default=5, ge=1, description="E_w: rounds (from 0) in which each client trains its own LoRA")
    k_max: int = Field(default=4, ge=2, description="the most experts (clusters) tried; at most clients - 1")
    lease_init: Literal["mean", "own"] = Field(default="mean", description="experts from the cluster mean of "
                                               "warm-up LoRAs, or each client's own warm-up LoRA (the code)")

    @field_validator("warmup")
    @classmethod
    def _before_the_last_round(cls, value: int, info: ValidationInfo) -> int:
        rounds, fit = (info.context or {}).get("rounds"), (info.context or {}).get("fit")
        if rounds is None or value < rounds:
            return value
        if fit and rounds >= 2:  # --smoke's minimal budget: its last round is the one clustered round
            return rounds - 1
        raise ValueError(f"{value} warm-up rounds leave none of train.rounds = {rounds} to the experts and their "
                         f"routers; give fewer warm-up rounds than train.rounds (and train.rounds >= 2)")


def projection_of(key: str) -> str:
    """The target projection a B key belongs to ("model.layers.3.self_attn.q_proj.lora_B" -> "q_proj")."""
    return key.rsplit(".", 2)[-2]


def b_distances(adapters: list[AdapterWeights]) -> np.ndarray:
    """FedLEASE's M x M distance of the clients' B matrices: per B key (one layer of one projection) 1 -
    cosine of the flattened matrices, averaged over the layers of each projection, then over projections."""
    by_projection: dict[str, list[str]] = defaultdict(list)
    for key in sorted(adapters[0]):
        if part_of(key) == "B":
            by_projection[projection_of(key)].append(key)
    per_projection = []
    for keys in by_projection.values():
        layers = [1.0 - cosine_similarity(np.stack([a[k].reshape(-1).double().numpy() for a in adapters]))
                  for k in keys]
        per_projection.append(np.mean(layers, axis=0))
    d = np.mean(per_projection, axis=0)
    np.fill_diagonal(d, 0.0)
    return np.clip(d, 0.0, None)  # rounding may leave -1e-16 off the diagonal of identical B's


def lease_clusters(distances: np.ndarray, k_max: int = 4) -> tuple[np.ndarray, dict[int, float]]:
    """Labels for the clients (canonical) and the silhouette score of each K tried: K = 2..min(k_max, M - 1),
    agglomerative with average linkage on the precomputed distances, the best silhouette kept (ties: the
    smaller K)."""
    d = np.asarray(distances, dtype=np.float64)
    top = min(k_max, len(d) - 1)
    if top < 2:
        raise ValueError(f"choosing K by silhouette needs at least 3 clients and K_max >= 2, got {len(d)} and {k_max}")
    scores, labels = {}, {}
    for k in range(2, top + 1):
        labels[k] = AgglomerativeClustering(n_clusters=k, metric="precomputed", linkage="average").fit(d).labels_
        scores[k] = float(silhouette_score(d, labels[k], metric="precomputed"))
    best = max(scores, key=lambda k: (scores[k], -k))
    return canonical(labels[best]), scores


def expert_name(g: int) -> str:
    return f"{EXPERT}{g}"


def lease_logits(own: int, k: int) -> list[int]:
    """The expert each of the router's 2K-1 logits weighs: logit e < K expert e, logits K..2K-2 the own one."""
    return list(range(k)) + [own] * (k - 1)


def lease_terms(own: int, k: int) -> tuple[int, ...]:
    """The same logits as a clustered job's terms (`Gating.terms`): the own expert is the trained term 0,
    expert e != own the job's frozen term at its place among the others, in expert order, from 1."""
    others = [e for e in range(k) if e != own]
    return tuple(0 if e == own else others.index(e) + 1 for e in lease_logits(own, k))


def router_of(sent: Downlink) -> AdapterWeights:
    """The cluster router in an evaluation downlink (its arrays: the gate's keys, and the client's cluster)."""
    return {k: torch.as_tensor(v) for k, v in sent.arrays.items() if part_of(k) == "gate"}


class FedLEASE(Method):
    name = "fedlease"
    Params = FedLEASEParams

    def __init__(self, params, fed):
        super().__init__(params, fed)
        if len(fed.clients) < 3:
            raise TaskfedError(f"scenario.n_clients: method 'fedlease' chooses K = 2..min(k_max, clients - 1) "
                               f"experts by silhouette, which needs at least 3 clients, got {len(fed.clients)}.")
        self.labels: dict[str, int] | None = None  # client -> its cluster (its expert), fixed once clustered
        self.silhouette: dict[int, float] = {}  # per K tried
        self.experts: list[AdapterWeights] = []
        self.routers: list[AdapterWeights] = []  # one per cluster, shared by its members
        self.clustered_at: int | None = None

    @property
    def k(self) -> int:
        return len(self.experts)

    # ---- server side
    def plan(self, round_idx: int, clients: list[str]) -> list[Job]:
        if round_idx >= self.params.warmup:
            return [self._expert_job(cid, round_idx) for cid in clients]
        last = round_idx == self.params.warmup - 1
        if last:
            clients = list(self.fed.clients)  # the clustering needs every client's B_i
        sends = PARTS if self.params.lease_init == "mean" else ("B",)
        return [Job(client=cid, adapter="local", init=LocalRef(OWN, self.fed.init_adapter), keep_as=OWN,
                    upload=last, sends=sends) for cid in clients]

    def _expert_job(self, cid: str, round_idx: int) -> Job:
        g = self.labels[cid]
        if self.params.lease_init == "own" and round_idx == self.params.warmup:
            own, others = LocalRef(OWN, self.fed.init_adapter), [LocalRef(FRESH, self.fed.init_adapter)] * (self.k - 1)
        else:
            own, others = self.experts[g], [w for e, w in enumerate(self.experts) if e != g]
        return Job(client=cid, adapter=expert_name(g), init=own, frozen=[(w, 1.0) for w in others],
                   extra={ROUTER: self.routers[g]})

    def aggregate(self, round_idx: int, results) -> None:
        if round_idx == self.params.warmup - 1:
            self._cluster(round_idx, list(results))  # the clustering needs every upload at once
        elif round_idx >= self.params.warmup:
            self._fold(results)
        # (an earlier warm-up round uploads nothing)

    def _cluster(self, round_idx: int, results: list[Result]) -> None:
        results = sorted(results, key=lambda r: r.job.client)  # not the order they arrived in
        if len(results) < 3:
            raise TaskfedError(f"method 'fedlease': the clustering needs the warm-up LoRAs of at least 3 clients, "
                               f"but {len(results)} of round {round_idx + 1}'s uploads were accepted.")
        labels, self.silhouette = lease_clusters(b_distances([r.weights for r in results]), self.params.k_max)
        self.labels = {r.job.client: int(g) for r, g in zip(results, labels)}
        k = int(labels.max()) + 1
        largest = max(range(k), key=lambda g: (int((labels == g).sum()), -g))
        self.labels = {cid: self.labels.get(cid, largest) for cid in self.fed.clients}
        self.experts = [self.fed.init_adapter] * k
        if self.params.lease_init == "mean":
            for g, mean in group_means(results, lambda r: self.labels[r.job.client], lambda r: 1.0).items():
                self.experts[g] = mean
        self.routers = [zero_gate(self.fed.init_adapter, 2 * k - 1) for _ in range(k)]
        self.clustered_at = round_idx

    def _fold(self, results) -> None:
        """Expert g and router g <- the uniform means of cluster g's uploads, folded in as they stream in."""
        experts: dict[int, RunningMean] = {}
        routers: dict[int, RunningMean] = {}
        for r in results:
            g = self.labels[r.job.client]
            experts.setdefault(g, RunningMean(expert_name(g))).add(r.weights)
            if ROUTER in r.extra:
                routers.setdefault(g, RunningMean(f"router/{g}")).add(r.extra[ROUTER])
        for g, mean in experts.items():
            self.experts[g] = mean.mean()
        for g, mean in routers.items():
            self.routers[g] = mean.mean()

    def server_adapters(self) -> dict[str, AdapterWeights]:
        return {expert_name(g): w for g, w in enumerate(self.experts)}

    def downlink(self, client_id: str) -> Downlink:
        """Every expert, the client's cluster router and which cluster that is."""
        g = self.labels[client_id]
        router = {k: v.numpy() for k, v in self.routers[g].items()}
        return Downlink(adapters=self.server_adapters(), arrays={CLUSTER: np.array([g]), **router})

    def router_state(self) -> RouterState:
        """As served (`auto@<client>`): client c's cluster router over the K experts, logits as in training."""
        if self.labels is None:
            return super().router_state()
        names = list(self.server_adapters())
        return RouterState("gate", adapters=names, params={"gate": ROUTER, "top_k": self.k, "models": {
            cid: {"adapters": names, "logits": lease_logits(self.labels[cid], self.k)} for cid in self.fed.clients}})

    def _members(self) -> dict[str, list[str]]:
        return {str(g): [c for c in self.fed.clients if self.labels[c] == g] for g in range(self.k)}

    def round_report(self, round_idx: int) -> dict[str, Any]:
        if round_idx != self.clustered_at:
            return {}
        return {"fedlease_k": self.k, "fedlease_silhouette": {str(k): s for k, s in self.silhouette.items()},
                "fedlease_cluster_sizes": [len(m) for m in self._members().values()]}

    def eval_report(self, mode: str, routed) -> dict[str, Any]:
        return {} if self.labels is None else {"fedlease_clusters": self._members()}

    # ---- client side
    def job_correction(self, client: Client, job: Job) -> Correction | None:
        if not job.adapter.startswith(EXPERT):  # a warm-up job: one plain LoRA
            return None
        own, k = int(job.adapter.removeprefix(EXPERT)), len(job.frozen) + 1
        return Correction(gating=Gating(job.extra[ROUTER], lease_terms(own, k), top_k=k))

    def job_done(self, client: Client, job: Job, run: JobRun) -> dict[str, AdapterWeights]:
        if not job.adapter.startswith(EXPERT):
            return {}
        _, client.store[KEPT] = split_gate(run.trained)
        return {ROUTER: client.store[KEPT]}

    def eval_gates(self, client: Client, sent: Downlink) -> list[AdapterWeights]:
        return [router_of(sent)]

    def route(self, client: Client, records, names: list[str], rt, sent: Downlink) -> RowMix:
        """Every row through its cluster's router: logit w onto the expert `lease_logits` names, top K."""
        k = sum(n.startswith(EXPERT) for n in names)
        slots = [names.index(expert_name(e)) for e in lease_logits(int(sent.arrays[CLUSTER][0]), k)]
        n = len(records)
        return RowMix(torch.tensor([slots] * n), torch.full((n, len(slots)), 1.0 / len(slots)),
                      gate=torch.zeros(n, dtype=torch.long), top_k=k, n=len(names))

    def client_arrays(self, client: Client, rt, sent: Downlink | None = None) -> dict[str, dict[str, torch.Tensor]]:
        """The router `taskfed serve` mixes with: the cluster's as the client was evaluated with it (the
        downlink, where the engine gives it), else the one the client last trained."""
        router = router_of(sent) if sent is not None else client.store.get(KEPT)
        return {} if router is None else {ROUTER: router}
