"""FedDPA-T / FedDPA-F on the tiny model: what travels, the stop-gradient, per-row weights, the extra round."""

from __future__ import annotations

import json

import pytest
import torch

from taskfed.config import load_config
from taskfed.data.records import Record
from taskfed.engine.inprocess import InProcessEngine
from taskfed.errors import TaskfedError
from taskfed.evaluation import generate as gen
from taskfed.evaluation.generate import prompt_ids
from taskfed.methods import build_method
from taskfed.methods.base import Client, Federation, Job, Result
from taskfed.methods.feddpa import LOCAL, FedDPAF, FedDPAT
from taskfed.model.bank import RowMix
from taskfed.model.peft_io import n_bytes
from taskfed.run import Experiment, run_experiment
from taskfed.training import train_pack

from .conftest import tiny_config, write_two_task_data

IN_DOMAIN = "Write the word in capitals: river"
OUT_OF_DOMAIN = "How many letters has the word 'piano'? Give the number. ###"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_two_task_data(tmp_path_factory.mktemp("two_tasks"))


def _cfg(data, method: str, *extra: str):
    train, test = data
    return tiny_config(f"method.name={method}", "data.source=json", f"data.train_path={train}",
                       f"data.test_path={test}", "scenario.name=single", "scenario.n_clients=2", *extra)


def _random_adapter(rt, seed: int, scale: float = 0.3):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(*s, generator=g) * scale for k, s in rt.bank.shapes().items()}


def _fed(rt, clients: list[str], rounds: int = 2) -> Federation:
    return Federation(clients=clients, rounds=rounds, seed=0, init_adapter=rt.init_adapter(), tasks=["upper", "count"])


def _upper_client(n: int = 12) -> Client:
    words = ["apple", "river", "stone", "cloud", "tiger", "piano"]
    return Client("0", [Record(f"Write the word in capitals: {words[i % len(words)]}", words[i % len(words)].upper(),
                               "upper") for i in range(n)])


def _logits(rt, prompts: list[list[int]], mix: RowMix) -> list[torch.Tensor]:
    """Right-padded forward pass (every row's real tokens keep positions 0..L-1); each row's own logits."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), rt.tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.tensor(p)
        mask[i, : len(p)] = 1
    with torch.no_grad(), rt.bank.mixing(mix):
        out = rt.model(input_ids=ids, attention_mask=mask).logits
    return [out[i, : len(p)] for i, p in enumerate(prompts)]


def _generate(rt, prompts, mix, n):
    out = gen.generate(rt, prompts, mix, n)
    return out[0] if isinstance(out, tuple) else out  # texts (newer cores also return a token count)


def _tensors(obj):
    """Every tensor reachable from a Result (weights, the job's init, its frozen terms)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)
    elif hasattr(obj, "__dataclass_fields__"):
        for name in obj.__dataclass_fields__:
            yield from _tensors(getattr(obj, name))


# --------------------------------------------------------------------------------------------- training
def test_only_the_global_adapter_reaches_the_server(data, tiny_runtime_factory):
    cfg = _cfg(data, "feddpa-t", "train.rounds=3")
    exp = Experiment(cfg, rt=tiny_runtime_factory(cfg))
    seen, locals_held = [], []
    aggregate = exp.method.aggregate

    def spy(round_idx, results):  # what the server side receives, and what the clients hold right then
        results = list(results)  # the round's uploads, all of them trained by now (the engine streams them)
        seen.append((round_idx, results))
        locals_held.extend(c.store[LOCAL] for c in exp.clients.values() if LOCAL in c.store)
        return aggregate(round_idx, results)

    exp.method.aggregate = spy
    rounds, _ = exp.train()
    size = n_bytes(exp.rt.init_adapter())
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert len(locals_held) == 2 * 2  # both clients, rounds 1 and 2
    for round_idx, results in seen:
        uploaded = [r for r in results if r.weights is not None]
        assert sorted(r.job.client for r in uploaded) == ["0", "1"]
        assert all(r.job.adapter == "global" and r.job.upload for r in uploaded)
        # The server receives uploads only: the local jobs' results (rounds 1, 2) never reach it.
        assert all(r.weights is not None for r in results)
        assert len(results) == 2
        for t in _tensors(results):
            for held in locals_held:
                assert not any(t.shape == v.shape and torch.equal(t, v) for v in held.values())
    # One global adapter up per client per round; one down per client (the local job's frozen term is the
    # same received adapter, not a second download); the local adapter costs nothing.
    assert all(r["bytes_up"] == 2 * size and r["bytes_down"] == 2 * size for r in rounds)
    # The local adapters are the clients' own: trained, and different from each other and the global one.
    g = exp.method.server_adapters()["global"]
    l0, l1 = (exp.method.client_adapters(exp.clients[c])["local"] for c in ("0", "1"))
    assert not torch.equal(l0[next(iter(l0))], l1[next(iter(l1))])
    assert not any(torch.equal(l0[k], g[k]) for k in g if k.endswith("lora_B"))


def test_feddpa_t_local_step_gives_the_global_adapter_no_gradient(data, tiny_runtime_factory):
    cfg = _cfg(data, "feddpa-t", "method.a=0.3")
    rt = tiny_runtime_factory(cfg)
    client = _upper_client()
    method = build_method(cfg.method, _fed(rt, ["0"]))
    assert isinstance(method, FedDPAT)
    received = _random_adapter(rt, 1)
    method.global_adapter = received
    assert [j.adapter for j in method.plan(0, ["0"])] == ["global"]  # round 0: the global adapter only
    jobs = method.plan(1, ["0"])
    assert [j.adapter for j in jobs] == ["local", "global"]
    local_job, global_job = jobs
    assert global_job.init is received and global_job.upload and not global_job.frozen
    engine = InProcessEngine(rt, {"0": client}, cfg)
    spec, _, _ = engine._spec(local_job, 1)  # the spec the engine trains
    assert spec.scale == pytest.approx(0.3)
    assert len(spec.frozen) == 1 and spec.frozen[0][0] is received and spec.frozen[0][1] == pytest.approx(0.7)
    assert all(torch.equal(spec.init[k], rt.init_adapter()[k]) for k in spec.init)  # fresh at round 1

    grads = {"trained": [], "frozen": []}  # slot 0: the local adapter, slot 1: the frozen global term

    def record(g):
        grads["trained"].append(g[0].abs().sum().item())
        grads["frozen"].append(g[1].abs().sum().item())

    hooks = [p.register_hook(record) for p in rt.bank.parameters()]
    try:
        (trained, _), = train_pack(rt, [spec])
    finally:
        for h in hooks:
            h.remove()
    assert grads["frozen"] and all(v == 0.0 for v in grads["frozen"])
    assert sum(grads["trained"]) > 0
    assert all(torch.equal(rt.bank.read(1)[k], received[k]) for k in received)  # the global slot is unchanged
    assert not all(torch.equal(trained[k], spec.init[k]) for k in trained)  # the local adapter did train

    # The frozen term does take part in the forward pass: without it the local adapter trains differently.
    spec.frozen = []
    (alone, _), = train_pack(rt, [spec])
    assert not all(torch.allclose(alone[k], trained[k]) for k in trained)


def test_feddpa_f_adds_one_round_that_uploads_nothing(data, tiny_runtime_factory, tmp_path):
    cfg = _cfg(data, "feddpa-f", "train.rounds=2", "eval.modes=[\"local\"]")
    exp = Experiment(cfg, rt=tiny_runtime_factory(cfg))
    assert isinstance(exp.method, FedDPAF) and exp.method.n_rounds(2) == 3
    globals_after = []
    aggregate = exp.method.aggregate

    def spy(round_idx, results):
        results = list(results)
        out = aggregate(round_idx, results)
        globals_after.append(exp.method.global_adapter)
        if round_idx == 2:
            assert results == []  # the fine-tuning round's local jobs send the server nothing
        return out

    exp.method.aggregate = spy
    metrics = exp.run(tmp_path / "run")
    size = n_bytes(exp.rt.init_adapter())
    assert [r["round"] for r in metrics["rounds"]] == [0, 1, 2]
    assert [r["bytes_up"] for r in metrics["rounds"]] == [2 * size, 2 * size, 0]
    assert metrics["rounds"][2]["bytes_down"] == 2 * size  # the final global adapter, copied by each client
    assert globals_after[2] is globals_after[1]  # the fine-tuning round leaves the server's adapter alone
    for cid, client in exp.clients.items():
        local = client.store[LOCAL]  # a fine-tuned copy of the final global adapter
        assert not all(torch.equal(local[k], globals_after[1][k]) for k in local)
    saved = tmp_path / "run" / "adapters"
    assert (saved / "server" / "global").is_dir() and (saved / "clients" / "0" / "local").is_dir()
    weights = json.loads((tmp_path / "run" / "metrics.json").read_text())["eval"]["local"]["feddpa_weights"]
    assert set(weights["per_client"]) == {"0", "1"}


def test_same_seed_same_adapters(data, tiny_runtime_factory):
    cfg = _cfg(data, "feddpa-t", "train.rounds=3")
    runs = []
    for _ in range(2):
        exp = Experiment(cfg, rt=tiny_runtime_factory(cfg))
        exp.train()
        adapters = {"global": exp.method.server_adapters()["global"]}
        adapters.update({cid: exp.method.client_adapters(c)["local"] for cid, c in exp.clients.items()})
        records = exp.test_by_task["upper"] + exp.test_by_task["count"]
        w = exp.method.local_weights(exp.clients["0"], records, exp.rt)
        runs.append((adapters, w))
    (a1, w1), (a2, w2) = runs
    for name in a1:
        assert all(torch.equal(a1[name][k], a2[name][k]) for k in a1[name]), name
    assert torch.equal(w1, w2)


# --------------------------------------------------------------------------------------------- inference
@pytest.fixture(scope="module")
def mixing_setup(data, tiny_runtime_factory):
    """A runtime, a client of the 'upper' task holding a local adapter, and a server-sent global adapter."""
    cfg = _cfg(data, "feddpa-t")
    rt = tiny_runtime_factory(cfg)
    client = _upper_client()
    client.store[LOCAL] = _random_adapter(rt, 2)
    global_adapter = _random_adapter(rt, 3)
    return rt, client, global_adapter


def _method(rt, global_adapter, **params):
    method = build_method({"name": "feddpa-t", **params}, _fed(rt, ["0"]))
    method.global_adapter = global_adapter
    return method


def test_each_row_of_a_batch_gets_its_own_weights(mixing_setup):
    rt, client, global_adapter = mixing_setup
    method = _method(rt, global_adapter)
    records = [Record(IN_DOMAIN, "RIVER", "upper"), Record(OUT_OF_DOMAIN, "5", "count")]
    adapters = method.eval_adapters(client, method.downlink(client.id))
    names = list(adapters)
    mix = method.route(client, records, names, rt, method.downlink(client.id))
    assert mix.idx.shape == (2, 2) and mix.idx.tolist() == [[0, 1], [0, 1]]  # (global, local) on every row
    assert torch.allclose(mix.w.sum(1), torch.ones(2))
    assert abs(float(mix.w[0, 1] - mix.w[1, 1])) > 1e-3  # different weights on the two rows
    rt.load_slots([adapters[n] for n in names])
    prompts = [prompt_ids(rt, r.instruction, 6) for r in records]
    together = _logits(rt, prompts, mix)
    generated = _generate(rt, prompts, mix, 6)
    for row in range(2):
        alone = _logits(rt, [prompts[row]], mix.select(torch.tensor([row])))[0]
        assert torch.allclose(together[row], alone, atol=1e-5)
        assert _generate(rt, [prompts[row]], mix.select(torch.tensor([row])), 6) == [generated[row]]
    # Not vacuous: row 0 under row 1's weights gives other logits.
    swapped = _logits(rt, [prompts[0]], mix.select(torch.tensor([1])))[0]
    assert not torch.allclose(together[0], swapped, atol=1e-4)


def test_extreme_weights_equal_one_adapter_alone(mixing_setup):
    rt, client, global_adapter = mixing_setup
    records = [Record(IN_DOMAIN, "RIVER", "upper"), Record(OUT_OF_DOMAIN, "5", "count")]
    for w_local, alone_name in ((0.0, "global"), (1.0, "local")):
        method = _method(rt, global_adapter, weighting="fixed", w_fixed=w_local)
        adapters = method.eval_adapters(client, method.downlink(client.id))
        names = list(adapters)
        mix = method.route(client, records, names, rt, method.downlink(client.id))
        rt.load_slots([adapters[n] for n in names])
        prompts = [prompt_ids(rt, r.instruction, 6) for r in records]
        mixed = _logits(rt, prompts, mix)
        single = _logits(rt, prompts, RowMix.one_hot([names.index(alone_name)] * 2))
        for a, b in zip(mixed, single):
            assert torch.allclose(a, b, atol=1e-6)
        other = _logits(rt, prompts, RowMix.one_hot([names.index("local" if alone_name == "global" else "global")] * 2))
        assert not torch.allclose(mixed[0], other[0], atol=1e-4)


def test_each_weighting_setting_points_the_documented_way(mixing_setup):
    rt, _, global_adapter = mixing_setup
    # A client whose training instructions are all one text: an input identical to it has s(x) = 1 exactly
    # (the largest possible), so it must get the largest local weight under "local", the smallest under
    # "official"; any other input gets strictly less / more.
    same = Client("0", [Record(IN_DOMAIN, "RIVER", "upper")] * 8)
    same.store[LOCAL] = _random_adapter(rt, 2)
    records = [Record(IN_DOMAIN, "RIVER", "upper"), Record(OUT_OF_DOMAIN, "5", "count")]
    local = _method(rt, global_adapter).local_weights(same, records, rt)
    official = _method(rt, global_adapter, weighting="official").local_weights(same, records, rt)
    fixed = _method(rt, global_adapter, weighting="fixed").local_weights(same, records, rt)
    assert local[0] == pytest.approx(0.5, abs=1e-6) and local[1] < local[0]  # w_local = w_max * s(x)
    assert official[0] == pytest.approx(0.5, abs=1e-6) and official[1] > official[0]  # w_global = w_max * s(x)
    assert fixed.tolist() == [0.5, 0.5]
    assert torch.all((local >= 0) & (local <= 0.5)) and torch.all((official >= 0.5) & (official <= 1))
    # w_max scales the local-side weights linearly.
    scaled = _method(rt, global_adapter, w_max=0.25).local_weights(same, records, rt)
    assert torch.allclose(scaled, local / 2, atol=1e-6)

    # On a client with varied instructions of its task: its task's inputs (unseen words) against the other
    # task's, under the client's local adapter.
    _, client, _ = mixing_setup
    words = ["lemon", "chair", "ocean", "maple"]
    mine = [Record(f"Write the word in capitals: {w}", "", "upper") for w in words]
    other = [Record(f"How many letters has the word '{w}'? Give the number. ###", "", "count") for w in words]
    local = _method(rt, global_adapter).local_weights(client, mine + other, rt)
    official = _method(rt, global_adapter, weighting="official").local_weights(client, mine + other, rt)
    assert local[:4].min() > local[4:].max()
    assert official[:4].max() < official[4:].min()
    # The raw-instruction switch embeds other texts, hence other weights.
    raw = _method(rt, global_adapter, h_text="instruction").local_weights(client, mine + other, rt)
    assert not torch.allclose(raw, local)


def test_k_seeded_references_per_input(mixing_setup):
    rt, client, global_adapter = mixing_setup
    method = _method(rt, global_adapter)
    refs = method.references(client, IN_DOMAIN)
    assert len(refs) == 5 and all(r in {x.instruction for x in client.records} for r in refs)
    assert refs == method.references(client, IN_DOMAIN)  # seeded: same input, same references
    # A row's weight does not depend on the other rows routed with it.
    both = method.local_weights(client, [Record(IN_DOMAIN, "", "upper"), Record(OUT_OF_DOMAIN, "", "count")], rt)
    alone = method.local_weights(client, [Record(OUT_OF_DOMAIN, "", "count")], rt)
    assert float(both[1]) == pytest.approx(float(alone[0]), abs=1e-5)


def test_weights_are_recorded_per_row_in_the_evaluation(data, tiny_runtime_factory):
    cfg = _cfg(data, "feddpa-t", "train.rounds=2")
    metrics = run_experiment(cfg, rt=tiny_runtime_factory(cfg))
    for mode in ("local", "global"):
        report = metrics["eval"][mode]["feddpa_weights"]
        assert report["weighting"] == "local" and report["w_max"] == 0.5
        for cid, entry in report["per_client"].items():
            n_rows = sum(t["n"] for t in metrics["eval"][mode]["per_client"][cid]["per_task"].values())
            assert len(entry["w_local"]) == n_rows
            assert entry["w_local_min"] <= entry["w_local_mean"] <= entry["w_local_max"] <= 0.5
            assert set(entry["w_local_by_task"]) == set(metrics["eval"][mode]["per_client"][cid]["per_task"])
    # In the global mode a client's rows span both tasks: their weights differ row by row.
    assert len(set(metrics["eval"]["global"]["feddpa_weights"]["per_client"]["0"]["w_local"])) > 1


def test_server_mean_is_uniform_by_default_and_by_samples_on_switch(mixing_setup):
    rt, _, _ = mixing_setup
    a, b = _random_adapter(rt, 5), _random_adapter(rt, 6)
    results = [Result(Job("0", "global", a), a, 10, 10, 0.0), Result(Job("1", "global", b), b, 30, 30, 0.0),
               Result(Job("1", "local", a, upload=False), None, 30, 30, 0.0)]  # a local job: no weights
    key = next(iter(a))
    for mean, expected in (("uniform", 0.5 * a[key] + 0.5 * b[key]), ("samples", 0.25 * a[key] + 0.75 * b[key])):
        method = _method(rt, a, mean=mean)
        method.aggregate(0, results)
        assert torch.allclose(method.server_adapters()["global"][key], expected, atol=1e-6)


def test_bad_parameters_get_one_sentence():
    with pytest.raises(TaskfedError, match="method.weighting"):
        load_config(None, ["method.name=feddpa-t", "method.weighting=auto"])
    with pytest.raises(TaskfedError, match="method.a"):
        load_config(None, ["method.name=feddpa-t", "method.a=0"])
    with pytest.raises(TaskfedError, match="unknown key 'method.a'"):
        load_config(None, ["method.name=feddpa-f", "method.a=0.5"])  # FedDPA-F has no local step with a


def test_per_client_references_and_the_hidden_state_cache(mixing_setup, monkeypatch):
    rt, client, global_adapter = mixing_setup
    client.scratch.clear()
    monkeypatch.setitem(client.store, LOCAL, client.store[LOCAL])  # restored after the test
    records = [Record(IN_DOMAIN, "", "upper"), Record(OUT_OF_DOMAIN, "", "count")]
    per_input = _method(rt, global_adapter).local_weights(client, records, rt)
    method = _method(rt, global_adapter, references="per_client")
    shared = method.client_references(client)
    assert len(shared) == 5 and shared == method.client_references(client)
    assert shared != method.references(client, IN_DOMAIN) or shared != method.references(client, OUT_OF_DOMAIN)
    per_client = method.local_weights(client, records, rt)
    # By hand: s(x) = mean cosine of h(x) to the K shared references, h with the local adapter active.
    texts = [r.instruction for r in records] + shared
    rt.load_slots([client.store[LOCAL]])
    h = torch.nn.functional.normalize(
        rt.hidden_states([rt.prompt(t) for t in texts], RowMix.one_hot([0] * len(texts)), pool="last").double(), dim=1)
    expected = (h[:2] @ h[2:].T).mean(dim=1).clamp(0, 1) * 0.5
    assert torch.allclose(per_client.double(), expected, atol=1e-5)
    assert not torch.allclose(per_client, per_input)  # other references, other weights

    # Every text was embedded once: a second call (e.g. the global mode after the local one) runs no forward.
    calls = []
    real = rt.hidden_states
    monkeypatch.setattr(rt, "hidden_states", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    again = method.local_weights(client, records, rt)
    assert calls == [] and torch.equal(again, per_client)
    # A new local adapter (another fingerprint) is embedded afresh.
    client.store[LOCAL] = _random_adapter(rt, 5)
    method.local_weights(client, records, rt)
    assert len(calls) == 1 and sorted(calls[0]) == sorted(rt.prompt(t) for t in set(texts))
