"""FedRouter (Talasso et al., 2604.00050): task-centric adapters from local and global clustering, and a
test-time router (methods.md, "FedRouter"). The official implementation (on Flower) is what this follows.

1. Local clustering (client, before round 0 = the official round 1): the client embeds all its training
   instructions (`Runtime.embed`, cached per text) and runs KMeans with `n_local` clusters: a cluster
   label per sample and local centroids, kept in the client's store for the whole run. Only the
   centroids travel, as an array.
2. Global clustering (server, once): KMeans with `n_global` clusters over all clients' local centroids
   (clients in sorted order) gives the global centroids G, fixed afterwards; each (client, local cluster)
   is bound to the nearest global centroid. Switch `global_clustering = "adapters"` (the paper's wording,
   "clusters similar adapters"): round 0 trains every local cluster from the initial adapter, the server
   runs KMeans over the flattened uploads (all A and B matrices, sorted key order) and binds each pair to
   its KMeans cluster; G is then the mean of the local centroids bound to each global cluster.
3. Training: each round, for the local cluster(s) scheduled (`schedule = "round_robin"`:
   k = round mod n_local, rounds counted from 0; `"all"`: every local cluster), the client starts from the
   adapter of the bound global cluster (the initial adapter before any aggregation), trains it on that
   cluster's samples and uploads it with its sample count.
4. Aggregation: per global cluster, the weighted mean of the adapters bound to it this round, weighted by
   the client's full sample count (`aggregation_weight = "client"`, the official code's `num_examples`) or
   by the local cluster's sample count (`"cluster"`); a global cluster with no member keeps its weights.
5. Router (client): a test input goes to the adapter of argmin_j ||embed(x) - G_j|| over all global
   clusters (`router = "global"`) or only over those bound to the client's own local clusters
   (`router = "local"`, the official launcher's `evaluation_mode = local`). The evaluation then generates
   greedily in batches, each row on the adapter its route picked (one-hot rows on the adapter bank).
6. Oracles (upper bounds): `fedrouter-oracle` replaces local KMeans by the true task labels (one local
   cluster per task the client holds, centroid = mean embedding of the task's rows); `router = "oracle"`
   sends each input to the adapter of the global cluster that holds most training rows of its true task.

Defaults: `n_local = 2` (the dual scenario's two tasks per client; the official launcher's 1 is its
single-scenario setting, see configs/fedrouter-single.toml), `n_global` = the number of seen tasks (the
launcher's 4 for its 4 tasks), `router = "global"` (the router that also serves the global evaluation
mode; the official launcher pairs the local evaluation data with the local router). KMeans: scikit-learn,
Euclidean, `random_state` = the run seed, `n_init` = 10 fixed (the official code uses n_init "auto" with
random_state 0); a centroid is the mean of its members' embeddings, the same rule for both methods.

Embedding depth (`embed_layers`, both methods): default None is methods.md's embed(x), the mean over
non-pad tokens of the base model's last hidden layer (a full forward per text). An int L is a cheaper
switch that is not in methods.md: the mean over non-pad tokens of the hidden state after the first L
decoder layers, with the model's final norm applied, computed by running only those L layers
(`Runtime.first_layers`), so the embedding costs about L / n_layers of a full forward. The final norm is
kept because (a) L = n_layers is then exactly the default embedding, and (b) the raw residual stream of
a Llama-style model has a few positions and channels of very large magnitude that would dominate an
unnormalised token mean and the Euclidean KMeans; RMSNorm rescales every token to the same RMS first.
Local clustering, the local centroids (hence the server's global clustering) and the router all go
through `FedRouter.embed`, so they use the same depth; `Runtime.embed` caches per (depth, text).

Privacy note (methods.md): local centroids of data embeddings leave the client, as float32 arrays; what
the server sends back for routing (global centroids, the client's bindings) is arrays too, never text.
Under `privacy.centroids` (taskfed/privacy.py) the embeddings are clipped to the public radius before local
clustering, the client uploads noisy per-cluster sums and counts instead, and the server's centroids are
their ratio; a local cluster whose noisy count is below the floor is left out of the global clustering
and bound by its clamped estimate. The router clips test embeddings with the same radius.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from taskfed import privacy
from taskfed.clustering import kmeans_adapters, kmeans_labels as kmeans, nearest
from taskfed.data.records import Record
from taskfed.errors import TaskfedError
from taskfed.methods.base import Client, Downlink, Job, Method, Result, Routed, check_centroids, group_means, label_rows
from taskfed.model.bank import AdapterWeights, RowMix
from taskfed.routing import RouterState

LABELS = "fedrouter_labels"  # client store: local cluster label per training row (int array)
CENTROIDS = "fedrouter_centroids"  # client store: local centroids (n_local x d)


class FedRouterOracleParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    n_global: int | None = Field(default=None, ge=1, description="global clusters; default: the number of seen tasks")
    schedule: Literal["round_robin", "all"] = "round_robin"
    global_clustering: Literal["centroids", "adapters"] = "centroids"
    aggregation_weight: Literal["client", "cluster"] = "client"
    router: Literal["global", "local", "oracle"] = "global"
    embed_layers: int | None = Field(
        default=None, ge=1, description="embed(x) from the first L decoder layers only (cheaper; not in "
        "methods.md); default: all layers, methods.md's embed(x)")


class FedRouterParams(FedRouterOracleParams):
    n_local: int = Field(default=2, ge=1, description="local KMeans clusters per client")


def member_means(x: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Row g: the mean of the rows labelled g; +inf where g has no member (never the nearest centroid)."""
    out = np.full((k, x.shape[1]), np.inf)
    for g in range(k):
        if (labels == g).any():
            out[g] = x[labels == g].mean(axis=0)
    return out


class FedRouter(Method):
    name = "fedrouter"
    Params = FedRouterParams

    def __init__(self, params, fed):
        super().__init__(params, fed)
        self.n_global = params.n_global or len(fed.tasks)
        # ---- server state
        self.adapters: list[AdapterWeights] = [fed.init_adapter] * self.n_global  # one per global cluster
        self.local_centroids: dict[str, np.ndarray] = {}  # uploaded by each client at setup
        self.centroids: np.ndarray | None = None  # G: n_global x d
        self.binding: dict[str, np.ndarray] | None = None  # client -> global cluster of each local cluster
        self.task_counts: dict[str, np.ndarray] = {}  # oracle router only: rows per (local cluster, task)
        self.empty: dict[str, np.ndarray] = {}  # privacy.centroids: local clusters whose noisy count is too low

    # ================================================================== 1. local clustering (client)
    def local_labels(self, client: Client, emb: np.ndarray) -> np.ndarray:
        """A local cluster label per training row: KMeans over the rows' embeddings."""
        k = self.params.n_local
        if len(client.records) < k:
            raise TaskfedError(f"method.n_local: client {client.id} has {len(client.records)} training rows, "
                               f"fewer than n_local = {k}.")
        return kmeans(emb, k, self.fed.seed)

    def embed(self, rt, texts: list[str]) -> np.ndarray:
        """embed(x) of each text at the configured depth: the one embedding behind local clustering (and so
        the local and global centroids) and the router, so all three always agree."""
        layers = self.params.embed_layers  # None: methods.md's embed(x)
        if layers is not None and layers > rt.n_layers:
            raise TaskfedError(f"method.embed_layers: {layers} is more than the model's {rt.n_layers} decoder "
                               f"layers (use 1..{rt.n_layers}, or leave it unset for all of them).")
        # Under privacy.centroids every embedding is clipped to the public radius first, so local clustering,
        # the released centroids and the router all work in the same (clipped) space.
        return privacy.clip_embeddings(rt.embed(texts, layers=layers).double().numpy(), privacy.of(rt))

    def setup_client(self, client: Client, rt) -> dict[str, np.ndarray]:
        emb = self.embed(rt, [r.instruction for r in client.records])
        labels = self.local_labels(client, emb)
        n_local = int(labels.max()) + 1
        empty = [k for k in range(n_local) if not (labels == k).any()]
        if empty:  # only when the client has fewer distinct instructions than n_local
            raise TaskfedError(f"method.n_local: client {client.id} has fewer distinct training instructions "
                               f"than n_local = {n_local} (local cluster {empty[0]} is empty).")
        centroids = member_means(emb, labels, n_local)
        client.store[LABELS] = labels
        client.store[CENTROIDS] = centroids
        if privacy.centroids_on(privacy.of(rt)):  # noisy per-cluster sums and counts instead (taskfed/privacy.py)
            upload = privacy.release_centroids(emb, labels, n_local, rt.cfg, client.id, "fedrouter")
        else:
            upload = {"centroids": centroids.astype(np.float32)}
        if self.params.router == "oracle":
            # Oracle-only information (an upper bound, never part of FedRouter): how many rows of each
            # seen task every local cluster holds, so the server knows each task's majority cluster.
            upload["task_counts"] = self.label_task_counts(client, labels, n_local)
        return upload

    def label_task_counts(self, client: Client, labels: np.ndarray, n_local: int) -> np.ndarray:
        """Rows per (local cluster, seen task in fed.tasks order)."""
        column = {t: j for j, t in enumerate(self.fed.tasks)}
        counts = np.zeros((n_local, len(self.fed.tasks)), dtype=np.int64)
        for r, k in zip(client.records, labels):
            if r.task in column:
                counts[int(k), column[r.task]] += 1
        return counts

    # ================================================================== 2. global clustering (server)
    def check_setup(self, uploads: dict[str, dict[str, np.ndarray]]) -> dict[str, str]:
        most = len(self.fed.tasks) if self.name == "fedrouter-oracle" else self.params.n_local
        bad = check_centroids(uploads, most)
        for c, up in uploads.items():
            counts = up.get("task_counts")
            if c not in bad and self.params.router == "oracle" and (
                    counts is None or counts.shape != (len(up["centroids"]), len(self.fed.tasks))
                    or counts.dtype.kind not in "iu" or (counts < 0).any()):
                bad[c] = "oracle task counts missing or of the wrong shape"
        return bad

    def setup_server(self, uploads: dict[str, dict[str, np.ndarray]]) -> None:
        self.local_centroids = {c: np.asarray(uploads[c]["centroids"], dtype=np.float64) for c in sorted(uploads)}
        self.task_counts = {c: np.asarray(uploads[c]["task_counts"]) for c in sorted(uploads) if "task_counts" in uploads[c]}
        # Private centroids whose noisy count fell below the floor are empty: left out of the global
        # clustering (their (client, local cluster) is still bound, by its clamped estimate).
        self.empty = {c: np.asarray(uploads[c].get("empty", np.zeros(len(C), dtype=bool))) for c, C in self.local_centroids.items()}
        stacked = np.concatenate(list(self.local_centroids.values()))
        stacked = stacked[~np.concatenate(list(self.empty.values()))]
        if len(stacked) < self.n_global:
            raise TaskfedError(f"method.n_global: {self.n_global} global clusters need at least as many local "
                               f"clusters, but the clients hold {len(stacked)} (not empty) in all.")
        if self.params.global_clustering == "centroids":
            labels = kmeans(stacked, self.n_global, self.fed.seed)
            self.centroids = member_means(stacked, labels, self.n_global)
            self.binding = {c: nearest(C, self.centroids) for c, C in self.local_centroids.items()}
        # "adapters": the binding waits for round 0's uploads (see aggregate)

    def bind_by_adapters(self, results: list[Result]) -> None:
        """Global clustering over the adapters trained in round 0 (one per (client, local cluster))."""
        if len(results) < self.n_global:
            raise TaskfedError(f"method.n_global: {self.n_global} global clusters need at least as many "
                               f"adapters in round 0, but {len(results)} were trained.")
        labels = kmeans_adapters([r.weights for r in results], self.n_global, self.fed.seed)
        pairs = [(r.job.client, local_index(r.job)) for r in results]
        points = np.stack([self.local_centroids[c][k] for c, k in pairs])
        full = np.array([not self.empty[c][k] for c, k in pairs], dtype=bool)
        self.centroids = member_means(points[full], labels[full], self.n_global)
        # Pairs not trained in round 0 (clients not sampled) are bound to the nearest of these centroids.
        self.binding = {c: nearest(C, self.centroids) for c, C in self.local_centroids.items()}
        for (c, k), g in zip(pairs, labels):
            self.binding[c][k] = g

    # ================================================================== 3. training (server plans)
    def scheduled(self, round_idx: int, client: str) -> list[int]:
        n_local = len(self.local_centroids[client])
        if self.binding is None or self.params.schedule == "all":  # round 0 of adapter clustering: all
            return list(range(n_local))
        return [round_idx % n_local]

    def plan(self, round_idx: int, clients: list[str]) -> list[Job]:
        jobs = []
        for c in clients:
            for k in self.scheduled(round_idx, c):
                if self.binding is None:
                    jobs.append(Job(client=c, adapter=f"local/{k}", init=self.fed.init_adapter, rows=label_rows(LABELS, k)))
                else:
                    g = int(self.binding[c][k])
                    jobs.append(Job(client=c, adapter=f"cluster/{g}/local/{k}", init=self.adapters[g],
                                    rows=label_rows(LABELS, k)))
        return jobs

    # ================================================================== 4. aggregation (server)
    def aggregate(self, round_idx: int, results) -> None:
        if self.binding is None:
            # Global clustering over adapters binds on round 0's uploads, all at once; sorted by (client,
            # local cluster) so that it does not depend on the order results arrive in.
            results = sorted(results, key=lambda r: (r.job.client, local_index(r.job)))
            self.bind_by_adapters(results)
        # Streaming, in plan order (sorted by client, local cluster): each upload joins the running mean of
        # the global cluster its (client, local cluster) is bound to; only bound adapters reach a cluster.
        by_client = self.params.aggregation_weight == "client"
        means = group_means(results, lambda r: int(self.binding[r.job.client][local_index(r.job)]),
                            lambda r: r.n_client if by_client else r.n_rows)
        for g, mean in means.items():  # a cluster with no member this round keeps its weights
            self.adapters[g] = mean

    def server_adapters(self) -> dict[str, AdapterWeights]:
        return {f"cluster/{g}": w for g, w in enumerate(self.adapters)}

    # ================================================================== 5. router (client)
    def router_state(self) -> RouterState:
        """The router as served: the global centroids G, each bound to its cluster's adapter, at the run's
        embedding depth; under `router = "local"` each client's allowed clusters (its bindings). The oracle
        router needs true labels, which a served input does not have: it serves the nearest centroid."""
        clients = ({c: sorted(int(g) for g in np.unique(b)) for c, b in self.binding.items()}
                   if self.params.router == "local" else {})
        return RouterState("nearest", adapters=[f"cluster/{g}" for g in range(self.n_global)],
                           centroids=self.centroids, embed_layers=self.params.embed_layers, clients=clients)

    def downlink(self, client_id: str) -> Downlink:
        """What the server sends a client for evaluation: every global cluster's adapter, and as arrays the
        global centroids, the global cluster bound to each of the client's local clusters, and (oracle
        router only) each seen task's majority global cluster (-1 where no training row of it is bound)."""
        sent = Downlink(adapters=self.server_adapters(),
                        arrays={"centroids": self.centroids, "bound": np.asarray(self.binding[client_id])})
        if self.params.router == "oracle":
            makeup = np.zeros((self.n_global, len(self.fed.tasks)), dtype=np.int64)
            for c, counts in self.task_counts.items():
                for k, row in enumerate(counts):
                    makeup[int(self.binding[c][k])] += row
            sent.arrays["task_cluster"] = majority(makeup)
        return sent

    def route(self, client: Client, records: list[Record], names: list[str], rt, sent: Downlink) -> RowMix:
        centroids = sent.arrays["centroids"]
        emb = self.embed(rt, [r.instruction for r in records])
        if self.params.router == "local":
            allowed = np.unique(sent.arrays["bound"])
        else:
            allowed = np.arange(len(centroids))
        chosen = allowed[nearest(emb, centroids[allowed])] if len(records) else np.zeros(0, dtype=int)
        if self.params.router == "oracle":
            # The input's true task is read here: that is what makes it an oracle. Tasks with no
            # training rows (unseen) have no majority cluster and keep the nearest centroid.
            column = {t: j for j, t in enumerate(self.fed.tasks)}
            for i, r in enumerate(records):
                g = sent.arrays["task_cluster"][column[r.task]] if r.task in column else -1
                if g >= 0:
                    chosen[i] = g
        slot = {f"cluster/{g}": names.index(f"cluster/{g}") for g in range(len(centroids))}
        return RowMix.one_hot([slot[f"cluster/{int(g)}"] for g in chosen])

    # ================================================================== reporting
    def eval_facts(self, client: Client) -> dict[str, np.ndarray]:
        """Rows of each seen task per local cluster (evaluation bookkeeping: the global clusters' make-up)."""
        labels = np.asarray(client.store[LABELS])
        return {"label_task_counts": self.label_task_counts(client, labels, len(client.store[CENTROIDS]))}

    def check_report(self, rep: Routed) -> str | None:
        counts = rep.facts.get("label_task_counts")
        want = (len(self.binding.get(rep.client, [])), len(self.fed.tasks))
        if counts is None or counts.shape != want or counts.dtype.kind not in "iu" or (counts < 0).any():
            return f"label_task_counts must be {want[0]} x {want[1]} non-negative integers"
        if any(not (n.startswith("cluster/") and n[8:].isdigit() and int(n[8:]) < self.n_global) for n in rep.picked()):
            return "a row was routed to an adapter that is not a global cluster"
        return None

    def eval_report(self, mode: str, routed: list[Routed]) -> dict[str, Any]:
        """router_accuracy (share of inputs sent to their true task's majority cluster), the confusion of
        true task x chosen global cluster, the task make-up of each global cluster, and the binding.

        Evaluation bookkeeping, not part of the method: the make-up is counted from the evaluated clients'
        reported rows per (local cluster, task) (the training rows each global cluster is trained on)."""
        tasks = list(self.fed.tasks)
        makeup = np.zeros((self.n_global, len(tasks)), dtype=np.int64)
        reported = {rep.client: rep.facts["label_task_counts"] for rep in routed}
        for cid in sorted(reported):
            for k, row in enumerate(reported[cid]):
                makeup[int(self.binding[cid][k])] += row
        task_cluster = dict(zip(tasks, majority(makeup)))
        confusion: dict[str, list[int]] = {}
        hits = total = 0
        for rep in routed:
            picked = [int(name.split("/")[1]) for name in rep.picked()]
            for task, g in zip(rep.tasks, picked):
                confusion.setdefault(task, [0] * self.n_global)[g] += 1
                if task_cluster.get(task, -1) >= 0:
                    total += 1
                    hits += int(g == task_cluster[task])
        return {
            "router": self.params.router,
            "router_accuracy": hits / total if total else None,
            "router_confusion": {t: confusion[t] for t in sorted(confusion)},
            "cluster_makeup": {str(g): {t: int(makeup[g, j]) for j, t in enumerate(tasks)} for g in range(self.n_global)},
            "binding": {cid: [int(g) for g in self.binding[cid]] for cid in sorted(self.binding)},
        }


class FedRouterOracle(FedRouter):
    """Oracle of step 6: the true task labels replace local KMeans (one local cluster per client task)."""

    name = "fedrouter-oracle"
    Params = FedRouterOracleParams

    def local_labels(self, client: Client, emb: np.ndarray) -> np.ndarray:
        index = {t: k for k, t in enumerate(client.tasks)}
        return np.array([index[r.task] for r in client.records], dtype=np.int64)


def local_index(job: Job) -> int:
    """The local cluster a job trains: its adapter name ends in `local/<k>`."""
    return int(job.adapter.rsplit("/", 1)[1])


def majority(makeup: np.ndarray) -> np.ndarray:
    """Per task (column), the global cluster holding most of its rows; -1 for a task with no row."""
    return np.where(makeup.sum(axis=0) > 0, makeup.argmax(axis=0), -1)
