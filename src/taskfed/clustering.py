"""Clustering mechanics shared by the clustered methods (FL-TAC, Clustered FL, IFCA) and their bookkeeping.

- `flatten`: an adapter as one vector, all A and B matrices in sorted key order (methods.md's feature for
  clustering adapters).
- `kmeans_adapters`: scikit-learn KMeans (Euclidean, fixed seed, fixed restarts) over flattened adapters.
  An adapter of SmolLM2 has ~460k numbers, so a KMeans over 100 of them touches 46M floats on every
  distance pass of every restart (about 10 s on 2 CPU cores). KMeans only ever looks at distances
  between points and centres that are means of points, all inside the points' affine span, so it is run
  on the points' exact isometric coordinates in that span (n numbers per point, from the eigenvectors of
  the centred Gram matrix, one n x d x n product): same pairwise distances, same k-means++ draws, same
  Lloyd steps, hence the same partition (up to float rounding). `tol` is rescaled so that sklearn's
  absolute tolerance (tol x mean per-feature variance) is the same as on the raw vectors. 100 adapters
  of SmolLM2's size: about 0.45 s for the whole server step on 2 busy CPU cores (benchmarks/clustering.py).
- `canonical`: cluster ids renumbered by first appearance, so that ids do not depend on KMeans' internal
  numbering (a cluster keeps its name when its members are listed in the same order).
- `clustering_accuracy`: agreement of a clustering with true labels under the best one-to-one matching
  of clusters to labels (the Hungarian method, scipy's linear_sum_assignment).
- `cosine_similarity`, `ward_labels`: Clustered FL's pairwise cosine similarity of update vectors and Ward
  agglomerative clustering of the rows of that matrix (scikit-learn, linkage="ward").
- `cluster_means`: the (weighted) mean of each cluster's members with the package's `weighted_mean`.
"""

from __future__ import annotations

import warnings
from typing import Hashable, Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist
from sklearn.cluster import AgglomerativeClustering, KMeans
from sklearn.exceptions import ConvergenceWarning
from threadpoolctl import threadpool_limits

from taskfed.model.bank import AdapterWeights

N_INIT = 10  # KMeans restarts, fixed so that a run is a function of its seed
KMEANS_TOL = 1e-4  # scikit-learn's default relative tolerance


def flatten(weights: AdapterWeights) -> np.ndarray:
    """All A and B matrices in sorted key order, as one float32 vector."""
    return torch.cat([weights[key].reshape(-1).float() for key in sorted(weights)]).numpy()


def n_features(weights: AdapterWeights) -> int:
    return sum(int(weights[key].numel()) for key in weights)


def canonical(labels: Sequence[int]) -> np.ndarray:
    """Cluster ids renumbered 0, 1, ... in order of first appearance."""
    labels = np.asarray(labels)
    order: dict[int, int] = {}
    for lab in labels.tolist():
        order.setdefault(lab, len(order))
    return np.array([order[lab] for lab in labels.tolist()], dtype=np.int64)


def flat_matrix(adapters: list[AdapterWeights]) -> torch.Tensor:
    """n x d float32: row i = flatten(adapters[i]), written in place (one allocation)."""
    keys = sorted(adapters[0])
    out = torch.empty(len(adapters), n_features(adapters[0]), dtype=torch.float32)
    for i, weights in enumerate(adapters):
        torch.cat([weights[key].reshape(-1).float() for key in keys], out=out[i])
    return out


def isometric_coords(adapters: list[AdapterWeights]) -> np.ndarray:
    """n x n coordinates whose pairwise Euclidean distances equal those of the flattened adapters: from
    the eigendecomposition of the Gram matrix of the centred vectors. The Gram matrix is one float32
    matrix product (the precision scikit-learn's KMeans itself uses on float32 data, whose distances are
    also dot-product expansions); centring first removes the large part every adapter shares (v0's A),
    so no precision is lost to it."""
    x = flat_matrix(adapters)
    x -= x.mean(dim=0, keepdim=True)
    gram = (x @ x.T).double().numpy()
    with threadpool_limits(limits=1):  # an n x n problem: one thread (see kmeans_labels)
        vals, vecs = np.linalg.eigh(gram)
    return vecs * np.sqrt(np.clip(vals, 0.0, None))  # rounding can leave tiny negative eigenvalues


def kmeans_labels(points: np.ndarray, k: int, seed: int, tol: float = KMEANS_TOL) -> np.ndarray:
    """scikit-learn KMeans (Euclidean) with a fixed seed and fixed restarts; canonical labels."""
    with warnings.catch_warnings():
        # Fewer distinct points than k (e.g. identical uploads) leaves clusters empty: the labels say so.
        warnings.simplefilter("ignore", ConvergenceWarning)
        # One thread: the problem is small (n x n after the isometry), and a thread pool's start-up and
        # spinning cost more than the work, badly so on a busy machine (100 x 100: 0.2 s against 0.02 s).
        with threadpool_limits(limits=1):
            fitted = KMeans(n_clusters=k, random_state=seed, n_init=N_INIT, tol=tol).fit(points)
    return canonical(fitted.labels_)


def kmeans_adapters(adapters: list[AdapterWeights], k: int, seed: int) -> np.ndarray:
    """KMeans over the flattened adapters (module doc: run on their isometric coordinates)."""
    coords = isometric_coords(adapters)
    # sklearn's absolute tolerance is tol x (total variance / number of features): same total variance
    # here, n features instead of d, so the relative tol is scaled by n / d.
    return kmeans_labels(coords, k, seed, tol=KMEANS_TOL * coords.shape[1] / n_features(adapters[0]))


def cluster_means(adapters: list[AdapterWeights], labels: Sequence[int],
                  weights: Sequence[float] | None = None) -> dict[int, AdapterWeights]:
    """Per cluster id, the mean of its members (weighted by `weights` when given), in the given order."""
    from taskfed.methods.base import weighted_mean  # here: importing taskfed.methods imports every method

    labels = np.asarray(labels)
    out = {}
    for g in sorted(set(labels.tolist())):
        idx = np.flatnonzero(labels == g)
        out[g] = weighted_mean([adapters[i] for i in idx], None if weights is None else [weights[i] for i in idx],
                               name=f"cluster/{g}")
    return out


def clustering_accuracy(labels: Sequence[Hashable], truth: Sequence[Hashable]) -> float:
    """Share of items whose cluster maps to their true label under the best one-to-one matching."""
    labels, truth = list(labels), list(truth)
    if len(labels) != len(truth):
        raise ValueError("labels and truth differ in length")
    if not labels:
        return float("nan")
    ul, ut = sorted(set(labels), key=str), sorted(set(truth), key=str)
    li, ti = {v: i for i, v in enumerate(ul)}, {v: i for i, v in enumerate(ut)}
    counts = np.zeros((len(ul), len(ut)), dtype=np.int64)
    for a, b in zip(labels, truth):
        counts[li[a], ti[b]] += 1
    rows, cols = linear_sum_assignment(counts, maximize=True)
    return float(counts[rows, cols].sum() / len(labels))


def cosine_similarity(vectors: np.ndarray) -> np.ndarray:
    """Pairwise cosine similarity of the rows (a zero row has similarity 0 to everything but itself)."""
    x = np.asarray(vectors, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    unit = np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)
    sim = unit @ unit.T
    np.fill_diagonal(sim, 1.0)
    return sim


def ward_labels(similarity: np.ndarray, k: int) -> np.ndarray:
    """Ward agglomerative clustering into k groups, each item described by its row of the similarity
    matrix; canonical labels."""
    sim = np.asarray(similarity, dtype=np.float64)
    if len(sim) < k:
        raise ValueError(f"{k} groups need at least {k} items, got {len(sim)}")
    if k == 1:
        return np.zeros(len(sim), dtype=np.int64)
    return canonical(AgglomerativeClustering(n_clusters=k, linkage="ward").fit(sim).labels_)


def nearest(points: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid (Euclidean) for each point."""
    return cdist(np.asarray(points, dtype=np.float64), np.asarray(centroids, dtype=np.float64)).argmin(axis=1)
