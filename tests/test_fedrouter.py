"""FedRouter (methods.md, "FedRouter"): local clustering, global clustering, binding, per-cluster training
and aggregation, the router, every switch, both oracles, and the run's router metrics.

Unit tests drive the method's hooks directly with embeddings we control (a fake runtime whose `embed` is a
deterministic function of the text) and hand-made adapters; the end-to-end tests run the real path on the
tiny model with two separable synthetic tasks.
"""

from __future__ import annotations

import json
import zlib

import numpy as np
import pytest
import torch

from tests.conftest import tiny_config, write_two_task_data
from taskfed.clustering import clustering_accuracy
from taskfed.data.records import Record
from taskfed.errors import TaskfedError
from taskfed.methods import METHODS, method_params
from taskfed.methods.base import Client, Federation, Result, Routed, label_rows
from taskfed.methods.fedrouter import CENTROIDS, LABELS
from taskfed.run import run_experiment


# ----------------------------------------------------------------------------- helpers
def adapter(value: float) -> dict[str, torch.Tensor]:
    return {"m.lora_A": torch.full((2, 3), float(value)), "m.lora_B": torch.full((3, 2), float(value))}


def make(name: str = "fedrouter", tasks=("upper", "count"), clients=("0", "1"), **params):
    fed = Federation(clients=list(clients), rounds=4, seed=0, init_adapter=adapter(0.0), tasks=list(tasks))
    return METHODS[name](method_params({"name": name, **params}), fed)


class FakeRuntime:
    """`embed` as a deterministic function of the text: a fixed vector per text, else task centre + noise."""

    def __init__(self, table: dict[str, list[float]] | None = None, centres: dict[str, np.ndarray] | None = None,
                 dim: int = 8, noise: float = 1.0):
        self.table, self.centres, self.dim, self.noise = table or {}, centres or {}, dim, noise
        self.calls: list[str] = []

    def vector(self, text: str) -> np.ndarray:
        if text in self.table:
            return np.asarray(self.table[text], dtype=np.float64)
        rng = np.random.default_rng(zlib.crc32(text.encode()))
        centre = next((c for key, c in self.centres.items() if key in text), np.zeros(self.dim))
        return centre + self.noise * rng.standard_normal(self.dim)

    def embed(self, texts, layers=None):
        assert layers is None  # the fake has one depth: methods.md's embed(x)
        self.calls += list(texts)
        return torch.tensor(np.stack([self.vector(t) for t in texts]) if texts else np.zeros((0, self.dim)))


def two_task_records(n: int = 40) -> list[Record]:
    """Rows of write_two_task_data's two tasks, varied text per row."""
    words = ["apple", "river", "stone", "cloud", "tiger", "piano", "lemon", "chair", "ocean", "maple"]
    out = []
    for i in range(n):
        w = words[i % len(words)] + "x" * (i // len(words))
        out.append(Record(f"Write the word in capitals: {w}", w.upper(), "upper"))
        out.append(Record(f"How many letters has the word '{w}'? Give the number. ###", str(len(w)), "count"))
    return out


SEPARATED = {"capitals": np.eye(8)[0] * 6, "letters": np.eye(8)[1] * 6}


def result(job, weights, n_rows: int, n_client: int) -> Result:
    return Result(job=job, weights=weights, n_rows=n_rows, n_client=n_client, loss=0.0)


def three_cluster_method(**params):
    """Two clients with two local centroids each; KMeans(3) groups {c0/0, c1/0}, {c0/1}, {c1/1}."""
    m = make(n_global=3, **params)
    m.setup_server({"0": {"centroids": np.array([[0.0, 0.0], [10.0, 0.0]], dtype=np.float32)},
                    "1": {"centroids": np.array([[0.0, 1.0], [20.0, 0.0]], dtype=np.float32)}})
    a, b, c = int(m.binding["0"][0]), int(m.binding["0"][1]), int(m.binding["1"][1])
    assert int(m.binding["1"][0]) == a and len({a, b, c}) == 3
    return m, a, b, c


# ----------------------------------------------------------------------------- 1. local clustering
def test_local_clusters_recover_tasks_on_controlled_embeddings():
    records = two_task_records()
    client = Client("0", records)
    rt = FakeRuntime(centres=SEPARATED)
    upload = make(n_local=2).setup_client(client, rt)
    labels = client.store[LABELS]
    assert clustering_accuracy(labels, [r.task for r in records]) > 0.95
    # Only arrays travel: the centroids (one per local cluster), which are the members' mean embeddings.
    assert set(upload) == {"centroids"} and isinstance(upload["centroids"], np.ndarray)
    emb = rt.embed([r.instruction for r in records]).numpy()
    for k in range(2):
        np.testing.assert_allclose(upload["centroids"][k], emb[labels == k].mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(client.store[CENTROIDS], upload["centroids"], rtol=1e-5, atol=1e-5)


def test_local_clusters_recover_tasks_on_tiny_model(tiny_runtime_factory):
    records = two_task_records(20)
    client = Client("0", records)
    make(n_local=2).setup_client(client, tiny_runtime_factory(tiny_config()))
    assert clustering_accuracy(client.store[LABELS], [r.task for r in records]) > 0.95


def test_fedrouter_oracle_uses_true_task_labels():
    # Embeddings that carry no task information: KMeans could not find the tasks, the oracle must.
    records = two_task_records(20) + [Record(f"Translate {i}", "x", "third") for i in range(5)]
    client = Client("0", records)
    rt = FakeRuntime(noise=1.0)
    upload = make("fedrouter-oracle", tasks=("upper", "count", "third")).setup_client(client, rt)
    expected = [client.tasks.index(r.task) for r in records]
    assert list(client.store[LABELS]) == expected  # one local cluster per task the client holds
    assert upload["centroids"].shape == (3, 8)
    emb = rt.embed([r.instruction for r in records]).numpy()
    for k, task in enumerate(client.tasks):
        np.testing.assert_allclose(upload["centroids"][k], emb[[r.task == task for r in records]].mean(0), atol=1e-5)
    # ... and the same data under KMeans does not follow the tasks.
    km_client = Client("0", records)
    make(n_local=3, tasks=("upper", "count", "third")).setup_client(km_client, rt)
    assert clustering_accuracy(km_client.store[LABELS], [r.task for r in records]) < 0.9
    with pytest.raises(TaskfedError, match="unknown key 'method.n_local'"):
        method_params({"name": "fedrouter-oracle", "n_local": 2})


# ----------------------------------------------------------------------------- 2-4. server side
def test_global_binding_is_nearest_global_centroid():
    m, a, b, c = three_cluster_method()
    np.testing.assert_allclose(m.centroids[a], [0.0, 0.5])
    np.testing.assert_allclose(m.centroids[b], [10.0, 0.0])
    np.testing.assert_allclose(m.centroids[c], [20.0, 0.0])


def test_round_robin_schedule_trains_round_mod_n_local():
    m = make(n_local=3, n_global=2)
    m.setup_server({c: {"centroids": np.arange(6, dtype=np.float32).reshape(3, 2) + 10 * i} for i, c in enumerate("01")})
    for r in range(5):
        jobs = m.plan(r, ["0", "1"])
        assert [j.client for j in jobs] == ["0", "1"]
        for j in jobs:
            k = r % 3
            g = int(m.binding[j.client][k])
            assert j.rows == label_rows(LABELS, k)
            assert j.adapter == f"cluster/{g}/local/{k}" and j.init is m.adapters[g]


def test_schedule_all_trains_every_local_cluster_every_round():
    m = make(n_local=3, n_global=2, schedule="all")
    m.setup_server({c: {"centroids": np.arange(6, dtype=np.float32).reshape(3, 2) + 10 * i} for i, c in enumerate("01")})
    for r in range(3):
        jobs = m.plan(r, ["0", "1"])
        assert [(j.client, j.rows) for j in jobs] == [(c, label_rows(LABELS, k)) for c in "01" for k in range(3)]


def test_only_bound_adapters_are_averaged_and_a_cluster_without_members_keeps_its_weights():
    m, a, b, c = three_cluster_method()
    before = {g: {k: v.clone() for k, v in m.adapters[g].items()} for g in range(3)}
    # Round 0, round robin k = 0: both clients train their local cluster 0, both bound to A.
    jobs = m.plan(0, ["0", "1"])
    assert {j.adapter for j in jobs} == {f"cluster/{a}/local/0"}
    m.aggregate(0, [result(jobs[0], adapter(1.0), 5, 10), result(jobs[1], adapter(3.0), 5, 30)])
    # Default weights: the client's full sample count (the official code's num_examples).
    assert torch.allclose(m.adapters[a]["m.lora_A"], torch.full((2, 3), 2.5))
    for g in (b, c):  # no member this round: exactly the same weights
        assert all(torch.equal(m.adapters[g][k], before[g][k]) for k in before[g])
    # Round 1, k = 1: client 0 trains into B, client 1 into C; each cluster averages only its own member.
    jobs = m.plan(1, ["0", "1"])
    assert [j.adapter for j in jobs] == [f"cluster/{b}/local/1", f"cluster/{c}/local/1"]
    kept = {k: v.clone() for k, v in m.adapters[a].items()}
    m.aggregate(1, [result(jobs[1], adapter(7.0), 5, 30), result(jobs[0], adapter(5.0), 5, 10)])
    assert torch.allclose(m.adapters[b]["m.lora_B"], torch.full((3, 2), 5.0))
    assert torch.allclose(m.adapters[c]["m.lora_B"], torch.full((3, 2), 7.0))
    assert all(torch.equal(m.adapters[a][k], kept[k]) for k in kept)
    # The next round starts from the bound cluster's aggregate.
    assert m.plan(2, ["0"])[0].init is m.adapters[a]


def test_cluster_count_weighting():
    m, a, _, _ = three_cluster_method(aggregation_weight="cluster")
    jobs = m.plan(0, ["0", "1"])
    m.aggregate(0, [result(jobs[0], adapter(1.0), 30, 100), result(jobs[1], adapter(3.0), 10, 10)])
    # Weights = local cluster sizes 30 and 10 (client weighting would give (100 + 30) / 110).
    assert torch.allclose(m.adapters[a]["m.lora_A"], torch.full((2, 3), 1.5))


def test_adapter_clustering_binds_by_round0_adapters():
    m = make(n_local=2, n_global=2, global_clustering="adapters")
    # The centroids alone would pair (0/0, 1/0) and (0/1, 1/1) ...
    m.setup_server({"0": {"centroids": np.array([[0.0, 0.0], [10.0, 0.0]], dtype=np.float32)},
                    "1": {"centroids": np.array([[0.0, 1.0], [10.0, 1.0]], dtype=np.float32)}})
    assert m.binding is None
    jobs = m.plan(0, ["0", "1"])  # round 0 trains every local cluster from the initial adapter
    assert [(j.client, j.rows) for j in jobs] == [(c, label_rows(LABELS, k)) for c in "01" for k in range(2)]
    assert all(j.init is m.fed.init_adapter for j in jobs)
    # ... but the trained adapters pair (0/0, 1/1) and (0/1, 1/0).
    values = {("0", 0): 1.0, ("0", 1): 5.0, ("1", 0): 5.2, ("1", 1): 1.2}
    m.aggregate(0, [result(j, adapter(values[(j.client, int(j.adapter[-1]))]), 5, n) for j, n in zip(jobs, (10, 10, 30, 30))])
    g = int(m.binding["0"][0])
    assert int(m.binding["1"][1]) == g and int(m.binding["0"][1]) == int(m.binding["1"][0]) != g
    # Global centroids for the router: the means of the bound local centroids.
    np.testing.assert_allclose(m.centroids[g], [5.0, 0.5])
    np.testing.assert_allclose(m.centroids[1 - g], [5.0, 0.5])
    assert torch.allclose(m.adapters[g]["m.lora_A"], torch.full((2, 3), (1.0 * 10 + 1.2 * 30) / 40))
    # Afterwards the round-robin schedule follows that binding.
    job = m.plan(1, ["0"])[0]
    assert job.adapter == f"cluster/{1 - g}/local/1" and job.init is m.adapters[1 - g]


def test_adapter_clustering_centroids_are_means_of_bound_local_centroids():
    m = make(n_local=2, n_global=2, global_clustering="adapters")
    m.setup_server({"0": {"centroids": np.array([[0.0, 0.0], [10.0, 0.0]], dtype=np.float32)},
                    "1": {"centroids": np.array([[2.0, 0.0], [12.0, 4.0]], dtype=np.float32)}})
    jobs = m.plan(0, ["0", "1"])
    m.aggregate(0, [result(j, adapter(float(j.adapter[-1]) * 10 + 0.1 * int(j.client)), 5, 10) for j in jobs])
    g0 = int(m.binding["0"][0])
    np.testing.assert_allclose(m.centroids[g0], [1.0, 0.0])
    np.testing.assert_allclose(m.centroids[1 - g0], [11.0, 2.0])


# ----------------------------------------------------------------------------- 5-6. router
def test_router_sends_input_to_nearest_global_centroid_and_local_router_restricts():
    table = {"near A": [0.2, 0.3], "near B": [9.0, 0.0], "near C": [19.5, 0.0], "between": [14.0, 0.0]}
    rt = FakeRuntime(table=table)
    records = [Record(t, "", "upper") for t in table]
    for router, expected in (("global", "ABCB"), ("local", "ABBB")):
        m, a, b, c = three_cluster_method(router=router)
        letter = {a: "A", b: "B", c: "C"}
        names = [f"cluster/{g}" for g in (2, 0, 1)]  # any order: the mix indexes into `names`
        mix = m.route(Client("0", []), records, names, rt, m.downlink("0"))  # client 0 holds local clusters bound to A and B
        picked = "".join(letter[int(names[int(i)].split("/")[1])] for i in mix.idx[:, 0])
        assert picked == expected, router
        assert torch.all(mix.w == 1)


def oracle_setup(router: str):
    """Two clients with both tasks, separable embeddings, KMeans(2) local and global clusters."""
    rt = FakeRuntime(centres=SEPARATED)
    m = make(n_local=2, n_global=2, router=router)
    clients = {c: Client(c, two_task_records(10 + 5 * i)) for i, c in enumerate("01")}
    uploads = {c: m.setup_client(client, rt) for c, client in clients.items()}
    m.setup_server(uploads)
    return m, rt, clients, uploads


def test_oracle_router_picks_the_majority_cluster_of_the_true_task():
    # An "upper" input that reads like a "count" input: the nearest centroid is the count cluster.
    tricky = Record("How many letters has the word 'zzz'? ###", "ZZZ", "upper")
    plain = Record("Write the word in capitals: dog", "DOG", "upper")
    picks = {}
    for router in ("global", "oracle"):
        m, rt, clients, uploads = oracle_setup(router)
        names = list(m.eval_adapters(clients["0"], m.downlink("0")))
        mix = m.route(clients["0"], [tricky, plain], names, rt, m.downlink("0"))
        picks[router] = [int(names[int(i)].split("/")[1]) for i in mix.idx[:, 0]]
        report = m.eval_report("global", [Routed(c.id, [tricky.task, plain.task], names, mix, m.eval_facts(c))
                                           for c in clients.values()])
        upper_cluster = int(np.argmax([report["cluster_makeup"][str(g)]["upper"] for g in range(2)]))
        assert report["cluster_makeup"][str(upper_cluster)]["count"] == 0  # clusters follow tasks
        assert ("task_counts" in uploads["0"]) == (router == "oracle")  # oracle-only information
        if router == "oracle":
            assert picks[router] == [upper_cluster, upper_cluster]
            assert report["router_accuracy"] == 1.0
        else:
            assert picks[router] == [1 - upper_cluster, upper_cluster]
            assert report["router_accuracy"] == 0.5
            assert report["router_confusion"]["upper"][upper_cluster] == 2


# ----------------------------------------------------------------------------- bad parameters
def test_bad_parameters_get_one_clear_sentence():
    with pytest.raises(TaskfedError, match="method.schedule"):
        method_params({"name": "fedrouter", "schedule": "sometimes"})
    with pytest.raises(TaskfedError, match="method.router"):
        method_params({"name": "fedrouter", "router": "random"})
    m = make(n_global=5)
    with pytest.raises(TaskfedError, match="n_global: 5 global clusters need at least as many local clusters"):
        m.setup_server({"0": {"centroids": np.zeros((2, 3), dtype=np.float32)}})
    with pytest.raises(TaskfedError, match="client 0 has 2 training rows, fewer than n_local = 3"):
        make(n_local=3).setup_client(Client("0", two_task_records(1)), FakeRuntime(centres=SEPARATED))


# ----------------------------------------------------------------------------- end to end (tiny model)
@pytest.fixture(scope="module")
def two_tasks(tmp_path_factory):
    return write_two_task_data(tmp_path_factory.mktemp("two_tasks"), n_train=24, n_test=6)


def run_two_tasks(two_tasks, tiny_runtime_factory, out_dir, *method):
    train, test = two_tasks
    cfg = tiny_config("data.source=json", f"data.train_path={train}", f"data.test_path={test}",
                      "scenario.name=dual", "scenario.n_clients=2", "eval.max_rows_per_task=4", *method)
    rt = tiny_runtime_factory(cfg)
    embedded: list[str] = []
    hidden_states = rt.hidden_states

    def counting(texts, mix, pool, **kw):  # the embeddings (no adapter, mean pool) computed for the run
        if mix is None and pool == "mean":
            embedded.extend(texts)
        return hidden_states(texts, mix, pool, **kw)

    rt.hidden_states = counting
    metrics = run_experiment(cfg, out_dir=out_dir, rt=rt)
    return metrics, embedded


def test_run_writes_router_metrics(two_tasks, tiny_runtime_factory, tmp_path):
    metrics, embedded = run_two_tasks(two_tasks, tiny_runtime_factory, tmp_path / "run", "method.name=fedrouter",
                                      "method.n_local=2", "method.n_global=2")
    assert len(embedded) == len(set(embedded))  # every instruction embedded once for the whole run
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for mode in ("local", "global"):
        ev = saved["eval"][mode]
        assert set(ev) >= {"router_accuracy", "router_confusion", "cluster_makeup"}
        n_rows = sum(p["n"] for c in ev["per_client"].values() for p in c["per_task"].values())
        assert sum(sum(v) for v in ev["router_confusion"].values()) == n_rows
        assert sum(n for g in ev["cluster_makeup"].values() for n in g.values()) == 48  # all training rows
        # Separable tasks on the real path: each global cluster holds one task, the router finds it.
        assert all(min(g.values()) == 0 for g in ev["cluster_makeup"].values())
        assert ev["router_accuracy"] >= 0.9
    assert sorted(p.name for p in (tmp_path / "run" / "adapters" / "server").iterdir()) == ["cluster_0", "cluster_1"]


def test_run_oracles_and_switches_end_to_end(two_tasks, tiny_runtime_factory, tmp_path):
    metrics, _ = run_two_tasks(two_tasks, tiny_runtime_factory, tmp_path / "run", "method.name=fedrouter-oracle",
                               "method.n_global=2", "method.router=oracle", "method.schedule=all",
                               "method.global_clustering=adapters", "method.aggregation_weight=cluster")
    assert [r["bytes_up"] > 0 for r in metrics["rounds"]] == [True, True]
    for mode in ("local", "global"):
        ev = metrics["eval"][mode]
        assert ev["router_accuracy"] == 1.0  # the oracle router follows each task's majority cluster
        assert sorted(ev["binding"]) == ["0", "1"] and all(len(b) == 2 for b in ev["binding"].values())


# ----------------------------------------------------------------------------- embedding depth (embed_layers)
TEXTS = ["Write the word in capitals: apple", "How many letters has the word 'river'? Give the number. ###", "hi"]


def shallow_runtime(tiny_runtime_factory):
    """The tiny model (2 decoder layers) with a final-norm gain that is not all ones, so that applying the
    norm or not gives different vectors."""
    rt = tiny_runtime_factory(tiny_config())
    with torch.no_grad():
        norm = rt.decoder().norm.weight
        norm.copy_(torch.linspace(0.5, 2.0, norm.numel()))
    return rt


def reference_embedding(rt, text: str, layers: int) -> torch.Tensor:
    """Computed independently: the full model's hidden states (output_hidden_states), entry `layers` = the
    output of decoder layer `layers`, then the final norm, then the mean over the (unpadded) tokens."""
    enc = rt.tokenizer([text], return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = rt.decoder()(**enc, output_hidden_states=True, use_cache=False)
        return rt.decoder().norm(out.hidden_states[layers])[0].mean(0).float()


def test_shallow_embedding_is_the_normed_hidden_state_after_layer_l(tiny_runtime_factory):
    rt = shallow_runtime(tiny_runtime_factory)
    assert rt.n_layers == 2
    default = rt.embed(TEXTS)
    shallow = rt.embed(TEXTS, layers=1)  # three texts of different lengths: one padded batch
    for i, text in enumerate(TEXTS):
        ref = reference_embedding(rt, text, 1)
        torch.testing.assert_close(shallow[i], ref, rtol=1e-4, atol=1e-5)
        # The norm is applied: without it the vector is another one.
        enc = rt.tokenizer([text], return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            raw = rt.decoder()(**enc, output_hidden_states=True, use_cache=False).hidden_states[1][0].mean(0)
        assert (raw - shallow[i]).abs().max() > 1e-2
    assert (default - shallow).abs().max() > 1e-2  # another depth, another embedding
    # All layers (L = n_layers) is the default embedding itself, bit for bit, and shares its cache entries.
    assert torch.equal(rt.embed(TEXTS, layers=2), default)
    for i, text in enumerate(TEXTS):  # ... which is the mean of the full model's last hidden state
        enc = rt.tokenizer([text], return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            last = rt.decoder()(**enc, use_cache=False).last_hidden_state[0].mean(0)
        torch.testing.assert_close(default[i], last, rtol=1e-4, atol=1e-5)


def count_layer_calls(rt) -> list[int]:
    calls = []
    for i, layer in enumerate(rt.decoder().layers):
        layer.register_forward_hook(lambda mod, args, out, i=i: calls.append(i))
    return calls


def test_truncated_forward_runs_only_l_layers_and_restores_the_model(tiny_runtime_factory):
    rt = shallow_runtime(tiny_runtime_factory)
    layers = rt.decoder().layers
    calls = count_layer_calls(rt)
    rt.embed(TEXTS, layers=1)
    assert calls == [0]  # one batch, only the first decoder layer ran
    assert rt.decoder().layers is layers and len(layers) == 2
    calls.clear()
    rt.embed(["another text"])
    assert calls == [0, 1]  # the default runs both
    # An exception inside the truncated forward still puts the whole layer list back.
    calls.clear()
    handle = layers[0].register_forward_pre_hook(lambda mod, args: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        rt.embed(["fails"], layers=1)
    handle.remove()
    assert rt.decoder().layers is layers and len(rt.decoder().layers) == 2
    rt.embed(["works again"])
    assert calls[-2:] == [0, 1]
    with pytest.raises(ValueError), rt.first_layers(3):
        pass
    assert rt.decoder().layers is layers


def test_embedding_cache_keeps_depths_apart(tiny_runtime_factory):
    rt = shallow_runtime(tiny_runtime_factory)
    computed: list[tuple] = []
    hidden_states = rt.hidden_states

    def counting(texts, mix, pool, **kw):
        computed.append((kw.get("layers"), tuple(texts)))
        return hidden_states(texts, mix, pool, **kw)

    rt.hidden_states = counting
    shallow = rt.embed(TEXTS[:2], layers=1)
    default = rt.embed(TEXTS[:2])  # not served from the depth-1 entries
    assert computed == [(1, tuple(TEXTS[:2])), (None, tuple(TEXTS[:2]))]
    assert set(rt._embedded) == {(d, t) for d in (1, None) for t in TEXTS[:2]}
    computed.clear()
    assert torch.equal(rt.embed(TEXTS[:2], layers=1), shallow) and torch.equal(rt.embed(TEXTS[:2]), default)
    assert rt.embed(list(reversed(TEXTS)), layers=1).shape == (3, 64)  # only the new text is computed
    assert computed == [(1, (TEXTS[2],))]


def test_fedrouter_embed_layers_reaches_clustering_and_router(tiny_runtime_factory):
    rt = shallow_runtime(tiny_runtime_factory)
    records = two_task_records(10)
    texts = [r.instruction for r in records]
    for name, extra in (("fedrouter", {"n_local": 2}), ("fedrouter-oracle", {})):
        m = make(name, clients=("0",), n_global=2, embed_layers=1, **extra)
        client = Client("0", records)
        upload = m.setup_client(client, rt)
        emb = rt.embed(texts, layers=1).double().numpy()
        labels = client.store[LABELS]
        for k in range(2):  # local centroids (the server's global clustering input) come from depth 1
            np.testing.assert_allclose(upload["centroids"][k], emb[labels == k].mean(0), rtol=1e-5, atol=1e-6)
        m.setup_server({"0": upload})
        test = [Record("Write the word in capitals: zebra", "ZEBRA", "upper")]
        names = list(m.eval_adapters(client, m.downlink("0")))
        mix = m.route(client, test, names, rt, m.downlink("0"))
        want = int(np.argmin(np.linalg.norm(m.centroids - rt.embed([test[0].instruction], layers=1).double().numpy(), axis=1)))
        assert names[int(mix.idx[0, 0])] == f"cluster/{want}"
    assert {d for d, _ in rt._embedded} == {1}  # nothing computed at full depth


def test_embed_layers_out_of_range_is_refused_with_the_key(tiny_runtime_factory):
    rt = shallow_runtime(tiny_runtime_factory)
    with pytest.raises(TaskfedError, match=r"method\.embed_layers: 3 is more than the model's 2 decoder layers"):
        make(n_local=2, embed_layers=3).setup_client(Client("0", two_task_records(4)), rt)
    with pytest.raises(TaskfedError, match=r"method\.embed_layers: 5 is more than"):
        make("fedrouter-oracle", embed_layers=5).setup_client(Client("0", two_task_records(4)), rt)
    for bad in (0, -1, "two"):
        with pytest.raises(TaskfedError, match="bad value for 'method.embed_layers'"):
            method_params({"name": "fedrouter", "embed_layers": bad})
    assert method_params({"name": "fedrouter"}).embed_layers is None  # default: methods.md's embed(x)


def test_smoke_run_with_shallow_embedding(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from taskfed.cli import app
    from tests.conftest import ROOT

    monkeypatch.chdir(ROOT)
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", str(ROOT / "configs" / "fedrouter-dual.toml"), "--out", str(out),
                                      "--smoke", "--set", "method.embed_layers=1"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["rounds"]) >= 2
    for ev in metrics["eval"].values():
        assert ev["router_accuracy"] is not None and sum(sum(v) for v in ev["router_confusion"].values()) > 0
    assert "embed_layers = 1" in (out / "config.toml").read_text()
    bad = CliRunner().invoke(app, ["run", str(ROOT / "configs" / "fedrouter-dual.toml"), "--out", str(tmp_path / "bad"),
                                   "--smoke", "--set", "method.embed_layers=9"], catch_exceptions=False)
    assert bad.exit_code == 2 and "method.embed_layers" in bad.output, bad.output
    assert not (tmp_path / "bad").exists()
