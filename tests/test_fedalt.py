"""FedALT (methods.md, "FedALT"): R_i is the uniform mean of the other clients' latest individual LoRAs,
formed by streaming (S - L_i) / (n - 1); the mixer and L_i stay on the client; what travels is counted;
evaluation runs each client's (L_i, R_i, G_i) mixed per token."""

from __future__ import annotations

import math

import pytest
import torch

from taskfed.methods.base import LocalRef
from taskfed.methods.fedalt import MIXER, OWN
from taskfed.run import Experiment
from tests.conftest import tiny_config

TASKS = '["snli","trec","fix_punct"]'


def config(*extra: str):
    return tiny_config("method.name=fedalt", "scenario.n_clients=3", f"data.tasks={TASKS}", *extra)


def recorded_run(cfg):
    """Runs `cfg`; per round, the jobs' frozen R_i, the uploads, and every client's L_i and mixer after it."""
    ex = Experiment(cfg)
    log, aggregate = [], ex.method.aggregate

    def wrapped(r, results):
        results = list(results)
        aggregate(r, results)
        log.append({"results": results, "stores": {cid: dict(c.store) for cid, c in ex.engine.clients.items()}})
    ex.method.aggregate = wrapped
    ex.metrics_out = ex.run(None)
    return ex, log


@pytest.fixture(scope="module")
def run3():
    return recorded_run(config("train.rounds=3", 'data.unseen_tasks=["web_nlg_en"]', 'eval.modes=["local","global","unseen"]'))


def mean(adapters):
    return {k: torch.stack([a[k].double() for a in adapters]).mean(0) for k in adapters[0]}


def test_rest_is_the_mean_of_the_other_clients_latest_loras(run3):
    ex, log = run3
    assert all(isinstance(r.job.frozen[0][0], LocalRef) for r in log[0]["results"])  # round 0: a fresh LoRA, not sent
    for prev, entry in zip(log, log[1:]):
        latest = {r.job.client: r.weights for r in prev["results"]}
        for r in entry["results"]:
            rest = r.job.frozen[0][0]
            want = mean([w for cid, w in latest.items() if cid != r.job.client])
            for k in want:
                torch.testing.assert_close(rest[k].double(), want[k], rtol=1e-6, atol=1e-7)
    # The server holds one running sum and each client's latest upload, nothing per round.
    last = {r.job.client: r.weights for r in log[-1]["results"]}
    for k, s in ex.method.sum.items():
        torch.testing.assert_close(s, sum(w[k].double() for w in last.values()))


def test_the_client_keeps_its_lora_and_mixer_and_uploads_only_the_lora(run3):
    ex, log = run3
    for entry in log:
        for r in entry["results"]:
            store = entry["stores"][r.job.client]
            assert set(r.weights) == set(store[OWN]) and not any(k.endswith(".gate") for k in r.weights)
            assert all(torch.equal(r.weights[k], store[OWN][k]) for k in r.weights)  # the upload is L_i
            gate = store[MIXER]
            assert set(gate) == {k.removesuffix(".lora_A") + ".gate" for k in r.weights if k.endswith("lora_A")}
            assert all(g.shape[0] == 2 for g in gate.values())
    # The mixer trains (it starts at zero) and goes on from where it was.
    first, second = log[0]["stores"], log[1]["stores"]
    assert all(any(float(g.abs().max()) > 0 for g in first[c][MIXER].values()) for c in first)
    assert any(not torch.equal(first[c][MIXER][k], second[c][MIXER][k]) for c in first for k in first[c][MIXER])


def test_bytes_that_travel(run3):
    ex, log = run3
    shapes = ex.engine.rt.bank.shapes()
    p = 4 * sum(math.prod(s) for s in shapes.values())
    m = len(ex.method.fed.clients)
    rounds = ex.rounds
    assert rounds[0]["bytes_down"] == 0 and all(rec["bytes_down"] == m * p for rec in rounds[1:])  # R_i each
    assert all(rec["bytes_up"] == m * p for rec in rounds)  # L_i each; the mixer never leaves


def test_round_rest_averages_only_this_rounds_participants():
    from taskfed.methods import build_method
    from taskfed.methods.base import Federation, Job, Result

    init = {"m.lora_A": torch.zeros(2, 3), "m.lora_B": torch.zeros(3, 2)}
    fed = Federation(["a", "b", "c"], 3, 0, init, ["t"])
    ups = {c: {k: torch.full(v.shape, float(i + 1)) for k, v in init.items()} for i, c in enumerate("abc")}

    def fold(method, clients):
        method.aggregate(0, [Result(Job(c, "local", init), ups[c], 1, 1, 0.0) for c in clients])

    latest, rnd = (build_method({"name": "fedalt", "alt_rest": mode}, fed) for mode in ("latest", "round"))
    for m in (latest, rnd):
        fold(m, "abc")
        fold(m, "ab")
    # c's R_i: latest = mean(a, b) = 1.5 either way; a's: latest = mean(b, c) = 2.5, round = b alone = 2.
    assert float(latest.rest("a")["m.lora_A"][0, 0]) == 2.5 and float(rnd.rest("a")["m.lora_A"][0, 0]) == 2.0
    assert float(latest.rest("c")["m.lora_A"][0, 0]) == float(rnd.rest("c")["m.lora_A"][0, 0]) == 1.5


def test_evaluation_runs_each_clients_own_gated_model(run3):
    """Every mode scores every client under (L_i, R_i, G_i): the route is the client's mixer over "rest" and
    "local", and the model it evaluates is the per-token mix of the two (not either alone)."""
    from taskfed.evaluation.evaluate import load_gates
    from taskfed.model.bank import GateMix, RowMix

    ex, _ = run3
    assert set(ex.metrics_out["eval"]["local"]["per_client"]) == set(ex.engine.clients)
    assert set(ex.metrics_out["eval"]["global"]["per_client"]) == set(ex.engine.clients)
    unseen = ex.metrics_out["eval"]["unseen"]["per_client"]  # the same gated model on the held-out task only
    assert set(unseen) == set(ex.engine.clients) and all(set(c["per_task"]) == {"web_nlg_en"} for c in unseen.values())
    method, rt = ex.engine.client_side, ex.engine.rt
    cid, client = sorted(ex.engine.clients.items())[0]
    sent = ex.method.downlink(cid)
    adapters = method.eval_adapters(client, sent)
    assert torch.equal(adapters["local"]["model.layers.0.self_attn.q_proj.lora_B"],
                       client.store[OWN]["model.layers.0.self_attn.q_proj.lora_B"])
    records = client.records[:2]
    mix = method.route(client, records, list(adapters), rt, sent)
    assert mix.gate.tolist() == [0, 0] and method.eval_gates(client, sent)[0] is client.store[MIXER]
    rt.load_slots(list(adapters.values()))
    load_gates(rt.bank, method.eval_gates(client, sent))
    ids = torch.tensor([rt.encode(records[0]).ids])
    with torch.no_grad():
        outs = {}
        for name, m in {"gated": mix.select(torch.tensor([0])), "rest": RowMix.one_hot([0]), "local": RowMix.one_hot([1]),
                        "explicit": GateMix(torch.zeros(1, 1, dtype=torch.long), torch.tensor([[[0, 1]]]), 2)}.items():
            with rt.bank.mixing(m):
                outs[name] = rt.model(input_ids=ids).logits
    assert torch.equal(outs["gated"], outs["explicit"])
    assert not torch.allclose(outs["gated"], outs["rest"]) and not torch.allclose(outs["gated"], outs["local"])


# ----------------------------------------------------------------------------- as the other baselines: Flower, resume
def simulate_and_compare(root, runs: dict) -> None:
    """Each config of `runs` on Flower's Simulation Engine (3 supernodes, taskfed's own client app) and in
    process: the same metrics.json but timings, the same per-row scores, the same server adapters."""
    import json

    from taskfed.evaluation.rows import read_scores
    from tests.conftest import untimed
    from tests.test_flower import in_process, saved, simulate

    simulate(root, runs)
    for name, cfg in runs.items():
        want, ex = in_process(cfg, out=root / f"{name}-in-process")
        on_disk = json.loads((root / name / "metrics.json").read_text())
        got, ref = untimed(on_disk), untimed(json.loads(json.dumps(want)))
        differ = [(r["round"], k, r[k], q.get(k)) for r, q in zip(got["rounds"], ref["rounds"]) for k in r if r[k] != q.get(k)]
        assert got == ref, f"{name}: metrics differ from in-process (rounds: {differ})"
        assert on_disk["engine"] == "flower" and all(on_disk["eval"][m]["score"] is not None for m in on_disk["eval"])
        assert read_scores(root / name / "scores.csv") == read_scores(root / f"{name}-in-process" / "scores.csv")
        for adapter, weights in ex.method.server_adapters().items():
            got = saved(root / name, adapter)
            gap = max(float((got[k] - weights[k]).abs().max()) for k in weights)
            assert gap == 0, f"{name} {adapter} differs by up to {gap:g}"


def test_simulation_equals_in_process(tmp_path):
    from tests.test_flower import config as flower_config

    simulate_and_compare(tmp_path, {"fedalt": flower_config("fedalt")})


def test_a_run_stopped_mid_round_resumes_to_the_uninterrupted_result(tmp_path, reference, monkeypatch):
    """Stopped inside round 2's aggregation (the clients' L_i and mixers, the server's S and latest L_j
    checkpointed after round 1), in this process (the kill -9 variant is the other baselines' test)."""
    from taskfed import faults
    from taskfed.checkpoint import Checkpoints
    from tests.test_checkpoint import assert_same_run, cli, config as ckpt_config

    want = reference("fedalt")
    out = tmp_path / "stopped"
    faults.reset()
    monkeypatch.setenv("TASKFED_FAULT", "round-2.aggregate:raise")
    stopped = cli("run", ckpt_config("fedalt"), "--out", out, "--smoke")
    monkeypatch.delenv("TASKFED_FAULT")
    assert stopped.exit_code != 0 and "InjectedFault" in stopped.output and "--resume" in stopped.output
    assert list(Checkpoints(out, {}).steps())
    assert cli("run", ckpt_config("fedalt"), "--out", out, "--smoke", "--resume").exit_code == 0
    assert_same_run(want, out)


from tests.test_checkpoint import reference  # noqa: E402,F401  (the fixture: one uninterrupted smoke run)


@pytest.mark.parametrize("method", ["fedalt", "fedlease"])
def test_the_rivals_refuse_update_privacy(method):
    from taskfed.errors import TaskfedError

    with pytest.raises(TaskfedError, match=f"privacy.updates: method '{method}'"):
        config(f"method.name={method}", "privacy.updates.clip=1.0", "privacy.updates.noise_multiplier=1.0")
