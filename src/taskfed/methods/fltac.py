"""FL-TAC (Ping et al., 2404.15384): one adapter per (client, task), clustered by the server every round
(methods.md, "FL-TAC").

Client: knows its task labels and keeps one adapter per local task, all starting from the shared v0.
Before round 0 it numbers its tasks 0..n-1 (an opaque local index: the server never learns which task an
adapter is for), keeps that index per training row in its store, and uploads, per local task, the mean
embedding (`Runtime.embed`) of the task's training rows: the routing centroids of the extension below.
Each round a participating client trains each of its task adapters for `steps` on that task's rows
(starting from the adapter the server last sent back for it) and uploads all of them.

Server: gets the uploads without task labels, each under an opaque id (client, local index). It
flattens every adapter (all A and B matrices, sorted key order), runs KMeans with K = the number of
tasks (fewer when fewer adapters arrived), from scratch every round (scikit-learn, fixed seed and
restarts; `taskfed.clustering` explains why it runs on exact isometric coordinates), and replaces every
member with its cluster mean: unweighted (the paper, default) or weighted by the member's sample count
(`weighted = true`, the official code). Each id gets its cluster's mean back next round.

Evaluation: an input of a task the client holds uses that task's adapter (the label is known there). An
input without a usable label (global mode on a task the client does not hold, unseen tasks, or every
input with `known_tasks = "router"`) goes through FedRouter's nearest-centroid router over the final
task adapters: after the last round there are K distinct adapters (the cluster means); cluster g's
centroid G_g is the mean of the data centroids of its members (as FedRouter builds G under its
`global_clustering = "adapters"` switch); the input goes to the adapter of argmin_g ||embed(x) - G_g||.
The paper has no router: this is the extension methods.md asks for.

Bookkeeping (evaluation only, not part of the method): the server records its own cluster labels of every
round; at evaluation the clients' true task of each id is joined in to give the clustering accuracy
(Hungarian matching) of every round, `eval[mode]["clustering_accuracy_per_round"]`, plus the router's
accuracy on the rows it routed and the task make-up of the final clusters.

Privacy note: per-task centroids of data embeddings leave the client (as FedRouter's local centroids do),
as float32 arrays; nothing else but adapters travels. Under `privacy.centroids` (taskfed/privacy.py) they
are noisy per-task sums and counts of clipped embeddings; an id whose noisy count is below the floor gives
no routing centroid (its cluster's centroid is the mean of the others').
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from taskfed import privacy
from taskfed.clustering import cluster_means, clustering_accuracy, kmeans_adapters, nearest
from taskfed.data.records import Record
from taskfed.errors import TaskfedError
from taskfed.methods.base import Client, Downlink, Job, Method, Result, Routed, check_centroids, label_rows
from taskfed.model.bank import AdapterWeights, RowMix
from taskfed.routing import RouterState

TASKS = "fltac_tasks"  # client store: the client's task names; position = the opaque local index
INDEX = "fltac_task_index"  # client store: local task index of each training row (int array)


class FLTACParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    weighted: bool = Field(default=False, description="cluster mean weighted by sample count (official code); "
                                                      "default unweighted (paper)")
    known_tasks: Literal["adapter", "router"] = Field(
        default="adapter", description="an input of a task the client holds: that task's adapter, or the router")


def upload_id(job: Job) -> tuple[str, int]:
    """The opaque id of an upload: (client, local index), from the job's name `adapter/<k>`."""
    return job.client, int(job.adapter.rsplit("/", 1)[1])


class FLTAC(Method):
    name = "fltac"
    Params = FLTACParams

    def __init__(self, params, fed):
        super().__init__(params, fed)
        self.k = len(fed.tasks)  # K = the number of tasks
        # ---- server state
        self.n_adapters: dict[str, int] = {}  # adapters per client (from the number of uploaded centroids)
        self.data_centroids: dict[tuple[str, int], np.ndarray] = {}  # per id: mean embedding of its rows
        self.adapters: dict[tuple[str, int], AdapterWeights] = {}  # per id: what the client gets next
        self.cluster_adapters: list[AdapterWeights] = []  # the last round's K cluster means
        self.router_centroids: np.ndarray | None = None  # the last round's cluster centroids (K x d)
        self.history: list[dict[str, Any]] = []  # per round: ids and their cluster labels (bookkeeping)
        self.no_centroid: set[tuple[str, int]] = set()  # privacy.centroids: ids whose noisy count is too low

    # ================================================================== client: tasks and centroids
    def setup_client(self, client: Client, rt) -> dict[str, np.ndarray]:
        tasks = client.tasks
        position = {t: k for k, t in enumerate(tasks)}
        index = np.array([position[r.task] for r in client.records], dtype=np.int64)
        client.store[TASKS] = tasks
        client.store[INDEX] = index
        emb = privacy.clip_embeddings(rt.embed([r.instruction for r in client.records]).double().numpy(), privacy.of(rt))
        if privacy.centroids_on(privacy.of(rt)):  # noisy per-task sums and counts instead (taskfed/privacy.py)
            return privacy.release_centroids(emb, index, len(tasks), rt.cfg, client.id, "fltac")
        centroids = np.stack([emb[index == k].mean(axis=0) for k in range(len(tasks))])
        return {"centroids": centroids.astype(np.float32)}

    # ================================================================== server
    def check_setup(self, uploads: dict[str, dict[str, np.ndarray]]) -> dict[str, str]:
        return check_centroids(uploads, len(self.fed.tasks))

    def setup_server(self, uploads: dict[str, dict[str, np.ndarray]]) -> None:
        for c in sorted(uploads):
            centroids = np.asarray(uploads[c]["centroids"], dtype=np.float64)
            self.n_adapters[c] = len(centroids)
            empty = uploads[c].get("empty", np.zeros(len(centroids), dtype=bool))
            for k, vec in enumerate(centroids):
                self.data_centroids[(c, k)] = vec
                if empty[k]:  # privacy.centroids: a noisy count below the floor; no routing centroid
                    self.no_centroid.add((c, k))
                self.adapters[(c, k)] = self.fed.init_adapter  # every task adapter starts from v0

    def plan(self, round_idx: int, clients: list[str]) -> list[Job]:
        missing = [c for c in clients if c not in self.n_adapters]
        if missing:
            raise TaskfedError(f"fltac: client {missing[0]} sent no task centroids at setup.")
        # One job per (client, local task): that task's rows, from that id's adapter, uploaded.
        return [Job(client=c, adapter=f"adapter/{k}", init=self.adapters[(c, k)], rows=label_rows(INDEX, k))
                for c in clients for k in range(self.n_adapters[c])]

    def aggregate(self, round_idx: int, results: list[Result]) -> None:
        # Sorted by id so that KMeans and the float sums do not depend on the order results arrive in.
        uploads = sorted(results, key=lambda r: upload_id(r.job))
        if not uploads:
            return
        ids = [upload_id(r.job) for r in uploads]
        weights = [r.weights for r in uploads]
        labels = kmeans_adapters(weights, min(self.k, len(uploads)), self.fed.seed)
        means = cluster_means(weights, labels, [r.n_rows for r in uploads] if self.params.weighted else None)
        for i, g in zip(ids, labels):
            self.adapters[i] = means[int(g)]
        groups = sorted(means)
        self.cluster_adapters = [means[g] for g in groups]
        self.router_centroids = np.stack([self.router_centroid([i for i, lab in zip(ids, labels) if lab == g])
                                          for g in groups])
        self.history.append({"round": round_idx, "ids": ids, "labels": [int(g) for g in labels]})

    def router_centroid(self, members: list[tuple[str, int]]) -> np.ndarray:
        """The mean of the members' data centroids, those reported empty left out (unless all are)."""
        full = [i for i in members if i not in self.no_centroid] or members
        return np.mean([self.data_centroids[i] for i in full], axis=0)

    def server_adapters(self) -> dict[str, AdapterWeights]:
        return {f"cluster/{g}": w for g, w in enumerate(self.cluster_adapters)}

    def router_state(self) -> RouterState:
        """The router as served: an input without a task label goes to the nearest final cluster centroid."""
        if self.router_centroids is None:  # no round of clustering yet: the default, no router
            return super().router_state()
        return RouterState("nearest", adapters=[f"cluster/{g}" for g in range(len(self.cluster_adapters))],
                           centroids=self.router_centroids)

    def downlink(self, client_id: str) -> Downlink:
        """The client's own task adapters (as clustered last) and, for its router, the final K cluster
        adapters with their centroids."""
        own = {f"task/{k}": self.adapters[(client_id, k)] for k in range(self.n_adapters.get(client_id, 0))}
        sent = Downlink(adapters=own | self.server_adapters())
        if self.router_centroids is not None:
            sent.arrays["centroids"] = self.router_centroids
        return sent

    # ================================================================== client: evaluation
    def route(self, client: Client, records: list[Record], names: list[str], rt, sent: Downlink) -> RowMix:
        own = {t: k for k, t in enumerate(client.store.get(TASKS, []))} if self.params.known_tasks == "adapter" else {}
        slots: list[int | None] = [names.index(f"task/{own[r.task]}") if r.task in own else None for r in records]
        rest = [i for i, s in enumerate(slots) if s is None]
        if rest:
            if "centroids" not in sent.arrays:
                raise TaskfedError("fltac: the router needs at least one round of clustering.")
            emb = privacy.clip_embeddings(rt.embed([records[i].instruction for i in rest]).double().numpy(), privacy.of(rt))
            for i, g in zip(rest, nearest(emb, sent.arrays["centroids"])):
                slots[i] = names.index(f"cluster/{int(g)}")
        return RowMix.one_hot(slots)

    def eval_facts(self, client: Client) -> dict[str, np.ndarray]:
        """The true task of each local index, as a position in the federation's tasks (-1: not a seen task):
        the bookkeeping's ground truth for the server's clusters (evaluation only)."""
        column = {t: j for j, t in enumerate(self.fed.tasks)}
        return {"task_of_index": np.array([column.get(t, -1) for t in client.store.get(TASKS, [])], dtype=np.int64)}

    # ================================================================== bookkeeping
    def round_accuracy(self, truth: dict[tuple[str, int], str], round_pos: int = -1) -> float | None:
        """Hungarian-matched agreement of a round's clusters with the true tasks of the ids in `truth`."""
        rec = self.history[round_pos]
        pairs = [(g, truth[i]) for i, g in zip(rec["ids"], rec["labels"]) if i in truth]
        return clustering_accuracy(*zip(*pairs)) if pairs else None

    def check_report(self, rep: Routed) -> str | None:
        truth = rep.facts.get("task_of_index")
        n = self.n_adapters.get(rep.client, 0)
        if truth is None or truth.shape != (n,) or truth.dtype.kind not in "iu" or (truth >= len(self.fed.tasks)).any():
            return f"task_of_index must be {n} task positions"
        return None

    def eval_report(self, mode: str, routed: list[Routed]) -> dict[str, Any]:
        """Per-round clustering accuracy, the final clusters' task make-up, and the router's accuracy (share of
        router-routed rows sent to the final cluster holding most adapters of the row's true task). The true
        tasks of the ids come from the evaluated clients' reports (evaluation only)."""
        truth = {(rep.client, k): self.fed.tasks[int(j)] for rep in routed
                 for k, j in enumerate(rep.facts["task_of_index"]) if j >= 0}
        per_round = [self.round_accuracy(truth, i) for i in range(len(self.history))]
        out: dict[str, Any] = {"clustering_accuracy_per_round": per_round,
                               "clustering_accuracy": per_round[-1] if per_round else None}
        if not self.history:
            return out
        last = self.history[-1]
        makeup: dict[int, dict[str, int]] = {g: {} for g in range(len(self.cluster_adapters))}
        for i, g in zip(last["ids"], last["labels"]):
            if i in truth:
                makeup[g][truth[i]] = makeup[g].get(truth[i], 0) + 1
        home = {}  # task -> the final cluster holding most of its adapters
        for task in sorted({t for m in makeup.values() for t in m}):
            home[task] = max(makeup, key=lambda g: (makeup[g].get(task, 0), -g))
        hits = total = routed_rows = 0
        for rep in routed:
            for task, name in zip(rep.tasks, rep.picked()):
                if not name.startswith("cluster/"):
                    continue
                routed_rows += 1
                if task in home:
                    total += 1
                    hits += int(int(name.split("/")[1]) == home[task])
        out.update({"router_rows": routed_rows, "router_accuracy": hits / total if total else None,
                    "cluster_makeup": {str(g): dict(sorted(m.items())) for g, m in makeup.items()}})
        return out
