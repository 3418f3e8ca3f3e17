"""Differential privacy for what clients share (config `[privacy]`): the one place of the mechanics.

Two mechanisms, each off unless its table is given (off: every result is bit for bit what it was without
this module):

`privacy.centroids` -- record-level DP of the centroids a client uploads at setup (FedRouter's local
centroids, FL-TAC's task centroids). On the client: every embedding is L2-clipped to radius `clip` (the
method clusters, and later routes, on the clipped embeddings, so a radius above every embedding's norm
changes nothing); per cluster the sum of its clipped embeddings and its row count are released with
Gaussian noise. Adjacency: add or remove one training row. A row lies in one cluster, so it moves one
cluster's sum by at most `clip` and its count by 1: the vector (sums, clip x counts) has L2 sensitivity
sqrt(2) x clip, and noise of std z x sqrt(2) x clip on each sum entry and z x sqrt(2) on each count is the
Gaussian mechanism with noise multiplier z. The server takes centroid = sum / count and treats a noisy count
below `min_count` (default 2 x the count's noise std, at least 1) as an empty cluster. The client's KMeans
labels stay on the client, exact. Caveat: FedRouter's partition is itself a function of all the client's
rows (KMeans); the guarantee is that of the release given the partition (FL-TAC's partition, by task
label, moves only with the removed row itself).

`privacy.updates` -- client-level DP of the adapter uploads (adjacency: add or remove one client). On the
client (InProcessEngine's result path, so on Flower nodes too): an upload's change from the weights the
job started from is clipped to L2 norm `clip`. On the server: while the method aggregates, every running
mean (`RunningMean`, and so `group_means`, `weighted_mean`, `cluster_means`) weighs each contributor 1 (the
methods' sample-count weights would give a large client more than `clip` of the sum: DP-FedAvg's uniform
mean instead) and adds Gaussian noise of std z x clip to each aggregate's sum before dividing by its
number of contributors (treated as public, as is which aggregate an upload joins). The noise comes from a
generator seeded by (run seed, round, aggregate name, use), so a run is reproducible and both engines,
which run this same server code, give the same bits. Not covered: what a server computes from the
individual clipped uploads before averaging (FL-TAC's per-round KMeans, clustered FL's clustering round,
FedRouter's `global_clustering = "adapters"`), and evaluation reports.

Accounting (dp-accounting's RDP accountant): the centroids are one Gaussian release per client; the update
rounds are composed as Poisson-sampled Gaussians with rate q = scenario.clients_per_round / n_clients (an
approximation: taskfed samples a fixed number of clients per round, without replacement; a round where the
method trains every client, clustered FL's clustering round, counts with q = 1). The record-level total of a
client composes its centroid release with the update rounds at noise multiplier z / 2 (a row can move its
client's clipped update by up to 2 x clip). Given `epsilon`, taskfed finds the smallest noise multiplier
that meets it (bisection, at config time); given `noise_multiplier`, it reports the epsilon.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import zlib
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from taskfed.config import CENTROID_METHODS  # noqa: F401 (the methods privacy.centroids applies to)

Z_MAX = 1e4  # the largest noise multiplier the search tries; a target it cannot meet is refused
ROUNDS_OF_SEARCH = 60
# RDP orders: integers only (dp-accounting's exact closed form for Poisson-sampled Gaussians; its fractional
# orders need a series that fails to converge for large noise and logs a warning per order).
ORDERS = tuple(range(2, 65)) + (80, 96, 128, 192, 256, 512, 1024)


def seed_of(*parts: Any) -> int:
    """A stable seed (independent of Python's hash salt and of the order things run in)."""
    return zlib.crc32("/".join(map(str, parts)).encode())


# ----------------------------------------------------------------------------- accountant
@functools.lru_cache(maxsize=4096)
def epsilon(delta: float, single: tuple[float, ...] = (), rounds: tuple[tuple[float, float], ...] = ()) -> float:
    """Epsilon at `delta` of one Gaussian release per noise multiplier in `single`, composed with one
    Poisson-sampled Gaussian per (noise multiplier, sampling rate) in `rounds`."""
    import dp_accounting
    from dp_accounting import rdp

    acc = rdp.RdpAccountant(list(ORDERS))
    for z in single:
        acc.compose(dp_accounting.GaussianDpEvent(z))
    for (z, q), n in sorted(_counts(rounds).items()):
        event = dp_accounting.GaussianDpEvent(z) if q >= 1 else dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z))
        acc.compose(event, n)
    return float(acc.get_epsilon(delta))


def _counts(rounds) -> dict[tuple[float, float], int]:
    out: dict[tuple[float, float], int] = {}
    for zq in rounds:
        out[zq] = out.get(zq, 0) + 1
    return out


@functools.lru_cache(maxsize=256)
def noise_for(target: float, delta: float, rates: tuple[float, ...] | None) -> float | None:
    """The smallest noise multiplier (to 1e-4 relative) whose epsilon at `delta` is at most `target`: for one
    Gaussian release (`rates` None) or for rounds at these sampling rates. None when even Z_MAX misses it."""
    def eps(z: float) -> float:
        return epsilon(delta, (z,)) if rates is None else epsilon(delta, (), tuple((z, q) for q in rates))

    if eps(Z_MAX) > target:
        return None
    lo, hi = 1e-3, Z_MAX
    if eps(lo) <= target:
        return lo
    for _ in range(ROUNDS_OF_SEARCH):  # geometric bisection: z spans decades
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if eps(mid) <= target else (mid, hi)
        if hi / lo < 1 + 1e-4:
            break
    return hi


# ----------------------------------------------------------------------------- the config's mechanisms
def planned_rates(cfg) -> tuple[float, ...]:
    """The sampling rate of each round that uploads, as the config plans it (the accountant's schedule)."""
    s = cfg.scenario
    q = 1.0 if s.clients_per_round is None else s.clients_per_round / s.n_clients
    rates = [q] * cfg.train.rounds  # FedDPA-F's extra fine-tuning round uploads nothing
    cluster_round = cfg.method.get("cluster_round", 1)
    if cfg.method_name == "clustered" and cluster_round < cfg.train.rounds:
        rates[cluster_round] = 1.0  # clustered FL trains every client in its clustering round
    return tuple(rates)


def centroid_noise(cfg) -> float:
    p = cfg.privacy.centroids
    return p.noise_multiplier if p.noise_multiplier is not None else noise_for(p.epsilon, p.delta, None)


def update_noise(cfg) -> float:
    p = cfg.privacy.updates
    return p.noise_multiplier if p.noise_multiplier is not None else noise_for(p.epsilon, p.delta, planned_rates(cfg))


def check(cfg) -> str | None:
    """Why the privacy options cannot be met (a sentence naming the key), else None. Run at config time."""
    for key, rates in (("centroids", None), ("updates", planned_rates(cfg))):
        p = getattr(cfg.privacy, key)
        if p is not None and p.epsilon is not None and noise_for(p.epsilon, p.delta, rates) is None:
            what = "one release" if rates is None else f"{len(rates)} rounds at sampling rate {max(rates):g}"
            return (f"privacy.{key}.epsilon: no noise multiplier up to {Z_MAX:g} meets epsilon {p.epsilon:g} at "
                    f"delta {p.delta:g} for {what}")
    return None


# ----------------------------------------------------------------------------- centroids (client side)
def of(rt):
    """The run config a client-side hook reads privacy from: its runtime's (None for a runtime without one,
    e.g. a test double: privacy off)."""
    return getattr(rt, "cfg", None)


def centroids_on(cfg) -> bool:
    return cfg is not None and cfg.privacy.centroids is not None


def clip_rows(x: np.ndarray, clip: float) -> np.ndarray:
    """Each row scaled onto the ball of radius `clip` when outside it (rows inside are unchanged)."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x * np.minimum(1.0, clip / np.maximum(norms, 1e-300))


def clip_embeddings(x: np.ndarray, cfg) -> np.ndarray:
    """What a centroid method clusters and routes on: the embeddings, clipped when centroids are private."""
    return clip_rows(x, cfg.privacy.centroids.clip) if centroids_on(cfg) else x


def centroid_std(cfg) -> float:
    """The noise std of each sum entry; the counts get this / clip (module doc)."""
    return centroid_noise(cfg) * math.sqrt(2.0) * cfg.privacy.centroids.clip


def min_count(cfg) -> float:
    p = cfg.privacy.centroids
    return p.min_count if p.min_count is not None else max(1.0, 2.0 * centroid_std(cfg) / p.clip)


def release_centroids(emb: np.ndarray, labels: np.ndarray, k: int, cfg, client: str, what: str) -> dict[str, np.ndarray]:
    """The client's upload: per cluster 0..k-1 the noisy sum of its (already clipped) embeddings and its
    noisy count, from a generator seeded by (run seed, client, what)."""
    x = clip_rows(np.asarray(emb, dtype=np.float64), cfg.privacy.centroids.clip)  # idempotent: never above clip
    sums = np.zeros((k, x.shape[1]))
    counts = np.zeros(k)
    for g in range(k):
        sums[g] = x[labels == g].sum(axis=0)
        counts[g] = float((labels == g).sum())
    std = centroid_std(cfg)
    rng = np.random.default_rng(seed_of(cfg.seed, "dp-centroids", client, what))
    sums += rng.normal(0.0, std, sums.shape)
    counts += rng.normal(0.0, std / cfg.privacy.centroids.clip, counts.shape)
    return {"centroid_sums": sums, "centroid_counts": counts}


# ----------------------------------------------------------------------------- centroids (server side)
def receive_centroids(uploads: dict[str, dict[str, np.ndarray]], cfg) -> tuple[dict, dict[str, str]]:
    """The server's view of private centroid uploads: `centroids` = sum / max(count, min_count) and `empty`
    (count below min_count), the other arrays as sent; and why each unusable upload is refused."""
    if not centroids_on(cfg):
        return uploads, {}
    out, bad, floor = {}, {}, min_count(cfg)
    for c, up in uploads.items():
        sums, counts = up.get("centroid_sums"), up.get("centroid_counts")
        if "centroids" in up or sums is None or counts is None:
            bad[c] = "privacy.centroids is on: the upload must be noisy centroid_sums and centroid_counts only"
        elif sums.ndim != 2 or sums.dtype.kind != "f" or counts.shape != (len(sums),) or counts.dtype.kind != "f":
            bad[c] = "centroid_sums must be a 2-D float array and centroid_counts one float per row"
        else:
            rest = {k: v for k, v in up.items() if k not in ("centroid_sums", "centroid_counts")}
            out[c] = rest | {"centroids": sums / np.maximum(counts, floor)[:, None], "empty": counts < floor}
    return out, bad


# ----------------------------------------------------------------------------- updates (client side)
def updates_on(cfg) -> bool:
    return cfg.privacy.updates is not None


def clip_update(weights, init, clip: float):
    """`weights` with its change from `init` scaled to L2 norm at most `clip` (over all keys, in float64; the
    float32 result is within rounding of the bound)."""
    keys = sorted(weights)
    norm = math.sqrt(sum(float((weights[k].double() - init[k].double()).pow(2).sum()) for k in keys))
    if norm <= clip:
        return weights
    factor = clip / norm
    return {k: (init[k].double() + (weights[k].double() - init[k].double()) * factor).to(weights[k].dtype)
            for k in weights}


# ----------------------------------------------------------------------------- updates (server side)
@dataclass
class _Aggregation:
    std: float
    seed: int
    round: int
    uses: dict[str, int]


_ACTIVE: contextvars.ContextVar[_Aggregation | None] = contextvars.ContextVar("taskfed_dp_aggregation", default=None)


@contextlib.contextmanager
def aggregation(cfg, round_idx: int) -> Iterator[None]:
    """While a method aggregates round `round_idx`: running means are uniform and their sums noised."""
    if not updates_on(cfg):
        yield
        return
    token = _ACTIVE.set(_Aggregation(update_noise(cfg) * cfg.privacy.updates.clip, cfg.seed, round_idx, {}))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def contributor_weight(weight: float) -> float:
    """A contributor's weight in a running mean: 1 under update DP (module doc), else the method's."""
    return 1.0 if _ACTIVE.get() is not None else float(weight)


def noised(sums: dict, name: str) -> dict:
    """An aggregate's float64 sums with the round's seeded Gaussian noise added (unchanged when off)."""
    import torch

    active = _ACTIVE.get()
    if active is None:
        return sums
    use = active.uses.get(name, 0)
    active.uses[name] = use + 1
    gen = torch.Generator().manual_seed(seed_of(active.seed, "dp-updates", active.round, name, use))
    return {k: sums[k] + active.std * torch.randn(sums[k].shape, generator=gen, dtype=torch.float64)
            for k in sorted(sums)}


# ----------------------------------------------------------------------------- the report
def report(cfg, rates: list[float], released: list[str], trained: list[str]) -> dict[str, Any]:
    """metrics.json's `privacy` block: mechanisms, parameters and the (epsilon, delta) each client spent.
    `rates`: the sampling rate of every round that uploaded; `released`: clients that sent private
    centroids; `trained`: the federation's clients after setup."""
    out: dict[str, Any] = {"accountant": "dp-accounting RDP (Poisson-sampling approximation for client sampling)"}
    deltas = []
    zc = zu = None
    if centroids_on(cfg):
        p = cfg.privacy.centroids
        zc = centroid_noise(cfg)
        deltas.append(p.delta)
        out["centroids"] = {"mechanism": "Gaussian on per-cluster (sum, count), L2-clipped embeddings",
                            "adjacency": "add/remove one training row", "clip": p.clip, "noise_multiplier": zc,
                            "sensitivity": "sqrt(2) x clip on (sums, clip x counts)", "sum_noise_std": centroid_std(cfg),
                            "min_count": min_count(cfg), "target_epsilon": p.epsilon, "delta": p.delta,
                            "epsilon": epsilon(p.delta, (zc,))}
    if updates_on(cfg):
        p = cfg.privacy.updates
        zu = update_noise(cfg)
        deltas.append(p.delta)
        out["updates"] = {"mechanism": "central Gaussian on each aggregate's sum of clipped updates, uniform weights",
                          "adjacency": "add/remove one client", "clip": p.clip, "noise_multiplier": zu,
                          "sum_noise_std": zu * p.clip, "sampling_rates": list(rates), "rounds": len(rates),
                          "target_epsilon": p.epsilon, "delta": p.delta,
                          "epsilon": epsilon(p.delta, (), tuple((zu, q) for q in rates))}
    delta = sum(deltas)  # basic composition of the deltas; the epsilons compose in the accountant
    per_client = {}
    for c in sorted(set(released) | set(trained)):
        single = (zc,) if zc is not None and c in released else ()
        rounds = tuple((zu / 2, q) for q in rates) if zu is not None and c in trained else ()
        per_client[c] = {"epsilon": epsilon(delta, single, rounds) if single or rounds else 0.0, "delta": delta}
    out["per_client"] = per_client
    out["total"] = {"adjacency": "add/remove one training row (updates at noise multiplier z/2)",
                    "epsilon": max((v["epsilon"] for v in per_client.values()), default=0.0), "delta": delta}
    return out
