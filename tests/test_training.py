"""Local training, the engine and the three simple methods."""

import math

import pytest
import torch

from taskfed.engine.inprocess import InProcessEngine
from taskfed.methods.base import Client, Job, Result, weighted_mean
from taskfed.run import Experiment, run_experiment
from taskfed.training import TrainSpec, adapter_losses, cosine_lr, train_pack
from tests.conftest import tiny_config


def _close(a, b, atol=1e-6):
    return all(torch.allclose(a[k], b[k], atol=atol) for k in a)


def test_cosine_lr_runs_from_max_to_min_and_is_constant_past_the_end():
    assert cosine_lr(0, 10, 5e-4, 1e-5) == pytest.approx(5e-4)
    assert cosine_lr(9, 10, 5e-4, 1e-5) == pytest.approx(1e-5)
    assert cosine_lr(10, 10, 5e-4, 1e-5) == pytest.approx(1e-5)
    mid = cosine_lr(4.5, 10, 5e-4, 1e-5)
    assert mid == pytest.approx((5e-4 + 1e-5) / 2)


def test_weighted_mean_is_the_hand_computed_weighted_mean():
    a = {"x": torch.tensor([1.0, 2.0]), "y": torch.tensor([[0.0]])}
    b = {"x": torch.tensor([3.0, 6.0]), "y": torch.tensor([[4.0]])}
    m = weighted_mean([a, b], [100, 300])
    assert torch.allclose(m["x"], torch.tensor([2.5, 5.0])) and torch.allclose(m["y"], torch.tensor([[3.0]]))


def test_fedavg_aggregate_weights_clients_by_sample_count(tiny_runtime_factory):
    cfg = tiny_config("method.name=fedavg", "scenario.name=single")
    exp = Experiment(cfg, rt=tiny_runtime_factory(cfg))
    keys = list(exp.method.global_adapter)
    fake = []
    for i, n in enumerate((10, 30, 60)):
        w = {k: torch.full_like(v, float(i + 1)) for k, v in exp.method.global_adapter.items()}
        fake.append(Result(job=Job(client=str(i), adapter="global", init=w), weights=w, n_rows=n, n_client=n, loss=0.0))
    exp.method.aggregate(0, fake[::-1])  # order of arrival must not matter
    expected = (1 * 10 + 2 * 30 + 3 * 60) / 100
    assert all(torch.allclose(exp.method.global_adapter[k], torch.full_like(exp.method.global_adapter[k], expected))
               for k in keys)


def _specs(rt, exp, n_jobs=3):
    init = rt.init_adapter()
    specs = []
    for j, client in enumerate(list(exp.clients.values())[:n_jobs]):
        rows = [rt.encode(r) for r in client.records]
        specs.append(TrainSpec(init=init, rows=rows, steps=3, batch=4, lr=1e-2, seed=100 + j))
    return specs


def test_packed_training_equals_jobs_one_by_one(tiny_runtime_factory):
    cfg = tiny_config("scenario.name=single")
    rt = tiny_runtime_factory(cfg)
    exp = Experiment(cfg, rt=rt)
    specs = _specs(rt, exp)
    packed = train_pack(rt, specs)
    alone = [train_pack(rt, [s])[0] for s in specs]
    for (wp, lp), (wa, la) in zip(packed, alone):
        assert _close(wp, wa, atol=1e-5) and lp == pytest.approx(la, rel=1e-4)
    assert not _close(packed[0][0], packed[1][0])  # different data, different adapters


def test_packed_training_equals_one_by_one_in_bfloat16(tiny_runtime_factory):
    cfg = tiny_config("scenario.name=single", "model.dtype=bfloat16")
    from taskfed.model.loading import load_base
    from taskfed.runtime import Runtime

    model, tok = load_base("tiny", dtype=torch.bfloat16)
    rt = Runtime(cfg, model=model, tokenizer=tok)
    exp = Experiment(cfg, rt=rt)
    specs = _specs(rt, exp, 2)
    packed = train_pack(rt, specs)
    alone = [train_pack(rt, [s])[0] for s in specs]
    for (wp, _), (wa, _) in zip(packed, alone):
        assert _close(wp, wa, atol=2e-2)


def test_engine_concurrent_and_sequential_give_equal_results(tiny_runtime_factory):
    results = {}
    for concurrent in (True, False):
        cfg = tiny_config("method.name=fedavg", "scenario.name=dual", f"train.concurrent={str(concurrent).lower()}")
        results[concurrent] = run_experiment(cfg, rt=tiny_runtime_factory(cfg))
    a, b = results[True], results[False]
    assert [r["train_loss"] for r in a["rounds"]] == pytest.approx([r["train_loss"] for r in b["rounds"]], rel=1e-4)


def test_training_lowers_the_loss_on_its_own_task(tiny_runtime_factory, tmp_path):
    from tests.conftest import write_two_task_data

    train, test = write_two_task_data(tmp_path)
    cfg = tiny_config("data.source=json", f"data.train_path={train}", f"data.test_path={test}")
    rt = tiny_runtime_factory(cfg)
    exp = Experiment(cfg, rt=rt)
    rows = [rt.encode(r) for r in exp.clients["0"].records if r.task == "upper"]
    init = rt.init_adapter()
    (trained, _), = train_pack(rt, [TrainSpec(init=init, rows=rows, steps=30, batch=8, lr=1e-2, seed=0)])
    before, after = adapter_losses(rt, [init, trained], rows)
    assert after < 0.7 * before


def test_local_sends_zero_bytes_and_keeps_its_adapter_on_the_client(tiny_runtime_factory):
    cfg = tiny_config("method.name=local", "scenario.name=single")
    exp = Experiment(cfg, rt=tiny_runtime_factory(cfg))
    metrics = exp.run()
    assert metrics["bytes_communicated"] == 0
    assert all(r["bytes_up"] == 0 and r["bytes_down"] == 0 for r in metrics["rounds"])
    adapters = [c.store["local"] for c in exp.clients.values()]
    assert not _close(adapters[0], adapters[1])  # each client trained its own
    assert exp.method.server_adapters() == {}


def test_fedavg_bytes_are_one_adapter_each_way_per_client(tiny_runtime_factory):
    cfg = tiny_config("method.name=fedavg", "scenario.name=dual")
    exp = Experiment(cfg, rt=tiny_runtime_factory(cfg))
    metrics = exp.run()
    size = sum(t.numel() for t in exp.rt.init_adapter().values()) * 4
    assert metrics["rounds"][0]["bytes_up"] == metrics["rounds"][0]["bytes_down"] == 8 * size
    assert metrics["bytes_communicated"] == 2 * 2 * 8 * size


def test_fedprox_with_mu_zero_equals_fedavg(tiny_runtime_factory):
    out = {}
    for name in ("fedavg", "fedprox"):
        cfg = tiny_config(f"method.name={name}", "scenario.name=dual", *(["method.mu=0"] if name == "fedprox" else []))
        exp = Experiment(cfg, rt=tiny_runtime_factory(cfg))
        exp.train()
        out[name] = exp.method.global_adapter
    assert all(torch.equal(out["fedavg"][k], out["fedprox"][k]) for k in out["fedavg"])


def test_fedprox_term_pulls_towards_the_global_adapter(tiny_runtime_factory):
    cfg = tiny_config("scenario.name=single")
    rt = tiny_runtime_factory(cfg)
    exp = Experiment(cfg, rt=rt)
    init = rt.init_adapter()
    rows = [rt.encode(r) for r in exp.clients["0"].records]
    free = train_pack(rt, [TrainSpec(init=init, rows=rows, steps=5, batch=4, lr=1e-2, seed=0)])[0][0]
    prox = train_pack(rt, [TrainSpec(init=init, rows=rows, steps=5, batch=4, lr=1e-2, seed=0, prox_mu=50.0,
                                     prox_ref=init)])[0][0]
    dist = lambda w: math.sqrt(sum(float((w[k] - init[k]).pow(2).sum()) for k in w))
    assert dist(prox) < dist(free)


def test_same_seed_same_adapters_other_seed_other_adapters(tiny_runtime_factory):
    def final(seed):
        cfg = tiny_config("method.name=fedavg", "scenario.name=dual", f"seed={seed}")
        exp = Experiment(cfg, rt=tiny_runtime_factory(cfg))
        exp.train()
        return exp.method.global_adapter

    a, b, c = final(0), final(0), final(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_client_sampling_is_seeded_and_counts_bytes_of_sampled_clients_only(tiny_runtime_factory):
    cfg = tiny_config("method.name=fedavg", "scenario.name=dual", "scenario.clients_per_round=3")
    exp = Experiment(cfg, rt=tiny_runtime_factory(cfg))
    metrics = exp.run()
    size = sum(t.numel() for t in exp.rt.init_adapter().values()) * 4
    assert all(r["bytes_up"] == 3 * size for r in metrics["rounds"])
    from taskfed.run import sample_clients

    ids = list(exp.clients)
    assert sample_clients(ids, 3, 0, 1) == sample_clients(ids, 3, 0, 1)
    assert len({tuple(sample_clients(ids, 3, 0, r)) for r in range(6)}) > 1


def test_ifca_style_candidates_start_from_the_lowest_loss_adapter(tiny_runtime_factory, tmp_path):
    from tests.conftest import write_two_task_data

    train, test = write_two_task_data(tmp_path)
    cfg = tiny_config("data.source=json", f"data.train_path={train}", f"data.test_path={test}", "scenario.name=single")
    rt = tiny_runtime_factory(cfg)
    exp = Experiment(cfg, rt=rt)
    client = exp.clients["0"]
    rows = [rt.encode(r) for r in client.records]
    init = rt.init_adapter()
    good = train_pack(rt, [TrainSpec(init=init, rows=rows, steps=20, batch=8, lr=1e-2, seed=0)])[0][0]
    engine = InProcessEngine(rt, exp.clients, cfg)
    results, _ = engine.run(0, [Job(client="0", adapter="c", init=init, candidates=[init, good])])
    assert results[0].chosen == 1


def test_an_upload_with_nan_is_dropped_and_the_others_aggregate(tiny_runtime_factory, monkeypatch):
    import taskfed.engine.inprocess as engine_mod

    cfg = tiny_config("method.name=fedavg", "scenario.name=dual", "train.rounds=1")
    exp = Experiment(cfg, rt=tiny_runtime_factory(cfg))
    real = engine_mod.train_pack

    def poisoned(rt, specs, *args):  # client 3's training diverges
        out = real(rt, specs, *args)
        for spec, (weights, _) in zip(specs, out):
            if spec.rows == [rt.encode(r) for r in exp.clients["3"].records]:
                key = next(iter(weights))
                weights[key] = torch.full_like(weights[key], float("nan"))
        return out

    monkeypatch.setattr(engine_mod, "train_pack", poisoned)
    seen = []
    aggregate = exp.method.aggregate

    def spy(r, results):
        results = list(results)
        seen.extend(x.job.client for x in results)
        aggregate(r, results)

    exp.method.aggregate = spy
    metrics = exp.run()
    assert sorted(seen) == [c for c in exp.clients if c != "3"]
    assert "3/global" in metrics["rounds"][0]["dropped"] and "NaN" in metrics["rounds"][0]["dropped"]["3/global"]
    assert all(torch.isfinite(v).all() for v in exp.method.global_adapter.values())
