"""FedLEASE (methods.md, "FedLEASE"): the one-shot clustering of the warm-up B's (three known groups are found
as three clusters by silhouette); the warm-up uploads only at its last round; experts and routers are the
uniform means within a cluster; a clustered job trains its expert and a 2K-1 logit top-K router over the
others frozen; evaluation runs every expert under the cluster router; Flower and resume give the same run."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from taskfed.clustering import clustering_accuracy
from taskfed.errors import TaskfedError
from taskfed.methods.base import LocalRef
from taskfed.methods.fedlease import KEPT, ROUTER, b_distances, lease_clusters
from tests.conftest import tiny_config
from tests.test_fedalt import TASKS, recorded_run

KEYS = [f"model.layers.{layer}.self_attn.{proj}.lora_{part}" for layer in range(2) for proj in ("q_proj", "v_proj")
        for part in "AB"]


def synthetic_clients(groups=(0, 1, 2, 0, 1, 2, 0, 1, 2), noise=0.3, seed=0):
    """One adapter per client: B = its group's B plus noise (A random: the distance must ignore A)."""
    g = torch.Generator().manual_seed(seed)
    centres = [{k: torch.randn(8, 4, generator=g) for k in KEYS if k.endswith("B")} for _ in range(max(groups) + 1)]
    return [{k: (centres[grp][k] + noise * torch.randn(8, 4, generator=g)) if k.endswith("B")
             else torch.randn(4, 8, generator=g) for k in KEYS} for grp in groups]


def test_three_known_groups_give_three_clusters_by_silhouette_and_every_client_right():
    groups = (0, 1, 2, 0, 1, 2, 0, 1, 2)
    labels, scores = lease_clusters(b_distances(synthetic_clients(groups)), k_max=4)
    assert sorted(scores) == [2, 3, 4] and max(scores, key=scores.get) == 3
    assert len(set(labels.tolist())) == 3 and clustering_accuracy(labels, groups) == 1.0
    assert labels.tolist() == [0, 1, 2, 0, 1, 2, 0, 1, 2]  # canonical: numbered by first appearance


def test_the_distance_is_the_mean_over_layers_and_projections_of_one_minus_cosine():
    clients = synthetic_clients((0, 1, 0), noise=0.5, seed=3)
    d = b_distances(clients)
    b_keys = [k for k in KEYS if k.endswith("B")]
    cos = lambda a, b: float(torch.nn.functional.cosine_similarity(a.reshape(-1), b.reshape(-1), dim=0))  # noqa: E731
    want = np.mean([1 - cos(clients[0][k], clients[1][k]) for k in b_keys])  # equal layer counts per projection
    assert np.isclose(d[0, 1], want) and np.allclose(d, d.T) and np.all(np.diag(d) == 0)
    # A never counts: the same B's with other A's are at distance 0
    other_a = {k: (torch.randn(4, 8) if k.endswith("A") else v) for k, v in clients[0].items()}
    assert np.isclose(b_distances([clients[0], other_a])[0, 1], 0.0, atol=1e-12)


def test_k_stops_below_the_number_of_clients():
    labels, scores = lease_clusters(b_distances(synthetic_clients((0, 1, 1))), k_max=4)
    assert sorted(scores) == [2] and labels.tolist() == [0, 1, 1]


# ----------------------------------------------------------------------------- the method's rounds
def config(*extra: str):
    return tiny_config("method.name=fedlease", "scenario.n_clients=3", f"data.tasks={TASKS}", *extra)


@pytest.fixture(scope="module")
def run4():
    """Rounds 0-1 warm-up (round 1 the last: it uploads and clusters), rounds 2-3 clustered; 3 clients: K = 2."""
    return recorded_run(config("train.rounds=4", "method.warmup=2"))


def uniform_mean(adapters):
    """The float64 mean in upload order, as float32 (what a streaming uniform mean must give bit for bit)."""
    return {k: (sum(a[k].double() for a in adapters) / len(adapters)).float() for k in adapters[0]}


def by_cluster(results, labels, what=lambda r: r.weights):
    groups = {}
    for r in results:
        groups.setdefault(labels[r.job.client], []).append(what(r))
    return groups


def assert_equal(a, b):
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_warm_up_trains_locally_and_uploads_only_at_its_last_round(run4):
    ex, log = run4
    shapes = ex.engine.rt.bank.shapes()
    p = 4 * sum(math.prod(s) for s in shapes.values())
    r_k = 4 * 3 * sum(s[1] for k, s in shapes.items() if k.endswith("lora_A"))  # 2K-1 = 3 logits per d_in
    m, k = 3, ex.method.k
    assert k == 2
    assert all(r.weights is None and isinstance(r.job.init, LocalRef) for r in log[0]["results"])
    assert all(set(r.weights) == set(shapes) for r in log[1]["results"])  # "mean": the whole LoRA, for its A's
    # Round 1 continues from each client's round-0 LoRA, held in its store (nothing travels).
    assert all(r.job.init.name == r.job.keep_as for r in log[1]["results"])
    rounds = ex.rounds
    assert [rec["bytes_down"] for rec in rounds] == [0, 0, m * (k * p + r_k), m * (k * p + r_k)]
    assert [rec["bytes_up"] for rec in rounds] == [0, m * p, m * (p + r_k), m * (p + r_k)]
    assert rounds[1]["fedlease_k"] == 2 and set(rounds[1]["fedlease_silhouette"]) == {"2"}
    assert sorted(rounds[1]["fedlease_cluster_sizes"]) == [1, 2] and "fedlease_k" not in rounds[2]


def test_own_init_uploads_b_only_and_starts_from_the_clients_warm_up_lora():
    from taskfed.methods import build_method
    from taskfed.methods.base import Federation, Job, Result

    keys = [f"model.layers.0.self_attn.{p}.lora_{f}" for p in ("q_proj", "v_proj") for f in "AB"]
    init = {k: torch.zeros(2, 4) if k.endswith("A") else torch.zeros(4, 2) for k in keys}
    fed = Federation(["a", "b", "c"], 3, 0, init, ["t"])
    method = build_method({"name": "fedlease", "warmup": 2, "lease_init": "own"}, fed)
    assert [j.upload for j in method.plan(0, ["a"])] == [False]
    last = method.plan(1, ["a"])
    assert [j.client for j in last] == ["a", "b", "c"] and all(j.sends == ("B",) for j in last)  # every client
    ups = {c: {k: torch.full(v.shape, s) for k, v in init.items() if k.endswith("B")} for c, s in zip("abc", (1., 1., -1.))}
    method.aggregate(1, [Result(j, ups[j.client], 1, 1, 0.0) for j in last])
    assert method.labels == {"a": 0, "b": 0, "c": 1}
    for job in method.plan(2, ["a", "c"]):  # the own warm-up LoRA in its slot, the other expert fresh (not sent)
        assert isinstance(job.init, LocalRef) and job.init.name == last[0].keep_as
        assert [(w.default is init, coef) for w, coef in job.frozen] == [(True, 1.0)]
    assert all(not isinstance(job.init, LocalRef) for job in method.plan(3, ["a"]))  # later: the server's expert


def test_clusters_are_the_warm_up_bs_and_experts_and_routers_are_cluster_means(run4):
    ex, log = run4
    labels = ex.method.labels
    warm = sorted(log[1]["results"], key=lambda r: r.job.client)
    want, _ = lease_clusters(b_distances([r.weights for r in warm]), 4)
    assert [labels[r.job.client] for r in warm] == want.tolist()
    # Round 2's experts: each cluster's uniform mean of its members' warm-up LoRAs; round 3's and the last: of
    # their round's uploads; routers likewise, each within its own cluster only.
    experts = {2: {g: uniform_mean(ws) for g, ws in by_cluster(log[1]["results"], labels).items()}}
    routers = {}
    for i in (2, 3):
        experts[i + 1] = {g: uniform_mean(ws) for g, ws in by_cluster(log[i]["results"], labels).items()}
        routers[i + 1] = {g: uniform_mean(rs) for g, rs in
                          by_cluster(log[i]["results"], labels, lambda r: r.extra[ROUTER]).items()}
    for i in (2, 3):
        for r in log[i]["results"]:
            assert_equal(r.job.init, experts[i][labels[r.job.client]])
    for r in log[3]["results"]:
        assert_equal(r.job.extra[ROUTER], routers[3][labels[r.job.client]])
    for g in range(2):
        assert_equal(ex.method.experts[g], experts[4][g])
        assert_equal(ex.method.routers[g], routers[4][g])
    assert not torch.equal(*(next(iter(ex.method.routers[g].values())) for g in range(2)))


def test_a_clustered_job_trains_its_expert_and_a_top_k_router_over_the_others_frozen(run4):
    ex, log = run4
    labels, side = ex.method.labels, ex.engine.client_side
    for i in (2, 3):
        inits = {labels[r.job.client]: r.job.init for r in log[i]["results"]}
        for r in log[i]["results"]:
            g, job = labels[r.job.client], r.job
            assert job.adapter == f"expert/{g}" and [(w, c) for w, c in job.frozen] == [(inits[1 - g], 1.0)]
            gating = side.job_correction(ex.engine.clients[job.client], job).gating
            # logits: expert 0, expert 1, then K - 1 = 1 alias of the own expert (term 0: the trained one)
            assert gating.terms == {0: (0, 1, 0), 1: (1, 0, 0)}[g] and gating.top_k == 2
            assert gating.gate is job.extra[ROUTER] and all(v.shape[0] == 3 for v in gating.gate.values())
            if i == 2:
                assert all(float(v.abs().max()) == 0 for v in gating.gate.values())  # the routers start at zero
            # The upload: the expert without gate keys, and the trained router the client also keeps.
            assert not any(k.endswith(".gate") for k in r.weights)
            assert_equal(r.extra[ROUTER], log[i]["stores"][job.client][KEPT])
            assert any(float(v.abs().max()) > 0 for v in r.extra[ROUTER].values())


def test_evaluation_runs_every_expert_under_the_cluster_router(run4):
    from taskfed.evaluation.evaluate import load_gates
    from taskfed.model.bank import GateMix, RowMix

    ex, _ = run4
    for mode in ("local", "global"):
        assert set(ex.metrics_out["eval"][mode]["per_client"]) == set(ex.engine.clients)
    assert sorted(map(len, ex.metrics_out["eval"]["local"]["fedlease_clusters"].values())) == [1, 2]
    method, rt = ex.engine.client_side, ex.engine.rt
    cid = max(ex.method.labels, key=lambda c: (ex.method.labels[c], c))
    g, client = ex.method.labels[cid], ex.engine.clients[cid]
    sent = ex.method.downlink(cid)
    adapters = method.eval_adapters(client, sent)
    assert list(adapters) == ["expert/0", "expert/1"]
    records = client.records[:2]
    mix = method.route(client, records, list(adapters), rt, sent)
    assert mix.gate.tolist() == [0, 0] and mix.idx.tolist() == [[0, 1, g]] * 2 and mix.top_k == 2 and mix.n == 2
    assert_equal(method.eval_gates(client, sent)[0], ex.method.routers[g])
    rt.load_slots(list(adapters.values()))
    load_gates(rt.bank, method.eval_gates(client, sent))
    ids = torch.tensor([rt.encode(records[0]).ids])
    outs = {}
    with torch.no_grad():
        for name, m in {"gated": mix.select(torch.tensor([0])), "e0": RowMix.one_hot([0]), "e1": RowMix.one_hot([1]),
                        "explicit": GateMix(torch.zeros(1, 1, dtype=torch.long), torch.tensor([[[0, 1, g]]]), 2, 2)}.items():
            with rt.bank.mixing(m):
                outs[name] = rt.model(input_ids=ids).logits
    assert torch.equal(outs["gated"], outs["explicit"])
    assert not torch.allclose(outs["gated"], outs["e0"]) and not torch.allclose(outs["gated"], outs["e1"])
    # What `taskfed serve` loads: the same experts, logits and router (the one evaluated, not the one trained).
    state = ex.method.router_state()
    assert state.kind == "gate" and state.adapters == list(adapters) and state.params["top_k"] == 2
    assert state.params["models"][cid] == {"adapters": list(adapters), "logits": [0, 1, g]}
    assert_equal(method.client_arrays(client, rt, sent)[state.params["gate"]], ex.method.routers[g])


def test_a_wrong_shaped_or_nan_router_upload_is_refused():
    from taskfed.flower.codec import decode_extra, decode_jobs, encode_adapter, encode_jobs
    from taskfed.methods.base import Job
    from taskfed.model.peft_io import check_upload

    shapes = {"m.lora_A": (2, 5), "m.lora_B": (4, 2)}
    sent = {"m.gate": torch.zeros(3, 5)}
    job = Job("a", "expert/0", {k: torch.zeros(s) for k, s in shapes.items()}, extra={ROUTER: sent})
    expert = {k: torch.zeros(s) for k, s in shapes.items()}
    check_upload(expert, {ROUTER: {"m.gate": torch.ones(3, 5)}}, shapes, job, "upload")  # as it went: accepted
    bad = {"width": {"m.gate": torch.ones(2, 5)}, "d_in": {"m.gate": torch.ones(3, 4)},
           "nan": {"m.gate": torch.full((3, 5), float("nan"))}, "key": {"n.gate": torch.ones(3, 5)}}
    reasons = {"width": "shape \\(2, 5\\), expected \\(3, 5\\)", "d_in": "shape \\(3, 4\\), expected \\(3, 5\\)",
               "nan": "NaN", "key": "lacks tensor 'm.gate'"}
    for name, router in bad.items():
        with pytest.raises(TaskfedError, match=f"upload \\('router'\\).*{reasons[name]}"):
            check_upload(expert, {ROUTER: router}, shapes, job, "upload")
        with pytest.raises(TaskfedError, match=reasons[name]):  # the Flower server's decoding of a reply
            decode_extra(encode_adapter(router), shapes, "reply", like=sent)
    # A node receives the router a job carries as a gate (and refuses one whose modules disagree in width).
    _, (back,) = decode_jobs(encode_jobs([job], 2, config()), shapes)
    assert_equal(back.extra[ROUTER], sent)
    odd = Job("a", "expert/0", job.init, extra={ROUTER: {"m.gate": torch.zeros(3, 5), "m2.gate": torch.zeros(2, 5)}})
    with pytest.raises(TaskfedError, match="unexpected tensor 'm2.gate'"):
        decode_jobs(encode_jobs([odd], 2, config()), shapes)


def test_warm_up_must_leave_a_clustered_round():
    with pytest.raises(TaskfedError, match="method.warmup.*fewer warm-up rounds than train.rounds"):
        config("train.rounds=3", "method.warmup=3")
    from taskfed.methods import build_method
    from taskfed.methods.base import Federation

    with pytest.raises(TaskfedError, match="scenario.n_clients.*at least 3 clients, got 2"):
        build_method({"name": "fedlease", "warmup": 1}, Federation(["a", "b"], 2, 0, {}, ["t"]))


# ----------------------------------------------------------------------------- as the other baselines: Flower, resume
def test_simulation_equals_in_process(tmp_path):
    from tests.test_fedalt import simulate_and_compare
    from tests.test_flower import config as flower_config

    simulate_and_compare(tmp_path, {"fedlease": flower_config("fedlease", "method.warmup=1")})


def test_a_run_stopped_in_its_first_clustered_round_resumes_to_the_uninterrupted_result(tmp_path, reference, monkeypatch):
    """--smoke: warm-up 1, so the checkpoint after round 1 holds the clustering, the experts and the routers."""
    from taskfed import faults
    from taskfed.checkpoint import Checkpoints
    from tests.test_checkpoint import assert_same_run, cli, config as ckpt_config

    want, out = reference("fedlease"), tmp_path / "stopped"
    faults.reset()
    monkeypatch.setenv("TASKFED_FAULT", "round-2.aggregate:raise")
    stopped = cli("run", ckpt_config("fedlease"), "--out", out, "--smoke")
    monkeypatch.delenv("TASKFED_FAULT")
    assert stopped.exit_code != 0 and "InjectedFault" in stopped.output and list(Checkpoints(out, {}).steps())
    assert cli("run", ckpt_config("fedlease"), "--out", out, "--smoke", "--resume").exit_code == 0
    assert_same_run(want, out)


from tests.test_checkpoint import reference  # noqa: E402,F401  (the fixture: one uninterrupted smoke run)
