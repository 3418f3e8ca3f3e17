"""FL-TAC (methods.md, "FL-TAC") and the shared clustering mechanics it uses (taskfed.clustering).

Unit tests drive the method's hooks with hand-made adapters drawn around well-separated group centres and
with embeddings we control (a fake runtime); the end-to-end tests run the real path on the tiny model.
"""

from __future__ import annotations

import json
import random
import zlib

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans

from tests.conftest import tiny_config, write_two_task_data
from taskfed.clustering import canonical, clustering_accuracy, flatten, kmeans_adapters
from taskfed.data.records import Record
from taskfed.errors import TaskfedError
from taskfed.methods import METHODS, method_params
from taskfed.methods.base import Client, Federation, Job, Result, Routed, weighted_mean
from taskfed.methods.fltac import INDEX, TASKS
from taskfed.run import run_experiment

KEYS = {"model.layers.0.self_attn.q_proj.lora_A": (2, 5), "model.layers.0.self_attn.q_proj.lora_B": (5, 2),
        "model.layers.1.self_attn.q_proj.lora_A": (2, 5), "model.layers.1.self_attn.q_proj.lora_B": (5, 2)}
TASK_NAMES = ["a", "b", "c"]
# Which tasks each client holds (local index = position): ids (client, k) of 9 task adapters in all.
HOLDS = {"0": ["a", "b"], "1": ["b", "c"], "2": ["a", "c"], "3": ["a", "b", "c"]}


def v0() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return {k: (torch.rand(s, generator=gen) - 0.5 if k.endswith("A") else torch.zeros(s)) for k, s in KEYS.items()}


def make(tasks=TASK_NAMES, clients=HOLDS, **params):
    fed = Federation(clients=list(clients), rounds=3, seed=0, init_adapter=v0(), tasks=list(tasks))
    return METHODS["fltac"](method_params({"name": "fltac", **params}), fed)


def group_adapters(seed: int = 0, spread: float = 0.01):
    """Per id (client, k): v0 + the centre of its true task + small noise; centres far apart."""
    gen = torch.Generator().manual_seed(seed)
    base = v0()
    centres = {t: {k: 3.0 * torch.randn(s, generator=gen) for k, s in KEYS.items()} for t in TASK_NAMES}
    out, truth = {}, {}
    for c, tasks in HOLDS.items():
        for k, t in enumerate(tasks):
            out[(c, k)] = {key: base[key] + centres[t][key] + spread * torch.randn(s, generator=gen)
                           for key, s in KEYS.items()}
            truth[(c, k)] = t
    return out, truth


def uploads_of(adapters, n_rows=None) -> list[Result]:
    """Results as the server gets them (shuffled: the step must not depend on their order)."""
    results = [Result(job=Job(client=c, adapter=f"adapter/{k}", init=v0()), weights=w,
                      n_rows=(n_rows or {}).get((c, k), 10), n_client=50, loss=0.0)
               for (c, k), w in adapters.items()]
    random.Random(3).shuffle(results)
    return results


def set_up(method, dim: int = 4):
    """setup_server with per-id data centroids: task t's centroid near 10 * e_t."""
    uploads = {}
    for c, tasks in HOLDS.items():
        uploads[c] = {"centroids": np.stack([10.0 * np.eye(dim)[TASK_NAMES.index(t)] + 0.1 * k
                                             for k, t in enumerate(tasks)]).astype(np.float32)}
    method.setup_server(uploads)
    return uploads


def same(x, y) -> bool:
    return all(torch.equal(x[k], y[k]) for k in x)


class FakeRuntime:
    """`embed` as a deterministic function of the text: task centre (by keyword) + small seeded noise."""

    centres = {"capitals": np.eye(8)[0] * 6, "letters": np.eye(8)[1] * 6}

    def embed(self, texts):
        rows = []
        for t in texts:
            centre = next((c for key, c in self.centres.items() if key in t), np.zeros(8))
            rows.append(centre + 0.3 * np.random.default_rng(zlib.crc32(t.encode())).standard_normal(8))
        return torch.tensor(np.stack(rows) if rows else np.zeros((0, 8)))


def upper(i):
    return Record(f"Write the word in capitals: w{i}", f"W{i}", "upper")


def count(i):
    return Record(f"How many letters has the word 'w{i}'?", "2", "count")


# ----------------------------------------------------------------------------- shared mechanics
def test_clustering_accuracy_uses_hungarian_matching():
    assert clustering_accuracy([2, 2, 0, 0, 1, 1], ["a", "a", "b", "b", "c", "c"]) == 1.0  # ids permuted
    assert clustering_accuracy([0, 0, 1, 1, 1], ["a", "a", "b", "b", "a"]) == pytest.approx(0.8)
    # Two clusters, three tasks: at most two tasks can be matched.
    assert clustering_accuracy([0, 0, 1, 1, 1, 1], ["a", "a", "b", "b", "c", "c"]) == pytest.approx(4 / 6)
    assert list(canonical([5, 5, 2, 7, 2])) == [0, 0, 1, 2, 1]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kmeans_on_isometric_coordinates_equals_kmeans_on_flattened_adapters(seed):
    # Overlapping groups, so that KMeans has real decisions to make; 30 adapters of 40 numbers.
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((3, 40))
    adapters = []
    for i in range(30):
        vec = centres[i % 3] + 0.8 * rng.standard_normal(40)
        adapters.append({"x.lora_A": torch.tensor(vec[:20], dtype=torch.float32).view(4, 5),
                         "x.lora_B": torch.tensor(vec[20:], dtype=torch.float32).view(5, 4)})
    raw = np.stack([flatten(a) for a in adapters])
    expected = canonical(KMeans(n_clusters=3, random_state=seed, n_init=10).fit(raw).labels_)
    assert list(kmeans_adapters(adapters, 3, seed)) == list(expected)


def test_flatten_is_sorted_keys_all_a_and_b():
    w = {"m.lora_B": torch.full((2, 1), 2.0), "m.lora_A": torch.full((1, 2), 1.0)}
    assert flatten(w).tolist() == [1.0, 1.0, 2.0, 2.0]


# ----------------------------------------------------------------------------- server step
def test_server_step_returns_group_means_and_accuracy_one():
    m = make()
    set_up(m)
    adapters, truth = group_adapters()
    m.aggregate(0, uploads_of(adapters))
    # K = 3 clusters, each the plain mean of one task's adapters; every member holds its cluster's mean.
    assert len(m.cluster_adapters) == 3
    for t in TASK_NAMES:
        ids = sorted(i for i in truth if truth[i] == t)
        expected = weighted_mean([adapters[i] for i in ids])
        for i in ids:
            assert same(m.adapters[i], expected)
        assert sum(same(expected, w) for w in m.cluster_adapters) == 1
    assert m.round_accuracy(truth) == 1.0
    # The router's centroid of a cluster: the mean of its members' data centroids (task t near 10 e_t).
    for g, w in enumerate(m.cluster_adapters):
        t = next(truth[i] for i in truth if same(m.adapters[i], w))
        assert int(np.argmax(m.router_centroids[g])) == TASK_NAMES.index(t)
    # Next round every id starts from its cluster's mean: the server's plan sends exactly that.
    jobs = m.plan(1, list(HOLDS))
    assert len(jobs) == len(truth)
    for job in jobs:
        assert same(job.init, m.adapters[(job.client, int(job.adapter.split("/")[1]))])


def test_every_member_of_a_cluster_holds_the_same_weights():
    m = make()
    set_up(m)
    adapters, _ = group_adapters(seed=5, spread=0.3)
    m.aggregate(0, uploads_of(adapters))
    labels = dict(zip(m.history[-1]["ids"], m.history[-1]["labels"]))
    for i in labels:
        for j in labels:
            assert same(m.adapters[i], m.adapters[j]) == (labels[i] == labels[j])


def test_server_step_is_from_scratch_each_round_and_logged_per_round():
    m = make()
    set_up(m)
    first, truth = group_adapters(seed=0)
    m.aggregate(0, uploads_of(first))
    # Round 1: the tasks swap places in weight space; a fresh KMeans still finds them.
    second, _ = group_adapters(seed=9)
    m.aggregate(1, uploads_of(second))
    for t in TASK_NAMES:
        ids = sorted(i for i in truth if truth[i] == t)
        assert all(same(m.adapters[i], weighted_mean([second[j] for j in ids])) for i in ids)
    assert [m.round_accuracy(truth, r) for r in range(2)] == [1.0, 1.0]


def test_weighted_switch_gives_the_sample_weighted_mean():
    adapters, truth = group_adapters(spread=0.5)
    n_rows = {i: 1 + 7 * n for n, i in enumerate(sorted(adapters))}
    results = uploads_of(adapters, n_rows)
    plain, weighted = make(), make(weighted=True)
    for m in (plain, weighted):
        set_up(m)
        m.aggregate(0, results)
    for t in TASK_NAMES:
        ids = sorted(i for i in truth if truth[i] == t)
        expected = weighted_mean([adapters[i] for i in ids], [n_rows[i] for i in ids])
        assert same(weighted.adapters[ids[0]], expected)
        assert not same(plain.adapters[ids[0]], expected)


def test_fewer_uploads_than_tasks_use_fewer_clusters():
    m = make()
    set_up(m)
    adapters, _ = group_adapters()
    m.aggregate(0, uploads_of({("0", 0): adapters[("0", 0)], ("0", 1): adapters[("0", 1)]}))
    assert len(m.cluster_adapters) == 2


# ----------------------------------------------------------------------------- client side
def test_client_uploads_only_centroids_and_jobs_carry_no_task_names():
    records = [upper(i) for i in range(6)] + [count(i) for i in range(4)]
    client = Client("0", records)
    m = make(tasks=["count", "upper"], clients={"0": None})
    rt = FakeRuntime()
    upload = m.setup_client(client, rt)
    assert set(upload) == {"centroids"} and upload["centroids"].shape == (2, 8)
    assert client.store[TASKS] == ["count", "upper"]
    emb = rt.embed([r.instruction for r in records]).numpy()
    np.testing.assert_allclose(upload["centroids"][1], emb[:6].mean(0), rtol=1e-5)
    m.setup_server({"0": upload})
    jobs = m.plan(0, ["0"])
    assert [j.adapter for j in jobs] == ["adapter/0", "adapter/1"]
    for k, job in enumerate(jobs):
        assert "upper" not in repr(job.rows) + job.adapter and "count" not in repr(job.rows) + job.adapter
        assert job.upload and job.init is m.fed.init_adapter
        # The selector, resolved on the client, is exactly the task's rows.
        assert client.select(job.rows) == [r for r in records if r.task == client.store[TASKS][k]]
    assert list(client.store[INDEX]) == [1] * 6 + [0] * 4


def routed_method(**params):
    """Client 0 holds `upper`, client 1 holds `count`, client 2 both; adapters clustered by task."""
    clients = {"0": Client("0", [upper(i) for i in range(4)]), "1": Client("1", [count(i) for i in range(4)]),
               "2": Client("2", [upper(i + 10) for i in range(3)] + [count(i + 10) for i in range(3)])}
    m = make(tasks=["count", "upper"], clients=clients, **params)
    rt = FakeRuntime()
    m.setup_server({c: m.setup_client(cl, rt) for c, cl in clients.items()})
    gen = torch.Generator().manual_seed(0)
    centre = {t: {k: 3.0 * torch.randn(s, generator=gen) for k, s in KEYS.items()} for t in ("count", "upper")}
    results = [Result(job=Job(client=c, adapter=f"adapter/{k}", init=v0()),
                      weights={key: centre[t][key] + 0.01 * torch.randn(s, generator=gen) for key, s in KEYS.items()},
                      n_rows=4, n_client=4, loss=0.0)
               for c, cl in clients.items() for k, t in enumerate(cl.store[TASKS])]
    m.aggregate(0, results)
    home = {t: next(g for g, w in enumerate(m.cluster_adapters) if torch.allclose(w[next(iter(KEYS))], centre[t][next(iter(KEYS))], atol=0.1))
            for t in ("count", "upper")}
    return m, clients, rt, home


def test_known_task_uses_its_adapter_and_others_go_to_the_nearest_centroid():
    m, clients, rt, home = routed_method()
    client = clients["0"]
    names = list(m.eval_adapters(client, m.downlink(client.id)))
    assert names == ["task/0", "cluster/0", "cluster/1"]
    records = [upper(50), count(50), Record("Something unlike both", "x", "unseen")]
    mix = m.route(client, records, names, rt, m.downlink(client.id))
    picked = [names[int(i)] for i in mix.idx[:, 0]]
    assert picked[0] == "task/0"  # the client holds `upper`: its own task adapter
    assert picked[1] == f"cluster/{home['count']}"  # not held: the router, to the count cluster
    assert picked[2].startswith("cluster/")
    # With known_tasks = "router", every input is routed, the known ones too.
    m2, clients2, rt2, home2 = routed_method(known_tasks="router")
    names2 = list(m2.eval_adapters(clients2["0"], m2.downlink("0")))
    mix2 = m2.route(clients2["0"], records[:2], names2, rt2, m2.downlink("0"))
    assert [names2[int(i)] for i in mix2.idx[:, 0]] == [f"cluster/{home2['upper']}", f"cluster/{home2['count']}"]


def test_eval_report_has_per_round_accuracy_and_router_accuracy():
    m, clients, rt, home = routed_method()
    routed = []
    for cid in sorted(clients):
        records = [upper(60), count(60)]
        names = list(m.eval_adapters(clients[cid], m.downlink(cid)))
        mix = m.route(clients[cid], records, names, rt, m.downlink(cid))
        routed.append(Routed(cid, [r.task for r in records], names, mix, m.eval_facts(clients[cid])))
    report = m.eval_report("global", routed)
    assert report["clustering_accuracy_per_round"] == [1.0] and report["clustering_accuracy"] == 1.0
    assert report["router_rows"] == 2 and report["router_accuracy"] == 1.0  # client 0: count, client 1: upper
    assert sorted(report["cluster_makeup"][str(home["upper"])].items()) == [("upper", 2)]


def test_bad_parameters_get_one_sentence():
    with pytest.raises(TaskfedError, match="unknown key 'method.k'"):
        method_params({"name": "fltac", "k": 3})
    with pytest.raises(TaskfedError, match="method.known_tasks"):
        method_params({"name": "fltac", "known_tasks": "oracle"})


# ----------------------------------------------------------------------------- end to end (tiny model)
@pytest.fixture(scope="module")
def two_tasks(tmp_path_factory):
    return write_two_task_data(tmp_path_factory.mktemp("two_tasks"), n_train=16, n_test=4)


def test_fltac_end_to_end_records_clustering_accuracy(two_tasks, tiny_runtime_factory, tmp_path):
    train, test = two_tasks
    cfg = tiny_config("method.name=fltac", "data.source=json", f"data.train_path={train}", f"data.test_path={test}",
                      "scenario.name=iid", "scenario.n_clients=2", "eval.max_rows_per_task=3")
    metrics = run_experiment(cfg, out_dir=tmp_path / "run", rt=tiny_runtime_factory(cfg))
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [r["bytes_up"] > 0 for r in metrics["rounds"]] == [True, True]
    for mode in ("local", "global"):
        ev = saved["eval"][mode]
        assert len(ev["clustering_accuracy_per_round"]) == 2
        assert all(0.5 <= a <= 1.0 for a in ev["clustering_accuracy_per_round"])
        assert ev["router_rows"] == 0  # iid: every client holds both tasks, so no input needs the router
    assert sorted(p.name for p in (tmp_path / "run" / "adapters" / "server").iterdir()) == ["cluster_0", "cluster_1"]


def test_fltac_end_to_end_routes_unseen_inputs(two_tasks, tiny_runtime_factory):
    train, test = two_tasks
    cfg = tiny_config("method.name=fltac", "data.source=json", f"data.train_path={train}", f"data.test_path={test}",
                      "scenario.name=iid", "scenario.n_clients=2", "data.unseen_tasks=['count']",
                      "eval.modes=['local', 'unseen']", "eval.max_rows_per_task=3", "method.weighted=true")
    metrics = run_experiment(cfg, rt=tiny_runtime_factory(cfg))
    assert metrics["eval"]["unseen"]["router_rows"] == 2 * 3  # both clients, every unseen row routed
    assert metrics["eval"]["local"]["clustering_accuracy_per_round"] == [1.0, 1.0]  # one task, K = 1
