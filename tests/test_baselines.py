"""The baselines peers ship (methods.md, "More methods"): FedAvgM and the FedOpt server steps against their
equations on a hand-made two-client example; SCAFFOLD's control variates against their formula (and with
the correction off, FedAvg exactly); FedSA-LoRA's A-only traffic and per-client B; FFA-LoRA's frozen A0,
exact aggregation and B-only traffic; the training mechanics they share (frozen factors, per-step
corrections) packed = one by one; the new Job fields over the Flower codec."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from taskfed.config import load_config
from taskfed.errors import TaskfedError
from taskfed.methods import build_method
from taskfed.methods.base import Correction, Federation, Job, LocalRef, Result, only
from taskfed.methods.ffa import OWN as FFA_OWN
from taskfed.methods.fedsa import OWN as FEDSA_OWN, FedSALoRA
from taskfed.methods.scaffold import C_I
from taskfed.run import Experiment
from taskfed.training import TrainSpec, cosine_lr, train_pack
from tests.conftest import ROOT, tiny_config, untimed

TASKS = '["snli","trec","fix_punct"]'
KEYS = {"m.lora_A": (2, 3), "m.lora_B": (3, 2)}


def config(method: str, *extra: str):
    return tiny_config(f"method.name={method}", "scenario.n_clients=3", f"data.tasks={TASKS}", *extra)


def n_bytes_of(shapes, part) -> int:
    return 4 * sum(math.prod(s) for k, s in shapes.items() if k.endswith(f"lora_{part}"))


# ----------------------------------------------------------------------------- server optimisers
def hand_made():
    """x0 and two rounds of two clients' uploads (client 0: 1 row, client 1: 3 rows), seeded."""
    g = torch.Generator().manual_seed(0)
    x0 = {k: torch.randn(s, generator=g) for k, s in KEYS.items()}
    ups = [[{k: 0.1 * torch.randn(s, generator=g) for k, s in KEYS.items()} for _ in range(2)] for _ in range(2)]
    return x0, ups


def method(name: str, x0, **params):
    fed = Federation(clients=["0", "1"], rounds=2, seed=0, init_adapter=x0, tasks=["t"])
    return build_method({"name": name, **params}, fed)


def step_twice(m, ups):
    """Two rounds; client i's upload is x_t + ups[t][i]. Returns x after each round."""
    xs = []
    for t in range(2):
        x = m.global_adapter
        results = [Result(job=Job(client=c, adapter="global", init=x), weights={k: x[k] + ups[t][i][k] for k in x},
                          n_rows=n, n_client=n, loss=0.0) for i, (c, n) in enumerate([("0", 1), ("1", 3)])]
        m.aggregate(t, iter(results))
        xs.append({k: v.clone() for k, v in m.global_adapter.items()})
    return xs


def reference(rule: str, x0, ups, *, weights=(0.5, 0.5), eta=1e-3, tau=1e-3, beta1=0.9, beta2=0.99, beta=0.9,
              form="heavy_ball", full=False, bias=False):
    """methods.md's equations, written out in numpy float64 for one key at a time."""
    out = []
    for key in KEYS:
        x = x0[key].double().numpy()
        m = u = np.zeros_like(x)
        v = np.zeros_like(x) if bias else np.full_like(x, tau ** 2)
        xs = []
        for t in range(2):
            # Each client's upload is x_t + ups: Delta is the weighted mean of ups (in float32 as uploaded).
            ys = [(torch.from_numpy(x).float() + ups[t][i][key]).double().numpy() for i in range(2)]
            y = sum(w * yi for w, yi in zip(weights, ys))
            x = torch.from_numpy(x).float().double().numpy()
            d = y - x
            if rule == "fedavgm":
                u = d if t == 0 else (beta * u + d if form == "heavy_ball" else beta * u + (1 - beta) * d)
                x = x + eta * u
                xs.append(x)
                continue
            m = d if (full and t == 0) else beta1 * m + (1 - beta1) * d
            if rule == "fedadagrad":
                v = v + d ** 2
            elif rule == "fedyogi":
                v = v - (1 - beta2) * d ** 2 * np.sign(v - d ** 2)
            else:
                v = beta2 * v + (1 - beta2) * d ** 2
            lr = eta
            if bias and rule != "fedadagrad":
                lr = eta * math.sqrt(1 - beta2 ** (t + 1)) / (1 - beta1 ** (t + 1))
            x = x + lr * m / (np.sqrt(v) + tau)
            xs.append(x)
        out.append(xs)
    return [{key: out[j][t] for j, key in enumerate(KEYS)} for t in range(2)]


CASES = {
    "fedavgm": ({}, dict(weights=(0.25, 0.75), eta=1.0)),
    "fedavgm-ema": ({"avgm_form": "ema", "eta": 0.5}, dict(weights=(0.25, 0.75), eta=0.5, form="ema")),
    "fedavgm-uniform": ({"mean": "uniform"}, dict(eta=1.0)),
    "fedadam": ({}, {}),
    "fedadam-full": ({"first_momentum": "full", "eta": 1e-2}, dict(full=True, eta=1e-2)),
    "fedadam-keras": ({"bias_correction": True}, dict(bias=True, beta2=0.999)),
    "fedyogi": ({}, {}),
    "fedyogi-keras": ({"bias_correction": True, "beta2": 0.99}, dict(bias=True, beta2=0.99)),
    "fedadagrad": ({}, dict(beta1=0.0)),
    "fedadagrad-momentum": ({"beta1": 0.5, "mean": "samples"}, dict(beta1=0.5, weights=(0.25, 0.75))),
}


@pytest.mark.parametrize("case", CASES)
def test_server_step_equals_its_equations_on_two_clients(case):
    params, ref = CASES[case]
    x0, ups = hand_made()
    m = method(case.split("-")[0], x0, **params)
    got = step_twice(m, ups)
    want = reference(case.split("-")[0], x0, ups, **ref)
    for t in range(2):
        for key in KEYS:
            np.testing.assert_allclose(got[t][key].double().numpy(), want[t][key], rtol=1e-6, atol=1e-7,
                                       err_msg=f"{case}, round {t}, {key}")
    assert not torch.equal(got[0]["m.lora_A"], got[1]["m.lora_A"])  # the state moved the second step


def test_server_state_stays_in_a_round_without_uploads_and_is_checkpointed():
    x0, ups = hand_made()
    m = method("fedadam", x0)
    step_twice(m, ups)
    state = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in m.state_dict().items()}
    assert {"m", "v", "t", "global_adapter"} <= set(state) and state["t"] == 2
    m.aggregate(2, iter([]))  # every upload refused: no step, t stays
    assert m.t == 2 and all(torch.equal(m.v[k], state["v"][k]) for k in KEYS)
    adagrad = method("fedadagrad", x0)
    step_twice(adagrad, ups)
    assert adagrad.m is None and adagrad.v is not None  # beta1 = 0 keeps only v (P)


# ----------------------------------------------------------------------------- the training mechanics
def random_init(rt, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: 0.05 * torch.randn(v.shape, generator=g) for k, v in rt.init_adapter().items()}


def test_a_frozen_factor_and_a_weight_correction_are_exact(tiny_runtime_factory):
    cfg = tiny_config("scenario.name=single")
    rt = tiny_runtime_factory(cfg)
    exp = Experiment(cfg, rt=rt)
    rows = [rt.encode(r) for r in next(iter(exp.clients.values())).records]
    init = random_init(rt)
    g = torch.Generator().manual_seed(1)
    delta = {k: torch.randn(v.shape, generator=g) for k, v in init.items()}
    steps, lr = 3, 1e-2
    # Nothing trains: the weights move by the correction alone, -lr x delta per step.
    (w, _), = train_pack(rt, [TrainSpec(init=init, rows=rows, steps=steps, batch=4, lr=lr, seed=0, trains=(),
                                        correction=Correction(delta, "weights"))])
    for k in init:
        torch.testing.assert_close(w[k], init[k] - steps * lr * delta[k], rtol=1e-5, atol=1e-6)
    # B only: A is bit for bit where it started, B moved.
    (w, _), = train_pack(rt, [TrainSpec(init=init, rows=rows, steps=steps, batch=4, lr=lr, seed=0, trains=("B",))])
    assert all(torch.equal(w[k], init[k]) for k in init if k.endswith("lora_A"))
    assert not all(torch.equal(w[k], init[k]) for k in init if k.endswith("lora_B"))
    # Nothing trains, the correction on the gradient: AdamW on a constant gradient moves lr x sign per step.
    (w, _), = train_pack(rt, [TrainSpec(init=init, rows=rows, steps=steps, batch=4, lr=lr, seed=0, trains=(),
                                        correction=Correction(delta, "grad"))])
    for k in init:
        torch.testing.assert_close(w[k], init[k] - steps * lr * torch.sign(delta[k]), rtol=1e-4, atol=1e-4)  # eps on tiny |delta|


def test_packed_masks_and_corrections_equal_one_by_one(tiny_runtime_factory):
    cfg = tiny_config("scenario.name=single")
    rt = tiny_runtime_factory(cfg)
    exp = Experiment(cfg, rt=rt)
    clients = list(exp.clients.values())
    g = torch.Generator().manual_seed(2)
    delta = {k: 0.1 * torch.randn(v.shape, generator=g) for k, v in rt.init_adapter().items()}
    specs = [TrainSpec(init=random_init(rt, j), rows=[rt.encode(r) for r in clients[j].records], steps=3, batch=4,
                       lr=1e-2, seed=j, trains=trains, correction=corr)
             for j, (trains, corr) in enumerate([(("B",), None), (("A", "B"), Correction(delta)), (("A", "B"), None)])]
    packed = train_pack(rt, specs)
    alone = [train_pack(rt, [s])[0] for s in specs]
    for (wp, _), (wa, _) in zip(packed, alone):
        assert all(torch.allclose(wp[k], wa[k], atol=1e-5) for k in wp)
    assert all(torch.equal(packed[0][0][k], specs[0].init[k]) for k in delta if k.endswith("lora_A"))


# ----------------------------------------------------------------------------- SCAFFOLD
def recording(ex):
    """Per round: the global x and c the round started from, its results, and each client's c_i after it."""
    log = []
    aggregate = ex.method.aggregate

    def wrapped(r, results):
        results = list(results)
        entry = {"x": getattr(ex.method, "global_adapter", None), "c": getattr(ex.method, "c", None),
                 "results": results}
        aggregate(r, results)
        entry["c_i"] = {cid: cl.store.get(C_I) for cid, cl in ex.engine.clients.items()}
        log.append(entry)
    ex.method.aggregate = wrapped
    return log


def test_scaffold_control_variates_follow_the_formula():
    cfg = config("scaffold", "train.rounds=3")
    ex = Experiment(cfg)
    log = recording(ex)
    ex.run(None)
    tc, m_clients = cfg.train, len(ex.method.fed.clients)
    prev_c_i = {cid: None for cid in ex.engine.clients}
    for r, entry in enumerate(log):
        lr, x, c = cosine_lr(r, tc.rounds, tc.lr_max, tc.lr_min), entry["x"], entry["c"]
        assert all(torch.equal(res.job.extra["c"][k], c[k]) for res in entry["results"] for k in c)  # c travels
        for res in entry["results"]:
            cid = res.job.client
            c_i = prev_c_i[cid] or {k: torch.zeros_like(v) for k, v in c.items()}
            for k in x:
                corr = c[k].double() - c_i[k].double()
                want = (x[k].double() - res.weights[k].double()) / (tc.steps * lr) - corr
                torch.testing.assert_close(entry["c_i"][cid][k].double(), want, rtol=1e-4, atol=1e-4)
                torch.testing.assert_close(res.extra["dc"][k], entry["c_i"][cid][k] - c_i[k])
            prev_c_i[cid] = entry["c_i"][cid]
        # The server: x = sample-weighted mean of y; c += (1/M) sum dc.
        n = sum(res.n_client for res in entry["results"])
        nxt = log[r + 1] if r + 1 < len(log) else {"x": ex.method.global_adapter, "c": ex.method.c}
        for k in x:
            y = sum(res.weights[k].double() * res.n_client for res in entry["results"]) / n
            torch.testing.assert_close(nxt["x"][k].double(), y, rtol=1e-6, atol=1e-7)
            c_next = c[k].double() + sum(res.extra["dc"][k].double() for res in entry["results"]) / m_clients
            torch.testing.assert_close(nxt["c"][k].double(), c_next, rtol=1e-5, atol=1e-6)
    assert any(float(v.abs().max()) > 0 for v in ex.method.c.values())
    rounds = ex.rounds
    p = sum(math.prod(v.shape) for v in ex.method.c.values()) * 4
    assert all(rec["bytes_up"] == rec["bytes_down"] == 2 * p * m_clients for rec in rounds)  # 2P each way
    assert rounds[-1]["scaffold_c_norm"] > 0 and rounds[-1]["scaffold_dc_norm_max"] > 0


def test_scaffold_with_the_correction_off_is_fedavg_exactly_and_on_is_not():
    runs = {}
    for label, method, extra in [("fedavg", "fedavg", ()), ("off", "scaffold", ("method.correction=off",)),
                                 ("on", "scaffold", ())]:
        ex = Experiment(config(method, "train.rounds=3", *extra))
        metrics = ex.run(None)
        runs[label] = (metrics, ex.method.global_adapter)
    fedavg, off, on = runs["fedavg"], runs["off"], runs["on"]
    assert all(torch.equal(fedavg[1][k], off[1][k]) for k in fedavg[1])
    assert untimed(fedavg[0]["eval"]) == untimed(off[0]["eval"])
    assert not all(torch.equal(fedavg[1][k], on[1][k]) for k in fedavg[1])


def test_scaffold_refuses_update_privacy():
    with pytest.raises(TaskfedError, match="scaffold"):
        config("scaffold", "privacy.updates.clip=1.0", "privacy.updates.noise_multiplier=1.0")


# ----------------------------------------------------------------------------- FedSA-LoRA
def test_fedsa_uploads_only_a_and_each_client_keeps_its_own_b(tmp_path, monkeypatch):
    ex = Experiment(config("fedsa-lora", "train.rounds=3", 'data.unseen_tasks=["web_nlg_en"]',
                           'eval.modes=["local","global","unseen"]'))
    log = recording(ex)
    starts = []
    job_done = FedSALoRA.job_done

    def spy(self, client, job, run):  # what the job started from, against the client's B before it trained
        before = client.store.get(FEDSA_OWN, self.fed.init_adapter)
        starts.append((client.id, {k: v.clone() for k, v in run.start.items()}, only(before, ("B",)), job.init))
        return job_done(self, client, job, run)
    monkeypatch.setattr(FedSALoRA, "job_done", spy)
    metrics = ex.run(tmp_path / "run")
    side = ex.engine.client_side
    # Every mode evaluates the personal models: unseen on the held-out task only.
    assert set(metrics["eval"]) == {"local", "global", "unseen"}
    assert all(set(c["per_task"]) == {"web_nlg_en"} for c in metrics["eval"]["unseen"]["per_client"].values())
    shapes = ex.rt.bank.shapes()
    assert all(set(res.weights) == set(only(shapes, ("A",))) for e in log for res in e["results"])
    assert all(rec["bytes_up"] == rec["bytes_down"] == 3 * n_bytes_of(shapes, "A") for rec in ex.rounds)
    for cid, start, own_b, sent_a in starts:
        assert all(torch.equal(start[k], own_b[k]) for k in own_b)  # B: the client's own, as it left it
        assert all(torch.equal(start[k], sent_a[k]) for k in sent_a)  # A: the server's
    # The B each client keeps is the one it trained; no two clients share one.
    bs = {cid: only(cl.store[FEDSA_OWN], ("B",)) for cid, cl in ex.engine.clients.items()}
    key = next(iter(bs["0"]))
    assert not torch.equal(bs["0"][key], bs["1"][key]) and not torch.equal(bs["1"][key], bs["2"][key])
    # Evaluated and saved: the personal model (A_global, B_i).
    from taskfed.model.peft_io import load_adapter
    for cid, cl in ex.engine.clients.items():
        personal = side.eval_adapters(cl, ex.method.downlink(cid))["personal"]
        saved = load_adapter(tmp_path / "run" / "adapters" / "clients" / cid / "personal")
        for k, v in personal.items():
            want = ex.method.a_global[k] if k.endswith("lora_A") else bs[cid][k]
            assert torch.equal(v, want) and torch.equal(saved[k], want), (cid, k)
    assert not (tmp_path / "run" / "adapters" / "server").exists() or not any((tmp_path / "run" / "adapters" / "server").iterdir())


# ----------------------------------------------------------------------------- FFA-LoRA
def test_ffa_keeps_a0_aggregates_exactly_and_sends_only_b():
    ex = Experiment(config("ffa-lora"))
    log = recording(ex)
    ex.run(None)
    shapes, init = ex.rt.bank.shapes(), ex.method.fed.init_adapter
    for cl in ex.engine.clients.values():  # A on every client: the seeded A0, bit for bit
        assert all(torch.equal(cl.store[FFA_OWN][k], init[k]) for k in init if k.endswith("lora_A"))
    assert all(rec["bytes_up"] == rec["bytes_down"] == 3 * n_bytes_of(shapes, "B") for rec in ex.rounds)
    last = log[-1]["results"]
    assert all(set(res.weights) == set(only(shapes, ("B",))) for res in last)
    n = sum(res.n_client for res in last)
    b_key = next(k for k in shapes if k.endswith("lora_B"))
    a_key = b_key[: -len("lora_B")] + "lora_A"
    # The aggregate's delta_W is the exact mean of the clients' B_i A0.
    mean_delta = sum(res.n_client * (res.weights[b_key].double() @ init[a_key].double()) for res in last) / n
    served = ex.method.server_adapters()["global"]
    torch.testing.assert_close(served[b_key].double() @ served[a_key].double(), mean_delta, rtol=1e-5, atol=1e-7)
    assert torch.equal(served[a_key], init[a_key])


def test_ffa_a0_sent_once_trains_the_same_as_a0_from_the_seed():
    seeded, sent = Experiment(config("ffa-lora")), Experiment(config("ffa-lora", "method.a0=sent"))
    seeded.run(None), sent.run(None)
    shapes = seeded.rt.bank.shapes()
    b, a = n_bytes_of(shapes, "B"), n_bytes_of(shapes, "A")
    assert [r["bytes_down"] for r in sent.rounds] == [3 * (a + b), 3 * b]
    assert all(torch.equal(seeded.method.b_global[k], sent.method.b_global[k]) for k in seeded.method.b_global)


def test_ffa_under_update_privacy_clips_b_and_is_accounted():
    ex = Experiment(config("ffa-lora", "privacy.updates.clip=0.01", "privacy.updates.noise_multiplier=1.0"))
    metrics = ex.run(None)
    assert metrics["privacy"]["updates"]["epsilon"] > 0
    init = ex.method.fed.init_adapter
    for cl in ex.engine.clients.values():
        assert all(torch.equal(cl.store[FFA_OWN][k], init[k]) for k in init if k.endswith("lora_A"))


# ----------------------------------------------------------------------------- configs and the codec
@pytest.mark.parametrize("name", ["fedavgm", "fedadam", "fedyogi", "fedadagrad", "scaffold", "fedsa-lora", "ffa-lora"])
def test_each_config_loads_with_its_method(name):
    cfg = load_config(ROOT / "configs" / f"{name}.toml", [])
    assert cfg.method_name == name


def test_new_job_fields_round_trip_over_the_codec():
    from taskfed.flower.codec import decode_jobs, encode_adapter, decode_adapter, encode_jobs

    cfg = config("fedsa-lora")
    g = torch.Generator().manual_seed(0)
    init = {k: torch.randn(s, generator=g) for k, s in KEYS.items()}
    a_only, c = only(init, ("A",)), {k: torch.ones(s) for k, s in KEYS.items()}
    jobs = [Job(client="1", adapter="personal", init=a_only, fill=LocalRef("fedsa_own", init), sends=("A",),
                keep_as="fedsa_own"),
            Job(client="1", adapter="global", init=only(init, ("B",)), fill=LocalRef("ffa_own", None),
                trains=("B",), sends=("B",)),
            Job(client="1", adapter="global", init=init, extra={"c": c})]
    content = encode_jobs(jobs, 0, cfg, init)
    assert len(content.array_records) == 4  # A, B, the full init of job 3 and c; the run's init is named, not sent
    _, back = decode_jobs(content, KEYS, init)
    assert back[0].fill.name == "fedsa_own" and back[0].fill.default is init
    assert set(back[0].init) == {"m.lora_A"} and back[0].sends == ("A",) and back[0].trains == ("A", "B")
    assert back[1].fill.default is None and back[1].trains == ("B",) and back[1].sends == ("B",)
    assert torch.equal(back[2].extra["c"]["m.lora_B"], c["m.lora_B"]) and back[2].extra.keys() == {"c"}
    with pytest.raises(TaskfedError, match="initial adapter"):
        decode_jobs(content, KEYS, None)
    # A partial adapter holds whole factors: a factor with a key missing is refused.
    shapes = {**KEYS, "n.lora_A": (2, 3), "n.lora_B": (3, 2)}
    half = {"m.lora_A": torch.zeros(2, 3)}
    with pytest.raises(TaskfedError, match="lacks tensor 'n.lora_A'"):
        decode_adapter(encode_adapter(half), shapes, "test", partial=True)
    with pytest.raises(TaskfedError, match="lacks tensor"):
        decode_adapter(encode_adapter(half), shapes, "test")


def test_fedsa_mean_b_uploads_every_b_once_and_evaluates_the_mean():
    ex = Experiment(config("fedsa-lora", "method.eval=mean_b"))
    log = recording(ex)
    metrics = ex.run(None)
    shapes = ex.rt.bank.shapes()
    assert len(ex.rounds) == 3  # the budget's 2 rounds, then the B round
    last = ex.rounds[-1]
    assert last["bytes_up"] == 3 * n_bytes_of(shapes, "B") and last["bytes_down"] == 3 * n_bytes_of(shapes, "A")
    own = {cid: only(cl.store[FEDSA_OWN], ("B",)) for cid, cl in ex.engine.clients.items()}
    uploads = log[-1]["results"]
    assert all(torch.equal(r.weights[k], own[r.job.client][k]) for r in uploads for k in r.weights)  # untrained
    n = sum(r.n_client for r in uploads)
    served = ex.method.server_adapters()["global"]
    for k in own["0"]:
        want = sum(r.n_client * r.weights[k].double() for r in uploads) / n
        torch.testing.assert_close(served[k].double(), want, rtol=1e-6, atol=1e-8)
    assert all(torch.equal(served[k], ex.method.a_global[k]) for k in ex.method.a_global)
    assert set(metrics["eval"]) == {"local", "global"}


def test_fedsa_shared_b_chains_each_clients_b_into_the_next():
    ex = Experiment(config("fedsa-lora", "method.shared_b=true"))
    log = recording(ex)
    ex.run(None)
    assert len(ex.rounds) == 2 * 3  # a chain of the 3 clients per round
    jobs = [(e["results"][0].job, e["results"][0].weights) for e in log]
    assert [j.client for j, _ in jobs] == ["0", "1", "2"] * 2
    for (_, prev), (job, _) in zip(jobs, jobs[1:]):  # each starts from the B the one before it trained
        assert all(torch.equal(job.init[k], prev[k]) for k in prev if k.endswith("lora_B"))
    # A_global moves only at a chain's end: the sample-weighted mean of the chain's A's.
    chain = [e["results"][0] for e in log[3:]]
    n = sum(r.n_client for r in chain)
    for k in ex.method.a_global:
        want = sum(r.n_client * r.weights[k].double() for r in chain) / n
        torch.testing.assert_close(ex.method.a_global[k].double(), want, rtol=1e-6, atol=1e-8)
    assert all(torch.equal(jobs[4][0].init[k], jobs[3][0].init[k]) for k in jobs[3][0].init if k.endswith("lora_A"))
    tc = ex.cfg.train
    assert [j.lr for j, _ in jobs] == [cosine_lr(r // 3, tc.rounds, tc.lr_max, tc.lr_min) for r in range(6)]


def test_fedsa_switches_that_contradict_are_one_error():
    from taskfed.methods import check_params

    with pytest.raises(TaskfedError, match="shared_b = true does not keep"):
        check_params({"name": "fedsa-lora", "shared_b": True, "eval": "mean_b"})
