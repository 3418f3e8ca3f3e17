"""Streaming aggregation: the in-process engine hands the server each upload as its pack finishes and keeps
none of them, so server memory does not grow with the number of clients in a round."""

import gc
import weakref

import torch

import taskfed.engine.inprocess as engine_mod
from taskfed.methods.base import RunningMean, weighted_mean
from taskfed.run import Experiment
from tests.conftest import tiny_config


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _fedavg(tiny_runtime_factory, *extra):
    # One client per pack (max_rows_per_batch = batch): four packs in the round.
    cfg = tiny_config("method.name=fedavg", "scenario.name=iid", "scenario.n_clients=4", "train.rounds=1",
                      "train.max_rows_per_batch=4", *extra)
    return Experiment(cfg, rt=tiny_runtime_factory(cfg))


def test_uploads_reach_the_server_pack_by_pack_and_the_engine_keeps_none(tiny_runtime_factory, monkeypatch):
    exp = _fedavg(tiny_runtime_factory)
    packs = []
    real = engine_mod.train_pack
    monkeypatch.setattr(engine_mod, "train_pack",
                        lambda rt, specs, *args: (packs.append(len(specs)), real(rt, specs, *args))[1])
    arrivals, refs = [], []
    aggregate = exp.method.aggregate

    def spy(round_idx, results):
        def watched():
            for x in results:
                arrivals.append((x.job.client, len(packs)))
                gc.collect()
                # Every upload but the one the aggregation's loop still names is gone: neither the engine
                # nor the running sum holds on to it.
                assert [ref() is None for ref in refs[:-1]] == [True] * len(refs[:-1])
                refs.append(weakref.ref(next(iter(x.weights.values()))))
                yield x
        aggregate(round_idx, watched())

    exp.method.aggregate = spy
    rounds, _ = exp.train()
    assert packs == [1, 1, 1, 1]
    # Client i's upload arrives right after the (i+1)-th pack, in plan order, before later packs train.
    assert arrivals == [("0", 1), ("1", 2), ("2", 3), ("3", 4)]
    gc.collect()
    assert all(ref() is None for ref in refs)
    assert rounds[0]["bytes_up"] == 4 * engine_mod.n_bytes(exp.method.global_adapter)


def test_the_streamed_aggregate_equals_the_mean_of_the_whole_round(tiny_runtime_factory):
    streamed = _fedavg(tiny_runtime_factory)
    streamed.train()
    whole = _fedavg(tiny_runtime_factory)
    results, _ = whole.engine.run(0, whole.method.plan(0, sorted(whole.clients)))
    assert len(results) == 4
    expected = weighted_mean([r.weights for r in results], [r.n_client for r in results])
    assert _equal(streamed.method.global_adapter, expected)
    assert not _equal(expected, whole.method.global_adapter)  # the round did train something


def test_running_mean_is_the_weighted_mean_in_float64():
    a = {"x": torch.tensor([1.0, 2.0])}
    b = {"x": torch.tensor([3.0, 6.0])}
    acc = RunningMean()
    assert not acc
    acc.add(a, 100)
    acc.add(b, 300)
    assert acc.count == 2 and acc.sums["x"].dtype == torch.float64
    assert torch.equal(acc.mean()["x"], torch.tensor([2.5, 5.0]))
    assert _equal(acc.mean(), weighted_mean([a, b], [100, 300]))


def test_jobs_the_aggregation_does_not_pull_still_train(tiny_runtime_factory):
    # Local's aggregation pulls nothing: the engine's round must still train every client's own adapter.
    cfg = tiny_config("method.name=local", "scenario.name=iid", "scenario.n_clients=3", "train.rounds=1",
                      )
    exp = Experiment(cfg, rt=tiny_runtime_factory(cfg))
    init = exp.rt.init_adapter()
    rounds, _ = exp.train()
    assert rounds[0]["bytes_up"] == 0 and rounds[0]["train_tokens"] > 0
    for client in exp.clients.values():
        assert not _equal(client.store["local"], init)


def test_the_heap_threshold_is_fixed_once_where_asked_and_left_alone_by_default(monkeypatch):
    import taskfed.memory as memory

    calls = []
    monkeypatch.setattr(memory, "_mallopt", lambda param, value: calls.append((param, value)))
    monkeypatch.setattr(memory, "_tuned", False)
    monkeypatch.delenv("TASKFED_MMAP_THRESHOLD", raising=False)
    memory.tune_heap()  # default: glibc's own dynamic threshold (training speed)
    assert calls == []
    monkeypatch.setattr(memory, "_tuned", False)
    monkeypatch.setenv("TASKFED_MMAP_THRESHOLD", "1048576")
    memory.tune_heap()
    memory.tune_heap()  # once per process
    assert calls == [(memory.M_MMAP_THRESHOLD, 1 << 20)]
