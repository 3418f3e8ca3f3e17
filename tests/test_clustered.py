"""The clustered-FL baselines (methods.md, "Clustered FL" and "IFCA"): Ward clustering of LoRA-B update
similarities, FedAvg before `cluster_round` and within groups after; IFCA's lowest-loss choice on the
engine path and its per-cluster averaging; both end to end on the tiny model.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import tiny_config, write_two_task_data
from taskfed.clustering import clustering_accuracy, cosine_similarity, ward_labels
from taskfed.data.records import Record
from taskfed.engine.inprocess import InProcessEngine, job_seed
from taskfed.errors import TaskfedError
from taskfed.methods import METHODS, method_params
from taskfed.methods.base import Client, Federation, Job, Result, weighted_mean
from taskfed.methods.clustered import update_keys
from taskfed.methods.fedavg import FedAvg
from taskfed.run import run_experiment
from taskfed.training import adapter_losses, sample_order

L0B, L1B = "model.layers.0.self_attn.q_proj.lora_B", "model.layers.1.self_attn.q_proj.lora_B"
KEYS = {"model.layers.0.self_attn.q_proj.lora_A": (2, 4), L0B: (6, 2),
        "model.layers.1.self_attn.q_proj.lora_A": (2, 4), L1B: (6, 2)}
CLIENTS = ["0", "1", "2", "3"]


def v0():
    gen = torch.Generator().manual_seed(1)
    return {k: (torch.rand(s, generator=gen) - 0.5 if k.endswith("A") else torch.zeros(s)) for k, s in KEYS.items()}


def make(name, clients=CLIENTS, init=None, **params):
    fed = Federation(clients=list(clients), rounds=5, seed=0, init_adapter=init or v0(), tasks=["a", "b"])
    return METHODS[name](method_params({"name": name, **params}), fed)


def same(x, y) -> bool:
    return all(torch.equal(x[k], y[k]) for k in x)


def result(client, adapter, weights, n_client, chosen=None):
    return Result(job=Job(client=client, adapter=adapter, init=weights), weights=weights, n_rows=n_client,
                  n_client=n_client, loss=0.0, chosen=chosen)


def direction(seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(6, 2, generator=gen)


def moved(base, deltas: dict[str, torch.Tensor], seed: int = 0, noise: float = 0.01):
    """base plus the given B updates plus small noise on every entry."""
    gen = torch.Generator().manual_seed(100 + seed)
    return {k: base[k] + deltas.get(k, 0) + noise * torch.randn(base[k].shape, generator=gen) for k in base}


# ----------------------------------------------------------------------------- Ward
def test_ward_on_block_diagonal_similarity_recovers_the_blocks():
    blocks = [0, 1, 2, 0, 2, 1, 1, 0, 2, 2]  # shuffled membership, blocks of 3, 3 and 4
    rng = np.random.default_rng(0)
    sim = np.array([[0.9 if a == b else 0.1 for b in blocks] for a in blocks]) + 0.02 * rng.standard_normal((10, 10))
    sim = (sim + sim.T) / 2
    np.fill_diagonal(sim, 1.0)
    labels = ward_labels(sim, 3)
    assert clustering_accuracy(labels, blocks) == 1.0
    assert list(labels) == [0, 1, 2, 0, 2, 1, 1, 0, 2, 2]  # canonical ids: by first appearance
    assert list(ward_labels(sim, 1)) == [0] * 10


def test_cosine_similarity_of_updates():
    sim = cosine_similarity(np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0], [0.0, 0.0]]))
    np.testing.assert_allclose(sim, [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])


def test_update_keys_last_layer_or_all():
    assert update_keys(KEYS, "last") == [L1B]
    assert update_keys(KEYS, "all") == [L0B, L1B]
    keys = {f"model.layers.{i}.self_attn.v_proj.lora_B" for i in (2, 10, 9)} | {"model.layers.10.self_attn.q_proj.lora_B"}
    assert update_keys(keys, "last") == ["model.layers.10.self_attn.q_proj.lora_B", "model.layers.10.self_attn.v_proj.lora_B"]
    assert update_keys({"x.lora_A": 0, "x.lora_B": 0}, "last") == ["x.lora_B"]  # no layer numbers: all B


# ----------------------------------------------------------------------------- Clustered FL
def test_clustered_equals_fedavg_before_cluster_round():
    m = make("clustered", cluster_round=2, n_clusters=2)
    fedavg = FedAvg(method_params({"name": "fedavg"}), m.fed)
    for r in range(2):
        ups = [result(c, "global", moved(m.global_adapter, {L1B: direction(i)}, seed=10 * r + i), 10 + 5 * i)
               for i, c in enumerate(CLIENTS)]
        assert [j.init for j in m.plan(r, CLIENTS[:2])] == [m.global_adapter] * 2  # sampling respected
        m.aggregate(r, ups[::-1])
        fedavg.aggregate(r, ups)
        assert same(m.global_adapter, fedavg.global_adapter)
        assert same(m.global_adapter, weighted_mean([u.weights for u in ups], [u.n_client for u in ups]))
        assert m.groups is None and m.eval_adapters(Client("0", []), m.downlink("0")) == {"global": m.global_adapter}


def clustered_round(m, r, updates: dict[str, dict], n_client=None):
    n_client = n_client or {c: 10 + i for i, c in enumerate(CLIENTS)}
    jobs = m.plan(r, ["0"])  # only client 0 sampled
    ups = [result(j.client, j.adapter, moved(j.init, updates[j.client], seed=int(j.client)), n_client[j.client])
           for j in jobs]
    m.aggregate(r, ups)
    return jobs, ups


def test_clustered_groups_by_update_similarity_and_averages_within_groups():
    m = make("clustered", cluster_round=1, n_clusters=2)
    u, v = direction(1), direction(2)
    v = v - (v * u).sum() / (u * u).sum() * u  # orthogonal to u
    clustered_round(m, 0, {c: {} for c in CLIENTS})
    start = m.global_adapter
    # Round 1 (cluster_round): every client trains, though only "0" was sampled; 0 and 2 move along u,
    # 1 and 3 along v (in the last layer's B).
    jobs, ups = clustered_round(m, 1, {"0": {L1B: u}, "1": {L1B: v}, "2": {L1B: 2 * u}, "3": {L1B: 0.5 * v}})
    assert sorted(j.client for j in jobs) == CLIENTS and all(j.init is start for j in jobs)
    assert m.groups == {"0": 0, "1": 1, "2": 0, "3": 1} and m.clustered_at == 1
    by = {x.job.client: x for x in ups}
    for g, members in ((0, ["0", "2"]), (1, ["1", "3"])):
        expected = weighted_mean([by[c].weights for c in members], [by[c].n_client for c in members])
        assert same(m.group_adapters[g], expected)
        for c in members:
            assert m.eval_adapters(Client(c, []), m.downlink(c)) == {f"group/{g}": m.group_adapters[g]}
    # Round 2: a client trains its group's adapter; only group 0 uploads: group 1 keeps its weights.
    kept = m.group_adapters[1]
    jobs = m.plan(2, ["0", "2"])
    assert [(j.adapter, j.init is m.group_adapters[0]) for j in jobs] == [("group/0", True), ("group/0", True)]
    ups = [result(j.client, j.adapter, moved(j.init, {}, seed=7 + i), 5 + i) for i, j in enumerate(jobs)]
    m.aggregate(2, ups)
    assert same(m.group_adapters[0], weighted_mean([x.weights for x in ups], [5, 6])) and m.group_adapters[1] is kept
    report = m.eval_report("local", [])
    assert report["groups"] == {"0": 0, "1": 1, "2": 0, "3": 1} and len(report["update_similarity"]) == 4


def test_clustered_last_layer_or_all_layers():
    # The last layer says {0, 1} / {2, 3}; the first layer, with a much larger update, says {0, 2} / {1, 3}.
    u, v = direction(1), direction(2)
    v = v - (v * u).sum() / (u * u).sum() * u
    updates = {"0": {L1B: u, L0B: 20 * u}, "1": {L1B: u, L0B: 20 * v}, "2": {L1B: v, L0B: 20 * u}, "3": {L1B: v, L0B: 20 * v}}
    groups = {}
    for layers in ("last", "all"):
        m = make("clustered", cluster_round=0, n_clusters=2, layers=layers)
        clustered_round(m, 0, updates)
        groups[layers] = m.groups
    assert groups["last"] == {"0": 0, "1": 0, "2": 1, "3": 1}
    assert groups["all"] == {"0": 0, "1": 1, "2": 0, "3": 1}


def test_clustered_bad_parameters():
    with pytest.raises(TaskfedError, match="method.n_clusters: 5 groups need at least as many clients"):
        make("clustered", n_clusters=5)
    with pytest.raises(TaskfedError, match="method.n_clusters: 50 clusters need at least as many clients"):
        make("ifca", n_clusters=50)  # a check before training, not minutes of probing clusters nobody fills
    with pytest.raises(TaskfedError, match="method.layers"):
        method_params({"name": "clustered", "layers": "first"})
    with pytest.raises(TaskfedError, match="unknown key 'method.k'"):
        method_params({"name": "clustered", "k": 2})


# ----------------------------------------------------------------------------- IFCA
def test_ifca_inits_are_distinct_and_deterministic():
    a, b = make("ifca", n_clusters=3), make("ifca", n_clusters=3)
    assert all(same(x, y) for x, y in zip(a.clusters, b.clusters))
    assert not same(a.clusters[0], a.clusters[1]) and not same(a.clusters[1], a.clusters[2])
    for w in a.clusters:  # close to v0: std 1e-3 noise
        assert max(float((w[k] - a.fed.init_adapter[k]).abs().max()) for k in w) < 0.01
    jobs = a.plan(0, ["0", "1"])
    assert all(len(j.candidates) == 3 and all(c is w for c, w in zip(j.candidates, a.clusters)) for j in jobs)


def test_ifca_averages_per_cluster_and_keeps_empty_clusters():
    m = make("ifca", n_clusters=3)
    empty = m.clusters[2]
    ws = [moved(v0(), {}, seed=i, noise=0.5) for i in range(4)]
    ups = [result("0", "cluster", ws[0], 10, chosen=1), result("1", "cluster", ws[1], 30, chosen=0),
           result("2", "cluster", ws[2], 20, chosen=1), result("3", "cluster", ws[3], 40, chosen=0)]
    m.aggregate(0, ups)
    assert same(m.clusters[1], weighted_mean([ws[0], ws[2]], [10, 20]))
    assert same(m.clusters[0], weighted_mean([ws[1], ws[3]], [30, 40]))
    assert m.clusters[2] is empty
    assert m.membership == {"0": 1, "1": 0, "2": 1, "3": 0}
    names = list(m.eval_adapters(Client("2", []), m.downlink("2")))
    mix = m.route(Client("2", []), [Record("x", "y", "a")] * 2, names, None, m.downlink("2"))
    assert [names[int(i)] for i in mix.idx[:, 0]] == ["cluster/1", "cluster/1"]
    assert m.eval_report("local", [])["cluster_sizes"] == [2, 2, 0]


def words(task, n, offset=0):
    if task == "upper":
        return [Record(f"Write the word in capitals: w{i}", f"W{i}", "upper") for i in range(offset, offset + n)]
    return [Record(f"How many letters has the word 'w{i}'?", str(len(f"w{i}")), "count") for i in range(offset, offset + n)]


def test_ifca_picks_the_lowest_loss_adapter_on_the_engine_path(tiny_runtime_factory):
    cfg = tiny_config("train.steps=2", "train.batch=4")
    rt = tiny_runtime_factory(cfg)
    clients = {"0": Client("0", words("upper", 8)), "1": Client("1", words("upper", 8, 20))}
    engine = InProcessEngine(rt, clients, cfg)
    init = rt.init_adapter()
    # A clearly better adapter: trained for a while (high learning rate) on the same kind of rows.
    trained = engine.run(0, [Job(client="0", adapter="pre", init=init, steps=30, lr=5e-3)])[0][0].weights
    m = METHODS["ifca"](method_params({"name": "ifca", "n_clusters": 2}),
                        Federation(clients=list(clients), rounds=2, seed=0, init_adapter=init, tasks=["upper"]))
    m.clusters = [m.clusters[0], trained]
    jobs = m.plan(0, ["0", "1"])
    results, stats = engine.run(0, jobs)
    assert stats.bytes_down > 0
    for r in results:
        assert r.chosen == 1
        # ... the argmin of the two candidates' losses on the seeded probe batch the engine drew.
        rows = [rt.encode(x) for x in clients[r.job.client].records]
        probe = [rows[i] for i in sample_order(len(rows), cfg.train.batch, job_seed(cfg.seed, 0, r.job.client, "cluster") + 1)]
        losses = adapter_losses(rt, [m.clusters[0], trained], probe)
        assert losses[1] < losses[0]
    untouched = m.clusters[0]
    m.aggregate(0, results)
    assert m.clusters[0] is untouched  # no client picked it
    assert same(m.clusters[1], weighted_mean([r.weights for r in results], [8, 8]))
    # A client the server never saw picks on its own side, with the same rule.
    fresh = Client("9", words("upper", 8, 40))
    names = list(m.eval_adapters(fresh, m.downlink(fresh.id)))
    mix = m.route(fresh, words("upper", 2, 60), names, rt, m.downlink(fresh.id))
    assert names[int(mix.idx[0, 0])] == "cluster/1"


# ----------------------------------------------------------------------------- end to end (tiny model)
@pytest.fixture(scope="module")
def two_tasks(tmp_path_factory):
    return write_two_task_data(tmp_path_factory.mktemp("two_tasks"), n_train=16, n_test=4)


@pytest.mark.parametrize("method", [["method.name=clustered", "method.n_clusters=2", "method.cluster_round=1"],
                                    ["method.name=ifca", "method.n_clusters=2"]])
def test_clustered_baselines_end_to_end(method, two_tasks, tiny_runtime_factory):
    train, test = two_tasks
    cfg = tiny_config("data.source=json", f"data.train_path={train}", f"data.test_path={test}", "scenario.name=dual",
                      "scenario.n_clients=4", "eval.max_rows_per_task=2", *method)
    metrics = run_experiment(cfg, rt=tiny_runtime_factory(cfg))
    assert len(metrics["rounds"]) == 2 and all(r["bytes_up"] > 0 for r in metrics["rounds"])
    for mode in ("local", "global"):
        ev = metrics["eval"][mode]
        assert 0.0 <= ev["score"] <= 1.0 and len(ev["per_client"]) == 4
        if cfg.method_name == "clustered":
            assert ev["clustered_at"] == 1 and sorted(set(ev["groups"].values())) == [0, 1]
        else:
            assert set(ev["membership"]) == {"0", "1", "2", "3"} and sum(ev["cluster_sizes"]) == 4
